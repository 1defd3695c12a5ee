//! Timed use of an engine: the `run` command's session and the `bench` command's sweeps over
//! layer counts (the language model's, and `--speech`'s whole text-to-speech loop), as library
//! functions that return their reports, the timing loops they share, and the bench gate (a
//! report against a baseline). Nothing here prints.

mod bench;
pub mod calibrate;
mod compare;
mod session;
mod speech_bench;
mod speed;

pub use bench::{run_bench, BenchOptions, BenchReport, BenchRow};
pub use compare::{compare, ComparedRow, Comparison, Regression};
pub use session::{
    run_session, ForwardResult, Mode, RunReport, SessionOptions, SessionProgress, VramUse,
};
pub use speech_bench::{run_speech_bench, SpeechBenchOptions, SpeechBenchReport, SpeechBenchRow};
pub use speed::{
    decode, decode_with, test_speed, test_speed_with, Decode, TestSpeed, QUEUED_STEPS,
};

use crate::checkpoint::synth::{self, SynthSpec};
use crate::checkpoint::{CheckpointDtype, ModelInfo};
use crate::engine::{DeviceChoice, Engine, EngineOptions};
use crate::gpu;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The rates a hybrid split of `model` is predicted with on `device`, at `batch` rows: the
/// measured pinned and device-memory bandwidths (the latter at the decode kernels' share of
/// it) and the host's float8 products over one of its layers' shapes, measured now while the
/// copy engine streams, as it does then.
pub fn decode_rates(
    b: &crate::engine::Bandwidths,
    device: DeviceChoice,
    model: &crate::arch::config::ModelConfig,
    batch: usize,
) -> Result<crate::plan::speed::Rates> {
    use crate::plan::speed;
    Ok(speed::Rates {
        pinned_gbps: b.pinned_gbps,
        gpu_gbps: b.device_gbps * speed::GPU_DECODE_EFFICIENCY,
        cpu_gbps: crate::engine::host_f8_gbps(device, model, batch)?,
        host_layer_overhead_ms: speed::HOST_LAYER_OVERHEAD_MS,
    })
}

/// Prompt and generation lengths, timed passes, and the seed of the random prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Prompt tokens (decode prefill, and tokens per test-speed pass).
    pub prompt_len: usize,
    /// Tokens generated per sequence in decode mode.
    pub gen_tokens: usize,
    /// Timed test-speed passes (and decodes per layer count in `bench`).
    pub runs: usize,
    /// Seed of the random prompts.
    pub seed: u64,
}

impl Workload {
    /// The original's test: 128 tokens, 5 timed passes; 32 tokens decoded.
    pub const DEFAULT: Workload = Workload {
        prompt_len: 128,
        gen_tokens: 32,
        runs: 5,
        seed: 0,
    };

    /// Tokens a decode of this workload puts in the KV cache: the prompt, at least the 3 of
    /// the warm-up, and the queued steps after the timed ones.
    pub fn cache_tokens(&self) -> usize {
        self.prompt_len + self.gen_tokens.max(3) + QUEUED_STEPS
    }

    /// The fewest KV positions [`decode`] needs: the prompt and every generated token but the
    /// last (which is never fed back), and at least the prompt and 2 tokens of the warm-up.
    /// The queued steps after the timed ones take only what room is left.
    pub fn decode_positions(&self) -> usize {
        self.prompt_len + self.gen_tokens.max(3) - 1
    }
}

/// `n` token ids from a seeded generator, below `min(1000, vocab)` as the original draws them.
pub fn random_ids(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let limit = vocab.min(1000) as u64;
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % limit) as u32
        })
        .collect()
}

/// `batch` prompts of `len` seeded random ids (seeds `seed`, `seed + 1`, ...).
pub fn random_prompts(batch: usize, len: usize, seed: u64, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch as u64)
        .map(|i| random_ids(len, seed + i, vocab))
        .collect()
}

