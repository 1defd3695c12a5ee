//! Parity of the speech components with the original PyTorch code, against fixtures recorded
//! from it in `tests/fixtures/speech/`: weights in the original key layout with their
//! `config.json`, and each module's recorded inputs and outputs (f32).
//!
//! Tolerance: max |ours - theirs| / max |theirs| <= 1e-5 (per element for the sigmas, which
//! span five orders of magnitude).

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vibeoffload::arch::speech::SpeechConfig;
use vibeoffload::speech::{
    sample_latent, Connector, Decoder, DpmSolver, Encoder, PredictionHead, SafetensorsWeights,
    Scope,
};

const TOLERANCE: f32 = 1e-5;

/// The language model's width in a VibeVoice config.json.
fn hidden_size(json: &serde_json::Value) -> usize {
    json["decoder_config"]["hidden_size"].as_u64().unwrap() as usize
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/speech")
}

/// The fixture files `names` (committed: a missing one fails the test).
fn fixtures(names: &[String]) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = names.iter().map(|n| fixture_dir().join(n)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.exists()) {
        panic!(
            "fixture {} is absent: regenerate with scripts/speech-reference/make_fixtures.sh",
            missing.display()
        );
    }
    paths
}

/// A recorded model: its configuration, weights and module calls.
struct Recorded {
    name: &'static str,
    config: SpeechConfig,
    weights: SafetensorsWeights,
    calls: HashMap<String, Tensor>,
}

impl Recorded {
    fn load(name: &'static str) -> Recorded {
        let files = [".safetensors", ".config.json", ".calls.safetensors"]
            .map(|suffix| format!("{name}{suffix}"));
        let paths = fixtures(&files);
        let text = std::fs::read_to_string(&paths[1]).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let config =
            SpeechConfig::from_config_value(&json, hidden_size(&json), Path::new("config.json"))
                .unwrap();
        let weights = SafetensorsWeights::load(&paths[0], DType::F32, &Device::Cpu).unwrap();
        let calls = candle_core::safetensors::load(&paths[2], &Device::Cpu).unwrap();
        Recorded {
            name,
            config,
            weights,
            calls,
        }
    }

    /// The recorded tensor `key`, as f32.
    fn call(&self, key: &str) -> Tensor {
        self.calls
            .get(key)
            .unwrap_or_else(|| panic!("{}.calls.safetensors has no {key}", self.name))
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn scope(&self, prefix: &str) -> Scope<'_> {
        Scope::new(&self.weights, prefix)
    }
}

/// Both recorded models: the tiny one (hop 4) and the one with the real ratios (hop 3200).
fn recorded() -> Vec<Recorded> {
    ["tiny", "hop3200"]
        .into_iter()
        .map(Recorded::load)
        .collect()
}

/// Asserts max |got - want| / max |want| <= TOLERANCE, printing both on failure.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let got = got.to_dtype(DType::F32).unwrap();
    let diff = (&got - want).unwrap().abs().unwrap().max_all().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap();
    let (diff, scale) = (
        diff.to_scalar::<f32>().unwrap(),
        scale.to_scalar::<f32>().unwrap(),
    );
    let err = diff / scale.max(f32::MIN_POSITIVE);
    assert!(
        err <= TOLERANCE,
        "{what}: relative error {err:e} (max abs diff {diff:e})\n ours:   {got}\n theirs: {want}"
    );
}

#[test]
fn acoustic_encoder_matches_the_original() {
    for r in recorded() {
        let encoder = Encoder::new(
            &r.config.acoustic,
            &r.scope("model.acoustic_tokenizer.encoder"),
        )
        .unwrap();
        let mean = encoder.encode(&r.call("acoustic_encode.audio")).unwrap();
        assert_close(
            &format!("{} acoustic encode", r.name),
            &mean,
            &r.call("acoustic_encode.mean"),
        );
    }
}

#[test]
fn acoustic_decoder_matches_the_original_whole_and_streaming() {
    for r in recorded() {
        let decoder = Decoder::new(
            &r.config.acoustic,
            &r.scope("model.acoustic_tokenizer.decoder"),
        )
        .unwrap();
        let latents = r.call("acoustic_decode.latents");
        let audio = decoder.decode(&latents).unwrap();
        assert_close(
            &format!("{} acoustic decode", r.name),
            &audio,
            &r.call("acoustic_decode.audio"),
        );
        let mut state = decoder.stream_state();
        let frames = (0..latents.dim(1).unwrap())
            .map(|i| {
                let frame = latents.narrow(1, i, 1).unwrap();
                decoder.decode_chunk(&frame, &mut state).unwrap()
            })
            .collect::<Vec<_>>();
        assert_close(
            &format!("{} acoustic decode, frame by frame", r.name),
            &Tensor::cat(&frames, 2).unwrap(),
            &r.call("acoustic_decode_stream.audio"),
        );
    }
}

