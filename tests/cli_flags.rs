//! The command line itself: help that fits a terminal, grouped under headings and ending with
//! examples; flag combinations that would do nothing, and lengths the KV cache cannot hold,
//! refused; `run`'s progress off a terminal; the tool's version in every JSON report.

mod common;

use std::process::Command;

/// `vibeoffload ARGS` with `COLUMNS` set, as a terminal would: its stdout.
fn help(args: &[&str], columns: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vibeoffload"))
        .args(args)
        .env("COLUMNS", columns)
        .output()
        .expect("binary runs");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn help_fits_100_columns_groups_options_and_ends_with_examples() {
    let commands: [(&[&str], &[&str]); 10] = [
        (
            &[],
            &["Mode:", "Layer choice:", "Model:", "Planning:", "Timing:"],
        ),
        (
            &["table"],
            &["Layer choice:", "Model:", "Planning:", "Output:"],
        ),
        (&["auto"], &["Model:", "Planning:", "GPU and VRAM budget:"]),
        (&["inspect"], &["Model:", "Output:"]),
        (&["synth"], &["Model:", "Custom size:", "Output:"]),
        (&["convert"], &["Model:", "Output:"]),
        (
            &["run"],
            &[
                "Layer choice:",
                "Mode:",
                "Model:",
                "Planning:",
                "Engine:",
                "Timing:",
            ],
        ),
        (
            &["bench"],
            &["Layer choice:", "Engine:", "Timing:", "Baseline:"],
        ),
        (&["bench", "compare"], &["Baseline:", "Output:"]),
        (&["generate"], &["Script and voices:", "Speech:", "Engine:"]),
    ];
    for (command, headings) in commands {
        for flag in ["--help", "-h"] {
            let args = [command, &[flag]].concat();
            // No terminal here: at most 100 columns whatever COLUMNS says, and fewer if it says so.
            for (columns, widest) in [("300", 100), ("", 100), ("72", 72)] {
                let text = help(&args, columns);
                let (width, line) = text
                    .lines()
                    .map(|l| (l.chars().count(), l))
                    .max()
                    .unwrap_or_default();
                assert!(
                    width <= widest,
                    "{args:?} with COLUMNS={columns}: {width} columns: {line:?}"
                );
                for heading in headings.iter().chain(&["Examples:", "Output:"]) {
                    assert!(
                        text.lines().any(|l| l == *heading),
                        "{args:?}: no {heading:?} in\n{text}"
                    );
                }
                let example = format!("  vibeoffload {}", command.join(" "));
                assert!(
                    text.lines().any(|l| l.starts_with(example.trim_end())),
                    "{args:?}: no example in\n{text}"
                );
            }
        }
    }
}

/// Each of these would change nothing the command does: refused (exit 2, one error line)
/// before any work, naming the flags. Defaults never count: only flags given.
#[test]
fn flags_that_would_do_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let conflict = "cannot be used with";
    let cases: &[(&[&str], &[&str])] = &[
        // One forward pass on given ids: no random prompt, no generation, no timed runs.
        (
            &["run", "--input-ids", "1,2", "--seed", "3"],
            &[conflict, "--seed"],
        ),
        (
            &["run", "--input-ids", "1,2", "--gen-tokens", "3"],
            &[conflict, "--gen-tokens"],
        ),
        (
            &["run", "--input-ids", "1,2", "--runs", "3"],
            &[conflict, "--runs"],
        ),
        (
            &["run", "--input-ids", "1,2", "--prompt-len", "3"],
            &[conflict, "--prompt-len"],
        ),
        // A fixed layer choice reads no budget.
        (
            &["run", "--num-gpu-layers", "2", "--vram", "8GiB"],
            &[conflict, "--vram"],
        ),
        (
            &["run", "--config", "minimal", "--vram", "8GiB"],
            &[conflict, "--vram"],
        ),
        (
            &["run", "--no-offload", "--vram", "8GiB"],
            &[conflict, "--vram"],
        ),
        (
            &[
                "generate",
                "--text",
                "x",
                "--num-gpu-layers",
                "2",
                "--target-utilization",
                "0.5",
            ],
            &[conflict, "--target-utilization"],
        ),
        // Test-speed generates nothing; decode mode decodes once.
        (
            &["run", "--test-speed", "--gen-tokens", "8"],
            &[conflict, "--gen-tokens"],
        ),
        (
            &["--test-speed", "--gen-tokens", "8"],
            &["--gen-tokens 8 would do nothing", "run"],
        ),
        (&["--gen-tokens", "8"], &["--gen-tokens 8 would do nothing"]),
        (&["run", "--runs", "3"], &["required", "--test-speed"]),
        // A threshold with nothing to hold to.
        (
            &["bench", "--threshold", "0.2"],
            &["required", "--baseline"],
        ),
        // The CPU runs, and no GPU is read.
        (
            &["run", "--device", "cpu", "--gpu", "1"],
            &["--gpu 1 would do nothing", "--device cpu"],
        ),
        (
            &["bench", "--device", "cpu", "--gpu", "0"],
            &["--gpu 0 would do nothing"],
        ),
        (
            &["generate", "--text", "x", "--device", "cpu", "--gpu", "0"],
            &["--gpu 0 would do nothing"],
        ),
        (
            &["--test-speed", "--device", "cpu", "--gpu", "1"],
            &["--gpu 1 would do nothing"],
        ),
    ];
    for (args, words) in cases {
        let o = common::cli::vibeoffload(d, args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(o.stdout.is_empty(), "{args:?} printed {:?}", o.stdout);
        // The error (after any note), before clap's usage line (its "required" errors list
        // the flags on the lines below).
        let at = o.stderr.find("error: ").unwrap_or(o.stderr.len());
        let error = o.stderr[at..].split("\nUsage:").next().unwrap_or_default();
        for w in *words {
            assert!(error.contains(w), "{args:?}: {w:?} not in {:?}", o.stderr);
        }
    }
    // The same flags where they do something still work.
    let tiny = ["--prompt-len", "4", "-q", "--json"];
    for args in [
        &["run", "--input-ids", "1,2", "--num-gpu-layers", "2"][..],
        &[
            "run",
            "--test-speed",
            "--runs",
            "2",
            "--seed",
            "3",
            "--num-gpu-layers",
            "2",
        ],
        &[
            "run",
            "--device",
            "cpu",
            "--vram",
            "8GiB",
            "--gen-tokens",
            "2",
        ],
        &[
            "run",
            "--num-gpu-layers",
            "2",
            "--target-utilization",
            "0.5",
            "--gen-tokens",
            "2",
        ],
    ] {
        let args = [
            args,
            if args.contains(&"--input-ids") {
                &tiny[2..]
            } else {
                &tiny
            },
        ]
        .concat();
        common::cli::ok(d, &args);
    }
}

/// Lengths the KV cache cannot hold exit 2 before the model is opened (a checkpoint that is
/// not there proves it), naming the numbers; the largest that fit run.
#[test]
fn lengths_beyond_max_seq_len_are_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let absent = ["--model-path", "absent.safetensors"];
    // A decode holds the prompt and every generated token but the last: 4 + 4 - 1 = 7.
    let decode = [
        "run",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "4",
        "--max-seq-len",
    ];
    common::cli::fails(
        d,
        &[&decode[..], &["6"], &absent].concat(),
        2,
        &[
            "--prompt-len 4",
            "--gen-tokens 4",
            "7 tokens",
            "--max-seq-len 6",
        ],
    );
    // Its warm-up takes the prompt and 2 tokens, however few are generated.
    common::cli::fails(
        d,
        &[
            "run",
            "--prompt-len",
            "4",
            "--gen-tokens",
            "1",
            "--max-seq-len",
            "5",
        ],
        2,
        &["6 tokens", "--max-seq-len 5"],
    );
    // A test-speed pass holds the prompt alone.
    let test_speed = [
        "run",
        "--test-speed",
        "--prompt-len",
        "5",
        "--max-seq-len",
        "4",
    ];
    for args in [&test_speed[..], &test_speed[1..]] {
        common::cli::fails(
            d,
            &[args, &absent].concat(),
            2,
            &["--prompt-len 5", "--max-seq-len 4"],
        );
    }
    common::cli::fails(
        d,
        &[
            "bench",
            "--prompt-len",
            "4",
            "--gen-tokens",
            "4",
            "--max-seq-len",
            "6",
        ],
        2,
        &["7 tokens", "--max-seq-len 6"],
    );
    let quick = ["--num-gpu-layers", "8", "-q", "--json"];
    common::cli::ok(d, &[&decode[..], &["7"], &quick].concat());
    common::cli::ok(
        d,
        &[
            "run",
            "--test-speed",
            "--prompt-len",
            "4",
            "--max-seq-len",
            "4",
            "--runs",
            "1",
        ],
    );
}

