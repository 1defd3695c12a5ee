//! `vibeoffload generate` driven through the real binary on the embedded speech model (random
//! weights, forced frames): the WAV it writes, its report, and its refusals.

mod common;

use common::cli::{assert_no_temporary_files, fails, interrupt, ok, vibeoffload};
use std::path::Path;
use std::process::Command;
use vibeoffload::generate::GenerateReport;

/// A 0.4 s voice sample at `rate` Hz (a tone).
fn voice(dir: &Path, name: &str, rate: u32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(dir.join(name), spec).unwrap();
    for i in 0..(rate as usize * 2 / 5) {
        let s = (i as f64 * 220.0 * std::f64::consts::TAU / rate as f64).sin() * 8000.0;
        w.write_sample(s as i16).unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn the_embedded_model_speaks_a_two_speaker_script_into_a_wav() {
    let dir = tempfile::tempdir().unwrap();
    voice(dir.path(), "a.wav", 16000);
    voice(dir.path(), "b.wav", 24000);
    std::fs::write(
        dir.path().join("script.txt"),
        "Speaker 1: Hello there.\nSpeaker 2: Hi, how are you?\n",
    )
    .unwrap();
    let args = [
        "generate",
        "--txt_path",
        "script.txt",
        "--voice_files",
        "a.wav",
        "b.wav",
        "--out",
        "out.wav",
        "--force-frames",
        "3",
        "--steps",
        "2",
        "--json",
    ];
    let o = vibeoffload(dir.path(), &args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let report: GenerateReport = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!((report.frames, report.speakers), (3, 2));
    assert!(report.forced_frames);
    assert!(report.real_time_factor.is_some_and(|r| r > 0.0));
    let wav = hound::WavReader::open(dir.path().join("out.wav")).unwrap();
    assert_eq!(wav.spec().sample_rate, 24000);
    assert_eq!(wav.len(), 3 * 3200);
    assert!((report.audio_seconds - 0.4).abs() < 1e-9);
    // stderr is not a terminal: the status comes as plain lines, the last one included.
    for line in [
        "loading: opening the device\n",
        "loading the speech components: ",
        "generate: 0.4 s of audio (running RTF ",
    ] {
        assert!(o.stderr.contains(line), "{line:?} not in {}", o.stderr);
    }
    // The same seed gives the same audio; --force replaces the file.
    let first = std::fs::read(dir.path().join("out.wav")).unwrap();
    let mut again = args.to_vec();
    again.push("--force");
    assert_eq!(vibeoffload(dir.path(), &again).code, 0);
    assert_eq!(std::fs::read(dir.path().join("out.wav")).unwrap(), first);
    // Streamed through three slots, the audio is the same, and the plan counts the slots.
    let streamed = |slots: &str| -> GenerateReport {
        let mut args = again.clone();
        args.extend(["--num-gpu-layers", "2", "--slots", slots]);
        serde_json::from_str(&ok(dir.path(), &args)).unwrap()
    };
    let (two, three) = (streamed("2"), streamed("3"));
    assert_eq!(std::fs::read(dir.path().join("out.wav")).unwrap(), first);
    assert!(three.estimate_bytes > two.estimate_bytes);
    // Every step copies the streamed layers (the embedded model has 8): the report counts them.
    assert!(
        two.transfer.total_transfers >= 6 * two.frames as u64,
        "{:?}",
        two.transfer
    );
    let mut zero = again.clone();
    zero.extend(["--slots", "0"]);
    fails(dir.path(), &zero, 2, &["--slots 0 is out of range"]);
}

#[test]
fn bad_generate_inputs_get_one_line_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    voice(dir.path(), "a.wav", 24000);
    std::fs::write(dir.path().join("not.wav"), "text").unwrap();
    let base = [
        "generate",
        "--out",
        "o.wav",
        "--force-frames",
        "1",
        "--steps",
        "1",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(extra).copied().collect()
    };
    fails(
        dir.path(),
        &with(&["--text", "Speaker 1: Hi", "--voice", "none.wav"]),
        1,
        &["none.wav"],
    );
    fails(
        dir.path(),
        &with(&["--text", "Speaker 1: Hi", "--voice", "not.wav"]),
        1,
        &["not.wav", "not a WAV"],
    );
    fails(
        dir.path(),
        &with(&["--text", "no speakers here", "--voice", "a.wav"]),
        2,
        &["no speaker lines"],
    );
    fails(
        dir.path(),
        &with(&["--text", "Speaker 1: Hi\nSpeaker 2: Yo", "--voice", "a.wav"]),
        2,
        &["2 speakers", "1 --voice"],
    );
    fails(
        dir.path(),
        &with(&["--voice", "a.wav"]),
        2,
        &["required arguments"],
    );
    assert!(!dir.path().join("o.wav").exists());
    // An existing output is refused and kept.
    std::fs::write(dir.path().join("o.wav"), "keep").unwrap();
    fails(
        dir.path(),
        &with(&["--text", "Speaker 1: Hi", "--voice", "a.wav"]),
        2,
        &["exists", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("o.wav")).unwrap(),
        "keep"
    );
    assert_no_temporary_files(dir.path());
}

/// Ctrl-C in the middle of a generation keeps what was written as a valid, shorter WAV under
/// the final name.
#[cfg(unix)]
#[test]
fn an_interrupted_generation_keeps_a_valid_shorter_wav() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vibeoffload"))
        .args([
            "generate",
            "--text",
            "Speaker 1: Hi.",
            "--out",
            "cut.wav",
            "--force-frames",
            "500",
            "--steps",
            "1",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ready when the temporary WAV holds at least two frames (44-byte header + 2 x 3200 x 2).
    let grown = || {
        std::fs::read_dir(dir.path()).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().starts_with('.')
                && e.metadata().unwrap().len() >= 44 + 2 * 6400
        })
    };
    let stderr = interrupt(child, grown);
    assert!(stderr.contains("kept what was written"), "{stderr}");
    let wav = hound::WavReader::open(dir.path().join("cut.wav")).unwrap();
    let samples = wav.len();
    assert!(
        (2 * 3200..500 * 3200).contains(&samples),
        "{samples} samples"
    );
    assert_eq!(samples % 3200, 0, "whole frames only");
    assert_no_temporary_files(dir.path());
}

/// `--noise` drives every frame's diffusion (two seeds, the same audio) and `--dump-latents`
/// writes the latents, tokens and audio of the run.
#[test]
fn recorded_noise_and_dumped_latents_make_runs_comparable() {
    let dir = tempfile::tempdir().unwrap();
    let noise: Vec<f32> = (0..2 * 64)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "noise".to_string(),
        candle_core::Tensor::from_vec(noise, (2, 64), &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("noise.safetensors")).unwrap();
    let run = |seed: &str, out: &str, dump: &str| {
        let args = [
            "generate",
            "--text",
            "Speaker 1: Hi.",
            "--out",
            out,
            "--force-frames",
            "2",
            "--steps",
            "2",
            "--seed",
            seed,
            "--noise",
            "noise.safetensors",
            "--dump-latents",
            dump,
        ];
        let o = vibeoffload(dir.path(), &args);
        assert_eq!(o.code, 0, "{}", o.stderr);
    };
    run("1", "a.wav", "a.safetensors");
    run("2", "b.wav", "b.safetensors");
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    assert_eq!(
        read("a.wav"),
        read("b.wav"),
        "the noise file, not the seed, drives the frames"
    );
    let dump =
        candle_core::safetensors::load(dir.path().join("a.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(dump["latents"].dims(), [2, 64]);
    assert_eq!(dump["audio"].dims(), [2 * 3200]);
    assert_eq!(dump["tokens"].dims(), [3]);
    // Three frames need three rows of noise: one line, exit 1.
    let o = vibeoffload(
        dir.path(),
        &[
            "generate",
            "--text",
            "Speaker 1: Hi.",
            "--out",
            "c.wav",
            "--force-frames",
            "3",
            "--steps",
            "1",
            "--noise",
            "noise.safetensors",
        ],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("no frame 2"), "{}", o.stderr);
    assert!(!dir.path().join("c.wav").exists());
}

/// `--benchmark`: one row per preset the model has layers for, each a full report.
#[test]
fn benchmark_generates_once_per_preset() {
    let dir = tempfile::tempdir().unwrap();
    let o = vibeoffload(
        dir.path(),
        &[
            "generate",
            "--text",
            "Speaker 1: Hi.",
            "--out",
            "b.wav",
            "--force-frames",
            "1",
            "--steps",
            "1",
            "--benchmark",
            "--json",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let report: vibeoffload::generate::GenerateBenchmark = serde_json::from_str(&o.stdout).unwrap();
    let rows: Vec<(String, usize)> = report
        .rows
        .iter()
        .map(|r| (r.configuration.clone(), r.report.gpu_layers))
        .collect();
    // The embedded model has 8 layers: high_end (all), budget (8), minimal (4).
    assert_eq!(
        rows,
        [
            ("high_end".into(), 8),
            ("budget".into(), 8),
            ("minimal".into(), 4)
        ]
    );
    assert!(report.rows.iter().all(|r| r.report.frames == 1));
    // A warm-up and three runs, counted on plain lines.
    let line = "generate --benchmark: minimal: 4 layers on the GPU, 3/4 runs done (75%), eta ";
    assert!(o.stderr.contains(line), "{line:?} not in {}", o.stderr);
    // Its rows replace each other's WAV, but not a file that was there before.
    std::fs::write(dir.path().join("keep.wav"), "keep").unwrap();
    fails(
        dir.path(),
        &[
            "generate",
            "--text",
            "Speaker 1: Hi.",
            "--out",
            "keep.wav",
            "--force-frames",
            "1",
            "--steps",
            "1",
            "--benchmark",
        ],
        2,
        &["exists", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keep.wav")).unwrap(),
        "keep"
    );
}

/// `table --script` sizes both KV caches for the script as `generate` would run it: the
/// prompt `generate` builds (voice frames included) plus twice its length.
#[test]
fn plans_are_sized_for_a_script() {
    let dir = tempfile::tempdir().unwrap();
    voice(dir.path(), "a.wav", 24000);
    let script = "Speaker 1: Hello there.\nSpeaker 2: Hi.\n";
    std::fs::write(dir.path().join("s.txt"), script).unwrap();
    let plan = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["table", "--vram", "8GiB", "--json", "--script", "s.txt"];
        args.extend_from_slice(extra);
        let o = vibeoffload(dir.path(), &args);
        assert_eq!(o.code, 0, "{}", o.stderr);
        serde_json::from_str(&o.stdout).unwrap()
    };
    let tokens = vibeoffload::generate::prompt_tokens(script, &[]).unwrap();
    let expected = vibeoffload::generate::positions(tokens, None, 32768) as u64;
    let options = &plan(&[])["options"];
    assert_eq!(options["scope"], "full");
    assert_eq!(options["max_seq_len"], expected);
    // A 0.4 s voice (9,600 samples: 3 frames of 3,200) adds its frames to the prompt.
    let with_voice = plan(&["--voice", "a.wav"])["options"]["max_seq_len"]
        .as_u64()
        .unwrap();
    let voice_tokens = vibeoffload::generate::prompt_tokens(script, &[3]).unwrap();
    assert_eq!(
        with_voice,
        vibeoffload::generate::positions(voice_tokens, None, 32768) as u64
    );
    assert!(with_voice > expected);
    fails(
        dir.path(),
        &["table", "--script", "s.txt", "--max-seq-len", "99"],
        2,
        &["cannot be used"],
    );
    fails(
        dir.path(),
        &["table", "--script", "s.txt", "--lm-only"],
        2,
        &["cannot be used"],
    );
    fails(
        dir.path(),
        &["table", "--script", "none.txt"],
        1,
        &["cannot read the script"],
    );
}

/// A forced schedule runs to its end even past the original's limit of twice the prompt (a
/// 33-token prompt, 70 frames).
#[test]
fn forced_frames_are_not_cut_at_twice_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let o = vibeoffload(
        dir.path(),
        &[
            "generate",
            "--text",
            "Speaker 1: Hi.",
            "--out",
            "f.wav",
            "--force-frames",
            "70",
            "--steps",
            "1",
            "--json",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let report: GenerateReport = serde_json::from_str(&o.stdout).unwrap();
    assert!(
        report.prompt_tokens * 2 < 70,
        "{} prompt tokens",
        report.prompt_tokens
    );
    assert_eq!(report.frames, 70);
}

#[test]
fn a_prompt_as_long_as_the_models_context_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A small model with the Qwen2.5 vocabulary, whose configuration says its context is 24.
    let synth = [
        "synth",
        "m.safetensors",
        "--size",
        "custom",
        "--vocab",
        "151936",
    ];
    assert_eq!(vibeoffload(d, &synth).code, 0);
    let config = d.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["decoder_config"]["max_position_embeddings"] = 24.into();
    std::fs::write(&config, json.to_string()).unwrap();
    std::fs::write(
        d.join("s.txt"),
        "Speaker 1: Hello there, how are you today?\n",
    )
    .unwrap();
    let words = ["the model's whole context (24 positions)"];
    let generate = [
        "generate",
        "--model-path",
        "m.safetensors",
        "--script",
        "s.txt",
        "--out",
        "o.wav",
    ];
    fails(d, &generate, 1, &words);
    assert!(!d.join("o.wav").exists());
    let table = [
        "table",
        "--model-path",
        "m.safetensors",
        "--script",
        "s.txt",
    ];
    fails(d, &table, 1, &words);
}

/// `--offload-prediction-head` runs the diffusion head on the CPU: the estimate leaves out
/// exactly the head's bytes, the report says where it ran, and on the CPU the audio is the
/// same; with `--device cpu` it would do nothing and is refused.
#[test]
fn an_offloaded_prediction_head_leaves_the_estimate_and_changes_no_audio_on_the_cpu() {
    use vibeoffload::arch::vibevoice::Component;
    use vibeoffload::checkpoint::inventory::Part;
    use vibeoffload::checkpoint::CheckpointDtype;
    use vibeoffload::measure::ModelFile;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let generate = |out: &str, offload: bool| -> GenerateReport {
        let mut args = vec![
            "generate",
            "--text",
            "Speaker 1: Hi.",
            "--out",
            out,
            "--force-frames",
            "2",
            "--steps",
            "2",
            "--json",
        ];
        if offload {
            args.push("--offload-prediction-head");
        }
        serde_json::from_str(&ok(d, &args)).unwrap()
    };
    let (together, offloaded) = (generate("a.wav", false), generate("b.wav", true));
    assert!(offloaded.prediction_head_offloaded && !together.prediction_head_offloaded);
    let info = ModelFile::embedded_speech(CheckpointDtype::Float8)
        .unwrap()
        .open()
        .unwrap();
    let head = info
        .inventory
        .part_bytes(Part::Speech(Component::PredictionHead));
    assert!(head > 0);
    assert_eq!(together.estimate_bytes - offloaded.estimate_bytes, head);
    assert_eq!(offloaded.frames, 2);
    assert_eq!(offloaded.graph_runs.head, 0, "no CUDA graph on the CPU");
    // Without a GPU (the default device picks the CPU) both runs are the CPU's, in f32.
    if together.device == "cpu" {
        let read = |name: &str| std::fs::read(d.join(name)).unwrap();
        assert!(
            read("a.wav") == read("b.wav"),
            "the offloaded head changed the audio"
        );
    }
    fails(
        d,
        &[
            "generate",
            "--text",
            "Speaker 1: Hi.",
            "--out",
            "c.wav",
            "--device",
            "cpu",
            "--offload-prediction-head",
        ],
        2,
        &["--offload-prediction-head would do nothing", "--device cpu"],
    );
    assert!(!d.join("c.wav").exists());
}
