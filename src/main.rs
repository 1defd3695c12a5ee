//! The `vibeoffload` binary: parses arguments, calls the library, prints tables or JSON, and
//! picks the exit status (0 ok, 1 failure, 2 bad command line).

mod cli;

use anyhow::Result;
use clap::Parser;
use cli::{
    AutoArgs, BenchArgs, BuiltinArg, ChoiceArgs, Cli, Command, ConventionArg, DeviceArg, DtypeArg,
    EngineArgs, GpuArgs, InspectArgs, LegacyArgs, ModelArgs, PlacementArg, PlanArgs, RunArgs,
    ScaleArg, SizeArg, SynthArgs, TableArgs,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;
use vibeoffload::arch::config::{BuiltinModel, ModelConfig};
use vibeoffload::arch::vibevoice::VibeVoiceParts;
use vibeoffload::checkpoint::layout::{Precision, ScaleConvention, ScaleGranularity};
use vibeoffload::checkpoint::synth::{self, SynthSpec};
use vibeoffload::checkpoint::{self, CheckpointDtype, ModelInfo};
use vibeoffload::engine::{DeviceChoice, Engine, EngineOptions};
use vibeoffload::plan::{self, presets, Placement, PlanOptions, Scope};
use vibeoffload::report::{
    gib, Budget, Choice, ForwardResult, InspectReport, ModelSummary, PlanReport, RunReport,
    TableReport, VramUse,
};
use vibeoffload::run::{BenchOptions, BenchReport};
use vibeoffload::{gpu, UsageError};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = run(cli).and_then(|text| {
        let mut stdout = std::io::stdout().lock();
        match stdout
            .write_all(text.as_bytes())
            .and_then(|_| stdout.flush())
        {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => Ok(other?),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| c.is::<UsageError>()) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs the command and returns what goes to stdout.
fn run(cli: Cli) -> Result<String> {
    match cli.command {
        Some(Command::Table(a)) => table(a),
        Some(Command::Auto(a)) => auto(a),
        Some(Command::Inspect(a)) => inspect(a),
        Some(Command::Synth(a)) => synth(a),
        Some(Command::Run(a)) => run_engine(a),
        Some(Command::Bench(a)) => bench(a),
        None => legacy(cli.legacy),
    }
}

/// The original's precedence: `--no-offload`, then `--config`, then `--num-gpu-layers`;
/// `None` means auto.
fn fixed_choice(model: &ModelInfo, f: &ChoiceArgs) -> Result<Option<(Choice, usize)>> {
    let num_layers = model.inventory.num_layers();
    Ok(if f.no_offload {
        Some((Choice::NoOffload, num_layers))
    } else if let Some(name) = &f.config {
        let (name, layers) = presets::resolve(name, num_layers)?;
        Some((Choice::Preset { name }, layers))
    } else {
        f.num_gpu_layers.map(|n| (Choice::NumGpuLayers, n))
    })
}

/// The original's precedence: `--print-table`, then `--test-speed` (which loads the model),
/// then `--no-offload`, `--config`, `--num-gpu-layers`, else auto.
fn legacy(a: LegacyArgs) -> Result<String> {
    if a.print_table {
        return table(TableArgs {
            layers: None,
            model: a.model,
            plan: a.plan,
            gpu: a.gpu,
            json: a.json,
        });
    }
    if a.test_speed {
        return run_engine(RunArgs {
            choice: a.choice,
            test_speed: true,
            model: a.model,
            plan: a.plan,
            gpu: a.gpu,
            engine: a.engine,
            timing: a.timing,
            input_ids: None,
            dump: None,
            json: a.json,
        });
    }
    let model = load_model(&a.model)?;
    let options = plan_options(&a.plan)?;
    let Some((choice, layers)) = fixed_choice(&model, &a.choice)? else {
        return auto_plan(&model, &options, &a.gpu, a.json);
    };
    let budget = optional_budget(&a.gpu)?;
    let estimate = plan::estimate(&model, &options, layers)?;
    let fits = budget
        .as_ref()
        .map(|b| estimate.total_bytes <= b.budget_bytes);
    let reason = match (&budget, fits) {
        (Some(b), Some(true)) => format!(
            "fits: the estimate is {} GiB, within the budget of {} GiB",
            gib(estimate.total_bytes),
            gib(b.budget_bytes)
        ),
        (Some(b), _) => format!(
            "does NOT fit: the estimate is {} GiB, over the budget of {} GiB; try `vibeoffload --auto`",
            gib(estimate.total_bytes),
            gib(b.budget_bytes)
        ),
        (None, _) => "no GPU reading, so fit was not checked (pass --vram SIZE to check)".into(),
    };
    let report = PlanReport {
        schema: "vibeoffload.plan/1".into(),
        model: ModelSummary::of(&model),
        options,
        budget,
        choice,
        estimate,
        fits,
        reason,
    };
    render(&report, a.json, PlanReport::render)
}

fn table(a: TableArgs) -> Result<String> {
    let model = load_model(&a.model)?;
    let options = plan_options(&a.plan)?;
    let num_layers = model.inventory.num_layers();
    let layers = a
        .layers
        .unwrap_or_else(|| (0..=num_layers).rev().step_by(4).collect());
    let target = target_utilization(&a.gpu)?;
    let budget = optional_budget(&a.gpu)?;
    let report = TableReport::build(&model, &options, &layers, budget, target)?;
    render(&report, a.json, TableReport::render)
}

fn auto(a: AutoArgs) -> Result<String> {
    let model = load_model(&a.model)?;
    let options = plan_options(&a.plan)?;
    auto_plan(&model, &options, &a.gpu, a.json)
}

fn auto_plan(model: &ModelInfo, options: &PlanOptions, g: &GpuArgs, json: bool) -> Result<String> {
    let budget = required_budget(g)?;
    let Some(estimate) = plan::fit(model, options, budget.budget_bytes)? else {
        let floor = plan::estimate(model, options, 0)?;
        anyhow::bail!(
            "nothing fits: even with all {} layers streamed the estimate is {} GiB, over the budget of {} GiB ({:.0}% of {} GiB free); free VRAM, or lower --max-seq-len / --batch",
            model.inventory.num_layers(),
            gib(floor.total_bytes),
            gib(budget.budget_bytes),
            budget.target_utilization * 100.0,
            gib(budget.free_bytes)
        );
    };
    let num_layers = model.inventory.num_layers();
    let reason = if estimate.gpu_layers == num_layers {
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
    let report = PlanReport {
        schema: "vibeoffload.plan/1".into(),
        model: ModelSummary::of(model),
        options: options.clone(),
        fits: Some(true),
        budget: Some(budget),
        choice: Choice::Auto,
        estimate,
        reason,
    };
    render(&report, json, PlanReport::render)
}

fn inspect(a: InspectArgs) -> Result<String> {
    let mut model_args = a.model;
    if let Some(path) = a.path {
        model_args.model_path = Some(path);
    }
    let model = load_model(&model_args)?;
    render(&InspectReport::build(&model), a.json, InspectReport::render)
}

fn synth(a: SynthArgs) -> Result<String> {
    let custom_flags = [
        a.layers,
        a.hidden,
        a.intermediate,
        a.heads,
        a.kv_heads,
        a.head_dim,
        a.vocab,
    ];
    if a.size != SizeArg::Custom && (custom_flags.iter().any(Option::is_some) || a.tie_embeddings) {
        anyhow::bail!(UsageError::new(
            "--layers, --hidden, --intermediate, --heads, --kv-heads, --head-dim, --vocab and --tie-embeddings need --size custom"
        ));
    }
    let (config, parts) = match a.size {
        SizeArg::Large7b | SizeArg::Small1_5b => {
            let model = if a.size == SizeArg::Large7b {
                BuiltinModel::Large7b
            } else {
                BuiltinModel::Small1_5b
            };
            let config = model.config();
            let parts = VibeVoiceParts::real(&config);
            (config, parts)
        }
        SizeArg::Custom => {
            let hidden = a.hidden.unwrap_or(64);
            let heads = a.heads.unwrap_or(4);
            let config = ModelConfig {
                hidden_size: hidden,
                intermediate_size: a.intermediate.unwrap_or(128),
                num_attention_heads: heads,
                num_key_value_heads: a.kv_heads.unwrap_or(2),
                head_dim: a.head_dim.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
                num_hidden_layers: a.layers.unwrap_or(2),
                vocab_size: a.vocab.unwrap_or(256),
                rope_theta: 1e6,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: a.tie_embeddings,
            };
            config
                .validate()
                .map_err(|e| UsageError::new(format!("synth --size custom: {e:#}")))?;
            let parts = VibeVoiceParts::small(&config);
            (config, parts)
        }
    };
    let precision = match (a.dtype, a.scale) {
        (DtypeArg::Bf16, ScaleArg::None) => Precision::BF16,
        (DtypeArg::Bf16, _) => anyhow::bail!(UsageError::new(
            "--scale applies to float8 checkpoints; drop it or use --dtype float8"
        )),
        (DtypeArg::Float8, ScaleArg::None) => Precision::Float8Plain,
        (DtypeArg::Float8, scale) => Precision::Float8Scaled(
            match a.scale_convention {
                ConventionArg::ScaleWeight => ScaleConvention::ScaleWeight,
                ConventionArg::WeightScale => ScaleConvention::WeightScale,
            },
            if scale == ScaleArg::Scalar {
                ScaleGranularity::Scalar
            } else {
                ScaleGranularity::PerChannel
            },
        ),
    };
    let spec = SynthSpec {
        config,
        parts,
        precision,
        seed: a.seed,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("writing {}", a.out.display()));
    let report = synth::write(&spec, &a.out, a.force, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report?;
    render(&report, a.json, |r| {
        format!(
            "wrote {} ({} bytes, {} tensors, {} layers) and {} in {:.1} s\n",
            r.path.display(),
            r.file_bytes,
            r.tensors,
            r.layers,
            r.config_path.display(),
            r.seconds
        )
    })
}

/// How reports name the model `run` and `bench` synthesize without --model-path.
const EMBEDDED_MODEL: &str = "embedded test model (8 layers, hidden 256, float8)";

/// The checkpoint `run` and `bench` load: `--model-path`, else the embedded model written to a
/// temporary directory (returned, to keep it alive).
fn engine_checkpoint(a: &ModelArgs) -> Result<(std::path::PathBuf, Option<tempfile::TempDir>)> {
    let dtype = match a.dtype {
        DtypeArg::Float8 => CheckpointDtype::Float8,
        DtypeArg::Bf16 => CheckpointDtype::Bf16,
    };
    match &a.model_path {
        Some(path) => Ok((checkpoint::resolve_path(path, dtype), None)),
        None => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("embedded.safetensors");
            synth::write(&SynthSpec::embedded(), &path, false, |_, _| {})?;
            Ok((path, Some(dir)))
        }
    }
}

/// Engine options from the flags; the layer count is filled in later.
fn engine_options(e: &EngineArgs, plan: &PlanOptions, g: &GpuArgs) -> Result<EngineOptions> {
    let device = match e.device {
        DeviceArg::Cpu => DeviceChoice::Cpu,
        DeviceArg::Cuda => DeviceChoice::Cuda(g.gpu as usize),
        DeviceArg::Auto if cfg!(feature = "cuda") && gpu::query(g.gpu).is_ok() => {
            DeviceChoice::Cuda(g.gpu as usize)
        }
        DeviceArg::Auto => DeviceChoice::Cpu,
    };
    if matches!(device, DeviceChoice::Cuda(_)) && !cfg!(feature = "cuda") {
        anyhow::bail!(UsageError::new(
            "--device cuda needs a build with CUDA: cargo build --release --features cuda (see scripts/build-cuda.sh)"
        ));
    }
    Ok(EngineOptions {
        device,
        gpu_layers: 0,
        placement: plan.placement,
        slots: plan.stream_slots,
        prefetch_depth: if e.no_prefetch {
            0
        } else {
            e.prefetch_depth
                .unwrap_or(plan.stream_slots.saturating_sub(1))
        },
        pin_memory: !e.no_pin,
        max_seq_len: plan.max_seq_len as usize,
    })
}

/// Planner options for what the engine loads: the language model, `--batch` sequences.
fn engine_plan(a: &PlanArgs) -> Result<PlanOptions> {
    let mut plan = plan_options(a)?;
    plan.scope = Scope::LanguageModel;
    Ok(plan)
}

fn run_engine(a: RunArgs) -> Result<String> {
    let (path, embedded_dir) = engine_checkpoint(&a.model)?;
    let mut model = ModelInfo::open(&path)?;
    if embedded_dir.is_some() {
        model.source = EMBEDDED_MODEL.into();
    }
    let plan = engine_plan(&a.plan)?;
    let mut options = engine_options(&a.engine, &plan, &a.gpu)?;
    let device = options.device;
    let num_layers = model.inventory.num_layers();
    let (choice, gpu_layers) = match fixed_choice(&model, &a.choice)? {
        Some(c) => c,
        None if device == DeviceChoice::Cpu && a.gpu.vram.is_none() => {
            (Choice::NoOffload, num_layers)
        }
        None => {
            let budget = required_budget(&a.gpu)?;
            let fit = plan::fit(&model, &plan, budget.budget_bytes)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "nothing fits in {} GiB ({:.0}% of {} GiB free); free VRAM or lower --max-seq-len",
                    gib(budget.budget_bytes),
                    budget.target_utilization * 100.0,
                    gib(budget.free_bytes)
                )
            })?;
            (Choice::Auto, fit.gpu_layers)
        }
    };
    let estimate = plan::estimate(&model, &plan, gpu_layers)?;
    options.gpu_layers = gpu_layers;
    let gpu_reading = match device {
        DeviceChoice::Cuda(i) => gpu::query(i as u32).ok(),
        DeviceChoice::Cpu => None,
    };
    let nvml_before = gpu_reading.as_ref().and_then(|g| {
        gpu::PeakSampler::start(g.index)
            .ok()
            .map(gpu::PeakSampler::finish)
    });
    let device_name = gpu_reading.as_ref().map_or_else(
        || "cpu".to_string(),
        |g| format!("GPU {} {}", g.index, g.name),
    );

    let bar = progress_bar("loading layers", num_layers as u64);
    // What the planner says fits in this GPU's free memory, for an out-of-memory error.
    let largest_fit = match &gpu_reading {
        Some(g) => {
            let budget = (g.free_bytes as f64 * target_utilization(&a.gpu)?) as u64;
            plan::fit(&model, &plan, budget)?.map(|e| e.gpu_layers)
        }
        None => None,
    };
    let hint = |e| oom_hint(e, &estimate, gpu_layers, largest_fit);
    let started = std::time::Instant::now();
    let engine = Engine::load(model, &options, |done, _| bar.set_position(done as u64));
    bar.finish_and_clear();
    let mut engine = engine.map_err(&hint)?;
    engine.synchronize()?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;

    let sampler = gpu_reading
        .as_ref()
        .and_then(|g| gpu::PeakSampler::start(g.index).ok());
    let vocab = engine.info().config.vocab_size;
    let (mut test_speed, mut decode, mut forward) = (None, None, None);
    if let Some(ids) = &a.input_ids {
        let hidden = engine.forward(ids).map_err(&hint)?;
        let last = hidden.get(ids.len() - 1)?;
        let logits = engine.logits(&last).map_err(&hint)?;
        let next_token = logits.argmax(0)?.to_scalar::<u32>()?;
        let hidden_sum = hidden
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        if let Some(path) = &a.dump {
            vibeoffload::engine::dump(path, &hidden, Some(&logits))?;
        }
        forward = Some(ForwardResult {
            input_ids: ids.clone(),
            hidden_sum,
            next_token,
            dump: a.dump.clone(),
        });
    } else if a.test_speed {
        let ids = vibeoffload::run::random_ids(a.timing.prompt_len, a.timing.seed, vocab);
        test_speed =
            Some(vibeoffload::run::test_speed(&mut engine, &ids, 1, a.timing.runs).map_err(&hint)?);
    } else {
        let prompts = vibeoffload::run::random_prompts(
            plan.batch as usize,
            a.timing.prompt_len,
            a.timing.seed,
            vocab,
        );
        decode = Some(
            vibeoffload::run::decode(&mut engine, &prompts, a.timing.gen_tokens).map_err(&hint)?,
        );
    }
    if a.dump.is_some() && forward.is_none() {
        anyhow::bail!(UsageError::new("--dump needs --input-ids"));
    }
    let peak = sampler.map(gpu::PeakSampler::finish);
    let vram = VramUse {
        engine_weight_bytes: engine.device_weight_bytes(),
        engine_kv_cache_bytes: engine.kv_cache_bytes(),
        nvml_used_before_bytes: nvml_before,
        nvml_used_peak_bytes: peak,
        measured_peak_bytes: nvml_before.zip(peak).map(|(b, p)| p.saturating_sub(b)),
    };
    let report = RunReport {
        schema: "vibeoffload.run/1".into(),
        model: ModelSummary::of(engine.info()),
        device: device_name,
        engine: options,
        choice,
        estimate,
        load_ms,
        load_phases: engine.load_timings(),
        test_speed,
        decode,
        forward,
        vram,
    };
    render(&report, a.json, RunReport::render)
}

fn bench(a: BenchArgs) -> Result<String> {
    if a.threshold.is_nan() || a.threshold < 0.0 {
        anyhow::bail!(UsageError::new(
            "--threshold must be 0 or more (0.10 = 10%)"
        ));
    }
    let baseline = match &a.baseline {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read the baseline {}: {e}", p.display()))?;
            Some(serde_json::from_str::<BenchReport>(&text).map_err(|e| {
                anyhow::anyhow!("{} is not a `bench --json` report: {e}", p.display())
            })?)
        }
        None => None,
    };
    let (path, embedded_dir) = engine_checkpoint(&a.model)?;
    let layers = ModelInfo::open(&path)?.inventory.num_layers();
    let layer_counts = a
        .layers
        .clone()
        .unwrap_or_else(|| (0..=layers).rev().step_by(4).collect());
    if let Some(&n) = layer_counts.iter().find(|&&n| n > layers) {
        anyhow::bail!(UsageError::new(format!(
            "--layers {n} is more than the model's {layers} layers"
        )));
    }
    let mut plan = engine_plan(&a.plan)?;
    if a.plan.max_seq_len.is_none() {
        // Just what the runs need (decode's warm-up feeds the prompt and 2 tokens; its queued
        // steps follow the timed ones), so the estimate and the measurement describe the same
        // buffers.
        plan.max_seq_len = (a.timing.prompt_len
            + a.timing.gen_tokens.max(3)
            + vibeoffload::run::QUEUED_STEPS) as u64;
    }
    let options = BenchOptions {
        engine: engine_options(&a.engine, &plan, &a.gpu)?,
        plan,
        layer_counts,
        prompt_len: a.timing.prompt_len,
        gen_tokens: a.timing.gen_tokens,
        runs: a.timing.runs,
        seed: a.timing.seed,
    };
    let spinner = ProgressBar::new_spinner();
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = vibeoffload::run::bench(&path, &options, |m| spinner.set_message(m));
    spinner.finish_and_clear();
    let mut report = report?;
    if embedded_dir.is_some() {
        report.model.source = EMBEDDED_MODEL.into();
    }
    if let Some(plot) = &a.plot {
        vibeoffload::report::plot_bench(&report, plot)
            .map_err(|e| anyhow::anyhow!("cannot draw {}: {e:#}", plot.display()))?;
    }
    let text = render(&report, a.json, BenchReport::render)?;
    if let Some(old) = &baseline {
        let slower = vibeoffload::run::regressions(old, &report, a.threshold);
        if !slower.is_empty() {
            print!("{text}");
            anyhow::bail!(
                "slower than the baseline by more than {:.0}%: {}",
                a.threshold * 100.0,
                slower.join("; ")
            );
        }
    }
    Ok(text)
}

