//! `bench --calibrate`: what was measured, the fitted constants, and how far the prediction
//! is off on a split it was not fitted on.

use super::{utc_date, Columns, Render};
use crate::plan::calibration::{Calibration, Check};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A calibration and where it was stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    /// Where later commands find it.
    pub path: PathBuf,
    /// What was measured.
    pub calibration: Calibration,
}

impl Render for CalibrationReport {
    fn render(&self) -> String {
        let c = &self.calibration;
        let gpu = match c.gpu_decode_efficiency_measured {
            true => "measured by a resident decode",
            false => "built in: the model does not fit this GPU whole",
        };
        let mut out = format!(
            "calibration of {}, measured {} with {}\n\
             pinned copies {:.1} GB/s, device memory {:.0} GB/s; decode kernels at {:.0}% of it ({gpu})\n",
            c.machine,
            utc_date(c.measured_unix_s),
            c.model,
            c.pinned_gbps,
            c.device_gbps,
            c.gpu_decode_efficiency * 100.0
        );
        let fitted: Vec<(&Check, f64, f64)> = c
            .batches
            .iter()
            .map(|b| (&b.fitted, b.cpu_gbps, b.host_layer_overhead_ms))
            .collect();
        let host = Columns::<(&Check, f64, f64)>::new()
            .right("batch", |(f, _, _)| f.batch.to_string())
            .right("host float8 GB/s", |(_, gbps, _)| format!("{gbps:.1}"))
            .right("host layer overhead ms", |(_, _, ms)| format!("{ms:.2}"))
            .right("fitted on N, CPU", |(f, _, _)| {
                format!("{}, {}", f.gpu_layers, f.cpu_layers)
            })
            .right("ms/token", |(f, _, _)| {
                format!("{:.1}", f.measured_ms_per_token)
            });
        out.push_str(&format!(
            "\nThe host CPU's side (its overhead fitted so that the prediction of the split equals its decode)\n{}\n",
            host.table(&fitted)
        ));
        let checks = Columns::<Check>::new()
            .right("batch", |k| k.batch.to_string())
            .right("N", |k| k.gpu_layers.to_string())
            .right("CPU", |k| k.cpu_layers.to_string())
            .right("predicted ms/token", |k| {
                format!("{:.1}", k.predicted_ms_per_token)
            })
            .right("measured", |k| format!("{:.1}", k.measured_ms_per_token))
            .right("off by", |k| format!("{:+.1}%", 100.0 * k.error()));
        out.push_str(&format!(
            "\nChecks: splits decoded after fitting, not fitted on\n{}\n",
            checks.table(&c.checks)
        ));
        out.push_str(&format!(
            "stored in {}: `table` predicts ms/token from it, `--cpu-layers auto` splits by it\n",
            self.path.display()
        ));
        out
    }
}
