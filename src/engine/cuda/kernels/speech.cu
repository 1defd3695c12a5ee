// The speech tokenizers' fused block kernels (module "speech"): the mixer half of a Block1D
// (channel RMSNorm, depthwise causal convolution with its streaming cache, bias, layer scale
// and residual), the feed-forward half's channel RMSNorm (transposing [B, C, T] to [B, T, C])
// and its scaled residual (back to [B, C, T]). Each step rounds to the storage type where the
// unfused candle ops would (`rnd`), and products and sums use the _rn intrinsics so that no
// multiply-add is contracted: the results equal the unfused ops' up to the order of the sum of
// squares (engine::ops::DepthwiseMixer says what each computes).
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh prepended instead
#include "common.cuh"
#endif

// Loads, stores and rounding of an element type: f32 (`float`) or bf16 (`u16` bits).
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const u16* p, long long i) { return bf16f(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(u16* p, long long i, float v) { p[i] = to_bf16(v); }
__device__ __forceinline__ float rnd(float v, const float*) { return v; }
__device__ __forceinline__ float rnd(float v, const u16*) { return bf16f(to_bf16(v)); }

// A [B, C, T] input with any strides, with `ctx` columns of an optional cache (same strides
// convention; null: zeros) in front: column e < ctx is the cache's, e >= ctx is x's e - ctx.
template <typename T>
struct Ext {
    const T* x;
    long long xb, xc, xt;
    const T* cache;
    long long cb, cc, ct;
    int ctx;

    __device__ __forceinline__ float at(int b, int c, int e) const {
        if (e < ctx) return cache ? ld(cache, b * cb + c * cc + e * ct) : 0.f;
        return ld(x, b * xb + c * xc + (long long)(e - ctx) * xt);
    }
};

// inv[i] = 1 / sqrt(mean over c of src(b, c, col0 + i)^2 + eps) for i < ncols, as candle's
// sum, affine (times `inv_c` = 1/C), affine (+ eps), sqrt and recip compute it. Each column's
// squares add up in one order whatever the tile (so that streamed equals whole bit for bit):
// channel row r < 32 sums channels r, r + 32, ... in turn, then the 32 row sums add up in row
// order. The block takes all (row, column) pairs at once, each thread a pair at a time with
// sixteen loads in flight; `part` holds 32 * ncols partial sums.
template <typename T>
__device__ void column_inv_rms(const Ext<T>& src, int b, int C, int col0, int ncols, float inv_c,
                               float eps, float* inv, float* part) {
    const int rows = 32;
    for (int p = threadIdx.x; p < rows * ncols; p += blockDim.x) {
        const int row = p / ncols, col = p - row * ncols, e = col0 + col;
        float s = 0.f;
        int c = row;
        for (; c + 15 * rows < C; c += 16 * rows) {
            float v[16];
#pragma unroll
            for (int u = 0; u < 16; u++) v[u] = src.at(b, c + u * rows, e);
#pragma unroll
            for (int u = 0; u < 16; u++) s += v[u] * v[u];
        }
        for (; c < C; c += rows) {
            float v = src.at(b, c, e);
            s += v * v;
        }
        part[p] = s;
    }
    __syncthreads();
    for (int col = threadIdx.x; col < ncols; col += blockDim.x) {
        float total = 0.f;
        for (int r = 0; r < rows; r++) total += part[r * ncols + col];
        float mean = __fmul_rn(total, inv_c);
        float v = __fadd_rn(mean, eps);
        inv[col] = (float)(1.0 / (double)sqrtf(v));
    }
    __syncthreads();
}

// y[b, c, t] = x + gamma[c] * (bias[c] + sum_j taps[c, j] * h(e = t + j)) for t < len, where
// h(e) = rnd(rnd(ext(e) * inv(e)) * norm_w[c]) over the cache-extended input; with out_len =
// len + ctx, columns len.. carry ext's last ctx columns (the next chunk's cache) as they are.
// Grid (ceil(out_len / tile_t), ceil(C / tile_c), B); dynamic shared memory 33 (tile_t + k - 1)
// floats.
template <typename T>
__device__ void dw_mixer(const T* x, long long xb, long long xc, long long xt, const T* cache,
                         long long cb, long long cc, long long ct, const T* norm_w,
                         const float* taps, const T* bias, const T* gamma, T* out, int C,
                         int len, int k, int out_len, float inv_c, float eps, int tile_t,
                         int tile_c) {
    extern __shared__ float smem[];
    const int ctx = k - 1;
    float* inv = smem;
    float* part = smem + tile_t + ctx;
    const Ext<T> ext = {x, xb, xc, xt, cache, cb, cc, ct, ctx};
    const int o0 = blockIdx.x * tile_t, c0 = blockIdx.y * tile_c, b = blockIdx.z;
    const int ncols = min(tile_t + ctx, ctx + len - o0);
    column_inv_rms(ext, b, C, o0, ncols, inv_c, eps, inv, part);
    const int nout = min(tile_t, out_len - o0), nch = min(tile_c, C - c0);
    for (int i = threadIdx.x; i < nout * nch; i += blockDim.x) {
        const int t = o0 + i % nout, c = c0 + i / nout;
        const long long o = ((long long)b * C + c) * out_len + t;
        if (t >= len) {  // a cache column: the raw input
            st(out, o, ext.at(b, c, t));
            continue;
        }
        const float w = ld(norm_w, c), bc = ld(bias, c), gc = ld(gamma, c);
        const float res = ext.at(b, c, t + ctx);
        // Tap j's product added in order, as the unfused convolution adds them.
        float acc = 0.f;
        auto tap = [&](int j, float v, float weight) {
            const float h = rnd(__fmul_rn(rnd(__fmul_rn(v, inv[t + j - o0]), x), w), x);
            const float p = __fmul_rn(h, weight);
            acc = j == 0 ? p : __fadd_rn(acc, p);
        };
        if (k == 7) {  // the tokenizers' kernel: every input and tap loaded before any is used
            float in[7], tp[7];
#pragma unroll
            for (int j = 0; j < 7; j++) {
                in[j] = ext.at(b, c, t + j);
                tp[j] = taps[(long long)c * 7 + j];
            }
#pragma unroll
            for (int j = 0; j < 7; j++) tap(j, in[j], tp[j]);
        } else {
            for (int j = 0; j < k; j++) tap(j, ext.at(b, c, t + j), taps[(long long)c * k + j]);
        }
        float y = rnd(__fadd_rn(rnd(acc, x), bc), x);
        y = rnd(__fmul_rn(y, gc), x);
        st(out, o, __fadd_rn(res, y));
    }
}

// out[b, t, c] = rnd(rnd(x[b, c, t] * inv(t)) * w[c]): x [B, C, T] with any strides, out
// contiguous. Grid (ceil(T / tile_t), ceil(C / tile_c), B): each block its time steps' sums over
// every channel (in the one order, so the bits do not depend on the tiles) and its tile_c
// channels' outputs, four a thread at a time with their loads first; dynamic shared memory 33
// tile_t floats.
template <typename T>
__device__ void channel_norm(const T* x, long long xb, long long xc, long long xt, const T* w,
                             T* out, int C, int len, float inv_c, float eps, int tile_t,
                             int tile_c) {
    extern __shared__ float smem[];
    float* inv = smem;
    float* part = smem + tile_t;
    const Ext<T> ext = {x, xb, xc, xt, nullptr, 0, 0, 0, 0};
    const int t0 = blockIdx.x * tile_t, c0 = blockIdx.y * tile_c, b = blockIdx.z;
    const int nt = min(tile_t, len - t0), nch = min(tile_c, C - c0), n = nt * nch;
    column_inv_rms(ext, b, C, t0, nt, inv_c, eps, inv, part);
    auto put = [&](int i, float v, float wc) {
        const int c = c0 + i % nch, t = t0 + i / nch;
        const float r = rnd(__fmul_rn(v, inv[t - t0]), x);
        st(out, ((long long)b * len + t) * C + c, __fmul_rn(r, wc));
    };
    constexpr int U = 4;
    const int step = U * blockDim.x;
    int i0 = threadIdx.x;
    for (; i0 + (U - 1) * (int)blockDim.x < n; i0 += step) {
        float v[U], wc[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = i0 + u * blockDim.x;
            v[u] = ext.at(b, c0 + i % nch, t0 + i / nch);
            wc[u] = ld(w, c0 + i % nch);
        }
#pragma unroll
        for (int u = 0; u < U; u++) put(i0 + u * blockDim.x, v[u], wc[u]);
    }
    for (int i = i0; i < n; i += blockDim.x) put(i, ext.at(b, c0 + i % nch, t0 + i / nch), ld(w, c0 + i % nch));
}

// out[b, c, t] = x[b, c, t] + rnd(gamma[c] * h[b, t, c]): x [B, C, T] with any strides, h
// [B, T, C] and out [B, C, T] contiguous; one thread per output, grid-stride.
template <typename T>
__device__ void channel_residual(const T* x, long long xb, long long xc, long long xt,
                                 const T* h, const T* gamma, T* out, int B, int C, int len) {
    const long long n = (long long)B * C * len;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(i % len), c = (int)(i / len % C), b = (int)(i / len / C);
        const float g = rnd(__fmul_rn(ld(h, ((long long)b * len + t) * C + c), ld(gamma, c)), x);
        st(out, i, __fadd_rn(ld(x, b * xb + c * xc + t * xt), g));
    }
}

// out[b, c, t] = x[b, c, t] + bias[c]: x [B, C, T] with any strides, out contiguous; one thread
// per output, grid-stride.
template <typename T>
__device__ void channel_bias(const T* x, long long xb, long long xc, long long xt, const T* bias,
                             T* out, int B, int C, int len) {
    const long long n = (long long)B * C * len;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(i % len), c = (int)(i / len % C), b = (int)(i / len / C);
        st(out, i, __fadd_rn(ld(x, b * xb + c * xc + t * xt), ld(bias, c)));
    }
}

