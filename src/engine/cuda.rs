//! CUDA pieces of the engine: the kernels (compiled by NVRTC at first use: dequantisation for
//! any GPU, the decode path's for the device's architecture), pinned host buffers, the
//! streaming slots with their copy stream and events, and the bandwidth and queued-time
//! measurements `bench` reports.

use super::attention::DecodeAttention;
use super::cache::StoreKv;
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
/// (scalar, per row, or per row and column block), one thread per element; and the kernel
/// that holds a stream for [`QueuedTimer`].
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

// Lowers `*watch` to `tag` when any of the n values (bf16 when BF16, else f32) is NaN or
// infinite (see engine::watch).
template <bool BF16>
__device__ void watch(const void* x, long long n, unsigned* word, unsigned tag) {
    long long stride = (long long)gridDim.x * blockDim.x;
    bool bad = false;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (BF16) bad |= (((const u16*)x)[i] & 0x7f80u) == 0x7f80u;
        else bad |= (((const u32*)x)[i] & 0x7f800000u) == 0x7f800000u;
    }
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicMin(word, tag);
}

extern "C" __global__ void watch_bf16(const u16* x, long long n, unsigned* word, unsigned tag) {
    watch<true>(x, n, word, tag);
}

extern "C" __global__ void watch_f32(const float* x, long long n, unsigned* word, unsigned tag) {
    watch<false>(x, n, word, tag);
}

// Busy-waits `ns` nanoseconds of the GPU's clock: holds a stream while the host queues work
// behind it (see QueuedTimer).
extern "C" __global__ void hold_stream(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"#;

const DECODE_MODULE: &str = "vibeoffload_decode";

/// The decode path's kernels, compiled for the device's architecture: the KV store, decode
/// attention and, on sm_80 and newer, the float8 matrix-vector kernel on tensor cores; their
/// launches overlap on sm_90 (programmatic dependent launch). The matvec has one block per 16
/// output features: its warps split the input features, each step multiplying a 16 x 64 tile
/// of float8 weights (decoded to bf16 in registers) by up to 8 rows of x (bf16) with
/// `mma.sync` and f32 accumulation; the warps' sums meet in shared memory, where scale, bias,
/// residual and the gate are applied. Each weight byte is read once, with loads that bypass L1.
///
/// Range. Qwen2-family checkpoints carry activations far beyond float16's 65,504 (MLP
/// intermediates near 1e5, residual channels near 3e4, large attention logits), so no value on
/// the activation side is ever narrowed to f16. Every narrowing of the GPU path, and why it
/// cannot overflow:
/// - matvec weights: float8 E4M3 to bf16 is exact (3 mantissa bits, exponents 2^-9..2^8),
///   held as value x 2^-120 (bits moved, no arithmetic);
/// - matvec inputs: bf16 as stored, or normalised in f32 and rounded to bf16, whose range is
///   f32's, times 2^64 (exact; overflows only past 1.8e19, which the watch would report);
///   products and sums in f32 at 2^-56 of their value (underflow only below 1e-21), the output
///   rounded to bf16 (f32's range again). The sum of squares of the fused RMSNorm is f32: it
///   overflows only for inputs past ~1e17;
/// - silu(g) * u in f32: `exp(-g)` may become infinite for g < -88, and g / (1 + inf) is the
///   right limit, -0;
/// - decode attention: q . k, the scores, their softmax (max subtracted first) and the
///   weighted sum of values in f32, from bf16 q, K and V; the output rounded to bf16;
/// - the KV store rotates keys in f32 and stores bf16; the residual stream is bf16;
/// - prefill (more than 8 rows) decodes weights to bf16 (times their f32 scale, rounded to
///   bf16) and multiplies with cuBLAS in bf16 with f32 accumulation; its attention scores come
///   out of that product in bf16 (f32's range, 2^-8 relative precision, as the original's
///   eager attention) and their softmax runs in f32; RMSNorm (candle) sums in f32.
/// The CPU path computes in f32 throughout. A value that does become NaN or infinite is
/// caught by the engine's watch (see `Watch`), never passed on as a result.
const DECODE_KERNELS: &str = r#"
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define WARPS 8

__device__ __forceinline__ float bf16f(u32 b) { return __int_as_float((int)(b << 16)); }

__device__ __forceinline__ u16 to_bf16(float x) {
    u32 b = (u32)__float_as_int(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}

// Programmatic dependent launch (sm_90): a kernel lets the next one start once all its
// blocks run, and the next one waits for it only where it reads its results, so the weights a
// kernel streams can load during the tail of the kernel before.
__device__ __forceinline__ void pdl_launch_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait_previous() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

#if __CUDA_ARCH__ >= 800
// Float8 E4M3 to bf16 by moving bits, two codes per bf16x2: `prmt` puts each code in the low
// byte of a 16-bit lane with its sign replicated above it, a shift and a mask leave sign,
// exponent and mantissa where a bf16's go. That reads as the code's value times 2^-120, exactly
// (subnormal codes become bf16 subnormals, which the tensor cores take as they are); the epilogue
// undoes the factor (UNSCALE). NaN codes read as 480.
__device__ __forceinline__ u32 f8_bf16(u32 w, u32 sel) {
    u32 t;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(t) : "r"(w), "r"(0u), "r"(sel));
    return (t << 4) & 0x87f087f0u;
}

// Bytes 0 and 2 of `w` (byte 0 in the low half); bytes 1 and 3.
__device__ __forceinline__ u32 f8_even(u32 w) { return f8_bf16(w, 0xa280u); }
__device__ __forceinline__ u32 f8_odd(u32 w) { return f8_bf16(w, 0xb391u); }

// x enters the products times 2^64 (exact, a power of two) so that with the weights' 2^-120
// the products sit at 2^-56 of their value: far from f32's underflow for any product above
// 1e-21, and x overflows only past 1.8e19. The sum is multiplied back by 2^56.
#define X_SCALE 18446744073709551616.0f
#define X_SCALE_BF16X2 0x5f805f80u
#define UNSCALE 72057594037927936.0f

__device__ __forceinline__ u32 scale_x(u32 v) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(v), "r"(X_SCALE_BF16X2), "r"(0x80008000u));
    return d;
}

