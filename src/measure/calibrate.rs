//! `bench --calibrate`: this machine's rates for [`crate::plan::speed`], measured by decoding
//! the model at a few splits, and where they are stored. The built-in constants (the decode
//! kernels' share of device bandwidth, a host layer's cost beyond its weight reads) were
//! fitted on one lent machine and are up to 17% off on another; a calibration fits them here.

use super::{load, random_prompts, speed, BenchOptions, GpuProbe, ModelFile};
use crate::checkpoint::ModelInfo;
use crate::engine::{self, DeviceChoice, EngineOptions};
use crate::plan::calibration::{BatchCalibration, Calibration, Check, Machine, SCHEMA};
use crate::plan::speed::{self as plan_speed, Rates};
use crate::plan::{self, PlanOptions};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Batches a calibration measures: one sequence, and the CFG pair `generate` decodes.
pub const BATCHES: [usize; 2] = [1, 2];

/// The share of free VRAM a resident decode may take for the GPU's rate to be measured.
const RESIDENT_SHARE: f64 = 0.9;

/// Where a calibration is kept when no `--calibration` names a file: the user's cache
/// directory (`~/.cache/vibeoffload/calibration.json` on Linux), if the system has one.
pub fn default_path() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("vibeoffload").join("calibration.json"))
}

/// The machine this process runs on, with `device`'s GPU named as NVML names it.
pub fn this_machine(device: DeviceChoice) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_default();
    Machine {
        cpu,
        logical_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        gpu: GpuProbe::of(device).name(),
    }
}

/// A calibration written by [`write`].
pub fn read(path: &Path) -> Result<Calibration> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the calibration {}: {e}", path.display()))?;
    let c: Calibration = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a calibration (`vibeoffload bench --calibrate` writes one): {e}",
            path.display()
        )
    })?;
    if c.schema != SCHEMA {
        bail!(
            "{} is a {} file, not a {SCHEMA} calibration: run `vibeoffload bench --calibrate` again",
            path.display(),
            c.schema
        );
    }
    if let Some(what) = c.invalid() {
        bail!(
            "{}: {what}; run `vibeoffload bench --calibrate` again",
            path.display()
        );
    }
    Ok(c)
}

/// Stores `c` at `path` (its directory created; the file replaced whole, never half-written).
pub fn write(c: &Calibration, path: &Path) -> Result<()> {
    let dir = crate::output::parent_dir(path);
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    crate::report::write_json(c, path)
}

/// The host-layer overhead, ms, with which [`plan_speed::predict`] gives `measured_ms` for
/// `gpu_layers` resident and `options`' split, the other rates as in `rates`; 0 where even no
/// overhead predicts more (the other rates then overstate the time). The prediction grows
/// with the overhead, so halving the interval finds it.
pub fn fit_overhead(
    model: &ModelInfo,
    options: &PlanOptions,
    gpu_layers: usize,
    depth: usize,
    rates: &Rates,
    measured_ms: f64,
) -> f64 {
    let predict = |overhead: f64| {
        let r = Rates {
            host_layer_overhead_ms: overhead,
            ..*rates
        };
        plan_speed::predict(model, options, gpu_layers, depth, &r)
    };
    let (mut low, mut high) = (0.0f64, 1.0f64);
    if predict(low) >= measured_ms {
        return 0.0;
    }
    while predict(high) < measured_ms && high < 1e4 {
        high *= 2.0;
    }
    for _ in 0..50 {
        let mid = 0.5 * (low + high);
        match predict(mid) < measured_ms {
            true => low = mid,
            false => high = mid,
        }
    }
    0.5 * (low + high)
}

/// The split a calibration fits on, and the one it checks with. A host layer's overhead shows
/// only where the host's layers are the slower side (at a balanced split any excess over the
/// copies would be charged to the host), so the fit takes two host layers more than the split
/// predicted fastest with nothing resident, and the check four fewer than the fit (none for a
/// model of few layers: streaming alone), where the copies are the slower side.
pub fn splits(best: usize, num_layers: usize) -> (usize, usize) {
    let fit = (best + 2).clamp(1, num_layers.max(1));
    (fit, fit.saturating_sub(4))
}

/// Refuses the CPU: a calibration measures PCIe copies and the GPU.
pub fn check_device(device: DeviceChoice) -> Result<()> {
    if device == DeviceChoice::Cpu {
        bail!(
            "bench --calibrate measures PCIe copies and the GPU's decode: it needs a GPU \
             (a CUDA build, --device cuda); on the CPU every layer is the host's anyway"
        );
    }
    Ok(())
}

