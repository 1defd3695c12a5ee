//! Drives the real binary on small synthesized checkpoints and checks typed `--json` output,
//! messages and exit codes.

mod common;

use common::cli::{assert_no_temporary_files, fails, ok, vibeoffload};
use std::path::{Path, PathBuf};
use vibeoffload::engine::EngineOptions;
use vibeoffload::measure::RunReport;
use vibeoffload::report::{InspectReport, PlanReport, TableReport};

/// A tiny float8 VibeVoice checkpoint (4 layers) in a fresh directory.
fn tiny(extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "synth",
        "m.safetensors",
        "--size",
        "custom",
        "--layers",
        "4",
    ];
    args.extend_from_slice(extra);
    ok(dir.path(), &args);
    let path = dir.path().join("m.safetensors");
    (dir, path)
}

/// Reads a safetensors header as JSON, lets `edit` change it, and writes the file back with
/// the same data section.
fn rewrite_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn header_tensor_bytes(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| {
            v["data_offsets"][1].as_u64().unwrap() - v["data_offsets"][0].as_u64().unwrap()
        })
        .sum()
}

#[test]
fn print_table_without_a_model_file_covers_every_fourth_layer_count() {
    let dir = tempfile::tempdir().unwrap();
    let text = ok(dir.path(), &["--print-table"]);
    assert!(
        text.contains("built-in 7b float8") && text.contains("Common GPUs"),
        "{text}"
    );
    let report: TableReport =
        serde_json::from_str(&ok(dir.path(), &["--print-table", "--json"])).unwrap();
    let counts: Vec<usize> = report.rows.iter().map(|r| r.estimate.gpu_layers).collect();
    assert_eq!(counts, [28, 24, 20, 16, 12, 8, 4, 0]);
    assert_eq!(report.model.layer_bytes, 233_057_792);
    // `table` is the same command.
    let again: TableReport = serde_json::from_str(&ok(dir.path(), &["table", "--json"])).unwrap();
    assert_eq!(again, report);
    let sizes: Vec<u64> = report.gpu_classes.iter().map(|g| g.vram_gib).collect();
    assert_eq!(sizes, [8, 12, 16, 24, 48, 80]);
}

#[test]
fn auto_picks_the_largest_layer_count_that_fits_80_percent() {
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<String> = (0..=28).map(|n| n.to_string()).collect();
    let table: TableReport = serde_json::from_str(&ok(
        dir.path(),
        &[
            "table",
            "--json",
            "--vram",
            "1GiB",
            "--layers",
            &all.join(","),
        ],
    ))
    .unwrap();
    for (vram, gib) in [("8GiB", 8u64), ("12GiB", 12)] {
        let budget = (gib << 30) as f64 * 0.8;
        let expected = table
            .rows
            .iter()
            .filter(|r| r.estimate.total_bytes as f64 <= budget)
            .map(|r| r.estimate.gpu_layers)
            .max()
            .unwrap();
        for args in [
            vec!["auto", "--vram", vram, "--json"],
            vec!["--auto", "--vram", vram, "--json"],
        ] {
            let plan: PlanReport = serde_json::from_str(&ok(dir.path(), &args)).unwrap();
            assert_eq!(plan.estimate.gpu_layers, expected, "{args:?}");
            assert_eq!(plan.budget.unwrap().budget_bytes, budget as u64);
        }
    }
}

#[test]
fn flag_form_follows_the_originals_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let plan = |args: &[&str]| -> PlanReport {
        let mut all = args.to_vec();
        all.extend(["--json", "--vram", "24GiB"]);
        serde_json::from_str(&ok(dir.path(), &all)).unwrap()
    };
    assert_eq!(plan(&["--num-gpu-layers", "8"]).estimate.gpu_layers, 8);
    assert_eq!(plan(&["--config", "consumer"]).estimate.gpu_layers, 12);
    assert_eq!(
        plan(&["--config", "aggressive", "--num-gpu-layers", "3"])
            .estimate
            .gpu_layers,
        8
    );
    assert_eq!(
        plan(&["--no-offload", "--config", "minimal"])
            .estimate
            .gpu_layers,
        28
    );
    // `--auto` spells out the default, so a fixed choice still wins over it.
    assert_eq!(
        plan(&["--auto", "--num-gpu-layers", "8"])
            .estimate
            .gpu_layers,
        8
    );
    let text = ok(dir.path(), &["--print-table", "--no-offload"]);
    assert!(text.contains("Common GPUs"));
    // Help is wrapped to the terminal: read it as one line.
    let help = ok(dir.path(), &["--help"])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains("`--print-table` (as `table`), then `--test-speed`"),
        "{help}"
    );
}

