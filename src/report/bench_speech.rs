//! `vibeoffload bench --speech`: one line per layer count, in two tables that each fit 100
//! columns: time per frame by part against the floor, and copies with VRAM and load time.

use super::{model_header, or_dash, Columns, Render};
use crate::measure::{SpeechBenchReport, SpeechBenchRow};
use crate::units::gib;

impl Render for SpeechBenchReport {
    fn render(&self) -> String {
        let gbps = |g: Option<f64>, digits: usize| {
            g.map_or("not measured (CPU)".into(), |g| {
                format!("{g:.digits$} GB/s")
            })
        };
        let mut out = format!(
            "{} on {}\npinned host-to-device bandwidth: {}; device-memory bandwidth: {}\n{} frames forced (a benchmark mode: the language model's choices are overridden), {} diffusion steps, CFG {}, seed {}, {} stream slots; {} prompt tokens, {} speaker{}\n",
            model_header(&self.model),
            self.device,
            gbps(self.pinned_gbps, 1),
            gbps(self.device_gbps, 0),
            self.force_frames,
            self.steps,
            self.cfg_scale,
            self.seed,
            self.slots,
            self.prompt_tokens,
            self.speakers,
            if self.speakers == 1 { "" } else { "s" }
        );
        if !self.cuda_graphs {
            out.push_str("the speech components launched one by one (--no-cuda-graphs)\n");
        }
        if self.prediction_head_offloaded {
            out.push_str("the diffusion head on the CPU (--offload-prediction-head): its weights off the GPU and out of the estimate\n");
        }
        let times = Columns::<SpeechBenchRow>::new()
            .right("GPU layers", |r| r.gpu_layers.to_string())
            .right("ms/frame", |r| format!("{:.2}", r.ms_per_frame))
            .right("RTF", |r| or_dash(r.real_time_factor, 3))
            .right("LM pair", |r| format!("{:.2}", r.lm_pair_ms_per_frame))
            .right("head", |r| format!("{:.2}", r.head_ms_per_frame))
            .right("decoder", |r| format!("{:.2}", r.decoder_ms_per_frame))
            .right("semantic", |r| format!("{:.2}", r.semantic_ms_per_frame))
            .right("copy wait", |r| format!("{:.2}", r.copy_wait_ms_per_frame))
            .right("floor", |r| or_dash(r.floor_ms_per_frame, 2))
            .right("vs floor", |r| or_dash(r.vs_floor, 2));
        out.push_str(&format!(
            "per frame, ms (after the prefill; RTF includes it; floor: the pair's copy floor, or \
             the weight read if larger, plus head, decoder and semantic)\n{}\n",
            times.table(&self.rows)
        ));
        let copies = Columns::<SpeechBenchRow>::new()
            .right("GPU layers", |r| r.gpu_layers.to_string())
            .right("streamed MB/frame", |r| {
                format!("{:.1}", r.streamed_bytes_per_frame as f64 / 1e6)
            })
            .right("copy floor ms", |r| or_dash(r.copy_floor_ms_per_frame, 2))
            .right("GB/s", |r| format!("{:.1}", r.achieved_gbps))
            .right("overlap %", |r| format!("{:.1}", r.overlap_pct))
            .right("estimate GiB", |r| gib(r.estimate_bytes))
            .right("NVML GiB", |r| {
                r.measured_peak_bytes.map_or("-".into(), gib)
            })
            .right("prefill ms", |r| format!("{:.1}", r.prefill_ms))
            .right("load s", |r| format!("{:.1}", r.load_ms / 1e3));
        out.push_str(&format!(
            "copies, VRAM (whole model, both KV caches) and load time\n{}\n",
            copies.table(&self.rows)
        ));
        out
    }
}
