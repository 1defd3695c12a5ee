//! The speech components one generation needs, loaded together, and the voice prompt:
//! audio to acoustic latents to language-model inputs.

use crate::arch::speech::SpeechConfig;
use crate::rng::Rng;
use crate::speech::{gaussian_sample, Connector, Decoder, Encoder, PredictionHead, Scope};
use crate::speech::{DpmSolver, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// The checkpoint names of the two speech scalars.
const SCALING: &str = "model.speech_scaling_factor";
const BIAS: &str = "model.speech_bias_factor";

/// How the voice prompt's latents are taken from the acoustic encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoiceLatents {
    /// The encoder's mean: deterministic.
    Mean,
    /// The original's Gaussian sample (a random per-voice spread), drawn from this seed.
    Sample(u64),
}

/// VibeVoice's speech components, on one device in one compute dtype; the diffusion head
/// there too, or on the CPU in f32 (`--offload-prediction-head`, [`SpeechModel::load_with_head`]).
pub struct SpeechModel {
    /// Their configuration.
    pub config: SpeechConfig,
    /// Audio to acoustic latents (voice prompts).
    pub acoustic_encoder: Encoder,
    /// Acoustic latents to audio, streamed frame by frame.
    pub acoustic_decoder: Decoder,
    /// Audio to semantic features, streamed.
    pub semantic_encoder: Encoder,
    /// Acoustic latents to language-model inputs.
    pub acoustic_connector: Connector,
    /// Semantic features to language-model inputs.
    pub semantic_connector: Connector,
    /// The diffusion head, on [`SpeechModel::head_device`].
    pub head: PredictionHead,
    /// `features = (latent + bias) * scaling` into the connector, the inverse into the decoder.
    pub scaling: f64,
    /// See [`SpeechModel::scaling`].
    pub bias: f64,
    device: Device,
    dtype: DType,
    head_device: Device,
    head_dtype: DType,
}

impl SpeechModel {
    /// Loads every component from `source` (checkpoint names) for a language model of width
    /// `hidden_size`, on `device` in `dtype` (what `source` hands out).
    pub fn load(
        source: &dyn WeightSource,
        config: &SpeechConfig,
        hidden_size: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<SpeechModel> {
        Self::load_with_head(source, None, config, hidden_size, device, dtype)
    }

    /// [`SpeechModel::load`], with the diffusion head's weights from `cpu_head` when given: a
    /// source handing them out on the CPU in f32, where the head then runs (the other
    /// components stay on `device`; float8 linear weights stay float8 and are decoded at use).
    pub fn load_with_head(
        source: &dyn WeightSource,
        cpu_head: Option<&dyn WeightSource>,
        config: &SpeechConfig,
        hidden_size: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<SpeechModel> {
        config.validate(hidden_size)?;
        let decoder_config = config.acoustic.clone();
        let scope = |prefix: &str| Scope::new(source, prefix);
        let scalar = |name: &str| -> Result<f64> {
            let value = source
                .tensor(name, &[])?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if !value.is_finite() || (name == SCALING && value == 0.0) {
                bail!("{name} is {value}: a checkpoint needs a finite, non-zero speech scaling factor and a finite bias");
            }
            Ok(value)
        };
        Ok(SpeechModel {
            acoustic_encoder: Encoder::new(
                &config.acoustic,
                &scope("model.acoustic_tokenizer.encoder"),
            )?,
            acoustic_decoder: Decoder::new(
                &decoder_config,
                &scope("model.acoustic_tokenizer.decoder"),
            )?,
            semantic_encoder: Encoder::new(
                &config.semantic,
                &scope("model.semantic_tokenizer.encoder"),
            )?,
            acoustic_connector: Connector::new(
                &scope("model.acoustic_connector"),
                config.acoustic.vae_dim,
                hidden_size,
            )?,
            semantic_connector: Connector::new(
                &scope("model.semantic_connector"),
                config.semantic.vae_dim,
                hidden_size,
            )?,
            head: PredictionHead::new(
                &config.head,
                &Scope::new(cpu_head.unwrap_or(source), "model.prediction_head"),
            )?,
            scaling: scalar(SCALING)?,
            bias: scalar(BIAS)?,
            config: config.clone(),
            device: device.clone(),
            dtype,
            head_device: match cpu_head {
                Some(_) => Device::Cpu,
                None => device.clone(),
            },
            head_dtype: match cpu_head {
                Some(_) => DType::F32,
                None => dtype,
            },
        })
    }

    /// Where the diffusion head runs: the components' device, or the CPU when it was loaded
    /// from a source of its own ([`SpeechModel::load_with_head`]).
    pub fn head_device(&self) -> &Device {
        &self.head_device
    }

    /// `t` (a frame's conditions or noise) where the head runs, in its dtype.
    pub fn to_head(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_device(&self.head_device)?.to_dtype(self.head_dtype)?)
    }

    /// A latent the head sampled, back on the components' device in their dtype.
    pub fn from_head(&self, latent: &Tensor) -> Result<Tensor> {
        Ok(latent.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// The compute dtype of the components.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Samples per latent frame.
    pub fn hop(&self) -> usize {
        self.config.acoustic.encoder.hop()
    }

    /// The sampler for `steps` diffusion steps.
    pub fn solver(&self, steps: usize) -> Result<DpmSolver> {
        DpmSolver::new(self.config.head.ddpm_num_steps, steps)
    }

    /// A voice sample (24 kHz mono, normalised) as the language-model inputs of its
    /// placeholders: `[ceil(len / hop), hidden]`, the acoustic connector applied to the scaled
    /// latents (the original feeds voices through the acoustic path only).
    pub fn encode_voice(&self, samples: &[f32], latents: VoiceLatents) -> Result<Tensor> {
        if samples.is_empty() {
            bail!("a voice sample has no audio");
        }
        let audio = Tensor::from_slice(samples, (1, 1, samples.len()), &self.device)?
            .to_dtype(self.dtype)?;
        let frames = crate::plan::memory::VOICE_PIECE_FRAMES as usize;
        let mean = self
            .acoustic_encoder
            .encode_in_pieces(&audio, frames)
            .context("encoding a voice sample")?;
        let latent = match latents {
            VoiceLatents::Mean => mean,
            VoiceLatents::Sample(seed) => {
                let mut rng = Rng::new(seed);
                let draws = Tensor::from_vec(rng.normals(1), 1, &self.device)?;
                let noise =
                    Tensor::from_vec(rng.normals(mean.elem_count()), mean.dims(), &self.device)?
                        .to_dtype(mean.dtype())?;
                gaussian_sample(&mean, self.config.acoustic.fix_std, &draws, &noise)?
            }
        };
        let features = latent.affine(1.0, self.bias)?.affine(self.scaling, 0.0)?;
        Ok(self.acoustic_connector.forward(&features)?.squeeze(0)?)
    }

    /// The latent's audio input: `latent / scaling - bias` (a true division, as the
    /// original's, not a product with the reciprocal).
    pub fn unscale(&self, latent: &Tensor) -> Result<Tensor> {
        let scaling = Tensor::new(self.scaling as f32, &self.device)?.to_dtype(latent.dtype())?;
        Ok(latent.broadcast_div(&scaling)?.affine(1.0, -self.bias)?)
    }
}
