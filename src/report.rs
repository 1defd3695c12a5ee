//! What the commands report: serializable structs (the `--json` schema, documented in the
//! README) and their rendering as tables. Nothing here prints.

use crate::arch::config::ModelConfig;
use crate::checkpoint::inventory::{LayoutKind, Part, ScaleSummary};
use crate::checkpoint::{ConfigSource, ModelInfo};
use crate::gpu::GpuInfo;
use crate::plan::{self, presets, PlanOptions, VramEstimate};
use anyhow::Result;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / GIB)
}

fn table(header: Vec<&str>) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(header);
    t
}

fn align_numbers(t: &mut Table, from_column: usize) {
    let columns = t.column_count();
    for i in from_column..columns {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// The model a report is about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// File path or `built-in 7b float8`.
    pub source: String,
    /// Tensor naming.
    pub layout: LayoutKind,
    /// Where the configuration came from.
    pub config_source: ConfigSource,
    /// Decoder configuration.
    pub config: ModelConfig,
    /// Decoder layers.
    pub layers: usize,
    /// Bytes of the largest decoder layer.
    pub layer_bytes: u64,
    /// Bytes of all tensors.
    pub total_bytes: u64,
}

impl ModelSummary {
    /// Summarizes `model`.
    pub fn of(model: &ModelInfo) -> ModelSummary {
        ModelSummary {
            source: model.source.clone(),
            layout: model.inventory.layout,
            config_source: model.config_source.clone(),
            config: model.config.clone(),
            layers: model.inventory.num_layers(),
            layer_bytes: model
                .inventory
                .layer_bytes
                .iter()
                .copied()
                .max()
                .unwrap_or(0),
            total_bytes: model.inventory.total_bytes(),
        }
    }
}

/// How much VRAM the plan may use: free VRAM (read or given) times the target utilization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// The GPU, when NVML could read it.
    pub gpu: Option<GpuInfo>,
    /// Free VRAM planned against (`--vram`, else NVML's free memory).
    pub free_bytes: u64,
    /// Fraction of free VRAM the plan may use.
    pub target_utilization: f64,
    /// `free_bytes x target_utilization`.
    pub budget_bytes: u64,
}

impl Budget {
    /// A budget of `target_utilization` of `free_bytes`.
    pub fn new(gpu: Option<GpuInfo>, free_bytes: u64, target_utilization: f64) -> Budget {
        Budget {
            gpu,
            free_bytes,
            target_utilization,
            budget_bytes: (free_bytes as f64 * target_utilization) as u64,
        }
    }
}

/// One row of the VRAM table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableRow {
    /// Presets and aliases with this layer count.
    pub presets: Vec<String>,
    /// The estimate.
    #[serde(flatten)]
    pub estimate: VramEstimate,
    /// Whether it fits the budget, when there is one.
    pub fits: Option<bool>,
}

/// Which layer count a card of a common size can run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuClassRow {
    /// Card memory in GiB.
    pub vram_gib: u64,
    /// Example cards.
    pub examples: String,
    /// `vram_gib x target_utilization`, in bytes.
    pub budget_bytes: u64,
    /// The largest layer count that fits, if any.
    pub gpu_layers: Option<usize>,
    /// Its estimated VRAM.
    pub total_bytes: Option<u64>,
}

/// `vibeoffload table`: the estimate for each layer count, and which counts common GPUs run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableReport {
    /// `vibeoffload.table/1`.
    pub schema: String,
    /// The model.
    pub model: ModelSummary,
    /// Planning options.
    pub options: PlanOptions,
    /// This machine's budget, when known.
    pub budget: Option<Budget>,
    /// One row per layer count.
    pub rows: Vec<TableRow>,
    /// Common GPU sizes at the same target utilization.
    pub gpu_classes: Vec<GpuClassRow>,
}

