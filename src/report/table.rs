//! `vibeoffload table`: the estimate for each layer count, and which counts common GPUs run.

use super::{budget_line, model_line, Columns, Render};
use crate::checkpoint::summary::ModelSummary;
use crate::checkpoint::ModelInfo;
use crate::plan::budget::Budget;
use crate::plan::calibration::Machine;
use crate::plan::speed::{self, Rates};
use crate::plan::{self, presets, PlanOptions, Scope, VramEstimate};
use crate::units::gib;
use anyhow::Result;
use serde::{Deserialize, Serialize};

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
    /// Predicted ms per decode step on the calibrated machine, when a calibration was found.
    #[serde(default)]
    pub predicted_ms_per_token: Option<f64>,
}

/// Where `table`'s predicted speeds come from: a calibration's rates at the plan's batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Predicted {
    /// The machine the calibration was measured on.
    pub machine: Machine,
    /// When, seconds since the Unix epoch.
    pub measured_unix_s: u64,
    /// Its rates at `batch`.
    pub rates: Rates,
    /// Rows decoded together: the plan's batch, or the CFG pair's 2 for full VibeVoice.
    pub batch: usize,
    /// Copies issued this many layers ahead, as the engine does by default.
    pub prefetch_depth: usize,
    /// Each row takes the split predicted fastest (`--cpu-layers auto`).
    pub auto_cpu_layers: bool,
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
    /// The tool that wrote it: version and commit (older files: empty).
    #[serde(default)]
    pub tool: String,
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
    /// The rates behind the rows' predicted speeds, when a calibration was found.
    #[serde(default)]
    pub predicted: Option<Predicted>,
}

impl TableReport {
    /// Estimates each of `layer_counts`, and predicts its speed where `predicted` gives the
    /// rates (each count with its fastest split where it says so); `target_utilization` also
    /// applies to the GPU classes.
    pub fn build(
        model: &ModelInfo,
        options: &PlanOptions,
        layer_counts: &[usize],
        budget: Option<Budget>,
        target_utilization: f64,
        predicted: Option<Predicted>,
    ) -> Result<TableReport> {
        let num_layers = model.inventory.num_layers();
        let auto = predicted.as_ref().is_some_and(|p| p.auto_cpu_layers);
        // Counts that leave fewer offloaded layers than the CPU is to compute are no choice.
        let rows = layer_counts
            .iter()
            .filter(|&&n| auto || n + options.cpu_layers <= num_layers)
            .map(|&n| {
                let mut options = options.clone();
                if let Some(p) = predicted.as_ref().filter(|p| p.auto_cpu_layers) {
                    let depth = p.prefetch_depth;
                    options.cpu_layers =
                        speed::best_cpu_layers(model, &options, n, depth, &p.rates).0;
                }
                let estimate = plan::estimate(model, &options, n)?;
                Ok(TableRow {
                    presets: presets::names_for(n, num_layers),
                    fits: budget.as_ref().map(|b| b.fits(&estimate)),
                    predicted_ms_per_token: predicted
                        .as_ref()
                        .map(|p| speed::predict(model, &options, n, p.prefetch_depth, &p.rates)),
                    estimate,
                })
            })
            .collect::<Result<_>>()?;
        let gpu_classes = presets::presets()
            .gpus
            .iter()
            .map(|g| {
                let budget_bytes =
                    Budget::new(None, g.vram_gib << 30, target_utilization).budget_bytes;
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
            tool: crate::TOOL.into(),
            model: ModelSummary::of(model),
            options: options.clone(),
            budget,
            rows,
            gpu_classes,
            predicted,
        })
    }
}

impl Render for TableReport {
    fn render(&self) -> String {
        let mut out = model_line(&self.model, &self.options);
        let term = |get: fn(&VramEstimate) -> u64| move |r: &TableRow| gib(get(&r.estimate));
        // The CUDA context and the margin are the same in every row: said once, below.
        let mut columns = Columns::<TableRow>::new()
            .left("N", |r| r.estimate.gpu_layers.to_string())
            .left("preset", |r| r.presets.join(", "))
            .right("weights", term(|e| e.non_layer_weights_bytes))
            .right("layers", term(|e| e.resident_layers_bytes))
            .right("slots", term(|e| e.stream_buffers_bytes))
            .right("KV cache", term(|e| e.kv_cache_bytes))
            .right("working", term(|e| e.working_bytes))
            .right("total", term(|e| e.total_bytes))
            .right("pinned host", term(|e| e.pinned_host_bytes));
        if self.budget.is_some() {
            columns = columns.right("fits", |r| match r.fits {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => String::new(),
            });
        }
        if self.predicted.as_ref().is_some_and(|p| p.auto_cpu_layers) {
            columns = columns.right("CPU", |r| r.estimate.cpu_layers.to_string());
        }
        if self.predicted.is_some() {
            columns = columns.right("ms", |r| {
                r.predicted_ms_per_token
                    .map_or(String::new(), |ms| format!("{ms:.1}"))
            });
        }
        let first = self.rows.first().map(|r| &r.estimate);
        out.push_str(&format!(
            "VRAM estimate in GiB, by N decoder layers kept on the GPU (weights: the other \
             weights; slots: stream slots; pinned host: host memory for streamed layers)\n{}\n",
            columns.table(&self.rows)
        ));
        if let Some(e) = first {
            out.push_str(&format!(
                "every total includes {} GiB of CUDA context and a {} GiB margin\n",
                gib(e.cuda_context_bytes),
                gib(e.margin_bytes)
            ));
        }
        if let Some(b) = &self.budget {
            out.push_str(&budget_line(b));
        }
        if let Some(p) = &self.predicted {
            let cpu = match p.auto_cpu_layers {
                true => "CPU: the layers the host CPU computes, the split predicted fastest; ",
                false => "",
            };
            out.push_str(&format!(
                "{cpu}ms: a decode step of {} rows{} predicted from the calibration of {} \
                 measured {} (pinned copies {:.0} GB/s, host float8 products {:.0} GB/s)\n",
                p.batch,
                match self.options.scope {
                    Scope::Full => " (the CFG pair: one a frame)",
                    Scope::LanguageModel => "",
                },
                p.machine,
                super::utc_date(p.measured_unix_s),
                p.rates.pinned_gbps,
                p.rates.cpu_gbps,
            ));
        }
        let classes = Columns::<GpuClassRow>::new()
            .left("card", |c| format!("{} GB", c.vram_gib))
            .left("examples", |c| c.examples.clone())
            .right("budget GiB", |c| gib(c.budget_bytes))
            .right("GPU layers", |c| {
                c.gpu_layers
                    .map_or("does not fit".into(), |n| n.to_string())
            })
            .right("total GiB", |c| c.total_bytes.map_or("-".into(), gib));
        let utilization = self.budget.as_ref().map_or(0.8, |b| b.target_utilization);
        out.push_str(&format!(
            "\nCommon GPUs at {:.0}% of their memory\n{}\n",
            utilization * 100.0,
            classes.table(&self.gpu_classes)
        ));
        out
    }
}
