//! The original's flag form with a checkpoint (`vibeoffload --num-gpu-layers 8`): what the
//! load put where, the estimate term by term beside what was allocated and what NVML saw,
//! where load time went, and the speed test.

use super::run::{load_line, test_speed_line, transfer_table};
use super::{budget_line, model_line, Columns, Render};
use crate::generate::LoadReport;
use crate::units::gib;

impl Render for LoadReport {
    fn render(&self) -> String {
        let mut out = model_line(&self.model, &self.plan);
        if let Some(b) = &self.budget {
            out.push_str(&budget_line(b));
        }
        let e = &self.estimate;
        if let Some(b) = &self.budget {
            let verdict = match b.fits(e) {
                true => "within",
                false => "OVER",
            };
            out.push_str(&format!(
                "the estimate, {} GiB, is {verdict} the budget of {} GiB\n",
                gib(e.total_bytes),
                gib(b.budget_bytes)
            ));
        }
        out.push_str(&format!(
            "loaded on {}: {} of {} decoder layers on the GPU, {} in host memory (choice: {})\n",
            self.device, e.gpu_layers, self.model.layers, e.offloaded_layers, self.choice
        ));
        out.push_str(&load_line(self.load_ms, &self.load_phases));
        let a = &self.allocated;
        let w = e.working_bytes;
        let rows: [(&str, u64, Option<u64>); 8] = [
            ("CUDA context", e.cuda_context_bytes, None),
            (
                "non-layer weights",
                e.non_layer_weights_bytes,
                Some(a.engine.non_layer + a.speech_bytes),
            ),
            (
                "resident layers",
                e.resident_layers_bytes,
                Some(a.engine.resident_layers),
            ),
            (
                "stream slots",
                e.stream_buffers_bytes,
                Some(a.engine.stream_slots),
            ),
            (
                "KV caches (2 lanes)",
                e.kv_cache_bytes,
                Some(a.kv_cache_bytes),
            ),
            ("working memory", w, None),
            ("margin", e.margin_bytes, None),
            ("total VRAM", e.total_bytes, None),
        ];
        let columns = Columns::<(&str, u64, Option<u64>)>::new()
            .left("term", |r| r.0.to_string())
            .right("estimate GiB", |r| gib(r.1))
            .right("allocated GiB", |r| r.2.map_or("-".into(), gib));
        out.push_str(&format!("{}\n", columns.table(&rows)));
        let measured = |what: &str, bytes: Option<u64>, against: u64| {
            bytes.map_or(String::new(), |m| {
                format!(
                    "{what}: {} GiB per NVML, the estimate {} GiB ({:+.1}%)\n",
                    gib(m),
                    gib(against),
                    100.0 * (against as f64 / m as f64 - 1.0)
                )
            })
        };
        // After loading and one step, the working memory is not yet all in use.
        out.push_str(&measured(
            "after loading and one step",
            self.measured_loaded_bytes,
            e.total_bytes - w - e.margin_bytes,
        ));
        out.push_str(&measured("peak", self.measured_peak_bytes, e.total_bytes));
        if self.measured_loaded_bytes.is_none() {
            out.push_str("no NVML reading on this device: allocations only\n");
        }
        if let Some(t) = &self.test_speed {
            out.push_str(&test_speed_line(t));
            out.push_str(&transfer_table(&t.transfer));
        }
        out
    }
}
