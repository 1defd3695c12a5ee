//! One body per command: resolve the settings, call the library, render the report.

use super::args::Cli;
use super::args::ConvertArgs;
use super::args::{
    AutoArgs, BenchArgs, BenchCompareArgs, GenerateArgs, InspectArgs, LegacyArgs, ReportArgs,
    RunArgs, ScopeArgs, SynthArgs, TableArgs,
};
use super::progress::Progress;
use super::settings::{calibration, convert_precision, refuse_auto_cpu_layers};
use super::settings::{
    every_fourth, fixed_choice, generate_request, legacy_checkpoint, load_options, model_info,
    refuse_legacy_gen_tokens, synth_spec, BenchSettings, Planning, RunSettings,
    SpeechBenchSettings,
};
use anyhow::Result;
use clap::CommandFactory;
use serde::Serialize;
use std::path::Path;
use vibeoffload::checkpoint::synth;
use vibeoffload::checkpoint::{self, convert, CheckpointDtype, ModelInfo};
use vibeoffload::engine::{LoadPhase, LoadProgress};
use vibeoffload::measure::{
    self, compare, BenchReport, ModelFile, SessionProgress, SpeechBenchReport,
};
use vibeoffload::plan::presets;
use vibeoffload::report::{
    self, plot_bench, plot_speech_bench, CalibrationReport, InspectReport, PlanReport, Render,
    TableReport,
};

/// What a command leaves: text for stdout, and a failure to report after printing it.
pub struct Output {
    pub stdout: String,
    pub failure: Option<anyhow::Error>,
}

impl From<String> for Output {
    fn from(stdout: String) -> Output {
        Output {
            stdout,
            failure: None,
        }
    }
}

/// The original's flag form: `--print-table`; else, with a checkpoint (`--model-path`, or
/// one in `models/converted`), load the whole model with the layer choice (`--no-offload`,
/// `--config`, `--num-gpu-layers`, else auto) and report, timing it with `--test-speed`;
/// without one, `--test-speed` times the embedded model and the rest plans the built-in
/// layout, saying where it looked.
pub fn legacy(mut a: LegacyArgs) -> Result<Output> {
    refuse_legacy_gen_tokens(&a)?;
    if a.print_table {
        return table(TableArgs {
            layers: None,
            planning: a.planning,
            calibration: Default::default(),
            output: a.output,
        });
    }
    let (path, found) = legacy_checkpoint(&a.planning.model.checkpoint);
    let scope = &a.planning.scope;
    if found && !scope.lm_only && !scope.offload_prediction_head {
        let model = ModelFile::at(path);
        let options = load_options(&a, &model)?;
        let mut load = LoadDisplay::default();
        let report = vibeoffload::generate::load_report(&model, &options, |p| load.update(p));
        load.finish();
        return text_or_json(&report?, a.output.json);
    }
    let note = legacy_note(found, scope, a.test_speed, &path);
    super::progress::note(note);
    if found {
        a.planning.model.checkpoint.model_path = Some(path);
    }
    if a.test_speed {
        return run(RunArgs {
            choice: a.choice,
            test_speed: true,
            checkpoint: a.planning.model.checkpoint,
            plan: a.planning.plan,
            calibration: Default::default(),
            gpu: a.planning.gpu,
            budget: a.planning.budget,
            engine: a.engine,
            timing: a.timing,
            input_ids: None,
            dump: None,
            output: ReportArgs {
                json: a.output.json,
                json_out: None,
            },
        });
    }
    refuse_auto_cpu_layers(&a.planning.plan)?;
    let p = Planning::resolve(&a.planning)?;
    let report = match fixed_choice(&p.model, &a.choice)? {
        Some((choice, layers)) => {
            PlanReport::fixed(&p.model, &p.options, p.budget.optional(), choice, layers)?
        }
        None => PlanReport::auto(&p.model, &p.options, p.budget.required()?)?,
    };
    text_or_json(&report, a.output.json)
}

