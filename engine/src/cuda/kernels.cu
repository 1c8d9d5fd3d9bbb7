// Tandem's CUDA kernels, compiled once per process with NVRTC for sm_90.
//
// Conventions: activations between GEMMs are bf16 row-major [tokens, width];
// the residual stream and the GEMM outputs added to it are f32. The KV cache
// of one layer is bf16 in the layout of engine/src/kv_cache.rs:
//   block b: [K: head 0 [slot][hd] .. head H-1][V: head 0 .. head H-1]
#include <cuda_bf16.h>

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

// Asynchronous 16-byte copies global -> shared (bytes < 16 zero-fills the rest).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
    u32 a = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

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
// position; slots[t] = block * bs + slot where its K/V go.
// grid (hq + hkv, n), block hd / 2: block (h, t) rotates head h of token t, a query
// head, or a KV head whose K it rotates and whose V it copies into the cache.
extern "C" __global__ void rope_kv(const bf16* qkv, const bf16* bias, const int* pos,
                                   const int* slots, const float* inv_freq, bf16* q_out,
                                   bf16* cache, int hq, int hkv, int hd, int bs) {
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
    bf16* k = base + ((size_t)kh * bs + s) * hd;
    k[j] = __float2bfloat16(a);
    k[j + half] = __float2bfloat16(b);
    bf16* v = base + ((size_t)(hkv + kh) * bs + s) * hd;
    int cv = (hq + hkv + kh) * hd;
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

// ---------------------------------------------------------------------------
// Decode attention over the paged cache: one query token per sequence.
// grid (max_splits, hkv, batch), block 128. A sequence of `len` keys is cut into
// splits of `chunk` keys (split_chunk below: the split count follows each
// sequence's own length, up to the grid's max_splits, so nothing the host
// computes from the batch's lengths enters the launch and one CUDA graph serves
// every step of a batch-size bucket). Each block takes one split of one sequence
// for the `group` query heads sharing KV head blockIdx.y, in tiles of TILE keys
// with an online softmax, and writes unnormalised partial results:
//   part_o[b, h, split, d] = sum_j exp(s_j - m) v_j[d], part_ml[b, h, split] = (m, l).
// attn_combine merges the splits. The block table's row stride is read from
// device memory (*table_stride) for the same reason.
#define DECODE_TILE 64

__device__ __forceinline__ int split_chunk(int len, int max_splits) {
    int c = (len + max_splits - 1) / max_splits;
    c = (c + 15) & ~15;
    return c < 64 ? 64 : c;
}

// Dynamic shared memory: K and V tiles, double-buffered, then the tile's scores
// [G][TILE] and the P·V reduction area [key groups][G][HD] (= [G][512] floats).
__host__ __device__ constexpr int decode_smem_bytes(int hd, int g) {
    return 2 * 2 * DECODE_TILE * hd * 2 + 4 * g * DECODE_TILE + 4 * 512 * g;
}

// K/V rows of keys t0 .. t0 + DECODE_TILE into tile buffer `buf` with cp.async
// (keys past `end` are zero-filled), as one commit group.
template <int HD>
__device__ __forceinline__ void decode_load_tile(bf16* ks, bf16* vs, const bf16* cache,
                                                 const int* table, size_t block_elems, int kh,
                                                 int hkv, int bs, int t0, int end) {
    constexpr int CPR = HD / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < DECODE_TILE * CPR; c += blockDim.x) {
        int key = c / CPR, part = c % CPR;
        int j = t0 + key;
        const bf16* kp = cache;
        const bf16* vp = cache;
        int bytes = 0;
        if (j < end) {
            size_t blk = table[j / bs];
            size_t slot = j % bs;
            kp = cache + blk * block_elems + ((size_t)kh * bs + slot) * HD + part * 8;
            vp = cache + blk * block_elems + ((size_t)(hkv + kh) * bs + slot) * HD + part * 8;
            bytes = 16;
        }
        cp_async16(ks + key * HD + part * 8, kp, bytes);
        cp_async16(vs + key * HD + part * 8, vp, bytes);
    }
    cp_async_commit();
}

