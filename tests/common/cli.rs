//! Running the real binary from a test: its exit code and output, and the one-line failure
//! every bad input must give.

use std::path::Path;
use std::process::Command;

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The binary run in `dir` with `args`. Its cache directory (where a calibration is stored)
/// is `dir/.cache`, so that none stored on the machine running the tests changes the output.
pub fn vibeoffload(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_vibeoffload"))
        .args(args)
        .current_dir(dir)
        .env("XDG_CACHE_HOME", dir.join(".cache"))
        .output()
        .expect("binary runs");
    let o = Output {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).expect("utf-8"),
        stderr: String::from_utf8(out.stderr).expect("utf-8"),
    };
    assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
    o
}

pub fn ok(dir: &Path, args: &[&str]) -> String {
    let o = vibeoffload(dir, args);
    assert_eq!(o.code, 0, "{args:?} failed: {}", o.stderr);
    o.stdout
}

/// Runs a command that must fail with `code` and one line on stderr containing each of `words`.
pub fn fails(dir: &Path, args: &[&str], code: i32, words: &[&str]) {
    let o = vibeoffload(dir, args);
    assert_eq!(o.code, code, "{args:?}: {}", o.stderr);
    let first = o
        .stderr
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_default();
    for w in words {
        assert!(first.contains(w), "{args:?}: {w:?} not in {:?}", o.stderr);
    }
    assert!(o.stdout.is_empty(), "{args:?} printed {:?}", o.stdout);
}

/// Files are written under a hidden temporary name and renamed: none may be left behind.
pub fn assert_no_temporary_files(dir: &Path) {
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.') && n != ".cache")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// Waits until `ready` holds (at most 300 s), sends the child SIGINT (Ctrl-C), checks that it
/// exits with 130, and returns its stderr.
#[cfg(unix)]
pub fn interrupt(mut child: std::process::Child, ready: impl Fn() -> bool) -> String {
    let started = std::time::Instant::now();
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "exited ({status}) before it was ready: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(started.elapsed().as_secs() < 300, "not ready after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    stderr
}
