// Prefill attention: causal, flash-attention style (online softmax, the score
// matrix never leaves registers), bf16 tensor cores through mma.m16n8k16. Part of
// the program that starts with common.cuh.
// Queries of chunk c are rows q_off[c] .. q_off[c] + q_len[c] of q [n, hq, HD] at
// positions q_pos[c] ..; keys 0 .. q_pos[c] + q_len[c] are read through the
// chunk's block table (the chunk's own K/V are already in the cache).
// grid (q tiles of 128, hq, chunks), block 256 = 8 warps x 16 query rows; each K/V
// tile in shared memory serves all 128 rows.

// Query rows and keys per tile, from the host (-D): it sizes the grid, the block
// (BQ / 16 warps) and the dynamic shared memory from them (launch.rs).
#define BQ PREFILL_BQ
#define BK PREFILL_BK

// A TMA tensor map (CUDA's CUtensorMap: 128 opaque bytes, 64-byte aligned),
// one per layer of a bf16 cache (engine/src/cuda/tensor_map.rs says its shape).
struct __align__(64) CUtensorMap {
    unsigned long long opaque[16];
};

// What both prefill kernels do with a warp's fragments (mma.m16n8k16 layout:
// this thread holds rows r0 = .. + gid and r1 = r0 + 8, columns tig * 2, +1
// of each 8-wide block).

// Q's A fragments of rows r0 and r1 (zero past the chunk's `len` rows).
template <int HD>
__device__ __forceinline__ void prefill_q_fragments(u32 (&qf)[HD / 16][4], const bf16* q, int off,
                                                    int hq, int h, int r0, int r1, int len,
                                                    int tig) {
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
}

// 2^x (ex2.approx: 2^-inf is 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// One K tile's scores `sc` (keys kt ..) folded into the online softmax: masked
// unless `full` (a key after the row's position, past kv_end or the window, a
// row past the chunk), the running max m and sum l updated; `sc` becomes the
// tile's unnormalised probabilities P and `corr` the factor the output rows
// must be rescaled by (prefill_rescale) before P V is added. Scores and m stay
// unscaled (scale > 0 keeps their order): each P is 2^(s·c − m·c), c = scale ·
// log2(e), one FFMA and one ex2, and a masked score (−inf) gives 0 with no test.
template <int KB>
__device__ __forceinline__ void prefill_softmax_scores(float (&sc)[KB / 8][4], float (&m)[2],
                                                       float (&l)[2], float (&corr)[2], bool full,
                                                       int kt, int kv_end, int len, int r0,
                                                       int r1, int qp0, int qp1, int tig,
                                                       int window, float scale) {
    const float c = scale * 1.4426950408889634f;
    float mx[2] = {NEG_INF, NEG_INF};
    if (full) {
#pragma unroll
        for (int nt = 0; nt < KB / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) mx[e >> 1] = fmaxf(mx[e >> 1], sc[nt][e]);
    } else {
#pragma unroll
        for (int nt = 0; nt < KB / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = kt + nt * 8 + tig * 2 + (e & 1);
                int qp = (e & 2) ? qp1 : qp0;
                int r = (e & 2) ? r1 : r0;
                bool masked = key > qp || key >= kv_end || r >= len ||
                              (window > 0 && qp - key >= window);
                if (masked) sc[nt][e] = NEG_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], sc[nt][e]);
            }
        }
    }
    float mc[2];  // the new max times c (0 while every score so far is masked)
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 1));
        mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 2));
        float mn = fmaxf(m[rr], mx[rr]);
        corr[rr] = (mn == NEG_INF) ? 1.f : fast_exp2((m[rr] - mn) * c);
        mc[rr] = (mn == NEG_INF) ? 0.f : mn * c;
        l[rr] *= corr[rr];
        m[rr] = mn;
    }
#pragma unroll
    for (int nt = 0; nt < KB / 8; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = fast_exp2(fmaf(sc[nt][e], c, -mc[e >> 1]));
            sc[nt][e] = p;
            l[e >> 1] += p;
        }
    }
}

template <int HD>
__device__ __forceinline__ void prefill_rescale(float (&o)[HD / 8][4], const float (&corr)[2]) {
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        o[i][0] *= corr[0];
        o[i][1] *= corr[0];
        o[i][2] *= corr[1];
        o[i][3] *= corr[1];
    }
}

// Both steps at once, for a kernel with no product in flight.
template <int HD>
__device__ __forceinline__ void prefill_softmax_tile(float (&sc)[BK / 8][4], float (&m)[2],
                                                     float (&l)[2], float (&o)[HD / 8][4],
                                                     bool full, int kt, int kv_end, int len,
                                                     int r0, int r1, int qp0, int qp1, int tig,
                                                     int window, float scale) {
    float corr[2];
    prefill_softmax_scores<BK>(sc, m, l, corr, full, kt, kv_end, len, r0, r1, qp0, qp1, tig,
                               window, scale);
    prefill_rescale<HD>(o, corr);
}