#[test]
fn flag_form_times_only_with_test_speed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["--device", "cpu", "--vram", "8GiB"][..],
        &["--num-gpu-layers", "2", "--runs", "3", "--vram", "8GiB"],
        &["--print-table", "--no-pin"],
    ] {
        let o = vibeoffload(d, args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(
            o.stderr
                .contains("required arguments were not provided:\n  --test-speed"),
            "{args:?}: {}",
            o.stderr
        );
    }
    for args in [
        &["--test-speed", "--builtin", "1.5b"][..],
        &["--test-speed", "--offload-prediction-head"],
    ] {
        fails(d, args, 2, &["cannot be used with"]);
    }
}

#[test]
fn flags_that_would_do_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `run` and `bench` load the language model from a file (or the embedded model): no
    // built-in layout, no scope, and `bench` measures every count it is given, no budget.
    for args in [
        &["run", "--builtin", "1.5b"][..],
        &["run", "--lm-only"],
        &["run", "--offload-prediction-head"],
        &["bench", "--builtin", "7b"],
        &["bench", "--lm-only"],
        &["bench", "--vram", "8GiB"],
        &["bench", "--target-utilization", "0.5"],
    ] {
        fails(d, args, 2, &["unexpected argument", args[1]]);
    }
    let (tiny_dir, _) = tiny(&[]);
    for args in [
        &["run", "--prefetch-depth", "1", "--no-prefetch"][..],
        &["run", "--input-ids", "1,2", "--test-speed"],
        &[
            "table",
            "--model-path",
            "m.safetensors",
            "--builtin",
            "1.5b",
        ],
        &["inspect", "m.safetensors", "--builtin", "1.5b"],
        &["inspect", "m.safetensors", "--model-path", "m.safetensors"],
        &["table", "--lm-only", "--offload-prediction-head"],
    ] {
        fails(tiny_dir.path(), args, 2, &["cannot be used with"]);
    }
}

#[test]
fn run_without_a_model_file_follows_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let run = |dtype: &str| -> RunReport {
        let args = [
            "run",
            "--dtype",
            dtype,
            "--num-gpu-layers",
            "4",
            "--prompt-len",
            "4",
            "--gen-tokens",
            "2",
            "--json",
        ];
        serde_json::from_str(&ok(dir.path(), &args)).unwrap()
    };
    let (f8, bf16) = (run("float8"), run("bf16"));
    assert!(f8.model.source.ends_with("float8)"), "{}", f8.model.source);
    assert!(
        bf16.model.source.ends_with("bf16)"),
        "{}",
        bf16.model.source
    );
    assert_eq!(bf16.model.layer_bytes, 2 * f8.model.layer_bytes);
    assert_eq!(bf16.decode.expect("decode mode").generated_tokens, 2);
}

#[test]
fn inspect_totals_equal_the_headers_bytes() {
    for extra in [
        &[][..],
        &["--dtype", "bf16"],
        &["--scale", "channel"],
        &["--scale", "scalar", "--scale-convention", "weight-scale"],
        &["--tie-embeddings", "--kv-heads", "1"],
    ] {
        let (dir, path) = tiny(extra);
        let report: InspectReport =
            serde_json::from_str(&ok(dir.path(), &["inspect", "m.safetensors", "--json"])).unwrap();
        assert_eq!(
            report.model.total_bytes,
            header_tensor_bytes(&path),
            "{extra:?}"
        );
        assert_eq!(report.layer_bytes.len(), 4);
        assert!(report
            .layer_bytes
            .iter()
            .all(|&b| b == report.model.layer_bytes));
        let groups: u64 = report.groups.iter().map(|g| g.bytes).sum();
        assert_eq!(groups + report.layers_total_bytes, report.model.total_bytes);
        assert_eq!(report.file_bytes, std::fs::metadata(&path).unwrap().len());
    }
}

