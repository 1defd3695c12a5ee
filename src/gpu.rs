//! The GPU as NVML reports it: name, total and free memory. This is the only place that asks
//! the driver; the planner takes the numbers as inputs.

use anyhow::{anyhow, bail, Result};
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
    /// PCI bus id (`00000000:17:00.0`), which names the same card to NVML and CUDA.
    #[serde(default)]
    pub pci_bus_id: String,
}

/// Which GPU `--gpu` names: an index as CUDA numbers the GPUs this process may use (after
/// `CUDA_VISIBLE_DEVICES`), a UUID (`GPU-8f3a...`, or a unique prefix of one) or a PCI bus id
/// (`0000:17:00.0`, `17:00.0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuSelector {
    /// CUDA's index.
    Index(u32),
    /// A UUID or a prefix of one.
    Uuid(String),
    /// A PCI bus id.
    PciBusId(PciAddress),
}

/// A PCI address: domain, bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciAddress(pub u32, pub u32, pub u32, pub u32);

impl PciAddress {
    /// Parses `[domain:]bus:device.function` in hexadecimal (NVML writes an 8-digit domain,
    /// CUDA a 4-digit one).
    pub fn parse(text: &str) -> Option<PciAddress> {
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let parts: Vec<&str> = text.trim().split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [bus, rest] => (0, hex(bus)?, *rest),
            [domain, bus, rest] => (hex(domain)?, hex(bus)?, *rest),
            _ => return None,
        };
        let (device, function) = rest.split_once('.')?;
        Some(PciAddress(domain, bus, hex(device)?, hex(function)?))
    }
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.0, self.1, self.2, self.3
        )
    }
}

impl std::str::FromStr for GpuSelector {
    type Err = String;

    fn from_str(text: &str) -> Result<GpuSelector, String> {
        let text = text.trim();
        if let Ok(i) = text.parse::<u32>() {
            return Ok(GpuSelector::Index(i));
        }
        if text.len() > 4 && text[..4].eq_ignore_ascii_case("GPU-") {
            return Ok(GpuSelector::Uuid(text.to_ascii_lowercase()));
        }
        if let Some(pci) = PciAddress::parse(text) {
            return Ok(GpuSelector::PciBusId(pci));
        }
        Err(format!(
            "'{text}' names no GPU: give an index (0), a UUID (GPU-8f3a...) or a PCI bus id (0000:17:00.0)"
        ))
    }
}

impl std::fmt::Display for GpuSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuSelector::Index(i) => write!(f, "{i}"),
            GpuSelector::Uuid(u) => f.write_str(u),
            GpuSelector::PciBusId(p) => write!(f, "{p}"),
        }
    }
}

/// A GPU found for a [`GpuSelector`]: the CUDA ordinal that runs the model (a CUDA build with
/// a driver) and the NVML index that reads its memory, matched through the PCI bus id so that
/// the plan and the run always mean the same card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// CUDA's ordinal, when this build and machine can run on it.
    pub cuda_ordinal: Option<usize>,
    /// NVML's index, when NVML can read it.
    pub nvml_index: Option<u32>,
    /// What the driver calls it, and where it sits: for messages.
    pub label: String,
}

/// Finds the GPU `selector` names. With CUDA (a CUDA build, a driver): among the devices CUDA
/// shows this process, then NVML's device on the same PCI bus. Without: NVML's devices, the
/// index read through `CUDA_VISIBLE_DEVICES` when it is set.
pub fn resolve(selector: &GpuSelector) -> Result<Gpu> {
    let nvml = Nvml::init().ok();
    let visible = cuda_devices();
    if !visible.is_empty() {
        let found = visible.iter().find(|d| match selector {
            GpuSelector::Index(i) => d.ordinal == *i as usize,
            GpuSelector::Uuid(u) => d.uuid.to_ascii_lowercase().starts_with(u.as_str()),
            GpuSelector::PciBusId(p) => PciAddress::parse(&d.pci_bus_id) == Some(*p),
        });
        let Some(d) = found else {
            bail!(
                "--gpu {selector}: CUDA shows this process {} GPU(s){}: {}",
                visible.len(),
                visible_devices_note(),
                visible
                    .iter()
                    .map(|d| format!("{} {} ({}, {})", d.ordinal, d.name, d.uuid, d.pci_bus_id))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        };
        let nvml_index = nvml.as_ref().and_then(|n| {
            n.device_by_pci_bus_id(d.pci_bus_id.as_str())
                .and_then(|dev| dev.index())
                .ok()
        });
        return Ok(Gpu {
            cuda_ordinal: Some(d.ordinal),
            nvml_index,
            label: format!("GPU {} {} (PCI {})", d.ordinal, d.name, d.pci_bus_id),
        });
    }
    let nvml = nvml.ok_or_else(|| {
        anyhow!("cannot read GPU memory: NVML is not available; no NVIDIA driver on this machine?")
    })?;
    let device = match selector {
        GpuSelector::Index(i) => match visible_entry(*i)? {
            Some(entry) => match entry.parse::<u32>() {
                Ok(n) => nvml.device_by_index(n),
                Err(_) => nvml.device_by_uuid(entry.as_str()),
            },
            None => nvml.device_by_index(*i),
        },
        GpuSelector::Uuid(u) => {
            let count = nvml.device_count().unwrap_or(0);
            let matching: Vec<_> = (0..count)
                .filter_map(|i| nvml.device_by_index(i).ok())
                .filter(|d| d.uuid().is_ok_and(|id| id.to_ascii_lowercase().starts_with(u)))
                .collect();
            if matching.len() > 1 {
                bail!("--gpu {selector}: {} GPUs have UUIDs starting so; give more of it", matching.len());
            }
            matching
                .into_iter()
                .next()
                .ok_or(nvml_wrapper::error::NvmlError::NotFound)
        }
        GpuSelector::PciBusId(p) => nvml.device_by_pci_bus_id(format!("{:08x}:{:02x}:{:02x}.{:x}", p.0, p.1, p.2, p.3).as_str()),
    }
    .map_err(|e| {
        anyhow!(
            "--gpu {selector}: NVML sees {} GPU(s) and none is that one ({e}); `nvidia-smi -L` lists them",
            nvml.device_count().unwrap_or(0)
        )
    })?;
    let index = device
        .index()
        .map_err(|e| anyhow!("cannot read GPU {selector}: {e}"))?;
    let name = device.name().unwrap_or_default();
    let pci = device.pci_info().map(|p| p.bus_id).unwrap_or_default();
    Ok(Gpu {
        cuda_ordinal: None,
        nvml_index: Some(index),
        label: format!("GPU {index} {name} (PCI {pci})"),
    })
}

/// `CUDA_VISIBLE_DEVICES`'s entry for CUDA index `i`, when the variable is set; an error when
/// it hides that index.
fn visible_entry(i: u32) -> Result<Option<String>> {
    let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") else {
        return Ok(None);
    };
    let entries: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    match entries.get(i as usize) {
        Some(e) => Ok(Some(e.to_string())),
        None => bail!(
            "--gpu {i}: CUDA_VISIBLE_DEVICES={list} shows this process {} GPU(s)",
            entries.len()
        ),
    }
}