/// What the flag form says when it does not load: where it looked, or why a checkpoint that
/// is there was only planned.
fn legacy_note(found: bool, scope: &ScopeArgs, test_speed: bool, path: &Path) -> String {
    let shown = path.display();
    match found {
        true if scope.lm_only => {
            let what = if test_speed {
                "loaded and timed"
            } else {
                "planned"
            };
            format!("--lm-only: the language model alone is {what}; without it the whole model is loaded")
        }
        true => "--offload-prediction-head is planned only here, so nothing was loaded; \
                 `vibeoffload generate --offload-prediction-head` runs the diffusion head on the CPU"
            .to_string(),
        false => {
            let instead = match test_speed {
                true => "timing the embedded test model",
                false => "this is the plan for the built-in layout",
            };
            format!(
                "no checkpoint at {shown}, so nothing was loaded; {instead}; pass --model-path, \
                 or write one there with `vibeoffload synth {shown}` (random weights) or \
                 `vibeoffload convert`"
            )
        }
    }
}

pub fn table(a: TableArgs) -> Result<Output> {
    let p = Planning::resolve(&a.planning)?;
    let layers = a
        .layers
        .unwrap_or_else(|| every_fourth(p.model.inventory.num_layers()));
    let budget = p.budget.optional();
    let predicted = calibration::table_prediction(
        a.calibration.calibration.as_deref(),
        budget
            .as_ref()
            .and_then(|b| b.gpu.as_ref())
            .map(|g| g.name.clone()),
        &p.options,
        p.auto_cpu_layers,
    )?;
    let report = TableReport::build(
        &p.model,
        &p.options,
        &layers,
        budget,
        p.budget.target_utilization,
        predicted,
    )?;
    text_or_json(&report, a.output.json)
}

pub fn auto(a: AutoArgs) -> Result<Output> {
    refuse_auto_cpu_layers(&a.planning.plan)?;
    let p = Planning::resolve(&a.planning)?;
    let report = PlanReport::auto(&p.model, &p.options, p.budget.required()?)?;
    text_or_json(&report, a.output.json)
}

pub fn inspect(mut a: InspectArgs) -> Result<Output> {
    if let Some(path) = a.path {
        a.model.checkpoint.model_path = Some(path);
    }
    let report = InspectReport::build(&model_info(&a.model)?);
    text_or_json(&report, a.output.json)
}

pub fn synth(a: SynthArgs) -> Result<Output> {
    let spec = synth_spec(&a)?;
    let mut bar = Progress::bytes(format!("writing {}", a.out.display()));
    let report = synth::write(&spec, &a.out, a.force, |done, total| bar.set(done, total));
    bar.finish();
    text_or_json(&report?, a.json)
}

pub fn convert(a: ConvertArgs) -> Result<Output> {
    let precision = convert_precision(&a)?;
    let model = ModelInfo::open(&checkpoint::resolve_path(
        &a.model_path,
        CheckpointDtype::Bf16,
    ))?;
    let mut bar = Progress::bytes(format!("converting to {}", a.out.display()));
    let report = convert::convert(&model, &a.out, precision, a.force, |done, total| {
        bar.set(done, total)
    });
    bar.finish();
    text_or_json(&report?, a.json)
}

pub fn run(a: RunArgs) -> Result<Output> {
    let s = RunSettings::resolve(&a)?;
    let mut display = SessionDisplay::default();
    let report = measure::run_session(&s.model, &s.options, |p| display.update(p));
    display.finish();
    report_out(&report?, &a.output)
}

/// `run`'s progress on stderr: the load by phase, then the tokens decoded or the passes run,
/// counted with an ETA.
#[derive(Default)]
struct SessionDisplay {
    load: LoadDisplay,
    timed: Option<Progress>,
}

