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
            simd => {
                let dots: Dots = match simd {
                    Path::Avx512 => avx512::dots,
                    _ => avx2::dots,
                };
                for (x, o) in scaled
                    .chunks(MAX_SIMD_ROWS)
                    .zip(out.chunks_mut(MAX_SIMD_ROWS))
                {
                    // SAFETY: `detect` found the path's features (AVX2, F16C and FMA, or
                    // AVX-512 F and BW); every row is `w.len()` long (checked by `matvec`),
                    // and no more rows than the path holds.
                    unsafe { dots(w, x, lut, o) };
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
/// a host-computed layer. `gated` (two products of one shape, gate then up): the first's `y`
/// becomes `silu(gate) · up` as each task finishes its rows, so that the SiLU runs on every
/// core instead of after the pass on one (~0.06 ms of a 7B layer on one core here).
pub fn matvec(products: &mut [Product<'_>], xs: &[&[f32]], lut: &[f32; 256], gated: bool) {
    let started = std::time::Instant::now();
    matvec_pass(Path::detect(), products, xs, lut, gated);
    let spent = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    PRODUCTS_NS.with(|ns| ns.set(ns.get().saturating_add(spent)));
}

thread_local! {
    /// Wall time this thread has spent in [`matvec`] calls, in nanoseconds.
    static PRODUCTS_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Wall time the calling thread has spent in [`matvec`] calls, in nanoseconds: the difference
/// of two readings around a host layer is the time its float8 products took (hybrid decoding's
/// report splits a host layer's time with it).
pub fn products_ns() -> u64 {
    PRODUCTS_NS.with(std::cell::Cell::get)
}

/// [`matvec_pass`] of plain products (the tests' way to name a path).
#[cfg(test)]
fn matvec_on(path: Path, products: &mut [Product<'_>], xs: &[&[f32]], lut: &[f32; 256]) {
    matvec_pass(path, products, xs, lut, false)
}

/// [`matvec`] on `path`.
fn matvec_pass(
    path: Path,
    products: &mut [Product<'_>],
    xs: &[&[f32]],
    lut: &[f32; 256],
    gated: bool,
) {
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
    for p in products.iter() {
        assert_eq!(
            p.w.len() * rows,
            p.y.len() * n_in,
            "f8 matvec: shapes disagree"
        );
    }
    // A task: `count` weight rows from `first` into `out`, scaled.
    let task = |w: &[u8], scale: Option<&[f32]>, first: usize, out: &mut [f32]| {
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
    };
    if gated {
        let [gate, up] = products else {
            panic!("f8 matvec: a gated pass takes two products, gate and up");
        };
        assert_eq!(gate.y.len(), up.y.len(), "f8 matvec: gate and up differ");
        let (gw, gs, uw, us) = (gate.w, gate.scale, up.w, up.scale);
        let jobs: Vec<_> = gate
            .y
            .chunks_mut(rows * group)
            .zip(up.y.chunks_mut(rows * group))
            .enumerate()
            .collect();
        pool().install(|| {
            jobs.into_par_iter().for_each(|(g, (go, uo))| {
                task(gw, gs, g * group, go);
                task(uw, us, g * group, uo);
                for (a, u) in go.iter_mut().zip(uo.iter()) {
                    *a = *a / (1.0 + (-*a).exp()) * u;
                }
            })
        });
        return;
    }
    let mut jobs = Vec::new();
    for p in products.iter_mut() {
        let (w, scale) = (p.w, p.scale);
        for (g, out) in p.y.chunks_mut(rows * group).enumerate() {
            jobs.push((w, scale, g * group, out));
        }
    }
    pool().install(|| {
        jobs.into_par_iter()
            .for_each(|(w, scale, first, out)| task(w, scale, first, out))
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
            matvec(&mut [Product { w, scale, y }], &xs, &lut, false);
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

#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
use x86::{avx2, avx512, Dots, MAX_SIMD_ROWS};

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
                    // Gated: the first half of the rows as the gate, the rest as up.
                    let half = n_out / 2;
                    let (wg, wu) = w.split_at(half * n_in);
                    let (sg, su) = scale.split_at(half);
                    let mut g = vec![0f32; half * rows];
                    let mut u = vec![0f32; half * rows];
                    let mut pair = [
                        Product {
                            w: wg,
                            scale: Some(sg),
                            y: &mut g,
                        },
                        Product {
                            w: &wu[..half * n_in],
                            scale: Some(&su[..half]),
                            y: &mut u,
                        },
                    ];
                    matvec_pass(path, &mut pair, &refs, &lut, true);
                    let silu = |v: f32| v / (1.0 + (-v).exp());
                    let want: Vec<f32> = (0..half * rows)
                        .map(|i| silu(y[i]) * y[half * rows + i])
                        .collect();
                    assert!(g == want, "{path:?}: gated");
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