// Two f32 as bf16x2 (`lo` in the low half), rounded to nearest.
__device__ __forceinline__ u32 bf2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ uint4 load_stream(const u8* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 16 x 64 weight tile (rows g and g + 8 of w, 16 bytes each at this lane's k) times the
// lane's 16 x values, as four m16n8k16 products. Each product takes one 4-byte word of each
// row: its bytes 0 and 2 as one k pair, 1 and 3 as the other; x comes paired the same way
// (see load_x), which leaves the dot products unchanged.
__device__ __forceinline__ void tile(float* c, uint4 lo, uint4 hi, const u32* xb) {
    u32 a[4] = {lo.x, lo.y, lo.z, lo.w}, b[4] = {hi.x, hi.y, hi.z, hi.w};
    #pragma unroll
    for (int j = 0; j < 4; j++)
        mma(c, f8_even(a[j]), f8_even(b[j]), f8_odd(a[j]), f8_odd(b[j]), xb[2 * j], xb[2 * j + 1]);
}

__device__ __forceinline__ void load8(u32* w, const u16* p) {
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}

// The lane's 16 x values of row g (zero beyond the rows) times X_SCALE as eight bf16x2, paired
// as `tile` pairs the weights: elements (4j, 4j + 2) in xb[2j], (4j + 1, 4j + 3) in xb[2j + 1].
// RMS-normalised (times `inv`, the row's 1/rms times X_SCALE, and the norm weight `nw`) in f32
// first when `nw` is given; otherwise x's own bf16 values, scaled exactly.
__device__ __forceinline__ void load_x(u32* xb, const u16* x, int g, int rows, int n_in, int k,
                                       const u16* nw, float inv) {
    if (g < rows) {
        const u16* p = x + (long long)g * n_in + k;
        u32 w[8], n[8];
        load8(w, p);
        load8(w + 4, p + 8);
        if (nw) {
            load8(n, nw + k);
            load8(n + 4, nw + k + 8);
            float v[16];
            #pragma unroll
            for (int i = 0; i < 8; i++) {
                v[2 * i] = bf16f(w[i] & 0xffffu) * inv * bf16f(n[i] & 0xffffu);
                v[2 * i + 1] = bf16f(w[i] >> 16) * inv * bf16f(n[i] >> 16);
            }
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                xb[2 * j] = bf2(v[4 * j], v[4 * j + 2]);
                xb[2 * j + 1] = bf2(v[4 * j + 1], v[4 * j + 3]);
            }
        } else {
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                xb[2 * j] = scale_x(__byte_perm(w[2 * j], w[2 * j + 1], 0x5410));
                xb[2 * j + 1] = scale_x(__byte_perm(w[2 * j], w[2 * j + 1], 0x7632));
            }
        }
    } else {
        #pragma unroll
        for (int i = 0; i < 8; i++) xb[i] = 0u;
    }
}

