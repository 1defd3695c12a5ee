//! CUDA graphs of the device's stream: the launches of a piece of work captured once and
//! replayed with one call, so their host cost (candle's per-op allocation and launch, ~10-25
//! us each) is paid once instead of on every frame. The temporaries a captured run allocates
//! become the graph's own allocation nodes (stream-ordered allocation is required), at fixed
//! addresses for the graph's lifetime; the results it leaves allocated are freed and made
//! again by each launch (auto-free on launch), at the same addresses.

use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext, CudaGraph};
use candle_core::cuda_backend::CudaDevice;

/// A captured graph, replayed on the stream it was captured from.
pub struct Captured(CudaGraph);

/// Whether `dev`'s work can be captured: its allocations must be stream-ordered
/// (`cuMemAllocAsync`), so that the temporaries of a captured run become graph nodes.
pub fn supported(dev: &CudaDevice) -> bool {
    dev.cuda_stream().context().has_async_alloc()
}

/// Captures what `work` queues on `dev`'s stream (none of it runs now) into a graph. The
/// capture is relaxed: other threads' allocations and copies go on as usual. Where `work`
/// fails, the capture is ended and its error returned.
pub fn capture<T>(
    dev: &CudaDevice,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(Captured, T)> {
    let stream = dev.cuda_stream();
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    let result = work();
    let flags = sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
    let graph = stream.end_capture(flags);
    let value = result?;
    let graph = graph?.ok_or_else(|| anyhow::anyhow!("the CUDA graph capture recorded nothing"))?;
    Ok((Captured(graph), value))
}

impl Captured {
    /// Queues one replay on the stream it was captured from.
    pub fn launch(&self) -> anyhow::Result<()> {
        Ok(self.0.launch()?)
    }
}

/// Gives the memory that graphs and the stream-ordered allocator keep for reuse, once nothing
/// holds it, back to device `ordinal` (after the device finishes its work).
pub fn release_cached_memory(ordinal: usize) -> anyhow::Result<()> {
    let ctx = CudaContext::new(ordinal)?;
    ctx.synchronize()?;
    let device = ctx.cu_device();
    // SAFETY: plain driver calls on a device whose primary context `ctx` keeps current.
    unsafe {
        sys::cuDeviceGraphMemTrim(device).result()?;
        let mut pool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, device).result()?;
        sys::cuMemPoolTrimTo(pool, 0).result()?;
    }
    Ok(())
}
