// Decode attention over the paged cache: one query token per sequence (and
// attn_combine, which merges the splits). Part of the program that starts with
// common.cuh.
// grid (max_splits, hkv, batch), block 128. A sequence of `len` keys is cut into
// splits of `chunk` keys (split_chunk below: the split count follows each
// sequence's own length, up to the grid's max_splits, so nothing the host
// computes from the batch's lengths enters the launch and one CUDA graph serves
// every step of a batch-size bucket). Each block takes one split of one sequence
// for the `group` query heads sharing KV head blockIdx.y (on tensor cores, each
// warp with its own 16-key tiles and online softmax: decode_attn below), and
// writes unnormalised partial results:
//   part_o[b, h, split, d] = sum_j exp(s_j - m) v_j[d], part_ml[b, h, split] = (m, l).
// attn_combine merges the splits. The block table's row stride is read from
// device memory (*table_stride) for the same reason.
// DECODE_TILE (keys a block has in flight per stage, 16 per warp) comes from the
// host (-D), which sizes the dynamic shared memory from it (launch.rs, decode_smem).

__device__ __forceinline__ int split_chunk(int len, int max_splits) {
    int c = (len + max_splits - 1) / max_splits;
    c = (c + 15) & ~15;
    return c < 64 ? 64 : c;
}

// The tile's row `r`, 16-byte chunk `c` sits at chunk c ^ phase(r) of its row, so
// the eight rows an ldmatrix reads at one chunk hit eight different banks (rows
// are HD * 2 bytes: at HD 32 two rows share a 128-byte line).
template <int HD>
__device__ __forceinline__ int decode_swz(int r, int c) {
    if constexpr (HD >= 64) return c ^ (r & 7);
    else return c ^ ((r >> 1) & 3);
}

// Key t0's K and V rows (KV head kh) in a cache whose blocks hold a multiple of 16
// tokens. A warp's tile starts at a multiple of 16 (split_chunk), so its 16 keys
// then share t0's block and follow in consecutive rows: the tile reads one
// block-table entry and divides once, where paged_kv_rows does both for every row
// (on the H200 the b256 launch was held by its integer work, not its loads:
// docs/GPU_BENCH.md, twentieth session).
template <typename T, int HD>
__device__ __forceinline__ void paged_kv_tile(const T*& kb, const T*& vb, const T* cache,
                                              const int* table, size_t block_elems, int kh,
                                              int hkv, int bs, int t0) {
    const T* base = cache + (size_t)table[t0 / bs] * block_elems;
    int s = t0 % bs;
    kb = base + ((size_t)kh * bs + s) * HD;
    vb = base + ((size_t)(hkv + kh) * bs + s) * HD;
}

// Row r's K and V element `col` of the tile at t0 (false past `end`, both then at
// the tile's first row, for a zero-filling copy): from the tile's base rows (kb,
// vb: paged_kv_tile) when `one_block`, else from the block table (paged_kv_rows).
template <typename T, int HD>
__device__ __forceinline__ bool decode_tile_row(const T*& kp, const T*& vp, bool one_block,
                                                const T* kb, const T* vb, const T* cache,
                                                const int* table, size_t block_elems, int kh,
                                                int hkv, int bs, int t0, int r, int end,
                                                int col) {
    if (!one_block)
        return paged_kv_rows<T, HD>(kp, vp, cache, table, block_elems, kh, hkv, bs, t0 + r,
                                    end, col);
    bool in = t0 + r < end;
    int off = in ? r * HD + col : 0;
    kp = kb + off;
    vp = vb + off;
    return in;
}

// One warp's tile: keys t0 .. t0 + 15 of K and V into ks/vs ([16][HD] each,
// swizzled), with cp.async (keys at or past `end` zero-filled), as one commit group.
// (Reading the block table a tile ahead into registers was measured slower, and so
// was staging a split's entries in shared memory: docs/GPU_BENCH.md.)
template <int HD>
__device__ __forceinline__ void decode_load_warp_tile(bf16* ks, bf16* vs, const bf16* cache,
                                                      const int* table, size_t block_elems,
                                                      int kh, int hkv, int bs, int t0, int end,
                                                      int lane) {
    constexpr int CPR = HD / 8;  // 16-byte chunks per row
    bool one_block = (bs & 15) == 0;
    const bf16 *kb = cache, *vb = cache;
    if (one_block) paged_kv_tile<bf16, HD>(kb, vb, cache, table, block_elems, kh, hkv, bs, t0);
#pragma unroll
    for (int i = lane; i < 16 * CPR; i += 32) {
        int r = i / CPR, c = i % CPR;
        const bf16 *kp, *vp;
        int bytes = decode_tile_row<bf16, HD>(kp, vp, one_block, kb, vb, cache, table,
                                              block_elems, kh, hkv, bs, t0, r, end, c * 8)
                        ? 16
                        : 0;
        int dst = r * HD + decode_swz<HD>(r, c) * 8;
        cp_async16(ks + dst, kp, bytes);
        cp_async16(vs + dst, vp, bytes);
    }
    cp_async_commit();
}

