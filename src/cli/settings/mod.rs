//! The "high" argument layer: turns the parsed flags into the library's options once, making
//! every check that needs more than one flag, or the model, here.

mod bench;
pub mod calibration;
mod generate;
mod write;

pub use bench::{BenchSettings, SpeechBenchSettings};
pub use generate::generate_request;
pub use write::{convert_precision, synth_spec};

use super::args::{
    BenchArgs, BudgetArgs, BuiltinArg, CheckpointArgs, ChoiceArgs, ConventionArg, CpuLayersArg,
    DeviceArg, DtypeArg, EngineArgs, GenerateArgs, GpuArgs, LegacyArgs, ModelArgs, PlacementArg,
    PlanArgs, PlanningArgs, RunArgs, ScaleArg, SizeArg, SynthArgs, TimingArgs, VoiceLatentsArg,
};
use super::args::{ConvertArgs, ConvertPrecisionArg};
use super::progress;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use vibeoffload::arch::config::{BuiltinModel, ModelConfig};
use vibeoffload::arch::speech::SpeechConfig;
use vibeoffload::checkpoint::layout::{Precision, ScaleConvention, ScaleGranularity};
use vibeoffload::checkpoint::synth::SynthSpec;
use vibeoffload::checkpoint::{self, CheckpointDtype, ModelInfo};
use vibeoffload::engine::{DeviceChoice, EngineOptions};
use vibeoffload::generate::{LoadOptions, Request, VoiceLatents};
use vibeoffload::gpu::GpuSelector;
use vibeoffload::measure::{BenchOptions, BenchReport, Mode, ModelFile, SessionOptions, Workload};
use vibeoffload::plan::budget::{Budget, Choice};
use vibeoffload::plan::{self, memory, presets, Placement, PlanOptions, Scope};
use vibeoffload::text::prompt;
use vibeoffload::{gpu, UsageError};

/// What a planning command (`table`, `auto`, the flag form) works on.
pub struct Planning {
    /// The model, from its checkpoint or a built-in layout.
    pub model: ModelInfo,
    /// Planner options.
    pub options: PlanOptions,
    /// Where the VRAM budget comes from.
    pub budget: BudgetSource,
    /// `--cpu-layers auto`: `options.cpu_layers` is 0, the split is each layer count's own.
    pub auto_cpu_layers: bool,
}

impl Planning {
    /// Loads the model and checks the planning flags (`--cpu-layers auto` is left to the
    /// command: `table` predicts it from a calibration, the others refuse it).
    pub fn resolve(a: &PlanningArgs) -> Result<Planning> {
        let scope = if a.scope.lm_only {
            Scope::LanguageModel
        } else {
            Scope::Full
        };
        let model = model_info(&a.model)?;
        let mut options = plan_options(&a.plan, scope, a.scope.offload_prediction_head)?;
        if let Some(path) = &a.script.script {
            options.max_seq_len = script_positions(&model, path, &a.script.voices)?;
            options.validate()?;
        }
        progress::setting("model", &model.source);
        progress::setting("plan", &options);
        Ok(Planning {
            model,
            options,
            budget: BudgetSource::resolve(&a.gpu, &a.budget)?,
            auto_cpu_layers: a.plan.cpu_layers == CpuLayersArg::Auto,
        })
    }
}

/// KV positions `generate` needs for the script at `path` with these voice samples.
fn script_positions(model: &ModelInfo, path: &Path, voices: &[PathBuf]) -> Result<u64> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the script {}: {e}", path.display()))?;
    vibeoffload::output::record_input(path);
    let script = prompt::script_from_text_file(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let hop = model
        .speech
        .as_ref()
        .map_or(3200, |s| s.acoustic.encoder.hop());
    let frames = voices
        .iter()
        .map(|v| Ok(vibeoffload::audio::read_voice(v)?.len().div_ceil(hop)))
        .collect::<Result<Vec<_>>>()?;
    let tokens = vibeoffload::generate::prompt_tokens(&script, &frames)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let context = model.config.max_position_embeddings;
    if tokens >= context {
        bail!(
            "{}: the prompt is {tokens} tokens, the model's whole context ({context} positions): \
             generate would refuse it; split the script",
            path.display()
        );
    }
    Ok(vibeoffload::generate::positions(tokens, None, context) as u64)
}

