//! No command replaces a file it read: a bench baseline, a script, a voice sample. Each
//! attempt fails with one line, before the work where it can, and leaves the input as it was.

mod common;

use common::cli::{fails, ok};
use std::path::Path;

fn tone(path: &Path) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 24000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..4800 {
        w.write_sample(((i % 100) as i16 - 50) * 100).unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn a_bench_baseline_is_never_replaced_by_the_report_or_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bench = [
        "bench",
        "--layers",
        "8",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--runs",
        "1",
    ];
    let mut first = bench.to_vec();
    first.extend(["--json-out", "b.json"]);
    ok(d, &first);
    let before = std::fs::read(d.join("b.json")).unwrap();
    for out in [["--json-out", "b.json"], ["--plot", "b.json"]] {
        let mut args = bench.to_vec();
        args.extend(["--baseline", "b.json"]);
        args.extend(out);
        fails(
            d,
            &args,
            1,
            &["refusing to write b.json", "the tool reads it"],
        );
        assert_eq!(std::fs::read(d.join("b.json")).unwrap(), before, "{out:?}");
    }
}

#[test]
fn generate_never_replaces_its_script_or_voices() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tone(&d.join("v.wav"));
    std::fs::write(d.join("s.txt"), "Speaker 1: Hello there.\n").unwrap();
    let (voice, script) = (
        std::fs::read(d.join("v.wav")).unwrap(),
        std::fs::read(d.join("s.txt")).unwrap(),
    );
    let base = [
        "generate",
        "--script",
        "s.txt",
        "--voice",
        "v.wav",
        "--force-frames",
        "1",
        "--steps",
        "1",
        "--force",
    ];
    for out in [
        &["--out", "v.wav"][..],
        &["--out", "s.txt"],
        &["--out", "o.wav", "--dump-latents", "s.txt"],
        &["--out", "o.wav", "--json-out", "s.txt"],
    ] {
        let mut args = base.to_vec();
        args.extend(out);
        fails(d, &args, 1, &["refusing to write", "the tool reads it"]);
        assert_eq!(std::fs::read(d.join("v.wav")).unwrap(), voice, "{out:?}");
        assert_eq!(std::fs::read(d.join("s.txt")).unwrap(), script, "{out:?}");
        assert!(!d.join("o.wav").exists(), "{out:?}: refused before writing");
    }
}
