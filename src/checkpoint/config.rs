//! Reading a checkpoint's `config.json` into the language model's configuration (the speech
//! components': `speech_config`).

use crate::arch::config::{ModelConfig, DEFAULT_MAX_POSITIONS};
use anyhow::{anyhow, Context, Result};
use std::path::Path;

impl ModelConfig {
    /// Parses a VibeVoice `config.json` (decoder settings under `decoder_config`) or a plain
    /// Qwen2 one (settings at the top level).
    pub fn from_config_json(text: &str, path: &Path) -> Result<ModelConfig> {
        ModelConfig::from_config_value(&parse_config_json(text, path)?, path)
    }

    /// Like [`ModelConfig::from_config_json`], from the parsed file.
    pub fn from_config_value(value: &serde_json::Value, path: &Path) -> Result<ModelConfig> {
        let shown = path.display();
        let decoder = value.get("decoder_config").unwrap_or(value);
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
        // Absent or null: the default. Present with another type: an error, never a silent
        // default.
        let optional = |key: &str| decoder.get(key).is_some_and(|v| !v.is_null());
        let number = |key: &str, default: f64| -> Result<f64> {
            match decoder.get(key).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| anyhow!("{shown}: \"{key}\" must be a number, not {v}")),
            }
        };
        let config = ModelConfig {
            max_position_embeddings: if optional("max_position_embeddings") {
                get("max_position_embeddings")?
            } else {
                DEFAULT_MAX_POSITIONS
            },
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
            rope_theta: number("rope_theta", 1e6)?,
            rms_norm_eps: number("rms_norm_eps", 1e-6)?,
            tie_word_embeddings: match decoder
                .get("tie_word_embeddings")
                .or_else(|| value.get("tie_word_embeddings"))
                .filter(|v| !v.is_null())
            {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    anyhow!("{shown}: \"tie_word_embeddings\" must be true or false, not {v}")
                })?,
            },
        };
        config.validate().with_context(|| format!("in {shown}"))?;
        Ok(config)
    }
}

/// Parses `config.json`'s text, naming the file when it is not JSON.
pub fn parse_config_json(text: &str, path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| anyhow!("{} is not valid JSON: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn refuses_mistyped_and_impossible_values() {
        let base = r#""hidden_size":64,"intermediate_size":128,"num_attention_heads":4,
            "num_hidden_layers":3,"vocab_size":100"#;
        for (extra, message) in [
            (
                r#","rope_theta":"10000""#,
                "\"rope_theta\" must be a number",
            ),
            (
                r#","rms_norm_eps":"1e-6""#,
                "\"rms_norm_eps\" must be a number",
            ),
            (r#","tie_word_embeddings":"yes""#, "must be true or false"),
            (
                r#","rope_theta":0"#,
                "rope_theta 0 must be a positive number",
            ),
            (r#","rope_theta":-5.0"#, "must be a positive number"),
            (
                r#","rms_norm_eps":-1e-6"#,
                "rms_norm_eps -0.000001 must be zero",
            ),
            (
                r#","head_dim":8,"num_key_value_heads":4611686018427387906"#,
                "is beyond any model",
            ),
        ] {
            let text = format!("{{{base}{extra}}}");
            let e = ModelConfig::from_config_json(&text, Path::new("c.json")).unwrap_err();
            assert!(format!("{e:#}").contains(message), "{extra}: {e:#}");
        }
        // Null means absent.
        let text = format!("{{{base},\"rope_theta\":null,\"head_dim\":null}}");
        let c = ModelConfig::from_config_json(&text, Path::new("c.json")).unwrap();
        assert_eq!((c.rope_theta, c.head_dim), (1e6, 16));
    }

    #[test]
    fn rejects_uneven_heads() {
        let bad = r#"{"hidden_size":64,"intermediate_size":128,"num_attention_heads":4,
            "num_key_value_heads":3,"num_hidden_layers":3,"vocab_size":100}"#;
        let e = ModelConfig::from_config_json(bad, Path::new("c.json")).unwrap_err();
        assert!(format!("{e:#}").contains("not a multiple"));
    }
}
