//! `bench --speech` through the binary on the embedded speech model (random weights, on the
//! CPU): a row per layer count on the forced schedule, the JSON file and plot, no WAV left
//! behind, and the flags it refuses.

mod common;

use common::cli::{assert_no_temporary_files, fails};
use std::process::Command;
use vibeoffload::measure::SpeechBenchReport;

#[test]
fn bench_speech_speaks_each_layer_count_on_the_forced_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The temporary WAV (and the embedded model) go here, to be seen removed.
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vibeoffload"))
        .args([
            "bench",
            "--speech",
            "--device",
            "cpu",
            "--layers",
            "1,0",
            "--force-frames",
            "2",
            "--steps",
            "1",
            "--json-out",
            "s.json",
            "--plot",
            "s.svg",
        ])
        .current_dir(d)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(out.status.success(), "{stderr}");
    let r: SpeechBenchReport =
        serde_json::from_str(&std::fs::read_to_string(d.join("s.json")).unwrap()).unwrap();
    assert_eq!(r.schema, "vibeoffload.bench-speech/1");
    assert!(r.tool.starts_with("vibeoffload "), "{}", r.tool);
    assert_eq!((r.force_frames, r.steps, r.speakers), (2, 1, 1));
    let counts: Vec<usize> = r.rows.iter().map(|x| x.gpu_layers).collect();
    assert_eq!(counts, [1, 0]);
    for x in &r.rows {
        assert_eq!(x.frames, 2, "{x:?}");
        assert_eq!(x.audio_seconds, 2.0 * 3200.0 / 24000.0, "{x:?}");
        let parts = [
            x.ms_per_frame,
            x.lm_pair_ms_per_frame,
            x.head_ms_per_frame,
            x.decoder_ms_per_frame,
            x.semantic_ms_per_frame,
            x.prefill_ms,
        ];
        assert!(parts.iter().all(|&ms| ms > 0.0), "{x:?}");
        let parts_sum = x.lm_pair_ms_per_frame
            + x.head_ms_per_frame
            + x.decoder_ms_per_frame
            + x.semantic_ms_per_frame;
        assert!(parts_sum <= x.ms_per_frame * 1.001, "{x:?}");
        assert!(x.real_time_factor.is_some_and(|f| f > 0.0), "{x:?}");
        assert!(x.estimate_bytes > 0, "{x:?}");
        // On the CPU (even in a CUDA build) nothing is measured by bandwidth or NVML: no
        // floor, no peak.
        assert_eq!((x.floor_ms_per_frame, x.vs_floor), (None, None), "{x:?}");
        assert_eq!(x.measured_peak_bytes, None);
    }
    assert_eq!(r.pinned_gbps, None);
    // One copy of each streamed layer per frame (packed, so a little above its tensors).
    let streamed: Vec<u64> = r.rows.iter().map(|x| x.streamed_bytes_per_frame).collect();
    assert_eq!(streamed[0] * 8, streamed[1] * 7, "{streamed:?}");
    assert!(streamed[0] >= 7 * r.model.layer_bytes, "{streamed:?}");

    // The tables fit 100 columns and name the parts.
    for word in ["ms/frame", "LM pair", "vs floor", "frames forced"] {
        assert!(stdout.contains(word), "{word:?} not in {stdout}");
    }
    let widest = stdout.lines().map(|l| l.chars().count()).max().unwrap();
    assert!(widest <= 100, "{widest} columns:\n{stdout}");
    // A warm-up and a run per layer count, counted on plain lines.
    let line = "bench --speech: row 2/2: 0 layers on the GPU, 2/3 runs done (66%), eta ";
    assert!(stderr.contains(line), "{line:?} not in {stderr}");
    let svg = std::fs::read_to_string(d.join("s.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("ms/frame"));
    // Nothing else is left: the WAV went to a temporary directory, now removed.
    let mut left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["s.json", "s.svg", "tmp"]);
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "left in TMPDIR"
    );
    assert_no_temporary_files(d);
}

#[test]
fn bench_speech_refuses_flags_that_would_do_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The language-model bench's workload and gate do nothing when speaking.
    for flag in [
        ["--runs", "2"],
        ["--prompt-len", "8"],
        ["--gen-tokens", "8"],
        ["--max-seq-len", "512"],
        ["--batch", "2"],
        ["--baseline", "b.json"],
    ] {
        fails(
            d,
            &["bench", "--speech", flag[0], flag[1]],
            2,
            &["cannot be used with", flag[0]],
        );
    }
    // The speech flags need --speech; --force needs --out.
    for args in [
        &["bench", "--force-frames", "4"][..],
        &["bench", "--steps", "4"],
        &["bench", "--script", "s.txt"],
        &["bench", "--out", "o.wav"],
        &["bench", "--no-cuda-graphs"],
        &["bench", "--offload-prediction-head"],
        &["bench", "--speech", "--force"],
    ] {
        fails(d, args, 2, &["required"]);
    }
    fails(
        d,
        &["bench", "--speech", "--device", "cpu", "--no-cuda-graphs"],
        2,
        &["--no-cuda-graphs would do nothing"],
    );
    fails(
        d,
        &[
            "bench",
            "--speech",
            "--device",
            "cpu",
            "--offload-prediction-head",
        ],
        2,
        &["--offload-prediction-head would do nothing"],
    );
    fails(
        d,
        &["bench", "--speech", "--force-frames", "0"],
        2,
        &["--force-frames 0"],
    );
    fails(
        d,
        &["bench", "--speech", "--layers", "9"],
        2,
        &["--layers 9", "8 layers"],
    );
    // A WAV already there is kept unless --force.
    std::fs::write(d.join("keep.wav"), "keep").unwrap();
    fails(
        d,
        &["bench", "--speech", "--layers", "0", "--out", "keep.wav"],
        2,
        &["keep.wav exists", "--force"],
    );
    assert_eq!(std::fs::read_to_string(d.join("keep.wav")).unwrap(), "keep");
}
