//! Measurements `bench` reports: pinned host-to-device and device-memory bandwidth, and
//! [`QueuedTimer`], which times queued GPU work without the cost of launching it.

use super::launch::RawArgs;
use super::slots::PinnedBytes;
use super::{timing_event, Module};
use anyhow::Result;
use candle_core::cuda_backend::cudarc::driver::{
    result, CudaEvent, CudaStream, DevicePtr, LaunchConfig,
};
use candle_core::cuda_backend::CudaDevice;
use std::sync::Arc;

/// Milliseconds that five runs of `copy` take on `stream`, after one warm-up run, timed with
/// events.
fn time_five(stream: &Arc<CudaStream>, mut copy: impl FnMut() -> Result<()>) -> Result<f64> {
    copy()?;
    let start = timing_event(stream)?;
    for _ in 0..5 {
        copy()?;
    }
    let end = timing_event(stream)?;
    Ok(f64::from(start.elapsed_ms(&end)?))
}

/// Host-to-device bandwidth from pinned memory in GB/s, copying `bytes` on a stream of its own.
pub fn pinned_bandwidth_gbps(dev: &CudaDevice, bytes: usize) -> Result<f64> {
    let stream = dev.cuda_stream().context().new_stream()?;
    let host = PinnedBytes::new(dev, bytes)?;
    let target = stream.alloc_zeros::<u8>(bytes)?;
    let (ptr, _record) = target.device_ptr(&stream);
    let ms = time_five(&stream, || {
        // SAFETY: `target` holds `bytes` bytes and outlives the copies (time_five waits for
        // the last).
        unsafe { result::memcpy_htod_async(ptr, host.as_slice(), stream.cu_stream()) }?;
        Ok(())
    })?;
    Ok(5.0 * bytes as f64 / (ms * 1e6))
}

/// Runs `f` on the host while `dev`'s copy engine copies `bytes` of pinned memory to the
/// device back to back `copies` times, as it does while hybrid decoding streams layers: the
/// host's rates under that load (both read host memory).
pub fn while_copying<T>(
    dev: &CudaDevice,
    bytes: usize,
    copies: usize,
    f: impl FnOnce() -> T,
) -> Result<T> {
    let stream = dev.cuda_stream().context().new_stream()?;
    let host = PinnedBytes::new(dev, bytes)?;
    let target = stream.alloc_zeros::<u8>(bytes)?;
    let (ptr, _record) = target.device_ptr(&stream);
    for _ in 0..copies {
        // SAFETY: `target` holds `bytes` bytes; both buffers outlive the copies (the stream
        // is synchronised below).
        unsafe { result::memcpy_htod_async(ptr, host.as_slice(), stream.cu_stream()) }?;
    }
    let out = f();
    stream.synchronize()?;
    Ok(out)
}

/// Device-memory bandwidth in GB/s: bytes read plus bytes written by device-to-device copies
/// of `bytes`.
pub fn device_bandwidth_gbps(dev: &CudaDevice, bytes: usize) -> Result<f64> {
    let stream = dev.cuda_stream();
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    let ms = time_five(&stream, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * 5.0 * bytes as f64 / (ms * 1e6))
}

/// Times the GPU work queued between [`QueuedTimer::start`] and [`QueuedTimer::finish`] with
/// the cost of launching it hidden: a kernel holds the stream while the host queues the work
/// behind it, so the GPU then runs it back to back.
pub struct QueuedTimer {
    stream: Arc<CudaStream>,
    start: CudaEvent,
    queued: std::time::Instant,
    hold_ms: f64,
}

impl QueuedTimer {
    /// Holds `dev`'s stream for `hold_ms` and starts timing behind the hold.
    pub fn start(dev: &CudaDevice, hold_ms: f64) -> Result<QueuedTimer> {
        let stream = dev.cuda_stream();
        // Nothing here allocates, which would make the context current.
        stream.context().bind_to_thread()?;
        let func = Module::Dequant.func(dev, "hold_stream")?;
        let ns = (hold_ms * 1e6) as u64;
        let config = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // The argument matches the kernel's signature (hold.cu).
        RawArgs::default()
            .u64(ns)
            .launch(dev, &func, config, false)?;
        let start = timing_event(&stream)?;
        Ok(QueuedTimer {
            stream,
            start,
            queued: std::time::Instant::now(),
            hold_ms,
        })
    }

    /// GPU milliseconds of the work queued since `start`, and the host milliseconds it took
    /// to queue it; the GPU figure is `None` when queuing outlasted the hold (it would then
    /// include the host's gaps).
    pub fn finish(self) -> Result<(Option<f64>, f64)> {
        let host_ms = self.queued.elapsed().as_secs_f64() * 1e3;
        let end = timing_event(&self.stream)?;
        let gpu_ms = f64::from(self.start.elapsed_ms(&end)?);
        Ok(((host_ms < self.hold_ms).then_some(gpu_ms), host_ms))
    }
}
