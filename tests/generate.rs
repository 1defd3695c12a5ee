//! The whole generation loop against the original's: the tiny reference model's recorded run
//! (`tests/fixtures/speech/tiny.generation.safetensors`, a forced D,D,E,S,D,D,EOS schedule
//! that exercises both cache resets) replayed with its noise, through our engine's two lanes
//! and the speech components, on the CPU in f32.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vibeoffload::checkpoint::ModelInfo;
use vibeoffload::engine::{Engine, EngineOptions};
use vibeoffload::generate::{self, Noise, Options, SpeechModel, VoiceLatents};
use vibeoffload::speech::{CheckpointWeights, SafetensorsWeights};
use vibeoffload::text::SpecialTokens;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/speech")
        .join(name)
}

/// max |a - b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    worst / scale
}

struct Reference {
    run: HashMap<String, Tensor>,
}

impl Reference {
    /// The recorded run.
    fn load() -> Reference {
        Reference {
            run: candle_core::safetensors::load(
                fixture("tiny.generation.safetensors"),
                &Device::Cpu,
            )
            .unwrap(),
        }
    }

    /// The special ids the tiny model was run with.
    fn special(&self) -> SpecialTokens {
        SpecialTokens {
            speech_start: self.id("speech_start_id"),
            speech_end: self.id("speech_end_id"),
            speech_diffusion: self.id("speech_diffusion_id"),
            eos: self.id("eos_token_id"),
        }
    }

    /// Where the prompt's voice placeholders are.
    fn voice_mask(&self) -> Vec<bool> {
        self.ids("speech_input_mask")
            .iter()
            .map(|&m| m != 0)
            .collect()
    }

    /// The voice prompt's samples.
    fn voice_audio(&self) -> Vec<f32> {
        self.get("voice_audio")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn get(&self, key: &str) -> Tensor {
        self.run
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in the generation fixture"))
            .clone()
    }

    fn id(&self, key: &str) -> u32 {
        self.get(key)
            .to_dtype(DType::I64)
            .unwrap()
            .to_scalar::<i64>()
            .unwrap() as u32
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        let t = self
            .get(key)
            .to_dtype(DType::I64)
            .unwrap()
            .flatten_all()
            .unwrap();
        t.to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u32)
            .collect()
    }
}

/// The tiny model as a checkpoint folder our engine opens: its weights and its config.json.
fn tiny_checkpoint(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.safetensors");
    std::fs::copy(fixture("tiny.safetensors"), &path).unwrap();
    std::fs::copy(fixture("tiny.config.json"), dir.join("config.json")).unwrap();
    path
}

