//! The GPU machine's scripts, run here with stand-ins for the binary and `nvidia-smi`: what
//! their exit status says. (What they measure needs the GPU.)
#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// An executable shell script at `path`.
fn script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `scripts/gpu-bench.sh` in a copy of the scripts beside a stand-in binary whose `bench`
/// exits `bench` and whose `run` exits `run` (writing the dump it is asked for): its exit
/// status and log.
fn gpu_bench(bench: i32, run: i32) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    for name in ["gpu-env.sh", "gpu-bench.sh"] {
        let to = root.join("scripts").join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(scripts.join(name), to).unwrap();
    }
    script(
        &root.join("dist/vibeoffload"),
        &format!(
            r#"case $1 in
  bench) exit {bench} ;;
  run) while [[ $# -gt 0 ]]; do [[ $1 == --dump ]] && echo same > "$2"; shift; done; exit {run} ;;
esac"#
        ),
    );
    script(&root.join("bin/nvidia-smi"), "echo 'stand-in GPU'");
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("vibevoice7b_float8_e4m3fn.safetensors"), "").unwrap();
    let out = Command::new("bash")
        .arg(root.join("scripts/gpu-bench.sh"))
        .env(
            "PATH",
            format!(
                "{}:{}",
                root.join("bin").display(),
                std::env::var("PATH").unwrap()
            ),
        )
        .env("OUT", root.join("out"))
        .env("MODEL_DIR", &model)
        .env("COMMIT", "test")
        .env("BASELINE", "old.json")
        .env("SKIP_PYTORCH", "1")
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().expect("exit code"), log)
}

#[test]
fn gpu_bench_exits_3_on_a_regression_and_1_on_a_failure() {
    let (code, log) = gpu_bench(0, 0);
    assert_eq!(code, 0, "{log}");
    let (code, log) = gpu_bench(3, 0);
    assert_eq!(code, 3, "{log}");
    assert!(
        log.contains("REGRESSION: bench: slower than old.json"),
        "{log}"
    );
    let (code, log) = gpu_bench(1, 0);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("FAIL: bench (exit 1)"), "{log}");
    // Another failure outranks the regression.
    let (code, log) = gpu_bench(3, 1);
    assert_eq!(code, 1, "{log}");
}
