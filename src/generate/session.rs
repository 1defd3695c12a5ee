//! The `generate` command as a library function: a script and voice samples in, a WAV file
//! out, with a report of where the time went.

use super::{
    generate, max_steps, prompt_embeddings, GraphRuns, Noise, Options, Timings, VoiceLatents,
};
use super::{load_model, LoadedModel};
use crate::audio::{self, SAMPLE_RATE};
use crate::engine::{EngineOptions, LoadProgress, TransferStats};
use crate::measure::{taken_bytes, GpuProbe, ModelFile};
use crate::output::Output;
use crate::plan::memory::MAX_SEQ_LEN;
use crate::plan::{self, PlanOptions, Scope};
use crate::rng::Rng;
use crate::text::{prompt, TextTokenizer};
use crate::UsageError;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Request {
    /// The script: `Speaker N: text` lines.
    pub script: String,
    /// One voice sample per speaker, in speaker order (none: no voice section).
    pub voices: Vec<PathBuf>,
    /// The WAV file to write.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
    /// Engine settings, the layer count included (`max_seq_len` is sized from the prompt).
    pub engine: EngineOptions,
    /// Guidance scale.
    pub cfg_scale: f64,
    /// Diffusion steps per frame.
    pub steps: usize,
    /// Seed of the diffusion noise (and of the voice samples with [`VoiceLatents::Sample`]).
    pub seed: u64,
    /// Stop after this many frames.
    pub max_frames: Option<usize>,
    /// Produce exactly this many frames whatever the language model chooses (a benchmark mode
    /// for random weights).
    pub force_frames: Option<usize>,
    /// How voice latents are taken.
    pub voice_latents: VoiceLatents,
    /// The guidance pass on its own pass over the layers (see [`Options::separate_passes`]).
    pub separate_passes: bool,
    /// Replay each frame's speech components as CUDA graphs (see [`Options::graphs`]).
    pub graphs: bool,
    /// Keep the diffusion head on the CPU in f32 (its weights in host memory, off the GPU):
    /// each frame's conditions go there and its latent comes back.
    pub offload_prediction_head: bool,
    /// Initial diffusion noise per frame from this safetensors file (`noise`, `[frames,
    /// latent]`) instead of the seeded generator.
    pub noise: Option<PathBuf>,
    /// Write every frame's latent, the conditions, the tokens and the audio here (safetensors).
    pub dump_latents: Option<PathBuf>,
    /// GPU memory in use (all processes) before this process first used the device; `None`:
    /// read at the start of this run. Runs that follow others in one process (the benchmarks)
    /// pass the reading taken before the first, so every row counts the CUDA context, as the
    /// estimate does.
    pub vram_baseline: Option<u64>,
}

/// What `generate` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateReport {
    /// `vibeoffload.generate/1`.
    pub schema: String,
    /// The tool that wrote it: version and commit.
    pub tool: String,
    /// The model.
    pub model: String,
    /// Where it ran.
    pub device: String,
    /// Decoder layers resident on the device.
    pub gpu_layers: usize,
    /// The WAV written.
    pub out: PathBuf,
    /// Speakers in the script.
    pub speakers: usize,
    /// Prompt tokens (voice placeholders included).
    pub prompt_tokens: usize,
    /// Latent frames produced.
    pub frames: usize,
    /// Seconds of audio written.
    pub audio_seconds: f64,
    /// Wall time of the generation loop (prompt prefill included, loading excluded).
    pub generation_ms: f64,
    /// Generation time over audio time (below 1: faster than real time); none without audio.
    pub real_time_factor: Option<f64>,
    /// Model load time.
    pub load_ms: f64,
    /// Where the generation time went.
    pub timings: Timings,
    /// How the loop ended.
    pub stop: String,
    /// Whether the frame schedule was forced (`--force-frames`).
    pub forced_frames: bool,
    /// The planner's estimate for the whole model with both KV caches at this script's
    /// length (`max_seq_len` positions each).
    pub estimate_bytes: u64,
    /// KV positions per cache the run was sized for.
    pub max_seq_len: usize,
    /// GPU memory this run took at its peak, per NVML (peak minus what was in use before it
    /// loaded); none on the CPU.
    pub measured_bytes: Option<u64>,
    /// The streamer's copies during the generation loop, and how long the compute stream
    /// waited for them.
    #[serde(default)]
    pub transfer: TransferStats,
    /// Frames whose speech components ran as replayed CUDA graphs.
    #[serde(default)]
    pub graph_runs: GraphRuns,
    /// Whether the diffusion head ran on the CPU (`--offload-prediction-head`), its weights
    /// left out of the estimate and off the GPU.
    #[serde(default)]
    pub prediction_head_offloaded: bool,
}

