//! VibeVoice around its language model: where the language model's tensors sit in a
//! checkpoint, the speech components and their prefixes, the two speech factors, and the full
//! tensor list in the original's order.

use super::config::ModelConfig;
use super::head::{connector_tensors, head_tensors};
use super::qwen2::LayerTensor;
use super::speech::SpeechConfig;
use super::tokenizer::{decoder_tensors, encoder_tensors};
use super::{Role, TensorDef};

/// Prefix of the language model's tensors in a VibeVoice checkpoint.
pub const LM_PREFIX: &str = "model.language_model.";

/// A speech component: a module of VibeVoice besides the language model, under one prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// Audio to acoustic latents (`model.acoustic_tokenizer.encoder.`).
    AcousticEncoder,
    /// Acoustic latents to audio (`model.acoustic_tokenizer.decoder.`).
    AcousticDecoder,
    /// Audio to semantic features (`model.semantic_tokenizer.encoder.`).
    SemanticEncoder,
    /// Acoustic latents to the language model's width.
    AcousticConnector,
    /// Semantic features to the language model's width.
    SemanticConnector,
    /// The diffusion head that samples the next latent.
    PredictionHead,
}

impl Component {
    /// Every component, in the original's order.
    pub const ALL: [Component; 6] = [
        Component::AcousticEncoder,
        Component::AcousticDecoder,
        Component::SemanticEncoder,
        Component::AcousticConnector,
        Component::SemanticConnector,
        Component::PredictionHead,
    ];

    /// The prefix of its tensors.
    pub fn prefix(self) -> &'static str {
        match self {
            Component::AcousticEncoder => "model.acoustic_tokenizer.encoder.",
            Component::AcousticDecoder => "model.acoustic_tokenizer.decoder.",
            Component::SemanticEncoder => "model.semantic_tokenizer.encoder.",
            Component::AcousticConnector => "model.acoustic_connector.",
            Component::SemanticConnector => "model.semantic_connector.",
            Component::PredictionHead => "model.prediction_head.",
        }
    }

    /// Snake-case name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Component::AcousticEncoder => "acoustic_encoder",
            Component::AcousticDecoder => "acoustic_decoder",
            Component::SemanticEncoder => "semantic_encoder",
            Component::AcousticConnector => "acoustic_connector",
            Component::SemanticConnector => "semantic_connector",
            Component::PredictionHead => "prediction_head",
        }
    }

    /// Its tensors (full names) around a language model of width `hidden_size`.
    pub fn tensors(self, hidden_size: usize, speech: &SpeechConfig) -> Vec<TensorDef> {
        let (p, h) = (self.prefix(), hidden_size as u64);
        match self {
            Component::AcousticEncoder => encoder_tensors(p, &speech.acoustic),
            Component::AcousticDecoder => match &speech.acoustic.decoder {
                Some(stack) => decoder_tensors(p, &speech.acoustic, stack),
                None => Vec::new(),
            },
            Component::SemanticEncoder => encoder_tensors(p, &speech.semantic),
            Component::AcousticConnector => connector_tensors(p, speech.acoustic.vae_dim as u64, h),
            Component::SemanticConnector => connector_tensors(p, speech.semantic.vae_dim as u64, h),
            Component::PredictionHead => head_tensors(p, &speech.head),
        }
    }

    /// The component a tensor belongs to, by its name's prefix.
    pub fn of(name: &str) -> Option<Component> {
        Component::ALL
            .into_iter()
            .find(|c| name.starts_with(c.prefix()))
    }
}

/// The two 0-d buffers that map acoustic latents to the diffusion head's space and back:
/// `features = (latent + bias) * scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpeechFactor {
    /// `model.speech_scaling_factor`.
    Scaling,
    /// `model.speech_bias_factor`.
    Bias,
}

impl SpeechFactor {
    /// Both, in the original's order.
    pub const ALL: [SpeechFactor; 2] = [SpeechFactor::Scaling, SpeechFactor::Bias];

    /// The tensor's name.
    pub fn name(self) -> &'static str {
        match self {
            SpeechFactor::Scaling => "model.speech_scaling_factor",
            SpeechFactor::Bias => "model.speech_bias_factor",
        }
    }

    /// The 1.5B model's value (two independent ports hard-code it; the 7B's is unpublished),
    /// which synthesized checkpoints carry; real checkpoints' own values are read from them.
    pub fn value(self) -> f32 {
        match self {
            SpeechFactor::Scaling => 0.196_289_06,
            SpeechFactor::Bias => -0.049_316_406,
        }
    }
}