template <int HD, int G>
__device__ void decode_attn(const bf16* q, const bf16* cache, const int* tables,
                            const int* table_stride, const int* seq_lens, float* part_o,
                            float* part_ml, int hq, int hkv, int bs, int max_splits, int window,
                            float scale) {
    extern __shared__ __align__(16) unsigned char decode_smem[];
    bf16* kbuf = reinterpret_cast<bf16*>(decode_smem);  // [2][TILE][HD]
    bf16* vbuf = kbuf + 2 * DECODE_TILE * HD;            // [2][TILE][HD]
    float* scores = reinterpret_cast<float*>(vbuf + 2 * DECODE_TILE * HD);  // [G][TILE]
    float* red = scores + G * DECODE_TILE;                                   // [kg][G][HD]
    __shared__ float m_run[G], l_run[G], alpha[G];
    int group = hq / hkv;

    int b = blockIdx.z, kh = blockIdx.y, sp = blockIdx.x;
    int len = seq_lens[b];
    int chunk = split_chunk(len, max_splits);
    int start = sp * chunk;
    if (start >= len) return;  // attn_combine only reads splits that hold keys
    int end = min(start + chunk, len);
    size_t head0 = (size_t)b * hq + (size_t)kh * group;
    int lo = window > 0 ? max(0, len - window) : 0;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int* table = tables + (size_t)b * (*table_stride);
    size_t block_elems = 2 * (size_t)hkv * bs * HD;

    // Scores: 8 lanes per key, lane `sub` holding the 8-dim chunks sub, sub + 8, ..
    // (HD >= 64; 4 dims at HD 32), so the lanes' shared-memory reads do not collide.
    constexpr int DPL = HD / 8;
    constexpr int NCH = HD >= 64 ? HD / 64 : 1;  // chunks per lane
    constexpr int CW = HD >= 64 ? 8 : 4;         // dims per chunk
    int sub = lane & 7, kslot = lane >> 3;
    float qr[G][DPL];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int c = 0; c < NCH; c++)
#pragma unroll
            for (int e = 0; e < CW; e++) {
                int d = HD >= 64 ? c * 64 + sub * 8 + e : sub * 4 + e;
                qr[g][c * CW + e] = g < group ? bf(q[(head0 + g) * HD + d]) * scale : 0.f;
            }
    if (tid < G) {
        m_run[tid] = NEG_INF;
        l_run[tid] = 0.f;
    }
    const int tpk = HD / 4;
    int kgroups = blockDim.x / tpk;
    int part = tid % tpk, kg = tid / tpk;
    float4 o[G];
#pragma unroll
    for (int g = 0; g < G; g++) o[g] = make_float4(0.f, 0.f, 0.f, 0.f);

    decode_load_tile<HD>(kbuf, vbuf, cache, table, block_elems, kh, hkv, bs, start, end);
    for (int t0 = start, it = 0; t0 < end; t0 += DECODE_TILE, it++) {
        int t1 = min(t0 + DECODE_TILE, end);
        int cur = it & 1;
        // Start the next tile's loads, then wait for this one's.
        if (t0 + DECODE_TILE < end) {
            decode_load_tile<HD>(kbuf + (cur ^ 1) * DECODE_TILE * HD,
                                 vbuf + (cur ^ 1) * DECODE_TILE * HD, cache, table, block_elems,
                                 kh, hkv, bs, t0 + DECODE_TILE, end);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* ks = kbuf + cur * DECODE_TILE * HD;
        const bf16* vs = vbuf + cur * DECODE_TILE * HD;

        for (int key = warp * 4 + kslot; key < DECODE_TILE; key += nwarps * 4) {
            float kf[DPL];
#pragma unroll
            for (int c = 0; c < NCH; c++) {
                if constexpr (HD >= 64) {
                    uint4 raw = *reinterpret_cast<const uint4*>(ks + key * HD + c * 64 + sub * 8);
                    const __nv_bfloat162* kv = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float2 f = __bfloat1622float2(kv[e]);
                        kf[c * 8 + 2 * e] = f.x;
                        kf[c * 8 + 2 * e + 1] = f.y;
                    }
                } else {
                    uint2 raw = *reinterpret_cast<const uint2*>(ks + key * HD + sub * 4);
                    const __nv_bfloat162* kv = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float2 f = __bfloat1622float2(kv[e]);
                        kf[2 * e] = f.x;
                        kf[2 * e + 1] = f.y;
                    }
                }
            }
            int j = t0 + key;
#pragma unroll
            for (int g = 0; g < G; g++) {
                float acc = 0.f;
#pragma unroll
                for (int e = 0; e < DPL; e++) acc += qr[g][e] * kf[e];
                acc += __shfl_xor_sync(0xffffffff, acc, 1);
                acc += __shfl_xor_sync(0xffffffff, acc, 2);
                acc += __shfl_xor_sync(0xffffffff, acc, 4);
                if (g < group && sub == 0)
                    scores[g * DECODE_TILE + key] = (j >= t1 || j < lo) ? NEG_INF : acc;
            }
        }
        __syncthreads();

        // Online softmax: fold this tile into each head's running max and sum.
        int n = t1 - t0;
        for (int g = warp; g < group; g += nwarps) {
            float* sc = scores + g * DECODE_TILE;
            float m = NEG_INF;
            for (int j = lane; j < n; j += 32) m = fmaxf(m, sc[j]);
            m = warp_max(m);
            float m_new = fmaxf(m_run[g], m);
            float l = 0.f;
            for (int j = lane; j < DECODE_TILE; j += 32) {
                float p = (j >= n || m_new == NEG_INF) ? 0.f : __expf(sc[j] - m_new);
                sc[j] = p;
                l += p;
            }
            l = warp_sum(l);
            if (lane == 0) {
                float a = m_run[g] == NEG_INF ? 0.f : __expf(m_run[g] - m_new);
                alpha[g] = a;
                l_run[g] = l_run[g] * a + l;
                m_run[g] = m_new;
            }
        }
        __syncthreads();

        // P·V: HD/4 threads per key (4 dims each, one 8-byte read), the rest over keys.
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (g < group) {
                float a = alpha[g];
                o[g].x *= a;
                o[g].y *= a;
                o[g].z *= a;
                o[g].w *= a;
            }
        }
