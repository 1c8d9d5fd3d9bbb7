// Per-token kernels of a layer: embedding lookup, RMSNorm (fused with the
// residual add), rotary embedding fused with the KV cache write, SiLU·up, and the
// random fill of weights and caches. Part of the program that starts with common.cuh.

// x[row] = table[ids[row]] (f32 residual stream).
extern "C" __global__ void embed(const u32* ids, const bf16* table, float* x, int hidden) {
    pdl_enter();
    size_t row = blockIdx.x;
    size_t id = ids[row];
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        x[row * hidden + i] = bf(table[id * hidden + i]);
}

// For output row r, source row s = rows ? rows[r] : r:
//   x[s] += delta[s] (when delta is given); out[r] = rmsnorm(x[s]) * w  (bf16).
extern "C" __global__ void add_rmsnorm(float* x, const float* delta, const int* rows,
                                       const bf16* w, bf16* out, int hidden, float eps) {
    pdl_enter();
    size_t r = blockIdx.x;
    size_t s = rows ? (size_t)rows[r] : r;
    float* xr = x + s * hidden;
    const float* dr = delta ? delta + s * hidden : nullptr;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = xr[i];
        if (dr) {
            v += dr[i];
            xr[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[r * hidden + i] = __float2bfloat16(xr[i] * inv * bf(w[i]));
}

// Rotary embedding (rotate_half convention) of q and k, then K and V into the cache.
// qkv: [n, (hq + 2 hkv) hd] bf16 (optional bias of that width); pos[t] the token's
// position; slots[t] = block * bs + slot where its K/V go. With kv_out (an fp8
// cache) K and V go there instead, as f32 rows [n, 2, hkv, hd], for kv_fp8_store.
// grid (hq + hkv, n), block hd / 2: block (h, t) rotates head h of token t, a query
// head, or a KV head whose K it rotates and whose V it copies into the cache.
extern "C" __global__ void rope_kv(const bf16* qkv, const bf16* bias, const int* pos,
                                   const int* slots, const float* inv_freq, bf16* q_out,
                                   bf16* cache, float* kv_out, int hq, int hkv, int hd, int bs) {
    pdl_enter();
    int h = blockIdx.x, j = threadIdx.x, half = hd / 2;
    size_t t = blockIdx.y;
    size_t width = (size_t)(hq + 2 * hkv) * hd;
    const bf16* row = qkv + t * width;
    int slot = slots[t];
    size_t blk = slot / bs;
    int s = slot % bs;
    bf16* base = cache + blk * 2 * (size_t)hkv * bs * hd;
    int c1 = h * hd + j, c2 = c1 + half;
    float x1 = bf(row[c1]), x2 = bf(row[c2]);
    if (bias) {
        x1 += bf(bias[c1]);
        x2 += bf(bias[c2]);
    }
    float sn, cs;
    sincosf((float)pos[t] * inv_freq[j], &sn, &cs);
    float a = x1 * cs - x2 * sn, b = x2 * cs + x1 * sn;
    if (h < hq) {
        q_out[t * hq * hd + c1] = __float2bfloat16(a);
        q_out[t * hq * hd + c2] = __float2bfloat16(b);
        return;
    }
    int kh = h - hq;
    int cv = (hq + hkv + kh) * hd;
    if (kv_out) {  // an fp8 cache: kv_fp8_store quantizes these
        float* k = kv_out + (t * 2 * hkv + kh) * hd;
        float* v = k + (size_t)hkv * hd;
        k[j] = a;
        k[j + half] = b;
        for (int d = j; d < hd; d += half) {
            float x = bf(row[cv + d]);
            if (bias) x += bf(bias[cv + d]);
            v[d] = x;
        }
        return;
    }
    bf16* k = base + ((size_t)kh * bs + s) * hd;
    k[j] = __float2bfloat16(a);
    k[j + half] = __float2bfloat16(b);
    bf16* v = base + ((size_t)(hkv + kh) * bs + s) * hd;
    for (int d = j; d < hd; d += half) {
        float x = bf(row[cv + d]);
        if (bias) x += bf(bias[cv + d]);
        v[d] = __float2bfloat16(x);
    }
}

// act[r, i] = silu(gu[r, i]) * gu[r, inter + i].
extern "C" __global__ void silu_mul(const bf16* gu, bf16* act, int n, int inter) {
    pdl_enter();
    size_t total = (size_t)n * inter;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t r = idx / inter, i = idx % inter;
        float g = bf(gu[r * 2 * inter + i]);
        float u = bf(gu[r * 2 * inter + inter + i]);
        act[idx] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
    }
}

// Fills n bf16 with uniform values in [lo, hi) from a counter-based hash: random
// weights of any shape without host memory.
__device__ __forceinline__ u64 splitmix(u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

extern "C" __global__ void fill_uniform(bf16* p, u64 n, u64 seed, float lo, float hi) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        u64 r = splitmix(seed * 0x632be59bd9b4e019ull + i);
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);
        p[i] = __float2bfloat16(lo + (hi - lo) * u);
    }
}

