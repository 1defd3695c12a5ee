// Prefill attention on tensor cores (sm_80 and newer): causal softmax(q K^T / sqrt(d)) V for a
// pass of `tokens` new positions per sequence, the queries rotated inside, against the cache
// (keys rotated and stored by the KV store before). One block of 4 warps per 64 queries of
// one head of one sequence; each warp owns 16 queries and walks the keys 64 at a time (as
// FlashAttention 2 does): scores by m16n8k16 in f32, the running maximum and sum of each row
// in registers, the probabilities rounded to bf16 and multiplied with V by m16n8k16 again,
// the output divided by the sum at the end and rounded to bf16. Head width PREFILL_HEAD_DIM
// (128). Compiled in the decode module after matvec.cu (its `mma`).
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh and matvec.cu before this file
#include "matvec.cu"
#endif

#ifndef PREFILL_HEAD_DIM
#error "prefill_attention.cu needs -DPREFILL_HEAD_DIM (engine::cuda::kernel_defines)"
#endif

#if __CUDA_ARCH__ >= 800
#define PA_D PREFILL_HEAD_DIM
#define PA_ROWS 64
#define PA_KEYS 64
// -inf (NVRTC has no INFINITY): a masked score, and the maximum of a row with none seen yet.
#define NEG_INF __int_as_float(0xff800000)
// Shared rows padded by 8 bf16 (272 bytes), so that ldmatrix's eight rows hit distinct banks.
#define PA_STRIDE (PA_D + 8)

