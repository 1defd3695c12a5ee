//! What a checkpoint holds: tensors sorted into decoder layers and the model's other parts,
//! float8 scales recognised in every known convention, and the model configuration checked
//! against the shapes.

use super::header::TensorInfo;
use super::layout;
use crate::arch::config::ModelConfig;
use crate::arch::qwen2::LayerTensor;
use crate::arch::vibevoice::LM_PREFIX;
use crate::dtype::DType;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// A decoder layer.
    Layer(usize),
    /// Token embedding.
    Embeddings,
    /// Final RMSNorm.
    FinalNorm,
    /// Output projection (absent when tied to the embedding).
    LmHead,
    /// Diffusion head.
    PredictionHead,
    /// Acoustic connector.
    AcousticConnector,
    /// Semantic connector.
    SemanticConnector,
    /// Acoustic tokenizer (encoder and decoder).
    AcousticTokenizer,
    /// Semantic tokenizer (encoder).
    SemanticTokenizer,
    /// Anything else (scalar factors, markers, unknown tensors).
    Other,
}

impl Part {
    /// The non-layer parts, in the order they are listed.
    pub const GROUPS: [Part; 9] = [
        Part::Embeddings,
        Part::FinalNorm,
        Part::LmHead,
        Part::PredictionHead,
        Part::AcousticConnector,
        Part::SemanticConnector,
        Part::AcousticTokenizer,
        Part::SemanticTokenizer,
        Part::Other,
    ];

    /// Snake-case name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Part::Layer(_) => "decoder_layers",
            Part::Embeddings => "embeddings",
            Part::FinalNorm => "final_norm",
            Part::LmHead => "lm_head",
            Part::PredictionHead => "prediction_head",
            Part::AcousticConnector => "acoustic_connector",
            Part::SemanticConnector => "semantic_connector",
            Part::AcousticTokenizer => "acoustic_tokenizer",
            Part::SemanticTokenizer => "semantic_tokenizer",
            Part::Other => "other",
        }
    }
}

/// How the float8 weights are scaled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleSummary {
    /// `none`, `scale_weight`, `weight_scale`, or `mixed`.
    pub convention: String,
    /// Weights that have a scale tensor.
    pub scaled_weights: usize,
    /// Float8 matrices with no scale (decoded with scale 1.0).
    pub unscaled_float8_matrices: usize,
    /// Scale tensors by granularity (`scalar`, `per_channel`, `blockwise`).
    pub granularity: BTreeMap<String, usize>,
    /// `scale_input` / `input_scale` tensors (activation scales; read but not needed).
    pub input_scales: usize,
    /// Whether the `scaled_fp8` marker tensor is present.
    pub scaled_fp8_marker: bool,
}

/// The suffixes that replace a weight's `weight` in its scale's name, in the order they are
/// looked up.
pub const SCALE_SUFFIXES: [&str; 2] = ["scale_weight", "weight_scale"];
const INPUT_SCALE_SUFFIXES: [&str; 2] = ["scale_input", "input_scale"];

/// The names the float8 scale of weight `weight` (`...q_proj.weight`) may have, one per
/// convention, in lookup order.
pub fn scale_names(weight: &str) -> impl Iterator<Item = String> + '_ {
    let stem = weight.strip_suffix("weight").unwrap_or(weight);
    SCALE_SUFFIXES.iter().map(move |s| format!("{stem}{s}"))
}

/// What a decoder layer's tensor is, by its name relative to `layers.{i}.`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerEntry {
    /// One of the layer's tensors.
    Tensor(LayerTensor),
    /// The float8 scale of one of its linear weights.
    Scale(LayerTensor),
    /// Anything else (activation scales).
    Other,
}

