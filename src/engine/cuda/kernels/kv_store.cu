// The KV store: rotates the new keys and writes them and the new values into the cache.
// Compiled for the device's architecture (engine::cuda, module "decode").
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh prepended instead
#include "common.cuh"
#endif

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