#[test]
fn semantic_encoder_matches_the_original_whole_and_streaming() {
    for r in recorded() {
        let encoder = Encoder::new(
            &r.config.semantic,
            &r.scope("model.semantic_tokenizer.encoder"),
        )
        .unwrap();
        let audio = r.call("semantic_encode.audio");
        assert_close(
            &format!("{} semantic encode", r.name),
            &encoder.encode(&audio).unwrap(),
            &r.call("semantic_encode.mean"),
        );
        // Streaming has its own audio, a whole number of hops.
        let audio = r.call("semantic_encode_stream.audio");
        assert_close(
            &format!("{} semantic encode of the streamed audio", r.name),
            &encoder.encode(&audio).unwrap(),
            &r.call("semantic_encode_stream.mean_nonstreaming"),
        );
        let hop = r.config.semantic.encoder.hop();
        let mut state = encoder.stream_state();
        let frames = (0..audio.dim(2).unwrap() / hop)
            .map(|i| {
                let chunk = audio.narrow(2, i * hop, hop).unwrap();
                encoder.encode_chunk(&chunk, &mut state).unwrap()
            })
            .collect::<Vec<_>>();
        assert_close(
            &format!("{} semantic encode, hop by hop", r.name),
            &Tensor::cat(&frames, 1).unwrap(),
            &r.call("semantic_encode_stream.mean"),
        );
    }
}

#[test]
fn connectors_match_the_original() {
    let r = Recorded::load("tiny");
    let hidden = r.config.head.hidden_size;
    for (which, dim) in [
        ("acoustic", r.config.acoustic.vae_dim),
        ("semantic", r.config.semantic.vae_dim),
    ] {
        let prefix = format!("model.{which}_connector");
        let connector = Connector::new(&r.scope(&prefix), dim, hidden).unwrap();
        let out = connector
            .forward(&r.call(&format!("{which}_connector.input")))
            .unwrap();
        assert_close(
            &format!("{which} connector"),
            &out,
            &r.call(&format!("{which}_connector.output")),
        );
    }
}

#[test]
fn prediction_head_matches_the_original() {
    let r = Recorded::load("tiny");
    let head = PredictionHead::new(&r.config.head, &r.scope("model.prediction_head")).unwrap();
    // The unnumbered call and any numbered ones (prediction_head.{k}.…).
    let mut prefixes = vec!["prediction_head".to_string()];
    prefixes.extend(
        (0..)
            .map(|k| format!("prediction_head.{k}"))
            .take_while(|p| r.calls.contains_key(&format!("{p}.output"))),
    );
    for p in prefixes {
        let out = head
            .forward(
                &r.call(&format!("{p}.noisy")),
                &r.call(&format!("{p}.timesteps")),
                &r.call(&format!("{p}.condition")),
            )
            .unwrap();
        assert_close(&p, &out, &r.call(&format!("{p}.output")));
    }
}

#[test]
fn sampler_matches_the_original_schedule_and_steps() {
    let paths = fixtures(&["scheduler.safetensors".to_string()]);
    let steps = candle_core::safetensors::load(&paths[0], &Device::Cpu).unwrap();
    let mut counts: Vec<usize> = steps
        .keys()
        .filter_map(|k| {
            k.strip_prefix("steps")?
                .strip_suffix(".timesteps")?
                .parse()
                .ok()
        })
        .collect();
    counts.sort();
    assert!(
        !counts.is_empty(),
        "scheduler.safetensors has no steps{{N}}.timesteps"
    );
    let get = |n: usize, what: &str| steps[&format!("steps{n}.{what}")].clone();
    for n in counts {
        let solver = DpmSolver::new(1000, n).unwrap();
        let timesteps = get(n, "timesteps")
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(
            solver.timesteps(),
            timesteps.as_slice(),
            "N = {n}: timesteps"
        );
        let sigmas = get(n, "sigmas")
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(sigmas.len(), solver.sigmas().len(), "N = {n}: sigma count");
        for (ours, theirs) in solver.sigmas().iter().zip(&sigmas) {
            assert!(
                (ours - theirs).abs() <= TOLERANCE * theirs.abs(),
                "N = {n}: sigma {ours} vs {theirs}"
            );
        }
        let outputs = get(n, "model_outputs").to_dtype(DType::F32).unwrap();
        let samples = get(n, "samples").to_dtype(DType::F32).unwrap();
        let mut run = solver.start();
        let mut x = samples.get(0).unwrap();
        for k in 0..n {
            x = run.step(&outputs.get(k).unwrap(), &x).unwrap();
            assert_close(
                &format!("N = {n}, after step {k}"),
                &x,
                &samples.get(k + 1).unwrap(),
            );
        }
    }
}