/// Measures this machine with `model` and `o`'s engine and workload (its layer counts and
/// `--cpu-layers` are not used): the bandwidths, the GPU's decode rate where the whole model
/// fits (a resident decode), and at each of [`BATCHES`] the host's float8 rate, a
/// host-layer overhead fitted to a decode with nothing resident, and a second split as a
/// check. `progress` gets each step's description.
pub fn calibrate(
    model: &ModelFile,
    o: &BenchOptions,
    mut progress: impl FnMut(String),
) -> Result<Calibration> {
    let device = o.engine.device;
    check_device(device)?;
    progress("measuring host-to-device and device-memory bandwidth".into());
    let Some(b) = engine::bandwidths(device)? else {
        bail!("no bandwidths measured on {device:?}");
    };
    let probe = GpuProbe::of(device);
    let info = model.open()?;
    let num_layers = info.inventory.num_layers();
    let depth = o.engine.prefetch_depth;
    let w = &o.workload;
    let decode_ms = |n: usize, c: usize, batch: usize| -> Result<f64> {
        let options = EngineOptions {
            gpu_layers: n,
            cpu_layers: c,
            ..o.engine.clone()
        };
        let (mut engine, _) = load(model.open()?, &options, |_| {})?;
        let vocab = engine.info().config.vocab_size;
        let prompts = random_prompts(batch, w.prompt_len, w.seed, vocab);
        let mut runs = (0..w.runs.max(1))
            .map(|_| Ok(speed::decode(&mut engine, &prompts, w.gen_tokens)?.ms_per_token))
            .collect::<Result<Vec<f64>>>()?;
        runs.sort_by(f64::total_cmp);
        Ok(runs[(runs.len() - 1) / 2])
    };
    let plan_at = |batch: usize, c: usize| PlanOptions {
        batch: batch as u64,
        cpu_layers: c,
        ..o.plan.clone()
    };

    // The GPU's rate: what makes the resident prediction equal a resident decode.
    let resident = plan::estimate(&info, &plan_at(1, 0), num_layers)?;
    let fits = probe
        .free_bytes()
        .is_some_and(|free| resident.total_bytes as f64 <= free as f64 * RESIDENT_SHARE);
    let mut efficiency = plan_speed::GPU_DECODE_EFFICIENCY;
    if fits {
        progress(format!("{num_layers} GPU layers (all): decode"));
        let measured = decode_ms(num_layers, 0, 1)?;
        let at_full = Rates {
            pinned_gbps: b.pinned_gbps,
            gpu_gbps: b.device_gbps,
            cpu_gbps: 1.0,
            host_layer_overhead_ms: 0.0,
        };
        let floor = plan_speed::predict(&info, &plan_at(1, 0), num_layers, depth, &at_full);
        efficiency = (floor / measured).clamp(0.01, 1.0);
    }

    let mut batches = Vec::new();
    let mut checks = Vec::new();
    for batch in BATCHES {
        progress(format!("batch {batch}: the host's float8 products"));
        let mut rates = Rates {
            pinned_gbps: b.pinned_gbps,
            gpu_gbps: b.device_gbps * efficiency,
            cpu_gbps: engine::host_f8_gbps(device, &info.config, batch)?,
            host_layer_overhead_ms: plan_speed::HOST_LAYER_OVERHEAD_MS,
        };
        let (best, _) = plan_speed::best_cpu_layers(&info, &plan_at(batch, 0), 0, depth, &rates);
        let (fit_c, check_c) = splits(best, num_layers);
        progress(format!(
            "batch {batch}: 0 GPU layers, {fit_c} CPU layers: decode"
        ));
        let measured = decode_ms(0, fit_c, batch)?;
        rates.host_layer_overhead_ms =
            fit_overhead(&info, &plan_at(batch, fit_c), 0, depth, &rates, measured);
        let check = |c: usize, measured: f64| Check {
            gpu_layers: 0,
            cpu_layers: c,
            batch,
            predicted_ms_per_token: plan_speed::predict(
                &info,
                &plan_at(batch, c),
                0,
                depth,
                &rates,
            ),
            measured_ms_per_token: measured,
        };
        let fitted = check(fit_c, measured);
        progress(format!(
            "batch {batch}: 0 GPU layers, {check_c} CPU layers: decode"
        ));
        checks.push(check(check_c, decode_ms(0, check_c, batch)?));
        batches.push(BatchCalibration {
            batch,
            cpu_gbps: rates.cpu_gbps,
            host_layer_overhead_ms: rates.host_layer_overhead_ms,
            fitted,
        });
    }
    let c = Calibration {
        schema: SCHEMA.into(),
        tool: crate::TOOL.into(),
        measured_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: this_machine(device),
        model: info.source.clone(),
        pinned_gbps: b.pinned_gbps,
        device_gbps: b.device_gbps,
        gpu_decode_efficiency: efficiency,
        gpu_decode_efficiency_measured: fits,
        batches,
        checks,
    };
    match c.invalid() {
        Some(what) => {
            bail!("the calibration measured no usable rates ({what}); nothing was stored")
        }
        None => Ok(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::config::BuiltinModel;
    use crate::checkpoint::CheckpointDtype;

    #[test]
    fn the_fitted_overhead_reproduces_the_measurement() {
        let m = ModelInfo::builtin(BuiltinModel::Large7b, CheckpointDtype::Float8);
        let rates = Rates {
            pinned_gbps: 55.0,
            gpu_gbps: 2300.0,
            cpu_gbps: 60.0,
            host_layer_overhead_ms: 0.0,
        };
        let o = PlanOptions {
            cpu_layers: 14,
            ..PlanOptions::default()
        };
        let at = |overhead: f64| {
            let r = Rates {
                host_layer_overhead_ms: overhead,
                ..rates
            };
            plan_speed::predict(&m, &o, 0, 1, &r)
        };
        let measured = at(1.7);
        let fitted = fit_overhead(&m, &o, 0, 1, &rates, measured);
        assert!((at(fitted) - measured).abs() < 1e-6, "{fitted}");
        // Faster than the rates allow even with no overhead: none.
        assert_eq!(fit_overhead(&m, &o, 0, 1, &rates, at(0.0) * 0.5), 0.0);
    }

    #[test]
    fn the_fit_leans_on_the_host_and_the_check_on_the_copies() {
        assert_eq!(splits(12, 28), (14, 10));
        assert_eq!(splits(0, 28), (2, 0));
        assert_eq!(splits(2, 4), (4, 0));
        assert_eq!(splits(40, 28), (28, 24));
    }
}