/// Every tensor of a VibeVoice checkpoint, in the original's order: the speech factors, the
/// language model, the speech components, and the LM head unless it is tied.
pub fn tensors(config: &ModelConfig, speech: &SpeechConfig) -> Vec<TensorDef> {
    let h = config.hidden_size as u64;
    let v = config.vocab_size as u64;
    let mut out: Vec<TensorDef> = SpeechFactor::ALL
        .into_iter()
        .map(|f| TensorDef::new(f.name(), "", vec![], Role::Factor(f)))
        .collect();
    out.push(TensorDef::new(
        LM_PREFIX,
        "embed_tokens.weight",
        vec![v, h],
        Role::Embedding,
    ));
    for l in 0..config.num_hidden_layers {
        let p = format!("{LM_PREFIX}layers.{l}.");
        for t in LayerTensor::ALL {
            out.push(TensorDef::new(&p, t.name(), t.shape(config), t.role()));
        }
    }
    out.push(TensorDef::new(
        LM_PREFIX,
        "norm.weight",
        vec![h],
        Role::Norm,
    ));
    for c in Component::ALL {
        out.extend(c.tensors(config.hidden_size, speech));
    }
    if !config.tie_word_embeddings {
        out.push(TensorDef::new(
            "lm_head.",
            "weight",
            vec![v, h],
            Role::Linear,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::config::BuiltinModel;

    /// Every key and shape of the 7B model, dumped from the original code (the PyPI
    /// `vibevoice==0.0.1` modules instantiated empty from the shipped configuration).
    const ORIGINAL_7B: &str = include_str!("../../tests/data/vibevoice-7b-keys.txt");

    fn params(tensors: &[TensorDef], prefix: &str) -> u64 {
        tensors
            .iter()
            .filter(|t| t.name.starts_with(prefix))
            .map(TensorDef::numel)
            .sum()
    }

    #[test]
    fn seven_b_has_the_originals_keys_shapes_and_order() {
        let c = BuiltinModel::Large7b.config();
        let ours: Vec<String> = tensors(&c, &SpeechConfig::real(c.hidden_size))
            .iter()
            .map(|t| {
                let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
                format!("{} {}", t.name, dims.join("x"))
            })
            .collect();
        let mut original: Vec<&str> = ORIGINAL_7B.lines().collect();
        assert_eq!(ours.len(), 1205);
        // The original orders a decoder layer's tensors differently; everything else matches
        // in order too.
        let outside = |l: &&str| !l.starts_with("model.language_model.layers.");
        let ours_outside: Vec<&str> = ours.iter().map(String::as_str).filter(outside).collect();
        let original_outside: Vec<&str> = original.iter().copied().filter(outside).collect();
        assert_eq!(ours_outside, original_outside);
        let mut sorted: Vec<&str> = ours.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        original.sort_unstable();
        assert_eq!(sorted, original);
    }

    #[test]
    fn components_have_the_specs_parameter_counts() {
        for (model, connectors, head, total) in [
            (
                BuiltinModel::Large7b,
                (13_085_184, 13_314_560),
                669_333_504,
                9_343_355_363u64,
            ),
            (
                BuiltinModel::Small1_5b,
                (2_462_208, 2_560_512),
                123_279_360,
                2_704_021_987,
            ),
        ] {
            let c = model.config();
            let t = tensors(&c, &SpeechConfig::real(c.hidden_size));
            assert_eq!(params(&t, "model.acoustic_tokenizer.encoder."), 343_696_032);
            assert_eq!(params(&t, "model.acoustic_tokenizer.decoder."), 343_695_969);
            assert_eq!(params(&t, "model.semantic_tokenizer.encoder."), 344_613_600);
            let conn = (
                params(&t, "model.acoustic_connector."),
                params(&t, "model.semantic_connector."),
            );
            assert_eq!(conn, connectors, "{model:?}");
            assert_eq!(params(&t, "model.prediction_head."), head, "{model:?}");
            assert_eq!(params(&t, ""), total, "{model:?}");
            // 1,205 keys each; the 1.5B's LM head is tied to the embedding and not stored.
            let stored = if c.tie_word_embeddings { 1204 } else { 1205 };
            assert_eq!(t.len(), stored, "{model:?}");
        }
    }
}
