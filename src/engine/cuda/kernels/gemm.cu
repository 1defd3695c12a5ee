// The prefill path's matrix product on tensor cores (sm_80 and newer): y = x W^T for float8
// E4M3 weights W and any number of rows of bf16 x (W8A16: the weights are decoded to bf16 in
// registers, never written out as a bf16 copy), with the fused matvec's work after the product
// (`finish`, matvec.cu). Compiled in the decode module after matvec.cu, whose helpers it uses.
//
// A block computes a GEMM_BM x GEMM_BN tile of y (rows of x by output features) with 8 warps
// (2 x 4, each 64 x 32), k-step by k-step (GEMM_BK inputs), x and W staged through shared
// memory by cp.async GEMM_STAGES steps deep. In each 16 inputs a lane takes four consecutive
// inputs of x (one 8-byte shared load per row) and the same four of W (one 4-byte load per
// feature) and hands them to m16n8k16 as the k pairs (2t, 2t + 1) and (2t + 8, 2t + 9): one
// permutation of k on both operands, so each dot product is unchanged. W is decoded as in the
// matvec (value x 2^-120, bits moved) and multiplied by 2^64 (exact), so the products sit at
// 2^-56 of their value as the matvec's do and `finish` undoes it the same way.
//
// Split-K: with `partial`, z-slice s of the grid adds up k-steps [s * per_split, (s + 1) *
// per_split) and writes its f32 sums to partial[s][row][feature]; f8_gemm_reduce then adds the
// slices in order (deterministic) and finishes. Gated products never split.
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh and matvec.cu before this file
#include "matvec.cu"
#endif

#if !defined(GEMM_BM) || !defined(GEMM_BN) || !defined(GEMM_BK) || !defined(GEMM_STAGES)
#error "gemm.cu needs -DGEMM_BM, -DGEMM_BN, -DGEMM_BK and -DGEMM_STAGES (engine::cuda::kernel_defines)"
#endif
// The warps' 2 x 4 layout of 64 x 32 fragments is written for these tiles; a step is whole
// 16-input halves of the m16n8k16 product, and the cp.async pieces share out evenly.
static_assert(GEMM_BM == 128 && GEMM_BN == 128, "the tiles gemm.cu is written for");
static_assert(GEMM_BK == 32 || GEMM_BK == 64, "a step of 32 or 64 inputs");
static_assert(GEMM_STAGES >= 2, "a pipeline needs two stages");

#if __CUDA_ARCH__ >= 800
// Row strides in shared memory, padded by 16 elements so that a warp's fragment loads hit
// distinct banks (x rows of 96 or 160 bytes, W rows of 48 or 80; engine::cuda::product
// computes the block's shared memory the same way).
#define GEMM_X_STRIDE (GEMM_BK + 16)
#define GEMM_W_STRIDE (GEMM_BK + 16)
#define GEMM_X_STAGE (GEMM_BM * GEMM_X_STRIDE * 2)
#define GEMM_W_STAGE (GEMM_BN * GEMM_W_STRIDE)

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

// The weight row behind row `r` of a block's W tile (null past the last output feature).
// Gated, a block covers GEMM_BN / 2 outputs, each warp's four 8-feature tiles being gate, up,
// gate, up of the same 16 outputs, so that a lane holds both of silu's operands of an output.
template <bool GATED>
__device__ __forceinline__ const u8* weight_row(int r, int tile, const Outputs& p, const u8* w0,
                                                const u8* w1, const u8* w2, int n_in) {
    if (GATED) {
        const int sub = (r & 31) >> 3;
        const int o = tile * (GEMM_BN / 2) + (r >> 5) * 16 + (sub >> 1) * 8 + (r & 7);
        if (o >= p.n0) return nullptr;
        return ((sub & 1) ? w1 : w0) + (long long)o * n_in;
    }
    const int o = tile * GEMM_BN + r;
    if (o < p.n0) return w0 + (long long)o * n_in;
    if (o < p.n0 + p.n1) return w1 + (long long)(o - p.n0) * n_in;
    if (o < p.n_out) return w2 + (long long)(o - p.n0 - p.n1) * n_in;
    return nullptr;
}

// f(value, mt, nt, h, e) for each of a lane's 64 sums: value (mt, nt, 2h + e) of its
// fragments (see gemm's epilogue).
template <typename F>
__device__ __forceinline__ void each_value(float (&c)[4][4][4], F&& f) {
    #pragma unroll
    for (int mt = 0; mt < 4; mt++)
        #pragma unroll
        for (int h = 0; h < 2; h++)
            #pragma unroll
            for (int nt = 0; nt < 4; nt++)
                #pragma unroll
                for (int e = 0; e < 2; e++) f(c[mt][nt][2 * h + e], mt, nt, h, e);
}