#[test]
fn inspect_recognises_scale_conventions() {
    let (dir, _) = tiny(&["--scale", "channel"]);
    let r: InspectReport =
        serde_json::from_str(&ok(dir.path(), &["inspect", "m.safetensors", "--json"])).unwrap();
    assert_eq!(r.scales.convention, "scale_weight");
    assert!(r.scales.scaled_fp8_marker);
    assert_eq!(r.scales.granularity["per_channel"], r.scales.scaled_weights);
    assert_eq!(r.scales.unscaled_float8_matrices, 0);
    let (dir, _) = tiny(&[]);
    let r: InspectReport =
        serde_json::from_str(&ok(dir.path(), &["inspect", "m.safetensors", "--json"])).unwrap();
    assert_eq!(
        (r.scales.convention.as_str(), r.scales.scaled_weights),
        ("none", 0)
    );
}

#[test]
fn builtin_inventory_matches_a_synthesized_file() {
    // The built-in 1.5B layout and `synth --size 1.5b` share one tensor list; a tiny model
    // proves the file side: the config read back from disk equals the one written.
    let (dir, _) = tiny(&[
        "--hidden",
        "128",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--vocab",
        "300",
    ]);
    let r: InspectReport =
        serde_json::from_str(&ok(dir.path(), &["inspect", "m.safetensors", "--json"])).unwrap();
    assert_eq!(
        (r.model.config.hidden_size, r.model.config.head_dim),
        (128, 32)
    );
    let builtin: InspectReport =
        serde_json::from_str(&ok(dir.path(), &["inspect", "--builtin", "1.5b", "--json"])).unwrap();
    assert_eq!(builtin.model.layers, 28);
    assert!(
        builtin
            .groups
            .iter()
            .any(|g| g.name == "lm_head" && g.tensors == 0),
        "1.5B is tied"
    );
}

#[test]
fn config_is_inferred_from_shapes_without_config_json() {
    let (dir, _) = tiny(&[
        "--hidden",
        "256",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--intermediate",
        "96",
    ]);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let r: InspectReport =
        serde_json::from_str(&ok(dir.path(), &["inspect", "m.safetensors", "--json"])).unwrap();
    let c = &r.model.config;
    assert_eq!(
        (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size
        ),
        (256, 2, 1, 96)
    );
}