#pragma unroll 4
        for (int key = kg; key < n; key += kgroups) {
            uint2 raw = *reinterpret_cast<const uint2*>(vs + key * HD + part * 4);
            const __nv_bfloat162* vv = reinterpret_cast<const __nv_bfloat162*>(&raw);
            float2 v01 = __bfloat1622float2(vv[0]), v23 = __bfloat1622float2(vv[1]);
#pragma unroll
            for (int g = 0; g < G; g++) {
                if (g < group) {
                    float p = scores[g * DECODE_TILE + key];
                    o[g].x += p * v01.x;
                    o[g].y += p * v01.y;
                    o[g].z += p * v23.x;
                    o[g].w += p * v23.y;
                }
            }
        }
        __syncthreads();  // the tile buffers and scores are rewritten two tiles on
    }
#pragma unroll
    for (int g = 0; g < G; g++)
        if (g < group) *reinterpret_cast<float4*>(red + (kg * group + g) * HD + part * 4) = o[g];
    __syncthreads();
    for (int i = tid; i < group * HD; i += blockDim.x) {
        int g = i / HD, d = i % HD;
        float sum = 0.f;
        for (int k2 = 0; k2 < kgroups; k2++) sum += red[(k2 * group + g) * HD + d];
        part_o[((head0 + g) * max_splits + sp) * HD + d] = sum;
    }
    if (tid < group) {
        part_ml[((head0 + tid) * max_splits + sp) * 2] = m_run[tid];
        part_ml[((head0 + tid) * max_splits + sp) * 2 + 1] = l_run[tid];
    }
}

#define DECODE_ATTN(HD, G)                                                                     \
    extern "C" __global__ void decode_attn_##HD##_##G(                                         \
        const bf16* q, const bf16* cache, const int* tables, const int* table_stride,          \
        const int* seq_lens, float* part_o, float* part_ml, int hq, int hkv, int bs,            \
        int max_splits, int window, float scale) {                                             \
        pdl_enter();                                                                           \
        decode_attn<HD, G>(q, cache, tables, table_stride, seq_lens, part_o, part_ml, hq, hkv, \
                           bs, max_splits, window, scale);                                     \
    }
DECODE_ATTN(32, 1)
DECODE_ATTN(32, 2)
DECODE_ATTN(32, 4)
DECODE_ATTN(32, 8)
DECODE_ATTN(64, 1)
DECODE_ATTN(64, 2)
DECODE_ATTN(64, 4)
DECODE_ATTN(64, 8)
DECODE_ATTN(128, 1)
DECODE_ATTN(128, 2)
DECODE_ATTN(128, 4)
DECODE_ATTN(128, 8)

