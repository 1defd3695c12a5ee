//! The CPU's float8 dot products: one weight row (E4M3 codes) against a few activation rows,
//! the weight decoded once for all of them. This is what a decoder layer computed on the host
//! spends its time in (hybrid decode), so it is vectorised (AVX-512, or AVX2 with F16C and
//! FMA, chosen at run time) and gives the scalar path's bits: every path adds the products
//! into [`LANES`] partial sums, element `e` into sum `e % LANES` with a fused multiply-add (one
//! rounding), and adds the sums in one fixed order, so a result does not depend on the
//! machine, the thread count or the path taken.

use rayon::prelude::*;

/// Partial sums per dot product: two AVX-512 or four AVX2 registers, enough independent
/// additions to keep the adders busy.
const LANES: usize = 32;

/// How this CPU computes the dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Path {
    /// The fastest path this CPU has.
    fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") {
                return Path::Avx512;
            }
            if has!("avx2") && has!("f16c") && has!("fma") {
                return Path::Avx2;
            }
        }
        Path::Scalar
    }

    /// Every path this CPU has, the scalar one first (for tests).
    #[cfg(test)]
    fn available() -> Vec<Path> {
        let mut paths = vec![Path::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("f16c") && has!("fma") {
                paths.push(Path::Avx2);
            }
            if has!("avx512f") && has!("avx512bw") {
                paths.push(Path::Avx512);
            }
        }
        paths
    }

    /// `out[r] = Σ_e value(w[e]) · x[r][e]`, where the vectorised paths get each row scaled
    /// by 256 (`scaled`, exact) and the scalar path the rows as they are (`plain`): the
    /// vectorised paths decode a code to its value / 256, so the products are the same reals
    /// and round alike.
    fn dots(
        self,
        w: &[u8],
        plain: &[&[f32]],
        scaled: &[&[f32]],
        lut: &[f32; 256],
        out: &mut [f32],
    ) {
        match self {
            Path::Scalar => {
                for (x, o) in plain.iter().zip(out.iter_mut()) {
                    let mut acc = [0f32; LANES];
                    for (e, (&c, &v)) in w.iter().zip(x.iter()).enumerate() {
                        acc[e % LANES] = lut[c as usize].mul_add(v, acc[e % LANES]);
                    }
                    *o = reduce(&acc);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => {
                for (x, o) in scaled
                    .chunks(MAX_SIMD_ROWS)
                    .zip(out.chunks_mut(MAX_SIMD_ROWS))
                {
                    // SAFETY: `detect` found AVX2, F16C and FMA; every row is `w.len()` long
                    // (checked by `matvec`), and no more rows than the path holds.
                    unsafe { avx2::dots(w, x, lut, o) };
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => {
                for (x, o) in scaled
                    .chunks(MAX_SIMD_ROWS)
                    .zip(out.chunks_mut(MAX_SIMD_ROWS))
                {
                    // SAFETY: as above, for AVX-512 F and BW.
                    unsafe { avx512::dots(w, x, lut, o) };
                }
            }
        }
    }
}

/// One weight's product in a [`matvec`] call: its codes `[y.len() / rows, in]`, its scale
/// (none, one value, or one per output row) and where its results go, feature-major
/// (`y[o * rows + r]` for output row `o` and row `r` of x).
pub struct Product<'a> {
    /// The weight's codes.
    pub w: &'a [u8],
    /// Its scale.
    pub scale: Option<&'a [f32]>,
    /// Its results.
    pub y: &'a mut [f32],
}

/// `y[o * rows + r] = scale(o) · dot(w row o, xs[r])` for every product and every output row
/// `o` of its weight, all the products' rows spread over the cores in one parallel pass (one
/// start and join of the threads for q, k and v, or for gate and up): the float8 products of
/// a host-computed layer.
pub fn matvec(products: &mut [Product<'_>], xs: &[&[f32]], lut: &[f32; 256]) {
    matvec_on(Path::detect(), products, xs, lut)
}

fn matvec_on(path: Path, products: &mut [Product<'_>], xs: &[&[f32]], lut: &[f32; 256]) {
    let rows = xs.len();
    let n_in = xs.first().map_or(0, |x| x.len());
    assert!(
        xs.iter().all(|x| x.len() == n_in),
        "f8 matvec: rows differ in length"
    );
    // Scaled once per call, not once per weight row.
    let scaled: Vec<Vec<f32>> = match path {
        Path::Scalar => Vec::new(),
        #[cfg(target_arch = "x86_64")]
        _ => xs
            .iter()
            .map(|x| x.iter().map(|v| v * 256.0).collect())
            .collect(),
    };
    let scaled: Vec<&[f32]> = scaled.iter().map(Vec::as_slice).collect();
    // Weight rows per task: four at once where the AVX-512 path can hold their sums (fewer
    // loop and reduction overheads a row, four streams in flight a thread).
    let group = match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 if rows <= avx512::GROUP_ROWS => avx512::GROUP,
        _ => 1,
    };
    let mut jobs = Vec::new();
    for p in products.iter_mut() {
        assert_eq!(
            p.w.len() * rows,
            p.y.len() * n_in,
            "f8 matvec: shapes disagree"
        );
        let (w, scale) = (p.w, p.scale);
        for (g, out) in p.y.chunks_mut(rows * group).enumerate() {
            jobs.push((w, scale, g * group, out));
        }
    }
    pool().install(|| {
        jobs.into_par_iter().for_each(|(w, scale, first, out)| {
            let count = out.len() / rows;
            let w = &w[first * n_in..(first + count) * n_in];
            match count == group && group > 1 {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the path was detected (AVX-512 F and BW); `w` holds `group` rows of
                // `n_in`, every x row is `n_in` long (checked above), `out` `group` x `rows`.
                true => unsafe { avx512::dots_group(w, n_in, &scaled, lut, out) },
                _ => {
                    for (k, o) in out.chunks_mut(rows).enumerate() {
                        path.dots(&w[k * n_in..(k + 1) * n_in], xs, &scaled, lut, o);
                    }
                }
            }
            for (k, o) in out.chunks_mut(rows).enumerate() {
                let s = match scale {
                    None => 1.0,
                    Some([one]) => *one,
                    Some(per_row) => per_row[first + k],
                };
                for v in o.iter_mut() {
                    *v *= s;
                }
            }
        })
    });
}

/// The threads the products run on: one fewer than the cores, so that the thread that waits
/// for them, the GPU driver's and the system's do not delay a product's slowest share (the
/// research note measured 73 GB/s on 16 threads of the lent H200 host's 16 cores, 65-101 on
/// 15). A host-computed layer runs on them whole (`engine::host`), so that its attention and
/// other parallel steps wake no second set of threads.
pub(super) fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores.saturating_sub(1).max(1))
            .thread_name(|i| format!("f8-matvec-{i}"))
            .build()
            .expect("a thread pool for the float8 products")
    })
}

