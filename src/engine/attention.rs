//! Attention of one new token against the KV cache, in one op: the decode path's queries
//! rotated (RoPE) straight from the q/k/v projection, scores, softmax and weighted sum, with
//! grouped-query heads read in place from the cache (no repeated K/V copies, no f32 round
//! trips through memory).

use super::dequant::{cpu_activations, cpu_storage};
use super::ops::{DecodeAttention, StepAttention, ATTENTION_WARPS};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The rotary pair `(i, i + d/2)` of `x` at a table row `cs` (cosines, then sines).
fn rotate(x: &[f32], cs: &[f32], i: usize) -> (f32, f32) {
    let half = x.len() / 2;
    let (c, s) = (cs[i], cs[half + i]);
    (x[i] * c - x[i + half] * s, x[i + half] * c + x[i] * s)
}

/// `a · b` as [`DOT_LANES`] interleaved partial sums (a product, then a sum, in each),
/// added pairwise (lane i and i + 8, then i + 4, ...), then the tail one by one. One running
/// sum made each score a chain of dependent additions (the attention of a 7B host layer took
/// ~1 ms at 2,048 positions on the lent GPU hosts). The vector paths compute exactly this.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let whole = a.len() - a.len() % DOT_LANES;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512 F; `whole` is within both slices.
            let head = unsafe { x86::dot_avx512(a, b, whole) };
            return tail(head, a, b, whole);
        }
        if has!("avx") {
            // SAFETY: the CPU has AVX; as above.
            let head = unsafe { x86::dot_avx(a, b, whole) };
            return tail(head, a, b, whole);
        }
    }
    tail(dot_lanes(a, b, whole), a, b, whole)
}

/// The partial sums of `a · b` over the first `whole` elements (a multiple of
/// [`DOT_LANES`]), added up as [`dot`] adds them, one lane at a time.
fn dot_lanes(a: &[f32], b: &[f32], whole: usize) -> f32 {
    let mut acc = [0f32; DOT_LANES];
    for (ca, cb) in a[..whole]
        .chunks_exact(DOT_LANES)
        .zip(b[..whole].chunks_exact(DOT_LANES))
    {
        for ((s, x), y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    let mut width = DOT_LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// `head` plus the products of `a` and `b` from `whole` on, one at a time.
#[inline(always)]
fn tail(head: f32, a: &[f32], b: &[f32], whole: usize) -> f32 {
    a[whole..]
        .iter()
        .zip(&b[whole..])
        .fold(head, |s, (x, y)| s + x * y)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::DOT_LANES;
    use std::arch::x86_64::*;

    /// Eight lanes `v` as [`super::dot`] adds them: 0-3 plus 4-7, then 0-1 plus 2-3, then 0
    /// plus 1.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn sum8(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
    }

    /// The partial sums of `a · b` over the first `whole` elements (a multiple of
    /// [`DOT_LANES`]) added up as [`super::dot`] adds them, in one 16-lane register.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32], whole: usize) -> f32 {
        let mut acc = _mm512_setzero_ps();
        for i in (0..whole).step_by(DOT_LANES) {
            let p = _mm512_mul_ps(
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
            );
            acc = _mm512_add_ps(acc, p);
        }
        let lo = _mm512_castps512_ps256(acc);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
        sum8(_mm256_add_ps(lo, hi))
    }

    /// [`dot_avx512`] in two 8-lane registers (lanes 0-7 and 8-15).
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn dot_avx(a: &[f32], b: &[f32], whole: usize) -> f32 {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..whole).step_by(DOT_LANES) {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb)));
            hi = _mm256_add_ps(
                hi,
                _mm256_mul_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8))),
            );
        }
        sum8(_mm256_add_ps(lo, hi))
    }
}

/// Partial sums of [`dot`] (a power of two).
const DOT_LANES: usize = 16;

/// One head's query and its keys and values: key `j` at `keys.0[j * keys.1..]`, value `j`
/// likewise, `len` positions; scores scaled by `scale`.
#[derive(Clone, Copy)]
struct Head<'a> {
    q: &'a [f32],
    keys: (&'a [f32], usize),
    values: (&'a [f32], usize),
    len: usize,
    scale: f32,
}

/// `o += softmax(q K^T · scale) V` for one head. Compiled for the widest vectors the CPU has
/// (the same operations in the same order at every width, so the same bits).
fn attend_head(head: Head<'_>, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { attend_head_avx512(head, o) };
        }
        if has!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { attend_head_avx2(head, o) };
        }
    }
    attend_head_body(head, o)
}

