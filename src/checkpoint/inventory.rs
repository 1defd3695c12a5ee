//! What a checkpoint holds: tensors sorted into decoder layers and the model's other parts,
//! float8 scales recognised in every known convention, and the model configuration checked
//! against the shapes.

use super::header::TensorInfo;
use super::layout;
use super::scales::{scale_names, summarize_scales, ScaleSummary};
use crate::arch::config::ModelConfig;
use crate::arch::qwen2::LayerTensor;
use crate::arch::vibevoice::{Component, SpeechFactor, LM_PREFIX};
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Which naming the language model's tensors use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// `model.language_model.layers.{i}...` with VibeVoice's other parts.
    Vibevoice,
    /// A bare Qwen2: `model.layers.{i}...`.
    Qwen2,
}

impl LayoutKind {
    /// The prefix before `layers.`, `embed_tokens.` and `norm.`.
    pub fn lm_prefix(self) -> &'static str {
        match self {
            LayoutKind::Vibevoice => LM_PREFIX,
            LayoutKind::Qwen2 => "model.",
        }
    }
}

/// The part of the model a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// A decoder layer.
    Layer(usize),
    /// Token embedding.
    Embeddings,
    /// Final RMSNorm.
    FinalNorm,
    /// Output projection (absent when tied to the embedding).
    LmHead,
    /// A speech component (tokenizer encoders and decoder, connectors, diffusion head).
    Speech(Component),
    /// The two 0-d speech factors.
    Scalars,
    /// Anything else (markers, unknown tensors).
    Other,
}

impl Part {
    /// The non-layer parts, in the order they are listed.
    pub const GROUPS: [Part; 11] = [
        Part::Embeddings,
        Part::FinalNorm,
        Part::LmHead,
        Part::Speech(Component::AcousticEncoder),
        Part::Speech(Component::AcousticDecoder),
        Part::Speech(Component::SemanticEncoder),
        Part::Speech(Component::AcousticConnector),
        Part::Speech(Component::SemanticConnector),
        Part::Speech(Component::PredictionHead),
        Part::Scalars,
        Part::Other,
    ];

    /// Snake-case name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Part::Layer(_) => "decoder_layers",
            Part::Embeddings => "embeddings",
            Part::FinalNorm => "final_norm",
            Part::LmHead => "lm_head",
            Part::Speech(c) => c.name(),
            Part::Scalars => "scalars",
            Part::Other => "other",
        }
    }
}

/// A checkpoint's tensors, sorted into parts and checked for consistency.
#[derive(Clone, Debug)]
pub struct Inventory {
    /// Naming of the language model.
    pub layout: LayoutKind,
    /// Every tensor with its part, in data order.
    pub tensors: Vec<(TensorInfo, Part)>,
    /// Bytes of each decoder layer (scales included).
    pub layer_bytes: Vec<u64>,
    /// Bytes of each decoder layer packed into one buffer ([`layout::packed_layout`]): its
    /// pinned host copy and the slot it streams through.
    pub packed_layer_bytes: Vec<u64>,
    /// Float8 scale conventions found.
    pub scales: ScaleSummary,
    /// Indices into `tensors`: by name, and by part in data order (lookups stay cheap for
    /// models of thousands of layers).
    by_name: HashMap<String, usize>,
    by_part: BTreeMap<Part, Vec<usize>>,
}

/// More decoder layers than any model has: a larger index is a corrupt name.
pub const MAX_LAYERS: usize = 100_000;