/// The budget's inputs, checked: `--vram` (else NVML's free memory) and the target utilization.
pub struct BudgetSource {
    gpu: GpuSelector,
    vram_bytes: Option<u64>,
    /// Fraction of free VRAM a plan may use.
    pub target_utilization: f64,
}

impl BudgetSource {
    fn resolve(g: &GpuArgs, a: &BudgetArgs) -> Result<BudgetSource> {
        let t = a.target_utilization;
        if t.is_nan() || t <= 0.0 || t > 1.0 {
            bail!(UsageError::new(format!(
                "--target-utilization {t} must be above 0 and at most 1 (e.g. 0.8)"
            )));
        }
        Ok(BudgetSource {
            gpu: g.selector(),
            vram_bytes: a.vram.as_deref().map(parse_size).transpose()?,
            target_utilization: t,
        })
    }

    fn read(&self) -> Result<Budget> {
        let t = self.target_utilization;
        if let Some(bytes) = self.vram_bytes {
            return Ok(Budget::new(None, bytes, t));
        }
        let info = gpu::query_gpu(&gpu::resolve(&self.gpu)?)?;
        Ok(Budget::new(Some(info.clone()), info.free_bytes, t))
    }

    /// The budget, or an error that says how to plan without a GPU reading.
    pub fn required(&self) -> Result<Budget> {
        self.read().map_err(|e| {
            anyhow::anyhow!("{e:#}; to choose a layer count without a GPU reading, pass --vram SIZE (e.g. --vram 8GiB)")
        })
    }

    /// The budget, or `None` with a note on stderr (unless `--quiet`) when NVML cannot be read.
    pub fn optional(&self) -> Option<Budget> {
        self.read()
            .inspect_err(|e| {
                progress::note(format_args!(
                    "{e:#}; planning without a budget (pass --vram SIZE to set one)"
                ))
            })
            .ok()
    }
}

/// The original's precedence: `--no-offload`, then `--config`, then `--num-gpu-layers`;
/// `None` means auto.
pub fn fixed_choice(model: &ModelInfo, c: &ChoiceArgs) -> Result<Option<(Choice, usize)>> {
    let num_layers = model.inventory.num_layers();
    Ok(if c.no_offload {
        Some((Choice::NoOffload, num_layers))
    } else if let Some(name) = &c.config {
        let (name, layers) = presets::resolve(name, num_layers)?;
        Some((Choice::Preset { name }, layers))
    } else {
        c.num_gpu_layers.map(|n| (Choice::NumGpuLayers, n))
    })
}

/// `table`'s and `bench`'s default layer counts: all, then every 4 fewer, down to 0.
pub fn every_fourth(num_layers: usize) -> Vec<usize> {
    (0..=num_layers).rev().step_by(4).collect()
}

/// `run`: the checkpoint to load and what to do with it.
pub struct RunSettings {
    pub model: ModelFile,
    pub options: SessionOptions,
}