#[test]
fn model_path_directory_uses_the_originals_file_name() {
    let (dir, _) = tiny(&[]);
    std::fs::create_dir(dir.path().join("converted")).unwrap();
    for f in ["m.safetensors", "config.json"] {
        let to = if f == "config.json" {
            f
        } else {
            "vibevoice7b_float8_e4m3fn.safetensors"
        };
        std::fs::rename(dir.path().join(f), dir.path().join("converted").join(to)).unwrap();
    }
    // With a checkpoint, the flag form loads it, as the original does.
    let loaded: vibeoffload::generate::LoadReport = serde_json::from_str(&ok(
        dir.path(),
        &[
            "--model-path",
            "converted",
            "--num-gpu-layers",
            "2",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(
        (loaded.model.layers, loaded.estimate.offloaded_layers),
        (4, 2)
    );
    fails(
        dir.path(),
        &[
            "--model-path",
            "converted",
            "--dtype",
            "bf16",
            "--print-table",
        ],
        1,
        &["vibevoice7b_bf16.safetensors"],
    );
}

#[test]
fn synth_is_deterministic_and_refuses_to_overwrite() {
    let (dir, path) = tiny(&["--seed", "7"]);
    let first = std::fs::read(&path).unwrap();
    fails(
        dir.path(),
        &[
            "synth",
            "m.safetensors",
            "--size",
            "custom",
            "--layers",
            "4",
        ],
        2,
        &["refusing to overwrite"],
    );
    ok(
        dir.path(),
        &[
            "synth",
            "m.safetensors",
            "--size",
            "custom",
            "--layers",
            "4",
            "--seed",
            "7",
            "--force",
        ],
    );
    assert_eq!(std::fs::read(&path).unwrap(), first);
    assert_no_temporary_files(dir.path());
    fails(
        dir.path(),
        &["synth", "nowhere/m.safetensors"],
        2,
        &["does not exist"],
    );
    fails(
        dir.path(),
        &["synth", "x.safetensors", "--hidden", "8"],
        2,
        &["--size custom"],
    );
    fails(
        dir.path(),
        &["synth", "x.safetensors", "--size", "custom", "--heads", "3"],
        2,
        &["not a multiple"],
    );
}

#[test]
fn bad_checkpoints_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(
        d,
        &["inspect", "missing.safetensors"],
        1,
        &["cannot open checkpoint missing.safetensors"],
    );
    std::fs::write(
        d.join("text.safetensors"),
        "hello, this is not a model at all",
    )
    .unwrap();
    fails(
        d,
        &["inspect", "text.safetensors"],
        1,
        &["not a safetensors file"],
    );
    std::fs::write(d.join("short.safetensors"), [1u8, 2, 3]).unwrap();
    fails(d, &["inspect", "short.safetensors"], 1, &["too short"]);
    let mut beyond = 1000u64.to_le_bytes().to_vec();
    beyond.extend_from_slice(b"{}");
    std::fs::write(d.join("beyond.safetensors"), beyond).unwrap();
    fails(
        d,
        &["inspect", "beyond.safetensors"],
        1,
        &["header length", "1000"],
    );
    let mut malformed = 12u64.to_le_bytes().to_vec();
    malformed.extend_from_slice(b"{\"a\": [1, 2");
    malformed.push(b' ');
    std::fs::write(d.join("malformed.safetensors"), malformed).unwrap();
    fails(
        d,
        &["inspect", "malformed.safetensors"],
        1,
        &["not valid JSON"],
    );
}

type HeaderEdit = Box<dyn FnOnce(&mut serde_json::Map<String, serde_json::Value>)>;

#[test]
fn corrupt_headers_name_the_tensor() {
    let layer = |rest: &str| format!("model.language_model.layers.2.{rest}");
    let cases: Vec<(&str, HeaderEdit, &[&str])> = vec![
        (
            "offsets out of range",
            Box::new(|h| {
                let t = h.get_mut("model.language_model.norm.weight").unwrap();
                t["data_offsets"] = serde_json::json!([10_000_000, 10_000_064]);
            }),
            &["model.language_model.norm.weight", "past the end"],
        ),
        (
            "overlap",
            Box::new(|h| {
                let a = h["model.language_model.embed_tokens.weight"]["data_offsets"].clone();
                let t = h.get_mut("model.language_model.norm.weight").unwrap();
                let start = a[0].as_u64().unwrap();
                t["data_offsets"] = serde_json::json!([start, start + 64]);
            }),
            &["overlap"],
        ),
        (
            "unknown dtype",
            Box::new(|h| {
                h.get_mut("model.language_model.norm.weight").unwrap()["dtype"] = "F4".into();
            }),
            &["unknown dtype \"F4\"", "model.language_model.norm.weight"],
        ),
        (
            "inconsistent layer",
            Box::new(move |h| {
                // Same bytes, different shape: [128, 64] -> [64, 128].
                h.get_mut(&layer("mlp.up_proj.weight")).unwrap()["shape"] =
                    serde_json::json!([64, 128]);
            }),
            &[
                "layers.2.mlp.up_proj.weight",
                "all decoder layers must match",
            ],
        ),
        (
            "missing layer tensor",
            Box::new(|h| {
                h.remove("model.language_model.layers.3.self_attn.k_proj.weight");
            }),
            &["decoder layer 3 lacks self_attn.k_proj.weight"],
        ),
        (
            "missing layer",
            Box::new(|h| {
                h.retain(|k, _| !k.starts_with("model.language_model.layers.1."));
            }),
            &["decoder layer 1 is missing"],
        ),
    ];
    for (what, edit, words) in cases {
        let (dir, path) = tiny(&[]);
        rewrite_header(&path, edit);
        let o = vibeoffload(dir.path(), &["inspect", "m.safetensors"]);
        assert_eq!(o.code, 1, "{what}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{what}: {}", o.stderr);
        for w in words {
            assert!(o.stderr.contains(w), "{what}: {w:?} not in {}", o.stderr);
        }
    }
}

#[test]
fn config_json_that_disagrees_names_the_tensor() {
    let (dir, _) = tiny(&[]);
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 256");
    std::fs::write(&cfg, text).unwrap();
    fails(
        dir.path(),
        &["inspect", "m.safetensors"],
        1,
        &["mlp.gate_proj.weight", "config.json"],
    );
}

#[test]
fn inspect_lists_every_speech_component_with_its_parameters() {
    let (dir, _) = tiny(&["--hidden", "64", "--heads", "4"]);
    let r: InspectReport =
        serde_json::from_str(&ok(dir.path(), &["inspect", "m.safetensors", "--json"])).unwrap();
    let names: Vec<&str> = r.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "embeddings",
            "final_norm",
            "lm_head",
            "acoustic_encoder",
            "acoustic_decoder",
            "semantic_encoder",
            "acoustic_connector",
            "semantic_connector",
            "prediction_head",
            "scalars",
            "other"
        ]
    );
    let group = |n: &str| r.groups.iter().find(|g| g.name == n).unwrap();
    // The small tokenizers (4 filters, ratios [2, 2], one block per stage, latent 8) and a
    // two-layer head around hidden 64, counted by hand from the original's modules.
    let block = |c: u64| 4 * c + 7 * c + c + 2 * (4 * c * c) + 4 * c + c;
    let encoder =
        (4 * 7 + 4) + (8 * 4 * 4 + 8) + (16 * 8 * 4 + 16) + block(4) + block(8) + block(16);
    assert_eq!(group("acoustic_encoder").params, encoder + 8 * 16 * 7 + 8);
    assert_eq!(group("semantic_encoder").params, encoder + 6 * 16 * 7 + 6);
    let decoder =
        (16 * 8 * 7 + 16) + (16 * 8 * 4 + 8) + (8 * 4 * 4 + 4) + block(16) + block(8) + block(4);
    assert_eq!(group("acoustic_decoder").params, decoder + 4 * 7 + 1);
    assert_eq!(
        group("acoustic_connector").params,
        64 * 8 + 64 + 64 + 64 * 64 + 64
    );
    let layer = 3 * 192 * 64 + 64 + 3 * 64 * 64;
    let head = 64 * 8 + 64 * 64 + 64 * 256 + 64 * 64 + 2 * layer + 8 * 64 + 2 * 64 * 64;
    assert_eq!(group("prediction_head").params, head);
    assert_eq!((group("scalars").tensors, group("scalars").params), (2, 2));
    let speech = r.model.speech.expect("a VibeVoice checkpoint");
    assert_eq!(speech.acoustic.encoder.hop(), 4);
    let text = ok(dir.path(), &["inspect", "m.safetensors"]);
    assert!(
        text.contains("acoustic_decoder") && text.contains("speech: acoustic latent 8, hop 4"),
        "{text}"
    );
}

