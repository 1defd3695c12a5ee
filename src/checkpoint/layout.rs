//! The VibeVoice checkpoint layout: every tensor name and shape for a configuration, and how
//! each precision stores it. The synthesizer writes exactly this list and the built-in models'
//! inventories are computed from it, so `table` without a file and `inspect` on a synthesized
//! file agree to the byte.

use super::config::ModelConfig;
use crate::dtype::DType;
use serde::{Deserialize, Serialize};

/// Prefix of the language model's tensors in a VibeVoice checkpoint.
pub const LM_PREFIX: &str = "model.language_model.";

/// The tensors every decoder layer holds, relative to `layers.{i}.`.
pub const LAYER_TENSORS: [&str; 12] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

/// What a tensor is, which decides its synthetic values and whether it gets a scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A linear layer's weight (`[out, in]`): float8 with a scale in scaled checkpoints.
    Linear,
    /// The token embedding.
    Embedding,
    /// An RMSNorm weight (values near 1).
    Norm,
    /// A bias or a scalar factor (small values).
    Bias,
    /// A float8 scale (positive f32).
    Scale,
    /// The empty `scaled_fp8` marker tensor.
    Marker,
}

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
    /// Linear weights F8_E4M3 with f32 scales, every other tensor BF16.
    Float8Scaled(ScaleConvention, ScaleGranularity),
    /// Every tensor BF16.
    BF16,
}

/// Sizes of the parts of VibeVoice around the language model.
#[derive(Clone, Debug, PartialEq)]
pub struct VibeVoiceParts {
    /// Diffusion (prediction) head layers.
    pub head_layers: u64,
    /// Diffusion head FFN width.
    pub head_ffn_dim: u64,
    /// Acoustic latent size.
    pub acoustic_dim: u64,
    /// Semantic feature size.
    pub semantic_dim: u64,
    /// Timestep frequency-embedding size.
    pub frequency_embedding_size: u64,
    /// Width of the square blocks that stand in for the tokenizers' weights.
    pub tokenizer_width: u64,
    /// Blocks per tokenizer part (acoustic encoder, acoustic decoder, semantic encoder).
    pub tokenizer_blocks: u64,
}

impl VibeVoiceParts {
    /// The real model's parts: head FFN ratio 3.0, latent 64, semantic 128, and tokenizer
    /// stand-ins of 81 x 2048² = 339,738,624 parameters per part (acoustic about 680M in
    /// all, semantic about 340M).
    pub fn real(config: &ModelConfig) -> VibeVoiceParts {
        VibeVoiceParts {
            head_layers: 4,
            head_ffn_dim: config.hidden_size as u64 * 3,
            acoustic_dim: 64,
            semantic_dim: 128,
            frequency_embedding_size: 256,
            tokenizer_width: 2048,
            tokenizer_blocks: 81,
        }
    }

    /// Small parts for test models: two head layers and two hidden-sized blocks per tokenizer
    /// part.
    pub fn small(config: &ModelConfig) -> VibeVoiceParts {
        VibeVoiceParts {
            head_layers: 2,
            head_ffn_dim: config.hidden_size as u64 * 3,
            acoustic_dim: 8,
            semantic_dim: 16,
            frequency_embedding_size: 16,
            tokenizer_width: config.hidden_size as u64,
            tokenizer_blocks: 2,
        }
    }
}

