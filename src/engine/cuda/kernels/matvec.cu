// The decode path's matrix-vector product on tensor cores (sm_80 and newer): y = x W^T for
// float8 E4M3 weights W and up to MATVEC_MAX_ROWS rows of bf16 x, with the work around it fused
// in. Compiled for the device's architecture (engine::cuda, module "decode").
//
// The launch geometry comes from the Rust constants as -D defines (engine::cuda::kernel_defines):
// one block of MATVEC_WARPS warps per TILE_ROWS output features; its warps split the input
// features, each step multiplying a TILE_ROWS x TILE_INPUTS tile of float8 weights (decoded to
// bf16 in registers) by up to MATVEC_MAX_ROWS rows of x (bf16) with `mma.sync` and f32
// accumulation; the warps' sums meet in shared memory, where scale, bias, residual and the gate
// are applied. Each weight byte is read once, with loads that bypass L1.
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh prepended instead
#include "common.cuh"
#endif

#if !defined(MATVEC_WARPS) || !defined(TILE_ROWS) || !defined(TILE_INPUTS) || !defined(MATVEC_MAX_ROWS)
#error "matvec.cu needs -DMATVEC_WARPS, -DTILE_ROWS, -DTILE_INPUTS and -DMATVEC_MAX_ROWS (engine::cuda::kernel_defines)"
#endif
// The m16n8k16 product fixes the tile: 16 output features (rows g and g + 8 of a lane group),
// 8 rows of x (its n), and 64 inputs per step (16 bytes for each of a group's 4 lanes).
static_assert(TILE_ROWS == 16, "a tile is the m of one m16n8k16 product");
static_assert(MATVEC_MAX_ROWS == 8, "rows of x are the n of one m16n8k16 product");
static_assert(TILE_INPUTS == 64, "a step is 16 bytes for each of a lane group's 4 lanes");
static_assert(MATVEC_WARPS >= MATVEC_MAX_ROWS, "warp r sums the squares of row r");
static_assert(MATVEC_WARPS * 32 >= TILE_ROWS * MATVEC_MAX_ROWS, "one thread per output");

// log2 of a power of two. Steps are counted with a shift: a signed n_in / TILE_INPUTS would add
// the rounding toward zero of negative numbers.
__host__ __device__ constexpr int log2i(int v) { return v > 1 ? 1 + log2i(v / 2) : 0; }

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

// `tile` for NF groups of eight rows of x at once: the weights decoded once, each group's
// products in `tile`'s order (each row's sums as in a launch of its own).
template <int NF>
__device__ __forceinline__ void tile_rows(float (*c)[4], uint4 lo, uint4 hi, u32 (*xb)[8]) {
    u32 a[4] = {lo.x, lo.y, lo.z, lo.w}, b[4] = {hi.x, hi.y, hi.z, hi.w};
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        const u32 a0 = f8_even(a[j]), a1 = f8_even(b[j]), a2 = f8_odd(a[j]), a3 = f8_odd(b[j]);
        #pragma unroll
        for (int f = 0; f < NF; f++) mma(c[f], a0, a1, a2, a3, xb[f][2 * j], xb[f][2 * j + 1]);
    }
}

__device__ __forceinline__ void load8(u32* w, const u16* p) {
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}

// load8 as a volatile load: issued where it is written, with the weight loads of its round,
// not moved down to its first use.
__device__ __forceinline__ void load8v(u32* w, const u16* p) {
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}

// `v` rounded to bf16, as a float.
__device__ __forceinline__ float rnd(float v) { return bf16f(to_bf16(v)); }

