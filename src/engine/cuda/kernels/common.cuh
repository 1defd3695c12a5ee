// What more than one kernel file uses: short integer names, bf16 and float8 E4M3 conversions,
// programmatic dependent launch and thread block clusters. The Rust side prepends this file to
// each program (NVRTC has no include path for embedded sources); the .cu files include it only
// when compiled on their own (nvcc --ptx in scripts/build-cuda.sh, editors).
#ifndef VIBEOFFLOAD_COMMON_CUH
#define VIBEOFFLOAD_COMMON_CUH

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// The f32 whose top half is the bf16 `b`.
__device__ __forceinline__ float bf16f(u32 b) { return __int_as_float((int)(b << 16)); }

// `x` as bf16, rounded to nearest even; NaN stays NaN.
__device__ __forceinline__ u16 to_bf16(float x) {
    u32 b = (u32)__float_as_int(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}

// Float8 E4M3 to f32, one code at a time (the fused matvec decodes four per instruction).
__device__ __forceinline__ float f8e4m3(u8 c) {
    u32 s = c >> 7, e = (c >> 3) & 15u, m = c & 7u;
    float v;
    if (e == 15u && m == 7u) v = __int_as_float(0x7fc00000);
    else if (e == 0u) v = (float)m * 0.001953125f;
    else v = __int_as_float((int)(((e + 120u) << 23) | (m << 20)));
    return s ? -v : v;
}

// Programmatic dependent launch (sm_90): a kernel lets the next one start once all its
// blocks run, and the next one waits for it only where it reads its results, so the weights a
// kernel streams can load during the tail of the kernel before.
__device__ __forceinline__ void pdl_launch_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait_previous() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Thread block clusters (sm_90), where the blocks of one cluster split a reduction and the first
// combines the others' partial results from their shared memory: a barrier over the cluster
// (every thread of every block must pass it), and a float of another block's shared memory.
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\t"
                 "barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// `*p` in the shared memory of the cluster's block `rank`.
__device__ __forceinline__ float cluster_load(const float* p, u32 rank) {
#if __CUDA_ARCH__ >= 900
    u32 a = (u32)__cvta_generic_to_shared(p), d;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(d) : "memory");
    return v;
#else
    return *p;
#endif
}

#endif
