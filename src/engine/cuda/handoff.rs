//! Hybrid decoding's hand-over of hidden states between the GPU and the host CPU, through one
//! mapped pinned buffer that kernels read and write directly (`kernels/handoff.cu`): no
//! staging copy and no place in the copy engine's queue, which the streamed layers' copies
//! keep busy. (It was built on the guess that a small copy waited behind a layer's; measured
//! on the H200, ms/token did not move: RESULTS.md, 7d1e3dc.)

use super::launch::RawArgs;
use super::{cuda_view, Module};
use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::driver::{sys, LaunchConfig, PinnedHostSlice};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{DType, Device, Shape, Storage, Tensor};

/// Threads per block of the hand-over kernels.
const THREADS: usize = 256;

/// The hand-over buffer of one engine.
pub struct Handoff {
    slice: PinnedHostSlice<f32>,
    ptr: *mut f32,
    dev: CudaDevice,
    /// An upload's kernel may still be reading the buffer (none since the last wait).
    reading: bool,
}

// SAFETY: the pointer is owned by `slice` (Send and Sync); it is written by the host only
// through `&mut self`, once no kernel reads it: `download` synchronises the stream before
// handing values back, and `upload` waits for the previous upload's kernel (`reading`).
unsafe impl Send for Handoff {}
unsafe impl Sync for Handoff {}

impl Handoff {
    /// A buffer of `len` f32 values (the largest hidden state handed over) on `dev`.
    pub fn new(dev: &CudaDevice, len: usize) -> Result<Handoff> {
        let ctx = dev.cuda_stream().context().clone();
        // SAFETY: every value is written (by a kernel or the host) before it is read.
        let mut slice = unsafe {
            ctx.alloc_pinned_with_flags::<f32>(len.max(1), sys::CU_MEMHOSTALLOC_DEVICEMAP)
        }
        .map_err(|e| anyhow!("cannot pin the hand-over buffer: {e}"))?;
        let ptr = slice
            .as_mut_ptr()
            .map_err(|e| anyhow!("hand-over buffer: {e}"))?;
        Ok(Handoff {
            slice,
            ptr,
            dev: dev.clone(),
            reading: false,
        })
    }

    fn check(&self, n: usize) -> Result<()> {
        if !self.takes(n) {
            bail!(
                "hand-over of {n} values, beyond the buffer's {}",
                self.slice.len()
            );
        }
        Ok(())
    }

    /// Whether `n` values fit the buffer.
    pub fn takes(&self, n: usize) -> bool {
        n <= self.slice.len()
    }

    fn launch(&self, name: &str, args: &mut RawArgs, n: usize) -> Result<()> {
        let func = Module::Dequant.func(&self.dev, name)?;
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(THREADS) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok(args.launch(&self.dev, &func, config, false)?)
    }

    /// `x` (bf16 on this device) as an f32 tensor on the CPU, once the work queued before it
    /// is done.
    pub fn download(&mut self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if x.dtype() != DType::BF16 {
            bail!(
                "hand-over: the GPU's hidden states are bf16, not {:?}",
                x.dtype()
            );
        }
        let n = x.elem_count();
        self.check(n)?;
        let stream = self.dev.cuda_stream();
        {
            let (storage, layout) = x.storage_and_layout();
            let src = cuda_view::<half::bf16>(&storage, layout)?;
            let mut args = RawArgs::default();
            args.ptr(&src, &stream).u64(self.ptr as u64).i32(n as i32);
            // The arguments match handoff_to_host's signature.
            self.launch("handoff_to_host", &mut args, n)?;
        }
        stream.synchronize()?;
        self.reading = false;
        // SAFETY: the kernel that wrote these `n` values has finished (synchronised above).
        let values = unsafe { std::slice::from_raw_parts(self.ptr, n) }.to_vec();
        Ok(Tensor::from_vec(values, x.shape(), &Device::Cpu)?)
    }

    /// `x` (f32 on the CPU) as bf16 on this device; queued, not waited for.
    pub fn upload(&mut self, x: &Tensor) -> Result<Tensor> {
        let values = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let n = values.len();
        self.check(n)?;
        let stream = self.dev.cuda_stream();
        // Several lanes come back one after another: the last one's kernel must be done
        // reading before the buffer is written again.
        if self.reading {
            stream.synchronize()?;
        }
        // SAFETY: no kernel reads the buffer now (the stream was synchronised since the last
        // upload's kernel, here or by a download).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n) }.copy_from_slice(&values);
        self.reading = true;
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { self.dev.alloc::<half::bf16>(n)? };
        let mut args = RawArgs::default();
        args.u64(self.ptr as u64).ptr(&out, &stream).i32(n as i32);
        // The arguments match handoff_to_device's signature.
        self.launch("handoff_to_device", &mut args, n)?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            Shape::from(x.dims()),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}
