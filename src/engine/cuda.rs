//! CUDA pieces of the engine: the dequantisation kernel (compiled by NVRTC at first use),
//! pinned host buffers, and the streaming slots with their copy stream and events.

use super::attention::DecodeAttention;
use super::dequant::Dequantize;
use super::matvec::FusedMatVec;
use super::streamer::{CopyTiming, HostLayer};
use crate::dtype::DType as StoredDType;
use anyhow::{anyhow, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaEvent, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Device, Layout, Shape, Tensor};
use std::sync::{Arc, OnceLock};

const MODULE: &str = "vibeoffload_dequant";

/// Decodes float8 E4M3, bf16, f16 or f32 bytes to f32 or bf16, times an optional scale
/// (scalar, per row, or per row and column block). One thread per element.
const KERNELS: &str = r#"
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float f8e4m3(u8 c) {
    u32 s = c >> 7, e = (c >> 3) & 15u, m = c & 7u;
    float v;
    if (e == 15u && m == 7u) v = __int_as_float(0x7fc00000);
    else if (e == 0u) v = (float)m * 0.001953125f;
    else v = __int_as_float((int)(((e + 120u) << 23) | (m << 20)));
    return s ? -v : v;
}

__device__ __forceinline__ float f16f(u16 h) {
    u32 s = (h >> 15) & 1u, e = (h >> 10) & 31u, m = h & 1023u;
    float v;
    if (e == 0u) v = (float)m * 5.9604644775390625e-8f;
    else if (e == 31u) v = __int_as_float((int)(0x7f800000u | (m << 13)));
    else v = __int_as_float((int)(((e + 112u) << 23) | (m << 13)));
    return s ? -v : v;
}

__device__ __forceinline__ u16 to_bf16(float x) {
    u32 b = (u32)__float_as_int(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}

template <int SRC, bool BF16>
__device__ void dequant(const u8* src, void* dst, const float* scale, int has_scale,
                        long long scale_rows, long long blocks, long long cols, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    long long block_width = cols / blocks;
    if (block_width < 1) block_width = 1;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v;
        if (SRC == 0) v = f8e4m3(src[i]);
        else if (SRC == 1) v = __int_as_float((int)(((u32)src[2 * i] | ((u32)src[2 * i + 1] << 8)) << 16));
        else if (SRC == 2) v = f16f((u16)(src[2 * i] | (src[2 * i + 1] << 8)));
        else v = __int_as_float((int)((u32)src[4 * i] | ((u32)src[4 * i + 1] << 8) |
                                      ((u32)src[4 * i + 2] << 16) | ((u32)src[4 * i + 3] << 24)));
        if (has_scale) {
            long long row = i / cols, col = i % cols;
            long long r = scale_rows == 1 ? 0 : row;
            v *= scale[r * blocks + col / block_width];
        }
        if (BF16) ((u16*)dst)[i] = to_bf16(v);
        else ((float*)dst)[i] = v;
    }
}

#define DEQUANT(NAME, SRC, BF16) \
extern "C" __global__ void NAME(const u8* src, void* dst, const float* scale, int has_scale, \
                                long long scale_rows, long long blocks, long long cols, long long n) { \
    dequant<SRC, BF16>(src, dst, scale, has_scale, scale_rows, blocks, cols, n); }

DEQUANT(dequant_f8_bf16, 0, true)
DEQUANT(dequant_bf16_bf16, 1, true)
DEQUANT(dequant_f16_bf16, 2, true)
DEQUANT(dequant_f32_bf16, 3, true)
DEQUANT(dequant_f8_f32, 0, false)
DEQUANT(dequant_bf16_f32, 1, false)
DEQUANT(dequant_f16_f32, 2, false)
DEQUANT(dequant_f32_f32, 3, false)