/// Weight bytes per second, in GB/s, that [`matvec`] reads on this host at `rows` rows over
/// the products of one decoder layer of `hidden` and `intermediate` widths (q/k/v as one,
/// o, gate and up as one, down: a host-computed layer's four calls), on every core, the best
/// of a few passes after one to warm up. What hybrid decoding's split is planned with.
pub fn measure_gbps(rows: usize, hidden: usize, kv_width: usize, intermediate: usize) -> f64 {
    let shapes = [
        (hidden + 2 * kv_width, hidden),
        (hidden, hidden),
        (2 * intermediate, hidden),
        (hidden, intermediate),
    ];
    let lut: [f32; 256] = std::array::from_fn(|c| crate::dtype::f8e4m3_to_f32(c as u8));
    let weights: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(n_out, n_in)| {
            (0..n_out * n_in)
                .map(|i| (i * 73 % 251) as u8 & 0x7e)
                .collect()
        })
        .collect();
    let inputs: Vec<Vec<Vec<f32>>> = shapes
        .iter()
        .map(|&(_, n_in)| {
            (0..rows.max(1))
                .map(|r| vec![0.5 + r as f32; n_in])
                .collect()
        })
        .collect();
    let mut outputs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(n_out, _)| vec![0f32; n_out * rows.max(1)])
        .collect();
    let bytes: usize = weights.iter().map(Vec::len).sum();
    let mut best = f64::INFINITY;
    for pass in 0..6 {
        let started = std::time::Instant::now();
        for ((w, x), y) in weights.iter().zip(&inputs).zip(&mut outputs) {
            let xs: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
            let scale = None;
            matvec(&mut [Product { w, scale, y }], &xs, &lut);
        }
        if pass > 0 {
            best = best.min(started.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&outputs);
    bytes as f64 / (best * 1e9)
}

/// A vectorised path's last step for one row: the elements past the last whole block
/// (`from..`) added into their partial sums as the scalar path adds them (`x` scaled by 256,
/// the code's value divided by 256: the same product), then the sums in their fixed order.
#[cfg(target_arch = "x86_64")]
fn finish(mut sums: [f32; LANES], w: &[u8], from: usize, x: &[f32], lut: &[f32; 256]) -> f32 {
    for j in from..w.len() {
        sums[j % LANES] = (lut[w[j] as usize] / 256.0).mul_add(x[j], sums[j % LANES]);
    }
    reduce(&sums)
}

/// The partial sums added in one fixed order (halves, then quarters, ...).
fn reduce(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// An E4M3 code sign-extended to 16 bits and shifted up by 7, masked with this, is the
/// float16 of its value divided by 256: the sign (copied into bits 14 and 15 by the
/// extension) kept in bit 15 only, exponent and mantissa in the float16's (its exponent bias
/// is 8 more), subnormals included. NaN codes become 1.875 / 256: the vectorised paths watch
/// for them and compute such a row as the scalar path does.
#[cfg(target_arch = "x86_64")]
const HALF_BITS: i16 = 0xbf80u16 as i16;

/// `$f::<R>(args)` for `$rows` rows (1 to [`MAX_SIMD_ROWS`]) as the constant `R`: the
/// vectorised paths' sums stay in registers only where their count is known when compiled.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($f:ident, $rows:expr, $($arg:expr),*) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            rows => unreachable!("at most {MAX_SIMD_ROWS} rows, not {rows}"),
        }
    };
}