// y = [x W0^T | x W1^T | x W2^T] (+ bias) (+ residual), or silu(x W0^T) * (x W1^T) when GATED,
// for up to 8 rows of x, RMS-normalised first with weight `nw` when it is given; every
// segment's rows a multiple of 16, n_in a multiple of 64, weights and x 16-byte aligned. U
// steps of 64 inputs are loaded before any is multiplied (the first before the norm's sums).
// When `watch` is given, an output that is NaN or infinite lowers it to `tag` (atomicMin).
template <bool GATED, int U>
__device__ void matvec(
        const u16* x, int rows, int n_in,
        const u8* w0, const u8* w1, const u8* w2, int n0, int n1, int n2,
        const float* s0, const float* s1, const float* s2, int m0, int m1, int m2,
        const u16* bias, int has_bias, const u16* res, int has_res,
        const u16* nw, float eps, u16* y, unsigned* watch, int tag) {
    __shared__ float red[GATED ? 2 : 1][WARPS][16][8];
    __shared__ float inv_rms[8];
    pdl_launch_next();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int o0 = blockIdx.x * 16;
    const u8* w;
    const u8* wu = w1;
    const float* s = s0;
    int m = m0, local = o0;
    if (GATED || o0 < n0) { w = w0; }
    else if (o0 < n0 + n1) { w = w1; s = s1; m = m1; local = o0 - n0; }
    else { w = w2; s = s2; m = m2; local = o0 - n0 - n1; }
    const u8* r0 = w + (long long)(local + g) * n_in + q * 16;
    const u8* r1 = r0 + 8LL * n_in;
    const u8* u0 = wu + (long long)(local + g) * n_in + q * 16;
    const u8* u1 = u0 + 8LL * n_in;
    float c[4] = {0.f, 0.f, 0.f, 0.f}, cu[4] = {0.f, 0.f, 0.f, 0.f};
    int steps = n_in >> 6;
    uint4 lo[U], hi[U], ulo[U], uhi[U];
    auto load = [&](int base) {
        #pragma unroll
        for (int i = 0; i < U; i++) {
            int st = base + i * WARPS;
            if (st < steps) {
                lo[i] = load_stream(r0 + st * 64);
                hi[i] = load_stream(r1 + st * 64);
                if (GATED) {
                    ulo[i] = load_stream(u0 + st * 64);
                    uhi[i] = load_stream(u1 + st * 64);
                }
            }
        }
    };
    load(warp);
    // Everything below reads what earlier kernels wrote.
    pdl_wait_previous();
    float inv = 1.f;
    if (nw) {
        // Warp w sums the squares of row w while the first loads are in flight.
        if (warp < rows) {
            const u16* xr = x + (long long)warp * n_in;
            float ss = 0.f;
            for (int k = lane * 8; k < n_in; k += 256) {
                u32 v[4];
                load8(v, xr + k);
                #pragma unroll
                for (int j = 0; j < 4; j++) {
                    float a = bf16f(v[j] & 0xffffu), b = bf16f(v[j] >> 16);
                    ss += a * a + b * b;
                }
            }
            for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
            if (lane == 0) inv_rms[warp] = rsqrtf(ss / (float)n_in + eps);
        }
        __syncthreads();
        inv = g < rows ? inv_rms[g] * X_SCALE : 0.f;
    }
    for (int base = warp; base < steps; base += WARPS * U) {
        if (base != warp) load(base);
        #pragma unroll
        for (int i = 0; i < U; i++) {
            int st = base + i * WARPS;
            if (st < steps) {
                u32 xb[8];
                load_x(xb, x, g, rows, n_in, st * 64 + q * 16, nw, inv);
                tile(c, lo[i], hi[i], xb);
                if (GATED) tile(cu, ulo[i], uhi[i], xb);
            }
        }
    }
    red[0][warp][g][2 * q] = c[0];
    red[0][warp][g][2 * q + 1] = c[1];
    red[0][warp][g + 8][2 * q] = c[2];
    red[0][warp][g + 8][2 * q + 1] = c[3];
    if (GATED) {
        red[GATED ? 1 : 0][warp][g][2 * q] = cu[0];
        red[GATED ? 1 : 0][warp][g][2 * q + 1] = cu[1];
        red[GATED ? 1 : 0][warp][g + 8][2 * q] = cu[2];
        red[GATED ? 1 : 0][warp][g + 8][2 * q + 1] = cu[3];
    }
    __syncthreads();
    if (threadIdx.x >= 128) return;
    int f = threadIdx.x >> 3, r = threadIdx.x & 7;
    if (r >= rows) return;
    float acc = 0.f, accu = 0.f;
    #pragma unroll
    for (int i = 0; i < WARPS; i++) {
        acc += red[0][i][f][r];
        if (GATED) accu += red[GATED ? 1 : 0][i][f][r];
    }
    int o = o0 + f, n_out = GATED ? n0 : n0 + n1 + n2;
    float v;
    if (GATED) {
        float sg = UNSCALE * (m0 == 0 ? 1.f : s0[m0 == 1 ? 0 : o]);
        float su = UNSCALE * (m1 == 0 ? 1.f : s1[m1 == 1 ? 0 : o]);
        float gv = acc * sg;
        v = gv / (1.f + __expf(-gv)) * (accu * su);
    } else {
        v = acc * UNSCALE * (m == 0 ? 1.f : s[m == 1 ? 0 : local + f]);
        if (has_bias) v += bf16f(bias[o]);
    }
    if (has_res) v += bf16f(res[(long long)r * n_out + o]);
    u16 out = to_bf16(v);
    y[(long long)r * n_out + o] = out;
    // NaN or infinity (also a finite f32 that rounds to a bf16 infinity).
    if (watch && (out & 0x7f80u) == 0x7f80u) atomicMin(watch, (unsigned)tag);
}

