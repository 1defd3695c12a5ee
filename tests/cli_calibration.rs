//! Calibrations on the command line: `table` predicts ms per decode step from one (given, or
//! stored for this machine in the cache directory), `--cpu-layers auto` in `table` needs one,
//! and bad files or a calibration without a GPU get one line.

mod common;

use common::cli::{fails, ok, vibeoffload};
use std::path::Path;
use vibeoffload::engine::DeviceChoice;
use vibeoffload::measure::calibrate;
use vibeoffload::plan::calibration::{BatchCalibration, Calibration, Check, Machine, SCHEMA};

/// A calibration of `machine` with a host CPU of `cpu_gbps` at batches 1 and 2.
fn calibration(machine: Machine, cpu_gbps: f64) -> Calibration {
    let batch = |batch: usize| BatchCalibration {
        batch,
        cpu_gbps,
        host_layer_overhead_ms: 1.0,
        fitted: Check {
            gpu_layers: 0,
            cpu_layers: 12,
            batch,
            predicted_ms_per_token: 68.0,
            measured_ms_per_token: 68.0,
        },
    };
    Calibration {
        schema: SCHEMA.into(),
        tool: "test".into(),
        measured_unix_s: 1_795_824_000,
        machine,
        model: "built-in 7b".into(),
        pinned_gbps: 50.0,
        device_gbps: 4000.0,
        gpu_decode_efficiency: 0.5,
        gpu_decode_efficiency_measured: false,
        batches: vec![batch(1), batch(2)],
        checks: Vec::new(),
    }
}

/// The machine the binary will see: this CPU, and the GPU NVML names if any.
fn this_machine() -> Machine {
    Machine {
        gpu: vibeoffload::gpu::query(0).ok().map(|g| g.name),
        ..calibrate::this_machine(DeviceChoice::Cpu)
    }
}

fn elsewhere() -> Machine {
    Machine {
        cpu: "Some Other CPU".into(),
        logical_cores: 1024,
        gpu: Some("Some GPU".into()),
    }
}

fn store(path: &Path, c: &Calibration) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string(c).unwrap()).unwrap();
}

/// `table --lm-only --json` at 28, 8 and 0 resident layers, with `args`.
fn table_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["table", "--lm-only", "--layers", "28,8,0", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(dir, &all)).unwrap()
}

fn predictions(report: &serde_json::Value) -> Vec<Option<f64>> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["predicted_ms_per_token"].as_f64())
        .collect()
}

#[test]
fn table_predicts_from_a_given_calibration_and_a_faster_cpu_predicts_less() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (slow, fast) = (d.join("slow.json"), d.join("fast.json"));
    store(&slow, &calibration(elsewhere(), 20.0));
    store(&fast, &calibration(elsewhere(), 200.0));

    let plain = table_json(d, &[]);
    assert_eq!(predictions(&plain), vec![None, None, None]);
    assert!(plain["predicted"].is_null());

    let given = table_json(d, &["--calibration", "slow.json", "--cpu-layers", "2"]);
    // 28 resident layers leave none for the CPU: that row is left out.
    let ms: Vec<f64> = predictions(&given)
        .into_iter()
        .map(Option::unwrap)
        .collect();
    // Fewer resident layers, slower; streaming 7B layers at 50 GB/s takes tens of ms.
    assert!(ms.len() == 2 && ms[0] < ms[1], "{ms:?}");
    assert!(ms[1] > 50.0, "{ms:?}");
    assert_eq!(given["predicted"]["rates"]["cpu_gbps"].as_f64(), Some(20.0));
    assert_eq!(given["predicted"]["batch"].as_u64(), Some(1));

    // `auto` takes each count's fastest split: more host layers with a faster CPU, and never
    // slower than the fixed split of 2.
    let auto_slow = table_json(d, &["--calibration", "slow.json", "--cpu-layers", "auto"]);
    let auto_fast = table_json(d, &["--calibration", "fast.json", "--cpu-layers", "auto"]);
    let cpu = |r: &serde_json::Value, i: usize| r["rows"][i]["cpu_layers"].as_u64().unwrap();
    assert_eq!(cpu(&auto_fast, 0), 0, "all resident: nothing to split");
    assert!(cpu(&auto_fast, 2) > cpu(&auto_slow, 2));
    for (a, fixed) in predictions(&auto_slow)[1..].iter().zip(&ms) {
        assert!(a.unwrap() <= fixed + 1e-9, "{a:?} vs {fixed}");
    }
    let text = ok(
        d,
        &[
            "table",
            "--calibration",
            "fast.json",
            "--cpu-layers",
            "auto",
        ],
    );
    // Lines are folded to the terminal's width.
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(text.contains("the split predicted fastest"), "{text}");
    assert!(text.contains("the CFG pair"), "{text}");
}

#[test]
fn the_stored_calibration_is_used_only_on_the_machine_it_describes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stored = d.join(".cache/vibeoffload/calibration.json");
    store(&stored, &calibration(this_machine(), 60.0));
    let report = table_json(d, &[]);
    assert!(predictions(&report).iter().all(Option::is_some));

    store(&stored, &calibration(elsewhere(), 60.0));
    let o = vibeoffload(d, &["table", "--lm-only", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("not of this machine"), "{}", o.stderr);
    let report: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(report["predicted"].is_null());

    // An unreadable stored file is passed over, with a note.
    std::fs::write(&stored, "not json").unwrap();
    let o = vibeoffload(d, &["table", "--lm-only"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("is not a calibration"), "{}", o.stderr);
}

#[test]
fn bad_calibrations_and_requests_get_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("bad.json"), "{}").unwrap();
    fails(
        d,
        &["table", "--calibration", "missing.json"],
        1,
        &["cannot read the calibration", "missing.json"],
    );
    fails(
        d,
        &["table", "--calibration", "bad.json"],
        1,
        &["bad.json is not a calibration", "bench --calibrate"],
    );
    fails(
        d,
        &["run", "--cpu-layers", "auto", "--calibration", "bad.json"],
        1,
        &["bad.json is not a calibration"],
    );
    // No calibration stored here: `table` cannot choose the split.
    fails(
        d,
        &["table", "--cpu-layers", "auto"],
        1,
        &["none was found", "bench --calibrate"],
    );
    let mut nan = calibration(elsewhere(), 60.0);
    nan.batches[1].host_layer_overhead_ms = -1.0;
    let text = serde_json::to_string(&nan).unwrap();
    std::fs::write(d.join("negative.json"), text).unwrap();
    fails(
        d,
        &["table", "--calibration", "negative.json"],
        1,
        &["host_layer_overhead_ms is -1, not a positive number"],
    );
    let mut only_one = calibration(elsewhere(), 60.0);
    only_one.batches.truncate(1);
    store(&d.join("one.json"), &only_one);
    fails(
        d,
        &[
            "table",
            "--lm-only",
            "--batch",
            "2",
            "--cpu-layers",
            "auto",
            "--calibration",
            "one.json",
        ],
        1,
        &["batches 1 only, not batch 2"],
    );
    fails(
        d,
        &["auto", "--cpu-layers", "auto", "--vram", "8GB"],
        2,
        &["--cpu-layers auto"],
    );
    if !cfg!(feature = "cuda") {
        fails(
            d,
            &["bench", "--calibrate"],
            1,
            &["bench --calibrate", "needs a GPU"],
        );
    }
    fails(
        d,
        &["bench", "--calibrate", "--layers", "4"],
        2,
        &["--calibrate", "--layers"],
    );
    assert!(!d.join(".cache").exists(), "nothing stored");
}