template <bool GATED>
__device__ void gemm(const u16* x, int rows, int n_in, const u8* w0, const u8* w1,
                     const u8* w2, const Outputs& p, float* partial, int per_split) {
    extern __shared__ uint4 gemm_shared[];
    u16* xs = (u16*)gemm_shared;
    u8* ws = (u8*)gemm_shared + GEMM_STAGES * GEMM_X_STAGE;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp & 1, wn = warp >> 1;
    const int m0 = blockIdx.x * GEMM_BM;
    const int steps_all = n_in / GEMM_BK;
    const int k_begin = blockIdx.z * per_split;
    const int steps = min(steps_all, k_begin + per_split) - k_begin;

    // Each thread's cp.async sources: X_PIECES 16-byte pieces of x and W_PIECES of W, piece
    // i being number tid + 256 i of the tile, row by row; rows past the ends are zero-filled.
    constexpr int X_ROW = GEMM_BK / 8, W_ROW = GEMM_BK / 16;  // pieces per row
    constexpr int X_PIECES = GEMM_BM * X_ROW / 256, W_PIECES = GEMM_BN * W_ROW / 256;
    const u16* xsrc[X_PIECES];
    bool xvalid[X_PIECES];
    #pragma unroll
    for (int i = 0; i < X_PIECES; i++) {
        const int c = tid + i * 256, m = m0 + c / X_ROW;
        xvalid[i] = m < rows;
        xsrc[i] = xvalid[i] ? x + (long long)m * n_in + (c % X_ROW) * 8 : x;
    }
    const u8* wsrc[W_PIECES];
    #pragma unroll
    for (int i = 0; i < W_PIECES; i++) {
        const int c = tid + i * 256;
        const u8* w = weight_row<GATED>(c / W_ROW, blockIdx.y, p, w0, w1, w2, n_in);
        wsrc[i] = w ? w + (c % W_ROW) * 16 : nullptr;
    }
    auto load = [&](int stage, int step) {
        const long long k = (long long)(k_begin + step) * GEMM_BK;
        #pragma unroll
        for (int i = 0; i < X_PIECES; i++) {
            const int c = tid + i * 256;
            cp_async16(xs + stage * (GEMM_X_STAGE / 2) + (c / X_ROW) * GEMM_X_STRIDE + (c % X_ROW) * 8,
                       xvalid[i] ? xsrc[i] + k : x, xvalid[i]);
        }
        #pragma unroll
        for (int i = 0; i < W_PIECES; i++) {
            const int c = tid + i * 256;
            cp_async16(ws + stage * GEMM_W_STAGE + (c / W_ROW) * GEMM_W_STRIDE + (c % W_ROW) * 16,
                       wsrc[i] ? wsrc[i] + k : w0, wsrc[i] != nullptr);
        }
    };

    float c[4][4][4];
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++)
            #pragma unroll
            for (int e = 0; e < 4; e++) c[i][j][e] = 0.f;

    #pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; s++) {
        if (s < steps) load(s, s);
        cp_async_commit();
    }
    #pragma unroll 1
    for (int s = 0; s < steps; s++) {
        cp_async_wait<GEMM_STAGES - 2>();
        __syncthreads();
        const int next = s + GEMM_STAGES - 1;
        if (next < steps) load(next % GEMM_STAGES, next);
        cp_async_commit();
        const int stage = s % GEMM_STAGES;
        const u16* xt = xs + stage * (GEMM_X_STAGE / 2);
        const u8* wt = ws + stage * GEMM_W_STAGE;
        #pragma unroll
        for (int j = 0; j < GEMM_BK / 16; j++) {
            u32 a[4][4], b[4][2];
            #pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                const u16* r = xt + (wm * 64 + mt * 16 + g) * GEMM_X_STRIDE + j * 16 + 4 * t;
                const uint2 lo = *(const uint2*)r;
                const uint2 hi = *(const uint2*)(r + 8 * GEMM_X_STRIDE);
                a[mt][0] = lo.x; a[mt][1] = hi.x; a[mt][2] = lo.y; a[mt][3] = hi.y;
            }
            #pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const u32 w = *(const u32*)(wt + (wn * 32 + nt * 8 + g) * GEMM_W_STRIDE + j * 16 + 4 * t);
                b[nt][0] = scale_x(f8_bf16(w, 0x9180u));
                b[nt][1] = scale_x(f8_bf16(w, 0xb3a2u));
            }
            #pragma unroll
            for (int mt = 0; mt < 4; mt++)
                #pragma unroll
                for (int nt = 0; nt < 4; nt++)
                    mma(c[mt][nt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b[nt][0], b[nt][1]);
        }
    }
    cp_async_wait<0>();

    // Output (r, out) of value c[mt][nt][2h + e]: r = m0 + wm * 64 + mt * 16 + g + 8h; out =
    // the block's first output plus wn * 32 + nt * 8 + 2t + e, or gated (gate in even nt, up in
    // the odd nt after it) wn * 16 + (nt / 2) * 8 + 2t + e.
    auto row = [&](int mt, int h) { return m0 + wm * 64 + mt * 16 + g + 8 * h; };
    auto col = [&](int nt, int e) {
        return GATED ? blockIdx.y * (GEMM_BN / 2) + wn * 16 + (nt >> 1) * 8 + 2 * t + e
                     : blockIdx.y * GEMM_BN + wn * 32 + nt * 8 + 2 * t + e;
    };
    auto inside = [&](int mt, int nt, int h, int e) {
        return row(mt, h) < rows && col(nt, e) < p.n_out;
    };
    if (partial) {
        // Split (never gated): the raw sums.
        if (!GATED)
            each_value(c, [&](float& v, int mt, int nt, int h, int e) {
                if (inside(mt, nt, h, e))
                    partial[((long long)blockIdx.z * rows + row(mt, h)) * p.n_out + col(nt, e)] = v;
            });
        return;
    }
    // Every value first, then the stores (see finish); gated, the gate's values (even nt)
    // become the outputs.
    each_value(c, [&](float& v, int mt, int nt, int h, int e) {
        if (!inside(mt, nt, h, e)) return;
        if (!GATED) v = finish<false>(p, v, 0.f, row(mt, h), col(nt, e));
        else if (!(nt & 1)) v = finish<true>(p, v, c[mt][nt | 1][2 * h + e], row(mt, h), col(nt, e));
    });
    each_value(c, [&](float& v, int mt, int nt, int h, int e) {
        if (inside(mt, nt, h, e) && !(GATED && (nt & 1))) store(p, row(mt, h), col(nt, e), v);
    });
}