#define MATVEC(NAME, GATED, U) \
extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME( \
        const u16* x, int rows, int n_in, \
        const u8* w0, const u8* w1, const u8* w2, int n0, int n1, int n2, \
        const float* s0, const float* s1, const float* s2, int m0, int m1, int m2, \
        const u16* bias, int has_bias, const u16* res, int has_res, \
        const u16* nw, float eps, u16* y, unsigned* watch, int tag) { \
    matvec<GATED, U>(x, rows, n_in, w0, w1, w2, n0, n1, n2, s0, s1, s2, m0, m1, m2, \
                     bias, has_bias, res, has_res, nw, eps, y, watch, tag); }

MATVEC(f8_matvec_mma, false, 4)
MATVEC(f8_matvec_mma_gated, true, 2)
#endif

// One new token's attention for one (head, batch) per block of 16 warps: each warp takes every
// 16th cached position, each lane four (or eight) of the head's dimensions, with four
// positions' loads in flight; scores and softmax in shared memory, the warps' partial sums of
// values meet there too. K and V are read in place with their strides (rows dense, 8-byte
// aligned).
#define ATT_WARPS 16

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

// Four bf16 (8 bytes) of `p` at element `i`, or zeros past `d`.
__device__ __forceinline__ uint2 load4(const u16* p, int i, int d, bool ok) {
    return ok && i < d ? *(const uint2*)(p + i) : make_uint2(0u, 0u);
}

__device__ __forceinline__ float dot4(const float* a, uint2 b) {
    return a[0] * __int_as_float((int)(b.x << 16)) + a[1] * __int_as_float((int)(b.x & 0xffff0000u))
         + a[2] * __int_as_float((int)(b.y << 16)) + a[3] * __int_as_float((int)(b.y & 0xffff0000u));
}