/// The checkpoint `run` and `bench` load: a file, or the small embedded test model, written
/// to a temporary directory that lives as long as this value.
pub struct ModelFile {
    path: PathBuf,
    label: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl ModelFile {
    /// The checkpoint at `path`.
    pub fn at(path: PathBuf) -> ModelFile {
        ModelFile {
            path,
            label: None,
            _dir: None,
        }
    }

    /// Writes the embedded test model (8 layers, hidden 256) in `dtype`.
    pub fn embedded(dtype: CheckpointDtype) -> Result<ModelFile> {
        ModelFile::synthesized(SynthSpec::embedded(), dtype)
    }

    /// Writes the embedded speech model ([`SynthSpec::embedded_speech`]) in `dtype`.
    pub fn embedded_speech(dtype: CheckpointDtype) -> Result<ModelFile> {
        ModelFile::synthesized(SynthSpec::embedded_speech(), dtype)
    }

    fn synthesized(spec: SynthSpec, dtype: CheckpointDtype) -> Result<ModelFile> {
        let dir = tempfile::tempdir()?;
        crate::output::remove_on_interrupt(dir.path());
        let path = dir.path().join("embedded.safetensors");
        let spec = SynthSpec {
            precision: dtype.precision(),
            ..spec
        };
        synth::write(&spec, &path, false, |_, _| {})?;
        let c = &spec.config;
        let dtype = match dtype {
            CheckpointDtype::Float8 => "float8",
            CheckpointDtype::Bf16 => "bf16",
        };
        Ok(ModelFile {
            path,
            label: Some(format!(
                "embedded test model ({} layers, hidden {}, {dtype})",
                c.num_hidden_layers, c.hidden_size
            )),
            _dir: Some(dir),
        })
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the checkpoint; reports name the embedded model by what it is, not its path.
    pub fn open(&self) -> Result<ModelInfo> {
        let mut info = ModelInfo::open(&self.path)?;
        if let Some(label) = &self.label {
            info.source = label.clone();
        }
        Ok(info)
    }
}

/// What NVML says about the GPU an engine runs on (nothing on the CPU): the NVML device on
/// the CUDA device's PCI bus, so that readings are of the card that runs.
pub(crate) struct GpuProbe {
    index: Option<u32>,
    label: String,
}

impl GpuProbe {
    pub(crate) fn of(device: DeviceChoice) -> GpuProbe {
        match device {
            DeviceChoice::Cuda(i) => {
                let found = gpu::resolve(&gpu::GpuSelector::Index(i as u32)).ok();
                GpuProbe {
                    index: found.as_ref().and_then(|g| g.nvml_index),
                    label: found.map_or_else(|| format!("GPU {i}"), |g| g.label),
                }
            }
            DeviceChoice::Cpu => GpuProbe {
                index: None,
                label: "cpu".into(),
            },
        }
    }

    /// `cpu`, or the GPU's CUDA index, name and PCI bus id.
    pub(crate) fn label(&self) -> String {
        self.label.clone()
    }

    /// The GPU's name, as NVML reports it.
    pub(crate) fn name(&self) -> Option<String> {
        self.index.and_then(|i| gpu::query(i).ok()).map(|g| g.name)
    }

    /// Memory nobody holds on the GPU now.
    fn free_bytes(&self) -> Option<u64> {
        self.index
            .and_then(|i| gpu::query(i).ok())
            .map(|g| g.free_bytes)
    }

    /// Memory in use on the GPU now, all processes.
    pub(crate) fn used_bytes(&self) -> Option<u64> {
        self.watch_peak().map(gpu::PeakSampler::finish)
    }

    /// Starts sampling the peak of memory in use.
    pub(crate) fn watch_peak(&self) -> Option<gpu::PeakSampler> {
        self.index.and_then(|i| gpu::PeakSampler::start(i).ok())
    }
}

/// What a configuration took: the peak minus what was in use before it started.
pub(crate) fn taken_bytes(before: Option<u64>, peak: Option<u64>) -> Option<u64> {
    before.zip(peak).map(|(b, p)| p.saturating_sub(b))
}

/// Loads `info` and waits for the device; returns the engine and the load time in ms.
fn load(
    info: ModelInfo,
    options: &EngineOptions,
    progress: impl FnMut(crate::engine::LoadProgress),
) -> Result<(Engine, f64)> {
    let started = Instant::now();
    let engine = Engine::load(info, options, progress)?;
    engine.synchronize()?;
    Ok((engine, started.elapsed().as_secs_f64() * 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_seeded_and_bounded() {
        let a = random_ids(128, 0, 152064);
        assert_eq!(a, random_ids(128, 0, 152064));
        assert_ne!(a, random_ids(128, 1, 152064));
        assert!(a.iter().all(|&i| i < 1000));
        assert!(random_ids(64, 3, 10).iter().all(|&i| i < 10));
    }
}
