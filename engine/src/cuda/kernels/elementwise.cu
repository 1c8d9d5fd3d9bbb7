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

// One row of the RMSNorm kernels below: xr += dr (when dr is given), then
// orow = rmsnorm(xr) * w (bf16), the row read twice: once for the sum of
// squares, once for the scaling. Four values a thread at a time (16-byte loads)
// when hidden is a multiple of 4.
__device__ __forceinline__ void rmsnorm_row(float* xr, const float* dr, const bf16* w,
                                            bf16* orow, int hidden, float eps) {
    float ss = 0.f;
    if (hidden % 4 == 0) {
        for (int i = threadIdx.x * 4; i < hidden; i += blockDim.x * 4) {
            float4 v = *reinterpret_cast<const float4*>(xr + i);
            if (dr) {
                float4 d = *reinterpret_cast<const float4*>(dr + i);
                v.x += d.x;
                v.y += d.y;
                v.z += d.z;
                v.w += d.w;
                *reinterpret_cast<float4*>(xr + i) = v;
            }
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        ss = block_sum(ss);
        float inv = rsqrtf(ss / (float)hidden + eps);
        for (int i = threadIdx.x * 4; i < hidden; i += blockDim.x * 4) {
            float4 v = *reinterpret_cast<const float4*>(xr + i);
            __nv_bfloat162 w01 = *reinterpret_cast<const __nv_bfloat162*>(w + i);
            __nv_bfloat162 w23 = *reinterpret_cast<const __nv_bfloat162*>(w + i + 2);
            float2 a = __bfloat1622float2(w01), b = __bfloat1622float2(w23);
            __nv_bfloat162 o[2] = {__floats2bfloat162_rn(v.x * inv * a.x, v.y * inv * a.y),
                                   __floats2bfloat162_rn(v.z * inv * b.x, v.w * inv * b.y)};
            *reinterpret_cast<uint2*>(orow + i) = *reinterpret_cast<uint2*>(o);
        }
        return;
    }
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
        orow[i] = __float2bfloat16(xr[i] * inv * bf(w[i]));
}

// For output row r, source row s = rows ? rows[r] : r:
//   x[s] += delta[s] (when delta is given); out[r] = rmsnorm(x[s]) * w  (bf16).
// A decode step's few rows: blocks of 1024 (the host's norm_threads), the row
// read twice (rmsnorm_row).
extern "C" __global__ void add_rmsnorm(float* x, const float* delta, const int* rows,
                                       const bf16* w, bf16* out, int hidden, float eps) {
    pdl_enter();
    size_t r = blockIdx.x;
    size_t s = rows ? (size_t)rows[r] : r;
    rmsnorm_row(x + s * hidden, delta ? delta + s * hidden : nullptr, w, out + r * hidden,
                hidden, eps);
}

// The same for a pass of many rows (a prefill chunk), in blocks of a sixteenth
// of the width (norm_threads): a row of 2 to NORM_VEC 16-byte loads a thread is
// held in registers between the sum and the scaling, read once with every load
// of a thread in flight at once; any other row as add_rmsnorm reads it. A kernel
// of its own, so that add_rmsnorm keeps its registers and its blocks a
// multiprocessor (a shared kernel made 256 decode rows 1.4 us slower a norm on
// an H100: docs/GPU_BENCH.md, nineteenth session).
#define NORM_VEC 4
extern "C" __global__ void add_rmsnorm_rows(float* x, const float* delta, const int* rows,
                                            const bf16* w, bf16* out, int hidden, float eps) {
    pdl_enter();
    size_t r = blockIdx.x;
    size_t s = rows ? (size_t)rows[r] : r;
    float* xr = x + s * hidden;
    const float* dr = delta ? delta + s * hidden : nullptr;
    bf16* orow = out + r * hidden;
    if (hidden % 4 != 0 || hidden <= 4 * (int)blockDim.x ||
        hidden > NORM_VEC * 4 * (int)blockDim.x) {
        rmsnorm_row(xr, dr, w, orow, hidden, eps);
        return;
    }
    float4 v[NORM_VEC];
#pragma unroll
    for (int j = 0; j < NORM_VEC; j++) {
        int i = (j * blockDim.x + threadIdx.x) * 4;
        if (i < hidden) v[j] = *reinterpret_cast<const float4*>(xr + i);
    }
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_VEC; j++) {
        int i = (j * blockDim.x + threadIdx.x) * 4;
        if (i >= hidden) continue;
        if (dr) {
            float4 d = *reinterpret_cast<const float4*>(dr + i);
            v[j].x += d.x;
            v[j].y += d.y;
            v[j].z += d.z;
            v[j].w += d.w;
            *reinterpret_cast<float4*>(xr + i) = v[j];
        }
        ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / (float)hidden + eps);
#pragma unroll
    for (int j = 0; j < NORM_VEC; j++) {
        int i = (j * blockDim.x + threadIdx.x) * 4;
        if (i >= hidden) continue;
        __nv_bfloat162 w01 = *reinterpret_cast<const __nv_bfloat162*>(w + i);
        __nv_bfloat162 w23 = *reinterpret_cast<const __nv_bfloat162*>(w + i + 2);
        float2 a = __bfloat1622float2(w01), b = __bfloat1622float2(w23);
        __nv_bfloat162 o[2] = {__floats2bfloat162_rn(v[j].x * inv * a.x, v[j].y * inv * a.y),
                               __floats2bfloat162_rn(v[j].z * inv * b.x, v[j].w * inv * b.y)};
        *reinterpret_cast<uint2*>(orow + i) = *reinterpret_cast<uint2*>(o);
    }
}