impl RunSettings {
    /// Checks the flags and chooses the layer count (auto needs a budget except on the CPU).
    pub fn resolve(a: &RunArgs) -> Result<RunSettings> {
        if a.dump.is_some() && a.input_ids.is_none() {
            bail!(UsageError::new("--dump needs --input-ids"));
        }
        // On the CPU, auto keeps every layer (or fits --vram): no GPU is read.
        refuse_unused_gpu(&a.engine, &a.gpu, false)?;
        let mut plan = plan_options(&a.plan, Scope::LanguageModel, false)?;
        let workload = workload(&a.timing)?;
        if a.input_ids.is_none() {
            check_cache_room(&workload, !a.test_speed, plan.max_seq_len)?;
        }
        let model = model_file(&a.checkpoint)?;
        let info = model.open()?;
        let budget = BudgetSource::resolve(&a.gpu, &a.budget)?;
        let engine = engine_options(&a.engine, &plan, &a.gpu.selector())?;
        let (choice, gpu_layers, budget) = match fixed_choice(&info, &a.choice)? {
            Some((choice, n)) => (choice, n, None),
            // Nothing to fit on the CPU: every layer stays "resident".
            None if engine.device == DeviceChoice::Cpu && budget.vram_bytes.is_none() => {
                (Choice::NoOffload, info.inventory.num_layers(), None)
            }
            None => {
                let budget = budget.required()?;
                let fit = budget.largest_fit(&info, &plan)?;
                (Choice::Auto, fit.gpu_layers, Some(budget))
            }
        };
        if let Some(ids) = &a.input_ids {
            let vocab = info.config.vocab_size;
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                bail!(UsageError::new(format!(
                    "--input-ids: token id {id} is outside the model's vocabulary of {vocab}"
                )));
            }
            if ids.len() as u64 > plan.max_seq_len {
                bail!(UsageError::new(format!(
                    "--input-ids: {} tokens are more than --max-seq-len {}",
                    ids.len(),
                    plan.max_seq_len
                )));
            }
        }
        let mode = match &a.input_ids {
            Some(ids) => Mode::Forward {
                input_ids: ids.clone(),
                dump: a.dump.clone(),
            },
            None if a.test_speed => Mode::TestSpeed,
            None => Mode::Decode,
        };
        progress::setting("layer choice", &choice);
        let batch = plan.batch as usize;
        plan.cpu_layers = resolve_cpu_layers(
            a.plan.cpu_layers,
            a.calibration.calibration.as_deref(),
            &info,
            &plan,
            &engine,
            gpu_layers,
            batch,
        )?;
        let engine = EngineOptions {
            gpu_layers,
            cpu_layers: plan.cpu_layers,
            ..engine
        };
        show_run("engine", &engine, &plan, &workload);
        Ok(RunSettings {
            model,
            options: SessionOptions {
                plan,
                engine,
                target_utilization: budget
                    .as_ref()
                    .map_or(a.budget.target_utilization, |b| b.target_utilization),
                choice,
                budget,
                mode,
                workload,
            },
        })
    }
}

/// Where the original's flag form looks for a checkpoint: `--model-path` (a file, or a
/// directory holding the `--dtype` file), else `models/converted` as the original does; and
/// whether to load it: always when `--model-path` was given (so that opening it says what is
/// wrong), else when the file is there.
pub fn legacy_checkpoint(a: &CheckpointArgs) -> (PathBuf, bool) {
    let dtype: CheckpointDtype = a.dtype.into();
    match &a.model_path {
        Some(path) => (checkpoint::resolve_path(path, dtype), true),
        None => {
            let path = Path::new(DEFAULT_MODEL_DIR).join(dtype.file_name());
            let found = path.is_file();
            (path, found)
        }
    }
}

/// The original's default `--model-path`.
pub const DEFAULT_MODEL_DIR: &str = "models/converted";

/// The original's flag form with a checkpoint: load the whole model, as planned in the
/// whole-model scope, and report.
pub fn load_options(a: &LegacyArgs, model: &ModelFile) -> Result<LoadOptions> {
    refuse_auto_cpu_layers(&a.planning.plan)?;
    let plan = plan_options(&a.planning.plan, Scope::Full, false)?;
    let test_speed = a.test_speed.then(|| workload(&a.timing)).transpose()?;
    if let Some(w) = &test_speed {
        check_cache_room(w, false, plan.max_seq_len)?;
    }
    let info = model.open()?;
    let budget = BudgetSource::resolve(&a.planning.gpu, &a.planning.budget)?;
    let fixed = fixed_choice(&info, &a.choice)?;
    // Here auto reads the GPU's free memory even to run on the CPU, unless --vram is given.
    let reads_gpu = fixed.is_none() && budget.vram_bytes.is_none();
    refuse_unused_gpu(&a.engine, &a.planning.gpu, reads_gpu)?;
    let engine = engine_options(&a.engine, &plan, &a.planning.gpu.selector())?;
    let (choice, gpu_layers, budget) = match fixed {
        // A fixed choice is loaded whatever the budget; with --vram, the report says whether
        // it fits, as the plan-only form does.
        Some((choice, n)) => {
            let stated = budget
                .vram_bytes
                .is_some()
                .then(|| budget.required())
                .transpose()?;
            (choice, n, stated)
        }
        None => {
            let budget = budget.required()?;
            let fit = budget.largest_fit(&info, &plan)?;
            (Choice::Auto, fit.gpu_layers, Some(budget))
        }
    };
    Ok(LoadOptions {
        plan,
        engine: EngineOptions {
            gpu_layers,
            ..engine
        },
        choice,
        budget,
        test_speed,
    })
}

