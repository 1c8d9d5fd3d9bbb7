// Tandem's CUDA kernels: what every kernel file shares (types, warp and block
// reductions, programmatic dependent launch, cp.async). engine/src/cuda/program.rs
// compiles this file and then elementwise.cu, kv_fp8.cu, decode_attn.cu, sampling.cu,
// prefill_attn.cu and gemv.cu, concatenated in that order, as ONE NVRTC program
// for the GPU's own architecture; the constants the host also uses (tile sizes,
// the split limit) come from the host as -D defines (program.rs, KERNEL_DEFINES),
// so they are written once, in Rust. Argument order of every kernel is written
// once on the host side too: engine/src/cuda/launch.rs.
//
// Conventions: activations between GEMMs are bf16 row-major [tokens, width];
// the residual stream and the GEMM outputs added to it are f32. The KV cache
// of one layer is bf16 in the layout of engine/src/kv_cache.rs:
//   block b: [K: head 0 [slot][hd] .. head H-1][V: head 0 .. head H-1]
// or (kv_dtype fp8_e4m3) e4m3 bytes in that layout, the layer's blocks' scales
// after its last block (kv_fp8.cu).
#include <cuda_bf16.h>

#if !defined(MAX_SPLITS) || !defined(DECODE_TILE) || !defined(PREFILL_BQ) || !defined(PREFILL_BK) || \
    !defined(PREFILL_STAGES)
#error "compile with the host's -D defines (engine/src/cuda/program.rs, KERNEL_DEFINES)"
#endif

typedef unsigned int u32;
typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float bf(bf16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum over the block; every thread gets the result. blockDim.x is a multiple of 32.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = (threadIdx.x < (blockDim.x >> 5)) ? part[threadIdx.x] : 0.f;
    if (warp == 0) {
        t = warp_sum(t);
        if (lane == 0) part[0] = t;
    }
    __syncthreads();
    return part[0];
}

// Programmatic dependent launch (sm_90). The backend launches a forward pass's
// kernels with the PDL attribute: such a kernel may be scheduled while the kernel
// before it in the stream is still running. pdl_enter() waits until that kernel has
// completed and its writes are visible, then lets the next kernel be scheduled; it
// is a no-op in a kernel launched normally. Every kernel calls it before it touches
// memory that an earlier kernel writes, and writes nothing before it.
__device__ __forceinline__ void pdl_enter() {
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::);
}

// Asks L2 for the 128-byte line holding `p` (no register waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// Asynchronous 16-byte copies global -> shared (bytes < 16 zero-fills the rest).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
    u32 a = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem), "r"(bytes));
}

// The same for 4 bytes (bytes 0 or 4), through L1 (`.ca`: `.cg` takes only 16).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, int bytes) {
    u32 a = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(a), "l"(gmem), "r"(bytes));
}

// Key `key`'s K and V rows (KV head `kh`) at element `col`, in a paged cache of
// `block_elems` elements a block (layout above); false, and both left at
// `cache`, at or past `end` (the caller's copy then zero-fills).
template <typename T, int HD>
__device__ __forceinline__ bool paged_kv_rows(const T*& kp, const T*& vp, const T* cache,
                                              const int* table, size_t block_elems, int kh,
                                              int hkv, int bs, int key, int end, int col) {
    kp = vp = cache;
    if (key >= end) return false;
    const T* base = cache + (size_t)table[key / bs] * block_elems;
    int s = key % bs;
    kp = base + ((size_t)kh * bs + s) * HD + col;
    vp = base + ((size_t)(hkv + kh) * bs + s) * HD + col;
    return true;
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Tensor-core helpers of the attention kernels: bf16 mma.m16n8k16 with f32
// accumulators, and ldmatrix loads of its fragments from shared memory.
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

__device__ __forceinline__ void ldsm_x4(u32* r, const bf16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_trans(u32* r, const bf16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