impl SessionDisplay {
    fn update(&mut self, p: SessionProgress) {
        let (label, noun, done, total) = match p {
            SessionProgress::Load(p) => return self.load.update(p),
            SessionProgress::Decode { done, total } => ("decode", "tokens", done, total),
            SessionProgress::TestSpeed { done, total } => ("test-speed", "passes", done, total),
        };
        self.load.finish();
        self.timed
            .get_or_insert_with(|| Progress::counter(label, noun))
            .set(done as u64, total as u64);
    }

    fn finish(mut self) {
        self.load.finish();
        if let Some(display) = self.timed {
            display.finish();
        }
    }
}

/// Load progress on stderr: one display per phase, counting bytes or layers where the phase
/// has a count ([`Progress`] draws a bar, or prints plain lines off a terminal).
#[derive(Default)]
struct LoadDisplay(Option<(LoadPhase, Progress)>);

impl LoadDisplay {
    fn update(&mut self, p: LoadProgress) {
        if self.0.as_ref().is_none_or(|(phase, _)| *phase != p.phase) {
            self.finish();
            let label = p.phase.label();
            let mut display = match p.phase {
                LoadPhase::PageIn | LoadPhase::Speech => Progress::bytes(label),
                LoadPhase::Layers => Progress::items(label),
                _ => Progress::spinner("loading"),
            };
            if p.total == 0 {
                display.status(label);
            }
            self.0 = Some((p.phase, display));
        }
        if let Some((_, display)) = &mut self.0 {
            if p.total > 0 {
                display.set(p.done, p.total);
            }
        }
    }

    /// Ends the current phase's display.
    fn finish(&mut self) {
        if let Some((_, display)) = self.0.take() {
            display.finish();
        }
    }
}

pub fn generate(a: GenerateArgs) -> Result<Output> {
    let (model, request) = generate_request(&a)?;
    if a.benchmark {
        let num_layers = model.open()?.inventory.num_layers();
        // The presets this model has layers for (a small model skips those above its count).
        let configurations: Vec<(String, usize)> = presets::presets()
            .presets
            .iter()
            .filter_map(|p| presets::resolve(&p.name, num_layers).ok())
            .collect();
        // A warm-up, then one generation per configuration.
        let runs = configurations.len() as u64 + 1;
        let mut bar = Progress::steps("generate --benchmark", "runs", runs);
        let mut done = 0;
        let report = vibeoffload::generate::run_benchmark(
            &model,
            &request,
            &configurations,
            |m| {
                bar.step(done, m);
                done += 1;
            },
            |_| Ok(()),
        );
        bar.finish();
        return report_out(&report?, &a.output);
    }
    let load = std::cell::RefCell::new(LoadDisplay::default());
    let mut speaking: Option<Progress> = None;
    let started = std::time::Instant::now();
    let report = vibeoffload::generate::run_generation(
        &model,
        &request,
        |p| load.borrow_mut().update(p),
        |seconds| {
            let bar = speaking.get_or_insert_with(|| {
                load.borrow_mut().finish();
                Progress::spinner("generate")
            });
            let rtf = started.elapsed().as_secs_f64() / seconds.max(1e-9);
            bar.status(format!(
                "{seconds:.1} s of audio (running RTF {rtf:.2}, load included)"
            ));
        },
    );
    load.borrow_mut().finish();
    if let Some(bar) = speaking {
        bar.finish();
    }
    report_out(&report?, &a.output)
}

