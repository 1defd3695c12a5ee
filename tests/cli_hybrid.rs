//! `--cpu-layers` on the command line: a hybrid run on the embedded model reports its split,
//! `bench` adds its hybrid table, and bad values get one line and exit 2.

mod common;

use common::cli::{fails, ok};

#[test]
fn a_hybrid_run_and_bench_report_the_split() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = [
        "run",
        "--num-gpu-layers",
        "2",
        "--cpu-layers",
        "3",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "3",
        "--json",
    ];
    let report: serde_json::Value = serde_json::from_str(&ok(d, &run)).unwrap();
    let engine = &report["engine"];
    assert_eq!(
        (engine["gpu_layers"].as_u64(), engine["cpu_layers"].as_u64()),
        (Some(2), Some(3))
    );
    let bench = [
        "bench",
        "--layers",
        "4,0",
        "--cpu-layers",
        "2",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "3",
        "--runs",
        "1",
    ];
    let out = ok(d, &bench);
    assert!(
        out.contains("hybrid decoding (host CPU float8 products:"),
        "{out}"
    );
    let (table, _) = out
        .split_once("hybrid decoding")
        .map(|(_, t)| (t, ()))
        .unwrap();
    assert!(table.contains("CPU layers"), "{table}");
}

#[test]
fn bad_cpu_layer_counts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(
        d,
        &["table", "--cpu-layers", "some"],
        2,
        &["`some` is neither a layer count nor `auto`"],
    );
    // `auto` plans VRAM alone (`table` takes `auto` from a calibration: tests/cli_calibration.rs).
    fails(
        d,
        &["auto", "--cpu-layers", "auto", "--vram", "8GiB"],
        2,
        &[
            "--cpu-layers auto measures this machine",
            "give a count here",
        ],
    );
    fails(
        d,
        &["table", "--cpu-layers", "29"],
        2,
        &["--cpu-layers 29 is more than the 28 layers"],
    );
    // A table leaves out the counts that keep too few layers offloaded.
    let table = ok(d, &["table", "--cpu-layers", "9", "--vram", "8GiB"]);
    assert!(
        table.contains("│ 16 ") && !table.contains("│ 20 "),
        "{table}"
    );
    fails(
        d,
        &[
            "run",
            "--num-gpu-layers",
            "6",
            "--cpu-layers",
            "3",
            "--gen-tokens",
            "2",
        ],
        2,
        &["--cpu-layers 3 is more than the 2 layers"],
    );
}

#[test]
fn a_speech_bench_row_computes_at_most_the_layers_it_leaves_offloaded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "bench",
        "--speech",
        "--device",
        "cpu",
        "--layers",
        "4,1",
        "--cpu-layers",
        "2",
        "--force-frames",
        "1",
        "--steps",
        "1",
        "--json",
    ];
    let report: serde_json::Value = serde_json::from_str(&ok(d, &args)).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
}