#[test]
fn speech_components_that_disagree_with_the_configuration_name_the_tensor_and_file() {
    // Heads of 128 so that the shapes tell the configuration once config.json is gone.
    let (dir, path) = tiny(&["--hidden", "256", "--heads", "2", "--kv-heads", "1"]);
    let gamma = "model.acoustic_tokenizer.decoder.stages.1.0.gamma";
    rewrite_header(&path, |h| {
        h.remove(gamma);
    });
    fails(
        dir.path(),
        &["inspect", "m.safetensors"],
        1,
        &[gamma, "m.safetensors", "config.json"],
    );
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    fails(
        dir.path(),
        &["inspect", "m.safetensors"],
        1,
        &[gamma, "m.safetensors"],
    );

    let (dir, _) = tiny(&[]);
    let cfg = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["diffusion_head_config"]["head_layers"] = serde_json::json!(3);
    std::fs::write(&cfg, json.to_string()).unwrap();
    fails(
        dir.path(),
        &["inspect", "m.safetensors"],
        1,
        &["model.prediction_head.layers.2.", "config.json"],
    );
    json["diffusion_head_config"]["head_layers"] = serde_json::json!("2");
    std::fs::write(&cfg, json.to_string()).unwrap();
    fails(
        dir.path(),
        &["--print-table", "--model-path", "m.safetensors"],
        1,
        &[
            "\"diffusion_head_config.head_layers\" must be a non-negative integer",
            "config.json",
        ],
    );
}

