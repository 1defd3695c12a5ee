//! The `bench` command as a library function: every layer count loaded and measured in turn
//! (test-speed, decode, VRAM, copies), beside the planner's estimate and the bounds the
//! measured bandwidths set.

use super::compare::Comparison;
use super::{load, random_ids, random_prompts, speed, taken_bytes, GpuProbe, ModelFile, Workload};
use crate::checkpoint::summary::ModelSummary;
use crate::engine::{self, EngineOptions, LoadTimings};
use crate::gpu;
use crate::plan::calibration::Calibration;
use crate::plan::{self, PlanOptions};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One layer count measured by `bench`. Fields added since the first `vibeoffload.bench/1`
/// files read as their defaults from those files.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchRow {
    /// Decoder layers resident.
    pub gpu_layers: usize,
    /// Offloaded layers the host CPU computed (hybrid decoding).
    pub cpu_layers: usize,
    /// Decode time per step that `plan::speed` predicted for this split from the rates
    /// measured at the start (GPU only).
    pub predicted_ms_per_token: Option<f64>,
    /// Time per step in the host-computed layers, their hand-overs included.
    pub cpu_compute_ms_per_token: Option<f64>,
    /// Of it, handing the hidden states over and back (waiting for the GPU's work included).
    #[serde(default)]
    pub cpu_handoff_ms_per_token: Option<f64>,
    /// Of it, the host layers' float8 products.
    #[serde(default)]
    pub cpu_products_ms_per_token: Option<f64>,
    /// Load time.
    pub load_ms: f64,
    /// Where load time went.
    pub load_phases: LoadTimings,
    /// Mean test-speed pass (prefill of `prompt_len` tokens, no LM head).
    pub test_speed_ms: f64,
    /// Each timed test-speed pass, for the comparison's median and spread (empty in files
    /// written before samples were kept).
    pub test_speed_runs_ms: Vec<f64>,
    /// GPU time of a test-speed pass with its launches queued ahead.
    pub test_speed_gpu_ms: Option<f64>,
    /// Host time to queue a test-speed pass.
    pub test_speed_host_ms: Option<f64>,
    /// Time to first token in decode mode.
    pub ttft_ms: f64,
    /// Decode time per step (one token for each sequence of the batch), of the median decode
    /// (the decode figures below are that decode's).
    pub decode_ms_per_token: f64,
    /// Decode time per step of each decode (`runs` of them), for the comparison's median and
    /// spread (empty in files written before samples were kept).
    pub decode_runs_ms_per_token: Vec<f64>,
    /// Tokens per second over the batch.
    pub tokens_per_s: f64,
    /// GPU time of a decode step with its launches queued ahead (see [`super::speed::Decode`]).
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
    /// The tool that wrote it: version and commit (older files: empty).
    #[serde(default)]
    pub tool: String,
    /// The model.
    pub model: ModelSummary,
    /// `cpu` or the GPU's name.
    pub device: String,
    /// Pinned host-to-device bandwidth measured at the start (GPU only).
    pub pinned_gbps: Option<f64>,
    /// Device-memory bandwidth (device-to-device copies) measured at the start (GPU only).
    pub device_gbps: Option<f64>,
    /// Weight bytes per second of the host CPU's float8 products at the bench's batch:
    /// measured at the start with the device's bandwidths, or the calibration's (GPU only).
    #[serde(default)]
    pub host_f8_gbps: Option<f64>,
    /// Prompt tokens (test-speed pass and decode prefill).
    pub prompt_len: usize,
    /// Tokens decoded per configuration.
    pub gen_tokens: usize,
    /// Sequences decoded together (1 in files written before batches).
    #[serde(default = "one")]
    pub batch: usize,
    /// Whether the rows' predictions (and `--cpu-layers auto`) used this machine's
    /// calibration, not rates measured at the start with the built-in constants.
    #[serde(default)]
    pub calibrated: bool,
    /// One row per layer count.
    pub rows: Vec<BenchRow>,
    /// Against `--baseline`, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
}

impl BenchReport {
    /// An earlier `bench --json` report (older `vibeoffload.bench/1` files included).
    pub fn read(path: &std::path::Path) -> Result<BenchReport> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        crate::output::record_input(path);
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a `bench --json` report: {e}", path.display()))
    }
}

fn one() -> usize {
    1
}

/// What `bench` measures.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Engine settings other than the layer count (which `layer_counts` supplies).
    pub engine: EngineOptions,
    /// Planner settings (language-model scope), for the estimate beside each measurement.
    pub plan: PlanOptions,
    /// Layer counts, in the order measured.
    pub layer_counts: Vec<usize>,
    /// Each layer count's CPU-computed layers chosen as `plan::speed` predicts fastest
    /// (`--cpu-layers auto`), instead of `plan.cpu_layers` (at most the layers it leaves
    /// offloaded).
    pub auto_cpu_layers: bool,
    /// This machine's calibration, which predictions use where it has the bench's batch.
    pub calibration: Option<Calibration>,
    /// Prompt and generation lengths, timed passes.
    pub workload: Workload,
}

