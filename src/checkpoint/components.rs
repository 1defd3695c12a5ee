//! The speech components in a checkpoint: their configuration inferred from the shapes when
//! there is no `config.json`, and every tensor checked against the configuration (present,
//! of the implied shape, and nothing unexplained under a component's prefix).

use super::inventory::{Inventory, Part};
use super::scales::is_scale_tensor;
use crate::arch::speech::{ConvStack, DiffusionHeadConfig, SpeechConfig, TokenizerConfig};
use crate::arch::vibevoice::{Component, SpeechFactor};
use anyhow::{bail, Result};
use std::collections::HashSet;

impl Inventory {
    fn shape_of(&self, name: &str) -> Option<&[u64]> {
        self.tensor(name).map(|t| t.shape.as_slice())
    }

    /// Blocks of each stage of the stack under `prefix`, `stages` stages.
    fn count_blocks(&self, prefix: &str, stages: usize) -> Vec<usize> {
        (0..stages)
            .map(|s| {
                (0..)
                    .take_while(|j| {
                        self.tensor(&format!("{prefix}stages.{s}.{j}.norm.weight"))
                            .is_some()
                    })
                    .count()
            })
            .collect()
    }

    /// Strides of the strided convolutions `{prefix}{i}.0.{conv}weight`, i = 1.. (kernel 2 x
    /// stride).
    fn count_ratios(&self, prefix: &str, conv: &str) -> Vec<usize> {
        (1..)
            .map_while(
                |i| match self.shape_of(&format!("{prefix}{i}.0.{conv}weight")) {
                    Some([_, _, k]) => Some((k / 2) as usize),
                    _ => None,
                },
            )
            .collect()
    }

    fn infer_encoder(&self, c: Component, real: &TokenizerConfig) -> TokenizerConfig {
        let p = c.prefix();
        let Some(&[filters, channels, _]) =
            self.shape_of(&format!("{p}downsample_layers.0.0.conv.conv.weight"))
        else {
            return real.clone();
        };
        let ratios = self.count_ratios(&format!("{p}downsample_layers."), "conv.conv.");
        let vae_dim = match self.shape_of(&format!("{p}head.conv.conv.weight")) {
            Some(&[v, _, _]) => v as usize,
            _ => real.vae_dim,
        };
        TokenizerConfig {
            vae_dim,
            channels: channels as usize,
            encoder: ConvStack {
                n_filters: filters as usize,
                depths: self.count_blocks(p, ratios.len() + 1),
                ratios,
            },
            ..real.clone()
        }
    }

    fn infer_decoder(&self, real: Option<&ConvStack>) -> Option<ConvStack> {
        let p = Component::AcousticDecoder.prefix();
        let Some(&[width, _, _]) =
            self.shape_of(&format!("{p}upsample_layers.0.0.conv.conv.weight"))
        else {
            return real.cloned();
        };
        let ratios = self.count_ratios(&format!("{p}upsample_layers."), "convtr.convtr.");
        // The stem's width halves once per ratio down to n_filters.
        let n_filters = u32::try_from(ratios.len())
            .ok()
            .and_then(|n| width.checked_shr(n))
            .unwrap_or(0) as usize;
        Some(ConvStack {
            n_filters,
            depths: self.count_blocks(p, ratios.len() + 1),
            ratios,
        })
    }

    /// The speech components' configuration implied by the shapes around a language model of
    /// width `hidden_size`; what the shapes do not tell (epsilons, the sampler's schedule, a
    /// component that is absent) is the real model's. [`Inventory::check_speech`] then holds
    /// the file to it.
    pub fn infer_speech(&self, hidden_size: usize) -> SpeechConfig {
        let real = SpeechConfig::real(hidden_size);
        let mut acoustic = self.infer_encoder(Component::AcousticEncoder, &real.acoustic);
        acoustic.decoder = self.infer_decoder(real.acoustic.decoder.as_ref());
        let semantic = self.infer_encoder(Component::SemanticEncoder, &real.semantic);
        let p = Component::PredictionHead.prefix();
        let head_layers = (0..)
            .take_while(|l| self.tensor(&format!("{p}layers.{l}.norm.weight")).is_some())
            .count();
        let ffn_dim = match self.shape_of(&format!("{p}layers.0.ffn.gate_proj.weight")) {
            Some(&[f, _]) => f as usize,
            _ => real.head.ffn_dim,
        };
        let latent_size = match self.shape_of(&format!("{p}noisy_images_proj.weight")) {
            Some(&[_, l]) => l as usize,
            _ => real.head.latent_size,
        };
        let head = DiffusionHeadConfig {
            head_layers: if head_layers == 0 {
                real.head.head_layers
            } else {
                head_layers
            },
            ffn_dim,
            latent_size,
            ..real.head
        };
        SpeechConfig {
            acoustic,
            semantic,
            head,
        }
    }