#[test]
fn bad_command_lines_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(
        d,
        &["--num-gpu-layers", "29", "--vram", "8GiB"],
        2,
        &["more than the model's 28 layers"],
    );
    fails(
        d,
        &["--config", "turbo"],
        2,
        &["unknown preset 'turbo'", "consumer"],
    );
    fails(d, &["auto", "--vram", "8"], 2, &["--vram 8", "no unit"]);
    fails(d, &["auto", "--vram", "lots"], 2, &["--vram lots"]);
    fails(d, &["auto", "--vram", "0GiB"], 2, &["positive"]);
    fails(d, &["auto", "--vram", "-8GiB"], 2, &["--vram -8GiB"]);
    fails(d, &["table", "--batch", "0"], 2, &["--batch"]);
    fails(d, &["table", "--max-seq-len", "0"], 2, &["--max-seq-len"]);
    fails(
        d,
        &["auto", "--vram", "8GiB", "--target-utilization", "1.5"],
        2,
        &["--target-utilization"],
    );
    let (tiny_dir, _) = tiny(&[]);
    fails(
        tiny_dir.path(),
        &["--model-path", "m.safetensors", "--config", "consumer"],
        2,
        &["keeps 12 layers", "has 4"],
    );
    // clap's own errors keep clap's wording and exit 2.
    let o = vibeoffload(d, &["--num-gpu-layers", "-1"]);
    assert_eq!(o.code, 2);
    fails(d, &["run", "--device", "cuda"], 2, &["--features cuda"]);
    fails(
        d,
        &[
            "run",
            "--dump",
            "x.safetensors",
            "--num-gpu-layers",
            "2",
            "--prompt-len",
            "4",
            "--gen-tokens",
            "1",
        ],
        2,
        &["--dump needs --input-ids"],
    );
}

#[test]
fn nothing_fits_says_by_how_much() {
    let dir = tempfile::tempdir().unwrap();
    fails(
        dir.path(),
        &["auto", "--vram", "2GiB"],
        1,
        &["nothing fits", "over the budget"],
    );
}

#[test]
fn run_works_without_a_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "run",
        "--num-gpu-layers",
        "4",
        "--prompt-len",
        "8",
        "--gen-tokens",
        "3",
        "--json",
    ];
    let r: RunReport = serde_json::from_str(&ok(dir.path(), &args)).unwrap();
    let d = r.decode.expect("decode mode by default");
    assert_eq!(
        (d.prompt_tokens, d.generated_tokens, d.tokens.len()),
        (8, 3, 3)
    );
    assert!(d.ms_per_token > 0.0 && d.ttft_ms > 0.0);
    assert_eq!((r.engine.gpu_layers, r.model.layers), (4, 8));
    // 4 streamed layers through 2 slots: every layer of both timed steps after the first
    // token is copied (the prefill's copies are the time to first token's).
    assert!(d.transfer.total_transfers >= 2 * 4, "{:?}", d.transfer);
    assert_eq!(d.transfer.per_layer.len(), 4);
}

#[test]
fn test_speed_flag_form_times_five_passes() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--num-gpu-layers",
        "5",
        "--test-speed",
        "--prompt-len",
        "16",
        "--json",
    ];
    let r: RunReport = serde_json::from_str(&ok(dir.path(), &args)).unwrap();
    let t = r.test_speed.expect("test-speed mode");
    assert_eq!((t.tokens, t.warmup_runs, t.runs_ms.len()), (16, 1, 5));
    // 3 streamed layers through 2 slots: each copied once per timed pass.
    assert_eq!(t.transfer.total_transfers, 5 * 3);
    assert!(r.decode.is_none());
}

