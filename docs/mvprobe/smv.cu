// A persistent float8 matrix-vector product whose weights stream through a ring of shared-memory
// stages filled by the bulk copy engine (sm_90 `cp.async.bulk`, completing on mbarriers), for
// products whose few output tiles leave the one-block-per-tile kernel short of the GPU's memory
// bandwidth (down and o: 224 tiles on 132 SMs). Probe version: needs matvec.cu's helpers.
//
// Work: `units` = tiles x chunks, a chunk being a fixed run of k-steps of one 16-row tile; block
// b takes units [b U / G, (b + 1) U / G) in tile-major order. Warps 0..7 consume (warp w takes
// a chunk's steps w, w + 8, ... as matvec's warp w does), warp 8 produces (its lanes copy one
// row segment each per stage). A unit's sum is the warps' sums in order 0..7; a tile's, its
// chunks' sums in chunk order, whether one block did them all (in registers) or several (in
// `part`, the last to finish, by `count`, adds them): the same bits for any grid.

typedef unsigned long long u64_t;

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u64_t* b, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(b)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_wait(u64_t* b, u32 parity) {
    u32 a = smem_addr(b), ok;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(ok) : "r"(a), "r"(parity) : "memory");
    } while (!ok);
}

__device__ __forceinline__ void mbar_arrive(u64_t* b) {
    asm volatile("{ .reg .b64 s; mbarrier.arrive.shared::cta.b64 s, [%0]; }" :: "r"(smem_addr(b)) : "memory");
}

__device__ __forceinline__ void mbar_expect(u64_t* b, u32 bytes) {
    asm volatile("{ .reg .b64 s; mbarrier.arrive.expect_tx.shared::cta.b64 s, [%0], %1; }"
                 :: "r"(smem_addr(b)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, u64_t* bar, u64_t policy) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy) : "memory");
}

__device__ __forceinline__ uint4 lds128(const u8* p) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem_addr(p)));
    return v;
}

__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;" :: "n"(MATVEC_WARPS * 32) : "memory");
}
__device__ __forceinline__ void finishers_sync() {
    asm volatile("bar.sync 2, %0;" :: "n"(TILE_ROWS * MATVEC_MAX_ROWS) : "memory");
}

