//! Ctrl-C leaves nothing behind: `synth` removes its unfinished checkpoint, `run` the
//! directory of the small model it synthesized; both exit 130.
#![cfg(unix)]

mod common;

use common::cli::interrupt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn start(dir: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vibeoffload"))
        .args(args)
        .current_dir(dir)
        // The embedded model's temporary directory goes here, where the test can see it.
        .env("TMPDIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn an_interrupted_synth_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // About 1 GB: still writing when the signal comes.
    let args = [
        "synth",
        "big.safetensors",
        "--size",
        "custom",
        "--layers",
        "60",
        "--hidden",
        "1024",
        "--intermediate",
        "4096",
    ];
    let child = start(d, &args);
    let writing = || {
        std::fs::read_dir(d).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().starts_with(".vibeoffload-")
                && e.metadata().is_ok_and(|m| m.len() > 16 << 20)
        })
    };
    let stderr = interrupt(child, writing);
    assert!(stderr.contains("unfinished files removed"), "{stderr}");
    assert!(entries(d).is_empty(), "left behind: {:?}", entries(d));
}

#[test]
fn an_interrupted_run_removes_its_synthesized_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let child = start(
        d,
        &["run", "--gen-tokens", "100000", "--max-seq-len", "200000"],
    );
    // The embedded model is written into a directory of its own under TMPDIR.
    let made = || !entries(d).is_empty();
    interrupt(child, made);
    assert!(entries(d).is_empty(), "left behind: {:?}", entries(d));
}