#[test]
fn dumps_compare_equal_across_configurations() {
    let dir = tempfile::tempdir().unwrap();
    let mut sums = Vec::new();
    for (n, file) in [("8", "resident.safetensors"), ("1", "streamed.safetensors")] {
        let args = [
            "run",
            "--num-gpu-layers",
            n,
            "--input-ids",
            "1,2,3,4,5",
            "--dump",
            file,
            "--json",
        ];
        let r: RunReport = serde_json::from_str(&ok(dir.path(), &args)).unwrap();
        sums.push(r.forward.expect("forward mode").hidden_sum);
    }
    assert_eq!(sums[0], sums[1]);
    let a = std::fs::read(dir.path().join("resident.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("streamed.safetensors")).unwrap();
    assert_eq!(a, b, "the dumps are byte-identical");
    let tensors = candle_core::safetensors::load(
        dir.path().join("resident.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors["hidden_states"].dims(), [5, 256]);
    assert_eq!(tensors["logits"].dims(), [1024]);
}

#[test]
fn json_out_writes_the_report_and_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "run",
        "--num-gpu-layers",
        "4",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--json-out",
        "run.json",
    ];
    let text = ok(d, &args);
    assert!(
        text.starts_with("model: ") && text.contains("decode: "),
        "{text}"
    );
    let r: RunReport =
        serde_json::from_str(&std::fs::read_to_string(d.join("run.json")).unwrap()).unwrap();
    assert_eq!(r.decode.expect("decode mode").generated_tokens, 2);
    assert_no_temporary_files(d);
    // With --json too, stdout and the file hold the same report.
    let mut both = args[..3].to_vec();
    both.extend(["--json-out", "run.json", "--input-ids", "1,2,3", "--json"]);
    let printed: RunReport = serde_json::from_str(&ok(d, &both)).unwrap();
    let written: RunReport =
        serde_json::from_str(&std::fs::read_to_string(d.join("run.json")).unwrap()).unwrap();
    assert_eq!(printed, written);
    fails(
        d,
        &["run", "--input-ids", "1", "--json-out", "missing/run.json"],
        1,
        &["missing"],
    );
}

#[test]
fn run_decodes_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "run",
        "--batch",
        "3",
        "--num-gpu-layers",
        "4",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "3",
        "--json",
    ];
    let r: RunReport = serde_json::from_str(&ok(dir.path(), &args)).unwrap();
    let d = r.decode.unwrap();
    assert_eq!((d.batch, d.generated_tokens), (3, 3));
    assert!((d.tokens_per_s - 3e3 / d.ms_per_token).abs() < 1e-6 * d.tokens_per_s);
    // The estimate's KV cache holds the batch: 2 (k, v) x layers x 3 x 4096 x kv heads x dim x 2 bytes.
    let c = &r.model.config;
    let kv = 2 * c.num_hidden_layers * 3 * 4096 * c.num_key_value_heads * c.head_dim * 2;
    assert_eq!(r.estimate.kv_cache_bytes, kv as u64);
    assert!(r.load_phases.total_ms >= r.load_phases.upload_ms);
}

#[test]
fn outputs_never_replace_an_input_a_link_or_a_directory() {
    let (dir, model) = tiny(&[]);
    let d = dir.path();
    let before = std::fs::read(&model).unwrap();
    let config_before = std::fs::read(d.join("config.json")).unwrap();
    let run = |dump: &'static str| {
        [
            "run",
            "--model-path",
            "m.safetensors",
            "--input-ids",
            "1,2,3",
            "--dump",
            dump,
        ]
    };
    fails(
        d,
        &run("m.safetensors"),
        1,
        &["refusing to write", "the tool reads it"],
    );
    fails(
        d,
        &run("config.json"),
        1,
        &["refusing to write", "the tool reads it"],
    );
    std::os::unix::fs::symlink("elsewhere.txt", d.join("link.safetensors")).unwrap();
    fails(d, &run("link.safetensors"), 1, &["is a link"]);
    std::fs::create_dir(d.join("sub")).unwrap();
    fails(d, &run("sub"), 1, &["not a regular file"]);
    let bench = [
        "bench",
        "--model-path",
        "m.safetensors",
        "--layers",
        "4",
        "--plot",
        "m.safetensors",
    ];
    fails(d, &bench, 1, &["the tool reads it"]);
    assert_eq!(std::fs::read(&model).unwrap(), before);
    assert_eq!(std::fs::read(d.join("config.json")).unwrap(), config_before);
    assert!(!d.join("elsewhere.txt").exists());
    assert_no_temporary_files(d);
}

#[test]
fn synth_keeps_checkpoint_and_config_apart_and_shared_configs_intact() {
    let (dir, _) = tiny(&[]);
    let d = dir.path();
    fails(
        d,
        &["synth", "config.json", "--force"],
        2,
        &["name the checkpoint"],
    );
    // A second model with another shape would break the first one's config.json.
    let other = [
        "synth",
        "other.safetensors",
        "--size",
        "custom",
        "--layers",
        "2",
        "--force",
    ];
    fails(d, &other, 2, &["refusing to replace", "m.safetensors"]);
    // The same shapes may share it.
    let same = [
        "synth",
        "other.safetensors",
        "--size",
        "custom",
        "--layers",
        "4",
        "--force",
    ];
    ok(d, &same);
    ok(d, &["inspect", "m.safetensors"]);
    assert_no_temporary_files(d);
}

