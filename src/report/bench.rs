//! `vibeoffload bench`: one line per layer count, in two tables that each fit 120 columns:
//! decoding, and prefill with VRAM and load time.

use super::{model_header, or_dash, Columns, Render};
use crate::measure::{BenchReport, BenchRow, ComparedRow, Comparison};
use crate::units::gib;

impl Render for BenchReport {
    fn render(&self) -> String {
        let mut out = format!(
            "{} on {}\npinned host-to-device bandwidth: {}; device-memory bandwidth: {}\nprefill {} tokens; decode {} tokens after a {}-token prompt, batch {}\n",
            model_header(&self.model),
            self.device,
            self.pinned_gbps.map_or("not measured (CPU)".into(), |g| format!("{g:.1} GB/s")),
            self.device_gbps.map_or("not measured (CPU)".into(), |g| format!("{g:.0} GB/s")),
            self.prompt_len,
            self.gen_tokens,
            self.prompt_len,
            self.batch
        );
        let decode = Columns::<BenchRow>::new()
            .right("GPU layers", |r| r.gpu_layers.to_string())
            .right("ms/token", |r| format!("{:.2}", r.decode_ms_per_token))
            .right("tokens/s", |r| format!("{:.1}", r.tokens_per_s))
            .right("GPU ms", |r| or_dash(r.decode_gpu_ms_per_token, 2))
            .right("host ms", |r| or_dash(r.decode_host_ms_per_token, 2))
            .right("bound ms", |r| or_dash(r.bound_ms_per_token, 2))
            .right("vs bound", |r| or_dash(r.vs_bound, 2))
            .right("GB/s", |r| format!("{:.1}", r.achieved_gbps))
            .right("of pinned", |r| or_dash(r.pinned_fraction, 2))
            .right("overlap %", |r| format!("{:.1}", r.overlap_pct));
        out.push_str(&format!(
            "decode, per step (GPU ms, host ms: the step with its launches queued ahead)\n{}\n",
            decode.table(&self.rows)
        ));
        let prefill = Columns::<BenchRow>::new()
            .right("GPU layers", |r| r.gpu_layers.to_string())
            .right("prefill ms", |r| format!("{:.2}", r.test_speed_ms))
            .right("GPU ms", |r| or_dash(r.test_speed_gpu_ms, 2))
            .right("host ms", |r| or_dash(r.test_speed_host_ms, 2))
            .right("estimate GiB", |r| gib(r.estimate_bytes))
            .right("measured GiB", |r| {
                r.measured_peak_bytes.map_or("-".into(), gib)
            })
            .right("error %", |r| or_dash(r.estimate_error_pct, 1))
            .right("load s", |r| format!("{:.1}", r.load_ms / 1e3));
        out.push_str(&format!(
            "prefill (test-speed pass), VRAM and load time\n{}\n",
            prefill.table(&self.rows)
        ));
        if self.rows.iter().any(|r| r.cpu_layers > 0) {
            let hybrid = Columns::<BenchRow>::new()
                .right("GPU layers", |r| r.gpu_layers.to_string())
                .right("CPU layers", |r| r.cpu_layers.to_string())
                .right("streamed", |r| {
                    (self.model.layers - r.gpu_layers - r.cpu_layers).to_string()
                })
                .right("ms/token", |r| format!("{:.2}", r.decode_ms_per_token))
                .right("predicted", |r| or_dash(r.predicted_ms_per_token, 2))
                .right("error %", |r| {
                    or_dash(
                        r.predicted_ms_per_token
                            .map(|p| 100.0 * (p / r.decode_ms_per_token - 1.0)),
                        1,
                    )
                })
                .right("CPU ms/token", |r| or_dash(r.cpu_compute_ms_per_token, 2));
            out.push_str(&format!(
                "hybrid decoding (host CPU float8 products: {}; predicted from {})\n{}\n",
                self.host_f8_gbps
                    .map_or("not measured".into(), |g| format!("{g:.0} GB/s")),
                match self.calibrated {
                    true => "this machine's calibration",
                    false => "rates measured at the start and built-in constants",
                },
                hybrid.table(&self.rows)
            ));
        }
        if let Some(c) = &self.comparison {
            out.push_str(&c.render());
        }
        out
    }
}

impl Render for Comparison {
    fn render(&self) -> String {
        let ratio = |(before, after, r): (f64, f64, f64), (old, new): (f64, f64)| {
            format!(
                "{before:.2} -> {after:.2} ({r:.3}), spread {:.0}%/{:.0}%",
                100.0 * old,
                100.0 * new
            )
        };
        let rows = Columns::<ComparedRow>::new()
            .right("GPU layers", |r| r.gpu_layers.to_string())
            .right("decode ms/token (new/old)", |r| {
                ratio(r.decode_ms, r.decode_spread)
            })
            .right("prefill ms (new/old)", |r| {
                ratio(r.test_speed_ms, r.test_speed_spread)
            });
        let mut out = format!(
            "against the baseline (medians over the runs; slower by more than {:.0}% and by more \
             than the larger spread, old or new, fails)\n{}\n",
            self.threshold * 100.0,
            rows.table(&self.rows)
        );
        for (what, layers) in [
            ("not in the baseline", &self.missing_in_baseline),
            ("in the baseline only", &self.missing_here),
        ] {
            if !layers.is_empty() {
                out.push_str(&format!("layer counts {what}: {layers:?}\n"));
            }
        }
        if !self.within_noise.is_empty() {
            out.push_str(&format!(
                "slower, but within the run-to-run spread (passed): {}\n",
                self.within_noise.join("; ")
            ));
        }
        match self.regressions.is_empty() {
            true => out.push_str("no regression\n"),
            false => out.push_str(&format!("slower: {}\n", self.regressions.join("; "))),
        }
        out
    }
}