/// An entry point of [`attend_head_body`] compiled with a target feature.
macro_rules! attend_head_with {
    ($name:ident, $feature:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(head: Head<'_>, o: &mut [f32]) {
            attend_head_body(head, o)
        }
    };
}
attend_head_with!(attend_head_avx512, "avx512f");
attend_head_with!(attend_head_avx2, "avx2");

/// [`attend_head`]'s work, inlined into each entry point.
#[inline(always)]
fn attend_head_body(head: Head<'_>, o: &mut [f32]) {
    let Head {
        q,
        keys: (k, kt),
        values: (v, vt),
        len,
        scale,
    } = head;
    let d = q.len();
    // Loops, not iterator adapters: a closure is compiled on its own, without the entry
    // point's vector width.
    let mut scores = Vec::with_capacity(len);
    for j in 0..len {
        scores.push(dot(q, &k[j * kt..][..d]) * scale);
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    for (j, e) in exps.iter().enumerate() {
        let w = e / total;
        for (acc, x) in o.iter_mut().zip(&v[j * vt..][..d]) {
            *acc += w * x;
        }
    }
}

/// Strides `[batch, head, position]` of a `[b, h, len, d]` view whose last dimension is dense.
fn strides(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    let s = l.stride();
    if s.len() != 4 || s[3] != 1 {
        candle_core::bail!("decode attention: K/V rows must be dense, got strides {s:?}");
    }
    Ok((l.start_offset(), s[0], s[1], s[2]))
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "vibeoffload-decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, bf16) = cpu_activations(q)?;
        let (k, _) = cpu_activations(k)?;
        let (v, _) = cpu_activations(v)?;
        let Some((qa, _)) = lq.contiguous_offsets() else {
            candle_core::bail!("decode attention: q must be contiguous");
        };
        let (ko, kb, kh, kt) = strides(lk)?;
        let (vo, vb, vh, vt) = strides(lv)?;
        let (d, t) = (self.head_dim, self.tokens);
        let b = lq.dims()[0];
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        if t > 1 && self.rope.is_none() {
            candle_core::bail!("attention: {t} queries need their positions (the rotary table)");
        }
        // The rows of the rotary table these positions need (copying the whole table, as
        // long as the longest sequence, made each step's cost grow with --max-seq-len).
        let rows = match &self.rope {
            Some((table, pos)) => Some(
                table
                    .narrow(0, *pos, t)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec2::<f32>()?,
            ),
            None => None,
        };
        let mut out = vec![0f32; b * t * self.heads * d];
        // A (query, head) pair per task: a host-computed layer of hybrid decoding attends
        // over thousands of positions every step.
        out.par_chunks_mut(d).enumerate().for_each(|(task, o)| {
            let (row, h) = (task / self.heads, task % self.heads);
            let (bi, i) = (row / t, row % t);
            let raw = &q[qa + row * self.q_stride + h * d..][..d];
            let mut qh = raw.to_vec();
            if let Some(rows) = &rows {
                for e in 0..d / 2 {
                    (qh[e], qh[e + d / 2]) = rotate(raw, &rows[i], e);
                }
            }
            let kvh = h / group;
            let keys = &k[ko + bi * kb + kvh * kh..];
            let values = &v[vo + bi * vb + kvh * vh..];
            let head = Head {
                q: &qh,
                keys: (keys, kt),
                values: (values, vt),
                len: self.len - (t - 1 - i),
                scale,
            };
            attend_head(head, o);
        });
        let storage = cpu_storage(out, bf16);
        let shape = match t {
            1 => Shape::from((b, self.heads, 1, d)),
            _ => Shape::from((b, t, self.heads, d)),
        };
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ko, kb, kh, kt) = strides(lk)?;
        let (vo, vb, vh, vt) = strides(lv)?;
        super::cuda::decode_attention(self, (q, lq), (k, (ko, kb, kh, kt)), (v, (vo, vb, vh, vt)))
    }
}

impl CustomOp1 for StepAttention {
    fn name(&self) -> &'static str {
        "vibeoffload-step-attention"
    }

    /// The GPU's op only: on the CPU the engine stores and attends apart
    /// (`model::attend_lanes`).
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("step attention runs on the GPU only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::step_attention(self, (qkv, layout))
    }
}

/// Whether [`StepAttention`] takes a step over `len` positions (the new one included): as
/// [`applies`], with room for the new key in shared memory too.
pub fn step_applies(len: usize, head_dim: usize) -> bool {
    applies(1, len, head_dim) && decode_shared_bytes(len, 1, head_dim, true) <= 48 << 10
}