// The query is head h of a row `q_stride` elements per sequence, rotated at `pos` by `table`
// (cosines, then sines, d per position) when `rope` is set.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) decode_attention_bf16(
        const u16* q, long long q_stride, int rope, const u16* table, int pos,
        const u16* k, const u16* v, u16* out,
        int heads, int group, int len, int d, float scale,
        long long kb, long long kh, long long kt, long long vb, long long vh, long long vt) {
    pdl_launch_next();
    pdl_wait_previous();
    extern __shared__ float sh[];
    float* sc = sh;
    float* red = sh + len;
    float* qs = red + ATT_WARPS * d;
    int h = blockIdx.x, bi = blockIdx.y, kvh = h / group;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u16* qh = q + bi * q_stride + (long long)h * d;
    int half = d / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x1 = bf16f(qh[i]), x2 = bf16f(qh[i + half]);
        if (rope) {
            const u16* cs = table + (long long)pos * d;
            float c = bf16f(cs[i]), s = bf16f(cs[half + i]);
            qs[i] = x1 * c - x2 * s;
            qs[i + half] = x2 * c + x1 * s;
        } else {
            qs[i] = x1;
            qs[i + half] = x2;
        }
    }
    __syncthreads();
    float qv[8];
    #pragma unroll
    for (int e = 0; e < 8; e++) {
        int i = (e >> 2) * 128 + lane * 4 + (e & 3);
        qv[e] = i < d ? qs[i] : 0.f;
    }
    const u16* kbase = k + bi * kb + kvh * kh;
    for (int j0 = warp; j0 < len; j0 += ATT_WARPS * 4) {
        uint2 r[4][2];
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            int j = j0 + u * ATT_WARPS;
            const u16* row = kbase + (long long)j * kt;
            r[u][0] = load4(row, lane * 4, d, j < len);
            r[u][1] = load4(row, 128 + lane * 4, d, j < len);
        }
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            float s = dot4(qv, r[u][0]) + dot4(qv + 4, r[u][1]);
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            int j = j0 + u * ATT_WARPS;
            if (lane == 0 && j < len) sc[j] = s * scale;
        }
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
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const u16* vbase = v + bi * vb + kvh * vh;
    for (int j0 = warp; j0 < len; j0 += ATT_WARPS * 4) {
        uint2 r[4][2];
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            int j = j0 + u * ATT_WARPS;
            const u16* row = vbase + (long long)j * vt;
            r[u][0] = load4(row, lane * 4, d, j < len);
            r[u][1] = load4(row, 128 + lane * 4, d, j < len);
        }
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            int j = j0 + u * ATT_WARPS;
            float p = j < len ? sc[j] : 0.f;
            #pragma unroll
            for (int c = 0; c < 2; c++) {
                acc[4 * c] += p * __int_as_float((int)(r[u][c].x << 16));
                acc[4 * c + 1] += p * __int_as_float((int)(r[u][c].x & 0xffff0000u));
                acc[4 * c + 2] += p * __int_as_float((int)(r[u][c].y << 16));
                acc[4 * c + 3] += p * __int_as_float((int)(r[u][c].y & 0xffff0000u));
            }
        }
    }
    #pragma unroll
    for (int e = 0; e < 8; e++) {
        int i = (e >> 2) * 128 + lane * 4 + (e & 3);
        if (i < d) red[warp * d + i] = acc[e];
    }
    __syncthreads();
    u16* o = out + ((long long)bi * heads + h) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float sum = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) sum += red[w * d + i];
        o[i] = to_bf16(sum / total);
    }
}

// Stores new keys (rotated) and values from q/k/v rows [b, t, (heads + 2 kv_heads) d] into the
// cache [2, b, kv_heads, max_len, d] at `pos`: one block per (kv head, token, sequence), one
// thread per rotary pair.
extern "C" __global__ void store_kv_bf16(const u16* qkv, const u16* table, u16* kv,
                                         int heads, int kv_heads, int d, int t, int pos,
                                         long long max_len, int batch) {
    pdl_launch_next();
    pdl_wait_previous();
    int kh = blockIdx.x, ti = blockIdx.y, bi = blockIdx.z, half = d / 2;
    const u16* row = qkv + (long long)(bi * t + ti) * (heads + 2 * kv_heads) * d;
    const u16* kr = row + (long long)(heads + kh) * d;
    const u16* vr = row + (long long)(heads + kv_heads + kh) * d;
    const u16* cs = table + (long long)(pos + ti) * d;
    long long at = (((long long)bi * kv_heads + kh) * max_len + pos + ti) * d;
    long long values = (long long)batch * kv_heads * max_len * d;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float c = bf16f(cs[i]), s = bf16f(cs[half + i]);
        float x1 = bf16f(kr[i]), x2 = bf16f(kr[i + half]);
        kv[at + i] = to_bf16(x1 * c - x2 * s);
        kv[at + i + half] = to_bf16(x2 * c + x1 * s);
        kv[values + at + i] = vr[i];
        kv[values + at + i + half] = vr[i + half];
    }
}
"#;

