//! VibeVoice's language model, a Qwen2 decoder: RMSNorm, grouped-query attention with q/k/v
//! biases and rotary embeddings, SiLU MLP. Weights arrive per layer as raw checkpoint bytes
//! (from resident memory or a streaming slot: the decoder cannot tell) and are decoded at use.

use super::attention;
use super::cache::KvCache;
use super::dequant::{dequantize, RawTensor};
use super::matvec;
use super::ops::{self, StepAttention};
use super::watch::{Tag, Watch};
use super::weights::{LayerWeights, Linear};
use crate::arch::config::ModelConfig;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

/// What a fused launch does beyond multiplying x by its weights (see
/// [`ops::FusedMatVec`]).
#[derive(Default)]
struct Fuse<'a> {
    bias: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
    gated: bool,
    norm: Option<(&'a Tensor, f32)>,
    modulation: Option<(&'a Tensor, &'a Tensor)>,
    gelu: bool,
    gate: Option<&'a Tensor>,
    watch: Option<(Tensor, u32)>,
}

/// One fused launch over `linears` (float8 weights of one input width).
fn fused(x: &Tensor, linears: &[&Linear], resident: bool, fuse: Fuse<'_>) -> Result<Tensor> {
    let segments = linears
        .iter()
        .map(|l| ops::Segment {
            bytes: l.weight.bytes.clone(),
            rows: l.weight.shape[0],
            scale: l.scale_f32.clone(),
        })
        .collect();
    let op = ops::FusedMatVec {
        segments,
        in_features: x.dim(D::Minus1)?,
        bias: fuse.bias.cloned(),
        residual: fuse.residual.map(|r| r.contiguous()).transpose()?,
        gated: fuse.gated,
        resident_weights: resident,
        norm: fuse.norm.map(|(w, eps)| (w.clone(), eps)),
        modulation: fuse.modulation.map(|(a, b)| (a.clone(), b.clone())),
        gelu: fuse.gelu,
        gate: fuse.gate.cloned(),
        watch: fuse.watch,
    };
    Ok(matvec::apply(x, &op)?)
}

/// [`fused`], its outputs checked for NaN and infinity as `tag`: by the kernel itself as it
/// writes them on the GPU (no extra launch), by a scan on the CPU.
fn fused_checked(
    x: &Tensor,
    linears: &[&Linear],
    resident: bool,
    fuse: Fuse<'_>,
    (watch, tag): (&Watch, Tag),
) -> Result<Tensor> {
    match watch.word(tag) {
        Some(word) => fused(
            x,
            linears,
            resident,
            Fuse {
                watch: Some(word),
                ..fuse
            },
        ),
        None => {
            let out = fused(x, linears, resident, fuse)?;
            watch.check(&out, tag)?;
            Ok(out)
        }
    }
}