/// Shared memory of a decode attention block on the GPU (`attention.cu`) over `len` positions
/// in `split` shares: a share's scores, each warp's partial output, the query and, split, the
/// share's output, in floats (rounded up to two); storing ([`StepAttention`]), the new key
/// (bf16).
pub fn decode_shared_bytes(len: usize, split: usize, head_dim: usize, store: bool) -> usize {
    let floats = len.div_ceil(split) + (ATTENTION_WARPS + 1 + usize::from(split > 1)) * head_dim;
    floats.next_multiple_of(2) * 4 + usize::from(store) * head_dim * 2
}

/// Whether [`attend`] takes this shape: `tokens` = one new token, a head width of at most 256 in steps of
/// 4 and a cache short enough for its scores, the rotated query and the warps' partial outputs
/// to fit in 48 KiB of shared memory.
pub fn applies(tokens: usize, len: usize, head_dim: usize) -> bool {
    let shared = decode_shared_bytes(len, 1, head_dim, false);
    tokens == 1 && head_dim <= 256 && head_dim.is_multiple_of(4) && shared <= 48 << 10
}

/// Whether [`attend_qkv`] takes a prefill pass of `tokens` > 1 on `device`: on the GPU, with
/// tensor cores (sm_80 or newer) and a head width of 128 (`prefill_attention.cu`). Elsewhere
/// the pass runs candle's ops with a mask.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn prefill_applies(device: &candle_core::Device, tokens: usize, head_dim: usize) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            tokens > 1
                && head_dim == crate::plan::memory::PREFILL_HEAD_DIM
                && super::cuda::has_mma(d)
        }
        _ => false,
    }
}

/// Attention output `[b, heads, 1, d]` for `q` `[b, heads, 1, d]` and cache views `k`, `v`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, kv_heads: usize) -> Result<Tensor> {
    let (_, heads, _, d) = q.dims4()?;
    let op = DecodeAttention {
        tokens: 1,
        heads,
        kv_heads,
        len: k.dim(2)?,
        head_dim: d,
        q_stride: heads * d,
        rope: None,
    };
    q.contiguous()?.apply_op3_no_bwd(k, v, &op)
}