// The lane's 16 x values (`w`, eight bf16 pairs in order) as the product's operand: eight
// bf16x2 times X_SCALE, paired as `tile` pairs the weights (elements (4j, 4j + 2) in xb[2j],
// (4j + 1, 4j + 3) in xb[2j + 1]); RMS-normalised in f32 (times `inv`, the row's 1/rms times
// X_SCALE, and the norm weight's values `n`) when `normed`, else x's own values, scaled
// exactly; zeros when not `has` (a lane past the rows).
__device__ __forceinline__ void x_operand(u32* xb, const u32* w, const u32* n, bool has,
                                          bool normed, float inv) {
    if (!has) {
        #pragma unroll
        for (int i = 0; i < 8; i++) xb[i] = 0u;
    } else if (normed) {
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
}

// x_operand of the lane's 16 x values of row g at input k, loaded here (and the norm weight's
// when `nw` is given).
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
            x_operand(xb, w, n, true, true, inv);
        } else {
            x_operand(xb, w, w, true, false, inv);
        }
    } else {
        x_operand(xb, nullptr, nullptr, false, false, inv);
    }
}

// Eight elements of a normalised and modulated row as bf16: `raw` (bf16 pairs) times `inv` and
// the norm weight `nw` in f32, rounded; times `s1`, rounded; plus `sh` (bf16 pairs), rounded, as
// the unfused ops.
__device__ __forceinline__ void normalise8(u32* raw, const u32* nw, float inv, const u32* s1,
                                           const u32* sh) {
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        float v[2];
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            const int shift = 16 * h;
            auto half = [shift](u32 pair) { return bf16f((pair >> shift) & 0xffffu); };
            v[h] = rnd(half(raw[i]) * inv * half(nw[i]));
            v[h] = rnd(__fmul_rn(v[h], half(s1[i])));
            v[h] = rnd(__fadd_rn(v[h], half(sh[i])));
        }
        raw[i] = (u32)to_bf16(v[0]) | ((u32)to_bf16(v[1]) << 16);
    }
}

// Where a product's outputs go and what is done to them first (see finish).
struct Outputs {
    const float* s0;  // the segments' scales: none (mode 0), one value (1) or one per row (2)
    const float* s1;
    const float* s2;
    int m0, m1, m2;
    int n0, n1, n_out;  // the first two segments' rows; outputs per row of y
    const u16* bias;
    int has_bias;
    const u16* res;
    int has_res;
    int gelu;
    const u16* gate;
    long long gate_stride;
    u16* y;
    unsigned* watch;
    int tag;
};

// Output o of row r of a product from its f32 sum `acc` at 2^-56 of its value (and, GATED,
// the up projection's `accu`): times 2^56 and its segment's scale; silu(gate) * up when
// GATED, else plus the bias; GELU, the gate and the residual as described at matvec. The value
// before its rounding to bf16 (`store`). Only loads: a caller finishing many outputs computes
// them all before it stores any, so that the loads are not held behind possibly aliasing stores.
template <bool GATED>
__device__ __forceinline__ float finish(const Outputs& p, float acc, float accu, int r, int o) {
    float v;
    if (GATED) {
        float sg = UNSCALE * (p.m0 == 0 ? 1.f : p.s0[p.m0 == 1 ? 0 : o]);
        float su = UNSCALE * (p.m1 == 0 ? 1.f : p.s1[p.m1 == 1 ? 0 : o]);
        float gv = acc * sg;
        v = gv / (1.f + __expf(-gv)) * (accu * su);
    } else {
        const float* s = p.s0;
        int m = p.m0, local = o;
        if (o >= p.n0 + p.n1) { s = p.s2; m = p.m2; local = o - p.n0 - p.n1; }
        else if (o >= p.n0) { s = p.s1; m = p.m1; local = o - p.n0; }
        v = acc * UNSCALE * (m == 0 ? 1.f : s[m == 1 ? 0 : local]);
        if (p.has_bias) v += bf16f(p.bias[o]);
    }
    // candle's bf16 gelu_erf: x times its normal CDF rounded, the product rounded.
    if (p.gelu) {
        v = rnd(v);
        v = rnd(__fmul_rn(v, rnd(normcdff(v))));
    }
    if (p.gate) v = rnd(__fmul_rn(rnd(v), bf16f(p.gate[(long long)r * p.gate_stride + o])));
    if (p.has_res) v += bf16f(p.res[(long long)r * p.n_out + o]);
    return v;
}

