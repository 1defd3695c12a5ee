//! `bench --speech` as a library function: the whole text-to-speech loop spoken at each layer
//! count on a forced schedule of frames (random weights choose arbitrarily), with the time per
//! frame by part beside its floor: the CFG pair's copy floor plus the time measured outside
//! the language model.

use super::{GpuProbe, ModelFile};
use crate::checkpoint::summary::ModelSummary;
use crate::engine::{self, Bandwidths};
use crate::generate::{run_benchmark, GenerateReport, Request};
use crate::plan::{self, PlanOptions, Scope};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One layer count spoken by `bench --speech`. Times per frame divide the generation's totals
/// by its frames.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeechBenchRow {
    /// Decoder layers resident.
    pub gpu_layers: usize,
    /// Latent frames produced (the forced count).
    pub frames: usize,
    /// Seconds of audio produced.
    pub audio_seconds: f64,
    /// Wall time of the generation loop, prefill included.
    pub generation_ms: f64,
    /// Generation time over audio time, prefill included (below 1: faster than real time).
    pub real_time_factor: Option<f64>,
    /// The prompt's prefill (the first frame's language-model pass, both lanes).
    pub prefill_ms: f64,
    /// Loop time per frame after the prefill: `(generation - prefill) / frames`, one pass of
    /// the pair and one frame of the speech components.
    pub ms_per_frame: f64,
    /// The language model: one pass of the CFG pair (both lanes) and the token choice.
    pub lm_pair_ms_per_frame: f64,
    /// The diffusion head and sampler.
    pub head_ms_per_frame: f64,
    /// The streaming acoustic decoder.
    pub decoder_ms_per_frame: f64,
    /// The streaming semantic encoder and the connectors.
    pub semantic_ms_per_frame: f64,
    /// Time the compute stream waited for layer copies (the whole loop's, over the frames).
    pub copy_wait_ms_per_frame: f64,
    /// Layer bytes streamed per frame: one copy of each streamed layer serves both lanes.
    pub streamed_bytes_per_frame: u64,
    /// `streamed_bytes_per_frame` at the pinned bandwidth measured at the start (GPU only).
    pub copy_floor_ms_per_frame: Option<f64>,
    /// Reading every decoder layer once at the device-memory bandwidth measured at the start
    /// (GPU only): the pair's floor with every layer resident.
    pub weight_read_ms_per_frame: Option<f64>,
    /// The frame's floor: the larger of the copy floor and the weight read, plus the measured
    /// time outside the language model (head, decoder, semantic encoder and connectors).
    pub floor_ms_per_frame: Option<f64>,
    /// `ms_per_frame / floor_ms_per_frame`.
    pub vs_floor: Option<f64>,
    /// Host-to-device GB/s achieved by the loop's copies.
    pub achieved_gbps: f64,
    /// Share of copy time hidden behind compute.
    pub overlap_pct: f64,
    /// The planner's estimate for the whole model with both KV caches at this run's length.
    pub estimate_bytes: u64,
    /// GPU memory this configuration took at its peak, per NVML; none on the CPU.
    pub measured_peak_bytes: Option<u64>,
    /// Model load time.
    pub load_ms: f64,
}

/// Bytes a frame moves for one layer count.
#[derive(Clone, Copy, Debug, PartialEq)]
struct FrameBytes {
    /// Streamed layers, copied from pinned host memory.
    streamed: u64,
    /// Every decoder layer, read from device memory.
    layers: u64,
}