/// `x @ W^T (+ b)`: by the fused path where it applies, else decoding W with its scale. The
/// speech components use it too, so their float8 weights stay float8 on the device.
pub fn linear(x: &Tensor, l: &Linear, bias: Option<&Tensor>, resident: bool) -> Result<Tensor> {
    let y = if matvec::applies(x, &l.weight, l.scale.as_ref())? {
        fused(x, &[l], resident, Fuse::default())?
    } else {
        let w = dequantize(&l.weight, l.scale.as_ref(), x.dtype())?;
        x.broadcast_matmul(&w.t()?)?
    };
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `silu(x @ gate^T) ⊙ (x @ up^T)` (a SwiGLU's first half) in one fused launch, the product
/// formed in f32 and rounded once, where the fused path takes both weights for `x`; `None`
/// otherwise (the caller then runs the unfused ops).
pub fn swiglu(x: &Tensor, gate: &Linear, up: &Linear, resident: bool) -> Result<Option<Tensor>> {
    fused_around(x, &[gate, up], true, resident, Around::default())
}

/// The work the speech components fuse around a float8 product (see [`ops::FusedMatVec`]).
#[derive(Clone, Copy, Default)]
pub struct Around<'a> {
    /// RMSNorm of the rows first: weight and epsilon.
    pub norm: Option<(&'a Tensor, f32)>,
    /// After the norm, the adaLN modulation `(1 + scale, shift)`.
    pub modulation: Option<(&'a Tensor, &'a Tensor)>,
    /// Added to each output row.
    pub bias: Option<&'a Tensor>,
    /// GELU (erf) of the output after the bias.
    pub gelu: bool,
    /// `residual + gate ⊙ y` instead of `y`: `(residual, gate)`.
    pub gated_residual: Option<(&'a Tensor, &'a Tensor)>,
}

/// `x @ W^T` for one weight, or `silu(x @ W0^T) ⊙ (x @ W1^T)` for two when `gated`, with the
/// work `around` fused in, where the fused path takes every weight for `x`; `None` otherwise
/// (the caller then runs the unfused ops).
pub fn fused_around(
    x: &Tensor,
    linears: &[&Linear],
    gated: bool,
    resident: bool,
    around: Around<'_>,
) -> Result<Option<Tensor>> {
    for l in linears {
        if !matvec::applies(x, &l.weight, l.scale.as_ref())? {
            return Ok(None);
        }
    }
    let fuse = Fuse {
        gated,
        norm: around.norm,
        modulation: around.modulation,
        bias: around.bias,
        gelu: around.gelu,
        residual: around.gated_residual.map(|(r, _)| r),
        gate: around.gated_residual.map(|(_, g)| g),
        ..Fuse::default()
    };
    Ok(Some(fused(x, linears, resident, fuse)?))
}

/// Whether every projection of layer `w` can take the fused path for `x` (the matvec for a few
/// rows; on the GPU the matrix product for more).
fn fusable(w: &LayerWeights, x: &Tensor) -> Result<bool> {
    for l in [&w.q, &w.k, &w.v, &w.o, &w.gate, &w.up, &w.down] {
        if !matvec::applies_in_layer(x, &l.weight, l.scale.as_ref())? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Rotary embedding tables, built once for the longest sequence and sliced per step.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Cosines then sines, `[max_len, head_dim]`, for the fused ops (cache::StoreKv,
    /// attention::attend_qkv).
    table: Tensor,
}

impl Rope {
    /// Tables for positions `0..max_len`.
    pub fn new(
        config: &ModelConfig,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Rope> {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f64 / config.head_dim as f64) as f32
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, max_len as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        let (cos, sin) = (freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?);
        Ok(Rope {
            table: Tensor::cat(&[&cos, &sin], 1)?,
            cos,
            sin,
        })
    }

    fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

/// Where a layer runs in a pass: the position of the pass's first token, the causal mask
/// (built once per pass for more than one token), and the watch with this layer's index.
pub struct At<'a> {
    /// Position of the first token.
    pub offset: usize,
    /// [`causal_mask`] for more than one token.
    pub mask: Option<&'a Tensor>,
    /// Checks the layer's output for NaN and infinity.
    pub watch: &'a Watch,
    /// The layer's index.
    pub layer: usize,
}

/// Runs one decoder layer on `x` (`[batch, tokens, hidden]`), storing its keys and values in
/// `cache`; its output is checked by the watch.
pub fn decoder_layer(
    config: &ModelConfig,
    w: &LayerWeights,
    x: &Tensor,
    rope: &Rope,
    cache: &mut KvCache,
    at: At<'_>,
) -> Result<Tensor> {
    let (offset, mask, tag) = (at.offset, at.mask, Tag::Layer(at.layer));
    let eps = config.rms_norm_eps as f32;
    let resident = w.resident;
    // Every projection in a handful of fused launches, the norms inside: a few rows (decoding)
    // anywhere, any number (prefill) on the GPU.
    if fusable(w, x)? {
        let qkv = fused_qkv(w, x, eps)?;
        let attn = match qkv.dims3()? {
            (1, 1, _) => attend_lanes(config, &qkv, rope, &mut [cache], &[offset])?,
            _ => attend(config, &qkv, rope, cache, offset, mask)?,
        };
        return fused_rest(w, x, &attn, eps, (at.watch, tag));
    }
    let normed = candle_nn::ops::rms_norm(x, &w.input_norm, eps)?;
    let parts = [(&w.q, &w.q_bias), (&w.k, &w.k_bias), (&w.v, &w.v_bias)]
        .map(|(l, b)| linear(&normed, l, Some(b), resident))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let qkv = Tensor::cat(&parts, D::Minus1)?;
    let attn = attend(config, &qkv, rope, cache, offset, mask)?;
    let x = (x + linear(&attn, &w.o, None, resident)?)?;
    let normed = candle_nn::ops::rms_norm(&x, &w.post_norm, eps)?;
    let gate = candle_nn::ops::silu(&linear(&normed, &w.gate, None, resident)?)?;
    let up = linear(&normed, &w.up, None, resident)?;
    let mlp = linear(&(gate * up)?, &w.down, None, resident)?;
    let out = (x + mlp)?;
    at.watch.check(&out, tag)?;
    Ok(out)
}

/// The fused q/k/v projection of `x`, its input norm inside: `[b, t, q + k + v]`.
fn fused_qkv(w: &LayerWeights, x: &Tensor, eps: f32) -> Result<Tensor> {
    let fuse = Fuse {
        bias: Some(&w.qkv_bias),
        norm: Some((&w.input_norm, eps)),
        ..Fuse::default()
    };
    fused(x, &[&w.q, &w.k, &w.v], w.resident, fuse)
}

/// The rest of a fused layer after attention: `x + o(attn)`, then the MLP with its norm
/// inside and its residual; the output checked by the watch.
fn fused_rest(
    w: &LayerWeights,
    x: &Tensor,
    attn: &Tensor,
    eps: f32,
    check: (&Watch, Tag),
) -> Result<Tensor> {
    let resident = w.resident;
    let residual = Fuse {
        residual: Some(x),
        ..Fuse::default()
    };
    let x = fused(attn, &[&w.o], resident, residual)?;
    let fuse = Fuse {
        gated: true,
        norm: Some((&w.post_norm, eps)),
        ..Fuse::default()
    };
    let act = fused(&x, &[&w.gate, &w.up], resident, fuse)?;
    let residual = Fuse {
        residual: Some(&x),
        ..Fuse::default()
    };
    fused_checked(&act, &[&w.down], resident, residual, check)
}

/// Stores the keys and values of `qkv` (`[b, t, q + k + v]`, fresh from the projections) in
/// `cache` at `offset` and attends over the cache: `[b, t, heads * head_dim]`.
fn attend(
    config: &ModelConfig,
    qkv: &Tensor,
    rope: &Rope,
    cache: &mut KvCache,
    offset: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let (heads, kv_heads, hd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let (k, v) = cache.store(qkv, &rope.table, offset)?;
    if attention::applies(t, k.dim(2)?, hd) || attention::prefill_applies(qkv.device(), t, hd) {
        let dims = (heads, kv_heads, hd);
        return Ok(
            attention::attend_qkv(qkv, &k, &v, dims, &rope.table, offset)?.reshape((
                b,
                t,
                heads * hd,
            ))?,
        );
    }
    let q = qkv
        .narrow(D::Minus1, 0, heads * hd)?
        .reshape((b, t, heads, hd))?
        .transpose(1, 2)?;
    let q = rope.apply(&q, offset)?;
    let k = repeat_kv(k, heads / kv_heads)?;
    let v = repeat_kv(v, heads / kv_heads)?;
    let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) if t > 1 => scores.broadcast_add(m)?,
        None if t > 1 => anyhow::bail!("a pass of {t} tokens needs its causal mask"),
        _ => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(qkv.dtype())?;
    Ok(probs
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, t, heads * hd))?)
}

/// One decoding step of several lanes through one decoder layer: row i of `x`
/// (`[lanes, 1, hidden]`) is lane i's token, after `offsets[i]` positions in `caches[i]`;
/// returns the rows' outputs, batched the same way. The projections run as one batch (the
/// layer's weights are read once for every lane); each lane attends over its own cache. A
/// row's result does not depend on the other rows, so this equals running the lanes one by
/// one, bit for bit. Where the fused path does not apply, it does just that.
pub fn decoder_layer_lanes(
    config: &ModelConfig,
    w: &LayerWeights,
    x: &Tensor,
    rope: &Rope,
    caches: &mut [&mut KvCache],
    offsets: &[usize],
    (watch, layer): (&Watch, usize),
) -> Result<Tensor> {
    if !fusable(w, x)? {
        let mut out = Vec::with_capacity(caches.len());
        for (i, (cache, &offset)) in caches.iter_mut().zip(offsets).enumerate() {
            let at = At {
                offset,
                mask: None,
                watch,
                layer,
            };
            out.push(decoder_layer(
                config,
                w,
                &x.narrow(0, i, 1)?,
                rope,
                cache,
                at,
            )?);
        }
        return Ok(Tensor::cat(&out, 0)?);
    }
    let eps = config.rms_norm_eps as f32;
    let qkv = fused_qkv(w, x, eps)?;
    let attn = attend_lanes(config, &qkv, rope, caches, offsets)?;
    fused_rest(w, x, &attn, eps, (watch, Tag::Layer(layer)))
}

/// One decode step's attention for lanes whose fused q/k/v rows are `qkv` (`[lanes, 1,
/// q_k_v]`; row i after `offsets[i]` positions in `caches[i]`): `[lanes, 1, heads * head_dim]`.
/// On the GPU one op stores each lane's key and value and attends ([`StepAttention`]: a launch
/// a lane, the outputs in one buffer), with the bits of [`attend`] lane by lane, which it does
/// elsewhere.
fn attend_lanes(
    config: &ModelConfig,
    qkv: &Tensor,
    rope: &Rope,
    caches: &mut [&mut KvCache],
    offsets: &[usize],
) -> Result<Tensor> {
    let (heads, kv_heads, hd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let on_gpu = qkv.device().is_cuda() && qkv.dtype() == DType::BF16;
    if on_gpu && offsets.iter().all(|&o| attention::step_applies(o + 1, hd)) {
        let lanes = caches
            .iter_mut()
            .zip(offsets)
            .map(|(cache, &pos)| Ok((cache.step_buffer(qkv, pos)?, pos)))
            .collect::<Result<Vec<_>>>()?;
        let n = lanes.len();
        let op = StepAttention {
            heads,
            kv_heads,
            head_dim: hd,
            q_stride: (heads + 2 * kv_heads) * hd,
            lanes,
            table: rope.table.clone(),
        };
        return Ok(qkv
            .contiguous()?
            .apply_op1_no_bwd(&op)?
            .reshape((n, 1, heads * hd))?);
    }
    let attn = caches
        .iter_mut()
        .zip(offsets)
        .enumerate()
        .map(|(i, (cache, &offset))| {
            attend(config, &qkv.narrow(0, i, 1)?, rope, cache, offset, None)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&attn, 0)?)
}

/// `[b, kv_heads, T, d]` -> `[b, kv_heads * n_rep, T, d]`, each kv head repeated for its
/// query group.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))?)
}

/// `[t, offset + t]`: 0 where query i may see key j (j <= offset + i), -inf elsewhere.
pub fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?)
}