impl Inventory {
    /// Sorts `tensors` into parts and checks that every decoder layer has the same complete set
    /// of tensors, that scales belong to float8 weights, and that the embedding and final norm
    /// exist.
    pub fn new(tensors: Vec<TensorInfo>) -> Result<Inventory> {
        let layout = if tensors
            .iter()
            .any(|t| t.name.starts_with("model.language_model.layers."))
        {
            LayoutKind::Vibevoice
        } else if tensors.iter().any(|t| t.name.starts_with("model.layers.")) {
            LayoutKind::Qwen2
        } else {
            bail!(
                "no decoder layers found: expected tensors named model.language_model.layers.{{i}}.* \
                 (VibeVoice) or model.layers.{{i}}.* (Qwen2)"
            );
        };
        let prefix = layout.lm_prefix();
        let mut classified = Vec::with_capacity(tensors.len());
        for t in tensors {
            let part = classify(&t.name, prefix)?;
            classified.push((t, part));
        }
        let tensors = classified;
        let layer_bytes = check_layers(&tensors, prefix)?;
        for (part, name) in [
            (Part::Embeddings, "embed_tokens.weight"),
            (Part::FinalNorm, "norm.weight"),
        ] {
            if !tensors.iter().any(|(_, p)| *p == part) {
                bail!("the checkpoint has no {prefix}{name}");
            }
        }
        let scales = summarize_scales(&tensors)?;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (t.name.clone(), i))
            .collect();
        let mut by_part: BTreeMap<Part, Vec<usize>> = BTreeMap::new();
        for (i, (_, part)) in tensors.iter().enumerate() {
            by_part.entry(*part).or_default().push(i);
        }
        let packed_layer_bytes = (0..layer_bytes.len())
            .map(|i| {
                let layer = by_part.get(&Part::Layer(i)).into_iter().flatten();
                layout::packed_layout(layer.map(|&t| &tensors[t].0)).1
            })
            .collect();
        Ok(Inventory {
            layout,
            tensors,
            layer_bytes,
            packed_layer_bytes,
            scales,
            by_name,
            by_part,
        })
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layer_bytes.len()
    }

    /// Tensors of one part.
    pub fn part_tensors(&self, part: Part) -> impl Iterator<Item = &TensorInfo> {
        self.by_part
            .get(&part)
            .into_iter()
            .flatten()
            .map(|&i| &self.tensors[i].0)
    }

    /// Decoder layer `layer`'s tensors, each with its name relative to `layers.{layer}.`.
    pub fn layer_tensors(&self, layer: usize) -> impl Iterator<Item = (&str, &TensorInfo)> {
        let prefix = self.layout.lm_prefix();
        self.part_tensors(Part::Layer(layer))
            .map(move |t| (relative_name(&t.name, prefix), t))
    }

    /// The float8 scale of the weight named `weight`, if it has one.
    pub fn scale_of(&self, weight: &str) -> Option<&TensorInfo> {
        scale_names(weight).find_map(|n| self.tensor(&n))
    }

    /// Bytes of one part.
    pub fn part_bytes(&self, part: Part) -> u64 {
        self.part_tensors(part).map(|t| t.size_bytes()).sum()
    }

    /// All tensor bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|(t, _)| t.size_bytes()).sum()
    }

    /// Looks a tensor up by its full name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i].0)
    }

    /// The model configuration implied by the shapes, where the shapes determine it. Head
    /// counts assume a head width of 128 (Qwen2), or 64 when 128 does not divide.
    pub fn infer_config(&self) -> Result<ModelConfig> {
        let p = self.layout.lm_prefix();
        let shape = |rest: &str| -> Vec<u64> {
            self.tensor(&format!("{p}{rest}"))
                .map(|t| t.shape.clone())
                .unwrap_or_default()
        };
        let embed = shape("embed_tokens.weight");
        let q = shape("layers.0.self_attn.q_proj.weight");
        let k = shape("layers.0.self_attn.k_proj.weight");
        let gate = shape("layers.0.mlp.gate_proj.weight");
        if embed.len() != 2 || q.len() != 2 || k.len() != 2 || gate.len() != 2 {
            bail!(
                "cannot infer the model configuration: embedding or layer 0 projections are not \
                 matrices; put a config.json beside the checkpoint"
            );
        }
        let head_dim = [128, 64]
            .into_iter()
            .find(|d| q[0] % d == 0 && k[0] % d == 0)
            .ok_or_else(|| {
                anyhow!(
                    "cannot infer attention heads from q_proj {q:?} and k_proj {k:?}; put a \
                     config.json beside the checkpoint"
                )
            })?;
        let config = ModelConfig {
            hidden_size: embed[1] as usize,
            intermediate_size: gate[0] as usize,
            num_attention_heads: (q[0] / head_dim) as usize,
            num_key_value_heads: (k[0] / head_dim) as usize,
            head_dim: head_dim as usize,
            num_hidden_layers: self.num_layers(),
            vocab_size: embed[0] as usize,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: self.part_bytes(Part::LmHead) == 0,
            max_position_embeddings: 32768,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that every language-model tensor has the shape `config` implies, naming the first
    /// tensor that does not.
    pub fn check_config(&self, config: &ModelConfig) -> Result<()> {
        let p = self.layout.lm_prefix();
        if config.num_hidden_layers != self.num_layers() {
            bail!(
                "the configuration says {} decoder layers but the checkpoint has {}",
                config.num_hidden_layers,
                self.num_layers()
            );
        }
        let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
        let v = config.vocab_size as u64;
        let mut expected: Vec<(String, Vec<u64>)> = vec![
            (format!("{p}embed_tokens.weight"), vec![v, h]),
            (format!("{p}norm.weight"), vec![h]),
        ];
        match self.tensor("lm_head.weight") {
            Some(_) => expected.push(("lm_head.weight".into(), vec![v, h])),
            None if !config.tie_word_embeddings => bail!(
                "the configuration says tie_word_embeddings is false but the checkpoint has no \
                 lm_head.weight"
            ),
            None => {}
        }
        for t in LayerTensor::ALL {
            // Layers were checked to match layer 0, so layer 0 speaks for all.
            expected.push((format!("{p}layers.0.{}", t.name()), t.shape(config)));
        }
        for (name, shape) in expected {
            let t = self
                .tensor(&name)
                .expect("presence checked when the inventory was built");
            if t.shape != shape {
                bail!(
                    "tensor {name} has shape {:?} but the configuration implies {shape:?} \
                     (hidden {h}, intermediate {i}, heads {}x{}, kv heads {}, vocab {v})",
                    t.shape,
                    config.num_attention_heads,
                    config.head_dim,
                    config.num_key_value_heads
                );
            }
            if !t.dtype.is_weight_type() {
                bail!(
                    "tensor {name} is {} but model weights must be F8_E4M3, BF16, F16 or F32",
                    t.dtype
                );
            }
        }
        Ok(())
    }
}

fn classify(name: &str, lm_prefix: &str) -> Result<Part> {
    if let Some(rest) = name.strip_prefix(lm_prefix) {
        if let Some(layer) = rest.strip_prefix("layers.") {
            let index = layer.split('.').next().unwrap_or_default();
            return Ok(Part::Layer(layer_index(name, index)?));
        }
        match rest {
            "embed_tokens.weight" => return Ok(Part::Embeddings),
            "norm.weight" => return Ok(Part::FinalNorm),
            _ => {}
        }
    }
    if name.starts_with("lm_head.") {
        return Ok(Part::LmHead);
    }
    if SpeechFactor::ALL.iter().any(|f| f.name() == name) {
        return Ok(Part::Scalars);
    }
    Ok(Component::of(name).map_or(Part::Other, Part::Speech))
}

/// The layer index `index` of tensor `name`: plain decimal digits without leading zeros, below
/// [`MAX_LAYERS`].
fn layer_index(name: &str, index: &str) -> Result<usize> {
    let plain = !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    match index.parse::<usize>() {
        Ok(i) if plain && i < MAX_LAYERS => Ok(i),
        Ok(_) if plain => bail!(
            "tensor {name}: layer index {index} is beyond any model ({MAX_LAYERS} layers); the              checkpoint is corrupt"
        ),
        _ => bail!(
            "tensor {name}: layer index {index:?} is not a plain decimal number; the checkpoint              is corrupt or not a VibeVoice/Qwen2 model"
        ),
    }
}

/// A decoder-layer tensor's name after `{prefix}layers.{i}.`.
fn relative_name<'a>(name: &'a str, prefix: &str) -> &'a str {
    name[prefix.len()..]
        .splitn(3, '.')
        .nth(2)
        .unwrap_or_default()
}

