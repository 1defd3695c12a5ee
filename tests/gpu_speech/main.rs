//! The speech path on the GPU (needs the `cuda` feature and a GPU): the tiny reference
//! generation replayed on CUDA in bf16 against the original's f32 run, streamed against
//! resident bit for bit, with CUDA graphs against without, the tokenizers' fused block ops and
//! the guided step against their CPU implementation; the 7B-sized components (`seven_b`) and
//! the diffusion head on the CPU (`offload_head`).

#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use vibeoffload::arch::speech::SpeechConfig;
use vibeoffload::checkpoint::ModelInfo;
use vibeoffload::engine::ops::{ChannelBias, ChannelNorm, ChannelResidual, DepthwiseMixer};
use vibeoffload::engine::{DeviceChoice, Engine, EngineOptions};
use vibeoffload::generate::{self, Noise, Options, SpeechModel, VoiceLatents};
use vibeoffload::speech::{
    CheckpointWeights, Decoder, DpmSolver, Encoder, PredictionHead, SafetensorsWeights, Scope,
};
use vibeoffload::text::SpecialTokens;

/// A fixture file: under the current directory's `tests/fixtures/speech` when there is one
/// (the GPU scripts run the carried test binary from the repository root), else the source
/// tree's.
fn fixture(name: &str) -> PathBuf {
    let here = Path::new("tests/fixtures/speech");
    let dir = match here.exists() {
        true => here.to_path_buf(),
        false => Path::new(env!("CARGO_MANIFEST_DIR")).join(here),
    };
    dir.join(name)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn relative(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    worst / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
}

/// What one replay of the reference run produced: conditions, latents, audio, and the frames
/// each speech component ran as a CUDA graph.
type Replayed = (Vec<f32>, Vec<f32>, Vec<f32>, generate::GraphRuns);

/// One forced replay of the reference run on CUDA with `gpu_layers` resident, the speech
/// components in `speech_dtype`, with or without CUDA graphs.
fn replay_with(gpu_layers: usize, speech_dtype: DType, graphs: bool) -> Replayed {
    let run = candle_core::safetensors::load(fixture("tiny.generation.safetensors"), &Device::Cpu)
        .unwrap();
    let get = |k: &str| run.get(k).unwrap().clone();
    let ids_of = |k: &str| -> Vec<u32> {
        let t = get(k).to_dtype(DType::I64).unwrap().flatten_all().unwrap();
        t.to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u32)
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    std::fs::copy(fixture("tiny.safetensors"), &path).unwrap();
    std::fs::copy(fixture("tiny.config.json"), dir.path().join("config.json")).unwrap();
    let options = EngineOptions {
        device: DeviceChoice::Cuda(0),
        gpu_layers,
        max_seq_len: 256,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(ModelInfo::open(&path).unwrap(), &options, |_| {}).unwrap();
    let info = ModelInfo::open(&path).unwrap();
    let device = engine.device().clone();
    let weights = CheckpointWeights::new(&info, &device, speech_dtype).unwrap();
    let speech = SpeechModel::load(
        &weights,
        info.speech.as_ref().unwrap(),
        64,
        &device,
        speech_dtype,
    )
    .unwrap();
    let id = |k: &str| ids_of(k)[0];
    let special = SpecialTokens {
        speech_start: id("speech_start_id"),
        speech_end: id("speech_end_id"),
        speech_diffusion: id("speech_diffusion_id"),
        eos: id("eos_token_id"),
    };
    let audio = host(&get("voice_audio"));
    let voice = speech.encode_voice(&audio, VoiceLatents::Mean).unwrap();
    let mask: Vec<bool> = ids_of("speech_input_mask")
        .iter()
        .map(|&m| m != 0)
        .collect();
    let prompt =
        generate::prompt_embeddings(&engine, &ids_of("input_ids"), &mask, &[voice]).unwrap();
    let noise = get("noise").narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let options = Options {
        cfg_scale: 1.3,
        steps: 10,
        max_frames: None,
        forced: Some(ids_of("tokens")),
        separate_passes: false,
        graphs,
    };
    let mut samples = Vec::new();
    let outcome = generate::generate(
        &mut engine,
        &speech,
        special,
        &prompt,
        &options,
        &mut Noise::Recorded(noise),
        &mut |chunk| {
            samples.extend_from_slice(chunk);
            Ok(())
        },
    )
    .unwrap();
    let conditions = host(&Tensor::stack(&outcome.conditions, 0).unwrap());
    let latents = host(&Tensor::stack(&outcome.latents, 0).unwrap());
    (conditions, latents, samples, outcome.graph_runs)
}

/// [`replay_with`] with CUDA graphs, as `generate` runs: conditions, latents and audio.
fn replay(gpu_layers: usize, speech_dtype: DType) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (conditions, latents, audio, _) = replay_with(gpu_layers, speech_dtype, true);
    (conditions, latents, audio)
}

/// Each frame's speech components replayed as CUDA graphs give the bits they give launched
/// one by one, across the reference run's decoder reset (forced D, D, E, S, D, D, EOS: the
/// head's graph is captured at frame 0 and replayed to frame 3; each tokenizer's is captured
/// at frame 1 (frame 0 fills its caches), dropped at speech_end, and captured again at frame
/// 3).
#[test]
fn speech_components_replayed_as_cuda_graphs_give_the_same_bits() {
    let device = Device::new_cuda(0).unwrap();
    assert!(
        vibeoffload::engine::replay::available(&device),
        "this GPU cannot capture CUDA graphs (no stream-ordered allocation)"
    );
    for dtype in [DType::F32, DType::BF16] {
        let (c, l, a, runs) = replay_with(2, dtype, true);
        let (c0, l0, a0, none) = replay_with(2, dtype, false);
        let expected = generate::GraphRuns {
            head: 4,
            decoder: 2,
            semantic: 2,
        };
        assert_eq!(runs, expected, "{dtype:?}: frames run as graphs");
        assert_eq!(
            none,
            generate::GraphRuns::default(),
            "{dtype:?}: graphs off"
        );
        assert!(
            c == c0 && l == l0 && a == a0,
            "{dtype:?}: graphs change the result"
        );
        // Streamed layers and graphs together, against resident without graphs.
        let (_, ls, as_, _) = replay_with(1, dtype, true);
        assert!(
            ls == l0 && as_ == a0,
            "{dtype:?}: streamed with graphs differs"
        );
    }
}

/// The language model runs in bf16 on the GPU (its conditions carry bf16 rounding); the
/// speech components in f32 then follow the original closely, and in bf16 less so. Printed per
/// part ("worst" lines); streamed equals resident bit for bit.
#[test]
fn the_reference_generation_replays_on_the_gpu() {
    let run = candle_core::safetensors::load(fixture("tiny.generation.safetensors"), &Device::Cpu)
        .unwrap();
    let (theirs_c, theirs_l, theirs_a) = (
        host(&run["conditions"]),
        host(&run["latents"]),
        host(&run["audio"]),
    );
    let latent_size = 8;
    let mut first_frame = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let (conditions, latents, audio) = replay(2, dtype);
        let frame0 = relative(&latents[..latent_size], &theirs_l[..latent_size]);
        println!(
            "worst relative error, bf16 LM + {dtype:?} speech vs the original: conditions {:.2e}, latent of frame 0 {frame0:.2e}, all latents {:.2e}, audio {:.2e}",
            relative(&conditions, &theirs_c),
            relative(&latents, &theirs_l),
            relative(&audio, &theirs_a)
        );
        // f32 speech: only the language model's bf16 rounding (1.5e-2 on an H200). bf16 speech
        // compounds it through the connectors frame after frame (9e-2 conditions, 0.24 audio
        // on four random frames): a bound that still catches a wrong sign or a missed reset.
        let (conditions_bound, audio_bound) = match dtype {
            DType::F32 => (0.05, 0.05),
            _ => (0.2, 0.5),
        };
        assert!(
            relative(&conditions, &theirs_c) < conditions_bound,
            "conditions"
        );
        assert!(relative(&audio, &theirs_a) < audio_bound, "audio");
        first_frame.push(frame0);
        let (_, streamed_latents, streamed_audio) = replay(1, dtype);
        assert!(
            streamed_latents == latents && streamed_audio == audio,
            "streamed differs from resident ({dtype:?})"
        );
    }
    assert!(
        first_frame[0] < 0.1,
        "frame 0 with f32 speech: {}",
        first_frame[0]
    );
}

