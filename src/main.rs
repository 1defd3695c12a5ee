//! The `vibeoffload` binary: parses arguments, calls the library, prints tables or JSON, and
//! picks the exit status (0 ok, 1 failure, 2 bad command line).

mod cli;

use anyhow::Result;
use clap::Parser;
use cli::{
    AutoArgs, BuiltinArg, Cli, Command, ConventionArg, DtypeArg, GpuArgs, InspectArgs, LegacyArgs,
    ModelArgs, PlacementArg, PlanArgs, ScaleArg, SizeArg, SynthArgs, TableArgs,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;
use vibeoffload::checkpoint::config::{BuiltinModel, ModelConfig};
use vibeoffload::checkpoint::layout::{
    Precision, ScaleConvention, ScaleGranularity, VibeVoiceParts,
};
use vibeoffload::checkpoint::synth::{self, SynthSpec};
use vibeoffload::checkpoint::{self, CheckpointDtype, ModelInfo};
use vibeoffload::plan::{self, presets, Placement, PlanOptions, Scope};
use vibeoffload::report::{Budget, Choice, InspectReport, PlanReport, TableReport};
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
        None => legacy(cli.legacy),
    }
}

/// The original's precedence: `--print-table`, then `--no-offload`, `--config`,
/// `--num-gpu-layers`, else auto.
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
    let model = load_model(&a.model)?;
    let options = plan_options(&a.plan)?;
    let num_layers = model.inventory.num_layers();
    let (choice, layers) = if a.no_offload {
        (Choice::NoOffload, num_layers)
    } else if let Some(name) = &a.config {
        let (name, layers) = presets::resolve(name, num_layers)?;
        (Choice::Preset { name }, layers)
    } else if let Some(n) = a.num_gpu_layers {
        (Choice::NumGpuLayers, n)
    } else {
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
            vibeoffload::report::gib(estimate.total_bytes),
            vibeoffload::report::gib(b.budget_bytes)
        ),
        (Some(b), _) => format!(
            "does NOT fit: the estimate is {} GiB, over the budget of {} GiB; try `vibeoffload --auto`",
            vibeoffload::report::gib(estimate.total_bytes),
            vibeoffload::report::gib(b.budget_bytes)
        ),
        (None, _) => "no GPU reading, so fit was not checked (pass --vram SIZE to check)".into(),
    };
    let report = PlanReport {
        schema: "vibeoffload.plan/1".into(),
        model: vibeoffload::report::ModelSummary::of(&model),
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
            vibeoffload::report::gib(floor.total_bytes),
            vibeoffload::report::gib(budget.budget_bytes),
            budget.target_utilization * 100.0,
            vibeoffload::report::gib(budget.free_bytes)
        );
    };
    let num_layers = model.inventory.num_layers();
    let reason = if estimate.gpu_layers == num_layers {
        format!(
            "every layer fits: {} GiB within the budget of {} GiB, so nothing is streamed",
            vibeoffload::report::gib(estimate.total_bytes),
            vibeoffload::report::gib(budget.budget_bytes)
        )
    } else {
        let next = plan::estimate(model, options, estimate.gpu_layers + 1)?;
        format!(
            "{} layers need {} GiB, within the budget of {} GiB; {} would need {} GiB",
            estimate.gpu_layers,
            vibeoffload::report::gib(estimate.total_bytes),
            vibeoffload::report::gib(budget.budget_bytes),
            estimate.gpu_layers + 1,
            vibeoffload::report::gib(next.total_bytes)
        )
    };
    let report = PlanReport {
        schema: "vibeoffload.plan/1".into(),
        model: vibeoffload::report::ModelSummary::of(model),
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
        max_seq_len: a.max_seq_len,
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
    if !(t > 0.0 && t <= 1.0) {
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