/// Adds to an out-of-memory error what was planned and the largest layer count the planner
/// says fits in the free memory read before loading.
fn oom_hint(
    e: anyhow::Error,
    estimate: &plan::VramEstimate,
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

fn progress_bar(message: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

fn render<T: Serialize>(report: &T, json: bool, text: impl Fn(&T) -> String) -> Result<String> {
    Ok(if json {
        serde_json::to_string_pretty(report)? + "\n"
    } else {
        text(report)
    })
}

fn load_model(a: &ModelArgs) -> Result<ModelInfo> {
    let dtype = match a.dtype {
        DtypeArg::Float8 => CheckpointDtype::Float8,
        DtypeArg::Bf16 => CheckpointDtype::Bf16,
    };
    match &a.model_path {
        Some(path) => ModelInfo::open(&checkpoint::resolve_path(path, dtype)),
        None => Ok(ModelInfo::builtin(
            match a.builtin {
                BuiltinArg::Large7b => BuiltinModel::Large7b,
                BuiltinArg::Small1_5b => BuiltinModel::Small1_5b,
            },
            dtype,
        )),
    }
}

fn plan_options(a: &PlanArgs) -> Result<PlanOptions> {
    let options = PlanOptions {
        scope: if a.lm_only {
            Scope::LanguageModel
        } else {
            Scope::Full
        },
        offload_prediction_head: a.offload_prediction_head,
        batch: a.batch,
        max_seq_len: a.max_seq_len.unwrap_or(4096),
        placement: match a.placement {
            PlacementArg::Last => Placement::Last,
            PlacementArg::First => Placement::First,
            PlacementArg::Spread => Placement::Spread,
        },
        stream_slots: a.slots,
    };
    options.validate()?;
    Ok(options)
}

fn target_utilization(g: &GpuArgs) -> Result<f64> {
    let t = g.target_utilization;
    if t.is_nan() || t <= 0.0 || t > 1.0 {
        anyhow::bail!(UsageError::new(format!(
            "--target-utilization {t} must be above 0 and at most 1 (e.g. 0.8)"
        )));
    }
    Ok(t)
}

/// The budget from `--vram`, else from NVML; `None` (with a note on stderr) when NVML cannot
/// be read.
fn optional_budget(g: &GpuArgs) -> Result<Option<Budget>> {
    let target = target_utilization(g)?;
    if let Some(size) = &g.vram {
        return Ok(Some(Budget::new(None, cli::parse_size(size)?, target)));
    }
    match gpu::query(g.gpu) {
        Ok(info) => Ok(Some(Budget::new(
            Some(info.clone()),
            info.free_bytes,
            target,
        ))),
        Err(e) => {
            eprintln!("note: {e:#}; planning without a budget (pass --vram SIZE to set one)");
            Ok(None)
        }
    }
}

fn required_budget(g: &GpuArgs) -> Result<Budget> {
    let target = target_utilization(g)?;
    if let Some(size) = &g.vram {
        return Ok(Budget::new(None, cli::parse_size(size)?, target));
    }
    let info = gpu::query(g.gpu).map_err(|e| {
        anyhow::anyhow!("{e:#}; to choose a layer count without a GPU reading, pass --vram SIZE (e.g. --vram 8GiB)")
    })?;
    Ok(Budget::new(Some(info.clone()), info.free_bytes, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_errors_say_what_fits() {
        let model = ModelInfo::builtin(BuiltinModel::Large7b, CheckpointDtype::Float8);
        let estimate = plan::estimate(&model, &PlanOptions::default(), 28).unwrap();
        let oom = anyhow::anyhow!("cannot upload model.language_model.layers.3.mlp.up_proj.weight (67895296 bytes) to the device: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let text = format!("{:#}", oom_hint(oom, &estimate, 28, Some(12)));
        assert!(text.contains("mlp.up_proj.weight"), "{text}");
        assert!(text.contains("28 GPU layers estimated 10.61 GiB"), "{text}");
        assert!(text.contains("try --num-gpu-layers 12"), "{text}");
        let other = oom_hint(anyhow::anyhow!("no such file"), &estimate, 28, Some(12));
        assert_eq!(format!("{other:#}"), "no such file");
    }
}