// grid (hq, batch), block hd: out[b, h, :] = merged splits, bf16. Warp 0 first puts
// every split's weight exp(m_s - m) in shared memory (a split per lane), so each
// thread's sum over the splits for its dimension is a run of independent loads.
extern "C" __global__ void attn_combine(const float* part_o, const float* part_ml,
                                        const int* seq_lens, bf16* out, int hq, int hd,
                                        int max_splits) {
    __shared__ float wgt[64];  // max_splits <= 64 (MAX_SPLITS in mod.rs)
    __shared__ float den_s;
    pdl_enter();
    int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    size_t head = (size_t)b * hq + h;
    int len = seq_lens[b];
    int chunk = split_chunk(len, max_splits);
    int splits = (len + chunk - 1) / chunk;
    const float* ml = part_ml + head * max_splits * 2;
    // Warp 0: the splits' maximum, then each split's weight exp(m_s - m) and the
    // weighted sum of the l_s.
    if (d < 32) {
        float m = NEG_INF;
        for (int s = d; s < splits; s += 32) m = fmaxf(m, ml[2 * s]);
        m = warp_max(m);
        float den = 0.f;
        for (int s = d; s < splits; s += 32) {
            float ms = ml[2 * s];
            float w = ms == NEG_INF ? 0.f : __expf(ms - m);
            wgt[s] = w;
            den += w * ml[2 * s + 1];
        }
        den = warp_sum(den);
        if (d == 0) den_s = den;
    }
    __syncthreads();
    const float* po = part_o + head * max_splits * hd + d;
    float num = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; s++) {
        float w = wgt[s];
        if (w != 0.f) num += w * po[(size_t)s * hd];  // a split with no key in the window
    }
    float den = den_s;
    out[head * hd + d] = __float2bfloat16(den > 0.f ? num / den : 0.f);
}

// ---------------------------------------------------------------------------
// Sampling on the GPU: one block (1024 threads) per row of logits [rows, vocab].
// draws[row] = (temperature, top_k, top_p, min_p, u01) as 5 x 32 bits (the
// floats' bit patterns). Temperature 0 is the argmax (lowest id on ties). Else
// p_i = exp((l_i - max) / T); the top-k cut keeps the k largest, the top-p cut
// the smallest most-likely set holding top_p of what top-k kept, min-p those
// with p_i >= min_p (p_max = 1): each cut is a threshold on l_i, found by radix
// selection over the logits' order-preserving bit keys (4 passes of 8 bits, a
// histogram of counts or of probability mass per pass), so nothing is sorted.
// The token is where u01 * (kept mass) falls walking the vocabulary in id
// order: the same distribution as the host's TokenDraw::choose, which walks
// from the most likely down (so the two pick different tokens for one u01).

__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = (threadIdx.x < (blockDim.x >> 5)) ? part[threadIdx.x] : NEG_INF;
    if (warp == 0) {
        t = warp_max(t);
        if (lane == 0) part[0] = t;
    }
    __syncthreads();
    return part[0];
}

// The largest key K with (count or mass) of {i : key_i >= K} >= target.
// by_mass: weigh each token by its probability, else by 1.
__device__ u32 radix_threshold(const float* row, int vocab, float mx, float inv_t, float target,
                               bool by_mass, float* hist, u32* prefix_s, float* above_s) {
    u32 prefix = 0;
    float above = 0.f;
    for (int pass = 0; pass < 4; pass++) {
        int shift = 24 - 8 * pass;
        u32 mask = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0.f;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float l = row[i];
            u32 k = order_key(l);
            if ((k & mask) == prefix) {
                float w = by_mass ? __expf((l - mx) * inv_t) : 1.f;
                atomicAdd(&hist[(k >> shift) & 255], w);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int d = 255;
            for (; d > 0; d--) {
                if (above + hist[d] >= target) break;
                above += hist[d];
            }
            *prefix_s = prefix | ((u32)d << shift);
            *above_s = above;
        }
        __syncthreads();
        prefix = *prefix_s;
        above = *above_s;
        __syncthreads();
    }
    return prefix;
}

