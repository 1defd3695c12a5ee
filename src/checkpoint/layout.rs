//! The VibeVoice checkpoint layout: every tensor name and shape for a configuration, and how
//! each precision stores it. The synthesizer writes exactly this list and the built-in models'
//! inventories are computed from it, so `table` without a file and `inspect` on a synthesized
//! file agree to the byte.

use super::header::TensorInfo;
use crate::arch::config::ModelConfig;
use crate::arch::speech::SpeechConfig;
use crate::arch::vibevoice;
use crate::arch::{Role, TensorDef};
use crate::dtype::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One tensor of the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// Full name.
    pub name: String,
    /// Stored element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// What it is.
    pub role: Role,
}

impl TensorSpec {
    /// Bytes of data.
    pub fn size_bytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size_bytes()
    }
}

/// Name of the scale tensors in scaled float8 checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleConvention {
    /// `<layer>.scale_weight` plus the `scaled_fp8` marker (ComfyUI's older format, musubi-tuner).
    ScaleWeight,
    /// `<layer>.weight_scale` (ComfyUI's newer format).
    WeightScale,
}

impl ScaleConvention {
    /// The suffix that replaces `weight` in the scale's name.
    pub fn suffix(self) -> &'static str {
        match self {
            ScaleConvention::ScaleWeight => "scale_weight",
            ScaleConvention::WeightScale => "weight_scale",
        }
    }
}

/// How finely a float8 weight is scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleGranularity {
    /// One f32 for the whole matrix.
    Scalar,
    /// One f32 per output row (`[out, 1]`).
    PerChannel,
}

/// How a checkpoint stores its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Every floating tensor F8_E4M3 with no scales, as the fork's converter writes it.
    Float8Plain,
    /// Linear weights F8_E4M3 with f32 scales, every other tensor BF16: convolution weights
    /// too, as converters that scale quantize `nn.Linear` only (and the scale summary reads
    /// scales of matrices only).
    Float8Scaled(ScaleConvention, ScaleGranularity),
    /// Every tensor BF16.
    BF16,
}

/// The full tensor list of a VibeVoice checkpoint in `precision`, in file order.
pub fn vibevoice(
    config: &ModelConfig,
    speech: &SpeechConfig,
    precision: Precision,
) -> Vec<TensorSpec> {
    store(vibevoice::tensors(config, speech), precision)
}

/// The safetensors prefix (length field and header) of a file holding `specs` back to back
/// in this order, with `metadata`.
pub fn header_prefix(specs: &[TensorSpec], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let listed: Vec<(String, DType, Vec<u64>)> = specs
        .iter()
        .map(|s| (s.name.clone(), s.dtype, s.shape.clone()))
        .collect();
    super::header::encode(&listed, metadata)
}

/// Header entries for `specs` stored back to back in this order, as a file would hold them.
pub fn tensor_infos(specs: Vec<TensorSpec>) -> Vec<TensorInfo> {
    let mut offset = 0;
    specs
        .into_iter()
        .map(|s| {
            let start = offset;
            offset += s.size_bytes();
            TensorInfo {
                name: s.name,
                dtype: s.dtype,
                shape: s.shape,
                data_start: start,
                data_end: offset,
            }
        })
        .collect()
}

/// Alignment of each tensor inside a packed layer buffer (pinned host copy and GPU slot).
pub const TENSOR_ALIGN_BYTES: u64 = 256;

/// Rounds `bytes` up to [`TENSOR_ALIGN_BYTES`].
pub fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(TENSOR_ALIGN_BYTES) * TENSOR_ALIGN_BYTES
}

/// Where each tensor of a layer goes when the layer is packed into one buffer (each tensor
/// aligned), and the buffer's size: the layout of its pinned host copy and of a GPU slot.
pub fn packed_layout<'a>(tensors: impl IntoIterator<Item = &'a TensorInfo>) -> (Vec<u64>, u64) {
    let mut offsets = Vec::new();
    let mut end = 0;
    for t in tensors {
        offsets.push(end);
        end += align_up(t.size_bytes());
    }
    (offsets, end)
}