/// Attention output for the queries in q/k/v rows `qkv` `[b, t, (heads + 2 x kv_heads) x d]`,
/// rotated at `pos` (the first row's position) by `rope_table` here, and cache views `k`, `v`
/// (the rows' keys stored): `[b, heads, 1, d]` for one token, `[b, t, heads, d]` (causal) for
/// more.
pub fn attend_qkv(
    qkv: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    rope_table: &Tensor,
    pos: usize,
) -> Result<Tensor> {
    let op = DecodeAttention {
        tokens: qkv.dim(1)?,
        heads,
        kv_heads,
        len: k.dim(2)?,
        head_dim,
        q_stride: (heads + 2 * kv_heads) * head_dim,
        rope: Some((rope_table.clone(), pos)),
    };
    qkv.contiguous()?.apply_op3_no_bwd(k, v, &op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    #[test]
    fn matches_softmax_attention_on_cache_views() {
        let dev = Device::Cpu;
        let (b, heads, kv, d, max, len) = (2, 4, 2, 8, 10, 7);
        let ramp = |n: usize, f: f32| {
            Tensor::arange(0f32, n as f32, &dev)
                .unwrap()
                .affine(f as f64, -0.3)
                .unwrap()
                .sin()
                .unwrap()
        };
        let q = ramp(b * heads * d, 0.37).reshape((b, heads, 1, d)).unwrap();
        // Cache buffers longer than the filled part, viewed as the KV cache returns them.
        let k_all = ramp(b * kv * max * d, 0.11)
            .reshape((b, kv, max, d))
            .unwrap();
        let v_all = ramp(b * kv * max * d, 0.23)
            .reshape((b, kv, max, d))
            .unwrap();
        let (k, v) = (
            k_all.narrow(2, 0, len).unwrap(),
            v_all.narrow(2, 0, len).unwrap(),
        );
        let fused = attend(&q, &k, &v, kv).unwrap();
        let rep = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((b, kv, heads / kv, len, d))
                .unwrap()
                .reshape((b, heads, len, d))
                .unwrap()
        };
        let scores = (q.matmul(&rep(&k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let reference = probs.matmul(&rep(&v)).unwrap();
        let diff = (fused - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(D::Minus1)
            .unwrap()
            .max_all()
            .unwrap();
        assert!(
            diff.to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-5
        );
    }

    #[test]
    fn a_pass_of_several_queries_attends_causally() {
        use crate::engine::cache::tests::{config, qkv_and_rope};
        let (b, t, heads, kv, d, max, pos) = (2, 5, 4, 2, 8, 12, 3);
        let (qkv, table, cos, sin) = qkv_and_rope((b, t, heads, kv, d, max));
        let mut cache = crate::engine::cache::KvCache::new(&config(heads, kv, d), max);
        let (early, ..) = qkv_and_rope((b, pos, heads, kv, d, max));
        cache.store(&early, &table, 0).unwrap();
        let (k, v) = cache.store(&qkv, &table, pos).unwrap();
        let fused = attend_qkv(&qkv, &k, &v, (heads, kv, d), &table, pos).unwrap();
        assert_eq!(fused.dims(), [b, t, heads, d]);
        // candle's rotation, the keys repeated for each query group, the causal mask.
        let q = qkv
            .narrow(2, 0, heads * d)
            .and_then(|x| x.reshape((b, t, heads, d)))
            .and_then(|x| x.transpose(1, 2))
            .and_then(|x| x.contiguous())
            .unwrap();
        let q = candle_nn::rotary_emb::rope(
            &q,
            &cos.narrow(0, pos, t).unwrap(),
            &sin.narrow(0, pos, t).unwrap(),
        )
        .unwrap();
        let len = pos + t;
        let rep = |x: &Tensor| {
            x.unsqueeze(2)
                .and_then(|x| x.expand((b, kv, heads / kv, len, d)))
                .and_then(|x| x.reshape((b, heads, len, d)))
                .unwrap()
        };
        let mask = crate::engine::model::causal_mask(t, pos, &Device::Cpu).unwrap();
        let scores = (q.matmul(&rep(&k).t().unwrap()).unwrap() / (d as f64).sqrt())
            .and_then(|s| s.broadcast_add(&mask))
            .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let reference = probs.matmul(&rep(&v)).unwrap().transpose(1, 2).unwrap();
        let diff = crate::engine::cache::tests::max_diff(&fused, &reference);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn rotates_queries_taken_from_the_qkv_row() {
        let (b, heads, kv, d, max, pos) = (2, 4, 2, 8, 10, 5);
        let (qkv, table, cos, sin) =
            crate::engine::cache::tests::qkv_and_rope((b, 1, heads, kv, d, max));
        let config = crate::engine::cache::tests::config(heads, kv, d);
        let mut cache = crate::engine::cache::KvCache::new(&config, max);
        // Earlier positions hold something too.
        let (early, ..) = crate::engine::cache::tests::qkv_and_rope((b, pos, heads, kv, d, max));
        cache.store(&early, &table, 0).unwrap();
        let (k, v) = cache.store(&qkv, &table, pos).unwrap();
        let fused = attend_qkv(&qkv, &k, &v, (heads, kv, d), &table, pos).unwrap();
        let q = qkv
            .narrow(2, 0, heads * d)
            .and_then(|x| x.reshape((b, 1, heads, d)))
            .and_then(|x| x.transpose(1, 2))
            .and_then(|x| x.contiguous())
            .unwrap();
        let q = candle_nn::rotary_emb::rope(
            &q,
            &cos.narrow(0, pos, 1).unwrap(),
            &sin.narrow(0, pos, 1).unwrap(),
        )
        .unwrap();
        let reference = attend(&q, &k, &v, kv).unwrap();
        let diff = crate::engine::cache::tests::max_diff(&fused, &reference);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn the_dots_vector_paths_give_the_lanes_bits_and_the_sum() {
        // Values over many magnitudes and signs, so that any other order of the sums
        // would round differently somewhere.
        let v = |n: usize, f: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * f).sin() * 1e3).powi(3) / 7.0)
                .collect()
        };
        for n in [0, 5, 16, 128, 131, 1000] {
            let (a, b) = (v(n, 0.37), v(n, 0.91));
            let whole = n - n % DOT_LANES;
            let lanes = dot_lanes(&a, &b, whole);
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") {
                    // SAFETY: the CPU has AVX-512 F; `whole` is within both slices.
                    let got = unsafe { x86::dot_avx512(&a, &b, whole) };
                    assert_eq!(got.to_bits(), lanes.to_bits(), "AVX-512, {n}");
                }
                if has!("avx") {
                    // SAFETY: as above, for AVX.
                    let got = unsafe { x86::dot_avx(&a, &b, whole) };
                    assert_eq!(got.to_bits(), lanes.to_bits(), "AVX, {n}");
                }
            }
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 * *y as f64).abs())
                .sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - exact).abs() <= 1e-5 * scale.max(1.0),
                "{n}: {got} vs {exact}"
            );
        }
    }
}
