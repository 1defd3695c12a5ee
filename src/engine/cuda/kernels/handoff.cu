// Hybrid decoding's hand-over of hidden states between the GPU and the host CPU (module
// "dequant"): kernels read and write mapped pinned host memory directly, so a hand-over takes
// no copy engine and never queues behind a streamed layer's copy.
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh prepended instead
#include "common.cuh"
#endif

// bf16 device values to f32 in host memory (exact).
extern "C" __global__ void handoff_to_host(const u16* src, float* host, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        host[i] = bf16f(src[i]);
    }
}

// f32 values in host memory to bf16 on the device (rounded to nearest even, as candle's cast).
extern "C" __global__ void handoff_to_device(const float* host, u16* dst, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        dst[i] = to_bf16(host[i]);
    }
}
