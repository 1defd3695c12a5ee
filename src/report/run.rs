//! `vibeoffload run`: the engine's configuration, the timed mode's results, copies and VRAM.

use super::{budget_line, model_header, Columns, Render};
use crate::engine::{DeviceChoice, LoadTimings, TransferStats};
use crate::measure::{RunReport, TestSpeed};
use crate::units::gib;

impl Render for RunReport {
    fn render(&self) -> String {
        let mut out = format!("{}\n", model_header(&self.model));
        if let Some(b) = &self.budget {
            out.push_str(&budget_line(b));
        }
        out.push_str(&self.engine_lines());
        let transfer = if let Some(t) = &self.test_speed {
            out.push_str(&test_speed_line(t));
            Some(&t.transfer)
        } else if let Some(d) = &self.decode {
            out.push_str(&format!(
                "decode: batch {}, {} prompt tokens, {} generated; time to first token {:.1} ms; {:.2} ms/token ({:.1} tokens/s){}\n",
                d.batch,
                d.prompt_tokens,
                d.generated_tokens,
                d.ttft_ms,
                d.ms_per_token,
                d.tokens_per_s,
                queued("step", d.gpu_ms_per_token, d.host_ms_per_token)
            ));
            Some(&d.transfer)
        } else {
            None
        };
        if let Some(f) = &self.forward {
            out.push_str(&format!(
                "forward: {} tokens; sum of final hidden states {:.6}; next token {}{}\n",
                f.input_ids.len(),
                f.hidden_sum,
                f.next_token,
                f.dump
                    .as_ref()
                    .map_or(String::new(), |p| format!("; dumped to {}", p.display()))
            ));
        }
        if let Some(t) = transfer {
            out.push_str(&transfer_table(t));
        }
        let v = &self.vram;
        out.push_str(&format!(
            "VRAM: estimate {} GiB; engine weights + slots {} GiB, KV cache {} GiB{}\n",
            gib(self.estimate.total_bytes),
            gib(v.engine_weight_bytes),
            gib(v.engine_kv_cache_bytes),
            v.measured_peak_bytes.map_or(String::new(), |m| format!(
                "; measured peak (NVML) {} GiB",
                gib(m)
            ))
        ));
        out
    }
}

impl RunReport {
    /// How the engine ran and where load time went, two lines.
    fn engine_lines(&self) -> String {
        let e = &self.engine;
        let streamed = self.model.layers - e.gpu_layers - e.cpu_layers;
        let p = &self.load_phases;
        format!(
            "scope: the language model alone (`run` loads nothing else; `table` and `auto` plan \
             the whole model unless --lm-only)\n\
             engine: {} on {}, {} layers resident ({} placement), {}{} streamed through {} slots, prefetch depth {}, {} host memory\n{}",
            match e.device {
                DeviceChoice::Cpu => "f32",
                DeviceChoice::Cuda(_) => "bf16",
            },
            self.device,
            e.gpu_layers,
            e.placement,
            match e.cpu_layers {
                0 => String::new(),
                n => format!("{n} computed by the CPU, "),
            },
            streamed,
            e.slots.min(streamed),
            e.prefetch_depth,
            match (e.device, e.pin_memory) {
                (DeviceChoice::Cpu, _) => "ordinary",
                (_, true) => "pinned",
                (_, false) => "pageable",
            },
            load_line(self.load_ms, p)
        )
    }
}

/// The original's test-speed line: each run, the average, transfers and overhead.
pub(super) fn test_speed_line(t: &TestSpeed) -> String {
    let runs: Vec<String> = t.runs_ms.iter().map(|ms| format!("{ms:.1}")).collect();
    format!(
        "test-speed: {} tokens, {} warm-up; runs {} ms; average {:.2} ms; avg transfer per layer {:.2} ms; estimated overhead {:.1}%{}\n",
        t.tokens,
        t.warmup_runs,
        runs.join(", "),
        t.avg_ms,
        t.transfer.avg_transfer_time_ms,
        t.estimated_overhead_pct,
        queued("pass", t.gpu_ms, t.host_ms)
    )
}

/// The streamer's copies, one row.
pub(super) fn transfer_table(t: &TransferStats) -> String {
    let columns = Columns::<TransferStats>::new()
        .right("transfers", |t| t.total_transfers.to_string())
        .right("bytes", |t| t.total_bytes.to_string())
        .right("copy ms", |t| format!("{:.2}", t.total_transfer_time_ms))
        .right("avg ms/layer", |t| format!("{:.3}", t.avg_transfer_time_ms))
        .right("GB/s", |t| format!("{:.2}", t.achieved_gbps))
        .right("compute waited ms", |t| format!("{:.2}", t.compute_wait_ms))
        .right("overlap %", |t| format!("{:.1}", t.overlap_pct));
    format!("{}\n", columns.table([t]))
}

/// `loaded in T ms: device .. + kernels .. + ... (the phases are P% of it)`: where load time
/// went, phases in the order they run; those that took no time are left out.
pub(super) fn load_line(load_ms: f64, p: &LoadTimings) -> String {
    let phases = [
        ("device", p.device_ms),
        ("kernels", p.kernels_ms),
        ("disk", p.page_in_ms),
        ("pin", p.pin_ms),
        ("streamed layers", p.read_ms),
        ("resident layers", p.upload_ms),
        ("norm/head/slots", p.non_layer_ms),
        ("speech", p.speech_ms),
    ];
    let shown: Vec<String> = phases
        .iter()
        .filter(|(_, ms)| *ms >= 0.5)
        .map(|(name, ms)| format!("{name} {ms:.0}"))
        .collect();
    let share = if load_ms > 0.0 {
        100.0 * p.phases_ms() / load_ms
    } else {
        100.0
    };
    format!(
        "loaded in {load_ms:.0} ms: {} ms (the phases are {share:.0}% of it)\n",
        shown.join(" + ")
    )
}

/// `; a {what} costs the GPU G ms, the host H ms to queue`, when both were measured.
fn queued(what: &str, gpu_ms: Option<f64>, host_ms: Option<f64>) -> String {
    match (gpu_ms, host_ms) {
        (Some(g), Some(h)) => {
            format!("; a {what} costs the GPU {g:.2} ms, the host {h:.2} ms to queue")
        }
        _ => String::new(),
    }
}