// Eight bf16 values (16 bytes) as floats, and back.
__device__ __forceinline__ void bf16x8_to_f32(const uint4& u, float (&v)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float2 f = __bfloat1622float2(h[e]);
        v[2 * e] = f.x;
        v[2 * e + 1] = f.y;
    }
}

__device__ __forceinline__ void store_bf16x8(bf16* p, const float (&v)[8]) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int e = 0; e < 4; e++) h[e] = __floats2bfloat162_rn(v[2 * e], v[2 * e + 1]);
    *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ void store_f32x8(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// rope_kv's work for one token when hd is a multiple of 16, in items of 16 bytes:
// item i < rot holds values j .. j + 7 of a q or k head's first half and the eight
// they pair with in its second half (`per` items a head); the rest, eight values of
// a V head. Loads (rope_kv_item_load) are apart from the rest so that the first
// item's are in flight while the block computes its angles.
__device__ __forceinline__ void rope_kv_item_load(const bf16* row, int i, int rot, int per,
                                                  int half, int hd, int vbase, uint4& a,
                                                  uint4& b) {
    if (i < rot) {
        int c1 = (i / per) * hd + (i % per) * 8;
        a = *reinterpret_cast<const uint4*>(row + c1);
        b = *reinterpret_cast<const uint4*>(row + c1 + half);
    } else {
        int r = i - rot, chunks = hd / 8;
        a = *reinterpret_cast<const uint4*>(row + vbase + (r / chunks) * hd + (r % chunks) * 8);
    }
}

__device__ __forceinline__ void rope_kv_item_store(const uint4& a, const uint4& b,
                                                   const bf16* brow, const float* sn_s,
                                                   const float* cs_s, int i, int rot, int per,
                                                   int half, int hd, int hq, int hkv, int vbase,
                                                   size_t t, bf16* q_out, bf16* base, int bs,
                                                   int s, float* kv_out) {
    float x1[8], x2[8];
    bf16x8_to_f32(a, x1);
    if (i < rot) {
        int h = i / per, j = (i % per) * 8;
        int c1 = h * hd + j;
        bf16x8_to_f32(b, x2);
        if (brow) {
            float b1[8], b2[8];
            bf16x8_to_f32(*reinterpret_cast<const uint4*>(brow + c1), b1);
            bf16x8_to_f32(*reinterpret_cast<const uint4*>(brow + c1 + half), b2);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                x1[e] += b1[e];
                x2[e] += b2[e];
            }
        }
        float r1[8], r2[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float c = cs_s[j + e], sn = sn_s[j + e];
            r1[e] = x1[e] * c - x2[e] * sn;
            r2[e] = x2[e] * c + x1[e] * sn;
        }
        if (h < hq) {
            bf16* q = q_out + (t * hq + h) * hd;
            store_bf16x8(q + j, r1);
            store_bf16x8(q + j + half, r2);
        } else if (kv_out) {  // an fp8 cache: kv_fp8_store quantizes these
            float* k = kv_out + (t * 2 * hkv + (h - hq)) * hd;
            store_f32x8(k + j, r1);
            store_f32x8(k + j + half, r2);
        } else {
            bf16* k = base + ((size_t)(h - hq) * bs + s) * hd;
            store_bf16x8(k + j, r1);
            store_bf16x8(k + j + half, r2);
        }
    } else {
        int r = i - rot, chunks = hd / 8;
        int kh = r / chunks, d = (r % chunks) * 8;
        if (brow) {
            float bv[8];
            bf16x8_to_f32(*reinterpret_cast<const uint4*>(brow + vbase + kh * hd + d), bv);
#pragma unroll
            for (int e = 0; e < 8; e++) x1[e] += bv[e];
        }
        if (kv_out)
            store_f32x8(kv_out + (t * 2 * hkv + hkv + kh) * hd + d, x1);
        else
            store_bf16x8(base + ((size_t)(hkv + kh) * bs + s) * hd + d, x1);
    }
}

