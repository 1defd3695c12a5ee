// Decoding stored tensors to f32 or bf16 (float8 E4M3, bf16, f16 or f32 bytes, times an
// optional scale: scalar, per row, or per row and column block), and the watch that flags NaN
// and infinite values. Compiled for any GPU (engine::cuda, module "dequant").
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh prepended instead
#include "common.cuh"
#endif

// Float16 bits to f32.
__device__ __forceinline__ float f16f(u16 h) {
    u32 s = (h >> 15) & 1u, e = (h >> 10) & 31u, m = h & 1023u;
    float v;
    if (e == 0u) v = (float)m * 5.9604644775390625e-8f;
    else if (e == 31u) v = __int_as_float((int)(0x7f800000u | (m << 13)));
    else v = __int_as_float((int)(((e + 112u) << 23) | (m << 13)));
    return s ? -v : v;
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

