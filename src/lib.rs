//! vibeoffload: run VibeVoice's float8 language model on GPUs with too little VRAM by keeping N
//! decoder layers resident and streaming the rest from pinned host memory, and say before a run
//! exactly how much VRAM each choice needs.
//!
//! Data flows one way: [`arch`] (what the model is) -> [`checkpoint`] (header, inventory,
//! summary) -> [`plan`] (estimate, placement, budget) -> [`engine`] (load, forward, streaming)
//! -> [`measure`] (timed runs, bench) -> [`report`] (text tables, JSON, plot) -> the binary
//! (command line). [`gpu`] reads NVML; [`units`] formats byte counts.
#![deny(missing_docs)]

pub mod arch;
pub mod checkpoint;
pub mod dtype;
pub mod engine;
pub mod gpu;
pub mod measure;
pub mod plan;
pub mod report;
pub mod units;

use std::fmt;

/// A hidden temporary file in the directory of `path`, which becomes a regular, world-readable
/// file when persisted to `path`: files are written under a temporary name and renamed when
/// complete, so an interrupted write leaves nothing under the final name.
pub(crate) fn temp_file_beside(path: &std::path::Path) -> anyhow::Result<tempfile::NamedTempFile> {
    use anyhow::Context;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".vibeoffload-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    builder
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

/// A command-line value that cannot be used (unknown preset, layer count out of range, bad
/// size). The binary exits with status 2 for these and 1 for every other failure.
#[derive(Debug)]
pub struct UsageError(String);

impl UsageError {
    /// Wraps a one-line message that says what is wrong and what to do.
    pub fn new(message: impl Into<String>) -> UsageError {
        UsageError(message.into())
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The README's Rust examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
