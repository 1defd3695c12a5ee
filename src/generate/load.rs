//! Loading the whole VibeVoice model: the language model through the engine, with a second
//! lane for the classifier-free-guidance pass, and the speech components; timed phase by
//! phase. `generate` loads it this way, and so does the original's flag form
//! (`vibeoffload --num-gpu-layers 8`), whose load report this module also builds.

use super::model::SpeechModel;
use crate::arch::vibevoice::Component;
use crate::checkpoint::header::TensorInfo;
use crate::checkpoint::inventory::Part;
use crate::checkpoint::summary::ModelSummary;
use crate::checkpoint::ModelInfo;
use crate::engine::{DeviceBytes, Engine, EngineOptions, LoadPhase, LoadProgress, LoadTimings};
use crate::measure::{
    random_ids, taken_bytes, test_speed, GpuProbe, ModelFile, TestSpeed, Workload,
};
use crate::plan::budget::{Budget, Choice};
use crate::plan::{self, PlanOptions, Scope, VramEstimate};
use crate::speech::{CheckpointWeights, WeightSource};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The whole model, loaded.
pub struct LoadedModel {
    /// The language model, with lanes 0 (positive) and 1 (negative) ready.
    pub engine: Engine,
    /// The speech components.
    pub speech: SpeechModel,
    /// Where load time went, the speech components included.
    pub timings: LoadTimings,
}

/// Loads `info`'s language model as `options` say, its CFG lane, and its speech components,
/// the diffusion head on the CPU in f32 when `offload_prediction_head`; `progress` hears each
/// phase.
pub fn load_model(
    info: ModelInfo,
    options: &EngineOptions,
    offload_prediction_head: bool,
    mut progress: impl FnMut(LoadProgress),
) -> Result<LoadedModel> {
    let Some(config) = info.speech.clone() else {
        bail!(
            "{} has no speech components: the whole model needs a VibeVoice checkpoint",
            info.source
        );
    };
    let started = Instant::now();
    let mut engine = Engine::load(info, options, &mut progress)?;
    engine.add_lane();
    let phase = Instant::now();
    progress(LoadProgress::start(LoadPhase::Speech));
    let info = engine.info();
    if let Some(checkpoint) = &info.checkpoint {
        checkpoint.page_in(speech_tensors(info), |done, total| {
            progress(LoadProgress {
                phase: LoadPhase::Speech,
                done,
                total,
            })
        });
    }
    let weights = CheckpointWeights::new(info, engine.device(), engine.dtype())?;
    let cpu_head = match offload_prediction_head {
        true => Some(CheckpointWeights::new(info, &Device::Cpu, DType::F32)?),
        false => None,
    };
    let speech = SpeechModel::load_with_head(
        &weights,
        cpu_head.as_ref().map(|w| w as &dyn WeightSource),
        &config,
        info.config.hidden_size,
        engine.device(),
        engine.dtype(),
    )?;
    engine.synchronize()?;
    let mut timings = engine.load_timings();
    timings.speech_ms = phase.elapsed().as_secs_f64() * 1e3;
    timings.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(LoadedModel {
        engine,
        speech,
        timings,
    })
}

/// Device bytes the loaded model holds, by the planner's terms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Allocated {
    /// The engine's weights and slots.
    pub engine: DeviceBytes,
    /// The speech components on the device as stored in the checkpoint (what they hold there,
    /// less their small vectors decoded to the compute dtype; the diffusion head not counted
    /// when it is offloaded to the CPU).
    pub speech_bytes: u64,
    /// Both lanes' KV caches, after a step filled them.
    pub kv_cache_bytes: u64,
}

/// What the original's flag form reports after loading the whole model: what is where, the
/// estimate beside what was allocated and what NVML saw, where load time went, and the speed
/// test when asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// `vibeoffload.load/1`.
    pub schema: String,
    /// The tool that wrote it: version and commit.
    pub tool: String,
    /// The model.
    pub model: ModelSummary,
    /// `cpu` or the GPU's name.
    pub device: String,
    /// What the plan covered: the whole model with both KV caches.
    pub plan: PlanOptions,
    /// The budget the choice was made in, when one was read.
    pub budget: Option<Budget>,
    /// How the layer count was chosen.
    pub choice: Choice,
    /// Engine options, the layer count included.
    pub engine: EngineOptions,
    /// The planner's estimate for this configuration.
    pub estimate: VramEstimate,
    /// What was allocated, term by term.
    pub allocated: Allocated,
    /// GPU memory in use before loading, per NVML (all processes).
    pub nvml_used_before_bytes: Option<u64>,
    /// What this process took after loading and one step of both lanes, per NVML.
    pub measured_loaded_bytes: Option<u64>,
    /// What this process took at its peak (the speed test included), per NVML.
    pub measured_peak_bytes: Option<u64>,
    /// Wall time of the load.
    pub load_ms: f64,
    /// Where it went.
    pub load_phases: LoadTimings,
    /// The original's speed test on the language model (`--test-speed`).
    pub test_speed: Option<TestSpeed>,
}

