// Decode attention: one new token's attention for one (head, batch, share of the positions) per
// block of ATT_WARPS warps (engine::ops::ATTENTION_WARPS, passed as -DATT_WARPS), the shares of a
// head in one cluster (sm_90): each warp takes every ATT_WARPS-th cached position of its share,
// each lane four (or eight) of the head's dimensions, with four positions' loads in flight;
// scores and softmax in shared memory, the warps' partial sums of values meet there too.
// K and V are read in place with their strides (rows dense, 8-byte aligned). Compiled for the
// device's architecture (engine::cuda, module "decode").
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh prepended instead
#include "common.cuh"
#endif

#ifndef ATT_WARPS
#error "attention.cu needs -DATT_WARPS (engine::cuda::kernel_defines)"
#endif

// The block's sum (or maximum) of `v`, through `red` (33 floats of shared memory).
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

// This lane's 8 elements of 4 cached rows, positions j0 + u * ATT_WARPS (zeros past `len`;
// position `fresh` from `fresh_row`, not the cache): the loads of one step of the K loop and of
// the V loop.
__device__ __forceinline__ void load_rows(uint2 (*r)[2], const u16* base, long long stride, int j0,
                                          int len, int lane, int d, int fresh,
                                          const u16* fresh_row) {
    #pragma unroll
    for (int u = 0; u < 4; u++) {
        int j = j0 + u * ATT_WARPS;
        const u16* row = j == fresh ? fresh_row : base + (long long)j * stride;
        r[u][0] = load4(row, lane * 4, d, j < len);
        r[u][1] = load4(row, 128 + lane * 4, d, j < len);
    }
}

// The query is head h of a row `q_stride` elements per sequence, rotated at `pos` by `table`
// (cosines, then sines, d per position) when `rope` is set. Grid (heads, split, batch): the
// `split` blocks of a head form one cluster (sm_90), each taking one share of the positions
// with its own maximum, sum of exponentials and weighted values; the first block combines them
// in rank order, rescaled to the common maximum.
// With `store` (a decode step: `rope` set, len = pos + 1), the row is the fused q/k/v
// projection's, and the new token's key (rotated as store_kv rotates it) and value are taken
// from it, not the cache, and written to the cache at `pos` by the first block of its kv group:
// the store and the attention in one launch, with the bits of store_kv then attention.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) decode_attention_bf16(
        const u16* q, long long q_stride, int rope, const u16* table, int pos,
        u16* k, u16* v, u16* out,
        int heads, int group, int len, int d, float scale,
        long long kb, long long kh, long long kt, long long vb, long long vh, long long vt,
        int store) {
    pdl_launch_next();
    pdl_wait_previous();
    extern __shared__ float sh[];
    __shared__ float stats[2];  // this share's maximum and sum of exponentials
    const int split = gridDim.y, chunk = (len + split - 1) / split;
    const int j_begin = blockIdx.y * chunk, j_end = min(len, j_begin + chunk);
    float* sc = sh;  // scores of this share, from j_begin
    float* red = sh + chunk;
    float* qs = red + ATT_WARPS * d;
    float* part = qs + d;  // this share's weighted values, unnormalised
    // store: the new key as the cache holds it, on 8 bytes (load_rows reads 4 elements at once).
    u16* kn = (u16*)(sh + ((chunk + (ATT_WARPS + 1 + (split > 1 ? 1 : 0)) * d + 1) & ~1));
    int h = blockIdx.x, bi = blockIdx.z, kvh = h / group;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u16* qh = q + bi * q_stride + (long long)h * d;
    int half = d / 2;
    const u16* vn = nullptr;
    const int fresh = store ? pos : -1;
    if (store) {
        const u16* kr = q + bi * q_stride + (long long)(heads + kvh) * d;
        vn = q + bi * q_stride + (long long)(heads + heads / group + kvh) * d;
        const u16* cs = table + (long long)pos * d;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            float c = bf16f(cs[i]), s = bf16f(cs[half + i]);
            float x1 = bf16f(kr[i]), x2 = bf16f(kr[i + half]);
            kn[i] = to_bf16(x1 * c - x2 * s);
            kn[i + half] = to_bf16(x2 * c + x1 * s);
        }
    }
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
    if (store && h % group == 0 && blockIdx.y == 0) {
        u16* kc = k + bi * kb + kvh * kh + (long long)pos * kt;
        u16* vc = v + bi * vb + kvh * vh + (long long)pos * vt;
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            kc[i] = kn[i];
            vc[i] = vn[i];
        }
    }
    float qv[8];
    #pragma unroll
    for (int e = 0; e < 8; e++) {
        int i = (e >> 2) * 128 + lane * 4 + (e & 3);
        qv[e] = i < d ? qs[i] : 0.f;
    }
    const u16* kbase = k + bi * kb + kvh * kh;
    for (int j0 = j_begin + warp; j0 < j_end; j0 += ATT_WARPS * 4) {
        uint2 r[4][2];
        load_rows(r, kbase, kt, j0, j_end, lane, d, fresh, kn);
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            float s = dot4(qv, r[u][0]) + dot4(qv + 4, r[u][1]);
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            int j = j0 + u * ATT_WARPS;
            if (lane == 0 && j < j_end) sc[j - j_begin] = s * scale;
        }
    }
    __syncthreads();
    const int n = max(0, j_end - j_begin);
    float m = -3.402823466e38f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, sc[j]);
    m = block_reduce(m, red, true);
    float total = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = __expf(sc[j] - m);
        sc[j] = e;
        total += e;
    }
    total = block_reduce(total, red, false);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const u16* vbase = v + bi * vb + kvh * vh;
    for (int j0 = j_begin + warp; j0 < j_end; j0 += ATT_WARPS * 4) {
        uint2 r[4][2];
        load_rows(r, vbase, vt, j0, j_end, lane, d, fresh, vn);
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            int j = j0 + u * ATT_WARPS;
            float p = j < j_end ? sc[j - j_begin] : 0.f;
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
    if (split == 1) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            float sum = 0.f;
            for (int w = 0; w < ATT_WARPS; w++) sum += red[w * d + i];
            o[i] = to_bf16(sum / total);
        }
        return;
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float sum = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) sum += red[w * d + i];
        part[i] = sum;
    }
    if (threadIdx.x == 0) {
        stats[0] = m;
        stats[1] = total;
    }
    // Every thread of every block of the cluster passes both barriers.
    cluster_sync();
    if (blockIdx.y == 0) {
        float big = -3.402823466e38f;
        for (int b = 0; b < split; b++) big = fmaxf(big, cluster_load(&stats[0], b));
        float all = 0.f;
        for (int b = 0; b < split; b++)
            all += cluster_load(&stats[1], b) * __expf(cluster_load(&stats[0], b) - big);
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            float sum = 0.f;
            for (int b = 0; b < split; b++)
                sum += cluster_load(&part[i], b) * __expf(cluster_load(&stats[0], b) - big);
            o[i] = to_bf16(sum / all);
        }
    }
    // The others' shared memory stays until the first block has read it.
    cluster_sync();
}
