//! `vibeoffload inspect`: what a checkpoint holds, from its header alone.

use super::{snake, Columns, Render};
use crate::checkpoint::header::TensorInfo;
use crate::checkpoint::inventory::Part;
use crate::checkpoint::scales::{is_scale_tensor, ScaleSummary};
use crate::checkpoint::summary::ModelSummary;
use crate::checkpoint::ModelInfo;
use crate::units::gib;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One group of non-layer tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRow {
    /// `embeddings`, `final_norm`, `lm_head`, `acoustic_encoder`, `acoustic_decoder`,
    /// `semantic_encoder`, `acoustic_connector`, `semantic_connector`, `prediction_head`,
    /// `scalars`, `other`.
    pub name: String,
    /// Tensors (float8 scales included).
    pub tensors: usize,
    /// Parameters: elements of the model's tensors (float8 scales, which a precision adds,
    /// are not counted).
    pub params: u64,
    /// Bytes (float8 scales included).
    pub bytes: u64,
}

/// Parameters of `tensors`: their elements, float8 scales left out.
fn params<'a>(tensors: impl IntoIterator<Item = &'a TensorInfo>) -> u64 {
    tensors
        .into_iter()
        .filter(|t| !is_scale_tensor(&t.name))
        .map(TensorInfo::numel)
        .sum()
}

/// One tensor of a decoder layer (the same in every layer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerTensorRow {
    /// Name relative to `layers.{i}.`.
    pub name: String,
    /// Element type.
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Bytes in one layer.
    pub bytes: u64,
}

/// `vibeoffload inspect`: what a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InspectReport {
    /// `vibeoffload.inspect/1`.
    pub schema: String,
    /// The tool that wrote it: version and commit (older files: empty).
    #[serde(default)]
    pub tool: String,
    /// The model.
    pub model: ModelSummary,
    /// File size, of all shards for a sharded checkpoint (0 for built-in models).
    pub file_bytes: u64,
    /// JSON header length (summed over shards).
    pub header_bytes: u64,
    /// The shard files of a Hugging Face sharded checkpoint, in order (empty for one file).
    #[serde(default)]
    pub shards: Vec<String>,
    /// Tensors.
    pub tensors: usize,
    /// Parameters of the whole model (float8 scales not counted).
    pub params: u64,
    /// Bytes of each decoder layer.
    pub layer_bytes: Vec<u64>,
    /// Parameters of all decoder layers (older reports: 0).
    #[serde(default)]
    pub layers_params: u64,
    /// Bytes of all decoder layers.
    pub layers_total_bytes: u64,
    /// The tensors of one decoder layer.
    pub layer_tensors: Vec<LayerTensorRow>,
    /// Non-layer groups.
    pub groups: Vec<GroupRow>,
    /// Bytes by element type.
    pub dtype_bytes: BTreeMap<String, u64>,
    /// Float8 scales found.
    pub scales: ScaleSummary,
}

impl InspectReport {
    /// Describes `model`.
    pub fn build(model: &ModelInfo) -> InspectReport {
        let inv = &model.inventory;
        let prefix = format!("{}layers.0.", inv.layout.lm_prefix());
        let layer_tensors = inv
            .part_tensors(Part::Layer(0))
            .map(|t| LayerTensorRow {
                name: t.name[prefix.len()..].to_string(),
                dtype: t.dtype.to_string(),
                shape: t.shape.clone(),
                bytes: t.size_bytes(),
            })
            .collect();
        let groups = Part::GROUPS
            .iter()
            .map(|&p| GroupRow {
                name: p.name().into(),
                tensors: inv.part_tensors(p).count(),
                params: params(inv.part_tensors(p)),
                bytes: inv.part_bytes(p),
            })
            .collect();
        let mut dtype_bytes = BTreeMap::new();
        for (t, _) in &inv.tensors {
            *dtype_bytes.entry(t.dtype.to_string()).or_default() += t.size_bytes();
        }
        let (file_bytes, header_bytes) = model
            .checkpoint
            .as_ref()
            .map_or((0, 0), |c| (c.file_bytes, c.header.header_bytes));
        InspectReport {
            schema: "vibeoffload.inspect/1".into(),
            tool: crate::TOOL.into(),
            model: ModelSummary::of(model),
            file_bytes,
            header_bytes,
            shards: model.checkpoint.as_ref().map_or(Vec::new(), |c| {
                c.shards().iter().map(|p| p.display().to_string()).collect()
            }),
            tensors: inv.tensors.len(),
            params: params(inv.tensors.iter().map(|(t, _)| t)),
            layers_params: (0..inv.num_layers())
                .map(|i| params(inv.part_tensors(Part::Layer(i))))
                .sum(),
            layers_total_bytes: inv.layer_bytes.iter().sum(),
            layer_bytes: inv.layer_bytes.clone(),
            layer_tensors,
            groups,
            dtype_bytes,
            scales: inv.scales.clone(),
        }
    }

