//! The language model's configuration: its hyper-parameters, the built-in 7B and 1.5B, and
//! the checks that make them a model. Reading `config.json` is the checkpoint's business
//! (`checkpoint::config`); inferring it from shapes, the inventory's.

use super::qwen2;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Qwen2 decoder hyper-parameters, named as in `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Rotary embedding base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head reuses the embedding matrix (1.5B) or has its own (7B).
    pub tie_word_embeddings: bool,
    /// The context the model was trained for: generation stops there, as the original's does
    /// (7B 32,768, 1.5B 65,536; Qwen2's default when a file does not say).
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
}

/// Qwen2's `max_position_embeddings` when a configuration does not give one.
pub const DEFAULT_MAX_POSITIONS: usize = 32768;

fn default_max_positions() -> usize {
    DEFAULT_MAX_POSITIONS
}

/// The model sizes the tool knows without a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuiltinModel {
    /// VibeVoice-Large (Qwen2.5-7B backbone).
    #[serde(rename = "7b")]
    Large7b,
    /// VibeVoice-1.5B (Qwen2.5-1.5B backbone).
    #[serde(rename = "1.5b")]
    Small1_5b,
}

impl BuiltinModel {
    /// The name users type (`7b`, `1.5b`).
    pub fn name(self) -> &'static str {
        match self {
            BuiltinModel::Large7b => "7b",
            BuiltinModel::Small1_5b => "1.5b",
        }
    }

    /// The decoder configuration.
    pub fn config(self) -> ModelConfig {
        match self {
            BuiltinModel::Large7b => ModelConfig {
                hidden_size: 3584,
                intermediate_size: 18944,
                num_attention_heads: 28,
                num_key_value_heads: 4,
                head_dim: 128,
                num_hidden_layers: 28,
                vocab_size: 152064,
                rope_theta: 1e6,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: false,
                max_position_embeddings: 32768,
            },
            BuiltinModel::Small1_5b => ModelConfig {
                hidden_size: 1536,
                intermediate_size: 8960,
                num_attention_heads: 12,
                num_key_value_heads: 2,
                head_dim: 128,
                num_hidden_layers: 28,
                vocab_size: 151936,
                rope_theta: 1e6,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: true,
                max_position_embeddings: 65536,
            },
        }
    }
}

/// The largest value a configuration's sizes may take (2^20): real models stay below 2^18,
/// and products of three such sizes fit in u64.
pub const MAX_DIMENSION: usize = 1 << 20;

impl ModelConfig {
    /// Checks the numbers make a model: sizes positive and bounded, heads dividing evenly, a
    /// positive rotary base and a non-negative epsilon (others give NaN).
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in dims {
            if v == 0 {
                bail!("model configuration: {name} must be positive");
            }
            // Far beyond any model, and small enough that every size derived from them (the
            // product of two or three, in u64) cannot wrap.
            if v > MAX_DIMENSION {
                bail!(
                    "model configuration: {name} {v} is beyond any model (at most {MAX_DIMENSION})"
                );
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "model configuration: rope_theta {} must be a positive number",
                self.rope_theta
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            bail!(
                "model configuration: rms_norm_eps {} must be zero or a small positive number",
                self.rms_norm_eps
            );
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "model configuration: {} attention heads are not a multiple of {} key/value heads",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "model configuration: head_dim {} must be even for rotary embeddings",
                self.head_dim
            );
        }
        Ok(())
    }

    /// Parameters of one decoder layer: the sum over [`qwen2::LayerTensor::ALL`].
    pub fn layer_params(&self) -> u64 {
        qwen2::LayerTensor::ALL
            .iter()
            .map(|t| t.shape(self).iter().product::<u64>())
            .sum()
    }

    /// Widths of the activations, derived once from the heads and sizes.
    pub fn widths(&self) -> qwen2::Widths {
        qwen2::Widths {
            hidden: self.hidden_size as u64,
            q: (self.num_attention_heads * self.head_dim) as u64,
            kv: (self.num_key_value_heads * self.head_dim) as u64,
            intermediate: self.intermediate_size as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_b_layer_is_233_million_parameters() {
        assert_eq!(BuiltinModel::Large7b.config().layer_params(), 233_057_792);
    }
}