// An fp8 cache: the warp's tile as e4m3 bytes into raw stage `kr`/`vr` ([16][HD]
// bytes each) and its keys' K and V scales into `sr` ([2][16] f32), one commit
// group as above (keys at or past `end` zero-filled, scale 0 too).
template <int HD>
__device__ __forceinline__ void decode_load_warp_raw(unsigned char* kr, unsigned char* vr,
                                                     float* sr, const unsigned char* cache,
                                                     const float* scales, const int* table,
                                                     size_t block_bytes, int kh, int hkv, int bs,
                                                     int t0, int end, int lane) {
    constexpr int CPR = HD / 16;  // 16-byte chunks (16 values) per row
    bool one_block = (bs & 15) == 0;
    const unsigned char *kb = cache, *vb = cache;
    if (one_block)
        paged_kv_tile<unsigned char, HD>(kb, vb, cache, table, block_bytes, kh, hkv, bs, t0);
#pragma unroll
    for (int i = lane; i < 16 * CPR; i += 32) {
        int r = i / CPR, c = i % CPR;
        const unsigned char *kp, *vp;
        int bytes = decode_tile_row<unsigned char, HD>(kp, vp, one_block, kb, vb, cache, table,
                                                       block_bytes, kh, hkv, bs, t0, r, end,
                                                       c * 16)
                        ? 16
                        : 0;
        cp_async16(kr + r * HD + c * 16, kp, bytes);
        cp_async16(vr + r * HD + c * 16, vp, bytes);
    }
    if (lane < 16)
        kv_fp8_load_scales(sr + lane, sr + 16 + lane, scales, table, kh, hkv, bs, t0 + lane, end);
    cp_async_commit();
}

// The raw stage expanded into the bf16 tile (swizzled as decode_load_warp_tile
// stores it), unscaled: the keys' scales go into the scores and probabilities.
template <int HD>
__device__ __forceinline__ void decode_expand_warp_tile(bf16* ks, bf16* vs,
                                                        const unsigned char* kr,
                                                        const unsigned char* vr, int lane) {
    constexpr int CPR = HD / 8;  // 16-byte bf16 chunks per row
#pragma unroll
    for (int i = lane; i < 16 * CPR; i += 32) {
        int r = i / CPR, c = i % CPR;
        int dst = r * HD + decode_swz<HD>(r, c) * 8;
        *reinterpret_cast<uint4*>(ks + dst) =
            kv_fp8_expand8(*reinterpret_cast<const uint2*>(kr + r * HD + c * 8));
        *reinterpret_cast<uint4*>(vs + dst) =
            kv_fp8_expand8(*reinterpret_cast<const uint2*>(vr + r * HD + c * 8));
    }
}