// The normalised output rows r0 and r1 (those inside the chunk), bf16.
template <int HD>
__device__ __forceinline__ void prefill_store_rows(const float (&o)[HD / 8][4], float (&l)[2],
                                                   bf16* out, int off, int hq, int h, int r0,
                                                   int r1, int len, int tig) {
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

// An fp8 cache (both kernels below): keys kt .. kt + KB - 1 of K and V as e4m3
// bytes into `kr`/`vr` ([KB][HD] each) and their scales into `sr` ([K, V][KB]
// f32), with cp.async as one commit group (keys at or past kv_end zero-filled),
// by `nthr` threads of which this is thread `tid`.
template <int HD, int KB>
__device__ __forceinline__ void prefill_load_raw(unsigned char* kr, unsigned char* vr, float* sr,
                                                 const unsigned char* cache, const float* scales,
                                                 const int* table, size_t block_bytes, int kh,
                                                 int hkv, int bs, int kt, int kv_end, int tid,
                                                 int nthr) {
    constexpr int CPR = HD / 16;  // 16-byte chunks (16 values) per row
    for (int i = tid; i < KB * CPR; i += nthr) {
        int r = i / CPR, cc = (i % CPR) * 16;
        const unsigned char *kp, *vp;
        int bytes = paged_kv_rows<unsigned char, HD>(kp, vp, cache, table, block_bytes, kh, hkv,
                                                     bs, kt + r, kv_end, cc)
                        ? 16
                        : 0;
        cp_async16(kr + r * HD + cc, kp, bytes);
        cp_async16(vr + r * HD + cc, vp, bytes);
    }
    for (int i = tid; i < KB; i += nthr)
        kv_fp8_load_scales(sr + i, sr + KB + i, scales, table, kh, hkv, bs, kt + i, kv_end);
    cp_async_commit();
}

// A raw tile expanded into the bf16 K and V tiles, unscaled; the 16-byte chunk
// (row r, chunk c) of K goes to byte koff(r, c) of `kd`, of V to voff(r, c) of
// `vd` (each kernel's own tile layout); `nthr` threads, this one `tid`.
template <int HD, int KB, typename KOff, typename VOff>
__device__ __forceinline__ void prefill_expand(unsigned char* kd, unsigned char* vd,
                                               const unsigned char* kr, const unsigned char* vr,
                                               KOff koff, VOff voff, int tid, int nthr) {
    constexpr int CPR = HD / 8;  // 16-byte bf16 chunks per row
    for (int i = tid; i < KB * CPR; i += nthr) {
        int r = i / CPR, c = i % CPR;
        *reinterpret_cast<uint4*>(kd + koff(r, c)) =
            kv_fp8_expand8(*reinterpret_cast<const uint2*>(kr + r * HD + c * 8));
        *reinterpret_cast<uint4*>(vd + voff(r, c)) =
            kv_fp8_expand8(*reinterpret_cast<const uint2*>(vr + r * HD + c * 8));
    }
}

// FP8: each key's scale `s[key]` (of the tile's KB) into the fragment `sc`
// (columns tig * 2, +1 of each 8-key block): K's into the scores before the
// softmax, V's into the probabilities after it (the sum l stays unscaled).
template <int KB>
__device__ __forceinline__ void kv_fp8_scale_cols(float (&sc)[KB / 8][4], const float* s,
                                                  int tig) {
#pragma unroll
    for (int nt = 0; nt < KB / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) sc[nt][e] *= s[nt * 8 + tig * 2 + (e & 1)];
}

// FP8: `cache` holds e4m3 bytes and `scales` their scales; each K/V tile comes
// in as bytes (two raw stages) and is expanded into one bf16 tile before use.
template <int HD, bool FP8>
__device__ void prefill_attn(const bf16* q, const void* cache_v, const float* scales,
                             const int* tables,
                             int table_stride, const int* q_off, const int* q_pos,
                             const int* q_len, bf16* out, int hq, int hkv, int bs, int window,
                             float scale) {
    const int LD = HD + 8;  // padded smem row: conflict-free fragment loads
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Two stages of [K tile][V tile]: the next tile is fetched (cp.async) while
    // this one is multiplied. FP8: one [K tile][V tile], then two raw stages of
    // [K][V] BK x HD bytes, then two of [K][V] BK scales.
    bf16* stage0 = reinterpret_cast<bf16*>(smem_raw);
    const bf16* cache = reinterpret_cast<const bf16*>(cache_v);
    const unsigned char* cache8 = reinterpret_cast<const unsigned char*>(cache_v);
    unsigned char* raw = smem_raw + 2 * BK * LD * 2;
    float* raw_sc = reinterpret_cast<float*>(raw + 2 * 2 * BK * HD);

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
    prefill_q_fragments<HD>(qf, q, off, hq, h, r0, r1, len, tig);
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};

    int kv_end = pos0 + min(len, tile * BQ + BQ);
    int kv_begin = 0;
    if (window > 0) kv_begin = max(0, pos0 + tile * BQ - window + 1) / BK * BK;
    int qp0 = pos0 + r0, qp1 = pos0 + r1;

    auto load_tile = [&](int stage, int kt) {
        if constexpr (FP8) {
            unsigned char* kr = raw + stage * 2 * BK * HD;
            prefill_load_raw<HD, BK>(kr, kr + BK * HD, raw_sc + stage * 2 * BK, cache8, scales,
                                     table, block_elems, kh, hkv, bs, kt, kv_end, tid, blockDim.x);
            return;
        }
        bf16* kd = stage0 + stage * 2 * BK * LD;
        bf16* vd = kd + BK * LD;
        for (int i = tid; i < BK * HD / 8; i += blockDim.x) {
            int r = i / (HD / 8), cc = (i % (HD / 8)) * 8;
            const bf16 *kp, *vp;
            int bytes = paged_kv_rows<bf16, HD>(kp, vp, cache, table, block_elems, kh, hkv, bs,
                                                kt + r, kv_end, cc)
                            ? 16
                            : 0;
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
        if constexpr (FP8) {
            const unsigned char* kr = raw + (t & 1) * 2 * BK * HD;
            auto off = [&](int r, int c) { return (r * LD + c * 8) * 2; };
            unsigned char* kd = smem_raw;
            prefill_expand<HD, BK>(kd, kd + BK * LD * 2, kr, kr + BK * HD, off, off, tid,
                                   blockDim.x);
            __syncthreads();
        }
        const bf16* ks = stage0 + (FP8 ? 0 : (t & 1) * 2 * BK * LD);
        const bf16* vs = ks + BK * LD;
        // This warp's rows are at positions wq0 .. wq0 + 15; a tile whose every key
        // is in their future is skipped (the block's one barrier below is still
        // met: `__syncthreads` is aligned, every thread must reach the same one).
        int wq0 = pos0 + tile * BQ + warp * 16;
        if (kt <= wq0 + 15) {
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
            const float* sr = raw_sc + (t & 1) * 2 * BK;  // FP8: K scales, then V's
            if constexpr (FP8) kv_fp8_scale_cols<BK>(sc, sr, tig);
            prefill_softmax_tile<HD>(sc, m, l, o, full, kt, kv_end, len, r0, r1, qp0, qp1, tig,
                                     window, scale);
            if constexpr (FP8) kv_fp8_scale_cols<BK>(sc, sr + BK, tig);
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
        }
        __syncthreads();
    }
    prefill_store_rows<HD>(o, l, out, off, hq, h, r0, r1, len, tig);
}


// ---------------------------------------------------------------------------
// Hopper (sm_90a): the same attention with warpgroup MMAs. The block's two
// consumer warpgroups take 64 query rows each; per K/V tile of WBK keys, S = Q
// K^T is 8 (HD 128) or 4 (HD 64) wgmma.m64n{WBK}k16 with Q's fragments in
// registers and K read by the tensor cores straight from shared memory, then P V
// is wgmma.m64n{HD}k16 with P in registers and V from shared memory (MN-major).
// The accumulators have the mma.m16n8k16 fragment layout per warp, so the online
// softmax and causal mask are the code above. K/V tiles are stored in the tensor
// cores' 128-byte-swizzled layout and filled by TMA or cp.async.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PREFILL_WGMMA 1

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of an accumulator across the
// asynchronous MMA that owns it.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }
// Generic-proxy writes to shared memory (cp.async) made visible to the async
// proxy the wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A no-swizzle shared-memory matrix descriptor: start, leading (K-direction)
// and stride (MN-direction) byte offsets between 8 x 16-byte core matrices.
__device__ __forceinline__ u64 smem_desc(const void* p, u32 lbo, u32 sbo) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    return (u64)((a >> 4) & 0x3FFF) | ((u64)((lbo >> 4) & 0x3FFF) << 16) |
           ((u64)((sbo >> 4) & 0x3FFF) << 32);
}

