// FP8 (e4m3) KV: the codec and the cache store, bit for bit as the CPU
// reference (engine/src/kv_quant.rs), and the expansion the attention kernels
// (decode_attn.cu, prefill_attn.cu) use to read an fp8 cache into their bf16
// tiles. Every float operation of the store is an explicit _rn intrinsic so no
// contraction or fast-math division changes a byte against the CPU.
//
// Cache layout as the CPU's: per layer, block b at b * 2 * hkv * bs * hd bytes,
// [K: head][slot][dim] then V; scales[b * 2 * hkv + kind * hkv + head] (f32),
// one array after the layer's last block (engine/src/cuda/kv.rs).

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

// The value of an e4m3 byte (exact: a normal one is 2^(e-7) (1 + m/8), whose f32
// bits are the exponent rebiased by 120 and the mantissa shifted up).
__device__ __forceinline__ float e4m3_to_f32(unsigned char b) {
    unsigned int e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7) {
        v = __int_as_float(0x7fc00000);
    } else if (e == 0) {
        v = (float)m * (1.f / 512.f);
    } else {
        v = __uint_as_float(((e + 120u) << 23) | (m << 20));
    }
    return (b & 0x80) ? -v : v;
}

// Key `key`'s K and V scales (KV head kh) into `*sk` and `*sv` with cp.async,
// 0 at or past `end` (its cache block then is not looked up).
__device__ __forceinline__ void kv_fp8_load_scales(float* sk, float* sv, const float* scales,
                                                   const int* table, int kh, int hkv, int bs,
                                                   int key, int end) {
    const float* src = scales;
    int bytes = 0;
    if (key < end) {
        src = scales + (size_t)table[key / bs] * 2 * hkv + kh;
        bytes = 4;
    }
    cp_async4(sk, src, bytes);
    cp_async4(sv, src + (bytes ? hkv : 0), bytes);
}

// Eight e4m3 values (the bytes of `raw`, in memory order) as bf16, exactly
// (every e4m3 value is a bf16 value): one 16-byte chunk of an attention
// kernel's K or V tile. The scales are applied where the tile is used: K's to
// the scores, V's to the probabilities (kv_fp8_scale_cols in prefill_attn.cu,
// and decode_attn.cu). sm_89 and later convert two values per instruction.
__device__ __forceinline__ uint4 kv_fp8_expand8(uint2 raw) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u32 word = i < 2 ? raw.x : raw.y;
        unsigned short pair = (unsigned short)(word >> ((i & 1) * 16));
        float a, b;
#if __CUDA_ARCH__ >= 890
        u32 h2;
        asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(pair));
        asm("cvt.f32.f16 %0, %1;" : "=f"(a) : "h"((unsigned short)(h2 & 0xffffu)));
        asm("cvt.f32.f16 %0, %1;" : "=f"(b) : "h"((unsigned short)(h2 >> 16)));
#else
        a = e4m3_to_f32((unsigned char)(pair & 0xffu));
        b = e4m3_to_f32((unsigned char)(pair >> 8));
#endif
        __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
        w[i] = *reinterpret_cast<u32*>(&p);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
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
    pdl_enter();
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
