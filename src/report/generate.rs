//! `vibeoffload generate`: what was written, how fast, and where the time went.

use super::Render;
use crate::generate::GenerateReport;
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
        out.push_str(&format!(
            "time: prefill {:.1} ms; per frame: language model (both passes) {} ms, diffusion head {} ms, decoder {} ms, semantic encoder and connectors {} ms\n",
            t.prefill_ms,
            per_frame(t.lm_ms),
            per_frame(t.head_ms),
            per_frame(t.decoder_ms),
            per_frame(t.semantic_ms)
        ));
        out.push_str(&format!(
            "VRAM: estimate {} GiB (whole model, both KV caches at {} positions); measured {}\n",
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
