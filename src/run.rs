//! Timed generation on a loaded engine: the original's test-speed (one forward pass over 128
//! random tokens, 1 warm-up, 5 timed runs) and decoding with the KV cache.

use crate::engine::{Engine, TransferStats};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The original's test: forward passes over one sequence of random tokens, no LM head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestSpeed {
    /// Tokens per pass.
    pub tokens: usize,
    /// Untimed passes first.
    pub warmup_runs: usize,
    /// Each timed pass.
    pub runs_ms: Vec<f64>,
    /// Their mean.
    pub avg_ms: f64,
    /// Copies during the timed passes.
    pub transfer: TransferStats,
    /// Share of the timed passes' time the compute stream waited for copies.
    pub estimated_overhead_pct: f64,
    /// GPU time of a pass with its launches queued ahead (median of three, GPU only; see
    /// [`Decode::gpu_ms_per_token`]). `None` also when queuing the pass waits for the hold, as
    /// a 7B prefill's does today (probably its ~1,100 launches overflowing the launch queue).
    pub gpu_ms: Option<f64>,
    /// Host time to queue a pass (median of three, GPU only).
    pub host_ms: Option<f64>,
}

/// Greedy decoding with the KV cache, a batch of sequences in lockstep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decode {
    /// Sequences decoded together.
    pub batch: usize,
    /// Prompt tokens per sequence (prefilled in one pass).
    pub prompt_tokens: usize,
    /// Tokens generated per sequence.
    pub generated_tokens: usize,
    /// Prefill plus the first token.
    pub ttft_ms: f64,
    /// Mean time of each further decoding step (one token for every sequence).
    pub ms_per_token: f64,
    /// Tokens per second over the batch: `batch x 1000 / ms_per_token`.
    pub tokens_per_s: f64,
    /// The first sequence's generated ids.
    pub tokens: Vec<u32>,
    /// Copies during the timed decode.
    pub transfer: TransferStats,
    /// GPU time of one step with its launches queued ahead (median of three, GPU only):
    /// what a step costs the GPU when launching is free.
    pub gpu_ms_per_token: Option<f64>,
    /// Host time to queue one step (median of three, GPU only). When it exceeds
    /// `gpu_ms_per_token`, decoding is bound by launching kernels, not by the GPU.
    pub host_ms_per_token: Option<f64>,
}

/// Steps [`decode`] (and passes [`test_speed`]) times queued behind a hold of the GPU, after
/// the timed ones.
pub const QUEUED_STEPS: usize = 3;

/// Median GPU and host times of `runs` queued runs; `None` where any is missing (the CPU, or
/// a GPU figure whose queuing outlasted the hold).
fn medians(queued: &[crate::engine::QueuedTime], runs: usize) -> (Option<f64>, Option<f64>) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (runs > 0 && v.len() == runs).then(|| v[v.len() / 2])
    };
    (
        median(queued.iter().filter_map(|q| q.gpu_ms).collect()),
        median(queued.iter().map(|q| q.host_ms).collect()),
    )
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

/// Runs `warmup` untimed and `runs` timed forward passes over `ids` from an empty cache.
pub fn test_speed(
    engine: &mut Engine,
    ids: &[u32],
    warmup: usize,
    runs: usize,
) -> Result<TestSpeed> {
    for _ in 0..warmup {
        engine.reset();
        engine.forward(ids)?;
        engine.synchronize()?;
    }
    engine.reset_stats()?;
    let mut runs_ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        engine.reset();
        let started = Instant::now();
        engine.forward(ids)?;
        engine.synchronize()?;
        runs_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let transfer = engine.transfer_stats()?;
    let total: f64 = runs_ms.iter().sum();
    let mut queued = Vec::new();
    let passes = if engine.on_gpu() { QUEUED_STEPS } else { 0 };
    for _ in 0..passes {
        engine.reset();
        queued.extend(engine.time_forward_queued(ids)?);
        engine.synchronize()?;
    }
    let (gpu_ms, host_ms) = medians(&queued, passes);
    Ok(TestSpeed {
        gpu_ms,
        host_ms,
        tokens: ids.len(),
        warmup_runs: warmup,
        avg_ms: total / runs.max(1) as f64,
        estimated_overhead_pct: if total > 0.0 {
            100.0 * transfer.compute_wait_ms / total
        } else {
            0.0
        },
        runs_ms,
        transfer,
    })
}