/// KV positions a generation from a prompt of `prompt_tokens` needs with a model of
/// `context` positions: the prompt, then the original's limit in steps ([`max_steps`]: twice
/// the prompt, within the context), or the forced frames and the closing eos.
pub fn positions(prompt_tokens: usize, force_frames: Option<usize>, context: usize) -> usize {
    let steps = force_frames.map_or(max_steps(prompt_tokens, context), |k| k + 1);
    prompt_tokens + steps + 1
}

/// The prompt of `script` (a `.txt` script's text) with voice samples of `voice_frames`
/// frames each, tokenized with the embedded Qwen2.5 tokenizer: its length in tokens.
pub fn prompt_tokens(script: &str, voice_frames: &[usize]) -> Result<usize> {
    let lines = prompt::parse_script(script)?;
    let tokenizer = TextTokenizer::embedded()?;
    Ok(prompt::build(&tokenizer, &lines, voice_frames)?.ids.len())
}

/// Loads `model`, generates `request`'s script in its voices and writes the WAV;
/// `load_progress` hears the load's phases, `progress(seconds)` the audio produced so far.
pub fn run_generation(
    model: &ModelFile,
    request: &Request,
    load_progress: impl FnMut(LoadProgress),
    mut progress: impl FnMut(f64),
) -> Result<GenerateReport> {
    if !request.force && request.out.exists() {
        bail!(UsageError::new(format!(
            "{} exists: pass --force to replace it",
            request.out.display()
        )));
    }
    let info = model.open()?;
    let model_name = info.source.clone();
    let Some(speech_config) = &info.speech else {
        bail!("{model_name} has no speech components: generate needs a VibeVoice checkpoint");
    };
    let hop = speech_config.acoustic.encoder.hop();

    // Text: the tokenizer beside the checkpoint if there is one, else the embedded Qwen2.5.
    let dir = model.path().parent().unwrap_or(Path::new("."));
    let tokenizer = match dir.join("vocab.json").exists() {
        true => TextTokenizer::from_dir(dir)?,
        false => TextTokenizer::embedded()?,
    };
    let lines =
        prompt::parse_script(&request.script).map_err(|e| UsageError::new(format!("{e}")))?;
    let speakers = prompt::speaker_count(&lines);
    if !request.voices.is_empty() && request.voices.len() < speakers {
        bail!(UsageError::new(format!(
            "the script has {speakers} speakers but {} --voice {} given: give one voice sample per speaker, in speaker order",
            request.voices.len(),
            if request.voices.len() == 1 { "was" } else { "were" }
        )));
    }
    // The original uses the first voice samples, one per speaker.
    let voices: Vec<Vec<f32>> = request.voices[..speakers.min(request.voices.len())]
        .iter()
        .map(|path| audio::read_voice(path))
        .collect::<Result<_>>()?;
    let frames: Vec<usize> = voices.iter().map(|v| v.len().div_ceil(hop)).collect();
    let prompt = prompt::build(&tokenizer, &lines, &frames)?;
    let vocab = info.config.vocab_size;
    if let Some(id) = prompt.ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("token {id} of the prompt is outside {model_name}'s vocabulary of {vocab}: its tokenizer is not Qwen2.5's");
    }
    let special = tokenizer.special();

    // The original stops at twice the prompt, within the context; the KV cache holds that and
    // the prompt.
    let forced = request.force_frames.map(|k| {
        let mut tokens = vec![special.speech_diffusion; k];
        tokens.push(special.eos);
        tokens
    });
    let context = info.config.max_position_embeddings;
    let max_seq_len = positions(prompt.ids.len(), request.force_frames, context);
    if max_seq_len as u64 > MAX_SEQ_LEN {
        bail!(
            "the prompt ({} tokens) and its generation need {max_seq_len} positions, more than {MAX_SEQ_LEN}: shorten the script or the voice samples",
            prompt.ids.len()
        );
    }
    let engine_options = EngineOptions {
        max_seq_len,
        ..request.engine.clone()
    };
    let gpu_layers = engine_options.gpu_layers;
    let plan = PlanOptions {
        scope: Scope::Full,
        max_seq_len: max_seq_len as u64,
        placement: engine_options.placement,
        stream_slots: engine_options.slots,
        cpu_layers: engine_options.cpu_layers,
        offload_prediction_head: request.offload_prediction_head,
        ..PlanOptions::default()
    };
    let estimate_bytes = plan::estimate(&info, &plan, gpu_layers)?.total_bytes;
    let probe = GpuProbe::of(engine_options.device);
    let used_before = request.vram_baseline.or_else(|| probe.used_bytes());
    let peak = probe.watch_peak();
    let started = Instant::now();
    let LoadedModel {
        mut engine, speech, ..
    } = load_model(
        info,
        &engine_options,
        request.offload_prediction_head,
        load_progress,
    )?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let device = probe.label();

    let voice_inputs = voices
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let latents = match request.voice_latents {
                VoiceLatents::Sample(_) => VoiceLatents::Sample(request.seed ^ (i as u64 + 1)),
                mean => mean,
            };
            speech
                .encode_voice(v, latents)
                .with_context(|| format!("voice {}", request.voices[i].display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let embeddings = prompt_embeddings(&engine, &prompt.ids, &prompt.speech_input, &voice_inputs)?;

    let mut noise = match &request.noise {
        None => Noise::Seeded(Rng::new(request.seed)),
        Some(path) => Noise::Recorded(read_noise(path)?),
    };
    if let Some(path) = &request.dump_latents {
        crate::output::check_target(path)?;
    }
    let out = Output::begin(&request.out)?;
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut wav = hound::WavWriter::create(out.temp_path(), spec)
        .map_err(|e| anyhow!("cannot write {}: {e}", request.out.display()))?;
    // The header is rewritten after every frame, so Ctrl-C leaves a valid, shorter WAV.
    wav.flush()?;
    out.keep_on_interrupt(!request.force);
    let options = Options {
        cfg_scale: request.cfg_scale,
        steps: request.steps,
        max_frames: request.max_frames,
        forced,
        separate_passes: request.separate_passes,
        graphs: request.graphs,
    };
    let mut written = 0usize;
    let keep_audio = request.dump_latents.is_some();
    let mut audio_dump: Vec<f32> = Vec::new();
    engine.reset_stats()?;
    let started = Instant::now();
    let outcome = generate(
        &mut engine,
        &speech,
        special,
        &embeddings,
        &options,
        &mut noise,
        &mut |samples| {
            for &s in samples {
                wav.write_sample((s.clamp(-1.0, 1.0) * i16::MAX as f32).round() as i16)?;
            }
            wav.flush()?;
            if keep_audio {
                audio_dump.extend_from_slice(samples);
            }
            written += samples.len();
            progress(written as f64 / SAMPLE_RATE as f64);
            Ok(())
        },
    )?;
    let generation_ms = started.elapsed().as_secs_f64() * 1e3;
    let transfer = engine.transfer_stats()?;
    let measured_bytes = taken_bytes(used_before, peak.map(crate::gpu::PeakSampler::finish));
    wav.finalize()
        .map_err(|e| anyhow!("cannot write {}: {e}", request.out.display()))?;
    match request.force {
        true => out.commit()?,
        // Atomic: a file that appeared meanwhile is left alone.
        false => out.commit_new()?,
    }

    if let Some(path) = &request.dump_latents {
        dump(path, &outcome, &audio_dump)?;
    }
    let audio_seconds = outcome.samples as f64 / SAMPLE_RATE as f64;
    let last = outcome.tokens.last().copied();
    let stop = match last {
        Some(t) if t == special.eos => "end of speech (eos)",
        _ if request
            .max_frames
            .is_some_and(|m| outcome.latents.len() >= m) =>
        {
            "--max-frames"
        }
        _ if 2 * prompt.ids.len() > context.saturating_sub(prompt.ids.len()) => {
            "the model's context"
        }
        _ => "length limit (twice the prompt)",
    };
    Ok(GenerateReport {
        schema: "vibeoffload.generate/1".into(),
        tool: crate::TOOL.to_string(),
        model: model_name,
        device,
        gpu_layers,
        out: request.out.clone(),
        speakers,
        prompt_tokens: prompt.ids.len(),
        frames: outcome.latents.len(),
        audio_seconds,
        generation_ms,
        real_time_factor: (audio_seconds > 0.0).then(|| generation_ms / 1e3 / audio_seconds),
        load_ms,
        timings: outcome.timings,
        stop: stop.to_string(),
        forced_frames: request.force_frames.is_some(),
        estimate_bytes,
        max_seq_len,
        measured_bytes,
        transfer,
        graph_runs: outcome.graph_runs,
        prediction_head_offloaded: request.offload_prediction_head,
    })
}

/// The `noise` tensor of a `--noise` file: `[frames, latent]`, or the original's `[frames, 2,
/// latent]` draws (row 0 is the one used).
fn read_noise(path: &Path) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| anyhow!("cannot read the noise file {}: {e}", path.display()))?;
    crate::output::record_input(path);
    let noise = tensors.get("noise").ok_or_else(|| {
        anyhow!(
            "{} has no tensor named noise ([frames, latent])",
            path.display()
        )
    })?;
    let noise = match noise.rank() {
        2 => noise.clone(),
        3 => noise.narrow(1, 0, 1)?.squeeze(1)?,
        _ => bail!(
            "{}: noise is {:?}, not [frames, latent]",
            path.display(),
            noise.dims()
        ),
    };
    Ok(noise.to_dtype(DType::F32)?)
}

/// `--dump-latents`: latents `[frames, latent]`, conditions `[frames, 2, hidden]`, tokens and
/// audio, as safetensors through a temporary file.
fn dump(path: &Path, outcome: &super::Outcome, audio: &[f32]) -> Result<()> {
    let cpu =
        |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
    let mut tensors = HashMap::new();
    if !outcome.latents.is_empty() {
        tensors.insert(
            "latents".to_string(),
            cpu(Tensor::cat(&outcome.latents, 0)?)?,
        );
        tensors.insert(
            "conditions".to_string(),
            cpu(Tensor::stack(&outcome.conditions, 0)?)?,
        );
    }
    let tokens: Vec<i64> = outcome.tokens.iter().map(|&t| t as i64).collect();
    let n = tokens.len();
    tensors.insert(
        "tokens".to_string(),
        Tensor::from_vec(tokens, n, &Device::Cpu)?,
    );
    tensors.insert(
        "audio".to_string(),
        Tensor::from_slice(audio, audio.len(), &Device::Cpu)?,
    );
    let out = Output::begin(path)?;
    candle_core::safetensors::save(&tensors, out.temp_path())
        .with_context(|| format!("cannot write {}", path.display()))?;
    out.commit()
}
