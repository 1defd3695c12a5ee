//! `--gpu` names a card by index, UUID or PCI bus id; a name that is none of these is a bad
//! command line, and one no driver can find fails with one line (CI has no GPU).

mod common;

use common::cli::{fails, ok};

#[test]
fn gpu_names_are_checked_and_unknown_gpus_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails(d, &["auto", "--gpu", "first"], 2, &["'first' names no GPU"]);
    fails(d, &["table", "--gpu", "17:00"], 2, &["names no GPU"]);
    // With --vram the budget needs no GPU reading: any well-formed name plans.
    for gpu in ["1", "GPU-8f3a", "0000:17:00.0"] {
        ok(d, &["auto", "--gpu", gpu, "--vram", "8GiB"]);
    }
    if vibeoffload::gpu::query(0).is_err() {
        // No NVIDIA driver here (as in CI): reading the named card fails, saying why.
        fails(
            d,
            &["auto", "--gpu", "GPU-8f3a"],
            1,
            &["NVML is not available"],
        );
        fails(
            d,
            &["auto", "--gpu", "0000:17:00.0"],
            1,
            &["NVML is not available"],
        );
    }
}