// Float8 to bf16, eight elements per thread (8-byte loads, 16-byte stores), for the common case:
// n and the row length multiples of 8, the source 8-byte aligned, scale blocks multiples of 8.
extern "C" __global__ void dequant_f8_bf16_x8(const u8* src, u16* dst, const float* scale, int has_scale,
                                              long long scale_rows, long long blocks, long long cols, long long n8) {
    long long stride = (long long)gridDim.x * blockDim.x;
    long long block_width = cols / blocks;
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < n8; g += stride) {
        uint2 p = ((const uint2*)src)[g];
        float s = 1.f;
        if (has_scale) {
            long long i = g * 8, row = i / cols, col = i % cols;
            s = scale[(scale_rows == 1 ? 0 : row) * blocks + col / block_width];
        }
        u32 out[4];
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 word = j < 2 ? p.x : p.y;
            u32 lo = (word >> ((j & 1) * 16)) & 0xffu, hi = (word >> ((j & 1) * 16 + 8)) & 0xffu;
            out[j] = (u32)to_bf16(f8e4m3((u8)lo) * s) | ((u32)to_bf16(f8e4m3((u8)hi) * s) << 16);
        }
        ((uint4*)dst)[g] = make_uint4(out[0], out[1], out[2], out[3]);
    }
}

// y[r, o] = scale * sum_i f8(w[o, i]) * x[r, i] for up to 8 rows of x: one warp per output row,
// 16 weight bytes per lane per step, f32 accumulation, each weight byte read once.
__device__ __forceinline__ float f8fast(u32 c) {
    if ((c & 0x7fu) == 0x7fu) return __int_as_float(0x7fc00000);
    float v = __int_as_float((int)((c & 0x7fu) << 20)) * 1.329227995784916e36f; // 2^120
    return (c & 0x80u) ? -v : v;
}

__device__ __forceinline__ float bf16f(u16 b) { return __int_as_float(((int)b) << 16); }