extern "C" __global__ void sample_rows(const float* logits, const int* draws, u32* ids,
                                       int vocab) {
    __shared__ float hist[256];
    __shared__ u32 prefix_s;
    __shared__ float above_s;
    __shared__ float scan[32];
    __shared__ int found, last_kept;
    pdl_enter();
    int row_i = blockIdx.x;
    const float* row = logits + (size_t)row_i * vocab;
    const int* d = draws + 5 * row_i;
    float temp = __int_as_float(d[0]);
    int top_k = d[1];
    float top_p = __int_as_float(d[2]), min_p = __int_as_float(d[3]), u01 = __int_as_float(d[4]);
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    if (!(temp > 0.f)) {
        // Greedy: as argmax_rows.
        float best = NEG_INF;
        int besti = 0x7fffffff;
        for (int i = tid; i < vocab; i += blockDim.x) {
            float v = row[i];
            if (v > best) {
                best = v;
                besti = i;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffff, best, o);
            int oi = __shfl_xor_sync(0xffffffff, besti, o);
            if (ov > best || (ov == best && oi < besti)) {
                best = ov;
                besti = oi;
            }
        }
        __shared__ float bv[32];
        __shared__ int bi[32];
        if (lane == 0) {
            bv[warp] = best;
            bi[warp] = besti;
        }
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < (int)(blockDim.x >> 5); w++)
                if (bv[w] > best || (bv[w] == best && bi[w] < besti)) {
                    best = bv[w];
                    besti = bi[w];
                }
            ids[row_i] = besti == 0x7fffffff ? 0 : (u32)besti;
        }
        return;
    }

    float inv_t = 1.f / temp;
    float mx = NEG_INF;
    for (int i = tid; i < vocab; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx);

    u32 thr = 0;  // keep key >= thr
    if (top_k > 0 && top_k < vocab)
        thr = radix_threshold(row, vocab, mx, inv_t, (float)top_k, false, hist, &prefix_s,
                              &above_s);
    if (top_p < 1.f) {
        float kept = 0.f;
        for (int i = tid; i < vocab; i += blockDim.x) {
            float l = row[i];
            if (order_key(l) >= thr) kept += __expf((l - mx) * inv_t);
        }
        kept = block_sum(kept);
        u32 t = radix_threshold(row, vocab, mx, inv_t, top_p * kept, true, hist, &prefix_s,
                                &above_s);
        thr = max(thr, t);
    }

    // Contiguous ranges per thread, so a prefix scan walks the vocabulary in id order.
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int a = tid * per, b = min(vocab, a + per);
    float local = 0.f;
    for (int i = a; i < b; i++) {
        float l = row[i];
        float p = __expf((l - mx) * inv_t);
        if (order_key(l) >= thr && p >= min_p) local += p;
    }
    // Exclusive prefix sum over the block.
    float incl = local;
    for (int o = 1; o < 32; o <<= 1) {
        float n = __shfl_up_sync(0xffffffff, incl, o);
        if (lane >= o) incl += n;
    }
    if (lane == 31) scan[warp] = incl;
    if (tid == 0) {
        found = 0x7fffffff;
        last_kept = -1;
    }
    __syncthreads();
    if (warp == 0) {
        float w = lane < (int)(blockDim.x >> 5) ? scan[lane] : 0.f;
        for (int o = 1; o < 32; o <<= 1) {
            float n = __shfl_up_sync(0xffffffff, w, o);
            if (lane >= o) w += n;
        }
        scan[lane] = w;  // inclusive per warp
    }
    __syncthreads();
    float total = scan[(blockDim.x >> 5) - 1];
    float before = (warp > 0 ? scan[warp - 1] : 0.f) + incl - local;
    float target = u01 * total;
    if (local > 0.f && target >= before && target < before + local) {
        float acc = before;
        for (int i = a; i < b; i++) {
            float l = row[i];
            float p = __expf((l - mx) * inv_t);
            if (order_key(l) >= thr && p >= min_p) {
                acc += p;
                if (target < acc) {
                    atomicMin(&found, i);
                    break;
                }
            }
        }
    }
    if (local > 0.f) {
        for (int i = b - 1; i >= a; i--) {
            float l = row[i];
            if (order_key(l) >= thr && __expf((l - mx) * inv_t) >= min_p) {
                atomicMax(&last_kept, i);
                break;
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        // Rounding can leave the target past the last kept token: take that one.
        int pick = found != 0x7fffffff ? found : last_kept;
        ids[row_i] = pick < 0 ? 0 : (u32)pick;
    }
}

// ---------------------------------------------------------------------------
// Prefill attention: causal, flash-attention style (online softmax, the score
// matrix never leaves registers), bf16 tensor cores through mma.m16n8k16.
// Queries of chunk c are rows q_off[c] .. q_off[c] + q_len[c] of q [n, hq, HD] at
// positions q_pos[c] ..; keys 0 .. q_pos[c] + q_len[c] are read through the
// chunk's block table (the chunk's own K/V are already in the cache).
// grid (q tiles of 128, hq, chunks), block 256 = 8 warps x 16 query rows; each K/V
// tile in shared memory serves all 128 rows.

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


#define BQ 128
#define BK 64

template <int HD>
__device__ void prefill_attn(const bf16* q, const bf16* cache, const int* tables,
                             int table_stride, const int* q_off, const int* q_pos,
                             const int* q_len, bf16* out, int hq, int hkv, int bs, int window,
                             float scale) {
    const int LD = HD + 8;  // padded smem row: conflict-free fragment loads
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Two stages of [K tile][V tile]: the next tile is fetched (cp.async) while
    // this one is multiplied.
    bf16* stage0 = reinterpret_cast<bf16*>(smem_raw);

    int c = blockIdx.z, h = blockIdx.y;
    int len = q_len[c];
    int tiles = (len + BQ - 1) / BQ;
    int tile = tiles - 1 - (int)blockIdx.x;  // the longest tiles first
    if (tile < 0) return;
    int off = q_off[c], pos0 = q_pos[c];
    int kh = h / (hq / hkv);
    const int* table = tables + (size_t)c * table_stride;
    size_t block_elems = 2 * (size_t)hkv * bs * HD;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    int r0 = tile * BQ + warp * 16 + gid;  // this thread's rows: r0 and r0 + 8
    int r1 = r0 + 8;

    u32 qf[HD / 16][4];
#pragma unroll
    for (int ks2 = 0; ks2 < HD / 16; ks2++) {
        int col = ks2 * 16 + tig * 2;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = (e & 1) ? r1 : r0;
            int cc = col + ((e & 2) ? 8 : 0);
            qf[ks2][e] = r < len ? *reinterpret_cast<const u32*>(
                                       q + ((size_t)(off + r) * hq + h) * HD + cc)
                                 : 0u;
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};

    int kv_end = pos0 + min(len, tile * BQ + BQ);
    int kv_begin = 0;
    if (window > 0) kv_begin = max(0, pos0 + tile * BQ - window + 1) / BK * BK;
    int qp0 = pos0 + r0, qp1 = pos0 + r1;

    auto load_tile = [&](int stage, int kt) {
        bf16* kd = stage0 + stage * 2 * BK * LD;
        bf16* vd = kd + BK * LD;
        for (int i = tid; i < BK * HD / 8; i += blockDim.x) {
            int r = i / (HD / 8), cc = (i % (HD / 8)) * 8;
            int key = kt + r;
            const bf16* kp = cache;
            const bf16* vp = cache;
            int bytes = 0;
            if (key < kv_end) {
                const bf16* base = cache + (size_t)table[key / bs] * block_elems;
                int s = key % bs;
                kp = base + ((size_t)kh * bs + s) * HD + cc;
                vp = base + ((size_t)(hkv + kh) * bs + s) * HD + cc;
                bytes = 16;
            }
            cp_async16(kd + r * LD + cc, kp, bytes);
            cp_async16(vd + r * LD + cc, vp, bytes);
        }
        cp_async_commit();
    };
    int ntiles = (kv_end - kv_begin + BK - 1) / BK;
    load_tile(0, kv_begin);
    for (int t = 0; t < ntiles; t++) {
        int kt = kv_begin + t * BK;
        if (t + 1 < ntiles) {
            load_tile((t + 1) & 1, kt + BK);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* ks = stage0 + (t & 1) * 2 * BK * LD;
        const bf16* vs = ks + BK * LD;
        // This warp's rows are at positions wq0 .. wq0 + 15.
        int wq0 = pos0 + tile * BQ + warp * 16;
        if (kt > wq0 + 15) {  // every key of the tile is in this warp's future
            __syncthreads();
            continue;
        }
        // No mask needed when every key is at or before every row of the warp.
        bool full = window == 0 && kt + BK <= kv_end && kt + BK - 1 <= wq0;

        // S = Q K^T; K fragments through ldmatrix (lane l points at key row l % 8 of
        // matrix l / 8: dims +0, +8 of this k-step and the next).
        float sc[BK / 8][4];
        int mi = lane >> 3, mr = lane & 7;
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
            const bf16* krow = ks + (nt * 8 + mr) * LD + mi * 8;
#pragma unroll
            for (int ks2 = 0; ks2 < HD / 16; ks2 += 2) {
                u32 b[4];
                ldsm_x4(b, krow + ks2 * 16);
                mma16816(sc[nt], qf[ks2], b[0], b[1]);
                mma16816(sc[nt], qf[ks2 + 1], b[2], b[3]);
            }
        }
        float mx[2] = {NEG_INF, NEG_INF};
        if (full) {
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    sc[nt][e] *= scale;
                    mx[e >> 1] = fmaxf(mx[e >> 1], sc[nt][e]);
                }
        } else {
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = kt + nt * 8 + tig * 2 + (e & 1);
                    int qp = (e & 2) ? qp1 : qp0;
                    int r = (e & 2) ? r1 : r0;
                    bool masked = key > qp || key >= kv_end || r >= len ||
                                  (window > 0 && qp - key >= window);
                    float v = masked ? NEG_INF : sc[nt][e] * scale;
                    sc[nt][e] = v;
                    mx[e >> 1] = fmaxf(mx[e >> 1], v);
                }
            }
        }
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 1));
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 2));
            float mn = fmaxf(m[rr], mx[rr]);
            float corr = (m[rr] == NEG_INF) ? 0.f : __expf(m[rr] - mn);
            if (mn == NEG_INF) corr = 1.f;
            l[rr] *= corr;