/// What [`load_report`] loads and runs.
pub struct LoadOptions {
    /// The plan (whole-model scope): its estimate and KV length.
    pub plan: PlanOptions,
    /// Engine settings, the layer count included.
    pub engine: EngineOptions,
    /// How the layer count was chosen.
    pub choice: Choice,
    /// The budget it was chosen in.
    pub budget: Option<Budget>,
    /// Run the speed test with this workload.
    pub test_speed: Option<Workload>,
}

/// Loads `model` whole as `o` says, runs one step of both lanes so that the KV caches exist,
/// then the speed test if asked; reports memory beside the estimate and the load's phases.
pub fn load_report(
    model: &ModelFile,
    o: &LoadOptions,
    progress: impl FnMut(LoadProgress),
) -> Result<LoadReport> {
    if o.plan.scope != Scope::Full {
        bail!("a whole-model load is planned in the whole-model scope");
    }
    let info = model.open()?;
    let estimate = plan::estimate(&info, &o.plan, o.engine.gpu_layers)?;
    let probe = GpuProbe::of(o.engine.device);
    let device = probe.label();
    let before = probe.used_bytes();
    let peak = probe.watch_peak();
    let started = Instant::now();
    // The speech components stay loaded to the end, so that NVML's peak counts them.
    let LoadedModel {
        mut engine,
        speech: _speech,
        timings,
    } = load_model(info, &o.engine, o.plan.offload_prediction_head, progress)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    // One token on each lane: every layer's KV cache is allocated at its full length.
    let token = engine.embed_ids(&[0])?;
    engine.forward_lanes(&[(0, &token), (1, &token)])?;
    engine.synchronize()?;
    let loaded = probe.used_bytes();
    let allocated = Allocated {
        engine: engine.device_bytes(),
        speech_bytes: speech_device_bytes(engine.info(), o.plan.offload_prediction_head),
        kv_cache_bytes: engine.kv_cache_bytes(),
    };
    let test_speed = match &o.test_speed {
        Some(w) => {
            engine.reset();
            let ids = random_ids(w.prompt_len, w.seed, engine.info().config.vocab_size);
            Some(test_speed(&mut engine, &ids, 1, w.runs)?)
        }
        None => None,
    };
    let peak = peak.map(crate::gpu::PeakSampler::finish);
    if let Some(checkpoint) = &engine.info().checkpoint {
        checkpoint.check_unchanged()?;
    }
    Ok(LoadReport {
        schema: "vibeoffload.load/1".into(),
        tool: crate::TOOL.into(),
        model: ModelSummary::of(engine.info()),
        device,
        plan: o.plan.clone(),
        budget: o.budget.clone(),
        choice: o.choice.clone(),
        engine: o.engine.clone(),
        estimate,
        allocated,
        nvml_used_before_bytes: before,
        measured_loaded_bytes: taken_bytes(before, loaded),
        measured_peak_bytes: taken_bytes(before, peak),
        load_ms,
        load_phases: timings,
        test_speed,
    })
}

/// The tensors of the speech components and the speech scalars.
fn speech_tensors(info: &ModelInfo) -> impl Iterator<Item = &TensorInfo> {
    info.inventory
        .tensors
        .iter()
        .filter_map(|(t, part)| matches!(part, Part::Speech(_) | Part::Scalars).then_some(t))
}

/// Bytes of the speech components and scalars as stored, less the diffusion head's when it
/// is offloaded (the planner's terms: `plan::estimate` leaves it out the same way).
fn speech_device_bytes(info: &ModelInfo, offload_prediction_head: bool) -> u64 {
    let stored: u64 = speech_tensors(info).map(TensorInfo::size_bytes).sum();
    let head = match offload_prediction_head {
        true => info
            .inventory
            .part_bytes(Part::Speech(Component::PredictionHead)),
        false => 0,
    };
    stored - head
}
