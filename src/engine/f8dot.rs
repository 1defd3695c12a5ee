//! The CPU's float8 dot products: one weight row (E4M3 codes) against a few activation rows,
//! the weight decoded once for all of them. This is what a decoder layer computed on the host
//! spends its time in (hybrid decode), so it is vectorised (AVX2 with F16C, chosen at run
//! time) and gives the scalar path's bits: both add the products into [`LANES`] partial sums,
//! element `e` into sum `e % LANES`, and add the sums in one fixed order, so a result does not
//! depend on the machine, the thread count or the path taken.

use rayon::prelude::*;

/// Partial sums per dot product: four AVX2 registers, enough independent additions to keep
/// the adder busy.
const LANES: usize = 32;

/// `out[r] = Σ_e value(w[e]) · xs[r][e]` for each row `r` of `xs` (each `w.len()` long).
/// `lut` maps a code to its value (NaN for 0x7f and 0xff).
pub fn dot_rows(w: &[u8], xs: &[&[f32]], lut: &[f32; 256], out: &mut [f32]) {
    assert!(xs.iter().all(|x| x.len() == w.len()) && out.len() == xs.len());
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        for (x, o) in xs.chunks(MAX_SIMD_ROWS).zip(out.chunks_mut(MAX_SIMD_ROWS)) {
            // SAFETY: the CPU has AVX2 and F16C (checked above); every row is `w.len()` long
            // (the contract above), and no more rows than the path holds.
            unsafe { avx2::dot_rows(w, x, lut, o) };
        }
        return;
    }
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        let mut acc = [0f32; LANES];
        for (e, (&c, &v)) in w.iter().zip(x.iter()).enumerate() {
            acc[e % LANES] += lut[c as usize] * v;
        }
        *o = reduce(&acc);
    }
}

/// `y[o * rows + r] = scale(o) · dot(w row o, xs[r])` for every row `o` of `w` (`[y.len() /
/// rows, in]`), the output rows spread over the cores: a float8 product of a host-computed
/// layer, feature-major.
pub fn matvec(
    w: &[u8],
    xs: &[&[f32]],
    lut: &[f32; 256],
    scale: impl Fn(usize) -> f32 + Sync,
    y: &mut [f32],
) {
    let rows = xs.len();
    let n_in = xs.first().map_or(0, |x| x.len());
    assert_eq!(w.len() * rows, y.len() * n_in, "f8 matvec: shapes disagree");
    y.par_chunks_mut(rows).enumerate().for_each(|(o, out)| {
        dot_rows(&w[o * n_in..(o + 1) * n_in], xs, lut, out);
        let s = scale(o);
        for v in out.iter_mut() {
            *v *= s;
        }
    });
}