// The parameters of `finish` (Outputs), as the kernels below take them.
#define OUTPUT_PARAMS \
        int n0, int n1, int n2, const float* s0, const float* s1, const float* s2, \
        int m0, int m1, int m2, const u16* bias, int has_bias, const u16* res, int has_res, \
        int gelu, const u16* gate, long long gate_stride, u16* y, unsigned* watch, int tag
#define OUTPUTS(GATED) \
    Outputs{s0, s1, s2, m0, m1, m2, n0, n1, (GATED) ? n0 : n0 + n1 + n2, bias, has_bias, res, \
            has_res, gelu, gate, gate_stride, y, watch, tag}

// 256 threads, at most 128 registers: two blocks an SM (with at most 114 KiB of shared memory each).
#define GEMM(NAME, GATED) \
extern "C" __global__ void __launch_bounds__(256, 2) NAME( \
        const u16* x, int rows, int n_in, const u8* w0, const u8* w1, const u8* w2, \
        OUTPUT_PARAMS, float* partial, int per_split) { \
    gemm<GATED>(x, rows, n_in, w0, w1, w2, OUTPUTS(GATED), partial, per_split); }

GEMM(f8_gemm, false)
GEMM(f8_gemm_gated, true)

// Split-K's second half: output (r, o) is the sum of the `splits` slices' partial sums, in
// order, finished as the unsplit product would be. One thread per output.
extern "C" __global__ void f8_gemm_reduce(int rows, OUTPUT_PARAMS, const float* partial,
                                          int splits) {
    const Outputs p = OUTPUTS(false);
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * p.n_out) return;
    float acc = 0.f;
    for (int s = 0; s < splits; s++) acc += partial[(long long)s * rows * p.n_out + i];
    const int r = (int)(i / p.n_out), o = (int)(i % p.n_out);
    store(p, r, o, finish<false>(p, acc, 0.f, r, o));
}

// RMSNorm of each row of x before the product (the matvec normalises inside; a product of
// many rows reads each row many times, so it is normalised once): one block per row, the
// value rounded as the matvec rounds it, and with the modulation as `normalise8` forms it.
extern "C" __global__ void gemm_normalise(const u16* x, int n_in, const u16* nw, float eps,
                                          const u16* mod_scale1, const u16* mod_shift,
                                          long long mod_stride, u16* out) {
    __shared__ float sums[32];
    // The product that follows may start loading its weights (it waits for these rows).
    pdl_launch_next();
    const int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u16* row = x + (long long)r * n_in;
    float ss = 0.f;
    for (int k = threadIdx.x * 8; k < n_in; k += blockDim.x * 8) {
        u32 v[4];
        load8(v, row + k);
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            const float a = bf16f(v[j] & 0xffffu), b = bf16f(v[j] >> 16);
            ss += a * a + b * b;
        }
    }
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (lane == 0) sums[warp] = ss;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) total += sums[i];
    const float inv = rsqrtf(total / (float)n_in + eps);
    for (int k = threadIdx.x * 8; k < n_in; k += blockDim.x * 8) {
        u32 v[4], n[4];
        load8(v, row + k);
        load8(n, nw + k);
        if (mod_scale1) {
            u32 ms[4], mh[4];
            load8(ms, mod_scale1 + (long long)r * mod_stride + k);
            load8(mh, mod_shift + (long long)r * mod_stride + k);
            normalise8(v, n, inv, ms, mh);
        } else {
            #pragma unroll
            for (int j = 0; j < 4; j++)
                v[j] = bf2(bf16f(v[j] & 0xffffu) * inv * bf16f(n[j] & 0xffffu),
                           bf16f(v[j] >> 16) * inv * bf16f(n[j] >> 16));
        }
        *(uint4*)(out + (long long)r * n_in + k) = make_uint4(v[0], v[1], v[2], v[3]);
    }
}
#endif
