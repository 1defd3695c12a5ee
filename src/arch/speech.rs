//! VibeVoice's speech components around the language model: the configuration of the
//! convolutional tokenizers (acoustic encoder and decoder, semantic encoder) and of the
//! diffusion head, as the original's `config.json` sub-configurations define them.
//! Reading them from a file is `checkpoint::speech_config`'s business; their tensors are
//! [`super::tokenizer`]'s and [`super::head`]'s.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// One convolutional stack of a tokenizer: a stem, one strided (transposed) convolution per
/// ratio, and `depths[i]` residual blocks at stage `i`, whose width is `n_filters * 2^i`
/// (encoder) or `n_filters * 2^(stages - 1 - i)` (decoder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvStack {
    /// Channels of the first encoder stage (last decoder stage).
    pub n_filters: usize,
    /// Strides in the order the stack applies them: the encoder reverses the configuration's
    /// `encoder_ratios` (`[2, 2, 4, 5, 5, 8]` for the real model), the decoder uses
    /// `decoder_ratios` as written (`[8, 5, 5, 4, 2, 2]`).
    pub ratios: Vec<usize>,
    /// Residual blocks per stage, `ratios.len() + 1` stages, in application order.
    pub depths: Vec<usize>,
}

impl ConvStack {
    /// Samples per latent frame: the product of the ratios (3,200 for the real model).
    pub fn hop(&self) -> usize {
        self.ratios.iter().product()
    }

    /// Width of encoder stage `i`.
    pub fn encoder_width(&self, i: usize) -> usize {
        self.n_filters << i
    }

    /// Width of decoder stage `i`.
    pub fn decoder_width(&self, i: usize) -> usize {
        self.n_filters << (self.depths.len() - 1 - i)
    }

    fn validate(&self, what: &str) -> Result<()> {
        if self.n_filters == 0 || self.ratios.is_empty() || self.ratios.contains(&0) {
            bail!("{what}: n_filters and every ratio must be positive");
        }
        if self.depths.len() != self.ratios.len() + 1 {
            bail!(
                "{what}: {} depths for {} ratios (there must be one more depth than ratios)",
                self.depths.len(),
                self.ratios.len()
            );
        }
        // Widths double per stage; keep them and the hop far from overflow.
        if self.ratios.len() > 12 || self.n_filters > 1 << 16 {
            bail!("{what}: too many stages or filters for a speech tokenizer");
        }
        if self.ratios.iter().any(|&r| r > 1024) || self.depths.iter().any(|&d| d > 1024) {
            bail!("{what}: ratios and depths must be at most 1024");
        }
        Ok(())
    }
}

/// A speech tokenizer: the acoustic one has an encoder and a decoder, the semantic one an
/// encoder only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConfig {
    /// Latent channels per frame (acoustic 64, semantic 128).
    pub vae_dim: usize,
    /// Audio channels (1).
    pub channels: usize,
    /// The encoder.
    pub encoder: ConvStack,
    /// The decoder (acoustic only).
    pub decoder: Option<ConvStack>,
    /// RMSNorm epsilon of the blocks.
    pub layernorm_eps: f64,
    /// Standard deviation of the encoder's Gaussian sample (acoustic 0.5, semantic 0: the
    /// mean is used).
    pub fix_std: f64,
}

/// Kernel size of the stems, the blocks' depthwise mixers and the heads.
pub const TOKENIZER_KERNEL: usize = 7;

impl TokenizerConfig {
    /// The real acoustic tokenizer (identical for 7B and 1.5B).
    pub fn real_acoustic() -> TokenizerConfig {
        TokenizerConfig {
            vae_dim: 64,
            channels: 1,
            encoder: ConvStack {
                n_filters: 32,
                ratios: vec![2, 2, 4, 5, 5, 8],
                depths: vec![3, 3, 3, 3, 3, 3, 8],
            },
            decoder: Some(ConvStack {
                n_filters: 32,
                ratios: vec![8, 5, 5, 4, 2, 2],
                depths: vec![8, 3, 3, 3, 3, 3, 3],
            }),
            layernorm_eps: 1e-5,
            fix_std: 0.5,
        }
    }

    /// The real semantic tokenizer's encoder.
    pub fn real_semantic() -> TokenizerConfig {
        TokenizerConfig {
            vae_dim: 128,
            decoder: None,
            fix_std: 0.0,
            ..TokenizerConfig::real_acoustic()
        }
    }

    /// Checks the stacks make a tokenizer whose encoder and decoder agree on the hop.
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.vae_dim == 0 || self.channels == 0 {
            bail!("{what}: vae_dim and channels must be positive");
        }
        if self.vae_dim > 1 << 16 || self.channels > 16 {
            bail!("{what}: vae_dim or channels beyond any speech tokenizer");
        }
        if !(self.layernorm_eps.is_finite() && self.layernorm_eps >= 0.0) {
            bail!("{what}: layernorm_eps must be zero or a small positive number");
        }
        if !(self.fix_std.is_finite() && self.fix_std >= 0.0) {
            bail!("{what}: fix_std must be zero or positive");
        }
        self.encoder.validate(&format!("{what} encoder"))?;
        if let Some(decoder) = &self.decoder {
            decoder.validate(&format!("{what} decoder"))?;
            if decoder.hop() != self.encoder.hop() {
                bail!(
                    "{what}: the decoder's hop {} differs from the encoder's {}",
                    decoder.hop(),
                    self.encoder.hop()
                );
            }
        }
        Ok(())
    }
}

