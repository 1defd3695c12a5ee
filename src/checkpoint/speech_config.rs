//! The speech components' configuration in `config.json`: reading the original's
//! `acoustic_tokenizer_config`, `semantic_tokenizer_config` and `diffusion_head_config`, and
//! writing them back in its format.
//!
//! Reading follows the original's classes: an absent sub-configuration is the real model's,
//! an absent or null key takes the class's default, a key of the wrong type is an error naming
//! it and the file (never a silent default), and settings that would change the tensors to ones
//! this tool does not describe (weight-normed convolutions, LayerNorm, no biases, no layer
//! scales) are refused by name.

use crate::arch::speech::{ConvStack, DiffusionHeadConfig, SpeechConfig, TokenizerConfig};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The original's default ratios, as written (the encoder applies them reversed).
const DEFAULT_RATIOS: [usize; 6] = [8, 5, 5, 4, 2, 2];
/// The original's default encoder depths.
const DEFAULT_DEPTHS: &str = "3-3-3-3-3-3-8";

/// One sub-configuration and where it came from, for error messages.
struct Section<'a> {
    object: &'a Map<String, Value>,
    key: &'static str,
    shown: String,
}

impl<'a> Section<'a> {
    /// The sub-configuration `key` of `root`, or `None` when absent or null.
    fn of(root: &'a Value, key: &'static str, path: &Path) -> Result<Option<Section<'a>>> {
        let shown = path.display().to_string();
        match root.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(Value::Object(object)) => Ok(Some(Section { object, key, shown })),
            Some(v) => bail!("{shown}: \"{key}\" must be an object, not {v}"),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.object.get(name).filter(|v| !v.is_null())
    }

    fn error(&self, name: &str, what: &str, v: &Value) -> anyhow::Error {
        anyhow!(
            "{}: \"{}.{name}\" must be {what}, not {v}",
            self.shown,
            self.key
        )
    }

    fn usize(&self, name: &str, default: usize) -> Result<usize> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.error(name, "a non-negative integer", v)),
        }
    }

    fn number(&self, name: &str, default: f64) -> Result<f64> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.error(name, "a number", v)),
        }
    }

    /// A list of integers (`[8, 5, 5, 4, 2, 2]`), or `None` when absent or null.
    fn list(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let items = v.as_array().map(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<usize>>>()
        });
        match items.flatten() {
            Some(list) => Ok(Some(list)),
            None => Err(self.error(name, "a list of non-negative integers", v)),
        }
    }

    /// Depths as the original writes them (`"3-3-3-3-3-3-8"`) or as a list, or `None` when
    /// absent or null.
    fn depths(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.as_str() {
            Some(text) => text
                .split('-')
                .map(|d| d.trim().parse::<usize>().ok())
                .collect::<Option<Vec<usize>>>()
                .map(Some)
                .ok_or_else(|| self.error(name, "depths like \"3-3-3-3-3-3-8\"", v)),
            None => self.list(name),
        }
    }

    /// A setting this tool supports one value of: absent, null or that value.
    fn fixed(&self, name: &str, supported: Value) -> Result<()> {
        match self.get(name) {
            Some(v) if *v != supported => bail!(
                "{}: \"{}.{name}\" is {v}, which this tool does not support (only {supported})",
                self.shown,
                self.key
            ),
            _ => Ok(()),
        }
    }

    /// The settings shared by both tokenizers that decide which tensors exist.
    fn check_tokenizer_settings(&self) -> Result<()> {
        for (name, supported) in [
            ("causal", json!(true)),
            ("mixer_layer", json!("depthwise_conv")),
            ("conv_norm", json!("none")),
            ("layernorm", json!("RMSNorm")),
            ("layernorm_elementwise_affine", json!(true)),
            ("conv_bias", json!(true)),
            ("disable_last_norm", json!(true)),
        ] {
            self.fixed(name, supported)?;
        }
        let scale = self.number("layer_scale_init_value", 1e-6)?;
        if scale.is_nan() || scale <= 0.0 {
            bail!(
                "{}: \"{}.layer_scale_init_value\" is {scale}; only positive values (blocks \
                 with gamma and ffn_gamma) are supported",
                self.shown,
                self.key
            );
        }
        Ok(())
    }

    /// The encoder stack: `encoder_ratios` as written are applied reversed.
    fn encoder(&self) -> Result<(ConvStack, Vec<usize>, Vec<usize>)> {
        let ratios = self
            .list("encoder_ratios")?
            .unwrap_or(DEFAULT_RATIOS.to_vec());
        let depths = match self.depths("encoder_depths")? {
            Some(d) => d,
            None => parse_depths(DEFAULT_DEPTHS),
        };
        let stack = ConvStack {
            n_filters: self.usize("encoder_n_filters", 32)?,
            ratios: ratios.iter().rev().copied().collect(),
            depths: depths.clone(),
        };
        Ok((stack, ratios, depths))
    }

    fn tokenizer(&self, acoustic: bool) -> Result<TokenizerConfig> {
        self.check_tokenizer_settings()?;
        let (encoder, ratios, depths) = self.encoder()?;
        let decoder = if acoustic {
            Some(ConvStack {
                n_filters: self.usize("decoder_n_filters", 32)?,
                ratios: self.list("decoder_ratios")?.unwrap_or(ratios),
                depths: match self.depths("decoder_depths")? {
                    Some(d) => d,
                    None => depths.into_iter().rev().collect(),
                },
            })
        } else {
            None
        };
        let (vae_dim, fix_std) = if acoustic { (64, 0.5) } else { (64, 0.0) };
        let config = TokenizerConfig {
            vae_dim: self.usize("vae_dim", vae_dim)?,
            channels: self.usize("channels", 1)?,
            encoder,
            decoder,
            layernorm_eps: self.number("layernorm_eps", 1e-5)?,
            fix_std: self.number("fix_std", fix_std)?,
        };
        config
            .validate(&format!("{}: {}", self.shown, self.key))
            .map(|()| config)
    }

    fn head(&self) -> Result<DiffusionHeadConfig> {
        self.fixed("prediction_type", json!("v_prediction"))?;
        self.fixed("diffusion_type", json!("ddpm"))?;
        self.fixed("ddpm_beta_schedule", json!("cosine"))?;
        let hidden_size = self.usize("hidden_size", 768)?;
        let ratio = self.number("head_ffn_ratio", 3.0)?;
        // int(hidden_size * head_ffn_ratio), as the original sizes the FFN.
        let ffn = hidden_size as f64 * ratio;
        if !(ffn.is_finite() && ffn >= 1.0 && ffn <= crate::arch::config::MAX_DIMENSION as f64) {
            bail!(
                "{}: \"{}.head_ffn_ratio\" {ratio} gives no usable FFN width for hidden size \
                 {hidden_size}",
                self.shown,
                self.key
            );
        }
        Ok(DiffusionHeadConfig {
            hidden_size,
            head_layers: self.usize("head_layers", 4)?,
            ffn_dim: ffn as usize,
            rms_norm_eps: self.number("rms_norm_eps", 1e-5)?,
            latent_size: self.usize("latent_size", 64)?,
            ddpm_num_steps: self.usize("ddpm_num_steps", 1000)?,
            ddpm_num_inference_steps: self.usize("ddpm_num_inference_steps", 20)?,
        })
    }
}

