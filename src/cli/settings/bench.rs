//! `bench`'s settings: the checkpoint, the layer counts and the workload or baseline of the
//! language-model bench; and with `--speech`, the checkpoint (or the embedded speech model),
//! the request spoken at each layer count, and where its WAV goes.

use super::generate::refuse_gpu_speech_flags;
use super::*;
use vibeoffload::measure::SpeechBenchOptions;

/// `bench`'s layer counts: `--layers`, checked against the model, else [`every_fourth`].
fn layer_counts(given: Option<&[usize]>, model: &ModelInfo) -> Result<Vec<usize>> {
    let layers = model.inventory.num_layers();
    let counts = given.map_or_else(|| every_fourth(layers), <[usize]>::to_vec);
    if let Some(&n) = counts.iter().find(|&&n| n > layers) {
        bail!(UsageError::new(format!(
            "--layers {n} is more than the model's {layers} layers"
        )));
    }
    Ok(counts)
}

/// `bench`: the checkpoint, what to measure, and the baseline to hold it to.
pub struct BenchSettings {
    pub model: ModelFile,
    pub options: BenchOptions,
    pub baseline: Option<BenchReport>,
    pub threshold: f64,
}

impl BenchSettings {
    /// Checks the flags, reads the baseline and picks the layer counts.
    pub fn resolve(a: &BenchArgs) -> Result<BenchSettings> {
        if a.threshold.is_nan() || a.threshold < 0.0 {
            bail!(UsageError::new(
                "--threshold must be 0 or more (0.10 = 10%)"
            ));
        }
        refuse_unused_gpu(&a.engine, &a.gpu, false)?;
        let baseline = a.baseline.as_deref().map(BenchReport::read).transpose()?;
        // Outputs are checked now, not after the whole bench: none may replace an input.
        for path in [&a.plot, &a.output.json_out].into_iter().flatten() {
            vibeoffload::output::check_target(path)?;
        }
        let model = model_file(&a.checkpoint)?;
        let layer_counts = layer_counts(a.layers.as_deref(), &model.open()?)?;
        let workload = workload(&a.timing)?;
        let mut plan = plan_options(&a.plan, Scope::LanguageModel, false)?;
        if a.plan.max_seq_len.is_none() {
            // Just what the runs need, so the estimate and the measurement describe the same
            // buffers.
            plan.max_seq_len = workload.cache_tokens() as u64;
        }
        // Each row decodes too.
        check_cache_room(&workload, true, plan.max_seq_len)?;
        let engine = engine_options(&a.engine, &plan, &a.gpu.selector())?;
        let here = vibeoffload::measure::calibrate::this_machine(engine.device);
        let calibration = match a.calibrate {
            // Measuring it anew: the stored one is not read.
            true => None,
            false => super::calibration::find(a.calibration.calibration.as_deref(), &here)?,
        };
        progress::setting("layer counts", &layer_counts);
        show_run("engine (gpu_layers: each row's)", &engine, &plan, &workload);
        Ok(BenchSettings {
            options: BenchOptions {
                engine,
                plan,
                layer_counts,
                auto_cpu_layers: a.plan.cpu_layers == CpuLayersArg::Auto,
                calibration,
                workload,
            },
            model,
            baseline,
            threshold: a.threshold,
        })
    }
}

/// `bench --speech`: the checkpoint and what to speak at each layer count.
pub struct SpeechBenchSettings {
    pub model: ModelFile,
    pub options: SpeechBenchOptions,
    /// Holds the WAV without --out; removed when dropped.
    _scratch: Option<tempfile::TempDir>,
}

/// The script spoken without --script: one speaker, no voice, so it runs anywhere.
const BUILTIN_SCRIPT: &str = "Speaker 1: This is how fast the speech pipeline runs.";

impl SpeechBenchSettings {
    /// Checks the flags and outputs, opens the model and picks the layer counts.
    pub fn resolve(a: &BenchArgs) -> Result<SpeechBenchSettings> {
        let s = &a.speech_args;
        refuse_unused_gpu(&a.engine, &a.gpu, false)?;
        // Outputs are checked now, not after the whole bench: none may replace an input.
        for path in [&a.plot, &a.output.json_out, &s.out].into_iter().flatten() {
            vibeoffload::output::check_target(path)?;
        }
        refuse_gpu_speech_flags(&a.engine, s.no_cuda_graphs, s.offload_prediction_head)?;
        if s.force_frames == 0 {
            bail!(UsageError::new(
                "--force-frames 0 would speak nothing: use 1 or more"
            ));
        }
        if !(s.cfg_scale.is_finite() && s.cfg_scale >= 0.0) {
            bail!(UsageError::new(
                "--cfg-scale must be a number, 0 or more (the demos use 1.3)"
            ));
        }
        let script = match &s.script {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read the script {}: {e}", path.display())
                })?;
                vibeoffload::output::record_input(path);
                prompt::script_from_text_file(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            None => BUILTIN_SCRIPT.to_string(),
        };
        let model = speech_model_file(&a.checkpoint)?;
        let info = model.open()?;
        if info.speech.is_none() {
            bail!(
                "{} has no speech components: bench --speech needs a VibeVoice checkpoint \
                 (`vibeoffload synth` writes one); `bench` without --speech measures its \
                 language model",
                info.source
            );
        }
        let layer_counts = layer_counts(a.layers.as_deref(), &info)?;
        refuse_auto_cpu_layers(&a.plan)?;
        let plan = plan_options(&a.plan, Scope::Full, s.offload_prediction_head)?;
        let engine = engine_options(&a.engine, &plan, &a.gpu.selector())?;
        let (out, scratch) = match &s.out {
            Some(path) => (path.clone(), None),
            None => {
                let dir = tempfile::tempdir()?;
                vibeoffload::output::remove_on_interrupt(dir.path());
                (dir.path().join("bench-speech.wav"), Some(dir))
            }
        };
        progress::setting("layer counts", &layer_counts);
        progress::setting("engine (gpu_layers: each row's)", &engine);
        let seed = a.timing.seed;
        Ok(SpeechBenchSettings {
            model,
            options: SpeechBenchOptions {
                request: Request {
                    script,
                    voices: s.voices.clone(),
                    out,
                    force: s.force,
                    engine,
                    cfg_scale: s.cfg_scale,
                    steps: s.steps as usize,
                    seed,
                    max_frames: None,
                    force_frames: Some(s.force_frames),
                    voice_latents: VoiceLatents::Sample(seed),
                    separate_passes: false,
                    graphs: !s.no_cuda_graphs,
                    offload_prediction_head: s.offload_prediction_head,
                    noise: None,
                    dump_latents: None,
                    vram_baseline: None,
                },
                force_frames: s.force_frames,
                layer_counts,
            },
            _scratch: scratch,
        })
    }
}