/// Prefills each prompt (all of one length), then generates `tokens` tokens greedily for each
/// in lockstep. A short untimed warm-up (the prompts and two tokens) runs first.
pub fn decode(engine: &mut Engine, prompts: &[Vec<u32>], tokens: usize) -> Result<Decode> {
    let tokens = tokens.max(1);
    // The next ids, left on the device: queuing a step never waits for it.
    let queue_step = |engine: &mut Engine, batch: &[Vec<u32>]| -> Result<candle_core::Tensor> {
        let rows: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let hidden = engine.forward_batch(&rows)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        Ok(engine.logits(&last)?.argmax(1)?)
    };
    let step = |engine: &mut Engine, batch: &[Vec<u32>]| -> Result<Vec<u32>> {
        Ok(queue_step(engine, batch)?.to_vec1::<u32>()?)
    };
    let as_batch = |next: &[u32]| next.iter().map(|&t| vec![t]).collect::<Vec<_>>();
    engine.reset();
    let mut next = step(engine, prompts)?;
    for _ in 0..2 {
        next = step(engine, &as_batch(&next))?;
    }
    engine.synchronize()?;
    engine.reset();
    engine.reset_stats()?;

    let started = Instant::now();
    let mut next = step(engine, prompts)?;
    let ttft_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut generated = vec![next[0]];
    let decode_started = Instant::now();
    while generated.len() < tokens {
        next = step(engine, &as_batch(&next))?;
        generated.push(next[0]);
    }
    let rest_ms = decode_started.elapsed().as_secs_f64() * 1e3;
    let ms_per_token = if tokens > 1 {
        rest_ms / (tokens - 1) as f64
    } else {
        ttft_ms
    };
    let transfer = engine.transfer_stats()?;
    // Up to three more steps (not counted above, where the cache has room), each queued
    // behind a hold of the GPU.
    let steps = match engine.on_gpu() {
        true => QUEUED_STEPS.min(engine.remaining_tokens()),
        false => 0,
    };
    let mut queued = Vec::new();
    for _ in 0..steps {
        let (ids, time) = engine.time_queued(|e| queue_step(e, &as_batch(&next)))?;
        next = ids.to_vec1::<u32>()?;
        queued.extend(time);
    }
    let (gpu_ms_per_token, host_ms_per_token) = medians(&queued, steps);
    Ok(Decode {
        batch: prompts.len(),
        prompt_tokens: prompts[0].len(),
        generated_tokens: generated.len(),
        ttft_ms,
        ms_per_token,
        tokens_per_s: prompts.len() as f64 * 1e3 / ms_per_token,
        tokens: generated,
        transfer,
        gpu_ms_per_token,
        host_ms_per_token,
    })
}

/// `batch` prompts of `len` seeded random ids (seeds `seed`, `seed + 1`, ...).
pub fn random_prompts(batch: usize, len: usize, seed: u64, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch as u64)
        .map(|i| random_ids(len, seed + i, vocab))
        .collect()
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

/// One layer count measured by `bench`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// Decoder layers resident.
    pub gpu_layers: usize,
    /// Load time.
    pub load_ms: f64,
    /// Where load time went.
    pub load_phases: crate::engine::LoadTimings,
    /// Mean test-speed pass (prefill of `prompt_len` tokens, no LM head).
    pub test_speed_ms: f64,
    /// GPU time of a test-speed pass with its launches queued ahead.
    pub test_speed_gpu_ms: Option<f64>,
    /// Host time to queue a test-speed pass.
    pub test_speed_host_ms: Option<f64>,
    /// Time to first token in decode mode.
    pub ttft_ms: f64,
    /// Decode time per step (one token for each sequence of the batch).
    pub decode_ms_per_token: f64,
    /// Tokens per second over the batch.
    pub tokens_per_s: f64,
    /// GPU time of a decode step with its launches queued ahead (see [`Decode`]).
    pub decode_gpu_ms_per_token: Option<f64>,
    /// Host time to queue a decode step.
    pub decode_host_ms_per_token: Option<f64>,
    /// Weight bytes a decode step reads from device memory (every layer, resident or
    /// streamed, plus the final norm and LM head).
    pub weight_read_bytes_per_token: u64,
    /// Time to read them once at the device-memory bandwidth measured at the start.
    pub weight_read_ms_per_token: Option<f64>,
    /// Layer bytes streamed per decoded token.
    pub streamed_bytes_per_token: u64,
    /// Lower bound of decode time. All layers resident: reading the weights once at the
    /// device-memory bandwidth. Otherwise: max(streamed bytes / pinned bandwidth, resident
    /// decode time measured in the same run where measured, else the weight-read time).
    pub bound_ms_per_token: Option<f64>,
    /// `decode_ms_per_token / bound_ms_per_token`.
    pub vs_bound: Option<f64>,
    /// Host-to-device GB/s achieved by the decode copies.
    pub achieved_gbps: f64,
    /// `achieved_gbps` over the pinned bandwidth measured at the start.
    pub pinned_fraction: Option<f64>,
    /// Share of copy time hidden behind compute.
    pub overlap_pct: f64,
    /// The planner's estimate (language model, batch 1, this run's max length).
    pub estimate_bytes: u64,
    /// Peak VRAM this configuration took, per NVML.
    pub measured_peak_bytes: Option<u64>,
    /// `100 x (estimate - measured) / measured`.
    pub estimate_error_pct: Option<f64>,
}