#[test]
fn a_whole_generation_matches_the_original() {
    let reference = Reference::load();
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_checkpoint(dir.path());
    let options = EngineOptions {
        max_seq_len: 256,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(ModelInfo::open(&path).unwrap(), &options, |_| {}).unwrap();
    // The speech model as users load it: configuration and weights from the checkpoint.
    let info = ModelInfo::open(&path).unwrap();
    let config = info.speech.clone().unwrap();
    let weights = CheckpointWeights::new(&info, &Device::Cpu, DType::F32).unwrap();
    let speech = SpeechModel::load(&weights, &config, 64, &Device::Cpu, DType::F32).unwrap();
    let special = reference.special();

    // The voice prompt: the acoustic encoder's mean through the connector.
    let audio = reference.voice_audio();
    let voice = speech.encode_voice(&audio, VoiceLatents::Mean).unwrap();
    let err = relative(&voice, &reference.get("voice_embeds"));
    assert!(err <= 1e-5, "voice embeddings: {err}");

    let ids = reference.ids("input_ids");
    let mask = reference.voice_mask();
    let prompt = generate::prompt_embeddings(&engine, &ids, &mask, &[voice]).unwrap();
    let recorded_prompt = reference.get("pos.inputs_embeds").squeeze(0).unwrap();
    let err = relative(&prompt, &recorded_prompt.narrow(0, 0, ids.len()).unwrap());
    assert!(err <= 1e-5, "prompt embeddings: {err}");

    let noise = reference
        .get("noise")
        .narrow(1, 0, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let forced = reference.ids("tokens");
    let options = Options {
        cfg_scale: reference.get("cfg_scale").to_scalar::<f32>().unwrap() as f64,
        steps: reference.id("ddpm_steps") as usize,
        max_frames: None,
        forced: Some(forced.clone()),
        separate_passes: false,
        graphs: true,
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

    assert_eq!(outcome.tokens, forced);
    // The language model's own choices, from the logits of the four speech tokens.
    let logits = reference.get("logits");
    let valid = special.all();
    for (step, ours) in outcome.logits.iter().enumerate() {
        let theirs: Vec<f32> = valid
            .iter()
            .map(|&id| {
                logits
                    .get(step)
                    .unwrap()
                    .get(id as usize)
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            })
            .collect();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "step {step} logits {ours:?} vs {theirs:?}"
            );
        }
    }
    let conditions = Tensor::stack(&outcome.conditions, 0).unwrap();
    let err = relative(&conditions, &reference.get("conditions"));
    assert!(err <= 1e-5, "conditions: {err}");
    let latents = Tensor::stack(&outcome.latents, 0).unwrap();
    let err = relative(&latents, &reference.get("latents"));
    assert!(err <= 1e-4, "latents: {err}");
    let audio = Tensor::new(samples.as_slice(), &Device::Cpu).unwrap();
    let theirs = reference.get("audio").flatten_all().unwrap();
    assert_eq!(outcome.samples, theirs.dim(0).unwrap());
    let err = relative(&audio, &theirs);
    assert!(err <= 1e-4, "audio: {err}");
}

/// Streamed layers change no bit of the loop: every latent and sample equal with the
/// language model resident and with one of its two layers streamed, and with the guidance pass
/// sharing the positive pass's weight stream or running on its own.
#[test]
fn streamed_generation_is_bit_identical_to_resident() {
    let reference = Reference::load();
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_checkpoint(dir.path());
    // The speech configuration as the checkpoint reader parses it from config.json.
    let config = ModelInfo::open(&path).unwrap().speech.unwrap();
    let weights = SafetensorsWeights::load(&path, DType::F32, &Device::Cpu).unwrap();
    let speech = SpeechModel::load(&weights, &config, 64, &Device::Cpu, DType::F32).unwrap();
    let special = reference.special();
    let ids = reference.ids("input_ids");
    let mask = reference.voice_mask();
    let audio = reference.voice_audio();
    let run = |gpu_layers: usize, separate_passes: bool| {
        let options = EngineOptions {
            gpu_layers,
            max_seq_len: 256,
            ..EngineOptions::default()
        };
        let mut engine = Engine::load(ModelInfo::open(&path).unwrap(), &options, |_| {}).unwrap();
        let voice = speech.encode_voice(&audio, VoiceLatents::Mean).unwrap();
        let prompt = generate::prompt_embeddings(&engine, &ids, &mask, &[voice]).unwrap();
        let options = Options {
            cfg_scale: 1.3,
            steps: 5,
            max_frames: Some(6),
            forced: None,
            separate_passes,
            graphs: true,
        };
        let mut samples = Vec::new();
        let outcome = generate::generate(
            &mut engine,
            &speech,
            special,
            &prompt,
            &options,
            &mut Noise::Seeded(vibeoffload::rng::Rng::new(3)),
            &mut |chunk| {
                samples.extend_from_slice(chunk);
                Ok(())
            },
        )
        .unwrap();
        (outcome.tokens, samples)
    };
    let (resident_tokens, resident) = run(2, false);
    let (streamed_tokens, streamed) = run(1, false);
    assert_eq!(resident_tokens, streamed_tokens);
    assert!(
        !resident.is_empty(),
        "the loop produced no audio: {resident_tokens:?}"
    );
    assert!(resident == streamed, "streamed audio differs from resident");
    // The fork's way, the negative pass over the layers on its own: the same bits.
    let (separate_tokens, separate) = run(1, true);
    assert_eq!(separate_tokens, streamed_tokens);
    assert!(
        separate == streamed,
        "separate passes differ from the shared one"
    );
}

/// A float8 checkpoint's speech weights stay float8 and are decoded at use (linear weights by
/// the engine's kernels, convolution weights just before each convolution); the results equal
/// decoding every weight once at load.
#[test]
fn float8_speech_weights_decoded_at_use_equal_decoded_at_load() {
    use vibeoffload::checkpoint::synth::{self, SynthSpec};
    use vibeoffload::speech::WeightSource;

    /// The same checkpoint with every weight decoded at load.
    struct AtLoad<'a>(&'a CheckpointWeights<'a>);
    impl WeightSource for AtLoad<'_> {
        fn tensor(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
            self.0.tensor(name, shape)
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    synth::write(&SynthSpec::embedded(), &path, false, |_, _| {}).unwrap();
    let info = ModelInfo::open(&path).unwrap();
    let config = info.speech.clone().unwrap();
    let hidden = info.config.hidden_size;
    let cpu = Device::Cpu;
    let stored = CheckpointWeights::new(&info, &cpu, DType::F32).unwrap();
    let at_use = SpeechModel::load(&stored, &config, hidden, &cpu, DType::F32).unwrap();
    let at_load = SpeechModel::load(&AtLoad(&stored), &config, hidden, &cpu, DType::F32).unwrap();

    let mut rng = vibeoffload::rng::Rng::new(5);
    let mut normal = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normals(n), shape, &cpu).unwrap()
    };
    let (noise, pos, neg) = (normal(&[1, 8]), normal(&[1, hidden]), normal(&[1, hidden]));
    let solver = at_use.solver(5).unwrap();
    let sample = |m: &SpeechModel| {
        vibeoffload::speech::sample_latent(&m.head, &solver, &noise, &pos, &neg, 1.3).unwrap()
    };
    let (a, b) = (sample(&at_use), sample(&at_load));
    assert!(
        relative(&a, &b) <= 1e-5,
        "diffusion head: {}",
        relative(&a, &b)
    );
    let latents = normal(&[1, 3, 8]);
    let decode = |m: &SpeechModel| m.acoustic_decoder.decode(&latents).unwrap();
    let (a, b) = (decode(&at_use), decode(&at_load));
    assert!(relative(&a, &b) <= 1e-5, "decoder: {}", relative(&a, &b));
    let connect = |m: &SpeechModel| m.acoustic_connector.forward(&latents).unwrap();
    let (a, b) = (connect(&at_use), connect(&at_load));
    assert!(relative(&a, &b) <= 1e-5, "connector: {}", relative(&a, &b));
}