#pragma unroll
            for (int i = 0; i < HD / 8; i++) {
                o[i][2 * rr] *= corr;
                o[i][2 * rr + 1] *= corr;
            }
            m[rr] = mn;
        }
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float mm = m[e >> 1];
                float p = (sc[nt][e] == NEG_INF) ? 0.f : __expf(sc[nt][e] - mm);
                sc[nt][e] = p;
                l[e >> 1] += p;
            }
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            u32 a[4];
            a[0] = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]);
            a[1] = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
            a[2] = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
            a[3] = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
            // V fragments through ldmatrix.trans: matrices (keys +0, +8) x (dims +0, +8).
            const bf16* vrow = vs + (kk * 16 + (mi & 1) * 8 + mr) * LD + (mi >> 1) * 8;
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt += 2) {
                u32 b[4];
                ldsm_x4_trans(b, vrow + nt * 8);
                mma16816(o[nt], a, b[0], b[1]);
                mma16816(o[nt + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        l[rr] += __shfl_xor_sync(0xffffffff, l[rr], 1);
        l[rr] += __shfl_xor_sync(0xffffffff, l[rr], 2);
        l[rr] = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt++) {
        int col = nt * 8 + tig * 2;
        if (r0 < len) {
            *reinterpret_cast<__nv_bfloat162*>(out + ((size_t)(off + r0) * hq + h) * HD + col) =
                __floats2bfloat162_rn(o[nt][0] * l[0], o[nt][1] * l[0]);
        }
        if (r1 < len) {
            *reinterpret_cast<__nv_bfloat162*>(out + ((size_t)(off + r1) * hq + h) * HD + col) =
                __floats2bfloat162_rn(o[nt][2] * l[1], o[nt][3] * l[1]);
        }
    }
}

#define PREFILL_ATTN(HD)                                                                       \
    extern "C" __global__ void prefill_attn_##HD(                                              \
        const bf16* q, const bf16* cache, const int* tables, int table_stride,                 \
        const int* q_off, const int* q_pos, const int* q_len, bf16* out, int hq, int hkv,      \
        int bs, int window, float scale) {                                                     \
        pdl_enter();                                                                           \
        prefill_attn<HD>(q, cache, tables, table_stride, q_off, q_pos, q_len, out, hq, hkv,    \
                         bs, window, scale);                                                   \
    }