/// `vibeoffload bench`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// `vibeoffload.bench/1`.
    pub schema: String,
    /// The model.
    pub model: crate::report::ModelSummary,
    /// `cpu` or the GPU's name.
    pub device: String,
    /// Pinned host-to-device bandwidth measured at the start (GPU only).
    pub pinned_gbps: Option<f64>,
    /// Device-memory bandwidth (device-to-device copies) measured at the start (GPU only).
    pub device_gbps: Option<f64>,
    /// Prompt tokens (test-speed pass and decode prefill).
    pub prompt_len: usize,
    /// Tokens decoded per configuration.
    pub gen_tokens: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// One row per layer count.
    pub rows: Vec<BenchRow>,
}

/// What `bench` measures.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Engine settings other than the layer count (which `layer_counts` supplies).
    pub engine: crate::engine::EngineOptions,
    /// Planner settings (language-model scope), for the estimate beside each measurement.
    pub plan: crate::plan::PlanOptions,
    /// Layer counts, in the order measured.
    pub layer_counts: Vec<usize>,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Tokens decoded.
    pub gen_tokens: usize,
    /// Timed test-speed passes.
    pub runs: usize,
    /// Prompt seed.
    pub seed: u64,
}

/// Loads the checkpoint at `path` once per layer count and measures test-speed, decode, VRAM
/// and copies; `progress` hears what is being measured.
pub fn bench(
    path: &std::path::Path,
    o: &BenchOptions,
    mut progress: impl FnMut(String),
) -> Result<BenchReport> {
    use crate::checkpoint::ModelInfo;
    use crate::engine::{DeviceChoice, Engine};
    let gpu_index = match o.engine.device {
        DeviceChoice::Cuda(i) => Some(i as u32),
        DeviceChoice::Cpu => None,
    };
    // Before anything touches the GPU: what other processes hold.
    let baseline = gpu_index
        .and_then(|i| crate::gpu::PeakSampler::start(i).ok())
        .map(crate::gpu::PeakSampler::finish);
    let device = match gpu_index {
        Some(i) => crate::gpu::query(i)
            .map_or_else(|_| format!("GPU {i}"), |g| format!("GPU {i} {}", g.name)),
        None => "cpu".into(),
    };
    progress("measuring host-to-device and device-memory bandwidth".into());
    let bandwidths = crate::engine::bandwidths(o.engine.device)?;
    let pinned_gbps = bandwidths.map(|b| b.pinned_gbps);
    let device_gbps = bandwidths.map(|b| b.device_gbps);
    let first = ModelInfo::open(path)?;
    let model = crate::report::ModelSummary::of(&first);
    let ids = random_ids(o.prompt_len, o.seed, first.config.vocab_size);
    let prompts = random_prompts(
        o.plan.batch as usize,
        o.prompt_len,
        o.seed,
        first.config.vocab_size,
    );
    drop(first);
    let mut rows = Vec::new();
    for &n in &o.layer_counts {
        progress(format!("{n} GPU layers: loading"));
        let info = ModelInfo::open(path)?;
        let estimate = crate::plan::estimate(&info, &o.plan, n)?;
        let weight_read_bytes = estimate.resident_layers_bytes
            + estimate.pinned_host_bytes
            + estimate.non_layer_weights_bytes;
        let options = crate::engine::EngineOptions {
            gpu_layers: n,
            ..o.engine.clone()
        };
        let started = Instant::now();
        let mut engine = Engine::load(info, &options, |_, _| {})?;
        engine.synchronize()?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        progress(format!("{n} GPU layers: test-speed"));
        let sampler = gpu_index.and_then(|i| crate::gpu::PeakSampler::start(i).ok());
        let speed = test_speed(&mut engine, &ids, 1, o.runs)?;
        progress(format!("{n} GPU layers: decode"));
        let dec = decode(&mut engine, &prompts, o.gen_tokens)?;
        let load_phases = engine.load_timings();
        let peak = sampler.map(crate::gpu::PeakSampler::finish);
        drop(engine);
        let measured_peak_bytes = baseline.zip(peak).map(|(b, p)| p.saturating_sub(b));
        rows.push(BenchRow {
            gpu_layers: n,
            load_ms,
            load_phases,
            test_speed_ms: speed.avg_ms,
            test_speed_gpu_ms: speed.gpu_ms,
            test_speed_host_ms: speed.host_ms,
            ttft_ms: dec.ttft_ms,
            decode_ms_per_token: dec.ms_per_token,
            tokens_per_s: dec.tokens_per_s,
            decode_gpu_ms_per_token: dec.gpu_ms_per_token,
            decode_host_ms_per_token: dec.host_ms_per_token,
            weight_read_bytes_per_token: weight_read_bytes,
            weight_read_ms_per_token: device_gbps.map(|g| weight_read_bytes as f64 / (g * 1e6)),
            streamed_bytes_per_token: estimate.pinned_host_bytes,
            bound_ms_per_token: None,
            vs_bound: None,
            achieved_gbps: dec.transfer.achieved_gbps,
            pinned_fraction: pinned_gbps
                .filter(|_| dec.transfer.total_transfers > 0)
                .map(|p| dec.transfer.achieved_gbps / p),
            overlap_pct: dec.transfer.overlap_pct,
            estimate_bytes: estimate.total_bytes,
            estimate_error_pct: measured_peak_bytes
                .filter(|&m| m > 0)
                .map(|m| 100.0 * (estimate.total_bytes as f64 - m as f64) / m as f64),
            measured_peak_bytes,
        });
    }
    // The bound needs the resident decode time, measured in this same run.
    let resident_ms = rows
        .iter()
        .find(|r| r.gpu_layers == model.layers)
        .map(|r| r.decode_ms_per_token);
    for r in &mut rows {
        let bound = if r.gpu_layers == model.layers {
            r.weight_read_ms_per_token
        } else {
            pinned_gbps.map(|gbps| {
                let copy_ms = r.streamed_bytes_per_token as f64 / (gbps * 1e6);
                copy_ms.max(resident_ms.or(r.weight_read_ms_per_token).unwrap_or(0.0))
            })
        };
        r.bound_ms_per_token = bound;
        r.vs_bound = bound.map(|b| r.decode_ms_per_token / b);
    }
    Ok(BenchReport {
        schema: "vibeoffload.bench/1".into(),
        model,
        device,
        pinned_gbps,
        device_gbps,
        prompt_len: o.prompt_len,
        gen_tokens: o.gen_tokens,
        batch: o.plan.batch as usize,
        rows,
    })
}