// One guided DPM-Solver++ step (engine::ops::DpmStep): v [2n] (conditional, then
// unconditional), x and prev [n], out [2n] (the next sample, then the data prediction), all
// contiguous; prev is read only when `second`. One thread per element, grid-stride.
template <typename T>
__device__ void dpm_step(const T* v, const T* x, const T* prev, T* out, int n, float cfg,
                         float alpha, float sigma, float a, float b, int second, float r_inv,
                         float half_b) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float vc = ld(v, i), vu = ld(v, (long long)n + i);
        const float d = rnd(__fsub_rn(vc, vu), x);
        const float g = rnd(__fadd_rn(vu, rnd(__fmul_rn(d, cfg), x)), x);
        const float xs = ld(x, i);
        const float x0 = rnd(__fsub_rn(__fmul_rn(xs, alpha), __fmul_rn(g, sigma)), x);
        float next = __fsub_rn(__fmul_rn(xs, a), __fmul_rn(x0, b));
        if (second) {
            const float d1 = __fmul_rn(__fsub_rn(x0, ld(prev, i)), r_inv);
            next = __fsub_rn(next, __fmul_rn(d1, half_b));
        }
        st(out, i, next);
        st(out, (long long)n + i, x0);
    }
}

#define SPEECH_KERNELS(NAME, T)                                                                   \
    extern "C" __global__ void dw_mixer_##NAME(                                                   \
        const T* x, long long xb, long long xc, long long xt, const T* cache, long long cb,       \
        long long cc, long long ct, const T* norm_w, const float* taps, const T* bias,            \
        const T* gamma, T* out, int C, int len, int k, int out_len, float inv_c, float eps,       \
        int tile_t, int tile_c) {                                                                 \
        dw_mixer(x, xb, xc, xt, cache, cb, cc, ct, norm_w, taps, bias, gamma, out, C, len, k,     \
                 out_len, inv_c, eps, tile_t, tile_c);                                            \
    }                                                                                             \
    extern "C" __global__ void channel_norm_##NAME(                                               \
        const T* x, long long xb, long long xc, long long xt, const T* w, T* out, int C, int len, \
        float inv_c, float eps, int tile_t, int tile_c) {                                         \
        channel_norm(x, xb, xc, xt, w, out, C, len, inv_c, eps, tile_t, tile_c);                  \
    }                                                                                             \
    extern "C" __global__ void channel_residual_##NAME(const T* x, long long xb, long long xc,    \
                                                       long long xt, const T* h, const T* gamma,  \
                                                       T* out, int B, int C, int len) {           \
        channel_residual(x, xb, xc, xt, h, gamma, out, B, C, len);                                \
    }                                                                                             \
    extern "C" __global__ void channel_bias_##NAME(const T* x, long long xb, long long xc,        \
                                                   long long xt, const T* bias, T* out, int B,    \
                                                   int C, int len) {                              \
        channel_bias(x, xb, xc, xt, bias, out, B, C, len);                                        \
    }                                                                                             \
    extern "C" __global__ void dpm_step_##NAME(const T* v, const T* x, const T* prev, T* out,     \
                                               int n, float cfg, float alpha, float sigma,        \
                                               float a, float b, int second, float r_inv,         \
                                               float half_b) {                                    \
        dpm_step(v, x, prev, out, n, cfg, alpha, sigma, a, b, second, r_inv, half_b);             \
    }

SPEECH_KERNELS(f32, float)
SPEECH_KERNELS(bf16, u16)
