//! The GPU as NVML reports it: name, total and free memory. This is the only place that asks
//! the driver; the planner takes the numbers as inputs.

use anyhow::{anyhow, Result};
use nvml_wrapper::Nvml;
use serde::{Deserialize, Serialize};

/// One GPU's memory, read through NVML.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML device index.
    pub index: u32,
    /// Marketing name (`NVIDIA GeForce RTX 4070`).
    pub name: String,
    /// Installed memory.
    pub total_bytes: u64,
    /// Memory not allocated by anyone.
    pub free_bytes: u64,
}

/// Reads GPU `index`. Fails with one line when NVML cannot be loaded (no NVIDIA driver) or the
/// index does not exist.
pub fn query(index: u32) -> Result<GpuInfo> {
    let nvml = Nvml::init().map_err(|e| {
        anyhow!("cannot read GPU memory: NVML is not available ({e}); no NVIDIA driver on this machine?")
    })?;
    let count = nvml.device_count().unwrap_or(0);
    let device = nvml.device_by_index(index).map_err(|e| {
        anyhow!(
            "cannot read GPU {index}: NVML sees {count} GPU(s) ({e}); pick one with --gpu 0..{}",
            count.saturating_sub(1)
        )
    })?;
    let name = device
        .name()
        .map_err(|e| anyhow!("cannot read the name of GPU {index}: {e}"))?;
    let memory = device
        .memory_info()
        .map_err(|e| anyhow!("cannot read the memory of GPU {index}: {e}"))?;
    Ok(GpuInfo {
        index,
        name,
        total_bytes: memory.total,
        free_bytes: memory.free,
    })
}

/// Samples GPU memory in use (all processes) on a thread of its own, every millisecond, so
/// that a run's peak is seen without timing the NVML calls as part of the run.
pub struct PeakSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
    /// Memory in use when sampling started.
    pub start_bytes: u64,
}

impl PeakSampler {
    /// Starts sampling GPU `index`; fails when NVML cannot read it.
    pub fn start(index: u32) -> Result<PeakSampler> {
        let read = move || -> Result<(Nvml, u64)> {
            let nvml = Nvml::init().map_err(|e| anyhow!("NVML is not available ({e})"))?;
            let used = nvml
                .device_by_index(index)
                .and_then(|d| d.memory_info())
                .map_err(|e| anyhow!("cannot read the memory of GPU {index}: {e}"))?
                .used;
            Ok((nvml, used))
        };
        let (nvml, start_bytes) = read()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = start_bytes;
            let Ok(device) = nvml.device_by_index(index) else {
                return peak;
            };
            loop {
                if let Ok(m) = device.memory_info() {
                    peak = peak.max(m.used);
                }
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        Ok(PeakSampler {
            stop,
            thread,
            start_bytes,
        })
    }

    /// Stops sampling and returns the highest reading.
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(self.start_bytes)
    }
}