PREFILL_ATTN(32)
PREFILL_ATTN(64)
PREFILL_ATTN(128)

// ---------------------------------------------------------------------------
// Skinny GEMM for decode (n <= 8 rows): y[r, o] = sum_k x[r, k] w[o, k].
// cuBLAS is tuned for large n; at batch 1..8 the step is a pure weight stream, so
// one warp per output row reads its weight row once with 16-byte loads.
// grid ceil(out / 8), block 256 (8 warps).

// acc[j][r] = x[r] · wr[j] over k, summed across the warp (every lane gets it), for R
// weight rows read side by side; waits for the kernel before (pdl_enter) first.
template <int N, int R>
__device__ __forceinline__ void warp_dots(const bf16* x, const bf16* const (&wr)[R], int k,
                                          int lane, float (&acc)[R][N]) {
#pragma unroll
    for (int j = 0; j < R; j++)
#pragma unroll
        for (int r = 0; r < N; r++) acc[j][r] = 0.f;
    pdl_enter();
#pragma unroll 8
    for (int c = lane * 8; c < k; c += 256) {
        float wf[R][8];
#pragma unroll
        for (int j = 0; j < R; j++) {
            uint4 wv = __ldg(reinterpret_cast<const uint4*>(wr[j] + c));
            const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wv);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float2 f = __bfloat1622float2(w2[e]);
                wf[j][2 * e] = f.x;
                wf[j][2 * e + 1] = f.y;
            }
        }