/// `--offload-prediction-head`'s path: the diffusion head loaded from a source of its own on
/// the CPU in f32 (every head weight from it, none from the components' source), its
/// conditions and noise moved there and its latent moved back. On the CPU in f32 the moves
/// change nothing: the loop's tokens, latents and audio equal the head loaded with the rest,
/// bit for bit. With the components in bf16, the head still runs in f32 and the latent comes
/// back in bf16.
#[test]
fn an_offloaded_head_changes_no_bit_on_the_cpu() {
    use std::cell::RefCell;
    use vibeoffload::engine::weights::Linear;
    use vibeoffload::speech::weights::StoredWeight;
    use vibeoffload::speech::WeightSource;

    /// A source that records the names asked of it.
    struct Asked<'a>(&'a dyn WeightSource, RefCell<Vec<String>>);
    impl Asked<'_> {
        fn ask(&self, name: &str) {
            self.1.borrow_mut().push(name.to_string());
        }
    }
    impl WeightSource for Asked<'_> {
        fn tensor(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
            self.ask(name);
            self.0.tensor(name, shape)
        }
        fn stored_linear(&self, name: &str, shape: &[usize]) -> anyhow::Result<Option<Linear>> {
            self.ask(name);
            self.0.stored_linear(name, shape)
        }
        fn stored_float8(
            &self,
            name: &str,
            shape: &[usize],
        ) -> anyhow::Result<Option<StoredWeight>> {
            self.ask(name);
            self.0.stored_float8(name, shape)
        }
    }

    let reference = Reference::load();
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_checkpoint(dir.path());
    let info = ModelInfo::open(&path).unwrap();
    let config = info.speech.clone().unwrap();
    let cpu = Device::Cpu;
    let weights = CheckpointWeights::new(&info, &cpu, DType::F32).unwrap();
    let head_weights = CheckpointWeights::new(&info, &cpu, DType::F32).unwrap();
    let (components, head) = (
        Asked(&weights, RefCell::default()),
        Asked(&head_weights, RefCell::default()),
    );
    let offloaded =
        SpeechModel::load_with_head(&components, Some(&head), &config, 64, &cpu, DType::F32)
            .unwrap();
    let is_head = |name: &String| name.starts_with("model.prediction_head.");
    let (components, head) = (components.1.into_inner(), head.1.into_inner());
    assert!(!head.is_empty() && head.iter().all(is_head), "{head:?}");
    assert!(!components.iter().any(is_head), "{components:?}");
    assert!(offloaded.head_device().is_cpu());
    let together = SpeechModel::load(&weights, &config, 64, &cpu, DType::F32).unwrap();

    let run = |speech: &SpeechModel| {
        let options = EngineOptions {
            max_seq_len: 256,
            ..EngineOptions::default()
        };
        let mut engine = Engine::load(ModelInfo::open(&path).unwrap(), &options, |_| {}).unwrap();
        let voice = speech
            .encode_voice(&reference.voice_audio(), VoiceLatents::Mean)
            .unwrap();
        let prompt = generate::prompt_embeddings(
            &engine,
            &reference.ids("input_ids"),
            &reference.voice_mask(),
            &[voice],
        )
        .unwrap();
        let options = Options {
            cfg_scale: 1.3,
            steps: 5,
            max_frames: None,
            forced: Some(reference.ids("tokens")),
            separate_passes: false,
            graphs: true,
        };
        let mut samples = Vec::new();
        let outcome = generate::generate(
            &mut engine,
            speech,
            reference.special(),
            &prompt,
            &options,
            &mut Noise::Seeded(vibeoffload::rng::Rng::new(3)),
            &mut |chunk| {
                samples.extend_from_slice(chunk);
                Ok(())
            },
        )
        .unwrap();
        (outcome, samples)
    };
    let (a, audio_a) = run(&together);
    let (b, audio_b) = run(&offloaded);
    assert_eq!(a.tokens, b.tokens);
    assert!(!a.latents.is_empty() && !audio_a.is_empty());
    let bits = |latents: &[Tensor]| -> Vec<f32> {
        Tensor::cat(latents, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert!(
        bits(&a.latents) == bits(&b.latents),
        "latents differ with the head loaded on its own"
    );
    assert!(
        audio_a == audio_b,
        "audio differs with the head loaded on its own"
    );

    // Components in bf16, the head in f32: the latent comes back in the components' dtype.
    let bf16 = CheckpointWeights::new(&info, &cpu, DType::BF16).unwrap();
    let mixed =
        SpeechModel::load_with_head(&bf16, Some(&head_weights), &config, 64, &cpu, DType::BF16)
            .unwrap();
    let (c, audio_c) = run(&mixed);
    assert_eq!(c.tokens, a.tokens);
    assert!(c.latents.iter().all(|l| l.dtype() == DType::BF16));
    assert_eq!(audio_c.len(), audio_a.len());
}