// `v` (from `finish`) stored as output o of row r in bf16; the watch lowered to the tag when it
// is NaN or infinite (also a finite f32 that rounds to a bf16 infinity).
__device__ __forceinline__ void store(const Outputs& p, int r, int o, float v) {
    u16 out = to_bf16(v);
    p.y[(long long)r * p.n_out + o] = out;
    if (p.watch && (out & 0x7f80u) == 0x7f80u) atomicMin(p.watch, (unsigned)p.tag);
}

// What a round loads ahead with its weights (matvec's X_AHEAD): nothing, x's words (a product
// without a norm), or x's and the norm weight's (with one).
#define X_NONE 0
#define X_PLAIN 1
#define X_NORMED 2

// y = [x W0^T | x W1^T | x W2^T] (+ bias) (+ residual), or silu(x W0^T) * (x W1^T) when GATED,
// for up to NF groups of MATVEC_MAX_ROWS rows of x (NF > 1: no norm, gate, GELU or gating);
// every segment's rows a multiple of TILE_ROWS, n_in a multiple of TILE_INPUTS, weights and x
// 16-byte aligned. U steps of TILE_INPUTS inputs are
// loaded before any is multiplied (the first before the norm's sums). With X_AHEAD, the U
// steps' x words (X_PLAIN: `nw` must be null; X_NORMED: it must not, and its words come too)
// are loaded with their weights, so that a round waits for one round trip rather than one more
// per step: the same sums in the same order, more registers.
// With `nw`, x is RMS-normalised first: warp r sums the squares of row r while the first loads
// are in flight, and each step normalises its inputs in f32 (the decode path). (Rows under an
// adaLN modulation are normalised and modulated by `gemm_normalise` first, and come without
// `nw`: engine::cuda::product.)
// With `gelu`, the output (after the bias) is rounded and passed through GELU as candle's bf16
// gelu_erf. With `gate`, the product is rounded, times gate[r, o] rounded, and the residual
// added: x + gate * f as the unfused bf16 ops.
// When `watch` is given, an output that is NaN or infinite lowers it to `tag` (atomicMin).
// A block takes tiles blockIdx.x, + gridDim.x, ...: a grid smaller than the tiles (the gated
// kernel's, three blocks an SM) keeps each block's norm and lets the next tile's first weights
// load while a tile's sums meet (LM gate/up 42.2 -> 38.4 us on the H200, `docs/mvprobe`).
template <bool GATED, int U, int X_AHEAD, int NF>
__device__ void matvec(
        const u16* x, int rows, int n_in,
        const u8* w0, const u8* w1, const u8* w2, int n0, int n1, int n2,
        const float* s0, const float* s1, const float* s2, int m0, int m1, int m2,
        const u16* bias, int has_bias, const u16* res, int has_res,
        const u16* nw, float eps, int gelu, const u16* gate,
        long long gate_stride, u16* y, unsigned* watch, int tag) {
    static_assert(NF == 1 || (!GATED && X_AHEAD == X_NONE), "wide: plain products only");
    constexpr int PARTS = GATED ? 2 : 1, ROWS = NF * MATVEC_MAX_ROWS;
    __shared__ float red[PARTS][MATVEC_WARPS][TILE_ROWS][ROWS];
    __shared__ float inv_rms[MATVEC_MAX_ROWS];
    pdl_launch_next();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int tiles = (GATED ? n0 : n0 + n1 + n2) / TILE_ROWS;
    const int steps = n_in >> log2i(TILE_INPUTS);
    // This lane's weight rows in tile t (r0, r1; u0, u1 the up projection's when GATED).
    const u8 *r0, *r1, *u0, *u1;
    auto at = [&](int t) {
        int o0 = t * TILE_ROWS, local = o0;
        const u8* w;
        if (GATED || o0 < n0) { w = w0; }
        else if (o0 < n0 + n1) { w = w1; local = o0 - n0; }
        else { w = w2; local = o0 - n0 - n1; }
        r0 = w + (long long)(local + g) * n_in + q * (TILE_INPUTS / 4);
        r1 = r0 + (long long)(TILE_ROWS / 2) * n_in;
        u0 = w1 + (long long)(local + g) * n_in + q * (TILE_INPUTS / 4);
        u1 = u0 + (long long)(TILE_ROWS / 2) * n_in;
    };
    uint4 lo[U], hi[U], ulo[U], uhi[U];
    // X_AHEAD: this lane's x words of each of the round's steps (row g; none past the rows)
    // and the norm weight's.
    u32 xw[X_AHEAD ? U : 1][8], nv[X_AHEAD == X_NORMED ? U : 1][8];
    const u16* xg = x + (long long)min(g, rows - 1) * n_in + q * (TILE_INPUTS / 4);
    const u16* ng = nw + q * (TILE_INPUTS / 4);
    auto load_xw = [&](int base) {
        #pragma unroll
        for (int i = 0; i < (X_AHEAD ? U : 0); i++) {
            int st = base + i * MATVEC_WARPS;
            if (st < steps && g < rows) {
                load8v(xw[i], xg + st * TILE_INPUTS);
                load8v(xw[i] + 4, xg + st * TILE_INPUTS + 8);
                if (X_AHEAD == X_NORMED) {
                    load8v(nv[X_AHEAD == X_NORMED ? i : 0], ng + st * TILE_INPUTS);
                    load8v(nv[X_AHEAD == X_NORMED ? i : 0] + 4, ng + st * TILE_INPUTS + 8);
                }
            }
        }
    };
    auto load = [&](int base) {
        #pragma unroll
        for (int i = 0; i < U; i++) {
            int st = base + i * MATVEC_WARPS;
            if (st < steps) {
                lo[i] = load_stream(r0 + st * TILE_INPUTS);
                hi[i] = load_stream(r1 + st * TILE_INPUTS);
                if (GATED) {
                    ulo[i] = load_stream(u0 + st * TILE_INPUTS);
                    uhi[i] = load_stream(u1 + st * TILE_INPUTS);
                }
            }
        }
    };
    int t = blockIdx.x;
    at(t);
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
    const Outputs p{s0, s1, s2, m0, m1, m2, n0, n1, GATED ? n0 : n0 + n1 + n2, bias, has_bias,
                    res, has_res, gelu, gate, gate_stride, y, watch, tag};
    // Tiles blockIdx.x, + gridDim.x, ...: one where the grid covers them all.
    for (; t < tiles; t += gridDim.x) {
        float c[NF][4], cu[4] = {0.f, 0.f, 0.f, 0.f};
        #pragma unroll
        for (int f = 0; f < NF; f++) c[f][0] = c[f][1] = c[f][2] = c[f][3] = 0.f;
        load_xw(warp);
        for (int base = warp; base < steps; base += MATVEC_WARPS * U) {
            if (base != warp) {
                load(base);
                load_xw(base);
            }
            #pragma unroll
            for (int i = 0; i < U; i++) {
                int st = base + i * MATVEC_WARPS;
                if (st < steps && NF > 1) {
                    // Groups of eight rows of x, without a norm (the wide kernel's).
                    u32 xb[NF][8];
                    const int k = st * TILE_INPUTS + q * (TILE_INPUTS / 4);
                    #pragma unroll
                    for (int f = 0; f < NF; f++)
                        load_x(xb[f], x, g + f * MATVEC_MAX_ROWS, rows, n_in, k, nullptr, inv);
                    tile_rows<NF>(c, lo[i], hi[i], xb);
                } else if (st < steps) {
                    u32 xb[8];
                    if (X_AHEAD) {
                        x_operand(xb, xw[X_AHEAD ? i : 0], nv[X_AHEAD == X_NORMED ? i : 0], g < rows,
                                  X_AHEAD == X_NORMED, inv);
                    } else {
                        const int k = st * TILE_INPUTS + q * (TILE_INPUTS / 4);
                        load_x(xb, x, g, rows, n_in, k, nw, inv);
                    }
                    tile(c[0], lo[i], hi[i], xb);
                    if (GATED) tile(cu, ulo[i], uhi[i], xb);
                }
            }
        }
        // The next tile's first round loads while this one's sums meet.
        const bool more = t + (int)gridDim.x < tiles;
        if (more) {
            at(t + gridDim.x);
            load(warp);
        }
        #pragma unroll
        for (int f = 0; f < NF; f++) {
            const int r0 = f * MATVEC_MAX_ROWS + 2 * q;
            red[0][warp][g][r0] = c[f][0];
            red[0][warp][g][r0 + 1] = c[f][1];
            red[0][warp][g + TILE_ROWS / 2][r0] = c[f][2];
            red[0][warp][g + TILE_ROWS / 2][r0 + 1] = c[f][3];
        }
        if (GATED) {
            red[PARTS - 1][warp][g][2 * q] = cu[0];
            red[PARTS - 1][warp][g][2 * q + 1] = cu[1];
            red[PARTS - 1][warp][g + TILE_ROWS / 2][2 * q] = cu[2];
            red[PARTS - 1][warp][g + TILE_ROWS / 2][2 * q + 1] = cu[3];
        }
        __syncthreads();
        for (int e = threadIdx.x; e < TILE_ROWS * ROWS; e += blockDim.x) {
            const int f = e / ROWS, r = e % ROWS;
            if (r >= rows) continue;
            float acc = 0.f, accu = 0.f;
            #pragma unroll
            for (int i = 0; i < MATVEC_WARPS; i++) {
                acc += red[0][i][f][r];
                if (GATED) accu += red[PARTS - 1][i][f][r];
            }
            const int o = t * TILE_ROWS + f;
            store(p, r, o, finish<GATED>(p, acc, accu, r, o));
        }
        // `red` is written again only after every sum of it is read.
        if (more) __syncthreads();
    }
}