impl SpeechBenchRow {
    /// The row of one generation moving `bytes` per frame, against `bandwidths` (none on the
    /// CPU: no floor).
    fn of(r: &GenerateReport, bytes: FrameBytes, bandwidths: Option<Bandwidths>) -> Self {
        let per_frame = |ms: f64| ms / r.frames.max(1) as f64;
        let t = &r.timings;
        let outside_lm = per_frame(t.head_ms + t.decoder_ms + t.semantic_ms);
        let ms_per_frame = per_frame(r.generation_ms - t.prefill_ms);
        let copy_floor = bandwidths.map(|b| bytes.streamed as f64 / (b.pinned_gbps * 1e6));
        let weight_read = bandwidths.map(|b| bytes.layers as f64 / (b.device_gbps * 1e6));
        let floor = copy_floor
            .zip(weight_read)
            .map(|(copy, read)| copy.max(read) + outside_lm);
        SpeechBenchRow {
            gpu_layers: r.gpu_layers,
            frames: r.frames,
            audio_seconds: r.audio_seconds,
            generation_ms: r.generation_ms,
            real_time_factor: r.real_time_factor,
            prefill_ms: t.prefill_ms,
            ms_per_frame,
            lm_pair_ms_per_frame: per_frame(t.lm_ms),
            head_ms_per_frame: per_frame(t.head_ms),
            decoder_ms_per_frame: per_frame(t.decoder_ms),
            semantic_ms_per_frame: per_frame(t.semantic_ms),
            copy_wait_ms_per_frame: per_frame(r.transfer.compute_wait_ms),
            streamed_bytes_per_frame: bytes.streamed,
            copy_floor_ms_per_frame: copy_floor,
            weight_read_ms_per_frame: weight_read,
            floor_ms_per_frame: floor,
            vs_floor: floor.filter(|&f| f > 0.0).map(|f| ms_per_frame / f),
            achieved_gbps: r.transfer.achieved_gbps,
            overlap_pct: r.transfer.overlap_pct,
            estimate_bytes: r.estimate_bytes,
            measured_peak_bytes: r.measured_bytes,
            load_ms: r.load_ms,
        }
    }
}

/// `vibeoffload bench --speech`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeechBenchReport {
    /// `vibeoffload.bench-speech/1`.
    pub schema: String,
    /// The tool that wrote it: version and commit.
    pub tool: String,
    /// The model.
    pub model: ModelSummary,
    /// `cpu` or the GPU's name.
    pub device: String,
    /// Pinned host-to-device bandwidth measured at the start (GPU only).
    pub pinned_gbps: Option<f64>,
    /// Device-memory bandwidth measured at the start (GPU only).
    pub device_gbps: Option<f64>,
    /// Speakers in the script.
    pub speakers: usize,
    /// Prompt tokens (voice placeholders included).
    pub prompt_tokens: usize,
    /// Frames forced per configuration.
    pub force_frames: usize,
    /// Diffusion steps per frame.
    pub steps: usize,
    /// Guidance scale.
    pub cfg_scale: f64,
    /// Seed of the diffusion noise.
    pub seed: u64,
    /// GPU slots streamed layers pass through.
    pub slots: usize,
    /// Whether the speech components were replayed as CUDA graphs where the device allows
    /// (`--no-cuda-graphs`: launched one by one).
    pub cuda_graphs: bool,
    /// Whether the diffusion head ran on the CPU (`--offload-prediction-head`).
    #[serde(default)]
    pub prediction_head_offloaded: bool,
    /// One row per layer count.
    pub rows: Vec<SpeechBenchRow>,
}

/// What `bench --speech` speaks.
#[derive(Clone, Debug)]
pub struct SpeechBenchOptions {
    /// The script, voices, WAV, engine and sampling settings (the layer count and the frame
    /// schedule are the bench's own).
    pub request: Request,
    /// Frames produced per configuration, whatever the language model chooses.
    pub force_frames: usize,
    /// Layer counts, in the order measured.
    pub layer_counts: Vec<usize>,
}