/// stderr is a pipe here: after the load, `run` counts the tokens it decodes (or the passes it
/// times) in plain lines with an ETA; `-q` prints none.
#[test]
fn run_counts_decoded_tokens_and_timed_passes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let decode = [
        "run",
        "--num-gpu-layers",
        "4",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "8",
    ];
    let o = common::cli::vibeoffload(d, &decode);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for line in [
        "decode: 0/8 tokens done (0%)\n",
        "decode: 4/8 tokens done (50%), eta ",
        "decode: 8/8 tokens done (100%)\n",
    ] {
        assert!(o.stderr.contains(line), "{line:?} not in {}", o.stderr);
    }
    // The count follows the load.
    let loaded = o
        .stderr
        .find("loading decoder layers: 8/8")
        .unwrap_or(usize::MAX);
    assert!(
        loaded < o.stderr.find("decode: 0/8").unwrap(),
        "{}",
        o.stderr
    );
    let test_speed = [
        "run",
        "--num-gpu-layers",
        "4",
        "--prompt-len",
        "4",
        "--test-speed",
    ];
    let o = common::cli::vibeoffload(d, &[&test_speed[..], &["--runs", "3"]].concat());
    assert_eq!(o.code, 0, "{}", o.stderr);
    for line in [
        "test-speed: 1/3 passes done (33%), eta ",
        "test-speed: 3/3 passes done (100%)",
    ] {
        assert!(o.stderr.contains(line), "{line:?} not in {}", o.stderr);
    }
    let o = common::cli::vibeoffload(d, &[&decode[..], &["-q"]].concat());
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
}

