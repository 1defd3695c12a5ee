//! The language model's configuration: built-in 7B and 1.5B, read from `config.json`, or
//! inferred from tensor shapes.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
            },
        }
    }
}

impl ModelConfig {
    /// Checks the numbers make a model (non-zero, heads divide evenly).
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in dims {
            if v == 0 {
                bail!("model configuration: {name} must be positive");
            }
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

    /// Parses a VibeVoice `config.json` (decoder settings under `decoder_config`) or a plain
    /// Qwen2 one (settings at the top level).
    pub fn from_config_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let shown = path.display();
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| anyhow!("{shown} is not valid JSON: {e}"))?;
        let decoder = value.get("decoder_config").unwrap_or(&value);
        let get = |key: &str| -> Result<usize> {
            let v = decoder
                .get(key)
                .ok_or_else(|| anyhow!("{shown}: no \"{key}\" in the decoder configuration"))?;
            v.as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| anyhow!("{shown}: \"{key}\" must be a positive integer"))
        };
        let hidden_size = get("hidden_size")?;
        let num_attention_heads = get("num_attention_heads")?;
        let optional = |key: &str| decoder.get(key).is_some();
        let config = ModelConfig {
            hidden_size,
            intermediate_size: get("intermediate_size")?,
            num_attention_heads,
            num_key_value_heads: if optional("num_key_value_heads") {
                get("num_key_value_heads")?
            } else {
                num_attention_heads
            },
            head_dim: if optional("head_dim") {
                get("head_dim")?
            } else {
                hidden_size / num_attention_heads.max(1)
            },
            num_hidden_layers: get("num_hidden_layers")?,
            vocab_size: get("vocab_size")?,
            rope_theta: decoder
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e6),
            rms_norm_eps: decoder
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6),
            tie_word_embeddings: decoder
                .get("tie_word_embeddings")
                .or_else(|| value.get("tie_word_embeddings"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        config.validate().with_context(|| format!("in {shown}"))?;
        Ok(config)
    }

    /// Parameters of one decoder layer.
    pub fn layer_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let i = self.intermediate_size as u64;
        // q, k, v with biases; o; gate, up, down; two norms.
        (q * h + q) + 2 * (kv * h + kv) + h * q + 3 * i * h + 2 * h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_b_layer_is_233_million_parameters() {
        assert_eq!(BuiltinModel::Large7b.config().layer_params(), 233_057_792);
    }

    #[test]
    fn reads_vibevoice_and_plain_configs() {
        let vv = r#"{"model_type":"vibevoice","decoder_config":{"hidden_size":64,"intermediate_size":128,
            "num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":3,"vocab_size":100,
            "tie_word_embeddings":true}}"#;
        let c = ModelConfig::from_config_json(vv, Path::new("c.json")).unwrap();
        assert_eq!(
            (c.head_dim, c.num_key_value_heads, c.tie_word_embeddings),
            (16, 2, true)
        );
        let plain = r#"{"hidden_size":64,"intermediate_size":128,"num_attention_heads":4,
            "num_hidden_layers":3,"vocab_size":100,"rope_theta":10000.0}"#;
        let c = ModelConfig::from_config_json(plain, Path::new("c.json")).unwrap();
        assert_eq!((c.num_key_value_heads, c.rope_theta), (4, 10000.0));
    }

    #[test]
    fn rejects_uneven_heads() {
        let bad = r#"{"hidden_size":64,"intermediate_size":128,"num_attention_heads":4,
            "num_key_value_heads":3,"num_hidden_layers":3,"vocab_size":100}"#;
        let e = ModelConfig::from_config_json(bad, Path::new("c.json")).unwrap_err();
        assert!(format!("{e:#}").contains("not a multiple"));
    }
}