/// The components alone on the GPU in f32 against the original's recorded calls: the same
/// code as on the CPU through candle's CUDA kernels.
#[test]
fn speech_components_match_the_original_on_the_gpu_in_f32() {
    let device = Device::new_cuda(0).unwrap();
    for name in ["tiny", "hop3200"] {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("{name}.config.json"))).unwrap(),
        )
        .unwrap();
        let hidden = json["decoder_config"]["hidden_size"].as_u64().unwrap_or(64) as usize;
        let config =
            SpeechConfig::from_config_value(&json, hidden, Path::new("config.json")).unwrap();
        let weights = SafetensorsWeights::load(
            &fixture(&format!("{name}.safetensors")),
            DType::F32,
            &device,
        )
        .unwrap();
        let calls =
            candle_core::safetensors::load(fixture(&format!("{name}.calls.safetensors")), &device)
                .unwrap();
        let scope = |p: &str| Scope::new(&weights, p);
        let encoder =
            Encoder::new(&config.acoustic, &scope("model.acoustic_tokenizer.encoder")).unwrap();
        let decoder =
            Decoder::new(&config.acoustic, &scope("model.acoustic_tokenizer.decoder")).unwrap();
        let semantic =
            Encoder::new(&config.semantic, &scope("model.semantic_tokenizer.encoder")).unwrap();
        let check = |what: &str, ours: &Tensor, key: &str| {
            let err = relative(&host(ours), &host(&calls[key]));
            println!("worst relative error, {name} {what} on the GPU (f32): {err:.2e}");
            assert!(err <= 1e-4, "{name} {what}: {err}");
        };
        check(
            "acoustic encoder",
            &encoder.encode(&calls["acoustic_encode.audio"]).unwrap(),
            "acoustic_encode.mean",
        );
        let latents = &calls["acoustic_decode.latents"];
        check(
            "acoustic decoder",
            &decoder.decode(latents).unwrap(),
            "acoustic_decode.audio",
        );
        let mut state = decoder.stream_state();
        let frames: Vec<Tensor> = (0..latents.dim(1).unwrap())
            .map(|f| {
                decoder
                    .decode_chunk(&latents.narrow(1, f, 1).unwrap(), &mut state)
                    .unwrap()
            })
            .collect();
        check(
            "streaming acoustic decoder",
            &Tensor::cat(&frames, 2).unwrap(),
            "acoustic_decode_stream.audio",
        );
        check(
            "semantic encoder",
            &semantic.encode(&calls["semantic_encode.audio"]).unwrap(),
            "semantic_encode.mean",
        );
        if name == "tiny" {
            let head = PredictionHead::new(&config.head, &scope("model.prediction_head")).unwrap();
            let out = head
                .forward(
                    &calls["prediction_head.noisy"],
                    &calls["prediction_head.timesteps"],
                    &calls["prediction_head.condition"],
                )
                .unwrap();
            check("diffusion head", &out, "prediction_head.output");
        }
    }
}