fn parse_depths(text: &str) -> Vec<usize> {
    text.split('-').filter_map(|d| d.parse().ok()).collect()
}

fn depths_string(depths: &[usize]) -> String {
    let parts: Vec<String> = depths.iter().map(usize::to_string).collect();
    parts.join("-")
}

impl SpeechConfig {
    /// Reads the speech sub-configurations of a parsed VibeVoice `config.json` at `path`,
    /// around a language model of width `hidden_size`; absent ones are the real model's.
    pub fn from_config_value(
        root: &Value,
        hidden_size: usize,
        path: &Path,
    ) -> Result<SpeechConfig> {
        let real = SpeechConfig::real(hidden_size);
        let acoustic = match Section::of(root, "acoustic_tokenizer_config", path)? {
            Some(s) => s.tokenizer(true)?,
            None => real.acoustic,
        };
        let semantic = match Section::of(root, "semantic_tokenizer_config", path)? {
            Some(s) => s.tokenizer(false)?,
            None => real.semantic,
        };
        let head = match Section::of(root, "diffusion_head_config", path)? {
            Some(s) => s.head()?,
            None => real.head,
        };
        let speech = SpeechConfig {
            acoustic,
            semantic,
            head,
        };
        speech
            .validate(hidden_size)
            .with_context(|| format!("in {}", path.display()))?;
        Ok(speech)
    }

    /// The three sub-configurations as the original's `config.json` spells them, every field
    /// of its classes included, so the original code builds the same modules from them.
    pub fn to_config_json(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert(
            "acoustic_tokenizer_config".into(),
            tokenizer_json(&self.acoustic, true),
        );
        out.insert(
            "semantic_tokenizer_config".into(),
            tokenizer_json(&self.semantic, false),
        );
        let h = &self.head;
        // The original sizes the FFN as int(hidden_size * ratio): nudge the ratio so that
        // floating-point rounding cannot land one below.
        let mut ratio = h.ffn_dim as f64 / h.hidden_size as f64;
        if (h.hidden_size as f64 * ratio) as usize != h.ffn_dim {
            ratio = (h.ffn_dim as f64 + 0.5) / h.hidden_size as f64;
        }
        out.insert(
            "diffusion_head_config".into(),
            json!({
                "model_type": "vibevoice_diffusion_head",
                "hidden_size": h.hidden_size,
                "head_layers": h.head_layers,
                "head_ffn_ratio": ratio,
                "rms_norm_eps": h.rms_norm_eps,
                "latent_size": h.latent_size,
                "speech_vae_dim": self.acoustic.vae_dim,
                "prediction_type": "v_prediction",
                "diffusion_type": "ddpm",
                "ddpm_num_steps": h.ddpm_num_steps,
                "ddpm_num_inference_steps": h.ddpm_num_inference_steps,
                "ddpm_beta_schedule": "cosine",
                "ddpm_batch_mul": 4,
            }),
        );
        out
    }
}

