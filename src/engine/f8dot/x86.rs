//! The x86 paths of the float8 dot products: AVX2 (with F16C and FMA) and AVX-512, each
//! giving the scalar path's bits (see the parent module).

use super::{finish, LANES};
/// An E4M3 code sign-extended to 16 bits and shifted up by 7, masked with this, is the
/// float16 of its value divided by 256: the sign (copied into bits 14 and 15 by the
/// extension) kept in bit 15 only, exponent and mantissa in the float16's (its exponent bias
/// is 8 more), subnormals included. NaN codes become 1.875 / 256: the vectorised paths watch
/// for them and compute such a row as the scalar path does.
const HALF_BITS: i16 = 0xbf80u16 as i16;

/// `$f::<R>(args)` for `$rows` rows (1 to [`MAX_SIMD_ROWS`]) as the constant `R`: the
/// vectorised paths' sums stay in registers only where their count is known when compiled.
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

/// A vectorised path's `dots`: at most [`MAX_SIMD_ROWS`] rows' products with one weight row.
pub(super) type Dots = unsafe fn(&[u8], &[&[f32]], &[f32; 256], &mut [f32]);

/// Rows the vectorised paths take at once (their sums stay in registers); more are taken in
/// groups of this many.
pub(super) const MAX_SIMD_ROWS: usize = 4;

pub(super) mod avx2 {
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
    pub(in crate::engine::f8dot) unsafe fn dots(
        w: &[u8],
        xs: &[&[f32]],
        lut: &[f32; 256],
        out: &mut [f32],
    ) {
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

pub(super) mod avx512 {
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
    pub(in crate::engine::f8dot) const GROUP: usize = 4;
    /// Rows of x [`dots_group`] takes at most (its sums, 2 x GROUP x rows registers, stay in
    /// registers).
    pub(in crate::engine::f8dot) const GROUP_ROWS: usize = 2;

    /// The dot products of [`GROUP`] consecutive weight rows of `n` codes (`w`) with at most
    /// [`GROUP_ROWS`] rows scaled by 256, into `out` (`[GROUP, rows]`): each row's sums added
    /// as [`dots`] adds them, the x loads shared by the weight rows.
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub(in crate::engine::f8dot) unsafe fn dots_group(
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
    pub(in crate::engine::f8dot) unsafe fn dots(
        w: &[u8],
        xs: &[&[f32]],
        lut: &[f32; 256],
        out: &mut [f32],
    ) {
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