impl TableReport {
    /// Estimates each of `layer_counts`; `target_utilization` also applies to the GPU classes.
    pub fn build(
        model: &ModelInfo,
        options: &PlanOptions,
        layer_counts: &[usize],
        budget: Option<Budget>,
        target_utilization: f64,
    ) -> Result<TableReport> {
        let num_layers = model.inventory.num_layers();
        let rows = layer_counts
            .iter()
            .map(|&n| {
                let estimate = plan::estimate(model, options, n)?;
                Ok(TableRow {
                    presets: presets::names_for(n, num_layers),
                    fits: budget
                        .as_ref()
                        .map(|b| estimate.total_bytes <= b.budget_bytes),
                    estimate,
                })
            })
            .collect::<Result<_>>()?;
        let gpu_classes = presets::presets()
            .gpus
            .iter()
            .map(|g| {
                let budget_bytes = ((g.vram_gib << 30) as f64 * target_utilization) as u64;
                let fit = plan::fit(model, options, budget_bytes)?;
                Ok(GpuClassRow {
                    vram_gib: g.vram_gib,
                    examples: g.examples.clone(),
                    budget_bytes,
                    gpu_layers: fit.as_ref().map(|e| e.gpu_layers),
                    total_bytes: fit.map(|e| e.total_bytes),
                })
            })
            .collect::<Result<_>>()?;
        Ok(TableReport {
            schema: "vibeoffload.table/1".into(),
            model: ModelSummary::of(model),
            options: options.clone(),
            budget,
            rows,
            gpu_classes,
        })
    }

    /// The report as text tables.
    pub fn render(&self) -> String {
        let mut out = model_line(&self.model, &self.options);
        let mut header = vec![
            "GPU layers",
            "preset",
            "context",
            "other weights",
            "layers",
            "stream slots",
            "KV cache",
            "working",
            "margin",
            "total GiB",
            "pinned host",
        ];
        if self.budget.is_some() {
            header.push("fits");
        }
        let mut t = table(header);
        for r in &self.rows {
            let e = &r.estimate;
            let mut row = vec![
                e.gpu_layers.to_string(),
                r.presets.join(", "),
                gib(e.cuda_context_bytes),
                gib(e.non_layer_weights_bytes),
                gib(e.resident_layers_bytes),
                gib(e.stream_buffers_bytes),
                gib(e.kv_cache_bytes),
                gib(e.working_bytes),
                gib(e.margin_bytes),
                gib(e.total_bytes),
                gib(e.pinned_host_bytes),
            ];
            if let Some(fits) = r.fits {
                row.push(if fits { "yes" } else { "no" }.into());
            }
            t.add_row(row);
        }
        align_numbers(&mut t, 2);
        out.push_str(&format!(
            "VRAM estimate in GiB, by decoder layers kept on the GPU\n{t}\n"
        ));
        if let Some(b) = &self.budget {
            out.push_str(&budget_line(b));
        }
        let mut g = table(vec![
            "card",
            "examples",
            "budget GiB",
            "GPU layers",
            "total GiB",
        ]);
        for c in &self.gpu_classes {
            g.add_row(vec![
                format!("{} GB", c.vram_gib),
                c.examples.clone(),
                gib(c.budget_bytes),
                c.gpu_layers
                    .map_or("does not fit".into(), |n| n.to_string()),
                c.total_bytes.map_or("-".into(), gib),
            ]);
        }
        align_numbers(&mut g, 2);
        let utilization = self.budget.as_ref().map_or(0.8, |b| b.target_utilization);
        out.push_str(&format!(
            "\nCommon GPUs at {:.0}% of their memory\n{g}\n",
            utilization * 100.0
        ));
        out
    }
}

/// A unit enum variant's JSON name (`config_json`), for text output.
fn snake<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn model_line(m: &ModelSummary, o: &PlanOptions) -> String {
    let scope = match o.scope {
        plan::Scope::Full => "full VibeVoice (LM, diffusion head, tokenizers; 2 KV caches for CFG)",
        plan::Scope::LanguageModel => "language model only",
    };
    format!(
        "model: {} ({} layers of {} bytes)\nplan: {scope}; batch {}, max {} tokens, {} placement, {} stream slots{}\n",
        m.source,
        m.layers,
        m.layer_bytes,
        o.batch,
        o.max_seq_len,
        o.placement,
        o.stream_slots,
        if o.offload_prediction_head { ", prediction head in host memory" } else { "" }
    )
}