// At most 85 registers, three blocks an SM: more (an earlier build's 120) halved the blocks and
// slowed every product; fewer (64, four blocks) spilled and was slower too. The X_AHEAD kernel
// of four steps a round is for products without a norm of at most two tiles an SM (down, o;
// engine::cuda::product), which never have a third block an SM to lose: up to 128 registers,
// two blocks an SM; that of two steps a round, for normed ones of at most three (q/k/v). The
// wide kernel takes up to three groups of eight rows of a plain product (the head's adaLN
// modulations of a frame's 20 rows), two blocks an SM.
#define MATVEC(NAME, GATED, U, X_AHEAD, NF, BLOCKS) \
extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * 32, BLOCKS) NAME( \
        const u16* x, int rows, int n_in, \
        const u8* w0, const u8* w1, const u8* w2, int n0, int n1, int n2, \
        const float* s0, const float* s1, const float* s2, int m0, int m1, int m2, \
        const u16* bias, int has_bias, const u16* res, int has_res, \
        const u16* nw, float eps, int gelu, const u16* gate, long long gate_stride, \
        u16* y, unsigned* watch, int tag) { \
    matvec<GATED, U, X_AHEAD, NF>(x, rows, n_in, w0, w1, w2, n0, n1, n2, s0, s1, s2, m0, m1, m2, \
                              bias, has_bias, res, has_res, nw, eps, gelu, gate, gate_stride, y, \
                              watch, tag); }

MATVEC(f8_matvec_mma, false, 4, X_NONE, 1, 3)
MATVEC(f8_matvec_mma_gated, true, 2, X_NONE, 1, 3)
MATVEC(f8_matvec_mma_x_ahead, false, 4, X_PLAIN, 1, 2)
MATVEC(f8_matvec_mma_x_ahead_normed, false, 2, X_NORMED, 1, 3)
MATVEC(f8_matvec_mma_wide, false, 4, X_NONE, 3, 2)
#endif