fn tokenizer_json(t: &TokenizerConfig, acoustic: bool) -> Value {
    let written_ratios: Vec<usize> = t.encoder.ratios.iter().rev().copied().collect();
    let mut v = json!({
        "model_type": if acoustic { "vibevoice_acoustic_tokenizer" } else { "vibevoice_semantic_tokenizer" },
        "channels": t.channels,
        "corpus_normalize": 0.0,
        "causal": true,
        "vae_dim": t.vae_dim,
        "fix_std": t.fix_std,
        "std_dist_type": if acoustic { "gaussian" } else { "none" },
        "mixer_layer": "depthwise_conv",
        "conv_norm": "none",
        "pad_mode": "constant",
        "disable_last_norm": true,
        "layernorm": "RMSNorm",
        "layernorm_eps": t.layernorm_eps,
        "layernorm_elementwise_affine": true,
        "conv_bias": true,
        "layer_scale_init_value": 1e-6,
        "weight_init_value": 1e-2,
        "encoder_n_filters": t.encoder.n_filters,
        "encoder_ratios": written_ratios,
        "encoder_depths": depths_string(&t.encoder.depths),
    });
    if let Some(d) = &t.decoder {
        let reversed: Vec<usize> = t.encoder.depths.iter().rev().copied().collect();
        let depths = (d.depths != reversed).then(|| depths_string(&d.depths));
        v["decoder_n_filters"] = json!(d.n_filters);
        v["decoder_ratios"] = json!(d.ratios);
        v["decoder_depths"] = json!(depths);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(root: Value, hidden: usize) -> Result<SpeechConfig> {
        SpeechConfig::from_config_value(&root, hidden, Path::new("c.json"))
    }

    #[test]
    fn round_trips_and_absent_sub_configurations_are_the_real_ones() {
        for speech in [SpeechConfig::real(3584), SpeechConfig::small(64)] {
            let hidden = speech.head.hidden_size;
            let root = Value::Object(speech.to_config_json());
            assert_eq!(read(root, hidden).unwrap(), speech);
        }
        assert_eq!(read(json!({}), 1536).unwrap(), SpeechConfig::real(1536));
    }

    #[test]
    fn the_originals_conventions_are_followed() {
        // Ratios as written are reversed for the encoder and kept for the decoder; decoder
        // depths default to the reversed encoder depths; the FFN is int(hidden * ratio).
        let root = json!({
            "acoustic_tokenizer_config": {"encoder_ratios": [4, 2], "encoder_depths": "1-2-3",
                "encoder_n_filters": 8, "vae_dim": 16, "decoder_ratios": null},
            "semantic_tokenizer_config": {"encoder_ratios": [2, 4], "encoder_depths": [1, 1, 1],
                "vae_dim": 6},
            "diffusion_head_config": {"hidden_size": 100, "head_ffn_ratio": 2.5,
                "latent_size": 16},
        });
        let s = read(root, 100).unwrap();
        assert_eq!(s.acoustic.encoder.ratios, [2, 4]);
        let decoder = s.acoustic.decoder.unwrap();
        assert_eq!(
            (decoder.ratios, decoder.depths),
            (vec![4, 2], vec![3, 2, 1])
        );
        assert_eq!(s.semantic.encoder.ratios, [4, 2]);
        assert_eq!(s.head.ffn_dim, 250);
    }

    #[test]
    fn wrong_types_and_unsupported_settings_are_errors_naming_the_key() {
        for (sub, message) in [
            (
                json!({"acoustic_tokenizer_config": {"encoder_ratios": "8,5"}}),
                "\"acoustic_tokenizer_config.encoder_ratios\" must be a list",
            ),
            (
                json!({"acoustic_tokenizer_config": {"encoder_depths": "3-x"}}),
                "\"acoustic_tokenizer_config.encoder_depths\" must be depths",
            ),
            (
                json!({"semantic_tokenizer_config": {"vae_dim": 12.5}}),
                "\"semantic_tokenizer_config.vae_dim\" must be a non-negative integer",
            ),
            (
                json!({"semantic_tokenizer_config": {"conv_norm": "weight_norm"}}),
                "\"semantic_tokenizer_config.conv_norm\" is \"weight_norm\", which this tool",
            ),
            (
                json!({"acoustic_tokenizer_config": {"layer_scale_init_value": 0}}),
                "only positive values",
            ),
            (
                json!({"diffusion_head_config": {"hidden_size": 64, "head_ffn_ratio": "3"}}),
                "\"diffusion_head_config.head_ffn_ratio\" must be a number",
            ),
            (json!({"diffusion_head_config": 4}), "must be an object"),
            (
                json!({"diffusion_head_config": {"hidden_size": 32}}),
                "differs from the language model's 64",
            ),
            (
                json!({"acoustic_tokenizer_config": {"encoder_depths": "1-1"}}),
                "2 depths for 6 ratios",
            ),
        ] {
            let e = format!("{:#}", read(sub.clone(), 64).unwrap_err());
            assert!(e.contains(message) && e.contains("c.json"), "{sub}: {e}");
        }
    }
}