/// `--verbose`: what `run` and `bench` time with.
fn show_run(engine_label: &str, engine: &EngineOptions, plan: &PlanOptions, w: &Workload) {
    progress::setting(engine_label, engine);
    progress::setting("plan", plan);
    progress::detail(format_args!(
        "workload: prompt {} tokens, {} generated, {} runs, seed {}",
        w.prompt_len, w.gen_tokens, w.runs, w.seed
    ));
}

/// The model `--model-path` names, else the built-in layout.
pub fn model_info(a: &ModelArgs) -> Result<ModelInfo> {
    let dtype = a.checkpoint.dtype.into();
    match &a.checkpoint.model_path {
        Some(path) => ModelInfo::open(&checkpoint::resolve_path(path, dtype)),
        None => Ok(ModelInfo::builtin(
            a.builtin.unwrap_or(BuiltinArg::Large7b).into(),
            dtype,
        )),
    }
}

/// The checkpoint `generate` and `bench --speech` load: `--model-path`, else the embedded
/// speech model.
fn speech_model_file(a: &CheckpointArgs) -> Result<ModelFile> {
    match &a.model_path {
        Some(path) => Ok(ModelFile::at(checkpoint::resolve_path(
            path,
            a.dtype.into(),
        ))),
        None => ModelFile::embedded_speech(a.dtype.into()),
    }
}

/// The checkpoint `run` and `bench` load: `--model-path`, else the embedded test model.
fn model_file(a: &CheckpointArgs) -> Result<ModelFile> {
    match &a.model_path {
        Some(path) => Ok(ModelFile::at(checkpoint::resolve_path(
            path,
            a.dtype.into(),
        ))),
        None => ModelFile::embedded(a.dtype.into()),
    }
}

fn plan_options(a: &PlanArgs, scope: Scope, offload_prediction_head: bool) -> Result<PlanOptions> {
    let options = PlanOptions {
        scope,
        offload_prediction_head,
        batch: a.batch,
        max_seq_len: a.max_seq_len.unwrap_or(PlanOptions::default().max_seq_len),
        placement: a.placement.into(),
        stream_slots: a.slots,
        cpu_layers: match a.cpu_layers {
            CpuLayersArg::Count(n) => n,
            // Resolved, by measuring, once the resident layers are known.
            CpuLayersArg::Auto => 0,
        },
    };
    options.validate()?;
    Ok(options)
}

/// `--cpu-layers auto` measures this machine (or predicts from its calibration, as `table`
/// does), which a plan alone does not.
pub fn refuse_auto_cpu_layers(a: &PlanArgs) -> Result<()> {
    if a.cpu_layers == CpuLayersArg::Auto {
        bail!(UsageError::new(
            "--cpu-layers auto measures this machine's PCIe, GPU and CPU: run, generate, bench and table (from a calibration) take it; give a count here"
        ));
    }
    Ok(())
}

/// The CPU-computed layer count `arg` says for a run of `gpu_layers` resident layers: a count
/// as given; `auto` the split predicted fastest at `batch` rows from this machine's
/// calibration (`calibration`, else the stored one), else from rates measured now; 0 on the
/// CPU, where the host computes every layer anyway.
fn resolve_cpu_layers(
    arg: CpuLayersArg,
    calibration: Option<&Path>,
    info: &ModelInfo,
    plan: &PlanOptions,
    engine: &EngineOptions,
    gpu_layers: usize,
    batch: usize,
) -> Result<usize> {
    let CpuLayersArg::Count(n) = arg else {
        let here = vibeoffload::measure::calibrate::this_machine(engine.device);
        let stored = calibration::find(calibration, &here)?.and_then(|c| c.rates(batch));
        if engine.device == DeviceChoice::Cpu {
            return Ok(0);
        }
        let (rates, from) = match stored {
            Some(rates) => (rates, "this machine's calibration"),
            None => {
                let Some(bandwidths) = vibeoffload::engine::bandwidths(engine.device)? else {
                    return Ok(0);
                };
                let rates = vibeoffload::measure::decode_rates(
                    &bandwidths,
                    engine.device,
                    &info.config,
                    batch,
                )?;
                (rates, "rates measured now")
            }
        };
        let depth = engine.prefetch_depth;
        let (c, ms) = plan::speed::best_cpu_layers(info, plan, gpu_layers, depth, &rates);
        progress::note(format!(
            "--cpu-layers auto: {c} (predicted {ms:.1} ms per step from {from}: host float8 products {:.0} GB/s, pinned copies {:.0} GB/s)",
            rates.cpu_gbps, rates.pinned_gbps
        ));
        return Ok(c);
    };
    Ok(n)
}