fn budget_line(b: &Budget) -> String {
    let gpu = b.gpu.as_ref().map_or("--vram".to_string(), |g| {
        format!(
            "GPU {} {} ({} GiB total)",
            g.index,
            g.name,
            gib(g.total_bytes)
        )
    });
    format!(
        "budget: {:.0}% of {} GiB free on {gpu} = {} GiB\n",
        b.target_utilization * 100.0,
        gib(b.free_bytes),
        gib(b.budget_bytes)
    )
}

/// How the layer count was chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Choice {
    /// Binary search against the budget.
    Auto,
    /// A preset or alias.
    Preset {
        /// Its name.
        name: String,
    },
    /// `--num-gpu-layers`.
    NumGpuLayers,
    /// `--no-offload`.
    NoOffload,
}

/// `vibeoffload auto` and the flag forms that pick a layer count: the choice and its breakdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    /// `vibeoffload.plan/1`.
    pub schema: String,
    /// The model.
    pub model: ModelSummary,
    /// Planning options.
    pub options: PlanOptions,
    /// The budget, when known.
    pub budget: Option<Budget>,
    /// How the layer count was chosen.
    pub choice: Choice,
    /// The estimate for the chosen layer count.
    pub estimate: VramEstimate,
    /// Whether it fits the budget, when there is one.
    pub fits: Option<bool>,
    /// One sentence on why.
    pub reason: String,
}

impl PlanReport {
    /// The report as text.
    pub fn render(&self) -> String {
        let mut out = model_line(&self.model, &self.options);
        if let Some(b) = &self.budget {
            out.push_str(&budget_line(b));
        }
        let e = &self.estimate;
        out.push_str(&format!(
            "choice: {} of {} decoder layers on the GPU, {} streamed\n{}\n",
            e.gpu_layers, self.model.layers, e.offloaded_layers, self.reason
        ));
        let mut t = table(vec!["term", "bytes", "GiB"]);
        let w = &e.working;
        let terms = [
            ("CUDA context", e.cuda_context_bytes),
            ("non-layer weights", e.non_layer_weights_bytes),
            ("resident layers", e.resident_layers_bytes),
            ("stream slots", e.stream_buffers_bytes),
            ("KV cache", e.kv_cache_bytes),
            ("dequant scratch", w.dequant_scratch_bytes),
            ("activations", w.activations_bytes),
            ("attention scores", w.attention_scores_bytes),
            ("logits", w.logits_bytes),
            ("margin", e.margin_bytes),
            ("total VRAM", e.total_bytes),
            ("pinned host memory", e.pinned_host_bytes),
        ];
        for (name, bytes) in terms {
            t.add_row(vec![name.to_string(), bytes.to_string(), gib(bytes)]);
        }
        align_numbers(&mut t, 1);
        out.push_str(&format!("{t}\n"));
        out
    }
}