/// ` (CUDA_VISIBLE_DEVICES=...)` when that variable is set, else nothing: for messages about
/// the GPUs CUDA shows.
pub fn visible_devices_note() -> String {
    std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
        .unwrap_or_default()
}

/// A CUDA device as this process sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaDevice {
    /// Its CUDA ordinal (after `CUDA_VISIBLE_DEVICES`).
    pub ordinal: usize,
    /// `0000:17:00.0`.
    pub pci_bus_id: String,
    /// `GPU-8f3a1c2e-...`, as nvidia-smi writes it.
    pub uuid: String,
    /// The driver's name for it.
    pub name: String,
}

/// The CUDA devices this process sees, in CUDA's order; empty when the driver library is
/// missing or cannot be initialised (then nothing runs on CUDA), and in a build without CUDA.
#[cfg(feature = "cuda")]
pub fn cuda_devices() -> Vec<CudaDevice> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    // The driver library is linked in a CUDA build; without a GPU or driver, init fails.
    if result::init().is_err() {
        return Vec::new();
    }
    let count = result::device::get_count().unwrap_or(0).max(0);
    (0..count)
        .filter_map(|i| {
            let dev = result::device::get(i).ok()?;
            let mut bus = [0 as std::ffi::c_char; 32];
            // SAFETY: the buffer's length is passed, and the driver writes a NUL-terminated id.
            unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, dev) }
                .result()
                .ok()?;
            // SAFETY: NUL-terminated within the buffer, written just above.
            let bus = unsafe { std::ffi::CStr::from_ptr(bus.as_ptr()) };
            let uuid = result::device::get_uuid(dev).ok()?;
            let b: Vec<u8> = uuid.bytes.iter().map(|&x| x as u8).collect();
            let hex = |r: std::ops::Range<usize>| -> String {
                b[r].iter().map(|x| format!("{x:02x}")).collect()
            };
            Some(CudaDevice {
                ordinal: i as usize,
                pci_bus_id: bus.to_string_lossy().into_owned(),
                uuid: format!(
                    "GPU-{}-{}-{}-{}-{}",
                    hex(0..4),
                    hex(4..6),
                    hex(6..8),
                    hex(8..10),
                    hex(10..16)
                ),
                name: result::device::get_name(dev).unwrap_or_default(),
            })
        })
        .collect()
}

/// See the CUDA build's [`cuda_devices`]: a build without CUDA sees none.
#[cfg(not(feature = "cuda"))]
pub fn cuda_devices() -> Vec<CudaDevice> {
    Vec::new()
}

/// Reads the memory of `gpu` through NVML; fails with one line when NVML cannot read it.
pub fn query_gpu(gpu: &Gpu) -> Result<GpuInfo> {
    match gpu.nvml_index {
        Some(i) => query(i),
        None => bail!(
            "cannot read the memory of {}: NVML is not available; pass --vram SIZE",
            gpu.label
        ),
    }
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
        pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_named_by_index_uuid_or_pci_bus_id() {
        let parse = |s: &str| s.parse::<GpuSelector>();
        assert_eq!(parse("1"), Ok(GpuSelector::Index(1)));
        assert_eq!(
            parse("GPU-8F3A1c2e"),
            Ok(GpuSelector::Uuid("gpu-8f3a1c2e".into()))
        );
        // NVML's 8-digit domain, CUDA's 4-digit one, and none at all name one address.
        let pci = PciAddress(0, 0x17, 0, 0);
        for text in ["00000000:17:00.0", "0000:17:00.0", "17:00.0"] {
            assert_eq!(parse(text), Ok(GpuSelector::PciBusId(pci)), "{text}");
        }
        assert_eq!(pci.to_string(), "0000:17:00.0");
        for bad in ["", "gpu", "GPU-", "17:00", "zz:00.0", "-1"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