__device__ __forceinline__ void ldsm_x4(u32* r, const u16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_trans(u32* r, const u16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// `n` rows of PA_D bf16 from `src` (row i at src + i * stride) into shared `dst`, zeros from
// row `valid` on; all 128 threads take part.
__device__ __forceinline__ void load_tile(u16* dst, const u16* src, long long stride, int valid) {
    for (int c = threadIdx.x; c < PA_KEYS * (PA_D / 8); c += blockDim.x) {
        const int r = c / (PA_D / 8), col = (c % (PA_D / 8)) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < valid) v = *(const uint4*)(src + r * stride + col);
        *(uint4*)(dst + r * PA_STRIDE + col) = v;
    }
}

// q: row (bi * tokens + i) of `q_stride` elements holds query head h at h * d, for position
// pos + i; the keys and values of sequence bi at k + bi * kb + (h / group) * kh + j * kt (and v
// alike); out: row (bi * tokens + i), heads * d wide. Grid (query tiles, heads, sequences).
extern "C" __global__ void __launch_bounds__(128) prefill_attention_bf16(
        const u16* q, long long q_stride, const u16* table, int pos, int tokens,
        const u16* k, const u16* v, u16* out, int heads, int group, float scale,
        long long kb, long long kh, long long kt, long long vb, long long vh, long long vt) {
    extern __shared__ uint4 pa_shared[];
    u16* qs = (u16*)pa_shared;
    u16* ks = qs + PA_ROWS * PA_STRIDE;
    u16* vs = ks + PA_KEYS * PA_STRIDE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int i0 = blockIdx.x * PA_ROWS, h = blockIdx.y, bi = blockIdx.z;
    const int kvh = h / group, half = PA_D / 2;

    // The block's queries, rotated in f32 and rounded to bf16 (rows past the pass are zero).
    for (int c = threadIdx.x; c < PA_ROWS * half; c += blockDim.x) {
        const int r = c / half, e = c % half, i = i0 + r;
        float a = 0.f, b = 0.f;
        if (i < tokens) {
            const u16* qh = q + ((long long)bi * tokens + i) * q_stride + (long long)h * PA_D;
            const u16* cs = table + (long long)(pos + i) * PA_D;
            const float x1 = bf16f(qh[e]), x2 = bf16f(qh[e + half]);
            const float co = bf16f(cs[e]), si = bf16f(cs[half + e]);
            a = x1 * co - x2 * si;
            b = x2 * co + x1 * si;
        }
        qs[r * PA_STRIDE + e] = to_bf16(a);
        qs[r * PA_STRIDE + e + half] = to_bf16(b);
    }
    __syncthreads();
    // This warp's 16 queries as A fragments, 8 steps of 16 dimensions.
    u32 qa[PA_D / 16][4];
    #pragma unroll
    for (int s = 0; s < PA_D / 16; s++)
        ldsm_x4(qa[s], qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PA_STRIDE
                           + s * 16 + (lane >> 4) * 8);

    float o[PA_D / 8][4];
    #pragma unroll
    for (int n = 0; n < PA_D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // Rows g and g + 8 of the warp: running maximum (of scaled scores, base 2) and sum.
    float mx[2] = {NEG_INF, NEG_INF}, sum[2] = {0.f, 0.f};
    const float l2 = scale * 1.4426950408889634f;
    const int row0 = i0 + warp * 16 + g;                 // this lane's first query
    const int len = pos + min(tokens, i0 + PA_ROWS);     // keys the block's last query sees
    const u16* kbase = k + bi * kb + kvh * kh;
    const u16* vbase = v + bi * vb + kvh * vh;
    for (int j0 = 0; j0 < len; j0 += PA_KEYS) {
        __syncthreads();  // the previous tile's readers are done
        load_tile(ks, kbase + j0 * kt, kt, len - j0);
        load_tile(vs, vbase + j0 * vt, vt, len - j0);
        __syncthreads();
        float s[PA_KEYS / 8][4];
        #pragma unroll
        for (int n = 0; n < PA_KEYS / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            #pragma unroll
            for (int d2 = 0; d2 < PA_D / 32; d2++) {
                u32 b[4];  // keys n*8.., dims d2*32 + (0, 8, 16, 24)
                ldsm_x4(b, ks + (n * 8 + (lane & 7)) * PA_STRIDE + d2 * 32 + (lane >> 3) * 8);
                mma(s[n], qa[2 * d2][0], qa[2 * d2][1], qa[2 * d2][2], qa[2 * d2][3], b[0], b[1]);
                mma(s[n], qa[2 * d2 + 1][0], qa[2 * d2 + 1][1], qa[2 * d2 + 1][2],
                    qa[2 * d2 + 1][3], b[2], b[3]);
            }
        }
        // Causal mask (query at pos + row sees keys up to pos + row), the new maxima.
        float tile_max[2] = {NEG_INF, NEG_INF};
        #pragma unroll
        for (int n = 0; n < PA_KEYS / 8; n++)
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + n * 8 + 2 * t + (e & 1), r = row0 + (e >> 1) * 8;
                s[n][e] = j <= pos + r ? s[n][e] * l2 : NEG_INF;
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
            }
        float corr[2];
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            const float m = fmaxf(mx[r], tile_max[r]);
            // A row none of whose keys were seen yet keeps -inf (a query past the pass).
            corr[r] = m == NEG_INF ? 1.f : exp2f(mx[r] - m);
            mx[r] = m;
            sum[r] *= corr[r];
        }
        #pragma unroll
        for (int n = 0; n < PA_D / 8; n++) {
            o[n][0] *= corr[0]; o[n][1] *= corr[0];
            o[n][2] *= corr[1]; o[n][3] *= corr[1];
        }
        u32 p[PA_KEYS / 16][4];
        #pragma unroll
        for (int n = 0; n < PA_KEYS / 8; n++) {
            float e[4];
            #pragma unroll
            for (int c = 0; c < 4; c++) {
                const float m = mx[c >> 1];
                e[c] = m == NEG_INF ? 0.f : exp2f(s[n][c] - m);
                sum[c >> 1] += e[c];
            }
            // Keys n*8 + 2t, +1 of rows g and g + 8: half of an A fragment of 16 keys.
            p[n >> 1][(n & 1) * 2] = bf2(e[0], e[1]);
            p[n >> 1][(n & 1) * 2 + 1] = bf2(e[2], e[3]);
        }
        #pragma unroll
        for (int kk = 0; kk < PA_KEYS / 16; kk++) {
            #pragma unroll
            for (int n2 = 0; n2 < PA_D / 16; n2++) {
                u32 b[4];  // keys kk*16.., dims n2*16 + (0, 8)
                ldsm_x4_trans(b, vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PA_STRIDE
                                     + n2 * 16 + (lane >> 4) * 8);
                // p[kk] holds (row g, keys 2t..), (row g + 8, ..), (g, keys 8 + 2t..), (g + 8, ..).
                mma(o[2 * n2], p[kk][0], p[kk][1], p[kk][2], p[kk][3], b[0], b[1]);
                mma(o[2 * n2 + 1], p[kk][0], p[kk][1], p[kk][2], p[kk][3], b[2], b[3]);
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < 2; r++) {
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
    }
    #pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = row0 + r * 8;
        if (i >= tokens) continue;
        u16* orow = out + ((long long)bi * tokens + i) * heads * PA_D + (long long)h * PA_D;
        #pragma unroll
        for (int n = 0; n < PA_D / 8; n++)
            *(u32*)(orow + n * 8 + 2 * t) = bf2(o[n][2 * r] / sum[r], o[n][2 * r + 1] / sum[r]);
    }
}
#endif