#[test]
fn absurd_sizes_exit_2_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let huge = "18446744073709551615";
    fails(
        d,
        &["run", "--prompt-len", huge],
        2,
        &["--prompt-len", "out of range"],
    );
    fails(
        d,
        &["run", "--prompt-len", "0"],
        2,
        &["--prompt-len 0 is out of range"],
    );
    fails(
        d,
        &["run", "--batch", "1099511627776"],
        2,
        &["--batch", "out of range"],
    );
    fails(
        d,
        &["run", "--max-seq-len", "1000000000"],
        2,
        &["--max-seq-len", "out of range"],
    );
    fails(
        d,
        &["table", "--max-seq-len", "4294967296"],
        2,
        &["--max-seq-len"],
    );
    fails(
        d,
        &["auto", "--vram", "8GiB", "--batch", "9223372036854775808"],
        2,
        &["--batch"],
    );
    fails(
        d,
        &["run", "--slots", "2", "--prefetch-depth", "5"],
        2,
        &["--prefetch-depth 5"],
    );
    // Token ids are checked against the model before it is loaded.
    fails(
        d,
        &["run", "--input-ids", "1,2,99999"],
        2,
        &["token id 99999", "vocabulary of 1024"],
    );
    fails(
        d,
        &["run", "--input-ids", "1,2,3", "--max-seq-len", "2"],
        2,
        &["3 tokens are more than --max-seq-len 2"],
    );
}

#[test]
fn version_names_the_commit_and_llama_cpp_spellings_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(d, &["completions", shell]);
        assert!(
            script.contains("vibeoffload") && script.contains("num-gpu-layers"),
            "{shell}"
        );
    }
    let page = ok(d, &["man"]);
    assert!(page.contains(".TH vibeoffload 1"), "{}", &page[..200]);
    let version = ok(d, &["--version"]);
    assert!(
        version.starts_with("vibeoffload 0.1.0 (commit "),
        "{version}"
    );
    assert!(version.contains("features: "), "{version}");
    let ours = ok(d, &["--num-gpu-layers", "8", "--vram", "24GiB", "--json"]);
    for json in [
        &ours,
        &ok(d, &["table", "--json"]),
        &ok(d, &["inspect", "--json"]),
    ] {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let tool = v["tool"].as_str().unwrap_or_default();
        assert!(tool.starts_with("vibeoffload 0.1.0 (commit "), "{tool:?}");
    }
    for spelling in [&["-ngl", "8"][..], &["-ngl=8"], &["--n-gpu-layers", "8"]] {
        let mut args = spelling.to_vec();
        args.extend(["--vram", "24GiB", "--json"]);
        assert_eq!(ok(d, &args), ours, "{spelling:?}");
    }
}

#[test]
fn progress_is_plain_lines_off_a_terminal_and_quiet_or_verbose_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // stderr is a pipe here, not a terminal: plain lines with counts, no escape codes.
    let o = vibeoffload(
        d,
        &[
            "synth",
            "m.safetensors",
            "--size",
            "custom",
            "--layers",
            "4",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("writing m.safetensors: ") && o.stderr.contains(" (100%)"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains('\x1b'), "{:?}", o.stderr);
    let run = [
        "run",
        "--model-path",
        "m.safetensors",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
    ];
    let o = vibeoffload(d, &run);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for line in [
        "loading: opening the device\n",
        "loading decoder layers: 2/4 (50%), eta ",
        "loading decoder layers: 4/4 (100%)",
    ] {
        assert!(o.stderr.contains(line), "{line:?} not in {}", o.stderr);
    }

    // -q: the report and nothing else, given before or after the command (or in the flag
    // form, where it also hides the note that no GPU could be read).
    for args in [
        [&["-q"][..], &run].concat(),
        [&run[..], &["--quiet"]].concat(),
    ] {
        let o = vibeoffload(d, &args);
        assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{args:?}");
        assert!(o.stdout.contains("decode: "), "{}", o.stdout);
    }
    let o = vibeoffload(d, &["--print-table", "-q"]);
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));

    // -v: the resolved settings (as their JSON) and how long each stage took, too.
    let o = vibeoffload(d, &[&run[..], &["-v"]].concat());
    assert_eq!(o.code, 0, "{}", o.stderr);
    let engine = o
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("engine: "))
        .unwrap_or_else(|| panic!("no engine line in {}", o.stderr));
    let engine: EngineOptions = serde_json::from_str(engine).unwrap();
    assert_eq!(engine.gpu_layers, 4);
    assert!(
        o.stderr.contains("loading decoder layers: took "),
        "{}",
        o.stderr
    );
    fails(d, &["-q", "table", "-v"], 2, &["--quiet", "--verbose"]);
}