/// One group of non-layer tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRow {
    /// `embeddings`, `lm_head`, ...
    pub name: String,
    /// Tensors.
    pub tensors: usize,
    /// Elements.
    pub params: u64,
    /// Bytes.
    pub bytes: u64,
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
    /// The model.
    pub model: ModelSummary,
    /// File size (0 for built-in models).
    pub file_bytes: u64,
    /// JSON header length.
    pub header_bytes: u64,
    /// Tensors.
    pub tensors: usize,
    /// Elements of all tensors.
    pub params: u64,
    /// Bytes of each decoder layer.
    pub layer_bytes: Vec<u64>,
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
                params: inv.part_tensors(p).map(|t| t.numel()).sum(),
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
            model: ModelSummary::of(model),
            file_bytes,
            header_bytes,
            tensors: inv.tensors.len(),
            params: inv.tensors.iter().map(|(t, _)| t.numel()).sum(),
            layers_total_bytes: inv.layer_bytes.iter().sum(),
            layer_bytes: inv.layer_bytes.clone(),
            layer_tensors,
            groups,
            dtype_bytes,
            scales: inv.scales.clone(),
        }
    }

    /// The report as text.
    pub fn render(&self) -> String {
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
        let mut t = table(vec!["layer tensor", "dtype", "shape", "bytes"]);
        for r in &self.layer_tensors {
            t.add_row(vec![
                r.name.clone(),
                r.dtype.clone(),
                format!("{:?}", r.shape),
                r.bytes.to_string(),
            ]);
        }
        t.add_row(vec![
            "one layer".into(),
            String::new(),
            String::new(),
            m.layer_bytes.to_string(),
        ]);
        align_numbers(&mut t, 3);
        out.push_str(&format!(
            "\ndecoder: {per_layer} = {} bytes\n{t}\n",
            self.layers_total_bytes
        ));

        let mut g = table(vec!["part", "tensors", "parameters", "bytes", "GiB"]);
        g.add_row(vec![
            "decoder layers".into(),
            (self.layer_tensors.len() * self.layer_bytes.len()).to_string(),
            String::new(),
            self.layers_total_bytes.to_string(),
            gib(self.layers_total_bytes),
        ]);
        for r in self.groups.iter().filter(|r| r.tensors > 0) {
            g.add_row(vec![
                r.name.clone(),
                r.tensors.to_string(),
                r.params.to_string(),
                r.bytes.to_string(),
                gib(r.bytes),
            ]);
        }
        g.add_row(vec![
            "total".into(),
            self.tensors.to_string(),
            self.params.to_string(),
            m.total_bytes.to_string(),
            gib(m.total_bytes),
        ]);
        align_numbers(&mut g, 1);
        out.push_str(&format!("\n{g}\n"));
        out
    }
}

/// VRAM as measured during a run, beside the estimate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VramUse {
    /// Device bytes the engine allocated for weights and streaming slots.
    pub engine_weight_bytes: u64,
    /// Device bytes of the KV cache as allocated.
    pub engine_kv_cache_bytes: u64,
    /// GPU memory in use (all processes) before the engine started, per NVML.
    pub nvml_used_before_bytes: Option<u64>,
    /// Highest GPU memory in use seen after timed passes, per NVML.
    pub nvml_used_peak_bytes: Option<u64>,
    /// `nvml_used_peak_bytes - nvml_used_before_bytes`: what this run took.
    pub measured_peak_bytes: Option<u64>,
}

/// One forward pass on given token ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForwardResult {
    /// The ids.
    pub input_ids: Vec<u32>,
    /// Sum of the final hidden states (f32), a quick fingerprint.
    pub hidden_sum: f64,
    /// The most likely next token after the last id, if the model has an LM head.
    pub next_token: u32,
    /// Where the dump was written.
    pub dump: Option<std::path::PathBuf>,
}

/// `vibeoffload run`: the engine's configuration, timings and transfer statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `vibeoffload.run/1`.
    pub schema: String,
    /// The model.
    pub model: ModelSummary,
    /// `cpu` or the GPU's name.
    pub device: String,
    /// Engine options.
    pub engine: crate::engine::EngineOptions,
    /// How the layer count was chosen.
    pub choice: Choice,
    /// The planner's estimate for this configuration (language model only).
    pub estimate: VramEstimate,
    /// Load time.
    pub load_ms: f64,
    /// Where load time went.
    pub load_phases: crate::engine::LoadTimings,
    /// Test-speed results (`--test-speed`).
    pub test_speed: Option<crate::run::TestSpeed>,
    /// Decode results (default mode).
    pub decode: Option<crate::run::Decode>,
    /// A single forward pass (`--input-ids`).
    pub forward: Option<ForwardResult>,
    /// VRAM measured.
    pub vram: VramUse,
}