// Tensor cores for the `group` query heads of KV head kh: they are the rows of
// an m16n8k16 product (rows past `group` are zero), keys its columns. Each of
// the block's 4 warps walks its own tiles of 16 keys (tiles w, w + 4, ..) with
// its own online softmax and double-buffered cp.async tiles in shared memory,
// so nothing but the final merge of the warps' partial results waits for the
// whole block. The merge writes the split's unnormalised output and (m, l),
// like the rest of this file, or, when the launch has one split per sequence
// (max_splits == 1), the normalised output into `out` as attn_combine would
// (bit for bit), and attn_combine is not launched. G <= 8.
// FP8: `cache` holds e4m3 bytes and `scales` their scales (kv_fp8.cu); each tile
// comes in as bytes (two raw stages) and is expanded into one bf16 tile right
// before it is used, so the products below are the same.
template <int HD, int G, bool FP8>
__device__ void decode_attn(const bf16* q, const void* cache_v, const float* scales,
                            const int* tables, const int* table_stride, const int* seq_lens,
                            float* part_o, float* part_ml, bf16* out, int hq, int hkv, int bs,
                            int max_splits, int window, float scale) {
    static_assert(G <= 8, "query heads per KV head are the rows 0..7 of the product");
    constexpr int WARPS = 4;  // blockDim.x == 128 (launch.rs)
    extern __shared__ __align__(16) unsigned char decode_smem[];
    // Per warp (DECODE_TILE = 64 = 4 warps x 16 keys), the host's decode_smem:
    // bf16 [stage][K 16 x HD, V 16 x HD]; FP8 [K, V bf16 tile][stage][K, V
    // 16 x HD bytes][stage][K, V 16 scales].
    constexpr int WARP_BYTES = 2 * 2 * 16 * HD * 2 + (FP8 ? 2 * 2 * 16 * 4 : 0);
    static_assert(DECODE_TILE == WARPS * 16, "a 16-key tile per warp");
    float* red_o = reinterpret_cast<float*>(decode_smem + WARPS * WARP_BYTES);  // [warp][G][HD]
    float* red_ml = red_o + WARPS * G * HD;                                      // [warp][G][2]
    const bf16* cache = reinterpret_cast<const bf16*>(cache_v);
    const unsigned char* cache8 = reinterpret_cast<const unsigned char*>(cache_v);
    int group = hq / hkv;

    int b = blockIdx.z, kh = blockIdx.y, sp = blockIdx.x;
    int len = seq_lens[b];
    int chunk = split_chunk(len, max_splits);
    int start = sp * chunk;
    if (start >= len) return;  // attn_combine only reads splits that hold keys
    int end = min(start + chunk, len);
    size_t head0 = (size_t)b * hq + (size_t)kh * group;
    int lo = window > 0 ? max(0, len - window) : 0;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int gid = lane >> 2, tig = lane & 3, mi = lane >> 3, mr = lane & 7;
    const int* table = tables + (size_t)b * (*table_stride);
    size_t block_elems = 2 * (size_t)hkv * bs * HD;
    unsigned char* wbase = decode_smem + (size_t)warp * WARP_BYTES;
    bf16* wt = reinterpret_cast<bf16*>(wbase);  // this warp's two stages (FP8: its tile)
    unsigned char* raw = wbase + 2 * 16 * HD * 2;                    // FP8: [stage][K, V]
    float* wsc = reinterpret_cast<float*>(wbase + 2 * 2 * 16 * HD * 2);  // FP8: [stage][32]

    // Q as the product's A fragments: row gid = query head gid of the group.
    u32 qf[HD / 16][2];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int d = ks * 16 + tig * 2 + e * 8;
            qf[ks][e] = gid < group ? *reinterpret_cast<const u32*>(q + (head0 + gid) * HD + d)
                                    : 0u;
        }
    }
    float o[HD / 8][2];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = 0.f;
    float m = NEG_INF, l = 0.f;

    int first = start + warp * 16;
    if (first < end) {
        if constexpr (FP8)
            decode_load_warp_raw<HD>(raw, raw + 16 * HD, wsc, cache8, scales, table, block_elems,
                                     kh, hkv, bs, first, end, lane);
        else
            decode_load_warp_tile<HD>(wt, wt + 16 * HD, cache, table, block_elems, kh, hkv, bs,
                                      first, end, lane);
    }
    for (int t0 = first, it = 0; t0 < end; t0 += WARPS * 16, it++) {
        bf16* ks = FP8 ? wt : wt + (it & 1) * 2 * 16 * HD;
        bf16* vs = ks + 16 * HD;
        int next = t0 + WARPS * 16;
        if (next < end) {
            int ns = (it + 1) & 1;
            if constexpr (FP8) {
                unsigned char* nr = raw + ns * 2 * 16 * HD;
                decode_load_warp_raw<HD>(nr, nr + 16 * HD, wsc + ns * 32, cache8, scales, table,
                                         block_elems, kh, hkv, bs, next, end, lane);
            } else {
                bf16* nk = wt + ns * 2 * 16 * HD;
                decode_load_warp_tile<HD>(nk, nk + 16 * HD, cache, table, block_elems, kh, hkv,
                                          bs, next, end, lane);
            }
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncwarp();
        // FP8: the tile's K scales (key r: sr[r]) and V scales (sr[16 + r]).
        const float* sr = wsc + (it & 1) * 32;
        if constexpr (FP8) {
            const unsigned char* cr = raw + (it & 1) * 2 * 16 * HD;
            decode_expand_warp_tile<HD>(ks, vs, cr, cr + 16 * HD, lane);
            __syncwarp();
        }

        // S = Q K^T over the tile's two 8-key column blocks.
        float sc[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
            int r = nt * 8 + mr;
#pragma unroll
            for (int ks2 = 0; ks2 < HD / 16; ks2 += 2) {
                u32 bfr[4];
                ldsm_x4(bfr, ks + r * HD + decode_swz<HD>(r, ks2 * 2 + mi) * 8);
                u32 a0[4] = {qf[ks2][0], 0u, qf[ks2][1], 0u};
                mma16816(sc[nt], a0, bfr[0], bfr[1]);
                if (ks2 + 1 < HD / 16) {
                    u32 a1[4] = {qf[ks2 + 1][0], 0u, qf[ks2 + 1][1], 0u};
                    mma16816(sc[nt], a1, bfr[2], bfr[3]);
                }
            }
        }
        // Online softmax of row gid over its 16 keys (c[0], c[1] of each block).
        float mx = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int j = t0 + nt * 8 + tig * 2 + e;
                float s = FP8 ? sc[nt][e] * sr[nt * 8 + tig * 2 + e] : sc[nt][e];
                float v = (j >= end || j < lo) ? NEG_INF : s * scale;
                sc[nt][e] = v;
                mx = fmaxf(mx, v);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        float mn = fmaxf(m, mx);
        float corr = (m == NEG_INF) ? 0.f : __expf(m - mn);
        if (mn == NEG_INF) corr = 1.f;
        m = mn;
        l *= corr;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            o[i][0] *= corr;
            o[i][1] *= corr;
        }
        float p[2][2];
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                p[nt][e] = (sc[nt][e] == NEG_INF) ? 0.f : __expf(sc[nt][e] - mn);
                l += p[nt][e];
                if constexpr (FP8) p[nt][e] *= sr[16 + nt * 8 + tig * 2 + e];
            }
        // O += P V: P (row gid, the 16 keys) as A, V through ldmatrix.trans.
        u32 pa[4] = {pack_bf16(p[0][0], p[0][1]), 0u, pack_bf16(p[1][0], p[1][1]), 0u};
        int vr = (mi & 1) * 8 + mr;