/// Measures the bandwidths, then speaks the request once per layer count after a warm-up (as
/// `generate --benchmark` does), each with exactly `force_frames` frames. `progress` hears how
/// many runs are done (the warm-up and one per layer count) and what runs; after each layer
/// count, `row_done` gets a complete report of the rows so far (an error from it stops the
/// bench).
pub fn run_speech_bench(
    model: &ModelFile,
    o: &SpeechBenchOptions,
    mut progress: impl FnMut(usize, &str),
    mut row_done: impl FnMut(&SpeechBenchReport) -> Result<()>,
) -> Result<SpeechBenchReport> {
    let engine = &o.request.engine;
    let probe = GpuProbe::of(engine.device);
    // Before the bandwidth test opens the device, so that every row counts the CUDA context.
    let vram_baseline = probe.used_bytes();
    progress(0, "measuring host-to-device and device-memory bandwidth");
    let bandwidths = engine::bandwidths(engine.device)?;
    let info = model.open()?;
    let plan = PlanOptions {
        scope: Scope::Full,
        placement: engine.placement,
        stream_slots: engine.slots,
        cpu_layers: engine.cpu_layers,
        offload_prediction_head: o.request.offload_prediction_head,
        ..PlanOptions::default()
    };
    let bytes = o
        .layer_counts
        .iter()
        .map(|&n| {
            let offloaded = info.inventory.num_layers().saturating_sub(n);
            let row_plan = PlanOptions {
                cpu_layers: plan.cpu_layers.min(offloaded),
                ..plan.clone()
            };
            let e = plan::estimate(&info, &row_plan, n)?;
            Ok(FrameBytes {
                streamed: e.pinned_host_bytes,
                layers: e.resident_layers_bytes + e.pinned_host_bytes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut report = SpeechBenchReport {
        schema: "vibeoffload.bench-speech/1".into(),
        tool: crate::TOOL.into(),
        model: ModelSummary::of(&info),
        device: probe.label(),
        pinned_gbps: bandwidths.map(|b| b.pinned_gbps),
        device_gbps: bandwidths.map(|b| b.device_gbps),
        speakers: 0,
        prompt_tokens: 0,
        force_frames: o.force_frames,
        steps: o.request.steps,
        cfg_scale: o.request.cfg_scale,
        seed: o.request.seed,
        slots: engine.slots,
        cuda_graphs: o.request.graphs,
        prediction_head_offloaded: o.request.offload_prediction_head,
        rows: Vec::new(),
    };
    drop(info);
    let request = Request {
        force_frames: Some(o.force_frames),
        max_frames: None,
        vram_baseline,
        ..o.request.clone()
    };
    let count = o.layer_counts.len();
    let configurations: Vec<(String, usize)> = o
        .layer_counts
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("row {}/{count}", i + 1), n))
        .collect();
    let mut runs_done = 0;
    run_benchmark(
        model,
        &request,
        &configurations,
        |what| {
            progress(runs_done, what);
            runs_done += 1;
        },
        |benchmark| {
            let last = &benchmark.rows[benchmark.rows.len() - 1].report;
            report.speakers = last.speakers;
            report.prompt_tokens = last.prompt_tokens;
            let row = SpeechBenchRow::of(last, bytes[benchmark.rows.len() - 1], bandwidths);
            report.rows.push(row);
            row_done(&report)
        },
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Timings;

    fn generated(gpu_layers: usize) -> GenerateReport {
        GenerateReport {
            schema: String::new(),
            tool: String::new(),
            model: String::new(),
            device: String::new(),
            gpu_layers,
            out: Default::default(),
            speakers: 1,
            prompt_tokens: 10,
            frames: 4,
            audio_seconds: 4.0 * 3200.0 / 24000.0,
            generation_ms: 100.0,
            real_time_factor: None,
            load_ms: 1.0,
            timings: Timings {
                prefill_ms: 20.0,
                lm_ms: 40.0,
                head_ms: 8.0,
                decoder_ms: 4.0,
                semantic_ms: 4.0,
            },
            stop: String::new(),
            forced_frames: true,
            estimate_bytes: 0,
            max_seq_len: 0,
            measured_bytes: None,
            transfer: Default::default(),
            graph_runs: Default::default(),
            prediction_head_offloaded: false,
        }
    }

    #[test]
    fn the_floor_is_the_pairs_copy_floor_plus_the_time_outside_the_language_model() {
        let gbps = Some(Bandwidths {
            pinned_gbps: 1.0,
            device_gbps: 4.0,
        });
        let streamed = FrameBytes {
            streamed: 2_000_000,
            layers: 4_000_000,
        };
        let r = SpeechBenchRow::of(&generated(2), streamed, gbps);
        // (100 - 20) ms over 4 frames; head, decoder and semantic take 4 ms a frame.
        assert_eq!(r.ms_per_frame, 20.0);
        assert_eq!((r.lm_pair_ms_per_frame, r.head_ms_per_frame), (10.0, 2.0));
        assert_eq!(r.copy_floor_ms_per_frame, Some(2.0), "2 MB at 1 GB/s");
        assert_eq!(r.weight_read_ms_per_frame, Some(1.0), "4 MB at 4 GB/s");
        assert_eq!(r.floor_ms_per_frame, Some(6.0));
        assert_eq!(r.vs_floor, Some(20.0 / 6.0));
        // Every layer resident: reading the weights once is the pair's floor.
        let resident = FrameBytes {
            streamed: 0,
            ..streamed
        };
        let r = SpeechBenchRow::of(&generated(4), resident, gbps);
        assert_eq!(r.floor_ms_per_frame, Some(5.0));
        // On the CPU no bandwidth is measured: no floor.
        let r = SpeechBenchRow::of(&generated(4), streamed, None);
        assert_eq!((r.floor_ms_per_frame, r.vs_floor), (None, None));
    }
}