impl RunReport {
    /// The report as text.
    pub fn render(&self) -> String {
        let e = &self.engine;
        let mut out = format!(
            "model: {} ({} layers of {} bytes)\nengine: {} on {}, {} layers resident ({} placement), {} streamed through {} slots, prefetch depth {}, {} host memory; loaded in {:.0} ms\n",
            self.model.source,
            self.model.layers,
            self.model.layer_bytes,
            match e.device {
                crate::engine::DeviceChoice::Cpu => "f32",
                crate::engine::DeviceChoice::Cuda(_) => "bf16",
            },
            self.device,
            e.gpu_layers,
            e.placement,
            self.model.layers - e.gpu_layers,
            e.slots.min(self.model.layers - e.gpu_layers),
            e.prefetch_depth,
            match (e.device, e.pin_memory) {
                (crate::engine::DeviceChoice::Cpu, _) => "ordinary",
                (_, true) => "pinned",
                (_, false) => "pageable",
            },
            self.load_ms
        );
        let p = &self.load_phases;
        out.push_str(&format!(
            "load: device {:.0} ms, pin {:.0} ms, read {:.0} ms, upload {:.0} ms\n",
            p.device_ms, p.pin_ms, p.read_ms, p.upload_ms
        ));
        let transfer = if let Some(t) = &self.test_speed {
            let runs: Vec<String> = t.runs_ms.iter().map(|ms| format!("{ms:.1}")).collect();
            out.push_str(&format!(
                "test-speed: {} tokens, {} warm-up; runs {} ms; average {:.2} ms; avg transfer per layer {:.2} ms; estimated overhead {:.1}%{}\n",
                t.tokens,
                t.warmup_runs,
                runs.join(", "),
                t.avg_ms,
                t.transfer.avg_transfer_time_ms,
                t.estimated_overhead_pct,
                match (t.gpu_ms, t.host_ms) {
                    (Some(g), Some(h)) =>
                        format!("; a pass costs the GPU {g:.2} ms, the host {h:.2} ms to queue"),
                    _ => String::new(),
                }
            ));
            Some(&t.transfer)
        } else if let Some(d) = &self.decode {
            out.push_str(&format!(
                "decode: batch {}, {} prompt tokens, {} generated; time to first token {:.1} ms; {:.2} ms/token ({:.1} tokens/s){}\n",
                d.batch,
                d.prompt_tokens,
                d.generated_tokens,
                d.ttft_ms,
                d.ms_per_token,
                d.tokens_per_s,
                match (d.gpu_ms_per_token, d.host_ms_per_token) {
                    (Some(g), Some(h)) =>
                        format!("; a step costs the GPU {g:.2} ms, the host {h:.2} ms to queue"),
                    _ => String::new(),
                }
            ));
            Some(&d.transfer)
        } else {
            None
        };
        if let Some(f) = &self.forward {
            out.push_str(&format!(
                "forward: {} tokens; sum of final hidden states {:.6}; next token {}{}\n",
                f.input_ids.len(),
                f.hidden_sum,
                f.next_token,
                f.dump
                    .as_ref()
                    .map_or(String::new(), |p| format!("; dumped to {}", p.display()))
            ));
        }
        if let Some(t) = transfer {
            let mut table = comfy_table::Table::new();
            table.load_style(UTF8_FULL_CONDENSED).set_header(vec![
                "transfers",
                "bytes",
                "copy ms",
                "avg ms/layer",
                "GB/s",
                "compute waited ms",
                "overlap %",
            ]);
            table.add_row(vec![
                t.total_transfers.to_string(),
                t.total_bytes.to_string(),
                format!("{:.2}", t.total_transfer_time_ms),
                format!("{:.3}", t.avg_transfer_time_ms),
                format!("{:.2}", t.achieved_gbps),
                format!("{:.2}", t.compute_wait_ms),
                format!("{:.1}", t.overlap_pct),
            ]);
            align_numbers(&mut table, 0);
            out.push_str(&format!("{table}\n"));
        }
        let v = &self.vram;
        out.push_str(&format!(
            "VRAM: estimate {} GiB; engine weights + slots {} GiB, KV cache {} GiB{}\n",
            gib(self.estimate.total_bytes),
            gib(v.engine_weight_bytes),
            gib(v.engine_kv_cache_bytes),
            v.measured_peak_bytes.map_or(String::new(), |m| format!(
                "; measured peak (NVML) {} GiB",
                gib(m)
            ))
        ));
        out
    }
}