/// Checks every layer holds the same tensors (names relative to the layer, dtypes, shapes) and
/// all of [`LayerTensor::ALL`]; returns each layer's bytes.
fn check_layers(tensors: &[(TensorInfo, Part)], prefix: &str) -> Result<Vec<u64>> {
    let mut layers: BTreeMap<usize, BTreeMap<String, &TensorInfo>> = BTreeMap::new();
    for (t, part) in tensors {
        if let Part::Layer(i) = part {
            let rest = relative_name(&t.name, prefix).to_string();
            layers.entry(*i).or_default().insert(rest, t);
        }
    }
    let count = layers.keys().next_back().map_or(0, |&i| i + 1);
    if let Some(missing) = (0..count).find(|i| !layers.contains_key(i)) {
        bail!(
            "decoder layer {missing} is missing: the checkpoint has layers up to {} but no \
             tensor named {prefix}layers.{missing}.*",
            count - 1
        );
    }
    let reference = &layers[&0];
    for rest in LayerTensor::ALL.map(LayerTensor::name) {
        if !reference.contains_key(rest) {
            bail!("decoder layer 0 lacks {rest} (tensor {prefix}layers.0.{rest})");
        }
    }
    let mut bytes = Vec::with_capacity(count);
    for (i, layer) in &layers {
        for (rest, want) in reference {
            match layer.get(rest) {
                None => bail!(
                    "decoder layer {i} lacks {rest} (tensor {prefix}layers.{i}.{rest}), which layer 0 has"
                ),
                Some(t) if t.shape != want.shape || t.dtype != want.dtype => {
                    bail!(
                        "tensor {} is {} {:?} but layer 0's is {} {:?}: all decoder layers must match",
                        t.name, t.dtype, t.shape, want.dtype, want.shape
                    )
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = layer.keys().find(|r| !reference.contains_key(*r)) {
            bail!(
                "tensor {prefix}layers.{i}.{extra} has no counterpart in layer 0: all decoder layers must match"
            );
        }
        bytes.push(layer.values().map(|t| t.size_bytes()).sum());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::speech::SpeechConfig;
    use crate::checkpoint::layout::{self, Precision, ScaleConvention, ScaleGranularity};
    use crate::checkpoint::scales::{layer_entry, LayerEntry};
    use crate::dtype::DType;

    fn tensors(precision: Precision) -> Vec<TensorInfo> {
        let c = crate::arch::config::BuiltinModel::Small1_5b.config();
        let c = ModelConfig {
            num_hidden_layers: 2,
            ..c
        };
        let speech = SpeechConfig::small(c.hidden_size);
        layout::tensor_infos(layout::vibevoice(&c, &speech, precision))
    }

    fn error(tensors: Vec<TensorInfo>) -> String {
        format!("{:#}", Inventory::new(tensors).unwrap_err())
    }

    #[test]
    fn layer_indices_must_be_plain_and_bounded() {
        for (index, message) in [
            ("00", "layer index \"00\" is not a plain decimal number"),
            ("+1", "layer index \"+1\" is not a plain decimal number"),
            ("x", "layer index \"x\" is not a plain decimal number"),
            ("18446744073709551615", "is beyond any model"),
            ("100000", "is beyond any model"),
        ] {
            let mut t = tensors(Precision::Float8Plain);
            let renamed = t
                .iter_mut()
                .find(|t| t.name.contains("layers.1.mlp"))
                .unwrap();
            renamed.name = renamed
                .name
                .replace("layers.1.", &format!("layers.{index}."));
            let e = error(t);
            assert!(e.contains(message), "{index}: {e}");
        }
    }

    #[test]
    fn scales_on_vectors_are_refused() {
        let mut t = tensors(Precision::Float8Scaled(
            ScaleConvention::ScaleWeight,
            ScaleGranularity::PerChannel,
        ));
        // Every layer alike, so that only the scale can be wrong.
        let mut scales = Vec::new();
        for norm in t
            .iter_mut()
            .filter(|t| t.name.ends_with("input_layernorm.weight"))
        {
            norm.dtype = DType::F8E4M3;
            let mut scale = norm.clone();
            scale.name = norm.name.replace(".weight", ".scale_weight");
            scale.dtype = DType::F32;
            scale.shape = vec![];
            scales.push(scale);
        }
        t.extend(scales);
        let e = error(t);
        assert!(e.contains("only matrices are stored scaled"), "{e}");
    }

    #[test]
    fn lookups_by_name_part_and_scale() {
        let inv = Inventory::new(tensors(Precision::Float8Scaled(
            ScaleConvention::WeightScale,
            ScaleGranularity::PerChannel,
        )))
        .unwrap();
        let down = "model.language_model.layers.1.mlp.down_proj.weight";
        assert_eq!(inv.tensor(down).unwrap().name, down);
        assert_eq!(
            inv.scale_of(down).unwrap().name,
            "model.language_model.layers.1.mlp.down_proj.weight_scale"
        );
        let rel: Vec<&str> = inv.layer_tensors(1).map(|(rel, _)| rel).collect();
        assert!(rel.contains(&"mlp.down_proj.weight_scale"), "{rel:?}");
        assert_eq!(
            layer_entry("mlp.down_proj.weight_scale"),
            LayerEntry::Scale(LayerTensor::Down)
        );
        assert_eq!(layer_entry("mlp.down_proj.input_scale"), LayerEntry::Other);
    }
}
