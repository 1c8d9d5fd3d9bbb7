// Decode attention over the paged cache: one query token per sequence (and
// attn_combine, which merges the splits). Part of the program that starts with
// common.cuh.
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
// DECODE_TILE (keys per tile) comes from the host (-D), which sizes the dynamic
// shared memory from it (launch.rs, decode_smem).

__device__ __forceinline__ int split_chunk(int len, int max_splits) {
    int c = (len + max_splits - 1) / max_splits;
    c = (c + 15) & ~15;
    return c < 64 ? 64 : c;
}

// Dynamic shared memory (sized by the host: launch.rs, decode_smem): K and V
// tiles, double-buffered, then the tile's scores [G][TILE] and the P·V reduction
// area [key groups][G][HD] (= [G][4 blockDim.x] floats).

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
    __shared__ float wgt[MAX_SPLITS];  // max_splits <= MAX_SPLITS (a -D from the host)
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