impl crate::run::BenchReport {
    /// The report as a table.
    pub fn render(&self) -> String {
        let mut out = format!(
            "model: {} ({} layers of {} bytes) on {}\npinned host-to-device bandwidth: {}; device-memory bandwidth: {}\nprefill {} tokens; decode {} tokens after a {}-token prompt, batch {}\n",
            self.model.source,
            self.model.layers,
            self.model.layer_bytes,
            self.device,
            self.pinned_gbps.map_or("not measured (CPU)".into(), |g| format!("{g:.1} GB/s")),
            self.device_gbps.map_or("not measured (CPU)".into(), |g| format!("{g:.0} GB/s")),
            self.prompt_len,
            self.gen_tokens,
            self.prompt_len,
            self.batch
        );
        let mut t = table(vec![
            "GPU layers",
            "load s",
            "prefill ms",
            "ms/token",
            "tokens/s",
            "GPU ms",
            "host ms",
            "bound ms",
            "vs bound",
            "GB/s",
            "of pinned",
            "overlap %",
            "estimate GiB",
            "measured GiB",
            "error %",
        ]);
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        for r in &self.rows {
            t.add_row(vec![
                r.gpu_layers.to_string(),
                format!("{:.1}", r.load_ms / 1e3),
                format!("{:.2}", r.test_speed_ms),
                format!("{:.2}", r.decode_ms_per_token),
                format!("{:.1}", r.tokens_per_s),
                opt(r.decode_gpu_ms_per_token, 2),
                opt(r.decode_host_ms_per_token, 2),
                opt(r.bound_ms_per_token, 2),
                opt(r.vs_bound, 2),
                format!("{:.1}", r.achieved_gbps),
                opt(r.pinned_fraction, 2),
                format!("{:.1}", r.overlap_pct),
                gib(r.estimate_bytes),
                r.measured_peak_bytes.map_or("-".into(), gib),
                opt(r.estimate_error_pct, 1),
            ]);
        }
        align_numbers(&mut t, 0);
        out.push_str(&format!("{t}\n"));
        out
    }
}

/// Draws decode ms/token and VRAM (estimate beside measurement) against GPU layers as an SVG.
pub fn plot_bench(report: &crate::run::BenchReport, path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let tmp = crate::temp_file_beside(path)?;
    {
        let root = SVGBackend::new(tmp.path(), (1000, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(500);
        let layers = report.model.layers as i32;
        let max_ms = report
            .rows
            .iter()
            .map(|r| {
                r.decode_ms_per_token
                    .max(r.bound_ms_per_token.unwrap_or(0.0))
            })
            .fold(0.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&left)
            .caption("decode ms/token", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0..layers, 0.0..max_ms.max(1e-3))?;
        chart
            .configure_mesh()
            .x_desc("GPU layers")
            .y_desc("ms/token")
            .draw()?;
        let points = |f: &dyn Fn(&crate::run::BenchRow) -> Option<f64>| -> Vec<(i32, f64)> {
            let mut v: Vec<(i32, f64)> = report
                .rows
                .iter()
                .filter_map(|r| f(r).map(|y| (r.gpu_layers as i32, y)))
                .collect();
            v.sort_by_key(|p| p.0);
            v
        };
        chart
            .draw_series(LineSeries::new(
                points(&|r| Some(r.decode_ms_per_token)),
                BLUE.stroke_width(2),
            ))?
            .label("measured")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(
                points(&|r| r.bound_ms_per_token),
                BLACK.stroke_width(1),
            ))?
            .label("bound")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
        chart.configure_series_labels().border_style(BLACK).draw()?;

        let to_gib = |b: u64| b as f64 / GIB;
        let max_gib = report
            .rows
            .iter()
            .map(|r| to_gib(r.estimate_bytes).max(r.measured_peak_bytes.map_or(0.0, to_gib)))
            .fold(0.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&right)
            .caption("VRAM", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0..layers, 0.0..max_gib.max(1e-3))?;
        chart
            .configure_mesh()
            .x_desc("GPU layers")
            .y_desc("GiB")
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                points(&|r| Some(to_gib(r.estimate_bytes))),
                RED.stroke_width(2),
            ))?
            .label("estimate")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart
            .draw_series(LineSeries::new(
                points(&|r| r.measured_peak_bytes.map(to_gib)),
                GREEN.stroke_width(2),
            ))?
            .label("measured (NVML)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
        chart.configure_series_labels().border_style(BLACK).draw()?;
        root.present()?;
    }
    tmp.persist(path)?;
    Ok(())
}