// The same for a 128-byte-swizzled layout (start on a 1024-byte boundary, or
// 32/64/96 bytes past one to step along K inside a swizzled row).
__device__ __forceinline__ u64 smem_desc_sw128(const void* p, u32 lbo, u32 sbo) {
    return smem_desc(p, lbo, sbo) | (1ull << 62);
}

// Keys per K/V tile of the warp-specialized kernel (the host's PREFILL_WS_BK):
// twice the portable kernel's, so each consumer's scores are one m64n128 product
// per k-step and the per-tile work (barriers, the row max's shuffles, the
// rescale) is spread over twice the keys, as FlashAttention-3 does for causal
// head_dim 128.
#define WBK PREFILL_WS_BK

// The warp-specialized kernel's K and V tiles: 128-byte rows, one per key, of
// 64 dims (HD 128: two such parts, dims 0-63 then 64-127, each WBK rows), the
// 16-byte chunk j of row r stored at chunk j ^ (r % 8): the tensor cores' 128B
// swizzle, which spreads any 8 rows' same chunk over all banks. K is read as a
// K-major operand (8-row groups 1024 bytes apart), V as an MN-major one (the
// same groups along the keys, the next 64 dims SW_PART bytes on).
#define SW_PART (WBK * 128)
__device__ __forceinline__ int sw128_offset(int r, int c) {
    return (c >> 3) * SW_PART + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}