#pragma unroll
        for (int nt = 0; nt < HD / 8; nt += 2) {
            u32 bfr[4];
            ldsm_x4_trans(bfr, vs + vr * HD + decode_swz<HD>(vr, nt + (mi >> 1)) * 8);
            float c0[4] = {o[nt][0], o[nt][1], 0.f, 0.f};
            float c1[4] = {o[nt + 1][0], o[nt + 1][1], 0.f, 0.f};
            mma16816(c0, pa, bfr[0], bfr[1]);
            mma16816(c1, pa, bfr[2], bfr[3]);
            o[nt][0] = c0[0];
            o[nt][1] = c0[1];
            o[nt + 1][0] = c1[0];
            o[nt + 1][1] = c1[1];
        }
        __syncwarp();  // this stage is refilled two tiles on
    }
    // Each warp's (m, l) and output rows, then one merge over the warps.
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    if (gid < G) {
#pragma unroll
        for (int nt = 0; nt < HD / 8; nt++) {
            float* dst = red_o + ((size_t)warp * G + gid) * HD + nt * 8 + tig * 2;
            dst[0] = o[nt][0];
            dst[1] = o[nt][1];
        }
        if (tig == 0) {
            red_ml[(warp * G + gid) * 2] = m;
            red_ml[(warp * G + gid) * 2 + 1] = l;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        int g = i / HD, d = i % HD;
        float mm = NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, red_ml[(w * G + g) * 2]);
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            float mw = red_ml[(w * G + g) * 2];
            float a = mw == NEG_INF ? 0.f : __expf(mw - mm);
            num += a * red_o[((size_t)w * G + g) * HD + d];
            den += a * red_ml[(w * G + g) * 2 + 1];
        }
        if (max_splits == 1) {
            // attn_combine of one split: weight exp(m - m) = 1 (0 with no key).
            float w = mm == NEG_INF ? 0.f : 1.f;
            float dn = w * den, nm = w != 0.f ? w * num : 0.f;
            out[(head0 + g) * HD + d] = __float2bfloat16(dn > 0.f ? nm / dn : 0.f);
            continue;
        }
        part_o[((head0 + g) * max_splits + sp) * HD + d] = num;
        if (d == 0) {
            part_ml[((head0 + g) * max_splits + sp) * 2] = mm;
            part_ml[((head0 + g) * max_splits + sp) * 2 + 1] = den;
        }
    }
}

#define DECODE_ATTN(HD, G)                                                                     \
    extern "C" __global__ void decode_attn_##HD##_##G(                                         \
        const bf16* q, const bf16* cache, const int* tables, const int* table_stride,          \
        const int* seq_lens, float* part_o, float* part_ml, bf16* out, int hq, int hkv, int bs, \
        int max_splits, int window, float scale) {                                             \
        pdl_enter();                                                                           \
        decode_attn<HD, G, false>(q, cache, nullptr, tables, table_stride, seq_lens, part_o,    \
                                  part_ml, out, hq, hkv, bs, max_splits, window, scale);       \
    }                                                                                          \
    extern "C" __global__ void decode_attn_fp8_##HD##_##G(                                     \
        const bf16* q, const unsigned char* cache, const float* scales, const int* tables,     \
        const int* table_stride, const int* seq_lens, float* part_o, float* part_ml, bf16* out, \
        int hq, int hkv, int bs, int max_splits, int window, float scale) {                    \
        pdl_enter();                                                                           \
        decode_attn<HD, G, true>(q, cache, scales, tables, table_stride, seq_lens, part_o,      \
                                 part_ml, out, hq, hkv, bs, max_splits, window, scale);        \
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