/// `--gpu` names the card that runs the model and whose free memory a plan reads: with
/// `--device cpu` and no reading (`reads_gpu`), it would do nothing.
fn refuse_unused_gpu(e: &EngineArgs, g: &GpuArgs, reads_gpu: bool) -> Result<()> {
    match (&g.gpu, e.device) {
        (Some(gpu), DeviceArg::Cpu) if !reads_gpu => bail!(UsageError::new(format!(
            "--gpu {gpu} would do nothing: --device cpu runs on the CPU and reads no GPU; drop one of them"
        ))),
        _ => Ok(()),
    }
}

/// The original's flag form only times forward passes (`--test-speed`), which generate
/// nothing: `--gen-tokens` is refused there (clap cannot say "never", so it is checked here).
pub fn refuse_legacy_gen_tokens(a: &LegacyArgs) -> Result<()> {
    if let Some(n) = a.timing.gen_tokens {
        bail!(UsageError::new(format!(
            "--gen-tokens {n} would do nothing: the flag form's --test-speed times forward passes and generates nothing; `vibeoffload run --gen-tokens {n}` decodes"
        )));
    }
    Ok(())
}

/// Engine options from the flags; the layer count is filled in later.
fn engine_options(e: &EngineArgs, plan: &PlanOptions, gpu: &GpuSelector) -> Result<EngineOptions> {
    let cuda = |gpu: &GpuSelector| -> Result<DeviceChoice> {
        let found = gpu::resolve(gpu)?;
        let ordinal = found
            .cuda_ordinal
            .ok_or_else(|| anyhow::anyhow!("{} is not visible to CUDA", found.label))?;
        progress::detail(format!("running on {}", found.label));
        Ok(DeviceChoice::Cuda(ordinal))
    };
    // Whether CUDA shows this process no GPU (a build without CUDA never asks).
    let none_visible = || cfg!(feature = "cuda") && gpu::cuda_devices().is_empty();
    let device = match e.device {
        DeviceArg::Cpu => DeviceChoice::Cpu,
        DeviceArg::Cuda if !cfg!(feature = "cuda") => bail!(UsageError::new(
            "--device cuda needs a build with CUDA: cargo build --release --features cuda (see scripts/build-cuda.sh)"
        )),
        DeviceArg::Cuda if none_visible() => bail!(
            "--device cuda: CUDA shows this process no GPU{}",
            match gpu::visible_devices_note().as_str() {
                "" => ": is the NVIDIA driver loaded?".to_string(),
                note => note.to_string(),
            }
        ),
        DeviceArg::Cuda => cuda(gpu)?,
        DeviceArg::Auto if !cfg!(feature = "cuda") => DeviceChoice::Cpu,
        DeviceArg::Auto if none_visible() => {
            progress::note("this build runs on CUDA, but CUDA shows this process no GPU: running on the CPU");
            DeviceChoice::Cpu
        }
        DeviceArg::Auto => cuda(gpu)?,
    };
    Ok(EngineOptions {
        device,
        gpu_layers: 0,
        placement: plan.placement,
        slots: plan.stream_slots,
        prefetch_depth: match (e.no_prefetch, e.prefetch_depth) {
            (true, _) => 0,
            (false, None) => plan.stream_slots - 1,
            (false, Some(d)) if d < plan.stream_slots => d,
            (false, Some(d)) => bail!(UsageError::new(format!(
                "--prefetch-depth {d} is out of range: use 0 to {} (slots - 1)",
                plan.stream_slots - 1
            ))),
        },
        pin_memory: !e.no_pin,
        max_seq_len: plan.max_seq_len as usize,
        cpu_layers: plan.cpu_layers,
    })
}