/// Compute capability `(major, minor)` of the first device that asks (queried once).
fn compute_capability(dev: &CudaDevice) -> std::result::Result<(i32, i32), String> {
    static CAPABILITY: OnceLock<std::result::Result<(i32, i32), String>> = OnceLock::new();
    CAPABILITY
        .get_or_init(|| {
            let ctx = dev.cuda_stream().context().clone();
            let attribute = |a| ctx.attribute(a).map_err(|e| e.to_string());
            Ok((
                attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ))
        })
        .clone()
}

/// Whether `dev` has the tensor-core instructions the fused matvec uses (sm_80 or newer).
pub fn has_mma(dev: &CudaDevice) -> bool {
    compute_capability(dev).is_ok_and(|(major, _)| major >= 8)
}

/// The decode kernels' PTX, compiled for the architecture of the first device that asks
/// (sm_89 and newer convert float8 in hardware, sm_90 overlaps launches).
fn decode_ptx(dev: &CudaDevice) -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let (major, minor) = compute_capability(dev)?;
        // Newer GPUs run the sm_90 PTX (the driver compiles it for them).
        let (major, minor) = if major > 9 { (9, 0) } else { (major, minor) };
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let options = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            ..Default::default()
        };
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(DECODE_KERNELS, options)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile the decode kernels for {arch}: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Whether `dev` overlaps dependent launches (sm_90 and newer).
fn has_pdl(dev: &CudaDevice) -> bool {
    compute_capability(dev).is_ok_and(|(major, _)| major >= 9)
}

/// Kernel arguments by value, each in an 8-byte slot (4-byte ones in its low half).
#[derive(Default)]
struct RawArgs(Vec<[u8; 8]>);

impl RawArgs {
    fn ptr<T>(&mut self, view: &impl DevicePtr<T>, stream: &CudaStream) -> &mut Self {
        let (ptr, _record) = view.device_ptr(stream);
        self.u64(ptr)
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.push(v.to_le_bytes());
        self
    }

    fn i32(&mut self, v: i32) -> &mut Self {
        let mut slot = [0u8; 8];
        slot[..4].copy_from_slice(&v.to_le_bytes());
        self.0.push(slot);
        self
    }

    fn f32(&mut self, v: f32) -> &mut Self {
        self.i32(v.to_bits() as i32)
    }