/// Applies a precision: picks each tensor's dtype and adds scale tensors after their weights.
fn store(logical: Vec<TensorDef>, precision: Precision) -> Vec<TensorSpec> {
    let mut out = Vec::with_capacity(logical.len() * 2);
    if let Precision::Float8Scaled(ScaleConvention::ScaleWeight, _) = precision {
        out.push(TensorSpec {
            name: "scaled_fp8".into(),
            dtype: DType::F8E4M3,
            shape: vec![0],
            role: Role::Marker,
        });
    }
    for TensorDef { name, shape, role } in logical {
        match precision {
            Precision::Float8Plain => out.push(TensorSpec {
                name,
                dtype: DType::F8E4M3,
                shape,
                role,
            }),
            Precision::BF16 => out.push(TensorSpec {
                name,
                dtype: DType::BF16,
                shape,
                role,
            }),
            Precision::Float8Scaled(convention, granularity) => {
                if role == Role::Linear {
                    let scale_shape = match granularity {
                        ScaleGranularity::Scalar => vec![],
                        ScaleGranularity::PerChannel => vec![shape[0], 1],
                    };
                    let scale_name = format!(
                        "{}{}",
                        name.strip_suffix("weight")
                            .expect("linear weights end in .weight"),
                        convention.suffix()
                    );
                    out.push(TensorSpec {
                        name,
                        dtype: DType::F8E4M3,
                        shape,
                        role,
                    });
                    out.push(TensorSpec {
                        name: scale_name,
                        dtype: DType::F32,
                        shape: scale_shape,
                        role: Role::Scale,
                    });
                } else {
                    out.push(TensorSpec {
                        name,
                        dtype: DType::BF16,
                        shape,
                        role,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment() {
        assert_eq!(align_up(0), 0);
        assert_eq!(align_up(1), 256);
        assert_eq!(align_up(256), 256);
        assert_eq!(align_up(257), 512);
    }
    use crate::arch::config::BuiltinModel;

    fn layer_bytes(specs: &[TensorSpec], layer: usize) -> u64 {
        let p = format!("{}layers.{layer}.", vibevoice::LM_PREFIX);
        specs
            .iter()
            .filter(|s| s.name.starts_with(&p))
            .map(|s| s.size_bytes())
            .sum()
    }

    #[test]
    fn seven_b_float8_layer_bytes() {
        let c = BuiltinModel::Large7b.config();
        let specs = vibevoice(
            &c,
            &SpeechConfig::real(c.hidden_size),
            Precision::Float8Plain,
        );
        assert_eq!(layer_bytes(&specs, 0), 233_057_792);
        assert_eq!(layer_bytes(&specs, 27), 233_057_792);
        let total: u64 = specs.iter().map(|s| s.size_bytes()).sum();
        // One byte per parameter: 9.343 B, the fork's 9.3 GB float8 file.
        assert_eq!(total, 9_343_355_363);
    }

    #[test]
    fn scaled_layout_adds_one_scale_per_linear_weight() {
        let c = BuiltinModel::Small1_5b.config();
        let speech = SpeechConfig::small(c.hidden_size);
        let plain = vibevoice(&c, &speech, Precision::Float8Plain);
        let scaled = vibevoice(
            &c,
            &speech,
            Precision::Float8Scaled(ScaleConvention::WeightScale, ScaleGranularity::PerChannel),
        );
        let linear = plain.iter().filter(|s| s.role == Role::Linear).count();
        assert_eq!(scaled.len(), plain.len() + linear);
        let q_scale = scaled
            .iter()
            .find(|s| s.name == "model.language_model.layers.3.self_attn.q_proj.weight_scale")
            .unwrap();
        assert_eq!(q_scale.shape, vec![1536, 1]);
        assert!(
            !plain.iter().any(|s| s.name == "lm_head.weight"),
            "1.5B ties its LM head"
        );
        // Convolutions and vectors stay bf16 beside the scaled linears.
        for s in &scaled {
            let float8 = s.dtype == DType::F8E4M3;
            assert_eq!(float8, s.role == Role::Linear, "{}", s.name);
        }
    }
}