#define V_LBO SW_PART  // MN-major: the next 64 dims
#define V_SBO 1024     // the next 8 keys

// D[64 x 64] (+)= A[64 x 16] (registers) * B[16 x 64] (shared memory, descriptor);
// TRANS_B: B is MN-major (N contiguous) instead of K-major.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float* d, const u32* a, u64 desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));
}

// D[64 x 128] (+)= A[64 x 16] (registers) * B[16 x 128] (shared memory, descriptor);
// TRANS_B: B is MN-major (N contiguous) instead of K-major.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float* d, const u32* a, u64 desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(TRANS_B));
}


// S[64 x WBK] (+)= Q[64 x 16] (registers) * K^T[16 x WBK] (K-major shared memory).
__device__ __forceinline__ void wgmma_qk(float* s, const u32* a, u64 desc, int scale_d) {
    if constexpr (WBK == 128) wgmma_m64n128k16_rs<0>(s, a, desc, scale_d);
    else wgmma_m64n64k16_rs<0>(s, a, desc, scale_d);
}

template <int HD>
__device__ __forceinline__ void wgmma_pv(float* o, const u32* a, u64 desc) {
    if constexpr (HD == 128) wgmma_m64n128k16_rs<1>(o, a, desc, 1);
    else wgmma_m64n64k16_rs<1>(o, a, desc, 1);
}

// Shared-memory barriers (mbarrier) of the warp-specialized kernel below.
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// The arrival of this thread, made when all its earlier cp.async copies have
// landed (`noinc`: it counts against the barrier's expected arrivals).
__device__ __forceinline__ void mbar_arrive_cp_async(u64* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar))
                 : "memory");
}
// Waits until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n}\n" ::"r"(smem_u32(bar)),
        "r"(parity)
        : "memory");
}
// A barrier of the producer warpgroup's 128 threads alone (barrier 0 is __syncthreads;
// not `.aligned`: the consumers never run it).
__device__ __forceinline__ void producer_sync() {
    asm volatile("barrier.sync 1, 128;\n" ::: "memory");
}

// The Tensor Memory Accelerator (TMA): a box of a tensor described by a tensor
// map (built on the host with cuTensorMapEncodeTiled, kept in global memory)
// copied into shared memory by the hardware, in the map's swizzle, completing
// its bytes on an mbarrier. The barrier is told the bytes to wait for first
// (expect_tx), then gets the arrivals its count asks for in one (arrive_n).
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive_n(u64* bar, u32 n) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, u64* bar, int c0,
                                            int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_u32(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar))
        : "memory");
}

// The TMA producer of the warp-specialized kernel (the producer's first warp,
// this thread its lane `lane`): tiles 0 .. tiles - 1 of K and V, each WBK / bs
// blocks whose entries start at `table`, into the ring's stages. A block of K
// (or V) head kh is one box per 64 dims (the map: dims, slot, K/V head, block,
// innermost first), written at its rows of the stage in the 128-byte swizzle
// the consumers read (bs a multiple of 8 keeps every box on a 1024-byte
// boundary, the swizzle's period). Lane 0 waits for the stage and gives its
// `full` barrier the tile's bytes to wait for and the 128 arrivals its count
// asks for (the copies' path makes one per producer thread); then the lanes
// issue the tile's boxes (2 · WBK / bs · HD / 64: 32 of 2 KiB with blocks of 16
// at head_dim 128), each reading its own boxes' table entries before the wait.
// Small boxes cost the TMA unit time of their own: on an H100 the 32k prompt's
// last 8k chunk (2 layers) took 29.1 ms with blocks of 16 and one thread issuing,
// 27.6 with the lanes issuing, 25.1-25.5 with blocks of 64 or 128 (one thread),
// and 34.2 with blocks of 8 (docs/GPU_BENCH.md, "thirteenth session").
template <int HD, int STAGES>
__device__ __forceinline__ void prefill_tma_tiles(unsigned char* stages, u64* full, u64* empty,
                                                  const CUtensorMap* tmap, const int* table,
                                                  int tiles, int kh, int hkv, int bs, int lane) {
    constexpr int TILE_BYTES = WBK * HD * 2;
    constexpr int P = HD / 64;  // boxes per block of K (or V)
    static_assert(2 * (WBK / 8) * P <= 64, "at most two boxes a lane");
    const int nb = WBK / bs, boxes = 2 * nb * P;
    // Box b: K (b < nb · P) or V, block (b mod nb · P) / P, dims 64 · (b mod P).
    auto block_of = [&](int b) { return (b % (nb * P)) / P; };
    if (lane == 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"(tmap) : "memory");
    for (int t = 0; t < tiles; t++) {
        int e[2];  // the table entries of this lane's boxes lane and lane + 32
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int b = lane + 32 * i;
            e[i] = b < boxes ? table[t * nb + block_of(b)] : 0;
        }
        int s = t % STAGES;
        if (lane == 0) {
            if (t >= STAGES) mbar_wait(&empty[s], (t / STAGES - 1) & 1);
            mbar_expect_tx(&full[s], 2 * TILE_BYTES);
            mbar_arrive_n(&full[s], 128);
        }
        __syncwarp();  // the stage is free and armed
        unsigned char* kd = stages + (size_t)s * 2 * TILE_BYTES;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int b = lane + 32 * i;
            if (b < boxes) {
                int kv = b / (nb * P), p = b % P;
                tma_load_4d(kd + kv * TILE_BYTES + p * SW_PART + block_of(b) * bs * 128, tmap,
                            &full[s], p * 64, 0, kv * hkv + kh, e[i]);
            }
        }
    }
}

