//! The command line itself: help that fits a terminal, grouped under headings and ending with
//! examples; flag combinations that would do nothing, refused.

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