/// Weight bytes per second, in GB/s, that [`matvec`] reads on this host at `rows` rows: a
/// matrix of `bytes` (as wide as a 7B layer's inputs) on every core, the best of a few passes
/// after one to warm up. What hybrid decoding's split is planned with.
pub fn measure_gbps(rows: usize, bytes: usize) -> f64 {
    let n_in = 3584;
    let n_out = (bytes / n_in).max(1);
    let w: Vec<u8> = (0..n_out * n_in)
        .map(|i| (i * 73 % 251) as u8 & 0x7e)
        .collect();
    let lut: [f32; 256] = std::array::from_fn(|c| crate::dtype::f8e4m3_to_f32(c as u8));
    let x: Vec<Vec<f32>> = (0..rows.max(1))
        .map(|r| vec![0.5 + r as f32; n_in])
        .collect();
    let xs: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
    let mut y = vec![0f32; n_out * xs.len()];
    let mut best = f64::INFINITY;
    for pass in 0..5 {
        let started = std::time::Instant::now();
        matvec(&w, &xs, &lut, |_| 1.0, &mut y);
        if pass > 0 {
            best = best.min(started.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&y);
    w.len() as f64 / (best * 1e9)
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

/// Rows the vectorised path takes at once (their sums stay in registers); more are taken in
/// groups of this many.
#[cfg(target_arch = "x86_64")]
const MAX_SIMD_ROWS: usize = 4;

/// Whether this CPU runs the vectorised path.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{reduce, LANES, MAX_SIMD_ROWS};
    use std::arch::x86_64::*;

    /// Sixteen E4M3 codes as f32 values divided by 256: the code's bits moved into a
    /// float16's (sign to bit 15, exponent and mantissa shifted up by 7; the exponent bias
    /// differs by 8, hence 1/256, subnormals included), NaN codes made a float16 NaN.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn decode16(p: *const u8) -> (__m256, __m256) {
        let codes = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
        let magnitude = _mm256_and_si256(codes, _mm256_set1_epi16(0x7f));
        let sign = _mm256_slli_epi16(_mm256_and_si256(codes, _mm256_set1_epi16(0x80)), 8);
        let nan = _mm256_and_si256(
            _mm256_cmpeq_epi16(magnitude, _mm256_set1_epi16(0x7f)),
            _mm256_set1_epi16(0x7c00),
        );
        let half = _mm256_or_si256(_mm256_or_si256(sign, _mm256_slli_epi16(magnitude, 7)), nan);
        (
            _mm256_cvtph_ps(_mm256_castsi256_si128(half)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)),
        )
    }

    /// [`super::dot_rows`] for at most [`MAX_SIMD_ROWS`] rows. Each row is scaled by 256
    /// first (exact), so the products are the scalar path's `value · x` to the bit.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_rows(w: &[u8], xs: &[&[f32]], lut: &[f32; 256], out: &mut [f32]) {
        let n = w.len();
        let rows = xs.len();
        let full = n - n % LANES;
        let k256 = _mm256_set1_ps(256.0);
        let mut acc = [[_mm256_setzero_ps(); LANES / 8]; MAX_SIMD_ROWS];
        let mut e = 0;
        while e < full {
            let (a, b) = decode16(w.as_ptr().add(e));
            let (c, d) = decode16(w.as_ptr().add(e + 16));
            for r in 0..rows {
                let x = xs[r].as_ptr().add(e);
                let xv = |i: usize| _mm256_mul_ps(_mm256_loadu_ps(x.add(8 * i)), k256);
                let s = &mut acc[r];
                s[0] = _mm256_add_ps(s[0], _mm256_mul_ps(a, xv(0)));
                s[1] = _mm256_add_ps(s[1], _mm256_mul_ps(b, xv(1)));
                s[2] = _mm256_add_ps(s[2], _mm256_mul_ps(c, xv(2)));
                s[3] = _mm256_add_ps(s[3], _mm256_mul_ps(d, xv(3)));
            }
            e += LANES;
        }
        for r in 0..rows {
            let mut sums = [0f32; LANES];
            for (i, v) in acc[r].iter().enumerate() {
                _mm256_storeu_ps(sums.as_mut_ptr().add(8 * i), *v);
            }
            for j in full..n {
                sums[j % LANES] += lut[w[j] as usize] * xs[r][j];
            }
            out[r] = reduce(&sums);
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

    /// The scalar path, whatever the CPU.
    fn scalar(w: &[u8], x: &[f32], lut: &[f32; 256]) -> f32 {
        let mut acc = [0f32; LANES];
        for (e, (&c, &v)) in w.iter().zip(x).enumerate() {
            acc[e % LANES] += lut[c as usize] * v;
        }
        reduce(&acc)
    }

    #[test]
    fn every_path_gives_the_scalar_bits_and_the_exact_sum() {
        let lut = lut();
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
                let mut out = vec![0f32; rows];
                dot_rows(&w, &refs, &lut, &mut out);
                for (x, got) in xs.iter().zip(&out) {
                    assert_eq!(
                        got.to_bits(),
                        scalar(&w, x, &lut).to_bits(),
                        "n {n} rows {rows}"
                    );
                    let exact: f64 = w
                        .iter()
                        .zip(x)
                        .map(|(&c, &v)| lut[c as usize] as f64 * v as f64)
                        .sum();
                    let scale: f64 = w
                        .iter()
                        .zip(x)
                        .map(|(&c, &v)| (lut[c as usize] as f64 * v as f64).abs())
                        .sum();
                    assert!(
                        (*got as f64 - exact).abs() <= 1e-6 * scale.max(1e-30),
                        "n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_nan_code_makes_the_dot_nan() {
        let lut = lut();
        for code in [0x7fu8, 0xff] {
            for at in [0usize, 17, 40] {
                let mut w = vec![0x38u8; 41];
                w[at] = code;
                let x = vec![1f32; 41];
                let mut out = [0f32];
                dot_rows(&w, &[&x], &lut, &mut out);
                assert!(out[0].is_nan(), "code {code:#x} at {at}");
            }
        }
    }
}