// Warp-specialized (FlashAttention-3 style): warpgroup 0 produces, warpgroups 1
// and 2 consume 64 query rows each. The producer fills a ring of STAGES K/V
// tiles (TMA or cp.async; each stage's `full` barrier completes when its copies
// land, so no thread waits on its own copies) and refills a stage when both
// consumers have released it (its `empty` barrier, one arrival per consumer
// warp). Each consumer runs its own online softmax with no block-wide
// barrier: it issues tile t's S = Q K^T and tile t-1's O += P V together and
// computes tile t's softmax while P V is still in the tensor cores, so the
// exponentials overlap the products; and the two consumers take turns issuing
// (ping-pong), so one's products run while the other's softmax does. Registers
// move from the producer (copies only) to the consumers with setmaxnreg.
// FP8: the producer loads raw e4m3 tiles and their scales into two staging
// buffers and expands each into its stage's bf16 tile (and the scales beside
// it) before marking it full; the consumers apply the scales as prefill_attn.
//
// Shared memory (prefill_ws_smem on the host): the stages' [K][V] bf16 tiles,
// then their [K, V][WBK] f32 scales, then the barriers (full, empty per stage),
// then (FP8) two raw stages of [K][V] WBK x HD bytes and [K, V][WBK] scales.
#define PREFILL_WS_THREADS ((BQ / 64 + 1) * 128)
template <int HD, bool FP8>
__device__ void prefill_attn_ws(const bf16* q, const void* cache_v, const float* scales,
                                const CUtensorMap* tmap, const int* tables, int table_stride, const int* q_off,
                                const int* q_pos, const int* q_len, bf16* out, int hq, int hkv,
                                int bs, int window, float scale) {
    static_assert(BQ == 128 && (WBK == 64 || WBK == 128),
                  "two consumer warpgroups of 64 rows, m64n64 or m64n128 score tiles");
    constexpr int STAGES = FP8 ? PREFILL_FP8_STAGES : PREFILL_STAGES;
    // Registers a thread after setmaxnreg (multiples of 8, the three warpgroups'
    // total at most the 168 x 384 the launch gives the block): a consumer holds
    // its scores and probabilities (WBK / 2 + WBK / 4), output (HD / 2) and Q
    // fragments (HD / 4); a producer only addresses and table entries.
    constexpr int PRODUCER_REGS = WBK == 128 ? 56 : 80;
    constexpr int CONSUMER_REGS = WBK == 128 ? 224 : 208;
    static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 256 <= 168 * 384, "registers");
    constexpr int CPR = HD / 8;              // 16-byte chunks per K/V row
    constexpr int TILE_BYTES = WBK * HD * 2;  // one K (or V) tile
    extern __shared__ __align__(128) unsigned char smem_dyn[];
    // Tiles start on a 1024-byte boundary (the host allots 1 KiB for it).
    unsigned char* smem_raw = smem_dyn + ((1024 - (smem_u32(smem_dyn) & 1023)) & 1023);
    float* stage_sc = reinterpret_cast<float*>(smem_raw + STAGES * 2 * TILE_BYTES);
    u64* full = reinterpret_cast<u64*>(stage_sc + STAGES * 2 * WBK);
    u64* empty = full + STAGES;
    unsigned char* raw = reinterpret_cast<unsigned char*>(empty + STAGES);
    float* raw_sc = reinterpret_cast<float*>(raw + 2 * 2 * WBK * HD);

    int c = blockIdx.z, h = blockIdx.y;
    int len = q_len[c];
    int tiles = (len + BQ - 1) / BQ;
    int tile = tiles - 1 - (int)blockIdx.x;  // the longest tiles first
    if (tile < 0) return;
    int pos0 = q_pos[c];
    int kh = h / (hq / hkv);
    const int* table = tables + (size_t)c * table_stride;
    size_t block_elems = 2 * (size_t)hkv * bs * HD;
    int kv_end = pos0 + min(len, tile * BQ + BQ);
    int kv_begin = 0;
    if (window > 0) kv_begin = max(0, pos0 + tile * BQ - window + 1) / WBK * WBK;
    int ntiles = (kv_end - kv_begin + WBK - 1) / WBK;
    int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&full[s], 128);
            mbar_init(&empty[s], BQ / 16);  // one arrival per consumer warp
        }
    }
    __syncthreads();

    if (tid < 128) {  // the producer warpgroup
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS) : "memory");
        if constexpr (FP8) {
            const unsigned char* cache8 = reinterpret_cast<const unsigned char*>(cache_v);
            auto load_raw = [&](int buf, int kt) {
                unsigned char* kr = raw + buf * 2 * WBK * HD;
                prefill_load_raw<HD, WBK>(kr, kr + WBK * HD, raw_sc + buf * 2 * WBK, cache8, scales,
                                     table, block_elems, kh, hkv, bs, kt, kv_end, tid, 128);
            };
            load_raw(0, kv_begin);
            for (int t = 0; t < ntiles; t++) {
                int kt = kv_begin + t * WBK, s = t % STAGES;
                if (t + 1 < ntiles) {
                    load_raw((t + 1) & 1, kt + WBK);
                    cp_async_wait<1>();
                } else {
                    cp_async_wait<0>();
                }
                producer_sync();  // every thread's copies of tile t have landed
                if (t >= STAGES) mbar_wait(&empty[s], (t / STAGES - 1) & 1);
                const unsigned char* kr = raw + (t & 1) * 2 * WBK * HD;
                unsigned char* kd = smem_raw + (size_t)s * 2 * TILE_BYTES;
                prefill_expand<HD, WBK>(
                    kd, kd + TILE_BYTES, kr, kr + WBK * HD,
                    [](int r, int c) { return sw128_offset(r, c); },
                    [](int r, int c) { return sw128_offset(r, c); },
                    tid, 128);
                for (int i = tid; i < 2 * WBK; i += 128)
                    stage_sc[s * 2 * WBK + i] = raw_sc[(t & 1) * 2 * WBK + i];
                fence_proxy_async();  // the tile is read by the tensor cores
                mbar_arrive(&full[s]);
                producer_sync();  // staging buffer t & 1 is free for tile t + 2
            }
        } else {
            // Each key's row is read whole by CPR consecutive threads: thread
            // tid copies chunk cc of rows row0 + k · RSTEP, k < ITERS (the
            // swizzle keeps the shared-memory writes conflict-free). A tile's
            // table entries are read before the wait for its stage, which their
            // latency then overlaps.
            constexpr int ITERS = WBK * CPR / 128;
            constexpr int RSTEP = 128 / CPR;  // rows per round
            static_assert(WBK * CPR % 128 == 0 && 128 % CPR == 0, "whole rounds of copies");
            const int row0 = tid / CPR, cc = tid % CPR;
            const unsigned char* cache = reinterpret_cast<const unsigned char*>(cache_v) +
                                         ((size_t)kh * bs * HD + cc * 8) * 2;
            const u32 block_bytes = (u32)(block_elems * 2);
            const size_t v_delta = (size_t)hkv * bs * HD * 2;  // K head kh to V head kh
            const int dst0 = sw128_offset(row0, cc);  // row0 + k·RSTEP: + k·RSTEP·128
            // With a tensor map (a bf16 cache whose blocks are whole multiples of
            // 8 rows that tile WBK), the first warp loads every tile that ends at
            // or before kv_end by TMA; the copies then load only the tile holding
            // kv_end, if any: a box brings whole blocks, and the rows of a
            // sequence's last block past kv_end hold whatever was written there
            // before (a NaN there would reach the output through 0 x NaN in P V),
            // where the copies zero-fill them.
            int t_first = 0;
            if (tmap != nullptr && WBK % bs == 0 && kv_begin % bs == 0 && bs % 8 == 0) {
                t_first = (kv_end - kv_begin) / WBK;
                if (tid < 32)
                    prefill_tma_tiles<HD, STAGES>(smem_raw, full, empty, tmap,
                                                  table + kv_begin / bs, t_first, kh, hkv, bs, tid);
                // Every tile before t_first is issued, and the stage of tile
                // t_first was released for tile t_first - 2 STAGES at least, so
                // the parity wait below is on the right phase.
                producer_sync();
            }
            for (int t = t_first; t < ntiles; t++) {
                int kt = kv_begin + t * WBK, s = t % STAGES;
                int blk[ITERS];  // the rows' blocks, -1 at or past kv_end
#pragma unroll
                for (int k = 0; k < ITERS; k++) {
                    int key = kt + row0 + RSTEP * k;
                    blk[k] = key < kv_end ? table[key / bs] : -1;
                }
                if (t >= STAGES) mbar_wait(&empty[s], (t / STAGES - 1) & 1);
                unsigned char* kd = smem_raw + (size_t)s * 2 * TILE_BYTES + dst0;
#pragma unroll
                for (int k = 0; k < ITERS; k++) {
                    u32 so = (u32)(((kt + row0 + RSTEP * k) % bs) * HD * 2);
                    const unsigned char* p =
                        cache + (size_t)(u32)max(blk[k], 0) * block_bytes + so;
                    int bytes = blk[k] >= 0 ? 16 : 0;
                    cp_async16(kd + k * RSTEP * 128, p, bytes);
                    cp_async16(kd + TILE_BYTES + k * RSTEP * 128, p + v_delta, bytes);
                }
                mbar_arrive_cp_async(&full[s]);
            }
            asm volatile("cp.async.wait_all;\n" ::: "memory");
        }
        return;
    }

    // A consumer warpgroup.
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS) : "memory");
    // The warp's index read through a shuffle: ptxas then knows it (and the
    // warpgroup's tile range, the loop's bounds and its stage offsets) is the same
    // in every lane, and keeps them in uniform registers, so the descriptors of
    // the wgmmas are computed there.
    int cw = __shfl_sync(0xffffffff, tid >> 5, 0) - 4, lane = tid & 31, gid = lane >> 2,
        tig = lane & 3;
    int wg = cw >> 2;
    int off = q_off[c];
    int r0 = tile * BQ + cw * 16 + gid;  // this thread's rows: r0 and r0 + 8
    int r1 = r0 + 8;
    u32 qf[HD / 16][4];
    prefill_q_fragments<HD>(qf, q, off, hq, h, r0, r1, len, tig);
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}, corr[2];
    int qp0 = pos0 + r0, qp1 = pos0 + r1;
    // This warpgroup's rows are at positions wg0 .. wg0 + 63, this warp's at
    // wq0 .. wq0 + 15; tiles past the warpgroup's last row are only released.
    int wg0 = pos0 + tile * BQ + wg * 64;
    int wq0 = pos0 + tile * BQ + cw * 16;
    int mine = min(ntiles, (wg0 + 63 - kv_begin) / WBK + 1);

    float sc[WBK / 8][4];
    float* scf = &sc[0][0];
    float* of = &o[0][0];
    u32 pa[WBK / 16][4];
    auto acquire = [&](int t) {
        mbar_wait(&full[t % STAGES], (t / STAGES) & 1);
        fence_proxy_async();  // cp.async's writes, then the tensor cores' reads
    };
    auto release = [&](int t) {  // one arrival per warp, once all its lanes are done
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[t % STAGES]);
    };
    // Descriptors of stage 0's K and V; a stage or a k-step further is an
    // offset (in 16-byte units) added to the start-address field.
    const u64 kdesc = smem_desc_sw128(smem_raw, 16, 1024);
    const u64 vdesc = smem_desc_sw128(smem_raw + TILE_BYTES, V_LBO, V_SBO);
    auto stage_units = [&](int t) { return (u64)((t % STAGES) * 2 * TILE_BYTES / 16); };
    auto issue_qk = [&](int t) {
        u64 d = kdesc + stage_units(t);
#pragma unroll
        for (int ks2 = 0; ks2 < HD / 16; ks2++)
            wgmma_qk(scf, qf[ks2], d + ((ks2 >> 2) * SW_PART + (ks2 & 3) * 32) / 16, ks2 > 0);
        wgmma_commit();
    };
    auto issue_pv = [&](int t) {
        u64 d = vdesc + stage_units(t);
#pragma unroll
        for (int kk = 0; kk < WBK / 16; kk++) wgmma_pv<HD>(of, pa[kk], d + kk * 2048 / 16);
        wgmma_commit();
    };
    // Tile t's scores into P (f32, in sc) and corr; touches neither o nor pa.
    auto softmax = [&](int t) {
        int kt = kv_begin + t * WBK;
        bool full_tile = window == 0 && kt + WBK <= kv_end && kt + WBK - 1 <= wq0;
        const float* sr = stage_sc + (t % STAGES) * 2 * WBK;  // FP8: K scales, then V's
        if constexpr (FP8) kv_fp8_scale_cols<WBK>(sc, sr, tig);
        prefill_softmax_scores<WBK>(sc, m, l, corr, full_tile, kt, kv_end, len, r0, r1, qp0, qp1,
                                    tig, window, scale);
        if constexpr (FP8) kv_fp8_scale_cols<WBK>(sc, sr + WBK, tig);
    };
    auto pack = [&]() {
#pragma unroll
        for (int kk = 0; kk < WBK / 16; kk++) {
            pa[kk][0] = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]);
            pa[kk][1] = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
            pa[kk][2] = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
            pa[kk][3] = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
        }
    };
    auto fence_regs = [&]() {
#pragma unroll
        for (int i = 0; i < WBK / 2; i++) reg_fence(scf[i]);
#pragma unroll
        for (int i = 0; i < HD / 2; i++) reg_fence(of[i]);
    };

    // Ping-pong: the two warpgroups take turns at the tensor cores (named
    // barriers 2 + wg), so one's products run while the other computes its
    // softmax. Each does ntiles + 1 turns; warpgroup 1 hands the first turn
    // to warpgroup 0 and keeps its own last one. The barriers are the
    // non-`.aligned` forms (`bar.sync` is `barrier.sync.aligned`, which promises
    // that every thread of the block runs the same barrier instruction; here
    // one warpgroup waits at one of several sites while the other arrives).
    auto turn_wait = [&]() { asm volatile("barrier.sync %0, 256;\n" ::"r"(2 + wg) : "memory"); };
    auto turn_pass = [&](int round) {
        if (!(wg == 1 && round == ntiles))
            asm volatile("barrier.arrive %0, 256;\n" ::"r"(3 - wg) : "memory");
    };
    if (wg == 1) asm volatile("barrier.arrive 2, 256;\n" ::: "memory");
    acquire(0);
    turn_wait();
    wgmma_fence();
    issue_qk(0);
    turn_pass(0);
    wgmma_wait<0>();
    fence_regs();
    softmax(0);
    prefill_rescale<HD>(o, corr);
    pack();
    for (int t = 1; t < mine; t++) {
        acquire(t);
        fence_regs();
        turn_wait();
        wgmma_fence();
        issue_qk(t);      // S_t = Q K_t^T
        issue_pv(t - 1);  // O += P_{t-1} V_{t-1}
        turn_pass(t);
        wgmma_wait<1>();  // S_t is ready; P V may still run
#pragma unroll
        for (int i = 0; i < WBK / 2; i++) reg_fence(scf[i]);
        softmax(t);
        wgmma_wait<0>();
        fence_regs();
        release(t - 1);
        if (__any_sync(0xffffffff, corr[0] != 1.f || corr[1] != 1.f))
            prefill_rescale<HD>(o, corr);
        pack();
    }
    fence_regs();
    turn_wait();
    wgmma_fence();
    issue_pv(mine - 1);
    turn_pass(mine);
    wgmma_wait<0>();
    fence_regs();
    release(mine - 1);
    for (int t = mine; t < ntiles; t++) {  // acquired first, so each release lands in its phase
        turn_wait();
        turn_pass(t + 1);
        acquire(t);
        release(t);
    }
    prefill_store_rows<HD>(o, l, out, off, hq, h, r0, r1, len, tig);
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// HD 64 and 128 on sm_90a take the warp-specialized kernel (PREFILL_WS_THREADS
// threads, register cap for setmaxnreg); the rest the mma.sync one (host:
// prefill_shape in launch.rs decides the same way).
#define PREFILL_ATTN_PORTABLE(HD, FP8, TMAP)                                                   \
    prefill_attn<HD, FP8>(q, cache, scales, tables, table_stride, q_off, q_pos, q_len, out,    \
                          hq, hkv, bs, window, scale);
