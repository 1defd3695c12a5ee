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

/// GPU memory in use on GPU `index` (all processes), per NVML.
pub fn used_bytes(index: u32) -> Result<u64> {
    let nvml = Nvml::init().map_err(|e| anyhow!("NVML is not available ({e})"))?;
    let device = nvml
        .device_by_index(index)
        .map_err(|e| anyhow!("cannot read GPU {index}: {e}"))?;
    let memory = device
        .memory_info()
        .map_err(|e| anyhow!("cannot read the memory of GPU {index}: {e}"))?;
    Ok(memory.used)
}