    /// The lines above the tables: totals, configuration, scales, bytes by dtype.
    fn summary_lines(&self) -> String {
        let m = &self.model;
        let c = &m.config;
        let mut out = format!(
            "{}: {} tensors, {} parameters, {} bytes ({} GiB), header {} bytes\n\
             layout: {}; configuration from {}: hidden {}, intermediate {}, heads {} (kv {}, dim {}), \
             vocab {}, {} layers, tied embeddings: {}\n",
            m.source, self.tensors, self.params, m.total_bytes, gib(m.total_bytes), self.header_bytes,
            snake(&m.layout), snake(&m.config_source), c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.vocab_size, m.layers, c.tie_word_embeddings
        );
        if !self.shards.is_empty() {
            out.push_str(&format!(
                "sharded: {} files ({}), {} bytes\n",
                self.shards.len(),
                self.shards.join(", "),
                self.file_bytes
            ));
        }
        let s = &self.scales;
        out.push_str(&format!(
            "float8 scales: {}{}; {} scaled weights, {} float8 matrices without a scale (scale 1.0){}{}\n",
            s.convention,
            if s.granularity.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    s.granularity.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
                )
            },
            s.scaled_weights,
            s.unscaled_float8_matrices,
            if s.input_scales > 0 { format!(", {} input scales", s.input_scales) } else { String::new() },
            if s.scaled_fp8_marker { ", scaled_fp8 marker" } else { "" },
        ));
        let dtypes: Vec<String> = self
            .dtype_bytes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        out.push_str(&format!("bytes by dtype: {}\n", dtypes.join(", ")));
        if let Some(sp) = &m.speech {
            let (a, se, h) = (&sp.acoustic, &sp.semantic, &sp.head);
            out.push_str(&format!(
                "speech: acoustic latent {}, hop {} (encoder ratios {:?}, depths {:?}, {} filters{}); \
                 semantic features {} (ratios {:?}, depths {:?}); diffusion head {} layers, FFN {}\n",
                a.vae_dim,
                a.encoder.hop(),
                a.encoder.ratios,
                a.encoder.depths,
                a.encoder.n_filters,
                a.decoder.as_ref().map_or(String::new(), |d| format!(
                    "; decoder ratios {:?}, depths {:?}",
                    d.ratios, d.depths
                )),
                se.vae_dim,
                se.encoder.ratios,
                se.encoder.depths,
                h.head_layers,
                h.ffn_dim
            ));
        }
        out
    }
}

/// A line of the decoder-layer table.
struct TensorLine<'a> {
    name: &'a str,
    dtype: &'a str,
    shape: String,
    bytes: u64,
}

/// A line of the parts table.
struct PartLine<'a> {
    name: &'a str,
    tensors: usize,
    params: u64,
    bytes: u64,
}

impl Render for InspectReport {
    fn render(&self) -> String {
        let mut out = self.summary_lines();
        let m = &self.model;
        let uniform = self.layer_bytes.windows(2).all(|w| w[0] == w[1]);
        let per_layer = if uniform {
            format!(
                "{} layers x {} bytes",
                self.layer_bytes.len(),
                m.layer_bytes
            )
        } else {
            format!(
                "{} layers of {:?} bytes",
                self.layer_bytes.len(),
                self.layer_bytes
            )
        };
        let mut tensors: Vec<TensorLine> = self
            .layer_tensors
            .iter()
            .map(|r| TensorLine {
                name: &r.name,
                dtype: &r.dtype,
                shape: format!("{:?}", r.shape),
                bytes: r.bytes,
            })
            .collect();
        tensors.push(TensorLine {
            name: "one layer",
            dtype: "",
            shape: String::new(),
            bytes: m.layer_bytes,
        });
        let columns = Columns::<TensorLine>::new()
            .left("layer tensor", |t| t.name.to_string())
            .left("dtype", |t| t.dtype.to_string())
            .left("shape", |t| t.shape.clone())
            .right("bytes", |t| t.bytes.to_string());
        out.push_str(&format!(
            "\ndecoder: {per_layer} = {} bytes\n{}\n",
            self.layers_total_bytes,
            columns.table(&tensors)
        ));

        let mut parts = vec![PartLine {
            name: "decoder layers",
            tensors: self.layer_tensors.len() * self.layer_bytes.len(),
            params: self.layers_params,
            bytes: self.layers_total_bytes,
        }];
        let tied = m.config.tie_word_embeddings;
        parts.extend(
            self.groups
                .iter()
                .filter(|g| g.tensors > 0 || (g.name == "lm_head" && tied))
                .map(|g| PartLine {
                    name: if g.tensors == 0 {
                        "lm_head (tied to embeddings)"
                    } else {
                        &g.name
                    },
                    tensors: g.tensors,
                    params: g.params,
                    bytes: g.bytes,
                }),
        );
        parts.push(PartLine {
            name: "total",
            tensors: self.tensors,
            params: self.params,
            bytes: m.total_bytes,
        });
        let columns = Columns::<PartLine>::new()
            .left("part", |p| p.name.to_string())
            .right("tensors", |p| p.tensors.to_string())
            .right("parameters", |p| p.params.to_string())
            .right("bytes", |p| p.bytes.to_string())
            .right("GiB", |p| gib(p.bytes));
        out.push_str(&format!("\n{}\n", columns.table(&parts)));
        out
    }
}