#pragma unroll
        for (int r = 0; r < N; r++) {
            uint4 xv = *reinterpret_cast<const uint4*>(x + (size_t)r * k + c);
            const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float2 f = __bfloat1622float2(x2[e]);
#pragma unroll
                for (int j = 0; j < R; j++)
                    acc[j][r] += f.x * wf[j][2 * e] + f.y * wf[j][2 * e + 1];
            }
        }
    }
#pragma unroll
    for (int j = 0; j < R; j++)
#pragma unroll
        for (int r = 0; r < N; r++) acc[j][r] = warp_sum(acc[j][r]);
}

template <int N>
__device__ void gemv_rows(const bf16* x, const bf16* w, void* y, int k, int out, int y_f32) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int o = blockIdx.x * (blockDim.x >> 5) + warp;
    if (o >= out) {
        pdl_enter();
        return;
    }
    const bf16* wr[1] = {w + (size_t)o * k};
    float acc[1][N];
    warp_dots<N, 1>(x, wr, k, lane, acc);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < N; r++) {
            if (y_f32)
                reinterpret_cast<float*>(y)[(size_t)r * out + o] = acc[0][r];
            else
                reinterpret_cast<bf16*>(y)[(size_t)r * out + o] = __float2bfloat16(acc[0][r]);
        }
    }
}

extern "C" __global__ void gemv(const bf16* x, const bf16* w, void* y, int n, int k, int out,
                                int y_f32) {
    switch (n) {
        case 1: gemv_rows<1>(x, w, y, k, out, y_f32); break;
        case 2: gemv_rows<2>(x, w, y, k, out, y_f32); break;
        case 3: gemv_rows<3>(x, w, y, k, out, y_f32); break;
        case 4: gemv_rows<4>(x, w, y, k, out, y_f32); break;
        case 5: gemv_rows<5>(x, w, y, k, out, y_f32); break;
        case 6: gemv_rows<6>(x, w, y, k, out, y_f32); break;
        case 7: gemv_rows<7>(x, w, y, k, out, y_f32); break;
        default: gemv_rows<8>(x, w, y, k, out, y_f32); break;
    }
}

// The gate/up product and the activation in one pass, for one row (decode at batch
// 1): act[o] = silu(x · w[o]) * (x · w[inter + o]), w = [gate; up] of [2 inter, k].
// One warp reads both of its rows, so the activation needs no kernel of its own and
// the product's output never goes to memory. grid ceil(inter / 8), block 256.
extern "C" __global__ void gemv_silu(const bf16* x, const bf16* w, bf16* act, int k,
                                     int inter) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int o = blockIdx.x * (blockDim.x >> 5) + warp;
    if (o >= inter) {
        pdl_enter();
        return;
    }
    const bf16* wr[2] = {w + (size_t)o * k, w + ((size_t)inter + o) * k};
    float acc[2][1];
    warp_dots<1, 2>(x, wr, k, lane, acc);
    if (lane == 0) {
        // Rounded to bf16 first, as the two-pass path stores the product.
        float g = bf(__float2bfloat16(acc[0][0])), u = bf(__float2bfloat16(acc[1][0]));
        act[o] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
    }
}