/// Loads `model` once per layer count and measures test-speed (`runs` passes), decode (`runs`
/// decodes), VRAM and copies; `progress` hears how many layer counts are done and what is
/// being measured. After each layer count, `row_done` gets the report so far: a complete
/// report of the rows measured (the CLI saves it, so that a long bench that is interrupted or
/// fails keeps them); an error from it stops the bench.
pub fn run_bench(
    model: &ModelFile,
    o: &BenchOptions,
    mut progress: impl FnMut(usize, String),
    mut row_done: impl FnMut(&BenchReport) -> Result<()>,
) -> Result<BenchReport> {
    let probe = GpuProbe::of(o.engine.device);
    // Before anything touches the GPU: what other processes hold.
    let baseline = probe.used_bytes();
    let device = probe.label();
    progress(
        0,
        "measuring host-to-device and device-memory bandwidth".into(),
    );
    let bandwidths = engine::bandwidths(o.engine.device)?;
    let pinned_gbps = bandwidths.map(|b| b.pinned_gbps);
    let device_gbps = bandwidths.map(|b| b.device_gbps);
    let depth = o.engine.prefetch_depth;
    let first = model.open()?;
    let batch = o.plan.batch as usize;
    let calibrated = o.calibration.as_ref().and_then(|c| c.rates(batch));
    let rates = match (calibrated, bandwidths) {
        (Some(r), Some(_)) => Some(r),
        (_, b) => b
            .map(|b| super::decode_rates(&b, o.engine.device, &first.config, batch))
            .transpose()?,
    };
    let summary = ModelSummary::of(&first);
    let w = &o.workload;
    let vocab = first.config.vocab_size;
    let ids = random_ids(w.prompt_len, w.seed, vocab);
    let prompts = random_prompts(o.plan.batch as usize, w.prompt_len, w.seed, vocab);
    drop(first);
    let mut report = BenchReport {
        schema: "vibeoffload.bench/1".into(),
        tool: crate::TOOL.into(),
        model: summary,
        device,
        pinned_gbps,
        device_gbps,
        host_f8_gbps: rates.map(|r| r.cpu_gbps),
        calibrated: calibrated.is_some() && bandwidths.is_some(),
        prompt_len: w.prompt_len,
        gen_tokens: w.gen_tokens,
        batch: o.plan.batch as usize,
        rows: Vec::new(),
        comparison: None,
    };
    for (done, &n) in o.layer_counts.iter().enumerate() {
        progress(done, format!("{n} GPU layers: loading"));
        let info = model.open()?;
        let offloaded = info.inventory.num_layers().saturating_sub(n);
        let cpu_layers = match (o.auto_cpu_layers, &rates) {
            (true, Some(r)) => plan::speed::best_cpu_layers(&info, &o.plan, n, depth, r).0,
            (true, None) => 0,
            (false, _) => o.plan.cpu_layers.min(offloaded),
        };
        let row_plan = PlanOptions {
            cpu_layers,
            ..o.plan.clone()
        };
        let predicted_ms_per_token = rates
            .as_ref()
            .map(|r| plan::speed::predict(&info, &row_plan, n, depth, r));
        let estimate = plan::estimate(&info, &row_plan, n)?;
        let weight_read_bytes = estimate.resident_layers_bytes
            + estimate.pinned_host_bytes
            + estimate.non_layer_weights_bytes;
        let options = EngineOptions {
            gpu_layers: n,
            cpu_layers,
            ..o.engine.clone()
        };
        let (mut engine, load_ms) = load(info, &options, |_| {})?;
        progress(done, format!("{n} GPU layers: test-speed"));
        let sampler = probe.watch_peak();
        let speed = speed::test_speed(&mut engine, &ids, 1, w.runs)?;
        progress(done, format!("{n} GPU layers: decode"));
        let mut decodes = (0..w.runs.max(1))
            .map(|_| speed::decode(&mut engine, &prompts, w.gen_tokens))
            .collect::<Result<Vec<_>>>()?;
        let decode_runs_ms_per_token = decodes.iter().map(|d| d.ms_per_token).collect();
        // The row's decode figures come from one real decode, the median (lower of two).
        decodes.sort_by(|a, b| a.ms_per_token.total_cmp(&b.ms_per_token));
        let dec = decodes.swap_remove((decodes.len() - 1) / 2);
        let load_phases = engine.load_timings();
        let peak = sampler.map(gpu::PeakSampler::finish);
        if let Some(checkpoint) = &engine.info().checkpoint {
            checkpoint.check_unchanged()?;
        }
        drop(engine);
        let measured_peak_bytes = taken_bytes(baseline, peak);
        let steps = (w.gen_tokens.max(2) - 1) as f64;
        // A host-layer time per step, where the host computes layers.
        let host_per_step = |ms: f64| (cpu_layers > 0).then(|| ms / steps);
        report.rows.push(BenchRow {
            gpu_layers: n,
            cpu_layers,
            predicted_ms_per_token,
            cpu_compute_ms_per_token: host_per_step(dec.transfer.cpu_compute_ms),
            cpu_handoff_ms_per_token: host_per_step(dec.transfer.cpu_handoff_ms),
            cpu_products_ms_per_token: host_per_step(dec.transfer.cpu_products_ms),
            load_ms,
            load_phases,
            test_speed_ms: speed.avg_ms,
            test_speed_runs_ms: speed.runs_ms,
            test_speed_gpu_ms: speed.gpu_ms,
            test_speed_host_ms: speed.host_ms,
            ttft_ms: dec.ttft_ms,
            decode_ms_per_token: dec.ms_per_token,
            decode_runs_ms_per_token,
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
        // The bounds of the rows so far (a resident row measured later refines them).
        set_bounds(&mut report.rows, report.model.layers, pinned_gbps);
        row_done(&report)?;
    }
    Ok(report)
}

/// Fills in each row's lower bound of decode time and the ratio to it. With every layer
/// resident the bound is reading the weights once; otherwise the larger of copying the
/// streamed bytes and the resident decode time measured in this same run.
fn set_bounds(rows: &mut [BenchRow], layers: usize, pinned_gbps: Option<f64>) {
    let resident_ms = rows
        .iter()
        .find(|r| r.gpu_layers == layers)
        .map(|r| r.decode_ms_per_token);
    for r in rows {
        let bound = if r.gpu_layers == layers {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bench_files_still_read() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for name in ["bench-h200-6c043fd.json", "bench-h200-69d9bed.json"] {
            let r = BenchReport::read(&root.join("docs").join(name)).unwrap();
            assert_eq!(r.batch, 1);
            assert!(!r.rows.is_empty());
        }
    }

    #[test]
    fn each_finished_row_is_handed_over_as_a_complete_report() {
        use crate::checkpoint::CheckpointDtype;
        let model = ModelFile::embedded(CheckpointDtype::Float8).unwrap();
        let workload = Workload {
            prompt_len: 4,
            gen_tokens: 2,
            runs: 1,
            seed: 0,
        };
        let options = BenchOptions {
            engine: EngineOptions::default(),
            plan: PlanOptions {
                scope: plan::Scope::LanguageModel,
                max_seq_len: workload.cache_tokens() as u64,
                ..PlanOptions::default()
            },
            layer_counts: vec![8, 2],
            auto_cpu_layers: false,
            calibration: None,
            workload,
        };
        let mut seen = Vec::new();
        let report = run_bench(
            &model,
            &options,
            |_, _| {},
            |partial| {
                seen.push(partial.clone());
                Ok(())
            },
        )
        .unwrap();
        let counts: Vec<Vec<usize>> = seen
            .iter()
            .map(|r| r.rows.iter().map(|x| x.gpu_layers).collect())
            .collect();
        assert_eq!(counts, [vec![8], vec![8, 2]]);
        assert_eq!(seen[1], report, "the last one handed over is the report");
        assert_eq!(seen[0].rows[0], report.rows[0]);

        // An error from the callback (a report that cannot be saved) stops the bench there.
        let mut measured = Vec::new();
        let e = run_bench(
            &model,
            &options,
            |_, what| measured.push(what),
            |_| anyhow::bail!("disk full"),
        )
        .unwrap_err();
        assert_eq!(format!("{e:#}"), "disk full");
        assert!(
            !measured.iter().any(|m| m.starts_with("2 GPU layers")),
            "{measured:?}"
        );
    }

    #[test]
    fn streamed_bounds_use_the_resident_time_of_the_same_run() {
        let mut rows = vec![
            BenchRow {
                gpu_layers: 4,
                decode_ms_per_token: 3.0,
                weight_read_ms_per_token: Some(1.0),
                ..BenchRow::default()
            },
            BenchRow {
                gpu_layers: 2,
                decode_ms_per_token: 8.0,
                streamed_bytes_per_token: 2_000_000,
                ..BenchRow::default()
            },
        ];
        set_bounds(&mut rows, 4, Some(1.0));
        assert_eq!(rows[0].bound_ms_per_token, Some(1.0));
        assert_eq!(rows[1].bound_ms_per_token, Some(3.0), "copying takes 2 ms");
        assert_eq!(rows[1].vs_bound, Some(8.0 / 3.0));
    }
}
