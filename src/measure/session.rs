//! The `run` command as a library function: load the model with the chosen layer count, then
//! decode, time the original's test-speed passes, or run one forward pass; measure VRAM beside
//! the planner's estimate.

use super::{load, random_ids, random_prompts, speed, taken_bytes, GpuProbe, ModelFile, Workload};
use crate::checkpoint::summary::ModelSummary;
use crate::engine::{self, EngineOptions, LoadTimings};
use crate::gpu;
use crate::plan::budget::{Budget, Choice};
use crate::plan::{self, PlanOptions, VramEstimate};
use crate::units::gib;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What a session does once the model is loaded.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// Prefill random prompts (one per sequence of the batch), then decode greedily.
    Decode,
    /// The original's test: timed forward passes over one random prompt.
    TestSpeed,
    /// One forward pass over `input_ids`; `dump` receives the hidden states and logits.
    Forward {
        /// The token ids.
        input_ids: Vec<u32>,
        /// Where to write the final hidden states and the last token's logits.
        dump: Option<PathBuf>,
    },
}

/// What `run` loads and measures.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Planner settings (language-model scope): the estimate, and the batch decoded.
    pub plan: PlanOptions,
    /// Engine settings, the layer count included.
    pub engine: EngineOptions,
    /// How the layer count was chosen.
    pub choice: Choice,
    /// The budget an automatic choice was made in.
    pub budget: Option<Budget>,
    /// What to run.
    pub mode: Mode,
    /// Prompt and generation lengths.
    pub workload: Workload,
    /// Fraction of free VRAM a plan may use: an out-of-memory error names the largest layer
    /// count that fits it.
    pub target_utilization: f64,
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
    pub dump: Option<PathBuf>,
}

/// `vibeoffload run`: the engine's configuration, timings and transfer statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `vibeoffload.run/1`.
    pub schema: String,
    /// The tool that wrote it: version and commit (older files: empty).
    #[serde(default)]
    pub tool: String,
    /// The model.
    pub model: ModelSummary,
    /// `cpu` or the GPU's name.
    pub device: String,
    /// Engine options.
    pub engine: EngineOptions,
    /// How the layer count was chosen.
    pub choice: Choice,
    /// The budget an automatic choice was made in (language-model scope).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// The planner's estimate for this configuration (language model only).
    pub estimate: VramEstimate,
    /// Load time.
    pub load_ms: f64,
    /// Where load time went.
    pub load_phases: LoadTimings,
    /// Test-speed results (`--test-speed`).
    pub test_speed: Option<speed::TestSpeed>,
    /// Decode results (default mode).
    pub decode: Option<speed::Decode>,
    /// A single forward pass (`--input-ids`).
    pub forward: Option<ForwardResult>,
    /// VRAM measured.
    pub vram: VramUse,
}

/// How far a session is, for a progress display.
#[derive(Clone, Debug)]
pub enum SessionProgress {
    /// Loading the model, phase by phase.
    Load(crate::engine::LoadProgress),
    /// `done` of `total` tokens of the timed decode generated (after its warm-up).
    Decode {
        /// Tokens generated.
        done: usize,
        /// Tokens to generate.
        total: usize,
    },
    /// `done` of `total` timed test-speed passes run (after the warm-up pass).
    TestSpeed {
        /// Passes run.
        done: usize,
        /// Passes to run.
        total: usize,
    },
}