/// The timed work, checked: a prompt of at least one token, and no length the planner would
/// refuse (so nothing is allocated for an absurd one).
fn workload(a: &TimingArgs) -> Result<Workload> {
    let max = memory::MAX_SEQ_LEN as usize;
    let gen_tokens = a.gen_tokens.unwrap_or(Workload::DEFAULT.gen_tokens);
    for (flag, value, min) in [
        ("--prompt-len", a.prompt_len, 1),
        ("--gen-tokens", gen_tokens, 0),
    ] {
        if !(min..=max).contains(&value) {
            bail!(UsageError::new(format!(
                "{flag} {value} is out of range: use {min} to {max}"
            )));
        }
    }
    if a.runs == 0 {
        bail!(UsageError::new(
            "--runs 0 would time nothing: use 1 or more"
        ));
    }
    Ok(Workload {
        prompt_len: a.prompt_len,
        gen_tokens,
        runs: a.runs,
        seed: a.seed,
    })
}

/// The KV cache must hold what the timed work puts in it, checked before anything is loaded
/// (the engine would refuse only mid-run): a test-speed pass holds the prompt; a decode the
/// prompt and every generated token but the last, and its warm-up the prompt and 2 tokens.
fn check_cache_room(w: &Workload, decodes: bool, max_seq_len: u64) -> Result<()> {
    let (p, g) = (w.prompt_len, w.gen_tokens);
    if !decodes && p as u64 > max_seq_len {
        bail!(UsageError::new(format!(
            "--prompt-len {p} is more than --max-seq-len {max_seq_len}: a test-speed pass puts the whole prompt in the KV cache; raise --max-seq-len to {p} or shorten the prompt"
        )));
    }
    let positions = w.decode_positions() as u64;
    if decodes && positions > max_seq_len {
        bail!(UsageError::new(format!(
            "--prompt-len {p} with --gen-tokens {g} puts {positions} tokens in the KV cache (the prompt and every generated token but the last, at least 2 for the warm-up), more than --max-seq-len {max_seq_len}: raise --max-seq-len to {positions} or shorten them"
        )));
    }
    Ok(())
}

impl From<DtypeArg> for CheckpointDtype {
    fn from(d: DtypeArg) -> CheckpointDtype {
        match d {
            DtypeArg::Float8 => CheckpointDtype::Float8,
            DtypeArg::Bf16 => CheckpointDtype::Bf16,
        }
    }
}

impl From<BuiltinArg> for BuiltinModel {
    fn from(b: BuiltinArg) -> BuiltinModel {
        match b {
            BuiltinArg::Large7b => BuiltinModel::Large7b,
            BuiltinArg::Small1_5b => BuiltinModel::Small1_5b,
        }
    }
}

impl From<PlacementArg> for Placement {
    fn from(p: PlacementArg) -> Placement {
        match p {
            PlacementArg::Last => Placement::Last,
            PlacementArg::First => Placement::First,
            PlacementArg::Spread => Placement::Spread,
        }
    }
}

/// Parses a memory size such as `8GiB`, `12GB`, `7680MiB` or `1.5 TiB`. Binary (KiB, MiB, GiB,
/// TiB) and decimal (KB, MB, GB, TB) units; `B` for bytes. A unit is required, since a bare `8`
/// is ambiguous.
fn parse_size(text: &str) -> Result<u64, UsageError> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let bad = |why: &str| {
        UsageError::new(format!(
            "--vram {text}: {why}; write a size such as 8GiB, 12GB or 7680MiB"
        ))
    };
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let multiplier: f64 = match unit.to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "" => return Err(bad("no unit")),
        _ => return Err(bad(&format!("unknown unit '{unit}'"))),
    };
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad("the size must be positive"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("12GB").unwrap(), 12_000_000_000);
        assert_eq!(parse_size("7680 MiB").unwrap(), 7680 << 20);
        assert_eq!(parse_size("1.5gib").unwrap(), 3 << 29);
        for bad in ["8", "GiB", "-8GiB", "0GiB", "8 parsecs", "1.2.3GB", ""] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
