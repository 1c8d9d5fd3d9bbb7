// Prefill attention: causal, flash-attention style (online softmax, the score
// matrix never leaves registers), bf16 tensor cores through mma.m16n8k16. Part of
// the program that starts with common.cuh.
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


// Query rows and keys per tile, from the host (-D): it sizes the grid, the block
// (BQ / 16 warps) and the dynamic shared memory from them (launch.rs).
#define BQ PREFILL_BQ
#define BK PREFILL_BK

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

