//! The original's command forms as users type them (`vibeoffload --num-gpu-layers 8`,
//! `--auto --test-speed`, `--print-table`): with a checkpoint in `models/converted` they load
//! the whole model and report; without one they plan and say where they looked. Every plan
//! and report names its scope, and the same budget and scope give the same N everywhere.

mod common;

use common::cli::{fails, ok, vibeoffload};
use std::path::Path;
use vibeoffload::generate::LoadReport;
use vibeoffload::measure::RunReport;
use vibeoffload::plan::Scope;
use vibeoffload::report::PlanReport;

const CHECKPOINT: &str = "models/converted/vibevoice7b_float8_e4m3fn.safetensors";

/// A small VibeVoice checkpoint (8 layers) where the original looks for one.
fn with_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models/converted")).unwrap();
    ok(
        dir.path(),
        &["synth", CHECKPOINT, "--size", "custom", "--layers", "8"],
    );
    dir
}

/// The command's `--json` report.
fn report<T: serde::de::DeserializeOwned>(dir: &Path, args: &[&str]) -> T {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&ok(dir, &all)).unwrap()
}

fn load(dir: &Path, args: &[&str]) -> LoadReport {
    report(dir, args)
}

#[test]
fn num_gpu_layers_loads_the_whole_model_and_reports_it() {
    let dir = with_checkpoint();
    let r = load(dir.path(), &["--num-gpu-layers", "3"]);
    assert_eq!(r.plan.scope, Scope::Full);
    assert_eq!(r.engine.gpu_layers, 3);
    let (e, a) = (&r.estimate, &r.allocated);
    assert_eq!((e.gpu_layers, e.offloaded_layers), (3, 5));
    // What the engine allocated is what the plan counts, term by term.
    assert_eq!(a.engine.resident_layers, e.resident_layers_bytes);
    assert_eq!(a.engine.stream_slots, e.stream_buffers_bytes);
    // Both lanes' caches, in f32 on the CPU where the plan counts bf16 for the GPU.
    assert_eq!(a.kv_cache_bytes, 2 * e.kv_cache_bytes);
    assert!(a.speech_bytes > 0 && a.engine.non_layer + a.speech_bytes <= e.non_layer_weights_bytes);
    assert!(r.test_speed.is_none());
    // The load's phases are named and add up to nearly all of it.
    let p = &r.load_phases;
    assert!(
        p.speech_ms > 0.0 && p.read_ms > 0.0 && p.upload_ms > 0.0,
        "{p:?}"
    );
    assert!(p.phases_ms() <= p.total_ms * 1.0001, "{p:?}");

    let text = ok(dir.path(), &["--num-gpu-layers", "3"]);
    for words in [
        "plan: full VibeVoice",
        "3 of 8 decoder layers on the GPU, 5 in host memory (choice: --num-gpu-layers)",
        "loaded in ",
        "KV caches (2 lanes)",
    ] {
        assert!(text.contains(words), "{words:?} not in {text}");
    }
    // With --vram, a fixed choice is loaded and the report says whether it fits.
    for (vram, verdict) in [
        ("8GiB", "is within the budget"),
        ("1GiB", "is OVER the budget"),
    ] {
        let text = ok(dir.path(), &["--num-gpu-layers", "3", "--vram", vram]);
        assert!(text.contains(verdict), "{vram}: {text}");
    }
}

#[test]
fn auto_chooses_in_the_whole_model_scope_as_table_does() {
    let dir = with_checkpoint();
    let d = dir.path();
    // A budget that fits some layers but not all.
    let all: PlanReport = report(d, &["auto", "--model-path", CHECKPOINT, "--vram", "1TiB"]);
    let n4 = load(d, &["--num-gpu-layers", "4"]).estimate.total_bytes;
    let vram = format!("{}B", (n4 as f64 / 0.8).ceil() as u64);
    let auto = load(d, &["--auto", "--vram", &vram]);
    assert_eq!(auto.estimate.gpu_layers, 4);
    assert!(auto.budget.is_some());
    let plan: PlanReport = report(d, &["auto", "--model-path", CHECKPOINT, "--vram", &vram]);
    assert_eq!(
        plan.estimate.gpu_layers, 4,
        "auto plans what the flag form loads"
    );
    assert_eq!(all.estimate.gpu_layers, 8);
    // `run` loads the language model alone, and chooses as `auto --lm-only` does.
    let lm: PlanReport = report(
        d,
        &[
            "auto",
            "--lm-only",
            "--model-path",
            CHECKPOINT,
            "--vram",
            &vram,
        ],
    );
    let run: RunReport = report(
        d,
        &[
            "run",
            "--model-path",
            CHECKPOINT,
            "--vram",
            &vram,
            "--gen-tokens",
            "1",
        ],
    );
    assert_eq!(run.engine.gpu_layers, lm.estimate.gpu_layers);
    assert!(
        lm.estimate.gpu_layers > 4,
        "the language model alone fits more"
    );
    let text = ok(
        d,
        &[
            "run",
            "--model-path",
            CHECKPOINT,
            "--vram",
            &vram,
            "--gen-tokens",
            "1",
        ],
    );
    assert!(text.contains("scope: the language model alone"), "{text}");
    assert!(text.contains("budget: 80% of"), "{text}");
}

#[test]
fn test_speed_times_the_loaded_model() {
    let dir = with_checkpoint();
    let r = load(
        dir.path(),
        &[
            "--num-gpu-layers",
            "6",
            "--test-speed",
            "--prompt-len",
            "16",
        ],
    );
    let t = r.test_speed.expect("the speed test ran");
    assert_eq!((t.tokens, t.runs_ms.len()), (16, 5));
    // 2 streamed layers through 2 slots stay put: copied once, before the timed passes.
    assert_eq!(r.estimate.offloaded_layers, 2);
    let text = ok(
        dir.path(),
        &[
            "--num-gpu-layers",
            "6",
            "--test-speed",
            "--prompt-len",
            "16",
        ],
    );
    assert!(text.contains("test-speed: 16 tokens, 1 warm-up"), "{text}");
}

#[test]
fn without_a_checkpoint_the_flag_form_plans_and_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let o = vibeoffload(dir.path(), &["--num-gpu-layers", "8", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let plan: PlanReport = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(plan.estimate.gpu_layers, 8);
    assert_eq!(plan.options.scope, Scope::Full);
    assert!(
        o.stderr.contains(&format!("no checkpoint at {CHECKPOINT}"))
            && o.stderr.contains("vibeoffload synth"),
        "{}",
        o.stderr
    );
    // An explicit --model-path that is not there is an error, as in the original.
    fails(
        dir.path(),
        &[
            "--num-gpu-layers",
            "8",
            "--model-path",
            "nothing.safetensors",
        ],
        1,
        &["nothing.safetensors"],
    );
    // --offload-prediction-head plans only, and says so.
    let dir = with_checkpoint();
    let o = vibeoffload(
        dir.path(),
        &[
            "--num-gpu-layers",
            "2",
            "--offload-prediction-head",
            "--json",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let plan: PlanReport = serde_json::from_str(&o.stdout).unwrap();
    assert!(plan.options.offload_prediction_head);
    assert!(o.stderr.contains("planned only"), "{}", o.stderr);
}