/// The speech components' share of one original `generate()` run (token script D, D, E, S,
/// D, D, EOS, 10 diffusion steps, cfg 1.3): per frame, the guided sampler from the recorded
/// noise and conditions, the streaming decoder and semantic encoder with their caches reset
/// at `speech_end` (after frame 1), both connectors; and the voice prompt's encoding.
#[test]
fn generation_frames_match_the_original() {
    let r = Recorded::load("tiny");
    let paths = fixtures(&["tiny.generation.safetensors".to_string()]);
    let run = candle_core::safetensors::load(&paths[0], &Device::Cpu).unwrap();
    let get = |key: &str| {
        run.get(key)
            .unwrap_or_else(|| panic!("tiny.generation.safetensors has no {key}"))
            .clone()
    };
    let c = &r.config;
    let hidden = c.head.hidden_size;
    let head = PredictionHead::new(&c.head, &r.scope("model.prediction_head")).unwrap();
    let encoder = Encoder::new(&c.acoustic, &r.scope("model.acoustic_tokenizer.encoder")).unwrap();
    let decoder = Decoder::new(&c.acoustic, &r.scope("model.acoustic_tokenizer.decoder")).unwrap();
    let semantic = Encoder::new(&c.semantic, &r.scope("model.semantic_tokenizer.encoder")).unwrap();
    let acoustic_connector = Connector::new(
        &r.scope("model.acoustic_connector"),
        c.acoustic.vae_dim,
        hidden,
    )
    .unwrap();
    let semantic_connector = Connector::new(
        &r.scope("model.semantic_connector"),
        c.semantic.vae_dim,
        hidden,
    )
    .unwrap();

    // The voice prompt: encoder mean (the recording patched the Gaussian sample to the mean).
    let voice = encoder.encode(&get("voice_audio")).unwrap();
    assert_close("voice latents", &voice, &get("voice_latents"));
    let embeds = acoustic_connector.forward(&get("voice_features")).unwrap();
    assert_close(
        "voice embeddings",
        &embeds.squeeze(0).unwrap(),
        &get("voice_embeds"),
    );

    let steps = get("ddpm_steps")
        .to_dtype(DType::I64)
        .unwrap()
        .to_scalar::<i64>()
        .unwrap();
    let solver = DpmSolver::new(c.head.ddpm_num_steps, steps as usize).unwrap();
    let cfg = get("cfg_scale").to_scalar::<f32>().unwrap() as f64;
    let (noise, conditions, latents) = (get("noise"), get("conditions"), get("latents"));
    let mut decoder_state = decoder.stream_state();
    let mut semantic_state = semantic.stream_state();
    for f in 0..latents.dim(0).unwrap() {
        let at = |t: &Tensor| t.get(f).unwrap();
        if f == 2 {
            // speech_end came after frame 1: the original zeroes both streaming caches.
            decoder_state.reset();
            semantic_state.reset();
        }
        // Only row 0 of each frame's 2-row draw is used.
        let cond = at(&conditions);
        let z = sample_latent(
            &head,
            &solver,
            &at(&noise).narrow(0, 0, 1).unwrap(),
            &cond.narrow(0, 0, 1).unwrap(),
            &cond.narrow(0, 1, 1).unwrap(),
            cfg,
        )
        .unwrap();
        assert_close(&format!("frame {f} latent"), &z, &at(&latents));
        // The hooks saw the decoder's channels-first input; ours takes [B, T, C].
        let frame = at(&get("decoder.input")).transpose(1, 2).unwrap();
        let audio = decoder.decode_chunk(&frame, &mut decoder_state).unwrap();
        assert_close(
            &format!("frame {f} audio"),
            &audio,
            &at(&get("decoder.output")),
        );
        let chunk = at(&get("semantic_encoder.input"));
        let mean = semantic.encode_chunk(&chunk, &mut semantic_state).unwrap();
        let want = at(&get("semantic_encoder.output")).transpose(1, 2).unwrap();
        assert_close(&format!("frame {f} semantic features"), &mean, &want);
        for (name, connector) in [
            ("acoustic_connector", &acoustic_connector),
            ("semantic_connector", &semantic_connector),
        ] {
            let out = connector
                .forward(&at(&get(&format!("{name}.input"))))
                .unwrap();
            let want = at(&get(&format!("{name}.output")));
            assert_close(&format!("frame {f} {name}"), &out, &want);
        }
    }
}