// A token's hd / 2 rotation angles at position p into shared memory, the block's
// threads taking them in turn.
__device__ __forceinline__ void rope_angles(int p, const float* inv_freq, int half, float* sn_s,
                                            float* cs_s) {
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float sn, cs;
        sincosf((float)p * inv_freq[j], &sn, &cs);
        sn_s[j] = sn;
        cs_s[j] = cs;
    }
}

// Rotary embedding (rotate_half convention) of q and k, then K and V into the cache.
// qkv: [n, (hq + 2 hkv) hd] bf16 (optional bias of that width); pos[t] the token's
// position; slots[t] = block * bs + slot where its K/V go. With kv_out (an fp8
// cache) K and V go there instead, as f32 rows [n, 2, hkv, hd], for kv_fp8_store.
// grid n, block ROPE_THREADS: block t takes token t's heads; the hd / 2 angles
// are computed once per token (not per head) into shared memory. Where hd is a
// multiple of 16 each thread moves 16 bytes at a time (rope_kv_item_*), its first
// loads issued before the angles; else it rotates two adjacent pairs at a time
// (bf16x2 loads and stores). hd is a multiple of 4, at most 256.
extern "C" __global__ void rope_kv(const bf16* qkv, const bf16* bias, const int* pos,
                                   const int* slots, const float* inv_freq, bf16* q_out,
                                   bf16* cache, float* kv_out, int hq, int hkv, int hd, int bs) {
    __shared__ float sn_s[128], cs_s[128];  // hd / 2 <= 128
    pdl_enter();
    int half = hd / 2, tid = threadIdx.x;
    size_t t = blockIdx.x;
    size_t width = (size_t)(hq + 2 * hkv) * hd;
    const bf16* row = qkv + t * width;
    const bf16* brow = bias;
    int vbase = (hq + hkv) * hd;
    if ((hd & 15) == 0) {  // block-uniform: the whole block takes this path
        int per = half / 8, rot = (hq + hkv) * per, items = rot + hkv * (hd / 8);
        uint4 a = {}, b = {};
        if (tid < items) rope_kv_item_load(row, tid, rot, per, half, hd, vbase, a, b);
        rope_angles(pos[t], inv_freq, half, sn_s, cs_s);
        int slot = slots[t];
        bf16* base = cache + (size_t)(slot / bs) * 2 * (size_t)hkv * bs * hd;
        int s = slot % bs;
        __syncthreads();
        for (int i = tid; i < items; i += blockDim.x) {
            if (i != tid) rope_kv_item_load(row, i, rot, per, half, hd, vbase, a, b);
            rope_kv_item_store(a, b, brow, sn_s, cs_s, i, rot, per, half, hd, hq, hkv, vbase, t,
                               q_out, base, bs, s, kv_out);
        }
        return;
    }
    rope_angles(pos[t], inv_freq, half, sn_s, cs_s);
    int slot = slots[t];
    bf16* base = cache + (size_t)(slot / bs) * 2 * (size_t)hkv * bs * hd;
    int s = slot % bs;
    __syncthreads();
    // Pairs (j, j + 1) of every rotated head: (hq + hkv) * half / 2 of them.
    int quarter = half / 2;
    int pairs = (hq + hkv) * quarter;
    for (int p = tid; p < pairs; p += blockDim.x) {
        int h = p / quarter, j = (p % quarter) * 2;
        int c1 = h * hd + j, c2 = c1 + half;
        float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row + c1));
        float2 x2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row + c2));
        if (brow) {
            float2 b1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(brow + c1));
            float2 b2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(brow + c2));
            x1.x += b1.x;
            x1.y += b1.y;
            x2.x += b2.x;
            x2.y += b2.y;
        }
        float c0 = cs_s[j], s0 = sn_s[j], c1f = cs_s[j + 1], s1 = sn_s[j + 1];
        float2 a = make_float2(x1.x * c0 - x2.x * s0, x1.y * c1f - x2.y * s1);
        float2 b = make_float2(x2.x * c0 + x1.x * s0, x2.y * c1f + x1.y * s1);
        if (h < hq) {
            bf16* q = q_out + t * hq * hd + h * hd;
            *reinterpret_cast<__nv_bfloat162*>(q + j) = __floats2bfloat162_rn(a.x, a.y);
            *reinterpret_cast<__nv_bfloat162*>(q + j + half) = __floats2bfloat162_rn(b.x, b.y);
        } else if (kv_out) {  // an fp8 cache: kv_fp8_store quantizes these
            float* k = kv_out + (t * 2 * hkv + (h - hq)) * hd;
            *reinterpret_cast<float2*>(k + j) = a;
            *reinterpret_cast<float2*>(k + j + half) = b;
        } else {
            bf16* k = base + ((size_t)(h - hq) * bs + s) * hd;
            *reinterpret_cast<__nv_bfloat162*>(k + j) = __floats2bfloat162_rn(a.x, a.y);
            *reinterpret_cast<__nv_bfloat162*>(k + j + half) = __floats2bfloat162_rn(b.x, b.y);
        }
    }
    // V: hkv * hd values, two at a time.
    for (int p = tid; p < hkv * half; p += blockDim.x) {
        int kh = p / half, d = (p % half) * 2;
        int c = vbase + kh * hd + d;
        float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row + c));
        if (brow) {
            float2 bv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(brow + c));
            x.x += bv.x;
            x.y += bv.y;
        }
        if (kv_out) {
            float* v = kv_out + (t * 2 * hkv + hkv + kh) * hd;
            *reinterpret_cast<float2*>(v + d) = x;
        } else {
            bf16* v = base + ((size_t)(hkv + kh) * bs + s) * hd;
            *reinterpret_cast<__nv_bfloat162*>(v + d) = __floats2bfloat162_rn(x.x, x.y);
        }
    }
}

