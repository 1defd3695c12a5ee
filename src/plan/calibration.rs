//! A machine's calibration: the rates [`super::speed`] predicts with, measured once by
//! `bench --calibrate` (`measure::calibrate`) and stored, so that `table` can show how fast
//! each choice will run on this machine before any of them is tried, and `--cpu-layers auto`
//! need not measure at every start. Pure data: reading, writing and measuring it live in
//! `measure`.

use super::speed::Rates;
use serde::{Deserialize, Serialize};

/// The file's schema name.
pub const SCHEMA: &str = "vibeoffload.calibration/1";

/// What a calibration holds for: the host CPU and the GPU it was measured with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`), empty where the system does not say.
    pub cpu: String,
    /// Logical cores this process may use.
    pub logical_cores: usize,
    /// The GPU's name, as NVML reports it.
    pub gpu: Option<String>,
}

impl Machine {
    /// Whether a calibration measured on `self` describes `here`: the same CPU model and core
    /// count, and the same GPU where `here` knows which it has.
    pub fn describes(&self, here: &Machine) -> bool {
        self.cpu == here.cpu
            && self.logical_cores == here.logical_cores
            && (here.gpu.is_none() || self.gpu == here.gpu)
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpu = match self.cpu.as_str() {
            "" => "an unnamed CPU",
            name => name,
        };
        write!(f, "{cpu} ({} logical cores)", self.logical_cores)?;
        match &self.gpu {
            Some(gpu) => write!(f, ", {gpu}"),
            None => write!(f, ", no GPU named"),
        }
    }
}

/// The host CPU's side at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchCalibration {
    /// Rows decoded together.
    pub batch: usize,
    /// Weight bytes per second the host's float8 products read while the copy engine streams,
    /// GB/s.
    pub cpu_gbps: f64,
    /// What a host-computed layer costs beyond its weight reads, ms: fitted so that the
    /// prediction of the split in `fitted` equals its measurement.
    pub host_layer_overhead_ms: f64,
    /// The split it was fitted on.
    pub fitted: Check,
}

/// A split decoded during calibration: the prediction (with the calibrated rates) beside the
/// measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Resident layers.
    pub gpu_layers: usize,
    /// Layers the host CPU computed.
    pub cpu_layers: usize,
    /// Rows decoded together.
    pub batch: usize,
    /// Predicted ms per decode step.
    pub predicted_ms_per_token: f64,
    /// Measured ms per decode step.
    pub measured_ms_per_token: f64,
}

impl Check {
    /// `(predicted - measured) / measured`.
    pub fn error(&self) -> f64 {
        (self.predicted_ms_per_token - self.measured_ms_per_token) / self.measured_ms_per_token
    }
}

/// `bench --calibrate`'s measurements of one machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// [`SCHEMA`].
    pub schema: String,
    /// The tool that measured it: version and commit.
    pub tool: String,
    /// When, seconds since the Unix epoch.
    pub measured_unix_s: u64,
    /// Where.
    pub machine: Machine,
    /// The model decoded to measure it (its source).
    pub model: String,
    /// Host-to-device copies from pinned memory, GB/s.
    pub pinned_gbps: f64,
    /// Device-memory copies, GB/s.
    pub device_gbps: f64,
    /// The share of `device_gbps` the decode kernels read weights at.
    pub gpu_decode_efficiency: f64,
    /// Whether `gpu_decode_efficiency` was measured (a resident decode of the whole model);
    /// else it is the built-in [`super::speed::GPU_DECODE_EFFICIENCY`], as when the model
    /// does not fit the GPU.
    pub gpu_decode_efficiency_measured: bool,
    /// The host CPU's side, at batches 1 and 2 (one sequence, and the CFG pair).
    pub batches: Vec<BatchCalibration>,
    /// Splits decoded after fitting, not fitted on: how far the prediction is off.
    pub checks: Vec<Check>,
}

impl Calibration {
    /// The rates for decoding `batch` rows, where the calibration measured that batch.
    pub fn rates(&self, batch: usize) -> Option<Rates> {
        self.batches
            .iter()
            .find(|b| b.batch == batch)
            .map(|b| Rates {
                pinned_gbps: self.pinned_gbps,
                gpu_gbps: self.device_gbps * self.gpu_decode_efficiency,
                cpu_gbps: b.cpu_gbps,
                host_layer_overhead_ms: b.host_layer_overhead_ms,
            })
    }

    /// Which rate, if any, is no positive finite number (an overhead may be 0, an efficiency
    /// at most 1): a file edited by hand, or from a broken measurement, would predict NaN.
    pub fn invalid(&self) -> Option<String> {
        let mut rates = vec![
            ("pinned_gbps", self.pinned_gbps, false),
            ("device_gbps", self.device_gbps, false),
        ];
        for b in &self.batches {
            rates.push(("cpu_gbps", b.cpu_gbps, false));
            rates.push(("host_layer_overhead_ms", b.host_layer_overhead_ms, true));
        }
        let efficiency = self.gpu_decode_efficiency;
        if !(efficiency > 0.0 && efficiency <= 1.0) {
            return Some(format!(
                "gpu_decode_efficiency is {efficiency}, not in (0, 1]"
            ));
        }
        rates
            .into_iter()
            .find(|&(_, v, zero_ok)| !(v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0))))
            .map(|(name, v, _)| format!("{name} is {v}, not a positive number"))
    }

    /// The batches it holds, for messages (`1, 2`).
    pub fn batch_list(&self) -> String {
        let b: Vec<String> = self.batches.iter().map(|b| b.batch.to_string()).collect();
        b.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(gpu: Option<&str>) -> Machine {
        Machine {
            cpu: "Xeon".into(),
            logical_cores: 16,
            gpu: gpu.map(str::to_string),
        }
    }

    #[test]
    fn a_calibration_describes_the_same_cpu_and_gpu_only() {
        let measured = machine(Some("H200"));
        assert!(measured.describes(&machine(Some("H200"))));
        // A process that cannot name its GPU goes by the CPU.
        assert!(measured.describes(&machine(None)));
        assert!(!measured.describes(&machine(Some("H100"))));
        let fewer = Machine {
            logical_cores: 8,
            ..machine(Some("H200"))
        };
        assert!(!measured.describes(&fewer));
    }

    #[test]
    fn rates_come_only_for_a_measured_batch() {
        let check = Check {
            gpu_layers: 0,
            cpu_layers: 14,
            batch: 1,
            predicted_ms_per_token: 66.0,
            measured_ms_per_token: 60.0,
        };
        assert!((check.error() - 0.1).abs() < 1e-12);
        let c = Calibration {
            schema: SCHEMA.into(),
            tool: String::new(),
            measured_unix_s: 0,
            machine: machine(Some("H200")),
            model: "7b".into(),
            pinned_gbps: 55.0,
            device_gbps: 4000.0,
            gpu_decode_efficiency: 0.5,
            gpu_decode_efficiency_measured: false,
            batches: vec![BatchCalibration {
                batch: 1,
                cpu_gbps: 60.0,
                host_layer_overhead_ms: 1.0,
                fitted: check,
            }],
            checks: Vec::new(),
        };
        let r = c.rates(1).expect("batch 1 was measured");
        assert_eq!(
            (r.gpu_gbps, r.cpu_gbps, r.host_layer_overhead_ms),
            (2000.0, 60.0, 1.0)
        );
        assert!(c.rates(2).is_none());
        assert_eq!(c.batch_list(), "1");
    }
}