// Dot products of R rows of x with one float8 weight row; reduced across the warp. R is a
// template parameter so batch-1 decoding keeps one accumulator in registers (fewer registers,
// more warps resident, more loads in flight); two 16-byte weight loads are issued per step.
// (Two weight rows per warp sharing the loads of x measured slower on the H200: 9.09 against
// 7.28 ms/token resident, see RESULTS.md.)
template <int R>
__device__ __forceinline__ void dot_rows(const u8* wr, const u16* x, int rows, int n_in, int lane, float* acc) {
    bool vec = ((((unsigned long long)wr) | ((unsigned long long)x)) & 15ull) == 0 && (n_in & 15) == 0;
    if (vec) {
        for (int k0 = lane * 16; k0 < n_in; k0 += 2 * 32 * 16) {
            int k1 = k0 + 32 * 16;
            uint4 p0 = *(const uint4*)(wr + k0);
            uint4 p1 = k1 < n_in ? *(const uint4*)(wr + k1) : make_uint4(0, 0, 0, 0);
            #pragma unroll
            for (int half = 0; half < 2; half++) {
                int k = half ? k1 : k0;
                if (k >= n_in) break;
                uint4 p = half ? p1 : p0;
                u32 words[4] = {p.x, p.y, p.z, p.w};
                float wv[16];
                #pragma unroll
                for (int j = 0; j < 16; j++) wv[j] = f8fast((words[j >> 2] >> ((j & 3) * 8)) & 0xffu);
                #pragma unroll
                for (int r = 0; r < R; r++) {
                    if (r < rows) {
                        const uint4* xp = (const uint4*)(x + (long long)r * n_in + k);
                        uint4 a = xp[0], b = xp[1];
                        u32 xw[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
                        float s = 0.f;
                        #pragma unroll
                        for (int j = 0; j < 8; j++) {
                            s += wv[2 * j] * __int_as_float((int)(xw[j] << 16));
                            s += wv[2 * j + 1] * __int_as_float((int)(xw[j] & 0xffff0000u));
                        }
                        acc[r] += s;
                    }
                }
            }
        }
    } else {
        for (int k = lane; k < n_in; k += 32) {
            float wv = f8fast(wr[k]);
            #pragma unroll
            for (int r = 0; r < R; r++) if (r < rows) acc[r] += wv * bf16f(x[(long long)r * n_in + k]);
        }
    }
    #pragma unroll
    for (int r = 0; r < R; r++)
        for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
}

__device__ __forceinline__ float seg_scale(const float* s, int mode, int o) {
    return mode == 0 ? 1.f : s[mode == 1 ? 0 : o];
}

// y = [x W0^T | x W1^T | x W2^T] (+ bias) (+ residual), or silu(x W0^T) * (x W1^T) when gated,
// for up to R rows of x. One warp per output feature; each weight byte read once; f32
// accumulation, one rounding.
template <int R>
__device__ void matvec_fused(
        const u16* x, int rows, int n_in,
        const u8* w0, const u8* w1, const u8* w2, int n0, int n1, int n2,
        const float* s0, const float* s1, const float* s2, int m0, int m1, int m2,
        const u16* bias, int has_bias, const u16* res, int has_res, int gated, u16* y) {
    int o = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    int n_out = gated ? n0 : n0 + n1 + n2;
    if (o >= n_out) return;
    float acc[R], acc2[R];
    #pragma unroll
    for (int r = 0; r < R; r++) { acc[r] = 0.f; acc2[r] = 0.f; }
    float scale;
    if (gated) {
        dot_rows<R>(w0 + (long long)o * n_in, x, rows, n_in, lane, acc);
        dot_rows<R>(w1 + (long long)o * n_in, x, rows, n_in, lane, acc2);
        float sg = seg_scale(s0, m0, o), su = seg_scale(s1, m1, o);
        #pragma unroll
        for (int r = 0; r < R; r++) {
            float g = acc[r] * sg;
            acc[r] = g / (1.f + __expf(-g)) * (acc2[r] * su);
        }
        scale = 1.f;
    } else if (o < n0) {
        dot_rows<R>(w0 + (long long)o * n_in, x, rows, n_in, lane, acc);
        scale = seg_scale(s0, m0, o);
    } else if (o < n0 + n1) {
        dot_rows<R>(w1 + (long long)(o - n0) * n_in, x, rows, n_in, lane, acc);
        scale = seg_scale(s1, m1, o - n0);
    } else {
        dot_rows<R>(w2 + (long long)(o - n0 - n1) * n_in, x, rows, n_in, lane, acc);
        scale = seg_scale(s2, m2, o - n0 - n1);
    }
    if (lane != 0) return;
    float b = has_bias ? bf16f(bias[o]) : 0.f;
    #pragma unroll
    for (int r = 0; r < R; r++) {
        if (r < rows) {
            float v = acc[r] * scale + b;
            if (has_res) v += bf16f(res[(long long)r * n_out + o]);
            y[(long long)r * n_out + o] = to_bf16(v);
        }
    }
}

#define MATVEC(NAME, R) \
extern "C" __global__ void NAME( \
        const u16* x, int rows, int n_in, \
        const u8* w0, const u8* w1, const u8* w2, int n0, int n1, int n2, \
        const float* s0, const float* s1, const float* s2, int m0, int m1, int m2, \
        const u16* bias, int has_bias, const u16* res, int has_res, int gated, u16* y) { \
    matvec_fused<R>(x, rows, n_in, w0, w1, w2, n0, n1, n2, s0, s1, s2, m0, m1, m2, \
                    bias, has_bias, res, has_res, gated, y); }

MATVEC(f8_matvec_fused_r1, 1)
MATVEC(f8_matvec_fused_r2, 2)
MATVEC(f8_matvec_fused_r4, 4)
MATVEC(f8_matvec_fused_r8, 8)

// One new token's attention for one (head, batch) per block: scores against the cache in
// shared memory, softmax, weighted sum of values; K/V read in place with their strides.
__device__ float block_reduce(float v, float* red, bool is_max) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float r = red[0];
        for (int w = 1; w < warps; w++) r = is_max ? fmaxf(r, red[w]) : r + red[w];
        red[32] = r;
    }
    __syncthreads();
    float r = red[32];
    __syncthreads();
    return r;
}

