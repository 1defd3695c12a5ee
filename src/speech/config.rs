//! Reading the speech components' settings out of the original's `config.json`
//! (`acoustic_tokenizer_config`, `semantic_tokenizer_config`, `diffusion_head_config`) into
//! [`SpeechConfig`]. Absent or null keys take the original configuration classes' defaults; a
//! key of the wrong type is an error, and so is a setting this port does not implement
//! (non-causal convolutions, LayerNorm blocks, a final norm, another beta schedule, ...).

use crate::arch::speech::{ConvStack, DiffusionHeadConfig, SpeechConfig, TokenizerConfig};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// One sub-configuration object, for typed look-ups with the original's defaults.
struct Section<'a> {
    name: &'a str,
    value: &'a Value,
}

impl<'a> Section<'a> {
    fn of(root: &'a Value, name: &'a str) -> Result<Section<'a>> {
        let value = root
            .get(name)
            .filter(|v| v.is_object())
            .ok_or_else(|| anyhow!("config.json: no \"{name}\" object"))?;
        Ok(Section { name, value })
    }

    /// The value of `key`, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn error(&self, key: &str, what: &str, v: &Value) -> anyhow::Error {
        anyhow!("config.json: {}.{key} must be {what}, not {v}", self.name)
    }

    fn count(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.error(key, "a non-negative integer", v)),
        }
    }

    fn number(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.error(key, "a number", v)),
        }
    }

    /// Checks `key`, when present, has the one value this port implements.
    fn require(&self, key: &str, wanted: &Value) -> Result<()> {
        match self.get(key) {
            Some(v) if v != wanted => bail!(
                "config.json: {}.{key} is {v}; only {wanted} is supported",
                self.name
            ),
            _ => Ok(()),
        }
    }

    fn ratios(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = v
            .as_array()
            .ok_or_else(|| self.error(key, "a list of integers", v))?;
        list.iter()
            .map(|r| {
                r.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| self.error(key, "a list of integers", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Depths as `"3-3-8"` (or, for the encoder, a list of integers, which the original also
    /// takes).
    fn depths(&self, key: &str, allow_list: bool) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => s
                .split('-')
                .map(|d| d.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
                .map_err(|_| {
                    self.error(
                        key,
                        "a \"-\"-separated list of integers",
                        &s.as_str().into(),
                    )
                }),
            Some(Value::Array(_)) if allow_list => self.ratios(key),
            Some(v) => Err(self.error(key, "a \"-\"-separated string of integers", v)),
        }
    }
}

/// The original's defaults for both tokenizers.
const DEFAULT_RATIOS: [usize; 6] = [8, 5, 5, 4, 2, 2];
const DEFAULT_DEPTHS: [usize; 7] = [3, 3, 3, 3, 3, 3, 8];

/// One tokenizer; `acoustic` adds the decoder and the Gaussian sampling.
fn tokenizer(s: &Section, acoustic: bool) -> Result<TokenizerConfig> {
    for (key, wanted) in [
        ("causal", Value::Bool(true)),
        ("pad_mode", "constant".into()),
        ("conv_norm", "none".into()),
        ("mixer_layer", "depthwise_conv".into()),
        ("layernorm", "RMSNorm".into()),
        ("disable_last_norm", Value::Bool(true)),
        ("layernorm_elementwise_affine", Value::Bool(true)),
        ("conv_bias", Value::Bool(true)),
        (
            "std_dist_type",
            if acoustic { "gaussian" } else { "none" }.into(),
        ),
    ] {
        s.require(key, &wanted)?;
    }
    if s.number("layer_scale_init_value", 1e-6)? <= 0.0 {
        bail!("config.json: {}.layer_scale_init_value must be positive (blocks without layer scales are not supported)", s.name);
    }
    let encoder_ratios = s
        .ratios("encoder_ratios")?
        .unwrap_or(DEFAULT_RATIOS.to_vec());
    let encoder_depths = s
        .depths("encoder_depths", true)?
        .unwrap_or(DEFAULT_DEPTHS.to_vec());
    let decoder = if acoustic {
        Some(ConvStack {
            n_filters: s.count("decoder_n_filters", 32)?,
            ratios: s
                .ratios("decoder_ratios")?
                .unwrap_or_else(|| encoder_ratios.clone()),
            depths: s
                .depths("decoder_depths", false)?
                .unwrap_or_else(|| encoder_depths.iter().rev().copied().collect()),
        })
    } else {
        None
    };
    Ok(TokenizerConfig {
        vae_dim: s.count("vae_dim", 64)?,
        channels: s.count("channels", 1)?,
        // The encoder applies the configuration's ratios in reverse.
        encoder: ConvStack {
            n_filters: s.count("encoder_n_filters", 32)?,
            ratios: encoder_ratios.iter().rev().copied().collect(),
            depths: encoder_depths,
        },
        decoder,
        layernorm_eps: s.number("layernorm_eps", 1e-5)?,
        fix_std: s.number("fix_std", if acoustic { 0.5 } else { 0.0 })?,
    })
}

fn head(s: &Section) -> Result<DiffusionHeadConfig> {
    s.require("prediction_type", &"v_prediction".into())?;
    s.require("ddpm_beta_schedule", &"cosine".into())?;
    let hidden_size = s.count("hidden_size", 768)?;
    let ratio = s.number("head_ffn_ratio", 3.0)?;
    if !(ratio.is_finite() && ratio > 0.0) {
        bail!("config.json: {}.head_ffn_ratio must be positive", s.name);
    }
    Ok(DiffusionHeadConfig {
        hidden_size,
        head_layers: s.count("head_layers", 4)?,
        // Python's int(hidden_size * head_ffn_ratio).
        ffn_dim: (hidden_size as f64 * ratio).floor() as usize,
        rms_norm_eps: s.number("rms_norm_eps", 1e-5)?,
        latent_size: s.count("latent_size", 64)?,
        ddpm_num_steps: s.count("ddpm_num_steps", 1000)?,
        ddpm_num_inference_steps: s.count("ddpm_num_inference_steps", 20)?,
    })
}

/// The speech components' configuration in a VibeVoice `config.json`, checked against each
/// other and, when the file has one, the language model's `decoder_config.hidden_size`.
pub fn config_from_json(root: &Value) -> Result<SpeechConfig> {
    let config = SpeechConfig {
        acoustic: tokenizer(&Section::of(root, "acoustic_tokenizer_config")?, true)?,
        semantic: tokenizer(&Section::of(root, "semantic_tokenizer_config")?, false)?,
        head: head(&Section::of(root, "diffusion_head_config")?)?,
    };
    let hidden = match root
        .get("decoder_config")
        .and_then(|d| d.get("hidden_size"))
    {
        None => config.head.hidden_size,
        Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
            anyhow!("config.json: decoder_config.hidden_size must be an integer, not {v}")
        })?,
    };
    config.validate(hidden).context("config.json")?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny() -> Value {
        json!({
            "acoustic_tokenizer_config": {"encoder_ratios": [4, 2], "encoder_depths": "1-2-3",
                "encoder_n_filters": 4, "vae_dim": 8, "decoder_ratios": [4, 2], "decoder_depths": null,
                "fix_std": 0.5, "std_dist_type": "gaussian", "layernorm_eps": 1e-5},
            "semantic_tokenizer_config": {"encoder_ratios": [4, 2], "encoder_depths": "1-2-3",
                "encoder_n_filters": 4, "vae_dim": 6, "fix_std": 0, "std_dist_type": "none"},
            "diffusion_head_config": {"hidden_size": 64, "head_layers": 2, "head_ffn_ratio": 3.0,
                "latent_size": 8, "rms_norm_eps": 1e-5, "prediction_type": "v_prediction"},
            "decoder_config": {"hidden_size": 64}
        })
    }

    #[test]
    fn reads_the_original_layout() {
        let c = config_from_json(&tiny()).unwrap();
        // The encoder reverses the written ratios, the decoder keeps them; the decoder's
        // depths default to the encoder's reversed.
        assert_eq!(c.acoustic.encoder.ratios, vec![2, 4]);
        assert_eq!(c.acoustic.encoder.depths, vec![1, 2, 3]);
        let d = c.acoustic.decoder.as_ref().unwrap();
        assert_eq!(
            (d.ratios.clone(), d.depths.clone()),
            (vec![4, 2], vec![3, 2, 1])
        );
        assert_eq!((c.semantic.vae_dim, c.semantic.fix_std), (6, 0.0));
        assert!(c.semantic.decoder.is_none());
        assert_eq!((c.head.ffn_dim, c.head.ddpm_num_steps), (192, 1000));
    }

    #[test]
    fn wrong_types_and_unsupported_settings_are_refused() {
        let mut v = tiny();
        v["acoustic_tokenizer_config"]["vae_dim"] = json!("8");
        let err = config_from_json(&v).unwrap_err().to_string();
        assert!(err.contains("acoustic_tokenizer_config.vae_dim"), "{err}");
        let mut v = tiny();
        v["semantic_tokenizer_config"]["layernorm"] = json!("LN");
        let err = config_from_json(&v).unwrap_err().to_string();
        assert!(
            err.contains("layernorm") && err.contains("RMSNorm"),
            "{err}"
        );
        let mut v = tiny();
        v["acoustic_tokenizer_config"]["decoder_depths"] = json!([1, 2, 3]);
        assert!(config_from_json(&v).is_err());
        let mut v = tiny();
        v["diffusion_head_config"]["latent_size"] = json!(16);
        let err = format!("{:#}", config_from_json(&v).unwrap_err());
        assert!(err.contains("latent_size"), "{err}");
    }
}
