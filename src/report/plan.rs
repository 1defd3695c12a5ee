//! `vibeoffload auto` and the flag forms that fix a layer count: the choice, whether it fits,
//! and its estimate term by term.

use super::{budget_line, model_line, Columns, Render};
use crate::checkpoint::summary::ModelSummary;
use crate::checkpoint::ModelInfo;
use crate::plan::budget::{Budget, Choice};
use crate::plan::{self, PlanOptions, VramEstimate};
use crate::units::gib;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// `vibeoffload auto` and the flag forms that pick a layer count: the choice and its breakdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    /// `vibeoffload.plan/1`.
    pub schema: String,
    /// The tool that wrote it: version and commit (older files: empty).
    #[serde(default)]
    pub tool: String,
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
    /// The largest layer count whose estimate fits `budget`, and what one more would need.
    pub fn auto(model: &ModelInfo, options: &PlanOptions, budget: Budget) -> Result<PlanReport> {
        let estimate = budget.largest_fit(model, options)?;
        let reason = if estimate.gpu_layers == model.inventory.num_layers() {
            format!(
                "every layer fits: {} GiB within the budget of {} GiB, so nothing is streamed",
                gib(estimate.total_bytes),
                gib(budget.budget_bytes)
            )
        } else {
            let next = plan::estimate(model, options, estimate.gpu_layers + 1)?;
            format!(
                "{} layers need {} GiB, within the budget of {} GiB; {} would need {} GiB",
                estimate.gpu_layers,
                gib(estimate.total_bytes),
                gib(budget.budget_bytes),
                estimate.gpu_layers + 1,
                gib(next.total_bytes)
            )
        };
        Ok(PlanReport::new(
            model,
            options,
            Some(budget),
            Choice::Auto,
            estimate,
            reason,
        ))
    }

    /// `gpu_layers` chosen by `choice`, checked against `budget` when there is one.
    pub fn fixed(
        model: &ModelInfo,
        options: &PlanOptions,
        budget: Option<Budget>,
        choice: Choice,
        gpu_layers: usize,
    ) -> Result<PlanReport> {
        let estimate = plan::estimate(model, options, gpu_layers)?;
        let reason = match &budget {
            Some(b) if b.fits(&estimate) => format!(
                "fits: the estimate is {} GiB, within the budget of {} GiB",
                gib(estimate.total_bytes),
                gib(b.budget_bytes)
            ),
            Some(b) => format!(
                "does NOT fit: the estimate is {} GiB, over the budget of {} GiB; try `vibeoffload --auto`",
                gib(estimate.total_bytes),
                gib(b.budget_bytes)
            ),
            None => "no GPU reading, so fit was not checked (pass --vram SIZE to check)".into(),
        };
        Ok(PlanReport::new(
            model, options, budget, choice, estimate, reason,
        ))
    }

    fn new(
        model: &ModelInfo,
        options: &PlanOptions,
        budget: Option<Budget>,
        choice: Choice,
        estimate: VramEstimate,
        reason: String,
    ) -> PlanReport {
        PlanReport {
            schema: "vibeoffload.plan/1".into(),
            tool: crate::TOOL.into(),
            model: ModelSummary::of(model),
            options: options.clone(),
            fits: budget.as_ref().map(|b| b.fits(&estimate)),
            budget,
            choice,
            estimate,
            reason,
        }
    }
}

impl Render for PlanReport {
    fn render(&self) -> String {
        let mut out = model_line(&self.model, &self.options);
        if let Some(b) = &self.budget {
            out.push_str(&budget_line(b));
        }
        let e = &self.estimate;
        let host = match e.cpu_layers {
            0 => String::new(),
            n => format!(" (the CPU computes {n} of them)"),
        };
        out.push_str(&format!(
            "choice: {} of {} decoder layers on the GPU, {} offloaded{host}\n{}\n",
            e.gpu_layers, self.model.layers, e.offloaded_layers, self.reason
        ));
        let w = &e.working;
        let terms = [
            ("CUDA context", e.cuda_context_bytes),
            ("non-layer weights", e.non_layer_weights_bytes),
            ("resident layers", e.resident_layers_bytes),
            ("stream slots", e.stream_buffers_bytes),
            ("KV cache", e.kv_cache_bytes),
            ("CPU layer's prefill upload", e.host_prefill_bytes),
            ("dequant scratch", w.dequant_scratch_bytes),
            ("product scratch", w.product_scratch_bytes),
            ("activations", w.activations_bytes),
            ("attention scores", w.attention_scores_bytes),
            ("logits", w.logits_bytes),
            ("speech working memory (if larger)", w.speech_bytes),
            ("margin", e.margin_bytes),
            ("total VRAM", e.total_bytes),
            ("pinned host memory", e.pinned_host_bytes),
            ("host memory of CPU layers", e.host_compute_bytes),
        ];
        let columns = Columns::<(&str, u64)>::new()
            .left("term", |&(name, _)| name.to_string())
            .right("bytes", |&(_, bytes)| bytes.to_string())
            .right("GiB", |&(_, bytes)| gib(bytes));
        out.push_str(&format!("{}\n", columns.table(&terms)));
        out
    }
}