/// The diffusion (prediction) head and its sampler's training schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiffusionHeadConfig {
    /// Width (the language model's hidden size).
    pub hidden_size: usize,
    /// adaLN layers (4).
    pub head_layers: usize,
    /// FFN width: `int(hidden_size * head_ffn_ratio)` (ratio 3.0).
    pub ffn_dim: usize,
    /// RMSNorm epsilon (1e-5).
    pub rms_norm_eps: f64,
    /// Latent size (the acoustic vae_dim, 64).
    pub latent_size: usize,
    /// Training timesteps of the cosine schedule (1000).
    pub ddpm_num_steps: usize,
    /// The configuration's default sampling steps (20; the demos use 10).
    pub ddpm_num_inference_steps: usize,
}

/// Width of the sinusoidal timestep embedding.
pub const FREQUENCY_EMBEDDING_SIZE: usize = 256;

impl DiffusionHeadConfig {
    /// The real head for a language model of width `hidden_size`.
    pub fn real(hidden_size: usize) -> DiffusionHeadConfig {
        DiffusionHeadConfig {
            hidden_size,
            head_layers: 4,
            ffn_dim: hidden_size * 3,
            rms_norm_eps: 1e-5,
            latent_size: 64,
            ddpm_num_steps: 1000,
            ddpm_num_inference_steps: 20,
        }
    }

    /// Checks the sizes make a head.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("head_layers", self.head_layers),
            ("ffn_dim", self.ffn_dim),
            ("latent_size", self.latent_size),
            ("ddpm_num_steps", self.ddpm_num_steps),
        ];
        for (name, v) in dims {
            if v == 0 || v > super::config::MAX_DIMENSION {
                bail!("diffusion head: {name} {v} must be between 1 and 2^20");
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            bail!("diffusion head: rms_norm_eps must be zero or a small positive number");
        }
        Ok(())
    }
}

/// Every speech component's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeechConfig {
    /// Acoustic tokenizer (encoder and decoder).
    pub acoustic: TokenizerConfig,
    /// Semantic tokenizer (encoder only).
    pub semantic: TokenizerConfig,
    /// Diffusion head.
    pub head: DiffusionHeadConfig,
}

/// RMSNorm epsilon of the connectors (`LlamaRMSNorm(eps=1e-6)`, fixed in the original code).
pub const CONNECTOR_EPS: f64 = 1e-6;

impl SpeechConfig {
    /// The real components around a language model of width `hidden_size`.
    pub fn real(hidden_size: usize) -> SpeechConfig {
        SpeechConfig {
            acoustic: TokenizerConfig::real_acoustic(),
            semantic: TokenizerConfig::real_semantic(),
            head: DiffusionHeadConfig::real(hidden_size),
        }
    }

    /// Small components for test models around a language model of width `hidden_size`:
    /// tokenizers of hop 4 (ratios [2, 2], one block per stage, 4 filters), acoustic latents of
    /// 8 and semantic features of 6, a two-layer head. A full-size model's structure, kilobytes
    /// instead of gigabytes.
    pub fn small(hidden_size: usize) -> SpeechConfig {
        let stack = ConvStack {
            n_filters: 4,
            ratios: vec![2, 2],
            depths: vec![1, 1, 1],
        };
        let acoustic = TokenizerConfig {
            vae_dim: 8,
            encoder: stack.clone(),
            decoder: Some(stack),
            ..TokenizerConfig::real_acoustic()
        };
        SpeechConfig {
            semantic: TokenizerConfig {
                vae_dim: 6,
                decoder: None,
                fix_std: 0.0,
                ..acoustic.clone()
            },
            acoustic,
            head: DiffusionHeadConfig {
                head_layers: 2,
                latent_size: 8,
                ..DiffusionHeadConfig::real(hidden_size)
            },
        }
    }

    /// Checks every component, and that they agree with each other and the language model.
    pub fn validate(&self, hidden_size: usize) -> Result<()> {
        self.acoustic.validate("acoustic tokenizer")?;
        self.semantic.validate("semantic tokenizer")?;
        self.head.validate()?;
        if self.acoustic.decoder.is_none() {
            bail!("acoustic tokenizer: no decoder configuration");
        }
        if self.head.hidden_size != hidden_size {
            bail!(
                "diffusion head: hidden_size {} differs from the language model's {hidden_size}",
                self.head.hidden_size
            );
        }
        if self.head.latent_size != self.acoustic.vae_dim {
            bail!(
                "diffusion head: latent_size {} differs from the acoustic vae_dim {}",
                self.head.latent_size,
                self.acoustic.vae_dim
            );
        }
        if self.semantic.encoder.hop() != self.acoustic.encoder.hop() {
            bail!(
                "semantic tokenizer: hop {} differs from the acoustic one's {}",
                self.semantic.encoder.hop(),
                self.acoustic.encoder.hop()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_components_have_the_real_hop_and_widths() {
        let c = SpeechConfig::real(3584);
        c.validate(3584).unwrap();
        assert_eq!(c.acoustic.encoder.hop(), 3200);
        let enc = &c.acoustic.encoder;
        assert_eq!(enc.encoder_width(6), 2048);
        let dec = c.acoustic.decoder.as_ref().unwrap();
        assert_eq!((dec.decoder_width(0), dec.decoder_width(6)), (2048, 32));
        assert_eq!(c.head.ffn_dim, 10752);
    }

    #[test]
    fn mismatched_depths_are_refused() {
        let mut c = SpeechConfig::real(1536);
        c.semantic.encoder.depths.pop();
        let err = c.validate(1536).unwrap_err().to_string();
        assert!(
            err.contains("7 ratios") || err.contains("6 depths"),
            "{err}"
        );
    }
}
