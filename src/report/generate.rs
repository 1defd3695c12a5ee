//! `vibeoffload generate`: what was written, how fast, and where the time went.

use super::{Columns, Render};
use crate::generate::{BenchmarkRow, GenerateBenchmark, GenerateReport};
use crate::units::gib;

impl Render for GenerateReport {
    fn render(&self) -> String {
        let t = &self.timings;
        let per_frame = |ms: f64| match self.frames {
            0 => "-".to_string(),
            n => format!("{:.2}", ms / n as f64),
        };
        let rtf = self
            .real_time_factor
            .map_or("-".to_string(), |r| format!("{r:.3}"));
        let mut out = format!(
            "model: {}\ndevice: {}, {} decoder layers resident; loaded in {:.0} ms\n",
            self.model, self.device, self.gpu_layers, self.load_ms
        );
        out.push_str(&format!(
            "wrote {}: {:.2} s of audio, {} frames, {} speakers, {} prompt tokens; stopped at {}\n",
            self.out.display(),
            self.audio_seconds,
            self.frames,
            self.speakers,
            self.prompt_tokens,
            self.stop
        ));
        out.push_str(&format!(
            "generation: {:.0} ms, real-time factor {rtf} (below 1 is faster than real time)\n",
            self.generation_ms
        ));
        let head_where = match self.prediction_head_offloaded {
            true => " (on the CPU)",
            false => "",
        };
        out.push_str(&format!(
            "time: prefill {:.1} ms; per frame: language model (both passes) {} ms, diffusion head{head_where} {} ms, decoder {} ms, semantic encoder and connectors {} ms\n",
            t.prefill_ms,
            per_frame(t.lm_ms),
            per_frame(t.head_ms),
            per_frame(t.decoder_ms),
            per_frame(t.semantic_ms)
        ));
        let g = &self.graph_runs;
        if g.head + g.decoder + g.semantic > 0 {
            out.push_str(&format!(
                "CUDA graphs: replayed for {} frames of the diffusion head, {} of the decoder, {} of the semantic encoder (of {})\n",
                g.head, g.decoder, g.semantic, self.frames
            ));
        }
        let x = &self.transfer;
        if x.total_transfers > 0 {
            out.push_str(&format!(
                "copies: {} layer copies, {:.2} GB at {:.1} GB/s; per frame the compute stream waited {} ms for them ({:.0}% of copy time hidden)\n",
                x.total_transfers,
                x.total_bytes as f64 / 1e9,
                x.achieved_gbps,
                per_frame(x.compute_wait_ms),
                x.overlap_pct
            ));
        }
        let scope = match self.prediction_head_offloaded {
            true => "whole model less the diffusion head",
            false => "whole model",
        };
        out.push_str(&format!(
            "VRAM: estimate {} GiB ({scope}, both KV caches at {} positions); measured {}\n",
            gib(self.estimate_bytes),
            self.max_seq_len,
            self.measured_bytes
                .map_or("- (no GPU)".to_string(), |b| format!(
                    "{} GiB (NVML peak)",
                    gib(b)
                ))
        ));
        if self.forced_frames {
            out.push_str("frames forced by --force-frames: the language model's choices were overridden (a benchmark mode)\n");
        }
        out
    }
}

impl Render for GenerateBenchmark {
    fn render(&self) -> String {
        let per_frame = |r: &BenchmarkRow, ms: f64| match r.report.frames {
            0 => "-".to_string(),
            n => format!("{:.1}", ms / n as f64),
        };
        let columns = Columns::<BenchmarkRow>::new()
            .left("preset", |r| r.configuration.clone())
            .right("N", |r| r.report.gpu_layers.to_string())
            .right("RTF", |r| {
                r.report
                    .real_time_factor
                    .map_or("-".to_string(), |x| format!("{x:.3}"))
            })
            .right("time s", |r| format!("{:.2}", r.report.generation_ms / 1e3))
            .right("LM pair", |r| per_frame(r, r.report.timings.lm_ms))
            .right("head", |r| per_frame(r, r.report.timings.head_ms))
            .right("decoder", |r| per_frame(r, r.report.timings.decoder_ms))
            .right("semantic", |r| per_frame(r, r.report.timings.semantic_ms))
            .right("VRAM est", |r| gib(r.report.estimate_bytes))
            .right("NVML", |r| {
                r.report.measured_bytes.map_or("-".to_string(), gib)
            });
        let mut out = match self.rows.first() {
            Some(r) => format!(
                "model: {}\ndevice: {}; {} prompt tokens, {} speakers, {:.2} s of audio; times per frame in ms, VRAM in GiB\n",
                r.report.model, r.report.device, r.report.prompt_tokens, r.report.speakers, r.report.audio_seconds
            ),
            None => String::new(),
        };
        out.push_str(&format!("{}\n", columns.table(&self.rows)));
        if self.rows.iter().any(|r| r.report.forced_frames) {
            out.push_str("frames forced by --force-frames (a benchmark mode)\n");
        }
        if self.rows.iter().any(|r| r.report.prediction_head_offloaded) {
            out.push_str("diffusion head on the CPU (--offload-prediction-head)\n");
        }
        out
    }
}
