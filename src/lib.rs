//! vibeoffload: run VibeVoice's float8 language model on GPUs with too little VRAM by keeping N
//! decoder layers resident and streaming the rest from pinned host memory, and say before a run
//! exactly how much VRAM each choice needs.
//!
//! Data flows one way: [`arch`] (what the model is) -> [`checkpoint`] (header, inventory,
//! summary) -> [`plan`] (estimate, placement, budget) -> [`engine`] (load, forward, streaming)
//! -> [`measure`] (timed runs, bench) -> [`report`] (text tables, JSON, plot) -> the binary
//! (command line). [`gpu`] reads NVML; [`units`] formats byte counts; [`text`] turns a script
//! into prompt tokens.
#![deny(missing_docs)]

pub mod arch;
pub mod audio;
pub mod checkpoint;
pub mod dtype;
pub mod engine;
pub mod generate;
pub mod gpu;
pub mod measure;
pub mod output;
pub mod plan;
pub mod report;
pub mod rng;
pub mod speech;
pub mod text;
pub mod units;

use std::fmt;

/// This tool as every JSON report names it: version and the commit it was built from.
pub const TOOL: &str = concat!(
    "vibeoffload ",
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VIBEOFFLOAD_COMMIT"),
    ")"
);

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