/// The full tensor list of a VibeVoice checkpoint, in file order.
pub fn vibevoice(
    config: &ModelConfig,
    parts: &VibeVoiceParts,
    precision: Precision,
) -> Vec<TensorSpec> {
    let h = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let kv = (config.num_key_value_heads * config.head_dim) as u64;
    let i = config.intermediate_size as u64;
    let mut logical: Vec<(String, Vec<u64>, Role)> = Vec::new();
    let mut add = |name: String, shape: Vec<u64>, role: Role| logical.push((name, shape, role));

    add(
        format!("{LM_PREFIX}embed_tokens.weight"),
        vec![config.vocab_size as u64, h],
        Role::Embedding,
    );
    for l in 0..config.num_hidden_layers {
        let p = format!("{LM_PREFIX}layers.{l}.");
        for rest in LAYER_TENSORS {
            let (shape, role) = match rest {
                "input_layernorm.weight" | "post_attention_layernorm.weight" => {
                    (vec![h], Role::Norm)
                }
                "self_attn.q_proj.weight" => (vec![q, h], Role::Linear),
                "self_attn.q_proj.bias" => (vec![q], Role::Bias),
                "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
                    (vec![kv, h], Role::Linear)
                }
                "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => (vec![kv], Role::Bias),
                "self_attn.o_proj.weight" => (vec![h, q], Role::Linear),
                "mlp.gate_proj.weight" | "mlp.up_proj.weight" => (vec![i, h], Role::Linear),
                "mlp.down_proj.weight" => (vec![h, i], Role::Linear),
                other => unreachable!("layer tensor {other} has no shape rule"),
            };
            add(format!("{p}{rest}"), shape, role);
        }
    }
    add(format!("{LM_PREFIX}norm.weight"), vec![h], Role::Norm);
    if !config.tie_word_embeddings {
        add(
            "lm_head.weight".into(),
            vec![config.vocab_size as u64, h],
            Role::Linear,
        );
    }

    let ph = "model.prediction_head.";
    let ffn = parts.head_ffn_dim;
    add(
        format!("{ph}noisy_images_proj.weight"),
        vec![h, parts.acoustic_dim],
        Role::Linear,
    );
    add(format!("{ph}cond_proj.weight"), vec![h, h], Role::Linear);
    add(
        format!("{ph}t_embedder.mlp.0.weight"),
        vec![h, parts.frequency_embedding_size],
        Role::Linear,
    );
    add(
        format!("{ph}t_embedder.mlp.2.weight"),
        vec![h, h],
        Role::Linear,
    );
    for l in 0..parts.head_layers {
        let p = format!("{ph}layers.{l}.");
        add(format!("{p}norm.weight"), vec![h], Role::Norm);
        add(
            format!("{p}ffn.gate_proj.weight"),
            vec![ffn, h],
            Role::Linear,
        );
        add(format!("{p}ffn.up_proj.weight"), vec![ffn, h], Role::Linear);
        add(
            format!("{p}ffn.down_proj.weight"),
            vec![h, ffn],
            Role::Linear,
        );
        add(
            format!("{p}adaLN_modulation.1.weight"),
            vec![3 * h, h],
            Role::Linear,
        );
    }
    add(
        format!("{ph}final_layer.adaLN_modulation.1.weight"),
        vec![2 * h, h],
        Role::Linear,
    );
    add(
        format!("{ph}final_layer.linear.weight"),
        vec![parts.acoustic_dim, h],
        Role::Linear,
    );

    for (connector, input) in [
        ("acoustic", parts.acoustic_dim),
        ("semantic", parts.semantic_dim),
    ] {
        let p = format!("model.{connector}_connector.");
        add(format!("{p}fc1.weight"), vec![h, input], Role::Linear);
        add(format!("{p}fc1.bias"), vec![h], Role::Bias);
        add(format!("{p}norm.weight"), vec![h], Role::Norm);
        add(format!("{p}fc2.weight"), vec![h, h], Role::Linear);
        add(format!("{p}fc2.bias"), vec![h], Role::Bias);
    }
    for part in [
        "acoustic_tokenizer.encoder",
        "acoustic_tokenizer.decoder",
        "semantic_tokenizer.encoder",
    ] {
        for b in 0..parts.tokenizer_blocks {
            let w = parts.tokenizer_width;
            add(
                format!("model.{part}.blocks.{b}.weight"),
                vec![w, w],
                Role::Linear,
            );
        }
    }
    add("model.speech_scaling_factor".into(), vec![], Role::Bias);
    add("model.speech_bias_factor".into(), vec![], Role::Bias);

    store(logical, precision)
}

/// Applies a precision: picks each tensor's dtype and adds scale tensors after their weights.
fn store(logical: Vec<(String, Vec<u64>, Role)>, precision: Precision) -> Vec<TensorSpec> {
    let mut out = Vec::with_capacity(logical.len() * 2);
    if let Precision::Float8Scaled(ScaleConvention::ScaleWeight, _) = precision {
        out.push(TensorSpec {
            name: "scaled_fp8".into(),
            dtype: DType::F8E4M3,
            shape: vec![0],
            role: Role::Marker,
        });
    }
    for (name, shape, role) in logical {
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
    use crate::checkpoint::config::BuiltinModel;

    fn layer_bytes(specs: &[TensorSpec], layer: usize) -> u64 {
        let p = format!("{LM_PREFIX}layers.{layer}.");
        specs
            .iter()
            .filter(|s| s.name.starts_with(&p))
            .map(|s| s.size_bytes())
            .sum()
    }

    #[test]
    fn seven_b_float8_layer_bytes() {
        let c = BuiltinModel::Large7b.config();
        let specs = vibevoice(&c, &VibeVoiceParts::real(&c), Precision::Float8Plain);
        assert_eq!(layer_bytes(&specs, 0), 233_057_792);
        assert_eq!(layer_bytes(&specs, 27), 233_057_792);
        let total: u64 = specs.iter().map(|s| s.size_bytes()).sum();
        // About 9.3 GB: the fork's float8 file is 9-10 GB.
        assert!((9_000_000_000..10_000_000_000).contains(&total), "{total}");
    }

    #[test]
    fn scaled_layout_adds_one_scale_per_linear_weight() {
        let c = BuiltinModel::Small1_5b.config();
        let parts = VibeVoiceParts::small(&c);
        let plain = vibevoice(&c, &parts, Precision::Float8Plain);
        let scaled = vibevoice(
            &c,
            &parts,
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
    }
}
