// FP8 (e4m3) KV: the codec and the cache store, bit for bit as the CPU
// reference (engine/src/kv_quant.rs), and the load helper attention kernels
// use to read an fp8 cache. Not wired into the forward pass yet: see
// docs/FP8_KV.md, "CUDA". Every float operation is an explicit _rn intrinsic
// so no contraction or fast-math division changes a byte against the CPU.
//
// Cache layout as the CPU's: per layer, block b at b * 2 * hkv * bs * hd bytes,
// [K: head][slot][dim] then V; scales[b * 2 * hkv + kind * hkv + head] (f32).

// x as e4m3: round to nearest even, saturating at +-448 (infinities too), NaN to NaN.
__device__ __forceinline__ unsigned char e4m3_from_f32(float x) {
    unsigned int bits = __float_as_uint(x);
    unsigned char sign = (unsigned char)((bits >> 24) & 0x80);
    if (isnan(x)) return sign | 0x7f;
    float a = fabsf(x);
    if (a > 448.f) return sign | 0x7e;
    // Subnormal steps of 2^-9; k = 8 is the smallest normal's code 0x08.
    if (a < 0.015625f) return sign | (unsigned char)rintf(__fmul_rn(a, 512.f));
    unsigned int b = __float_as_uint(a);
    unsigned int r = (b + 0x7ffffu + ((b >> 20) & 1u)) & ~0xfffffu;
    int e = (int)(r >> 23) - 127 + 7;
    return sign | (unsigned char)(e << 3) | (unsigned char)((r >> 20) & 7u);
}

// The value of an e4m3 byte.
__device__ __forceinline__ float e4m3_to_f32(unsigned char b) {
    int e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7) {
        v = __int_as_float(0x7fc00000);
    } else if (e == 0) {
        v = (float)m * (1.f / 512.f);
    } else {
        v = ldexpf(1.f + (float)m * 0.125f, e - 7);
    }
    return (b & 0x80) ? -v : v;
}

// Element i of a (block, K or V, head) run of an fp8 cache, dequantized: the
// load path attention kernels take for an fp8 cache (one scale per run).
__device__ __forceinline__ float kv_fp8_load(const unsigned char* run, float scale, int i) {
    return __fmul_rn(e4m3_to_f32(run[i]), scale);
}

__device__ __forceinline__ float kv_fp8_block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if ((threadIdx.x & 31) == 0) red[w] = v;
    __syncthreads();
    float m = 0.f;
    for (int i = 0; i < nw; ++i) m = fmaxf(m, red[i]);
    __syncthreads();
    return m;
}

// Stores tokens' K and V into an fp8 cache as kv_quant::write_token does,
// token by token in order within each cache block.
// kv: [n, 2, hkv, hd] f32 (token t's rotated K heads, then its V heads);
// slots[t] = block * bs + slot; runs[r]..runs[r + 1] are the tokens of run r,
// consecutive slots of one cache block in position order (the host cuts a
// chunk's tokens where the block changes).
// grid (runs, 2 * hkv), block hd threads (a multiple of 32, at most 1024):
// block (r, kind * hkv + h) writes head h's K (kind 0) or V (kind 1) of run r.
extern "C" __global__ void kv_fp8_store(const float* kv, const int* runs, const int* slots,
                                        unsigned char* cache, float* scales, int hkv, int hd,
                                        int bs) {
    __shared__ float red[32];
    int r = blockIdx.x, kind = blockIdx.y / hkv, h = blockIdx.y % hkv, d = threadIdx.x;
    for (int t = runs[r]; t < runs[r + 1]; ++t) {
        int slot = slots[t];
        size_t blk = (size_t)(slot / bs);
        int s = slot % bs;
        unsigned char* run = cache + blk * 2 * (size_t)hkv * bs * hd + (size_t)(kind * hkv + h) * bs * hd;
        float* sc = scales + blk * 2 * hkv + kind * hkv + h;
        float x = kv[((size_t)t * 2 * hkv + kind * hkv + h) * hd + d];
        float amax = kv_fp8_block_max(fabsf(x), red);
        // Slot 0 starts the block afresh.
        float scale = s == 0 ? 0.f : *sc;
        float needed = __fdiv_rn(fminf(amax, 3.40282347e38f), 448.f);
        if (needed > scale) {
            for (int i = d; i < s * hd; i += blockDim.x) {
                run[i] = scale > 0.f
                             ? e4m3_from_f32(__fdiv_rn(__fmul_rn(e4m3_to_f32(run[i]), scale), needed))
                             : (unsigned char)0;
            }
            scale = needed;
        }
        run[(size_t)s * hd + d] = scale > 0.f ? e4m3_from_f32(__fdiv_rn(x, scale)) : (unsigned char)0;
        __syncthreads();
        if (d == 0) *sc = scale;
        __syncthreads();
    }
}
