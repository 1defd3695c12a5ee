//! `generate --offload-prediction-head` on the GPU (needs the `cuda` feature and a GPU): the
//! embedded speech model speaks with the diffusion head on the CPU in f32 and with it on the
//! GPU. The language model's first pass (the first frame's conditions) is the same bits; the
//! first latent differs only by the head's dtype (printed, "worst" line); the head's frames
//! run as CUDA graphs only on the GPU, the other components' in both.

#![cfg(feature = "cuda")]

use super::relative;
use candle_core::{DType, Device};
use std::path::Path;
use vibeoffload::checkpoint::CheckpointDtype;
use vibeoffload::engine::{DeviceChoice, EngineOptions};
use vibeoffload::generate::{run_generation, GenerateReport, Request, VoiceLatents};
use vibeoffload::measure::ModelFile;

const FRAMES: usize = 4;

/// Each frame's conditions and latent, and the audio, as f32 values.
struct Dumped {
    conditions: Vec<Vec<f32>>,
    latents: Vec<Vec<f32>>,
    audio: Vec<f32>,
}

/// The embedded model on CUDA, two of its layers streamed, `FRAMES` forced frames, with the
/// head on the CPU when `offload`: the report and what `--dump-latents` wrote.
fn speak(dir: &Path, offload: bool) -> (GenerateReport, Dumped) {
    let model = ModelFile::embedded_speech(CheckpointDtype::Float8).unwrap();
    let name = if offload { "offloaded" } else { "on-gpu" };
    let dump = dir.join(format!("{name}.safetensors"));
    let request = Request {
        script: "Speaker 1: Hello there, how are you?".into(),
        voices: Vec::new(),
        out: dir.join(format!("{name}.wav")),
        force: true,
        engine: EngineOptions {
            device: DeviceChoice::Cuda(0),
            gpu_layers: 6,
            ..EngineOptions::default()
        },
        cfg_scale: 1.3,
        steps: 10,
        seed: 7,
        max_frames: None,
        force_frames: Some(FRAMES),
        voice_latents: VoiceLatents::Mean,
        separate_passes: false,
        graphs: true,
        offload_prediction_head: offload,
        noise: None,
        dump_latents: Some(dump.clone()),
        vram_baseline: None,
    };
    let report = run_generation(&model, &request, |_| {}, |_| {}).unwrap();
    let tensors = candle_core::safetensors::load(&dump, &Device::Cpu).unwrap();
    let rows = |name: &str| -> Vec<Vec<f32>> {
        let t = tensors[name].to_dtype(DType::F32).unwrap();
        let frames = t.dim(0).unwrap();
        let t = t.reshape((frames, ())).unwrap();
        t.to_vec2().unwrap()
    };
    let dumped = Dumped {
        conditions: rows("conditions"),
        latents: rows("latents"),
        audio: tensors["audio"].to_vec1().unwrap(),
    };
    (report, dumped)
}

#[test]
fn the_diffusion_head_offloaded_to_the_cpu_follows_the_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let (on_gpu, gpu) = speak(dir.path(), false);
    let (offloaded, cpu) = speak(dir.path(), true);
    assert!(offloaded.prediction_head_offloaded && !on_gpu.prediction_head_offloaded);
    assert_eq!((on_gpu.frames, offloaded.frames), (FRAMES, FRAMES));
    assert!(offloaded.estimate_bytes < on_gpu.estimate_bytes);
    // No CUDA graph on the CPU; the decoder's and the semantic encoder's are unchanged.
    assert_eq!(offloaded.graph_runs.head, 0);
    assert!(on_gpu.graph_runs.head > 0, "{:?}", on_gpu.graph_runs);
    assert_eq!(
        (offloaded.graph_runs.decoder, offloaded.graph_runs.semantic),
        (on_gpu.graph_runs.decoder, on_gpu.graph_runs.semantic)
    );
    assert!(
        cpu.conditions[0] == gpu.conditions[0],
        "the first frame's conditions differ: the language model ran differently"
    );
    let frame0 = relative(&cpu.latents[0], &gpu.latents[0]);
    let audio = relative(&cpu.audio, &gpu.audio);
    println!(
        "worst relative error, the head on the CPU in f32 vs on the GPU in the components' dtype: latent of frame 0 {frame0:.2e}, audio {audio:.2e}"
    );
    // Only the head's dtype and the noise's rounding differ at frame 0: a bound that still
    // catches a wrong sign, a swapped condition or a latent from the wrong head.
    assert!(frame0 < 0.2, "frame 0's latent: {frame0}");
    assert!(cpu.audio.iter().all(|s| s.is_finite()));
    assert_eq!(cpu.audio.len(), gpu.audio.len());
}