extern "C" __global__ void decode_attention_bf16(const u16* q, const u16* k, const u16* v, u16* out,
                                                 int heads, int group, int len, int d, float scale,
                                                 long long kb, long long kh, long long kt,
                                                 long long vb, long long vh, long long vt) {
    extern __shared__ float sh[];
    float* qs = sh;
    float* red = sh + d;
    float* sc = red + 33;
    int h = blockIdx.x, bi = blockIdx.y, kvh = h / group;
    const u16* qh = q + ((long long)bi * heads + h) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = bf16f(qh[i]);
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const u16* kbase = k + bi * kb + kvh * kh;
    for (int j = warp; j < len; j += warps) {
        const u16* kr = kbase + (long long)j * kt;
        float s = 0.f;
        for (int i = lane; i < d; i += 32) s += qs[i] * bf16f(kr[i]);
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) sc[j] = s * scale;
    }
    __syncthreads();
    float m = -3.402823466e38f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, sc[j]);
    m = block_reduce(m, red, true);
    float total = 0.f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = __expf(sc[j] - m);
        sc[j] = e;
        total += e;
    }
    total = block_reduce(total, red, false);
    const u16* vbase = v + bi * vb + kvh * vh;
    u16* o = out + ((long long)bi * heads + h) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < len; j++) acc += sc[j] * bf16f(vbase[(long long)j * vt + i]);
        o[i] = to_bf16(acc / total);
    }
}
// Busy-waits `ns` nanoseconds of the GPU's clock: holds a stream while the host queues work
// behind it (see QueuedTimer).
extern "C" __global__ void hold_stream(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"#;

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(KERNELS)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile the dequantisation kernels: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// The CUDA side of [`Dequantize`].
pub fn dequantize(
    op: &Dequantize,
    (_rows, cols): (usize, usize),
    storage: &CudaStorage,
    layout: &Layout,
    scale: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = storage.device().clone();
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("dequantize: raw bytes must be contiguous".into())
    })?;
    let src = storage.as_cuda_slice::<u8>()?.slice(start..end);
    let n: usize = op.shape.iter().product();
    let src_name = match op.src {
        StoredDType::F8E4M3 => "f8",
        StoredDType::BF16 => "bf16",
        StoredDType::F16 => "f16",
        StoredDType::F32 => "f32",
        other => candle_core::bail!("dequantize: cannot decode {other}"),
    };
    let bf16_out = match op.out {
        candle_core::DType::BF16 => true,
        candle_core::DType::F32 => false,
        other => candle_core::bail!("dequantize: cannot produce {other:?}"),
    };
    let (scale_rows, blocks) = op
        .scale
        .map_or((1, 1), |s| (s.rows as i64, s.blocks as i64));
    // Eight elements per thread where rows, scale blocks and alignment allow it.
    let by_eight = op.src == StoredDType::F8E4M3
        && bf16_out
        && n.is_multiple_of(8)
        && cols.is_multiple_of(8)
        && (cols as i64 / blocks) % 8 == 0
        && start.is_multiple_of(8);
    let name = match by_eight {
        true => "dequant_f8_bf16_x8".to_string(),
        false => format!(
            "dequant_{src_name}_{}",
            if bf16_out { "bf16" } else { "f32" }
        ),
    };
    let func = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
    let per_thread = if by_eight { 8 } else { 1 };
    let (has_scale, cols, n_arg) = (
        i32::from(scale.is_some()),
        cols as i64,
        (n / per_thread) as i64,
    );
    let config = LaunchConfig::for_num_elems((n / per_thread) as u32);
    let scale_view = match scale {
        Some((s, l)) => {
            let (a, b) = l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("dequantize: scales must be contiguous".into())
            })?;
            Some(s.as_cuda_slice::<f32>()?.slice(a..b))
        }
        None => None,
    };
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: `out` is written in full by the kernel before it is read.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut b = func.builder();
            b.arg(&src);
            b.arg(&out);
            match &scale_view {
                Some(v) => b.arg(v),
                // Never read when has_scale is 0.
                None => b.arg(&src),
            };
            b.arg(&has_scale);
            b.arg(&scale_rows);
            b.arg(&blocks);
            b.arg(&cols);
            b.arg(&n_arg);
            // SAFETY: the argument list matches the kernel's signature above.
            unsafe { b.launch(config) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = if bf16_out {
        launch!(half::bf16)
    } else {
        launch!(f32)
    };
    Ok((out, Shape::from(op.shape.clone())))
}

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

