//! Streaming memory: page-locked host buffers for the packed layers, and the device slots they
//! are copied into on a copy stream of their own, with the events that order copies and
//! compute both ways.

use super::timing_event;
use crate::engine::streamer::CopyTiming;
use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaEvent, CudaStream, DevicePtr, PinnedHostSlice,
};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// Page-locked host memory for one packed layer.
pub struct PinnedBytes {
    slice: PinnedHostSlice<u8>,
    ptr: *mut u8,
}

// SAFETY: the pointer is owned by `slice` (which is Send and Sync) and only read or written
// through `&self` / `&mut self`.
unsafe impl Send for PinnedBytes {}
unsafe impl Sync for PinnedBytes {}

impl PinnedBytes {
    /// Allocates `size` bytes of plain (not write-combined) pinned memory.
    pub fn new(dev: &CudaDevice, size: usize) -> Result<PinnedBytes> {
        let ctx = dev.cuda_stream().context().clone();
        // SAFETY: the memory is filled by the caller before any copy reads it.
        let mut slice = unsafe { ctx.alloc_pinned_with_flags::<u8>(size.max(1), 0) }
            .map_err(|e| anyhow!("cannot pin {size} bytes of host memory: {e}"))?;
        let ptr = slice
            .as_mut_ptr()
            .map_err(|e| anyhow!("pinned memory: {e}"))?;
        Ok(PinnedBytes { slice, ptr })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` bytes owned by `slice`; copies only read them.
        unsafe { std::slice::from_raw_parts(self.ptr, self.slice.len()) }
    }

    /// The bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` excludes copies in flight from this thread's view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.slice.len()) }
    }
}

struct PendingCopy {
    layer: usize,
    bytes: u64,
    start: CudaEvent,
    end: CudaEvent,
}

/// Device slots, a copy stream, and the events that order copies and compute both ways.
pub struct CudaSlots {
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    tensors: Vec<Tensor>,
    pointers: Vec<sys::CUdeviceptr>,
    copy_done: Vec<CudaEvent>,
    compute_done: Vec<CudaEvent>,
    pending: Vec<PendingCopy>,
    waits: Vec<(CudaEvent, CudaEvent)>,
}

impl CudaSlots {
    /// `count` slots of `bytes` bytes each on `dev`.
    pub fn new(dev: &CudaDevice, count: usize, bytes: usize) -> Result<CudaSlots> {
        let compute = dev.cuda_stream();
        let ctx = compute.context().clone();
        let copy = ctx.new_stream()?;
        let mut tensors = Vec::with_capacity(count);
        let mut pointers = Vec::with_capacity(count);
        for i in 0..count {
            let t = Tensor::zeros(bytes, candle_core::DType::U8, &Device::Cuda(dev.clone()))
                .map_err(|e| anyhow!("cannot allocate streaming slot {i} ({bytes} bytes): {e}"))?;
            let ptr = {
                let (storage, _) = t.storage_and_layout();
                let candle_core::Storage::Cuda(s) = &*storage else {
                    unreachable!("allocated on CUDA");
                };
                let (ptr, _record) = s.as_cuda_slice::<u8>()?.device_ptr(&copy);
                ptr
            };
            tensors.push(t);
            pointers.push(ptr);
        }
        let events = |n: usize| -> Result<Vec<CudaEvent>> {
            (0..n).map(|_| Ok(ctx.new_event(None)?)).collect()
        };
        Ok(CudaSlots {
            copy_done: events(count)?,
            compute_done: events(count)?,
            compute,
            copy,
            tensors,
            pointers,
            pending: Vec::new(),
            waits: Vec::new(),
        })
    }

    /// Copies layer `layer`'s packed bytes `src` into `slot` on the copy stream once the slot's
    /// last reader is done.
    ///
    /// # Safety
    ///
    /// `src` must stay alive and unchanged until the copy has finished (the streamer's host
    /// layers live as long as the streamer, and [`CudaSlots::drain`] waits for every copy).
    pub unsafe fn upload(&mut self, slot: usize, layer: usize, src: &[u8]) -> Result<()> {
        self.copy.wait(&self.compute_done[slot])?;
        let start = timing_event(&self.copy)?;
        // SAFETY: the slot holds at least `src.len()` bytes (sized for the largest layer), the
        // copy stream waited for every kernel that reads it, and `src` outlives the copy (this
        // function's contract).
        unsafe { result::memcpy_htod_async(self.pointers[slot], src, self.copy.cu_stream()) }?;
        let end = timing_event(&self.copy)?;
        self.copy_done[slot].record(&self.copy)?;
        self.pending.push(PendingCopy {
            layer,
            bytes: src.len() as u64,
            start,
            end,
        });
        Ok(())
    }

    /// Makes the compute stream wait for the slot's copy, timing the wait.
    pub fn wait(&mut self, slot: usize) -> Result<()> {
        let before = timing_event(&self.compute)?;
        self.compute.wait(&self.copy_done[slot])?;
        let after = timing_event(&self.compute)?;
        self.waits.push((before, after));
        Ok(())
    }

    /// Marks the slot free once the compute issued so far is done.
    pub fn release(&mut self, slot: usize) -> Result<()> {
        Ok(self.compute_done[slot].record(&self.compute)?)
    }

    /// Number of slots.
    pub(crate) fn len(&self) -> usize {
        self.tensors.len()
    }

    /// The slot's bytes as a U8 tensor.
    pub fn tensor(&self, slot: usize) -> Tensor {
        self.tensors[slot].clone()
    }

    /// Each finished copy, and the time the compute stream waited for copies, in ms (blocks
    /// until they finish).
    pub fn drain(&mut self) -> Result<(Vec<CopyTiming>, f64)> {
        let mut timings = Vec::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            timings.push(CopyTiming {
                layer: p.layer,
                bytes: p.bytes,
                copy_ms: f64::from(p.start.elapsed_ms(&p.end)?),
            });
        }
        let mut wait_ms = 0.0;
        for (a, b) in self.waits.drain(..) {
            wait_ms += f64::from(a.elapsed_ms(&b)?);
        }
        Ok((timings, wait_ms))
    }
}
