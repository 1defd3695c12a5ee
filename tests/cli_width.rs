//! Text reports fit a 100-column terminal: tables wrap their cells, long lines fold.

mod common;

use common::cli::ok;

#[test]
fn reports_fit_a_100_column_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
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
    for args in [
        &["--print-table"][..],
        &["table", "--vram", "8GiB"],
        &["table", "--builtin", "1.5b", "--lm-only", "--vram", "6GiB"],
        &["auto", "--vram", "8GiB"],
        &["--num-gpu-layers", "8", "--vram", "8GiB", "--builtin", "7b"],
        &["inspect", "--builtin", "7b"],
        &["inspect", "m.safetensors"],
        &[
            "run",
            "--model-path",
            "m.safetensors",
            "--num-gpu-layers",
            "2",
            "--gen-tokens",
            "2",
        ],
        &[
            "--model-path",
            "m.safetensors",
            "--num-gpu-layers",
            "2",
            "--test-speed",
        ],
    ] {
        let text = ok(d, args);
        let widest = text.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(
            widest <= 100,
            "{args:?}: a line of {widest} characters in\n{text}"
        );
    }
}