    /// Checks that every speech component's tensor has the shape `speech` implies around a
    /// language model of width `hidden_size`, that nothing else (but float8 scales) sits under
    /// a component's prefix, and that both speech factors are single values; names the first
    /// tensor that does not.
    pub fn check_speech(&self, hidden_size: usize, speech: &SpeechConfig) -> Result<()> {
        for f in SpeechFactor::ALL {
            match self.tensor(f.name()) {
                None => bail!("the checkpoint has no {} (a 0-d speech factor)", f.name()),
                Some(t) if t.numel() != 1 => bail!(
                    "tensor {} has shape {:?} but is a single value (shape [])",
                    t.name,
                    t.shape
                ),
                Some(_) => {}
            }
        }
        for c in Component::ALL {
            let expected = c.tensors(hidden_size, speech);
            for want in &expected {
                let Some(t) = self.tensor(&want.name) else {
                    bail!(
                        "the checkpoint has no {} ({} of the configured {})",
                        want.name,
                        c.name(),
                        describe(c, speech)
                    );
                };
                if t.shape != want.shape {
                    bail!(
                        "tensor {} has shape {:?} but the configuration implies {:?} ({})",
                        want.name,
                        t.shape,
                        want.shape,
                        describe(c, speech)
                    );
                }
                if !t.dtype.is_weight_type() {
                    bail!(
                        "tensor {} is {} but model weights must be F8_E4M3, BF16, F16 or F32",
                        want.name,
                        t.dtype
                    );
                }
            }
            let names: HashSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
            if let Some(extra) = self
                .part_tensors(Part::Speech(c))
                .find(|t| !names.contains(t.name.as_str()) && !is_scale_tensor(&t.name))
            {
                bail!(
                    "tensor {} is not part of the configured {} ({})",
                    extra.name,
                    c.name(),
                    describe(c, speech)
                );
            }
        }
        Ok(())
    }
}

/// The configuration of one component, for error messages.
fn describe(c: Component, speech: &SpeechConfig) -> String {
    let stack = |s: &ConvStack| {
        format!(
            "{} filters, ratios {:?}, depths {:?}",
            s.n_filters, s.ratios, s.depths
        )
    };
    match c {
        Component::AcousticEncoder => format!(
            "latent {}, {}",
            speech.acoustic.vae_dim,
            stack(&speech.acoustic.encoder)
        ),
        Component::AcousticDecoder => match &speech.acoustic.decoder {
            Some(d) => format!("latent {}, {}", speech.acoustic.vae_dim, stack(d)),
            None => "no decoder".into(),
        },
        Component::SemanticEncoder => format!(
            "features {}, {}",
            speech.semantic.vae_dim,
            stack(&speech.semantic.encoder)
        ),
        Component::AcousticConnector => format!("input {}", speech.acoustic.vae_dim),
        Component::SemanticConnector => format!("input {}", speech.semantic.vae_dim),
        Component::PredictionHead => format!(
            "{} layers, FFN {}, latent {}",
            speech.head.head_layers, speech.head.ffn_dim, speech.head.latent_size
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::config::BuiltinModel;
    use crate::checkpoint::header::TensorInfo;
    use crate::checkpoint::layout::{self, Precision, ScaleConvention, ScaleGranularity};

    fn tensors(speech: &SpeechConfig, precision: Precision) -> Vec<TensorInfo> {
        let c = BuiltinModel::Large7b.config();
        layout::tensor_infos(layout::vibevoice(&c, speech, precision))
    }

    #[test]
    fn shapes_give_back_the_configuration() {
        let real = SpeechConfig::real(3584);
        let scaled =
            Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel);
        for speech in [real, SpeechConfig::small(3584)] {
            let inv = Inventory::new(tensors(&speech, scaled)).unwrap();
            assert_eq!(inv.infer_speech(3584), speech);
            inv.check_speech(3584, &speech).unwrap();
        }
    }

    #[test]
    fn a_missing_misshapen_or_stray_tensor_is_named() {
        let speech = SpeechConfig::small(3584);
        let check = |edit: &dyn Fn(&mut Vec<TensorInfo>)| {
            let mut t = tensors(&speech, Precision::BF16);
            edit(&mut t);
            let inv = Inventory::new(t).unwrap();
            format!("{:#}", inv.check_speech(3584, &speech).unwrap_err())
        };
        let gamma = "model.acoustic_tokenizer.decoder.stages.2.0.gamma";
        let e = check(&|t| t.retain(|t| t.name != gamma));
        assert!(e.contains(&format!("no {gamma} (acoustic_decoder")), "{e}");
        let head = "model.semantic_tokenizer.encoder.head.conv.conv.weight";
        let e = check(&|t| t.iter_mut().find(|t| t.name == head).unwrap().shape = vec![7, 16, 7]);
        assert!(
            e.contains(&format!("tensor {head} has shape [7, 16, 7]")),
            "{e}"
        );
        let e = check(&|t| {
            let mut extra = t[10].clone();
            extra.name = "model.prediction_head.layers.2.norm.weight".into();
            t.push(extra);
        });
        assert!(
            e.contains("is not part of the configured prediction_head"),
            "{e}"
        );
        let e = check(&|t| t.retain(|t| t.name != "model.speech_bias_factor"));
        assert!(e.contains("no model.speech_bias_factor"), "{e}");
    }
}
