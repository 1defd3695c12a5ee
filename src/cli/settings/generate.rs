//! `generate`'s settings: the checkpoint (or the embedded speech model) and the request.

use super::*;

/// `generate`: the checkpoint (or the embedded speech model) and the request.
pub fn generate_request(a: &GenerateArgs) -> Result<(ModelFile, Request)> {
    let embedded = a.checkpoint.model_path.is_none();
    let model = speech_model_file(&a.checkpoint)?;
    let script = match (&a.script, &a.text) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read the script {}: {e}", path.display()))?;
            vibeoffload::output::record_input(path);
            prompt::script_from_text_file(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        (None, Some(text)) => text.clone(),
        (None, None) => bail!(UsageError::new(
            "give the script with --script FILE or --text"
        )),
    };
    for path in [&a.output.json_out, &a.dump_latents].into_iter().flatten() {
        vibeoffload::output::check_target(path)?;
    }
    if !(a.cfg_scale.is_finite() && a.cfg_scale >= 0.0) {
        bail!(UsageError::new(
            "--cfg-scale must be a number, 0 or more (the demos use 1.3)"
        ));
    }
    if a.max_frames == Some(0) || a.force_frames == Some(0) {
        bail!(UsageError::new(
            "--max-frames and --force-frames must be at least 1"
        ));
    }
    // On the CPU, auto keeps every layer (or fits --vram): no GPU is read.
    refuse_unused_gpu(&a.engine, &a.gpu, false)?;
    refuse_gpu_speech_flags(&a.engine, a.no_cuda_graphs, a.offload_prediction_head)?;
    let info = model.open()?;
    let mut plan = PlanOptions {
        scope: Scope::Full,
        stream_slots: a.slots,
        cpu_layers: match a.cpu_layers {
            CpuLayersArg::Count(n) => n,
            CpuLayersArg::Auto => 0,
        },
        offload_prediction_head: a.offload_prediction_head,
        ..PlanOptions::default()
    };
    plan.validate()?;
    let budget = BudgetSource::resolve(&a.gpu, &a.budget)?;
    let engine = engine_options(&a.engine, &plan, &a.gpu.selector())?;
    let gpu_layers = match fixed_choice(&info, &a.choice)? {
        Some((_, layers)) => layers,
        None if engine.device == DeviceChoice::Cpu && budget.vram_bytes.is_none() => {
            info.inventory.num_layers()
        }
        None => budget.required()?.largest_fit(&info, &plan)?.gpu_layers,
    };
    // The positive and negative passes decode as one batch of two.
    plan.cpu_layers = resolve_cpu_layers(
        a.cpu_layers,
        a.calibration.calibration.as_deref(),
        &info,
        &plan,
        &engine,
        gpu_layers,
        2,
    )?;
    let engine = EngineOptions {
        gpu_layers,
        cpu_layers: plan.cpu_layers,
        ..engine
    };
    progress::setting("engine", &engine);
    let request = Request {
        script,
        voices: a.voices.clone(),
        out: a.out.clone(),
        force: a.force,
        engine,
        cfg_scale: a.cfg_scale,
        steps: a.steps as usize,
        seed: a.seed,
        max_frames: a.max_frames,
        // Random weights choose arbitrarily: the embedded model's schedule is forced.
        force_frames: a.force_frames.or(embedded.then_some(EMBEDDED_FRAMES)),
        voice_latents: match a.voice_latents {
            VoiceLatentsArg::Sample => VoiceLatents::Sample(a.seed),
            VoiceLatentsArg::Mean => VoiceLatents::Mean,
        },
        separate_passes: a.separate_cfg_passes,
        graphs: !a.no_cuda_graphs,
        offload_prediction_head: a.offload_prediction_head,
        noise: a.noise.clone(),
        dump_latents: a.dump_latents.clone(),
        vram_baseline: None,
    };
    Ok((model, request))
}

/// The speech flags that change only what runs on the GPU (`generate`'s and `bench
/// --speech`'s) would do nothing with `--device cpu`: refused, saying why.
pub(super) fn refuse_gpu_speech_flags(
    e: &EngineArgs,
    no_cuda_graphs: bool,
    offload_prediction_head: bool,
) -> Result<()> {
    if e.device != DeviceArg::Cpu {
        return Ok(());
    }
    if no_cuda_graphs {
        bail!(UsageError::new(
            "--no-cuda-graphs would do nothing: --device cpu launches no CUDA graphs; drop one of them"
        ));
    }
    if offload_prediction_head {
        bail!(UsageError::new(
            "--offload-prediction-head would do nothing: --device cpu runs the diffusion head on the CPU already; drop one of them"
        ));
    }
    Ok(())
}

/// Frames the embedded speech model produces by default (3.2 s of audio).
const EMBEDDED_FRAMES: usize = 24;