// act[r, i] = silu(gu[r, i]) * gu[r, inter + i]. grid (x, y): rows blockIdx.y,
// + gridDim.y, ...; each thread takes 8 consecutive values (16-byte loads) when
// inter is a multiple of 8, else one.
extern "C" __global__ void silu_mul(const bf16* gu, bf16* act, int n, int inter) {
    pdl_enter();
    int step = gridDim.x * blockDim.x, first = blockIdx.x * blockDim.x + threadIdx.x;
    for (size_t r = blockIdx.y; r < (size_t)n; r += gridDim.y) {
        const bf16* g = gu + r * 2 * inter;
        const bf16* u = g + inter;
        bf16* out = act + r * inter;
        if (inter % 8 == 0) {
            for (int i = first * 8; i < inter; i += step * 8) {
                uint4 gv = *reinterpret_cast<const uint4*>(g + i);
                uint4 uv = *reinterpret_cast<const uint4*>(u + i);
                const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
                const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&uv);
                uint4 ov;
                __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&ov);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float2 gf = __bfloat1622float2(g2[e]), uf = __bfloat1622float2(u2[e]);
                    o2[e] = __floats2bfloat162_rn(gf.x / (1.f + __expf(-gf.x)) * uf.x,
                                                  gf.y / (1.f + __expf(-gf.y)) * uf.y);
                }
                *reinterpret_cast<uint4*>(out + i) = ov;
            }
        } else {
            for (int i = first; i < inter; i += step) {
                float gf = bf(g[i]), uf = bf(u[i]);
                out[i] = __float2bfloat16(gf / (1.f + __expf(-gf)) * uf);
            }
        }
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
