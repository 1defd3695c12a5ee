//! Float8 scales: the names a weight's scale may have in each convention, what a decoder
//! layer's tensor is (one of the table's, the scale of one, or something else), and the
//! summary of a checkpoint's scales, checked against the weights they scale.

use super::header::TensorInfo;
use super::inventory::Part;
use crate::arch::qwen2::LayerTensor;
use crate::dtype::DType;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

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

/// Whether `name` is a float8 scale, an activation scale or the `scaled_fp8` marker: storage
/// a precision adds, not a tensor of the model.
pub fn is_scale_tensor(name: &str) -> bool {
    name == "scaled_fp8"
        || SCALE_SUFFIXES
            .iter()
            .chain(&INPUT_SCALE_SUFFIXES)
            .any(|s| name.strip_suffix(s).is_some_and(|stem| stem.ends_with('.')))
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

pub(crate) fn summarize_scales(tensors: &[(TensorInfo, Part)]) -> Result<ScaleSummary> {
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
