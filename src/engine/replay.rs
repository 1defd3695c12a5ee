//! A fixed-shape piece of device work replayed as one CUDA graph: the speech components of a
//! frame are hundreds of small launches whose host cost, not their arithmetic, sets their
//! time. A [`Replay`] owns static copies of the work's inputs; each run copies the new inputs
//! in, launches the graph and copies the results out. Inputs past the fed ones are state the
//! work updates in place (a streaming tokenizer's caches), kept between runs. The replayed
//! kernels are the captured ones with the same arguments, so the results equal the work run
//! directly, bit for bit (`tests/gpu_speech/` checks it).

use super::DeviceChoice;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// The work, captured; see the module doc.
pub struct Replay {
    /// Results, at the graph's fixed addresses (overwritten by each launch). Declared before
    /// the graph: they are freed first.
    outputs: Vec<Tensor>,
    /// Static inputs: the first `fed` copied in by each run, the rest state.
    inputs: Vec<Tensor>,
    fed: usize,
    #[cfg(feature = "cuda")]
    graph: super::cuda::graph::Captured,
}

/// Whether work on `device` can be captured ([`Replay::capture`] gives `None` otherwise): a
/// CUDA device with stream-ordered allocation, in a `cuda` build.
pub fn available(device: &Device) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => super::cuda::graph::supported(dev),
        _ => false,
    }
}

/// Runs `work` with candle's small host-to-device uploads cached by content (on a CUDA
/// device): the dims and strides that candle's kernels take for non-contiguous operands are
/// uploaded from short-lived host memory, which a graph cannot replay, so the work runs once
/// under this cache before its capture, which then reuses the cached copies.
#[cfg(feature = "cuda")]
fn with_cached_uploads<T>(dev: &candle_core::CudaDevice, work: impl FnOnce() -> T) -> T {
    let _cached = dev.enable_cuda_graph_htod_cache();
    work()
}

/// Gives back to the device the memory that CUDA graphs and the stream-ordered allocator keep
/// for reuse once their users are gone, so that a configuration measured after another in one
/// process (the benchmarks) peaks at its own memory. Nothing to do on the CPU.
pub fn release_cached_memory(device: DeviceChoice) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(ordinal) => super::cuda::graph::release_cached_memory(ordinal),
        _ => Ok(()),
    }
}

impl Replay {
    /// Captures `work` on static copies of `inputs` (the first `fed` of them fed by each run,
    /// the rest state that `work` must update in place) and runs it once on them: `Ok(None)`
    /// where the device cannot capture. `work` must queue device work only (no copy to the
    /// host, no host-side value read). It runs once more beforehand, directly, on scratch
    /// copies of the inputs (so the state is not advanced twice), to load its kernels and
    /// cache its uploads.
    pub fn capture(
        inputs: &[&Tensor],
        fed: usize,
        work: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Option<(Replay, Vec<Tensor>)>> {
        let Some(first) = inputs.first() else {
            bail!("a captured replay needs at least one input");
        };
        if fed > inputs.len() || !available(first.device()) {
            return Ok(None);
        }
        let copies = || {
            inputs
                .iter()
                .map(|t| {
                    let s = Tensor::zeros(t.shape(), t.dtype(), t.device())?;
                    s.slice_set(&t.contiguous()?, 0, 0)?;
                    Ok(s)
                })
                .collect::<Result<Vec<_>>>()
        };
        Self::capture_on(copies()?, copies()?, fed, work)
    }

    #[cfg(feature = "cuda")]
    fn capture_on(
        inputs: Vec<Tensor>,
        scratch: Vec<Tensor>,
        fed: usize,
        work: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Option<(Replay, Vec<Tensor>)>> {
        let Device::Cuda(dev) = inputs[0].device() else {
            return Ok(None);
        };
        let (graph, outputs) = with_cached_uploads(dev, || {
            work(&scratch)?;
            drop(scratch);
            super::cuda::graph::capture(dev, || work(&inputs))
        })?;
        let replay = Replay {
            outputs,
            inputs,
            fed,
            graph,
        };
        replay.graph.launch()?;
        let results = replay.results()?;
        Ok(Some((replay, results)))
    }

    #[cfg(not(feature = "cuda"))]
    fn capture_on(
        _inputs: Vec<Tensor>,
        _scratch: Vec<Tensor>,
        _fed: usize,
        _work: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Option<(Replay, Vec<Tensor>)>> {
        Ok(None)
    }

    /// The static inputs (the state ones hold the work's state between runs).
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }

    /// Whether `fed` have the shapes and dtypes of the captured inputs.
    pub fn fits(&self, fed: &[&Tensor]) -> bool {
        fed.len() == self.fed
            && fed
                .iter()
                .zip(&self.inputs)
                .all(|(a, b)| a.shape() == b.shape() && a.dtype() == b.dtype())
    }

    /// Runs the work on `fed` (the captured inputs' shapes and dtypes): its results, copied
    /// out of the graph's buffers.
    pub fn run(&self, fed: &[&Tensor]) -> Result<Vec<Tensor>> {
        if !self.fits(fed) {
            bail!(
                "a captured replay was given inputs {:?}, captured with {:?}",
                fed.iter().map(|t| t.dims()).collect::<Vec<_>>(),
                self.inputs[..self.fed]
                    .iter()
                    .map(|t| t.dims())
                    .collect::<Vec<_>>()
            );
        }
        for (dst, src) in self.inputs.iter().zip(fed) {
            dst.slice_set(&src.contiguous()?, 0, 0)?;
        }
        self.launch()?;
        self.results()
    }

    #[cfg(feature = "cuda")]
    fn launch(&self) -> Result<()> {
        self.graph.launch()
    }

    #[cfg(not(feature = "cuda"))]
    fn launch(&self) -> Result<()> {
        bail!("CUDA graphs need a build with the cuda feature")
    }

    /// Copies of the results, which the next launch would overwrite.
    fn results(&self) -> Result<Vec<Tensor>> {
        self.outputs
            .iter()
            .map(|t| Ok(t.copy()?))
            .collect::<Result<Vec<_>>>()
    }
}