#if defined(PREFILL_WGMMA)
#define PREFILL_ATTN_HOPPER(HD, FP8, TMAP)                                                     \
    prefill_attn_ws<HD, FP8>(q, cache, scales, TMAP, tables, table_stride, q_off, q_pos, q_len, \
                             out, hq, hkv, bs, window, scale);
#define PREFILL_HOPPER_BOUNDS __launch_bounds__(PREFILL_WS_THREADS, 1)
#else
#define PREFILL_ATTN_HOPPER PREFILL_ATTN_PORTABLE
#define PREFILL_HOPPER_BOUNDS
#endif
// tmap: the layer's tensor map, or null (no TMA: the copies load every tile;
// the portable kernel never uses it).
#define PREFILL_ATTN(HD, BODY, BOUNDS)                                                         \
    extern "C" __global__ BOUNDS void prefill_attn_##HD(                                       \
        const bf16* q, const bf16* cache, const CUtensorMap* tmap, const int* tables,          \
        int table_stride, const int* q_off, const int* q_pos, const int* q_len, bf16* out,     \
        int hq, int hkv, int bs, int window, float scale) {                                    \
        pdl_enter();                                                                           \
        const float* scales = nullptr;                                                         \
        BODY(HD, false, tmap)                                                                  \
    }                                                                                          \
    extern "C" __global__ BOUNDS void prefill_attn_fp8_##HD(                                   \
        const bf16* q, const unsigned char* cache, const float* scales, const int* tables,     \
        int table_stride, const int* q_off, const int* q_pos, const int* q_len, bf16* out,     \
        int hq, int hkv, int bs, int window, float scale) {                                    \
        pdl_enter();                                                                           \
        BODY(HD, true, nullptr)                                                                \
    }
PREFILL_ATTN(32, PREFILL_ATTN_PORTABLE, )
PREFILL_ATTN(64, PREFILL_ATTN_HOPPER, PREFILL_HOPPER_BOUNDS)
PREFILL_ATTN(128, PREFILL_ATTN_HOPPER, PREFILL_HOPPER_BOUNDS)
