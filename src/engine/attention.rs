//! Attention of one new token against the KV cache, in one op: the decode path's queries
//! rotated (RoPE) straight from the q/k/v projection, scores, softmax and weighted sum, with
//! grouped-query heads read in place from the cache (no repeated K/V copies, no f32 round
//! trips through memory).

use super::dequant::{cpu_activations, cpu_storage};
use super::ops::{DecodeAttention, ATTENTION_WARPS};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The rotary pair `(i, i + d/2)` of `x` at a table row `cs` (cosines, then sines).
fn rotate(x: &[f32], cs: &[f32], i: usize) -> (f32, f32) {
    let half = x.len() / 2;
    let (c, s) = (cs[i], cs[half + i]);
    (x[i] * c - x[i + half] * s, x[i + half] * c + x[i] * s)
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
        let (d, b) = (self.head_dim, lq.dims()[0]);
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        // The one row of the rotary table this position needs (copying the whole table, as
        // long as the longest sequence, made each step's cost grow with --max-seq-len).
        let row = match &self.rope {
            Some((t, pos)) => Some(
                t.get(*pos)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        let mut out = vec![0f32; b * self.heads * d];
        // A (sequence, head) pair per task: a host-computed layer of hybrid decoding attends
        // over thousands of positions every step.
        out.par_chunks_mut(d).enumerate().for_each(|(task, o)| {
            let (bi, h) = (task / self.heads, task % self.heads);
            let raw = &q[qa + bi * self.q_stride + h * d..][..d];
            let mut qh = raw.to_vec();
            if let Some(cs) = &row {
                for i in 0..d / 2 {
                    (qh[i], qh[i + d / 2]) = rotate(raw, cs, i);
                }
            }
            let kvh = h / group;
            let scores: Vec<f32> = (0..self.len)
                .map(|j| {
                    let kr = &k[ko + bi * kb + kvh * kh + j * kt..][..d];
                    qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = exps.iter().sum();
            for (j, e) in exps.iter().enumerate() {
                let vr = &v[vo + bi * vb + kvh * vh + j * vt..][..d];
                for (acc, x) in o.iter_mut().zip(vr) {
                    *acc += e / total * x;
                }
            }
        });
        let storage = cpu_storage(out, bf16);
        Ok((storage, Shape::from((b, self.heads, 1, d))))
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
        super::cuda::decode_attention(self, q, lq, k, (ko, kb, kh, kt), v, (vo, vb, vh, vt))
    }
}

/// Whether [`attend`] takes this shape: `tokens` = one new token, a head width of at most 256 in steps of
/// 4 and a cache short enough for its scores, the rotated query and the warps' partial outputs
/// to fit in 48 KiB of shared memory.
pub fn applies(tokens: usize, len: usize, head_dim: usize) -> bool {
    let shared = (len + (ATTENTION_WARPS + 1) * head_dim) * 4;
    tokens == 1 && head_dim <= 256 && head_dim.is_multiple_of(4) && shared <= 48 << 10
}

/// Attention output `[b, heads, 1, d]` for `q` `[b, heads, 1, d]` and cache views `k`, `v`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, kv_heads: usize) -> Result<Tensor> {
    let (_, heads, _, d) = q.dims4()?;
    let op = DecodeAttention {
        heads,
        kv_heads,
        len: k.dim(2)?,
        head_dim: d,
        q_stride: heads * d,
        rope: None,
    };
    q.contiguous()?.apply_op3_no_bwd(k, v, &op)
}

/// Attention output `[b, heads, 1, d]` for the queries in a q/k/v row `qkv` `[b, 1, (heads +
/// 2 x kv_heads) x d]`, rotated at `pos` by `rope_table` here, and cache views `k`, `v`.
pub fn attend_qkv(
    qkv: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    rope_table: &Tensor,
    pos: usize,
) -> Result<Tensor> {
    let op = DecodeAttention {
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
        let diff = (fused - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }
}
