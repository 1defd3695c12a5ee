//! VibeVoice's language model, a Qwen2 decoder: RMSNorm, grouped-query attention with q/k/v
//! biases and rotary embeddings, SiLU MLP. Weights arrive per layer as raw checkpoint bytes
//! (from resident memory or a streaming slot: the decoder cannot tell) and are decoded at use.

use super::attention;
use super::cache::KvCache;
use super::dequant::{dequantize, RawTensor};
use super::matvec;
use super::watch::{Tag, Watch};
use crate::checkpoint::config::ModelConfig;
use crate::checkpoint::inventory::SCALE_SUFFIXES;
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::sync::Arc;

const QKV: [&str; 3] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"];
const QKV_BIAS: &str = "self_attn.qkv_proj.bias";
const MLP: [&str; 3] = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

/// Whether a layer tensor is decoded once at load and kept on the device: its vectors (norm
/// weights, biases) and its float8 scales.
pub fn decoded_once(name: &str, shape: &[usize]) -> bool {
    shape.len() == 1 || is_scale(name)
}

fn is_scale(name: &str) -> bool {
    SCALE_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// One decoder layer's tensors, by name relative to `layers.{i}.`.
#[derive(Clone, Debug, Default)]
pub struct LayerWeights {
    /// Raw tensors.
    pub tensors: HashMap<String, RawTensor>,
    /// Its vectors (norm weights, biases) decoded once at load in the compute dtype, and its
    /// float8 scales in f32, kept on the device: a few KB that would otherwise cost a decode
    /// per use.
    pub vectors: Arc<HashMap<String, Tensor>>,
    /// The weights stay where they are while the engine lives (a resident layer, not a
    /// streaming slot), so a kernel may start reading them before the kernel before it ends.
    pub resident: bool,
}

impl LayerWeights {
    fn raw(&self, name: &str) -> Result<&RawTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| anyhow!("decoder layer has no tensor {name}"))
    }

    /// A vector (norm weight, bias) in `dtype`.
    fn vector(&self, name: &str, dtype: DType) -> Result<Tensor> {
        match self.vectors.get(name) {
            Some(v) if v.dtype() == dtype => Ok(v.clone()),
            _ if name == QKV_BIAS => {
                let parts = QKV
                    .iter()
                    .map(|p| self.vector(&format!("{p}.bias"), dtype))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            }
            _ => Ok(dequantize(self.raw(name)?, None, dtype)?),
        }
    }

    /// Decodes this layer's vectors (1-D tensors) into `dtype`, for [`LayerWeights::vectors`],
    /// plus the q, k and v biases side by side (`self_attn.qkv_proj.bias`) for the fused
    /// projection.
    pub fn decode_vectors(
        tensors: &HashMap<String, RawTensor>,
        dtype: DType,
    ) -> Result<HashMap<String, Tensor>> {
        let mut vectors = tensors
            .iter()
            .filter(|(name, t)| decoded_once(name, &t.shape))
            .map(|(name, t)| {
                // Scales stay f32, as the kernels read them; norms and biases take the
                // activations' dtype.
                let decoded = if is_scale(name) {
                    dequantize(t, None, DType::F32)?.flatten_all()?
                } else {
                    dequantize(t, None, dtype)?
                };
                Ok((name.clone(), decoded))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        let qkv: Option<Vec<Tensor>> = QKV
            .iter()
            .map(|p| vectors.get(&format!("{p}.bias")).cloned())
            .collect();
        if let Some(parts) = qkv {
            vectors.insert(QKV_BIAS.into(), Tensor::cat(&parts, 0)?);
        }
        Ok(vectors)
    }

    /// The f32 scale of projection `prefix`, decoded at load when it was (see
    /// [`LayerWeights::vectors`]), else now.
    fn decoded_scale(&self, prefix: &str) -> Result<Option<Tensor>> {
        for suffix in SCALE_SUFFIXES {
            let name = format!("{prefix}.{suffix}");
            if let Some(t) = self.vectors.get(&name) {
                return Ok(Some(t.clone()));
            }
            if let Some(raw) = self.tensors.get(&name) {
                return Ok(Some(dequantize(raw, None, DType::F32)?.flatten_all()?));
            }
        }
        Ok(None)
    }

    fn scale(&self, prefix: &str) -> Option<&RawTensor> {
        SCALE_SUFFIXES
            .iter()
            .find_map(|s| self.tensors.get(&format!("{prefix}.{s}")))
    }

    /// Whether every projection of this layer can take the fused decode path for `x`.
    fn fusable(&self, x: &Tensor) -> Result<bool> {
        for prefix in QKV.iter().chain(&["self_attn.o_proj"]).chain(&MLP) {
            let w = self.raw(&format!("{prefix}.weight"))?;
            if !matvec::applies(x, w, self.scale(prefix))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One fused launch over the projections `prefixes` (see [`matvec::FusedMatVec`]), x
    /// RMS-normalised first by the norm weight named `norm` when given.
    fn fused(
        &self,
        x: &Tensor,
        prefixes: &[&str],
        bias: Option<&str>,
        residual: Option<&Tensor>,
        (gated, norm): (bool, Option<(&str, f32)>),
        watch: Option<(Tensor, u32)>,
    ) -> Result<Tensor> {
        let segments = prefixes
            .iter()
            .map(|p| {
                let w = self.raw(&format!("{p}.weight"))?;
                Ok(matvec::Segment {
                    bytes: w.bytes.clone(),
                    rows: w.shape[0],
                    scale: self.decoded_scale(p)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let op = matvec::FusedMatVec {
            segments,
            in_features: x.dim(D::Minus1)?,
            bias: bias.map(|b| self.vector(b, x.dtype())).transpose()?,
            residual: residual.map(|r| r.contiguous()).transpose()?,
            gated,
            resident_weights: self.resident,
            norm: norm
                .map(|(name, eps)| Ok::<_, anyhow::Error>((self.vector(name, x.dtype())?, eps)))
                .transpose()?,
            watch,
        };
        Ok(matvec::apply(x, &op)?)
    }

    /// `x @ W^T (+ b)` for the linear layer `prefix` (`self_attn.q_proj`), decoding W with
    /// its scale, if it has one.
    fn linear(&self, x: &Tensor, prefix: &str, bias: bool) -> Result<Tensor> {
        let weight = self.raw(&format!("{prefix}.weight"))?;
        let scale = SCALE_SUFFIXES
            .iter()
            .find_map(|s| self.tensors.get(&format!("{prefix}.{s}")));
        let y = if matvec::applies(x, weight, scale)? {
            let scale = scale.map(|s| dequantize(s, None, DType::F32)).transpose()?;
            matvec::linear(x, weight, scale.as_ref(), self.resident)?
        } else {
            let w = dequantize(weight, scale, x.dtype())?;
            x.broadcast_matmul(&w.t()?)?
        };
        Ok(if bias {
            y.broadcast_add(&self.vector(&format!("{prefix}.bias"), x.dtype())?)?
        } else {
            y
        })
    }
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
    let (b, t, _) = x.dims3()?;
    let dtype = x.dtype();
    let eps = config.rms_norm_eps as f32;
    let (heads, kv_heads, hd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let dims = (heads, kv_heads, hd);

    // Decoding a few rows: every projection in a handful of fused launches, the norms inside.
    let fused = w.fusable(x)?;
    let qkv = if fused {
        let norm = Some(("input_layernorm.weight", eps));
        w.fused(x, &QKV, Some(QKV_BIAS), None, (false, norm), None)?
    } else {
        let normed = candle_nn::ops::rms_norm(x, &w.vector("input_layernorm.weight", dtype)?, eps)?;
        let parts = QKV
            .iter()
            .map(|p| w.linear(&normed, p, true))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, D::Minus1)?
    };
    let (k, v) = cache.store(&qkv, &rope.table, dims, offset)?;
    let attn = if attention::applies(t, k.dim(2)?, hd) {
        attention::attend_qkv(&qkv, &k, &v, dims, &rope.table, offset)?.reshape((
            b,
            t,
            heads * hd,
        ))?
    } else {
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
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        probs
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, t, heads * hd))?
    };
    let x = if fused {
        w.fused(
            &attn,
            &["self_attn.o_proj"],
            None,
            Some(x),
            (false, None),
            None,
        )?
    } else {
        (x + w.linear(&attn, "self_attn.o_proj", false)?)?
    };

    if fused {
        let norm = Some(("post_attention_layernorm.weight", eps));
        let act = w.fused(&x, &MLP[..2], None, None, (true, norm), None)?;
        let down = |watch| w.fused(&act, &MLP[2..], None, Some(&x), (false, None), watch);
        // On the GPU the kernel checks its own outputs; on the CPU they are scanned.
        return match at.watch.word(tag) {
            Some(word) => down(Some(word)),
            None => {
                let out = down(None)?;
                at.watch.check(&out, tag)?;
                Ok(out)
            }
        };
    }
    let normed = candle_nn::ops::rms_norm(
        &x,
        &w.vector("post_attention_layernorm.weight", dtype)?,
        eps,
    )?;
    let gate = candle_nn::ops::silu(&w.linear(&normed, "mlp.gate_proj", false)?)?;
    let up = w.linear(&normed, "mlp.up_proj", false)?;
    let mlp = w.linear(&(gate * up)?, "mlp.down_proj", false)?;
    let out = (x + mlp)?;
    at.watch.check(&out, tag)?;
    Ok(out)
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

/// RMSNorm with a raw weight, for the final norm.
pub fn rms_norm(x: &Tensor, weight: &RawTensor, eps: f64) -> Result<Tensor> {
    let w = dequantize(weight, None, x.dtype())?;
    Ok(candle_nn::ops::rms_norm(x, &w, eps as f32)?)
}

/// Logits: `x @ head^T`, by the fused float8 path for a few rows, else decoding the head
/// `rows_per_chunk` rows at a time so the bf16 copy never exceeds one chunk.
pub fn lm_head(
    x: &Tensor,
    head: &RawTensor,
    scale: Option<&RawTensor>,
    rows_per_chunk: usize,
) -> Result<Tensor> {
    if matvec::applies(x, head, scale)? {
        let scale = scale.map(|s| dequantize(s, None, DType::F32)).transpose()?;
        return Ok(matvec::linear(x, head, scale.as_ref(), true)?.to_dtype(DType::F32)?);
    }
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
    Ok(Tensor::cat(&parts, D::Minus1)?)
}