/// Classifies a decoder layer's tensor by its relative name.
pub fn layer_entry(rel: &str) -> LayerEntry {
    if let Some(t) = LayerTensor::from_name(rel) {
        return LayerEntry::Tensor(t);
    }
    LayerTensor::LINEARS
        .into_iter()
        .find(|t| scale_names(t.name()).any(|n| n == rel))
        .map_or(LayerEntry::Other, LayerEntry::Scale)
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
    let prefixed = [
        ("lm_head.", Part::LmHead),
        ("model.prediction_head.", Part::PredictionHead),
        ("model.acoustic_connector.", Part::AcousticConnector),
        ("model.semantic_connector.", Part::SemanticConnector),
        ("model.acoustic_tokenizer.", Part::AcousticTokenizer),
        ("model.semantic_tokenizer.", Part::SemanticTokenizer),
    ];
    Ok(prefixed
        .into_iter()
        .find(|(p, _)| name.starts_with(p))
        .map_or(Part::Other, |(_, part)| part))
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

fn summarize_scales(tensors: &[(TensorInfo, Part)]) -> Result<ScaleSummary> {
    let by_name: BTreeMap<&str, &TensorInfo> =
        tensors.iter().map(|(t, _)| (t.name.as_str(), t)).collect();
    let mut summary = ScaleSummary::default();
    let mut conventions = BTreeSet::new();
    let mut scaled_owners = BTreeSet::new();
    for (t, _) in tensors {
        if t.name == "scaled_fp8" {
            summary.scaled_fp8_marker = true;
            continue;
        }
        if INPUT_SCALE_SUFFIXES
            .iter()
            .any(|s| t.name.ends_with(&format!(".{s}")))
        {
            summary.input_scales += 1;
            continue;
        }
        let Some(suffix) = SCALE_SUFFIXES
            .iter()
            .find(|s| t.name.ends_with(&format!(".{s}")))
        else {
            continue;
        };
        let owner_name = format!("{}weight", &t.name[..t.name.len() - suffix.len()]);
        let Some(owner) = by_name.get(owner_name.as_str()) else {
            bail!(
                "scale tensor {} has no weight {owner_name} to scale",
                t.name
            );
        };
        if owner.dtype != DType::F8E4M3 {
            bail!(
                "scale tensor {} scales {owner_name}, which is {} rather than F8_E4M3",
                t.name,
                owner.dtype
            );
        }
        if owner.shape.len() != 2 {
            bail!(
                "scale tensor {} scales {owner_name} of shape {:?}: only matrices are stored \
                 scaled (norms and biases are read as they are), so this checkpoint's values \
                 would be misread",
                t.name,
                owner.shape
            );
        }
        if !matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!(
                "scale tensor {} is {}; scales must be F32, BF16 or F16",
                t.name,
                t.dtype
            );
        }
        let out = owner.shape.first().copied().unwrap_or(1);
        let granularity = match t.shape.as_slice() {
            [] | [1] => "scalar",
            [o] | [o, 1] if *o == out => "per_channel",
            [o, blocks, 1] if *o == out && owner.shape.get(1).is_some_and(|i| i % blocks == 0) => {
                "blockwise"
            }
            _ => bail!(
                "scale tensor {} has shape {:?}, which fits none of scalar [], [1], per channel \
                 [{out}] or [{out}, 1], or blockwise [{out}, blocks, 1] for weight {owner_name} {:?}",
                t.name, t.shape, owner.shape
            ),
        };
        *summary.granularity.entry(granularity.into()).or_default() += 1;
        conventions.insert(*suffix);
        scaled_owners.insert(owner_name);
    }
    summary.scaled_weights = scaled_owners.len();
    summary.unscaled_float8_matrices = tensors
        .iter()
        .filter(|(t, _)| {
            t.dtype == DType::F8E4M3 && t.shape.len() == 2 && !scaled_owners.contains(&t.name)
        })
        .count();
    summary.convention = match conventions.len() {
        0 => "none".into(),
        1 => conventions.into_iter().next().expect("one").to_string(),
        _ => "mixed".into(),
    };
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::vibevoice::VibeVoiceParts;
    use crate::checkpoint::layout::{self, Precision, ScaleConvention, ScaleGranularity};

    fn tensors(precision: Precision) -> Vec<TensorInfo> {
        let c = crate::arch::config::BuiltinModel::Small1_5b.config();
        let c = ModelConfig {
            num_hidden_layers: 2,
            ..c
        };
        layout::tensor_infos(layout::vibevoice(&c, &VibeVoiceParts::small(&c), precision))
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