/// Loads `model` as `o` says and runs its mode; `progress` is told how the load goes, then
/// how many tokens are decoded or passes run.
pub fn run_session(
    model: &ModelFile,
    o: &SessionOptions,
    mut progress: impl FnMut(SessionProgress),
) -> Result<RunReport> {
    let info = model.open()?;
    let gpu_layers = o.engine.gpu_layers;
    let estimate = plan::estimate(&info, &o.plan, gpu_layers)?;
    let probe = GpuProbe::of(o.engine.device);
    let nvml_before = probe.used_bytes();
    let device = probe.label();
    // What the planner says fits in this GPU's free memory, for an out-of-memory error.
    let largest_fit = match probe.free_bytes() {
        Some(free) => {
            let budget = Budget::new(None, free, o.target_utilization);
            plan::fit(&info, &o.plan, budget.budget_bytes)?.map(|e| e.gpu_layers)
        }
        None => None,
    };
    let hint = |e| oom_hint(e, &estimate, gpu_layers, largest_fit);
    let (mut engine, load_ms) =
        load(info, &o.engine, |p| progress(SessionProgress::Load(p))).map_err(hint)?;

    let sampler = probe.watch_peak();
    let vocab = engine.info().config.vocab_size;
    let w = &o.workload;
    let (mut test_speed, mut decode, mut forward) = (None, None, None);
    match &o.mode {
        Mode::Forward { input_ids, dump } => {
            let hidden = engine.forward(input_ids).map_err(hint)?;
            let last = hidden.get(input_ids.len() - 1)?;
            let logits = engine.logits(&last).map_err(hint)?;
            let next_token = logits.argmax(0)?.to_scalar::<u32>()?;
            let hidden_sum = hidden
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            if let Some(path) = dump {
                engine::dump(path, &hidden, Some(&logits))?;
            }
            forward = Some(ForwardResult {
                input_ids: input_ids.clone(),
                hidden_sum,
                next_token,
                dump: dump.clone(),
            });
        }
        Mode::TestSpeed => {
            let ids = random_ids(w.prompt_len, w.seed, vocab);
            let report = speed::test_speed_with(&mut engine, &ids, 1, w.runs, |done, total| {
                progress(SessionProgress::TestSpeed { done, total })
            });
            test_speed = Some(report.map_err(hint)?);
        }
        Mode::Decode => {
            let prompts = random_prompts(o.plan.batch as usize, w.prompt_len, w.seed, vocab);
            let report = speed::decode_with(&mut engine, &prompts, w.gen_tokens, |done, total| {
                progress(SessionProgress::Decode { done, total })
            });
            decode = Some(report.map_err(hint)?);
        }
    }
    let peak = sampler.map(gpu::PeakSampler::finish);
    let vram = VramUse {
        engine_weight_bytes: engine.device_weight_bytes(),
        engine_kv_cache_bytes: engine.kv_cache_bytes(),
        nvml_used_before_bytes: nvml_before,
        nvml_used_peak_bytes: peak,
        measured_peak_bytes: taken_bytes(nvml_before, peak),
    };
    if let Some(checkpoint) = &engine.info().checkpoint {
        checkpoint.check_unchanged()?;
    }
    Ok(RunReport {
        schema: "vibeoffload.run/1".into(),
        tool: crate::TOOL.into(),
        model: ModelSummary::of(engine.info()),
        device,
        engine: o.engine.clone(),
        choice: o.choice.clone(),
        budget: o.budget.clone(),
        estimate,
        load_ms,
        load_phases: engine.load_timings(),
        test_speed,
        decode,
        forward,
        vram,
    })
}

/// Adds to an out-of-memory error what was planned and the largest layer count the planner
/// says fits in the free memory read before loading.
fn oom_hint(
    e: anyhow::Error,
    estimate: &VramEstimate,
    gpu_layers: usize,
    largest_fit: Option<usize>,
) -> anyhow::Error {
    let text = format!("{e:#}");
    if !(text.contains("OUT_OF_MEMORY") || text.contains("out of memory")) {
        return e;
    }
    let advice = match largest_fit {
        Some(n) => {
            format!("the planner says {n} layers fit in the free memory: try --num-gpu-layers {n}")
        }
        None => "try fewer layers (`vibeoffload auto` says the largest N that fits)".into(),
    };
    anyhow::anyhow!(
        "{text}; the plan for {gpu_layers} GPU layers estimated {} GiB; {advice}",
        gib(estimate.total_bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::config::BuiltinModel;
    use crate::checkpoint::{CheckpointDtype, ModelInfo};

    #[test]
    fn out_of_memory_errors_say_what_fits() {
        let model = ModelInfo::builtin(BuiltinModel::Large7b, CheckpointDtype::Float8);
        let estimate = plan::estimate(&model, &PlanOptions::default(), 28).unwrap();
        let oom = anyhow::anyhow!("cannot upload model.language_model.layers.3.mlp.up_proj.weight (67895296 bytes) to the device: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let text = format!("{:#}", oom_hint(oom, &estimate, 28, Some(12)));
        assert!(text.contains("mlp.up_proj.weight"), "{text}");
        assert!(text.contains("28 GPU layers estimated 9.69 GiB"), "{text}");
        assert!(text.contains("try --num-gpu-layers 12"), "{text}");
        let other = oom_hint(anyhow::anyhow!("no such file"), &estimate, 28, Some(12));
        assert_eq!(format!("{other:#}"), "no such file");
    }
}