/// RMSNorm, for the final norm.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, weight, eps as f32)?)
}

/// Logits: `x @ head^T`, by the fused float8 path for a few rows, else decoding the head
/// `rows_per_chunk` rows at a time so the bf16 copy never exceeds one chunk; checked by the
/// watch as the LM head.
pub fn lm_head(x: &Tensor, head: &Linear, rows_per_chunk: usize, watch: &Watch) -> Result<Tensor> {
    let scale = head.scale.as_ref();
    if matvec::applies(x, &head.weight, scale)? {
        let logits = fused_checked(x, &[head], true, Fuse::default(), (watch, Tag::LmHead))?;
        return Ok(logits.to_dtype(DType::F32)?);
    }
    let head = &head.weight;
    let rows = head.shape[0];
    let cols = head.shape[1];
    let row_bytes = cols * head.dtype.size_bytes() as usize;
    let mut parts = Vec::new();
    let mut start = 0;
    while start < rows {
        let n = rows_per_chunk.min(rows - start);
        let chunk = RawTensor {
            dtype: head.dtype,
            shape: vec![n, cols],
            bytes: head.bytes.narrow(0, start * row_bytes, n * row_bytes)?,
        };
        let chunk_scale = match scale {
            Some(s) if s.shape.iter().product::<usize>() > 1 => {
                let per_row = s.shape.iter().product::<usize>() / rows;
                let bytes = per_row * s.dtype.size_bytes() as usize;
                Some(RawTensor {
                    dtype: s.dtype,
                    shape: vec![n, per_row],
                    bytes: s.bytes.narrow(0, start * bytes, n * bytes)?,
                })
            }
            other => other.cloned(),
        };
        let w = dequantize(&chunk, chunk_scale.as_ref(), x.dtype())?;
        parts.push(x.broadcast_matmul(&w.t()?)?.to_dtype(DType::F32)?);
        start += n;
    }
    let logits = Tensor::cat(&parts, D::Minus1)?;
    watch.check(&logits, Tag::LmHead)?;
    Ok(logits)
}
