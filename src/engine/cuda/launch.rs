//! The one way the engine launches its kernels: arguments by value in [`RawArgs`], queued with
//! `cuLaunchKernelEx` on the device's stream, with programmatic dependent launch where the
//! caller allows it and the device has it.

use super::has_pdl;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaStream, DevicePtr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};

/// Kernel arguments by value, each in an 8-byte slot (4-byte ones in its low half).
#[derive(Default)]
pub(super) struct RawArgs(Vec<[u8; 8]>);

impl RawArgs {
    /// A device pointer (waits for the buffer's last write on `stream` where cudarc tracks it).
    pub(super) fn ptr<T>(&mut self, view: &impl DevicePtr<T>, stream: &CudaStream) -> &mut Self {
        let (ptr, _record) = view.device_ptr(stream);
        self.u64(ptr)
    }

    /// `view`'s pointer, or `stand_in`'s where there is no `view` (for operands the kernel
    /// then never reads).
    pub(super) fn ptr_or<T, U>(
        &mut self,
        view: Option<&impl DevicePtr<T>>,
        stand_in: &impl DevicePtr<U>,
        stream: &CudaStream,
    ) -> &mut Self {
        match view {
            Some(v) => self.ptr(v, stream),
            None => self.ptr(stand_in, stream),
        }
    }

    /// `view`'s pointer, or null (for kernels that tell an absent operand by a null pointer).
    pub(super) fn ptr_or_null<T>(
        &mut self,
        view: Option<&impl DevicePtr<T>>,
        stream: &CudaStream,
    ) -> &mut Self {
        match view {
            Some(v) => self.ptr(v, stream),
            None => self.u64(0),
        }
    }

    /// A 64-bit integer (`long long` and `unsigned long long` parameters).
    pub(super) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.push(v.to_le_bytes());
        self
    }

    /// A 32-bit integer (`int` and `unsigned` parameters).
    pub(super) fn i32(&mut self, v: i32) -> &mut Self {
        let mut slot = [0u8; 8];
        slot[..4].copy_from_slice(&v.to_le_bytes());
        self.0.push(slot);
        self
    }

    /// A `float`.
    pub(super) fn f32(&mut self, v: f32) -> &mut Self {
        self.i32(v.to_bits() as i32)
    }

    /// Launches `func` (of a module candle keeps loaded) on `dev`'s stream with these
    /// arguments, which must match the kernel's parameters in order and size; `overlap` lets
    /// it start during the previous kernel (programmatic dependent launch, where the device has
    /// it), so the kernel must then wait (`pdl_wait_previous`) before it reads what earlier
    /// kernels wrote. The device's context must be current on this thread, as it is once
    /// candle has allocated on `dev` from it (the watch and hold launchers bind it first);
    /// binding it here would add a driver call to every launch.
    pub(super) fn launch(
        &mut self,
        dev: &CudaDevice,
        func: &CudaFunction,
        config: LaunchConfig,
        overlap: bool,
    ) -> candle_core::Result<()> {
        self.launch_clustered(dev, func, config, overlap, 1)
    }

    /// [`RawArgs::launch`] in clusters of `cluster` blocks along the grid's y (sm_90; 1 for
    /// none), which must divide it.
    pub(super) fn launch_clustered(
        &mut self,
        dev: &CudaDevice,
        func: &CudaFunction,
        config: LaunchConfig,
        overlap: bool,
        cluster: u32,
    ) -> candle_core::Result<()> {
        let stream = dev.cuda_stream();
        let mut params: Vec<*mut std::ffi::c_void> = self
            .0
            .iter_mut()
            .map(|slot| slot.as_mut_ptr().cast())
            .collect();
        // SAFETY: zero is a valid bit pattern for this plain C struct.
        let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut count = 0;
        if overlap && has_pdl(dev) {
            attrs[count].id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[count].value.programmaticStreamSerializationAllowed = 1;
            count += 1;
        }
        if cluster > 1 {
            attrs[count].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attrs[count].value.clusterDim.x = 1;
            attrs[count].value.clusterDim.y = cluster;
            attrs[count].value.clusterDim.z = 1;
            count += 1;
        }
        let cfg = sys::CUlaunchConfig {
            gridDimX: config.grid_dim.0,
            gridDimY: config.grid_dim.1,
            gridDimZ: config.grid_dim.2,
            blockDimX: config.block_dim.0,
            blockDimY: config.block_dim.1,
            blockDimZ: config.block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: count as u32,
        };
        // SAFETY: `params` point at one value per kernel parameter, in order and of its size
        // (each caller matches its kernel's signature), alive until the launch is queued; the
        // buffers they name are held by the caller's storage guards for as long.
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .w()
    }
}
