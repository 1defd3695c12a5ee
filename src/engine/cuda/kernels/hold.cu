// The kernel that holds a stream for engine::cuda::QueuedTimer (module "dequant").
#ifndef VIBEOFFLOAD_COMMON_CUH  // NVRTC gets common.cuh prepended instead
#include "common.cuh"
#endif

// Busy-waits `ns` nanoseconds of the GPU's clock: holds a stream while the host queues work
// behind it (see QueuedTimer).
extern "C" __global__ void hold_stream(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