fn timing_event(stream: &Arc<CudaStream>) -> Result<CudaEvent> {
    let event = stream
        .context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
    event.record(stream)?;
    Ok(event)
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

    /// Copies `host` into `slot` on the copy stream once the slot's last reader is done.
    pub fn upload(&mut self, slot: usize, host: &HostLayer) -> Result<()> {
        let src = host.bytes.as_slice();
        self.copy.wait(&self.compute_done[slot])?;
        let start = timing_event(&self.copy)?;
        // SAFETY: the slot holds at least `src.len()` bytes (sized for the largest layer), the
        // copy stream waited for every kernel that reads it, and `src` lives as long as the
        // streamer, beyond the copy.
        unsafe { result::memcpy_htod_async(self.pointers[slot], src, self.copy.cu_stream()) }?;
        let end = timing_event(&self.copy)?;
        self.copy_done[slot].record(&self.copy)?;
        self.pending.push(PendingCopy {
            layer: host.layer,
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

    /// Timings of finished copies and waits (blocks until they finish).
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

/// Host-to-device bandwidth from pinned memory in GB/s: one warm-up copy of `bytes`, then five
/// timed with events on a stream of their own.
pub fn pinned_bandwidth_gbps(dev: &CudaDevice, bytes: usize) -> Result<f64> {
    let stream = dev.cuda_stream().context().new_stream()?;
    let host = PinnedBytes::new(dev, bytes)?;
    let target = stream.alloc_zeros::<u8>(bytes)?;
    let (ptr, _record) = target.device_ptr(&stream);
    let copy = || -> Result<()> {
        // SAFETY: `target` holds `bytes` bytes and outlives the copies (synchronized below).
        unsafe { result::memcpy_htod_async(ptr, host.as_slice(), stream.cu_stream()) }?;
        Ok(())
    };
    copy()?;
    let start = timing_event(&stream)?;
    for _ in 0..5 {
        copy()?;
    }
    let end = timing_event(&stream)?;
    let ms = f64::from(start.elapsed_ms(&end)?);
    stream.synchronize()?;
    Ok(5.0 * bytes as f64 / (ms * 1e6))
}

/// Device-memory bandwidth in GB/s (bytes read plus bytes written by device-to-device copies of
/// `bytes`): one warm-up copy, then five timed with events.
pub fn device_bandwidth_gbps(dev: &CudaDevice, bytes: usize) -> Result<f64> {
    let stream = dev.cuda_stream();
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    stream.memcpy_dtod(&src, &mut dst)?;
    let start = timing_event(&stream)?;
    for _ in 0..5 {
        stream.memcpy_dtod(&src, &mut dst)?;
    }
    let end = timing_event(&stream)?;
    let ms = f64::from(start.elapsed_ms(&end)?);
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
        let func = dev.get_or_load_custom_func("hold_stream", MODULE, ptx()?)?;
        let ns = (hold_ms * 1e6) as u64;
        let mut b = func.builder();
        b.arg(&ns);
        let config = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { b.launch(config) }?;
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

/// The CUDA side of [`DecodeAttention`]: bf16 q, K, V; K and V as `(offset, batch, head,
/// position)` strides into their storage.
pub fn decode_attention(
    op: &DecodeAttention,
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    (ko, kb, kh, kt): (usize, usize, usize, usize),
    v: &CudaStorage,
    (vo, vb, vh, vt): (usize, usize, usize, usize),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = q.device().clone();
    let (qa, qb) = lq
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("decode attention: q must be contiguous".into()))?;
    let batch = lq.dims()[0];
    let qs = q.as_cuda_slice::<half::bf16>()?.slice(qa..qb);
    let ks = k.as_cuda_slice::<half::bf16>()?.slice(ko..);
    let vs = v.as_cuda_slice::<half::bf16>()?.slice(vo..);
    let func = dev.get_or_load_custom_func("decode_attention_bf16", MODULE, ptx()?)?;
    let n = batch * op.heads * op.head_dim;
    // SAFETY: each block writes its head's `head_dim` outputs.
    let out = unsafe { dev.alloc::<half::bf16>(n)? };
    let (heads, group, len, d) = (
        op.heads as i32,
        (op.heads / op.kv_heads) as i32,
        op.len as i32,
        op.head_dim as i32,
    );
    let scale = 1.0f32 / (op.head_dim as f32).sqrt();
    let strides = [kb, kh, kt, vb, vh, vt].map(|s| s as i64);
    let mut b = func.builder();
    b.arg(&qs);
    b.arg(&ks);
    b.arg(&vs);
    b.arg(&out);
    b.arg(&heads);
    b.arg(&group);
    b.arg(&len);
    b.arg(&d);
    b.arg(&scale);
    for s in &strides {
        b.arg(s);
    }
    let config = LaunchConfig {
        grid_dim: (op.heads as u32, batch as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: ((op.head_dim + 33 + op.len) * 4) as u32,
    };
    // SAFETY: the argument list matches the kernel's signature; shared memory holds q, the
    // reduction scratch and `len` scores (at most 8192, checked by attention::applies).
    unsafe { b.launch(config) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((batch, op.heads, 1, op.head_dim)),
    ))
}

/// A tensor's CUDA slice, offset by its layout (which must be contiguous).
fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let candle_core::Storage::Cuda(s) = storage else {
        candle_core::bail!("fused matvec: every operand must be on the GPU");
    };
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("fused matvec: operands must be contiguous".into())
    })?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// The CUDA side of [`FusedMatVec`]: bf16 activations, float8 weights, bf16 output.
pub fn fused_matvec(
    op: &FusedMatVec,
    x: &CudaStorage,
    lx: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (xa, xb) = lx
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused matvec: x must be contiguous".into()))?;
    let xs = x.as_cuda_slice::<half::bf16>()?.slice(xa..xb);
    let n_in = op.in_features;
    let rows = (xb - xa) / n_in;
    if rows > super::matvec::MATVEC_MAX_ROWS || op.segments.is_empty() || op.segments.len() > 3 {
        candle_core::bail!("fused matvec: {rows} rows, {} weights", op.segments.len());
    }
    // Every operand's storage stays locked (read) until the launch is queued.
    let weights: Vec<_> = op
        .segments
        .iter()
        .map(|s| s.bytes.storage_and_layout())
        .collect();
    let scales: Vec<_> = op
        .segments
        .iter()
        .map(|s| s.scale.as_ref().map(|t| t.storage_and_layout()))
        .collect();
    let bias = op.bias.as_ref().map(|t| t.storage_and_layout());
    let residual = op.residual.as_ref().map(|t| t.storage_and_layout());
    let w_views = weights
        .iter()
        .map(|(s, l)| cuda_view::<u8>(s, l))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let s_views = scales
        .iter()
        .map(|g| g.as_ref().map(|(s, l)| cuda_view::<f32>(s, l)).transpose())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let b_view = bias
        .as_ref()
        .map(|(s, l)| cuda_view::<half::bf16>(s, l))
        .transpose()?;
    let r_view = residual
        .as_ref()
        .map(|(s, l)| cuda_view::<half::bf16>(s, l))
        .transpose()?;

    let n_out = op.out_features();
    // The kernel instantiated for the fewest accumulators that hold `rows`.
    let name = match rows {
        1 => "f8_matvec_fused_r1",
        2 => "f8_matvec_fused_r2",
        3 | 4 => "f8_matvec_fused_r4",
        _ => "f8_matvec_fused_r8",
    };
    let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
    // SAFETY: every element of `y` is written by lane 0 of its feature's warp.
    let y = unsafe { dev.alloc::<half::bf16>(rows * n_out)? };
    let mut n = [0i32; 3];
    let mut modes = [0i32; 3];
    for (i, seg) in op.segments.iter().enumerate() {
        n[i] = seg.rows as i32;
        modes[i] = match seg.scale.as_ref().map(|s| s.elem_count()) {
            None => 0,
            Some(1) => 1,
            Some(_) => 2,
        };
    }
    let (rows_arg, in_arg) = (rows as i32, n_in as i32);
    let (has_bias, has_res, gated) = (
        i32::from(b_view.is_some()),
        i32::from(r_view.is_some()),
        i32::from(op.gated),
    );
    let mut b = func.builder();
    b.arg(&xs);
    b.arg(&rows_arg);
    b.arg(&in_arg);
    // Absent weights, scales, bias and residual are never read; x stands in for their pointers.
    for i in 0..3 {
        match w_views.get(i) {
            Some(v) => b.arg(v),
            None => b.arg(&xs),
        };
    }
    for v in &n {
        b.arg(v);
    }
    for i in 0..3 {
        match s_views.get(i).and_then(Option::as_ref) {
            Some(v) => b.arg(v),
            None => b.arg(&xs),
        };
    }
    for m in &modes {
        b.arg(m);
    }
    match &b_view {
        Some(v) => b.arg(v),
        None => b.arg(&xs),
    };
    b.arg(&has_bias);
    match &r_view {
        Some(v) => b.arg(v),
        None => b.arg(&xs),
    };
    b.arg(&has_res);
    b.arg(&gated);
    b.arg(&y);
    // One warp per output feature.
    let threads = 256u32;
    let config = LaunchConfig {
        grid_dim: ((n_out as u32 * 32).div_ceil(threads), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { b.launch(config) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev),
        Shape::from((rows, n_out)),
    ))
}