/// A random `[dims]` tensor on the CPU in `dtype` (normal draws).
fn random(seed: u64, dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.iter().product();
    let values = vibeoffload::rng::Rng::new(seed).normals(n);
    Tensor::from_vec(values, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The fused ops' CUDA kernels against their CPU implementation, f32 and bf16, on sizes off
/// the kernels' tiles (32 steps, 64 channels), on strided inputs, and streamed: chunks of 1,
/// 3 and 40 steps (shorter and longer than the cache) equal the whole signal exactly; the
/// channel bias gives the CPU's bits.
#[test]
fn fused_block_ops_on_cuda_match_their_cpu_implementation() {
    let gpu = Device::new_cuda(0).unwrap();
    let on = |t: &Tensor| t.to_device(&gpu).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        // bf16: a rounding flip of an intermediate (the sums of squares add up in another
        // order) moves an output by a bf16 step.
        let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let check = |what: &str, gpu: &Tensor, cpu: &Tensor| {
            assert_eq!(gpu.dims(), cpu.dims(), "{what}");
            let err = relative(&host(gpu), &host(cpu));
            println!("worst relative error, fused {what} CUDA vs CPU ({dtype:?}): {err:.2e}");
            assert!(err <= bound, "{what} ({dtype:?}): {err}");
        };
        for (batch, channels, len) in [(2, 37, 45), (1, 131, 75), (1, 2048, 1), (3, 5, 7)] {
            let mixer = DepthwiseMixer {
                norm: random(1, &[channels], dtype),
                eps: 1e-5,
                taps: random(2, &[channels, 7], DType::F32),
                bias: random(3, &[channels], dtype),
                gamma: random(4, &[channels], dtype),
                stream: false,
            };
            let mixer_gpu = DepthwiseMixer {
                norm: on(&mixer.norm),
                taps: on(&mixer.taps),
                bias: on(&mixer.bias),
                gamma: on(&mixer.gamma),
                ..mixer.clone()
            };
            // [B, C, T] as the transpose of [B, T, C]: strided.
            let x = random(5, &[batch, len, channels], dtype)
                .transpose(1, 2)
                .unwrap();
            let size = format!("mixer [{batch}, {channels}, {len}]");
            let whole_gpu = on(&x).apply_op1_no_bwd(&mixer_gpu).unwrap();
            check(&size, &whole_gpu, &x.apply_op1_no_bwd(&mixer).unwrap());
            let stream = DepthwiseMixer {
                stream: true,
                ..mixer_gpu.clone()
            };
            let cached = random(6, &[batch, channels, 6], dtype);
            check(
                &format!("{size} with a cache"),
                &on(&x).apply_op2_no_bwd(&on(&cached), &stream).unwrap(),
                &x.apply_op2_no_bwd(
                    &cached,
                    &DepthwiseMixer {
                        stream: true,
                        ..mixer.clone()
                    },
                )
                .unwrap(),
            );
            let (mut outs, mut cache, mut at) = (Vec::new(), None::<Tensor>, 0);
            for n in [1, 3, 40].iter().cycle() {
                let n = (*n).min(len - at);
                let chunk = on(&x.narrow(2, at, n).unwrap());
                let out = match &cache {
                    Some(c) => chunk.apply_op2_no_bwd(c, &stream).unwrap(),
                    None => chunk.apply_op1_no_bwd(&stream).unwrap(),
                };
                cache = Some(out.narrow(2, n, 6).unwrap());
                outs.push(out.narrow(2, 0, n).unwrap());
                at += n;
                if at == len {
                    break;
                }
            }
            let streamed = Tensor::cat(&outs, 2).unwrap();
            assert!(
                host(&streamed) == host(&whole_gpu),
                "{size} streamed ({dtype:?})"
            );

            let norm = ChannelNorm {
                weight: random(7, &[channels], dtype),
                eps: 1e-5,
            };
            let norm_gpu = ChannelNorm {
                weight: on(&norm.weight),
                ..norm.clone()
            };
            check(
                &format!("channel norm [{batch}, {channels}, {len}]"),
                &on(&x).apply_op1_no_bwd(&norm_gpu).unwrap(),
                &x.apply_op1_no_bwd(&norm).unwrap(),
            );
            let residual = ChannelResidual {
                gamma: random(8, &[channels], dtype),
            };
            let residual_gpu = ChannelResidual {
                gamma: on(&residual.gamma),
            };
            let h = random(9, &[batch, len, channels], dtype);
            check(
                &format!("channel residual [{batch}, {channels}, {len}]"),
                &on(&x).apply_op2_no_bwd(&on(&h), &residual_gpu).unwrap(),
                &x.apply_op2_no_bwd(&h, &residual).unwrap(),
            );
            // One sum each, rounded once: the CPU's bits.
            let bias = ChannelBias {
                bias: random(10, &[channels], dtype),
            };
            let bias_gpu = ChannelBias {
                bias: on(&bias.bias),
            };
            assert!(
                host(&on(&x).apply_op1_no_bwd(&bias_gpu).unwrap())
                    == host(&x.apply_op1_no_bwd(&bias).unwrap()),
                "channel bias [{batch}, {channels}, {len}] ({dtype:?})"
            );
        }
    }
}

/// The sampler's guided step op on CUDA gives the CPU's bits (the same f32 operations, each
/// rounded to the dtype where the op says), first and second order, f32 and bf16.
#[test]
fn the_guided_step_on_cuda_matches_its_cpu_implementation() {
    let cuda = Device::new_cuda(0).unwrap();
    let solver = DpmSolver::new(1000, 10).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (mut on_cpu, mut on_gpu) = (solver.start(), solver.start());
        let mut x = random(1, &[2, 64], dtype);
        let mut x_gpu = x.to_device(&cuda).unwrap();
        let mut seed = 2;
        while on_cpu.timestep().is_some() {
            let v = random(seed, &[4, 64], dtype);
            seed += 1;
            x = on_cpu.guided_step(&v, &x, 1.3).unwrap();
            x_gpu = on_gpu
                .guided_step(&v.to_device(&cuda).unwrap(), &x_gpu, 1.3)
                .unwrap();
            let bits = |t: &Tensor| -> Vec<u32> { host(t).iter().map(|v| v.to_bits()).collect() };
            assert_eq!(bits(&x), bits(&x_gpu), "{dtype:?}, step {}", seed - 2);
        }
    }
}

mod offload_head;
mod seven_b;
