//! Timed generation on a loaded engine: the original's test-speed (forward passes over one
//! random prompt, 1 warm-up, 5 timed runs) and greedy decoding with the KV cache.

use crate::engine::{Engine, QueuedTime, TransferStats};
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
    /// [`Decode::gpu_ms_per_token`]). `None` also when queuing the pass outlasted the hold, as
    /// a 7B prefill's does.
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
fn medians(queued: &[QueuedTime], runs: usize) -> (Option<f64>, Option<f64>) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (runs > 0 && v.len() == runs).then(|| v[v.len() / 2])
    };
    (
        median(queued.iter().filter_map(|q| q.gpu_ms).collect()),
        median(queued.iter().map(|q| q.host_ms).collect()),
    )
}

/// Runs `warmup` untimed and `runs` timed forward passes over `ids` from an empty cache.
pub fn test_speed(
    engine: &mut Engine,
    ids: &[u32],
    warmup: usize,
    runs: usize,
) -> Result<TestSpeed> {
    test_speed_with(engine, ids, warmup, runs, |_, _| {})
}

/// [`test_speed`], telling `progress` how many of the timed passes are done, of how many: 0
/// before the warm-up, then after each pass (outside the timed part).
pub fn test_speed_with(
    engine: &mut Engine,
    ids: &[u32],
    warmup: usize,
    runs: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<TestSpeed> {
    progress(0, runs);
    for _ in 0..warmup {
        engine.reset();
        engine.forward(ids)?;
        engine.synchronize()?;
    }
    engine.reset_stats()?;
    let mut runs_ms = Vec::with_capacity(runs);
    for done in 1..=runs {
        engine.reset();
        let started = Instant::now();
        engine.forward(ids)?;
        engine.synchronize()?;
        runs_ms.push(started.elapsed().as_secs_f64() * 1e3);
        progress(done, runs);
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
    decode_with(engine, prompts, tokens, |_, _| {})
}

/// [`decode`], telling `progress` how many tokens of the timed decode are generated, of how
/// many: 0 before the warm-up, then after each step. It is called inside the timed part, so
/// it must be cheap (a progress display that draws now and then is).
pub fn decode_with(
    engine: &mut Engine,
    prompts: &[Vec<u32>],
    tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Decode> {
    let tokens = tokens.max(1);
    // The next ids, left on the device: queuing a step never waits for it.
    let queue_step = |engine: &mut Engine, batch: &[Vec<u32>]| -> Result<candle_core::Tensor> {
        let rows: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        engine.queue_greedy(&rows)
    };
    let step = |engine: &mut Engine, batch: &[Vec<u32>]| -> Result<Vec<u32>> {
        let queued = queue_step(engine, batch)?;
        engine.read_greedy(&queued)
    };
    let as_batch = |next: &[u32]| next.iter().map(|&t| vec![t]).collect::<Vec<_>>();
    progress(0, tokens);
    engine.reset();
    let mut next = step(engine, prompts)?;
    for _ in 0..2 {
        next = step(engine, &as_batch(&next))?;
    }
    engine.synchronize()?;
    engine.reset();

    let started = Instant::now();
    let mut next = step(engine, prompts)?;
    let ttft_ms = started.elapsed().as_secs_f64() * 1e3;
    // The statistics below are the decode steps' (the prefill's copies and host time are
    // the time to first token's).
    engine.reset_stats()?;
    let mut generated = vec![next[0]];
    progress(1, tokens);
    let decode_started = Instant::now();
    while generated.len() < tokens {
        next = step(engine, &as_batch(&next))?;
        generated.push(next[0]);
        progress(generated.len(), tokens);
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
        next = engine.read_greedy(&ids)?;
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