    /// Launches `func` (of a module candle keeps loaded) on `dev`'s stream with these
    /// arguments; `overlap` lets it start during the previous kernel (programmatic dependent
    /// launch, where the device has it).
    fn launch(
        &mut self,
        dev: &CudaDevice,
        func: sys::CUfunction,
        config: LaunchConfig,
        overlap: bool,
    ) -> candle_core::Result<()> {
        let stream = dev.cuda_stream();
        let mut params: Vec<*mut std::ffi::c_void> = self
            .0
            .iter_mut()
            .map(|slot| slot.as_mut_ptr().cast())
            .collect();
        // SAFETY: zero is a valid bit pattern for this plain C struct.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: config.grid_dim.0,
            gridDimY: config.grid_dim.1,
            gridDimZ: config.grid_dim.2,
            blockDimX: config.block_dim.0,
            blockDimY: config.block_dim.1,
            blockDimZ: config.block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(overlap && has_pdl(dev)),
        };
        // SAFETY: `params` point at one value per kernel parameter, in order and of its size
        // (each caller matches its kernel's signature), alive until the launch is queued; the
        // buffers they name are held by the caller's storage guards for as long.
        unsafe { sys::cuLaunchKernelEx(&cfg, func, params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .w()
    }
}

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

/// The CUDA side of [`Watch::check`](super::watch::Watch::check): queues a check of `x`
/// (bf16 or f32) that lowers `word` to `tag` if `x` holds a NaN or an infinity.
pub fn watch(x: &Tensor, word: &Tensor, tag: u32) -> Result<()> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let (word_storage, word_layout) = word.storage_and_layout();
    let dev = match &*storage {
        candle_core::Storage::Cuda(s) => s.device().clone(),
        _ => anyhow::bail!("watch: the tensor is not on the GPU"),
    };
    let name = match x.dtype() {
        candle_core::DType::BF16 => "watch_bf16",
        candle_core::DType::F32 => "watch_f32",
        other => anyhow::bail!("watch: cannot check {other:?} values"),
    };
    let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
    let n = x.elem_count() as i64;
    let word_view = cuda_view::<u32>(&word_storage, word_layout)?;
    let config = LaunchConfig {
        grid_dim: ((x.elem_count().div_ceil(256)).clamp(1, 1024) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = func.builder();
    let view_bf16;
    let view_f32;
    match x.dtype() {
        candle_core::DType::BF16 => {
            view_bf16 = cuda_view::<half::bf16>(&storage, layout)?;
            b.arg(&view_bf16);
        }
        _ => {
            view_f32 = cuda_view::<f32>(&storage, layout)?;
            b.arg(&view_f32);
        }
    }
    b.arg(&n);
    b.arg(&word_view);
    b.arg(&tag);
    // SAFETY: the argument list matches the kernel's signature; `word` holds one u32.
    unsafe { b.launch(config) }.w()?;
    Ok(())
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
    let table = op.rope.as_ref().map(|(t, _)| t.storage_and_layout());
    let table_view = table
        .as_ref()
        .map(|(s, l)| cuda_view::<half::bf16>(s, l))
        .transpose()?;
    let func =
        dev.get_or_load_custom_func("decode_attention_bf16", DECODE_MODULE, decode_ptx(&dev)?)?;
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
    let (rope, pos) = (
        i32::from(op.rope.is_some()),
        op.rope.as_ref().map_or(0, |(_, p)| *p as i32),
    );
    let aligned = [ko, kb, kh, kt, vo, vb, vh, vt, op.head_dim]
        .iter()
        .all(|s| s.is_multiple_of(4));
    if !aligned {
        candle_core::bail!("decode attention: K/V rows must start on 8 bytes");
    }
    let stream = dev.cuda_stream();
    let mut args = RawArgs::default();
    args.ptr(&qs, &stream).u64(op.q_stride as u64).i32(rope);
    // Without rotation the table is never read; q stands in for its pointer.
    match &table_view {
        Some(t) => args.ptr(t, &stream),
        None => args.ptr(&qs, &stream),
    };
    args.i32(pos)
        .ptr(&ks, &stream)
        .ptr(&vs, &stream)
        .ptr(&out, &stream);
    args.i32(heads).i32(group).i32(len).i32(d).f32(scale);
    for s in strides {
        args.u64(s as u64);
    }
    let warps = super::attention::WARPS;
    let config = LaunchConfig {
        grid_dim: (op.heads as u32, batch as u32, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: ((op.len + (warps + 1) * op.head_dim) * 4) as u32,
    };
    // The arguments match the kernel's signature; shared memory holds `len` scores, each
    // warp's partial output and the query (at most 48 KiB, checked by attention::applies).
    // The kernel reads nothing before the previous kernel ends.
    args.launch(&dev, func.cu_function(), config, true)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((batch, op.heads, 1, op.head_dim)),
    ))
}

/// The CUDA side of [`StoreKv`]: bf16 q/k/v rows, rotary table and cache.
pub fn store_kv(
    op: &StoreKv,
    cache: &mut CudaStorage,
    qkv: &CudaStorage,
    lq: &Layout,
    table: &CudaStorage,
    lt: &Layout,
) -> candle_core::Result<()> {
    let dev = qkv.device().clone();
    let (Some((qa, qb)), Some((ta, tb))) = (lq.contiguous_offsets(), lt.contiguous_offsets())
    else {
        candle_core::bail!("store kv: q/k/v and the rotary table must be contiguous");
    };
    let qs = qkv.as_cuda_slice::<half::bf16>()?.slice(qa..qb);
    let ts = table.as_cuda_slice::<half::bf16>()?.slice(ta..tb);
    let kv = cache.as_cuda_slice_mut::<half::bf16>()?;
    let func = dev.get_or_load_custom_func("store_kv_bf16", DECODE_MODULE, decode_ptx(&dev)?)?;
    let ints = [op.heads, op.kv_heads, op.head_dim, op.tokens, op.pos].map(|v| v as i32);
    let (max_len, batch) = (op.max_len as i64, op.batch as i32);
    let stream = dev.cuda_stream();
    let mut args = RawArgs::default();
    args.ptr(&qs, &stream).ptr(&ts, &stream).ptr(kv, &stream);
    for v in ints {
        args.i32(v);
    }
    args.u64(max_len as u64).i32(batch);
    let config = LaunchConfig {
        grid_dim: (op.kv_heads as u32, op.tokens as u32, op.batch as u32),
        block_dim: ((op.head_dim as u32 / 2).clamp(1, 1024), 1, 1),
        shared_mem_bytes: 0,
    };
    // The arguments match the kernel's signature; the cache holds `[2, batch, kv_heads,
    // max_len, head_dim]` and `pos + tokens <= max_len` (checked by KvCache::store). The
    // kernel reads and writes nothing before the previous kernel ends.
    args.launch(&dev, func.cu_function(), config, true)?;
    Ok(())
}

/// A tensor's CUDA slice, offset by its layout (which must be contiguous).
fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let candle_core::Storage::Cuda(s) = storage else {
        candle_core::bail!("a kernel operand is not on the GPU");
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("kernel operands must be contiguous".into()))?;
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
    let norm = op.norm.as_ref().map(|(t, _)| t.storage_and_layout());
    let watch = op.watch.as_ref().map(|(t, _)| t.storage_and_layout());
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
    let n_view = norm
        .as_ref()
        .map(|(s, l)| cuda_view::<half::bf16>(s, l))
        .transpose()?;
    let watch_view = watch
        .as_ref()
        .map(|(s, l)| cuda_view::<u32>(s, l))
        .transpose()?;
    let eps = op.norm.as_ref().map_or(0.0f32, |(_, e)| *e);
    // The kernel reads the norm weight 16 bytes at a time.
    if norm
        .as_ref()
        .is_some_and(|(_, l)| !l.start_offset().is_multiple_of(8))
    {
        candle_core::bail!("fused matvec: the norm weight must start on 16 bytes");
    }

