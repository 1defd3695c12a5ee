//! vibeoffload: run VibeVoice's float8 language model on GPUs with too little VRAM by keeping N
//! decoder layers resident and streaming the rest from pinned host memory, and say before a run
//! exactly how much VRAM each choice needs.
//!
//! Data flows one way: [`checkpoint`] (header, inventory) -> [`plan`] (estimate, placement) ->
//! report (tables and JSON, in the binary).
#![deny(missing_docs)]

pub mod checkpoint;
pub mod dtype;
pub mod gpu;
pub mod plan;
pub mod report;

use std::fmt;

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