template <bool GATED, int STAGES, int SBYTES>
__device__ void smv(
        const u16* x, int rows, int n_in,
        const u8* w0, const u8* w1, const u8* w2, int n0, int n1, int n2,
        const float* s0, const float* s1, const float* s2, int m0, int m1, int m2,
        const u16* bias, int has_bias, const u16* res, int has_res,
        const u16* nw, float eps, int gelu, const u16* gate,
        long long gate_stride, u16* y, unsigned* watch, int tag,
        int chunks, int chunk_steps, float* part, unsigned* count) {
    constexpr int PARTS = GATED ? 2 : 1;
    constexpr int SPS = SBYTES / TILE_INPUTS;       // steps a stage
    constexpr int PITCH = SBYTES + 64;              // conflict-free 16-byte reads
    constexpr int SROWS = PARTS * TILE_ROWS;
    constexpr int STAGE = SROWS * PITCH;
    extern __shared__ __align__(128) u8 ring[];
    __shared__ __align__(8) u64_t full[STAGES], empty[STAGES];
    __shared__ float red[2][PARTS][MATVEC_WARPS][TILE_ROWS][MATVEC_MAX_ROWS];
    __shared__ float inv_rms[MATVEC_MAX_ROWS];
    __shared__ int last_flag;
    pdl_launch_next();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int tiles = (GATED ? n0 : n0 + n1 + n2) / TILE_ROWS;
    const int steps = n_in >> log2i(TILE_INPUTS);
    const long long units = (long long)tiles * chunks;
    const int u0 = (int)(units * blockIdx.x / gridDim.x), u1 = (int)(units * (blockIdx.x + 1) / gridDim.x);
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], MATVEC_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (warp == MATVEC_WARPS) {
        // The producer: weights never depend on earlier kernels, so it starts at once.
        u64_t policy;
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        int stage = 0;
        u32 phase = 0;
        for (int u = u0; u < u1; u++) {
            const int t = u / chunks, ch = u - t * chunks;
            const int o0 = t * TILE_ROWS;
            const u8* w;
            int local = o0;
            if (GATED || o0 < n0) { w = w0; }
            else if (o0 < n0 + n1) { w = w1; local = o0 - n0; }
            else { w = w2; local = o0 - n0 - n1; }
            const int sa = ch * chunk_steps, sb = min(sa + chunk_steps, steps);
            for (int st = sa; st < sb; st += SPS) {
                const u32 bytes = (u32)min(SPS, sb - st) * TILE_INPUTS;
                mbar_wait(&empty[stage], phase ^ 1u);
                if (lane == 0) mbar_expect(&full[stage], bytes * SROWS);
                __syncwarp();
                if (lane < SROWS) {
                    const u8* base = (GATED && lane >= TILE_ROWS)
                        ? w1 + (long long)(local + lane - TILE_ROWS) * n_in
                        : w + (long long)(local + lane) * n_in;
                    bulk_copy(ring + stage * STAGE + lane * PITCH, base + (long long)st * TILE_INPUTS,
                              bytes, &full[stage], policy);
                }
                if (++stage == STAGES) { stage = 0; phase ^= 1u; }
            }
        }
        return;
    }
    // Consumers: everything below reads what earlier kernels wrote.
    pdl_wait_previous();
    float inv = 1.f;
    if (nw) {
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
        consumers_sync();
        inv = g < rows ? inv_rms[g] * X_SCALE : 0.f;
    }
    const Outputs p{s0, s1, s2, m0, m1, m2, n0, n1, GATED ? n0 : n0 + n1 + n2, bias, has_bias,
                    res, has_res, gelu, gate, gate_stride, y, watch, tag};
    const bool finisher = threadIdx.x < TILE_ROWS * MATVEC_MAX_ROWS;
    const int f = threadIdx.x / MATVEC_MAX_ROWS, r = threadIdx.x % MATVEC_MAX_ROWS;
    float tacc = 0.f, taccu = 0.f;
    int stage = 0, ub = 0;
    u32 phase = 0;
    for (int u = u0; u < u1; u++) {
        const int t = u / chunks, ch = u - t * chunks;
        const int sa = ch * chunk_steps, sb = min(sa + chunk_steps, steps);
        float c[4] = {0.f, 0.f, 0.f, 0.f}, cu[4] = {0.f, 0.f, 0.f, 0.f};
        for (int st = sa; st < sb; st += SPS) {
            const int n = min(SPS, sb - st);
            mbar_wait(&full[stage], phase);
            const u8* sm = ring + stage * STAGE + g * PITCH + q * (TILE_INPUTS / 4);
            for (int j = warp; j < n; j += MATVEC_WARPS) {
                uint4 lo = lds128(sm + j * TILE_INPUTS);
                uint4 hi = lds128(sm + (TILE_ROWS / 2) * PITCH + j * TILE_INPUTS);
                u32 xb[8];
                load_x(xb, x, g, rows, n_in, (st + j) * TILE_INPUTS + q * (TILE_INPUTS / 4), nw, inv);
                tile(c, lo, hi, xb);
                if (GATED) {
                    uint4 ulo = lds128(sm + TILE_ROWS * PITCH + j * TILE_INPUTS);
                    uint4 uhi = lds128(sm + (TILE_ROWS + TILE_ROWS / 2) * PITCH + j * TILE_INPUTS);
                    tile(cu, ulo, uhi, xb);
                }
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(&empty[stage]);
            if (++stage == STAGES) { stage = 0; phase ^= 1u; }
        }
        red[ub][0][warp][g][2 * q] = c[0];
        red[ub][0][warp][g][2 * q + 1] = c[1];
        red[ub][0][warp][g + TILE_ROWS / 2][2 * q] = c[2];
        red[ub][0][warp][g + TILE_ROWS / 2][2 * q + 1] = c[3];
        if (GATED) {
            red[ub][PARTS - 1][warp][g][2 * q] = cu[0];
            red[ub][PARTS - 1][warp][g][2 * q + 1] = cu[1];
            red[ub][PARTS - 1][warp][g + TILE_ROWS / 2][2 * q] = cu[2];
            red[ub][PARTS - 1][warp][g + TILE_ROWS / 2][2 * q + 1] = cu[3];
        }
        consumers_sync();
        if (finisher) {
            float a = 0.f, au = 0.f;
            #pragma unroll
            for (int i = 0; i < MATVEC_WARPS; i++) {
                a += red[ub][0][i][f][r];
                if (GATED) au += red[ub][PARTS - 1][i][f][r];
            }
            const int first = t * chunks;  // the tile's first unit
            const bool whole = first >= u0 && first + chunks <= u1;
            if (whole) {
                tacc = ch == 0 ? a : tacc + a;
                if (GATED) taccu = ch == 0 ? au : taccu + au;
                if (ch == chunks - 1 && r < rows)
                    store(p, r, t * TILE_ROWS + f, finish<GATED>(p, tacc, taccu, r, t * TILE_ROWS + f));
            } else {
                float* pp = part + ((long long)u * PARTS * TILE_ROWS + f) * MATVEC_MAX_ROWS + r;
                pp[0] = a;
                if (GATED) pp[TILE_ROWS * MATVEC_MAX_ROWS] = au;
                // This block's last unit of the tile: count its units, and the last block to
                // count adds every chunk's sum in order.
                if (u == u1 - 1 || ch == chunks - 1) {
                    __threadfence();
                    finishers_sync();
                    if (threadIdx.x == 0) {
                        const int mine = ch + 1 - max(first, u0) + first;  // units of t here
                        const unsigned before = atomicAdd(&count[t], (unsigned)mine);
                        last_flag = before + mine == (unsigned)chunks;
                        if (last_flag) count[t] = 0;
                    }
                    finishers_sync();
                    if (last_flag) {
                        __threadfence();
                        float s = 0.f, su = 0.f;
                        for (int k = 0; k < chunks; k++) {
                            const float* pk = part + ((long long)(first + k) * PARTS * TILE_ROWS + f) * MATVEC_MAX_ROWS + r;
                            s = k == 0 ? __ldcg(pk) : s + __ldcg(pk);
                            if (GATED) su = k == 0 ? __ldcg(pk + TILE_ROWS * MATVEC_MAX_ROWS) : su + __ldcg(pk + TILE_ROWS * MATVEC_MAX_ROWS);
                        }
                        if (r < rows) store(p, r, t * TILE_ROWS + f, finish<GATED>(p, s, su, r, t * TILE_ROWS + f));
                    }
                }
            }
        }
        ub ^= 1;
    }
}

#define SMV(NAME, GATED, STAGES, SBYTES) \
extern "C" __global__ void __launch_bounds__((MATVEC_WARPS + 1) * 32, 1) NAME( \
        const u16* x, int rows, int n_in, \
        const u8* w0, const u8* w1, const u8* w2, int n0, int n1, int n2, \
        const float* s0, const float* s1, const float* s2, int m0, int m1, int m2, \
        const u16* bias, int has_bias, const u16* res, int has_res, \
        const u16* nw, float eps, int gelu, const u16* gate, long long gate_stride, \
        u16* y, unsigned* watch, int tag, int chunks, int chunk_steps, float* part, unsigned* count) { \
    smv<GATED, STAGES, SBYTES>(x, rows, n_in, w0, w1, w2, n0, n1, n2, s0, s1, s2, m0, m1, m2, bias, \
                       has_bias, res, has_res, nw, eps, gelu, gate, gate_stride, y, watch, tag, \
                       chunks, chunk_steps, part, count); }