    let aligned = xa.is_multiple_of(8)
        && n_in.is_multiple_of(super::matvec::TILE_INPUTS)
        && op
            .segments
            .iter()
            .all(|s| s.rows.is_multiple_of(super::matvec::TILE_ROWS))
        && weights
            .iter()
            .all(|(_, l)| l.start_offset().is_multiple_of(16));
    if !aligned {
        candle_core::bail!(
            "fused matvec: shapes or offsets off the kernel's tiles (see matvec::applies)"
        );
    }
    let n_out = op.out_features();
    let name = match op.gated {
        true => "f8_matvec_mma_gated",
        false => "f8_matvec_mma",
    };
    let func = dev.get_or_load_custom_func(name, DECODE_MODULE, decode_ptx(&dev)?)?;
    // SAFETY: every element of `y` is written by the block of its 16 features.
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
    let (has_bias, has_res) = (i32::from(b_view.is_some()), i32::from(r_view.is_some()));
    let stream = dev.cuda_stream();
    let mut args = RawArgs::default();
    args.ptr(&xs, &stream).i32(rows_arg).i32(in_arg);
    // Absent weights, scales, bias and residual are never read; x stands in for their pointers.
    for i in 0..3 {
        match w_views.get(i) {
            Some(v) => args.ptr(v, &stream),
            None => args.ptr(&xs, &stream),
        };
    }
    for v in n {
        args.i32(v);
    }
    for i in 0..3 {
        match s_views.get(i).and_then(Option::as_ref) {
            Some(v) => args.ptr(v, &stream),
            None => args.ptr(&xs, &stream),
        };
    }
    for m in modes {
        args.i32(m);
    }
    match &b_view {
        Some(v) => args.ptr(v, &stream),
        None => args.ptr(&xs, &stream),
    };
    args.i32(has_bias);
    match &r_view {
        Some(v) => args.ptr(v, &stream),
        None => args.ptr(&xs, &stream),
    };
    args.i32(has_res);
    // The kernel tells "no norm" by a null pointer.
    match &n_view {
        Some(v) => args.ptr(v, &stream),
        None => args.u64(0),
    };
    args.f32(eps).ptr(&y, &stream);
    // The kernel tells "no watch" by a null pointer.
    match &watch_view {
        Some(v) => args.ptr(v, &stream),
        None => args.u64(0),
    };
    args.i32(op.watch.as_ref().map_or(0, |(_, tag)| *tag as i32));
    // One block of eight warps per 16 output features (super::matvec::TILE_ROWS).
    let config = LaunchConfig {
        grid_dim: ((n_out / super::matvec::TILE_ROWS) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // Resident weights may be read before the previous kernel ends; a slot's may not.
    args.launch(&dev, func.cu_function(), config, op.resident_weights)?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev),
        Shape::from((rows, n_out)),
    ))
}