/// Rows of `new` slower than the same layer count in `old` by more than `threshold`
/// (0.10 = 10%), as one line each.
pub fn regressions(old: &BenchReport, new: &BenchReport, threshold: f64) -> Vec<String> {
    let mut out = Vec::new();
    for n in &new.rows {
        let Some(o) = old.rows.iter().find(|o| o.gpu_layers == n.gpu_layers) else {
            continue;
        };
        for (what, before, after) in [
            (
                "decode ms/token",
                o.decode_ms_per_token,
                n.decode_ms_per_token,
            ),
            ("test-speed ms", o.test_speed_ms, n.test_speed_ms),
        ] {
            if after > before * (1.0 + threshold) {
                out.push(format!(
                    "N={}: {what} {after:.2} vs {before:.2} (+{:.0}%)",
                    n.gpu_layers,
                    100.0 * (after / before - 1.0)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod bench_tests {
    use super::*;

    fn report(ms: &[(usize, f64)]) -> BenchReport {
        BenchReport {
            schema: "vibeoffload.bench/1".into(),
            model: crate::report::ModelSummary::of(&crate::checkpoint::ModelInfo::builtin(
                crate::arch::config::BuiltinModel::Small1_5b,
                crate::checkpoint::CheckpointDtype::Float8,
            )),
            device: "cpu".into(),
            pinned_gbps: None,
            device_gbps: None,
            prompt_len: 1,
            gen_tokens: 1,
            batch: 1,
            rows: ms
                .iter()
                .map(|&(n, t)| BenchRow {
                    gpu_layers: n,
                    load_ms: 0.0,
                    load_phases: Default::default(),
                    test_speed_ms: 1.0,
                    test_speed_gpu_ms: None,
                    test_speed_host_ms: None,
                    ttft_ms: 0.0,
                    decode_ms_per_token: t,
                    tokens_per_s: 0.0,
                    decode_gpu_ms_per_token: None,
                    decode_host_ms_per_token: None,
                    weight_read_bytes_per_token: 0,
                    weight_read_ms_per_token: None,
                    streamed_bytes_per_token: 0,
                    bound_ms_per_token: None,
                    vs_bound: None,
                    achieved_gbps: 0.0,
                    pinned_fraction: None,
                    overlap_pct: 0.0,
                    estimate_bytes: 0,
                    measured_peak_bytes: None,
                    estimate_error_pct: None,
                })
                .collect(),
        }
    }

    #[test]
    fn regressions_beyond_the_threshold_only() {
        let old = report(&[(28, 10.0), (8, 20.0)]);
        let new = report(&[(28, 10.9), (8, 22.5), (4, 99.0)]);
        let found = regressions(&old, &new, 0.10);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("N=8: decode ms/token 22.50 vs 20.00"),
            "{found:?}"
        );
        assert!(regressions(&old, &new, 0.2).is_empty());
    }
}