pub fn bench(a: BenchArgs) -> Result<Output> {
    if a.speech {
        return bench_speech(&a);
    }
    if a.calibrate {
        return bench_calibrate(&a);
    }
    let s = BenchSettings::resolve(&a)?;
    let rows = s.options.layer_counts.len() as u64;
    let mut bar = Progress::steps("bench", "rows", rows);
    // --json-out holds the rows measured so far, rewritten whole after each one.
    let save = |partial: &BenchReport| match &a.output.json_out {
        Some(path) => report::write_json(partial, path),
        None => Ok(()),
    };
    let report = measure::run_bench(
        &s.model,
        &s.options,
        |done, m| bar.step(done as u64, m),
        save,
    );
    bar.finish();
    let mut report = report?;
    if let Some(plot) = &a.plot {
        plot_bench(&report, plot)
            .map_err(|e| anyhow::anyhow!("cannot draw {}: {e:#}", plot.display()))?;
    }
    report.comparison = s
        .baseline
        .as_ref()
        .map(|old| compare(old, &report, s.threshold))
        .transpose()?;
    let mut out = report_out(&report, &a.output)?;
    out.failure = report.comparison.as_ref().and_then(|c| c.verdict().err());
    Ok(out)
}

/// `bench --calibrate`: this machine's rates, stored where the predictions find them.
fn bench_calibrate(a: &BenchArgs) -> Result<Output> {
    let path = calibration::target(a.calibration.calibration.as_deref())?;
    let s = BenchSettings::resolve(a)?;
    measure::calibrate::check_device(s.options.engine.device)?;
    let mut bar = Progress::spinner("bench --calibrate");
    let measured = measure::calibrate::calibrate(&s.model, &s.options, |m| bar.status(m));
    bar.finish();
    let report = CalibrationReport {
        path,
        calibration: measured?,
    };
    measure::calibrate::write(&report.calibration, &report.path)?;
    report_out(&report, &a.output)
}

/// `bench --speech`: the whole text-to-speech loop at each layer count, after a warm-up.
fn bench_speech(a: &BenchArgs) -> Result<Output> {
    let s = SpeechBenchSettings::resolve(a)?;
    let runs = s.options.layer_counts.len() as u64 + 1;
    let mut bar = Progress::steps("bench --speech", "runs", runs);
    // --json-out holds the rows measured so far, rewritten whole after each one.
    let save = |partial: &SpeechBenchReport| match &a.output.json_out {
        Some(path) => report::write_json(partial, path),
        None => Ok(()),
    };
    let report = measure::run_speech_bench(
        &s.model,
        &s.options,
        |done, m| bar.step(done as u64, m),
        save,
    );
    bar.finish();
    let report = report?;
    if let Some(plot) = &a.plot {
        plot_speech_bench(&report, plot)
            .map_err(|e| anyhow::anyhow!("cannot draw {}: {e:#}", plot.display()))?;
    }
    report_out(&report, &a.output)
}

/// `bench compare OLD NEW`: two earlier `bench --json` reports, compared without rerunning.
pub fn bench_compare(a: &BenchCompareArgs) -> Result<Output> {
    let (old, new) = (BenchReport::read(&a.old)?, BenchReport::read(&a.new)?);
    let comparison = compare(&old, &new, a.threshold)?;
    let mut out = text_or_json(&comparison, a.json)?;
    out.failure = comparison.verdict().err();
    Ok(out)
}

/// The report as text, or as JSON with `--json`.
fn text_or_json<T: Serialize + Render>(report: &T, json: bool) -> Result<Output> {
    Ok(if json {
        report::json(report)?
    } else {
        report::wrap(&report.render())
    }
    .into())
}

/// [`text_or_json`], after writing the JSON to `--json-out` when given.
fn report_out<T: Serialize + Render>(report: &T, a: &ReportArgs) -> Result<Output> {
    if let Some(path) = &a.json_out {
        report::write_json(report, path)?;
    }
    text_or_json(report, a.json)
}

/// `completions SHELL`: the completion script clap generates from the command line's own
/// definition, so it always matches the flags.
pub fn completions(shell: clap_complete::Shell) -> Result<Output> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "vibeoffload", &mut script);
    Ok(String::from_utf8(script)?.into())
}

/// `man`: the man page, generated from the command line's own definition.
pub fn man() -> Result<Output> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    Ok(String::from_utf8(page)?.into())
}