/// Rows the vectorised paths take at once (their sums stay in registers); more are taken in
/// groups of this many.
#[cfg(target_arch = "x86_64")]
const MAX_SIMD_ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{finish, LANES, MAX_SIMD_ROWS};
    use std::arch::x86_64::*;

    /// Sixteen E4M3 codes as f32 values divided by 256 (see [`super::HALF_BITS`]), and into
    /// `nan` the running maximum of the codes or'ed with 0x80 (0xff once a NaN code was seen,
    /// which this decodes as a number).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn decode16(p: *const u8, nan: &mut __m128i) -> (__m256, __m256) {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        *nan = _mm_max_epu8(*nan, _mm_or_si128(bytes, _mm_set1_epi8(-0x80)));
        let half = _mm256_and_si256(
            _mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
            _mm256_set1_epi16(super::HALF_BITS),
        );
        (
            _mm256_cvtph_ps(_mm256_castsi256_si128(half)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)),
        )
    }

    /// The dot products of at most [`MAX_SIMD_ROWS`] rows scaled by 256 (see `Path::dots`).
    #[target_feature(enable = "avx2,f16c,fma")]
    pub(super) unsafe fn dots(w: &[u8], xs: &[&[f32]], lut: &[f32; 256], out: &mut [f32]) {
        by_rows!(dots_of, xs.len(), w, xs, lut, out)
    }

    /// [`dots`] for `R` rows, known when compiled, so that the sums stay in registers.
    #[inline]
    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn dots_of<const R: usize>(w: &[u8], xs: &[&[f32]], lut: &[f32; 256], out: &mut [f32]) {
        let n = w.len();
        let rows = R;
        let full = n - n % LANES;
        let mut acc = [[_mm256_setzero_ps(); LANES / 8]; R];
        let mut nan = _mm_setzero_si128();
        let mut e = 0;
        while e < full {
            let (a, b) = decode16(w.as_ptr().add(e), &mut nan);
            let (c, d) = decode16(w.as_ptr().add(e + 16), &mut nan);
            for r in 0..rows {
                let x = xs[r].as_ptr().add(e);
                let xv = |i: usize| _mm256_loadu_ps(x.add(8 * i));
                let s = &mut acc[r];
                s[0] = _mm256_fmadd_ps(a, xv(0), s[0]);
                s[1] = _mm256_fmadd_ps(b, xv(1), s[1]);
                s[2] = _mm256_fmadd_ps(c, xv(2), s[2]);
                s[3] = _mm256_fmadd_ps(d, xv(3), s[3]);
            }
            e += LANES;
        }
        let nan = _mm_movemask_epi8(_mm_cmpeq_epi8(nan, _mm_set1_epi8(-1))) != 0;
        for r in 0..rows {
            let mut sums = [0f32; LANES];
            for (i, v) in acc[r].iter().enumerate() {
                _mm256_storeu_ps(sums.as_mut_ptr().add(8 * i), *v);
            }
            out[r] = match nan {
                false => finish(sums, w, full, xs[r], lut),
                true => finish([0.0; LANES], w, 0, xs[r], lut),
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{finish, LANES, MAX_SIMD_ROWS};
    use std::arch::x86_64::*;

    /// Thirty-two E4M3 codes as f32 values divided by 256, as `avx2::decode16` makes them,
    /// the running maximum of the codes or'ed with 0x80 into `nan`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn decode32(p: *const u8, nan: &mut __m256i) -> (__m512, __m512) {
        let bytes = _mm256_loadu_si256(p as *const __m256i);
        *nan = _mm256_max_epu8(*nan, _mm256_or_si256(bytes, _mm256_set1_epi8(-0x80)));
        let half = _mm512_and_si512(
            _mm512_slli_epi16(_mm512_cvtepi8_epi16(bytes), 7),
            _mm512_set1_epi16(super::HALF_BITS),
        );
        (
            _mm512_cvtph_ps(_mm512_castsi512_si256(half)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1)),
        )
    }

    /// Whether [`decode32`]'s running maximum saw a NaN code.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn saw_nan(nan: __m256i) -> bool {
        _mm256_movemask_epi8(_mm256_cmpeq_epi8(nan, _mm256_set1_epi8(-1))) != 0
    }

    /// A row's two sum registers as its [`LANES`] partial sums.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn stored(acc: &[__m512; LANES / 16]) -> [f32; LANES] {
        let mut sums = [0f32; LANES];
        for (i, v) in acc.iter().enumerate() {
            _mm512_storeu_ps(sums.as_mut_ptr().add(16 * i), *v);
        }
        sums
    }

    /// Weight rows [`dots_group`] takes at once.
    pub(super) const GROUP: usize = 4;
    /// Rows of x [`dots_group`] takes at most (its sums, 2 x GROUP x rows registers, stay in
    /// registers).
    pub(super) const GROUP_ROWS: usize = 2;

    /// The dot products of [`GROUP`] consecutive weight rows of `n` codes (`w`) with at most
    /// [`GROUP_ROWS`] rows scaled by 256, into `out` (`[GROUP, rows]`): each row's sums added
    /// as [`dots`] adds them, the x loads shared by the weight rows.
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub(super) unsafe fn dots_group(
        w: &[u8],
        n: usize,
        xs: &[&[f32]],
        lut: &[f32; 256],
        out: &mut [f32],
    ) {
        match xs.len() {
            1 => dots_group_of::<1>(w, n, xs, lut, out),
            2 => dots_group_of::<2>(w, n, xs, lut, out),
            rows => unreachable!("dots_group takes 1 or 2 rows, not {rows}"),
        }
    }

    /// [`dots_group`] for `R` rows, known when compiled: its 2 x GROUP x R sums are
    /// registers (with the row count known only at run time, LLVM kept some on the stack,
    /// a load and a store around every addition).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn dots_group_of<const R: usize>(
        w: &[u8],
        n: usize,
        xs: &[&[f32]],
        lut: &[f32; 256],
        out: &mut [f32],
    ) {
        let full = n - n % LANES;
        let mut acc = [[[_mm512_setzero_ps(); LANES / 16]; R]; GROUP];
        let mut nan = [_mm256_setzero_si256(); GROUP];
        let mut e = 0;
        while e < full {
            let mut x = [(_mm512_setzero_ps(), _mm512_setzero_ps()); R];
            for (r, v) in x.iter_mut().enumerate() {
                let p = xs[r].as_ptr().add(e);
                *v = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            }
            for k in 0..GROUP {
                let (a, b) = decode32(w.as_ptr().add(k * n + e), &mut nan[k]);
                for r in 0..R {
                    let s = &mut acc[k][r];
                    s[0] = _mm512_fmadd_ps(a, x[r].0, s[0]);
                    s[1] = _mm512_fmadd_ps(b, x[r].1, s[1]);
                }
            }
            e += LANES;
        }
        for k in 0..GROUP {
            let wk = &w[k * n..(k + 1) * n];
            let nan = saw_nan(nan[k]);
            for r in 0..R {
                out[k * R + r] = match nan {
                    false => finish(stored(&acc[k][r]), wk, full, xs[r], lut),
                    true => finish([0.0; LANES], wk, 0, xs[r], lut),
                };
            }
        }
    }

    /// The dot products of at most [`MAX_SIMD_ROWS`] rows scaled by 256 (see `Path::dots`).
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub(super) unsafe fn dots(w: &[u8], xs: &[&[f32]], lut: &[f32; 256], out: &mut [f32]) {
        by_rows!(dots_of, xs.len(), w, xs, lut, out)
    }

    /// [`dots`] for `R` rows, known when compiled, so that the sums stay in registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn dots_of<const R: usize>(w: &[u8], xs: &[&[f32]], lut: &[f32; 256], out: &mut [f32]) {
        let n = w.len();
        let rows = R;
        let full = n - n % LANES;
        let mut acc = [[_mm512_setzero_ps(); LANES / 16]; R];
        let mut nan = _mm256_setzero_si256();
        let mut e = 0;
        while e < full {
            let (a, b) = decode32(w.as_ptr().add(e), &mut nan);
            for r in 0..rows {
                let x = xs[r].as_ptr().add(e);
                let s = &mut acc[r];
                s[0] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x), s[0]);
                s[1] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x.add(16)), s[1]);
            }
            e += LANES;
        }
        let nan = saw_nan(nan);
        for r in 0..rows {
            out[r] = match nan {
                false => finish(stored(&acc[r]), w, full, xs[r], lut),
                true => finish([0.0; LANES], w, 0, xs[r], lut),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::f8e4m3_to_f32;

    fn lut() -> [f32; 256] {
        std::array::from_fn(|c| f8e4m3_to_f32(c as u8))
    }

    /// One weight row against `xs` on `path`.
    fn dots(path: Path, w: &[u8], xs: &[&[f32]]) -> Vec<f32> {
        let mut y = vec![0f32; xs.len()];
        matvec_on(
            path,
            &mut [Product {
                w,
                scale: None,
                y: &mut y,
            }],
            xs,
            &lut(),
        );
        y
    }

    #[test]
    fn every_path_gives_the_scalar_bits_and_the_exact_sum() {
        let lut = lut();
        let paths = Path::available();
        eprintln!("paths on this CPU: {paths:?}");
        // Every code but the NaNs, at lengths with and without a tail, with activations
        // beyond float16's range and below its smallest normal.
        for n in [1usize, 31, 32, 100, 3584 + 7] {
            let w: Vec<u8> = (0..n)
                .map(|i| (i * 73 % 256) as u8)
                .map(|c| if c & 0x7f == 0x7f { c - 1 } else { c })
                .collect();
            for rows in 1..=9 {
                let xs: Vec<Vec<f32>> = (0..rows)
                    .map(|r| {
                        (0..n)
                            .map(|i| {
                                ((i * 31 + r * 7) as f32 * 0.37).sin() * [1e-6, 1.0, 9e4][i % 3]
                            })
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                let want = dots(Path::Scalar, &w, &refs);
                for &path in &paths {
                    let got = dots(path, &w, &refs);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{path:?}, n {n}, rows {rows}");
                }
                for (x, got) in xs.iter().zip(&want) {
                    let terms = w
                        .iter()
                        .zip(x)
                        .map(|(&c, &v)| lut[c as usize] as f64 * v as f64);
                    let exact: f64 = terms.clone().sum();
                    let scale: f64 = terms.map(f64::abs).sum();
                    assert!(
                        (*got as f64 - exact).abs() <= 1e-6 * scale.max(1e-30),
                        "n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_matrix_gives_the_scalar_bits_on_every_path_in_groups_of_rows_and_alone() {
        let lut = lut();
        for (n_out, n_in) in [(9usize, 100usize), (8, 3584), (13, 33)] {
            let w: Vec<u8> = (0..n_out * n_in)
                .map(|i| (i * 29 % 256) as u8)
                .map(|c| if c & 0x7f == 0x7f { c - 1 } else { c })
                .collect();
            for rows in 1..=3 {
                let xs: Vec<Vec<f32>> = (0..rows)
                    .map(|r| {
                        (0..n_in)
                            .map(|i| ((i + 5 * r) as f32 * 0.21).cos() * 3e3)
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                let scale: Vec<f32> = (0..n_out).map(|o| 0.5 + o as f32).collect();
                let run = |path| {
                    // The matrix as one product with a scale per row, and again as two
                    // products (rows split unevenly) in one call.
                    let mut y = vec![0f32; n_out * rows];
                    matvec_on(
                        path,
                        &mut [Product {
                            w: &w,
                            scale: Some(&scale),
                            y: &mut y,
                        }],
                        &refs,
                        &lut,
                    );
                    let cut = n_out / 3;
                    let (w1, w2) = w.split_at(cut * n_in);
                    let (s1, s2) = scale.split_at(cut);
                    let mut y1 = vec![0f32; cut * rows];
                    let mut y2 = vec![0f32; (n_out - cut) * rows];
                    let mut both = [
                        Product {
                            w: w1,
                            scale: Some(s1),
                            y: &mut y1,
                        },
                        Product {
                            w: w2,
                            scale: Some(s2),
                            y: &mut y2,
                        },
                    ];
                    matvec_on(path, &mut both, &refs, &lut);
                    assert!([y1, y2].concat() == y, "{path:?}: two products in one call");
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let want = run(Path::Scalar);
                for path in Path::available() {
                    assert_eq!(run(path), want, "{path:?}, [{n_out}, {n_in}], {rows} rows");
                }
            }
        }
    }

    #[test]
    fn a_nan_code_makes_the_dot_nan_on_every_path() {
        for path in Path::available() {
            for code in [0x7fu8, 0xff] {
                for at in [0usize, 17, 40] {
                    let mut w = vec![0x38u8; 41];
                    w[at] = code;
                    let x = vec![1f32; 41];
                    let got = dots(path, &w, &[&x]);
                    assert!(got[0].is_nan(), "{path:?}: code {code:#x} at {at}");
                }
            }
        }
        // In a matrix, a row with a NaN code among rows without: every row the scalar
        // path's bits, whether its weight rows are taken in groups or alone.
        let (n_out, n_in) = (9usize, 70usize);
        let mut w: Vec<u8> = (0..n_out * n_in).map(|i| (i * 37 % 120) as u8).collect();
        w[5 * n_in + 3] = 0xff;
        let x: Vec<f32> = (0..n_in).map(|i| (i as f32 * 0.3).sin()).collect();
        let lut = lut();
        let run = |path, rows: usize| {
            let xs = vec![x.as_slice(); rows];
            let mut y = vec![0f32; n_out * rows];
            let scale = None;
            matvec_on(
                path,
                &mut [Product {
                    w: &w,
                    scale,
                    y: &mut y,
                }],
                &xs,
                &lut,
            );
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for rows in [1, 3] {
            let want = run(Path::Scalar, rows);
            assert!(f32::from_bits(want[5 * rows]).is_nan());
            assert!(!f32::from_bits(want[4 * rows]).is_nan());
            for path in Path::available() {
                assert_eq!(run(path, rows), want, "{path:?}, {rows} rows");
            }
        }
    }
}