/// Every JSON report names the tool that wrote it (version and commit), so a file found later
/// says what made it.
#[test]
fn every_json_report_names_the_tool_version() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["f8", "bf16"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    let tiny = ["--size", "custom", "--layers", "2", "-q", "--json"];
    let timed = [
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--runs",
        "1",
        "-q",
        "--json",
    ];
    let commands: Vec<(&str, Vec<&str>)> = vec![
        (
            "synth",
            [&["synth", "f8/m.safetensors"][..], &tiny].concat(),
        ),
        (
            "synth bf16",
            [
                &["synth", "bf16/m.safetensors", "--dtype", "bf16"][..],
                &tiny,
            ]
            .concat(),
        ),
        (
            "convert",
            vec![
                "convert",
                "--model-path",
                "bf16/m.safetensors",
                "--out",
                "c.safetensors",
            ],
        ),
        ("auto", vec!["auto", "--vram", "8GiB"]),
        ("table", vec!["table"]),
        ("inspect", vec!["inspect", "f8/m.safetensors"]),
        (
            "flag form, planned",
            vec!["--num-gpu-layers", "8", "--vram", "8GiB"],
        ),
        (
            "flag form, loaded",
            vec!["--model-path", "f8/m.safetensors", "--num-gpu-layers", "1"],
        ),
        (
            "run",
            [&["run", "--num-gpu-layers", "4"][..], &timed].concat(),
        ),
        (
            "bench",
            [
                &["bench", "--layers", "8", "--json-out", "b.json"][..],
                &timed,
            ]
            .concat(),
        ),
        (
            "bench compare",
            vec!["bench", "compare", "b.json", "b.json"],
        ),
        (
            "generate",
            vec![
                "generate",
                "--text",
                "Speaker 1: Hi.",
                "--force-frames",
                "2",
                "--steps",
                "1",
            ],
        ),
    ];
    for (what, mut args) in commands {
        if !args.contains(&"--json") {
            args.extend(["-q", "--json"]);
        }
        let json = common::cli::ok(d, &args);
        let v: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{what}: {e}: {json}"));
        let tool = v["tool"].as_str().unwrap_or_default();
        assert!(
            tool.starts_with("vibeoffload ") && tool.contains("(commit "),
            "{what}: tool {tool:?} in {json}"
        );
    }
}
