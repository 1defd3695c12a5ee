//! A decoder layer's weights, typed after `arch::qwen2`: seven linear weights with their
//! float8 scales, the norms and the biases. The small tensors are decoded once at load
//! ([`Decoded`], counted by `plan::memory::decoded_copies`) and stay on the device for
//! streamed layers too; the big ones arrive per use as raw bytes, from resident memory or a
//! streaming slot, and are decoded by the kernels that read them.

use super::dequant::{dequantize, RawTensor};
use crate::arch::qwen2::LayerTensor;
use crate::checkpoint::scales::scale_names;
use crate::plan::memory;
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// A linear weight with its scale.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The weight `[out, in]`, as stored.
    pub weight: RawTensor,
    /// Its float8 scale as stored, for the dequantising path.
    pub scale: Option<RawTensor>,
    /// The same scale decoded to f32 (flat), for the fused matvec.
    pub scale_f32: Option<Tensor>,
}

impl Linear {
    /// `weight` and its scale, if `tensors` has one, by name.
    pub fn find(
        tensors: &HashMap<String, RawTensor>,
        weight: &str,
        scales_f32: &HashMap<String, Tensor>,
    ) -> Result<Linear> {
        let raw = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow!("decoder layer has no tensor {name}"))
        };
        let scale_name = scale_names(weight).find(|n| tensors.contains_key(n));
        Ok(Linear {
            weight: raw(weight)?,
            scale: scale_name.as_deref().map(raw).transpose()?,
            scale_f32: scale_name.and_then(|n| scales_f32.get(&n).cloned()),
        })
    }
}

/// A layer's tensors decoded once at load: norm weights and biases in the activations' dtype
/// (the q, k and v biases also side by side, for the fused projection), float8 scales in f32.
#[derive(Debug)]
pub struct Decoded {
    input_norm: Tensor,
    post_norm: Tensor,
    q_bias: Tensor,
    k_bias: Tensor,
    v_bias: Tensor,
    qkv_bias: Tensor,
    /// By the scale tensor's relative name.
    scales: HashMap<String, Tensor>,
}

impl Decoded {
    /// Decodes, out of a layer's raw tensors by relative name, those
    /// [`memory::decoded_copies`] names.
    pub fn new(tensors: &HashMap<String, RawTensor>, dtype: DType) -> Result<Decoded> {
        let mut vectors = HashMap::new();
        let mut scales = HashMap::new();
        for (name, raw) in tensors {
            if memory::decoded_copies(name).is_none() {
                continue;
            }
            match LayerTensor::from_name(name) {
                Some(t) => {
                    vectors.insert(t, dequantize(raw, None, dtype)?);
                }
                None => {
                    let scale = dequantize(raw, None, DType::F32)?.flatten_all()?;
                    scales.insert(name.clone(), scale);
                }
            }
        }
        let mut vector = |t: LayerTensor| {
            vectors
                .remove(&t)
                .ok_or_else(|| anyhow!("decoder layer has no tensor {}", t.name()))
        };
        let (q_bias, k_bias, v_bias) = (
            vector(LayerTensor::QBias)?,
            vector(LayerTensor::KBias)?,
            vector(LayerTensor::VBias)?,
        );
        Ok(Decoded {
            input_norm: vector(LayerTensor::InputNorm)?,
            post_norm: vector(LayerTensor::PostNorm)?,
            qkv_bias: Tensor::cat(&[&q_bias, &k_bias, &v_bias], 0)?,
            q_bias,
            k_bias,
            v_bias,
            scales,
        })
    }
}

/// One decoder layer's weights, ready for `model::decoder_layer`.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// Query projection.
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
    /// Attention output projection.
    pub o: Linear,
    /// MLP gate projection.
    pub gate: Linear,
    /// MLP up projection.
    pub up: Linear,
    /// MLP down projection.
    pub down: Linear,
    /// RMSNorm weight before attention.
    pub input_norm: Tensor,
    /// RMSNorm weight before the MLP.
    pub post_norm: Tensor,
    /// Query bias.
    pub q_bias: Tensor,
    /// Key bias.
    pub k_bias: Tensor,
    /// Value bias.
    pub v_bias: Tensor,
    /// The three biases side by side, for the fused q/k/v projection.
    pub qkv_bias: Tensor,
    /// The weights stay where they are while the engine lives (a resident layer, not a
    /// streaming slot), so a kernel may start reading them before the kernel before it ends.
    pub resident: bool,
}

impl LayerWeights {
    /// The same weights on `device`, the decoded vectors in `dtype` (a host-computed layer's
    /// prefill runs on the GPU: decoded in f32 from the checkpoint's values, they convert
    /// back exactly, as the GPU would have decoded them).
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<LayerWeights> {
        let raw = |r: &RawTensor| -> Result<RawTensor> {
            Ok(RawTensor {
                dtype: r.dtype,
                shape: r.shape.clone(),
                bytes: r.bytes.to_device(device)?,
            })
        };
        let linear = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                weight: raw(&l.weight)?,
                scale: l.scale.as_ref().map(raw).transpose()?,
                scale_f32: l
                    .scale_f32
                    .as_ref()
                    .map(|s| s.to_device(device))
                    .transpose()?,
            })
        };
        let vector = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
        Ok(LayerWeights {
            q: linear(&self.q)?,
            k: linear(&self.k)?,
            v: linear(&self.v)?,
            o: linear(&self.o)?,
            gate: linear(&self.gate)?,
            up: linear(&self.up)?,
            down: linear(&self.down)?,
            input_norm: vector(&self.input_norm)?,
            post_norm: vector(&self.post_norm)?,
            q_bias: vector(&self.q_bias)?,
            k_bias: vector(&self.k_bias)?,
            v_bias: vector(&self.v_bias)?,
            qkv_bias: vector(&self.qkv_bias)?,
            resident: false,
        })
    }

    /// A layer from its raw tensors by relative name (uploaded, or views into a slot) and
    /// what was decoded of it at load.
    pub fn new(
        tensors: &HashMap<String, RawTensor>,
        decoded: &Decoded,
        resident: bool,
    ) -> Result<LayerWeights> {
        let linear = |t: LayerTensor| Linear::find(tensors, t.name(), &decoded.scales);
        Ok(LayerWeights {
            q: linear(LayerTensor::QProj)?,
            k: linear(LayerTensor::KProj)?,
            v: linear(LayerTensor::VProj)?,
            o: linear(LayerTensor::OProj)?,
            gate: linear(LayerTensor::Gate)?,
            up: linear(LayerTensor::Up)?,
            down: linear(LayerTensor::Down)?,
            input_norm: decoded.input_norm.clone(),
            post_norm: decoded.post_norm.clone(),
            q_bias: decoded.q_bias.clone(),
            k_bias: decoded.k_bias.clone(),
            v_bias: decoded.v_bias.clone(),
            qkv_bias: decoded.qkv_bias.clone(),
            resident,
        })
    }
}
