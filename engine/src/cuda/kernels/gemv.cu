// Skinny GEMM for decode (part of the program that starts with common.cuh) (n <= 8 rows): y[r, o] = sum_k x[r, k] w[o, k].
// cuBLAS is tuned for large n; at batch 1..8 the step is a pure weight stream, so
// one warp per output row reads its weight row once with 16-byte loads.
// grid ceil(out / 8), block 256 (8 warps).

// acc[j][r] = x[r] · wr[j] over k, summed across the warp (every lane gets it), for R
// weight rows read side by side; waits for the kernel before (pdl_enter) first. With
// `prefetch` > 0, the warp first asks L2 for the first `prefetch` bytes of each row
// (128-byte lines, one a lane): a block launched early (PDL) starts streaming its
// weights, which no kernel writes, while the kernel before it still runs.
template <int N, int R>
__device__ __forceinline__ void warp_dots(const bf16* x, const bf16* const (&wr)[R], int k,
                                          int lane, float (&acc)[R][N], int prefetch) {
#pragma unroll
    for (int j = 0; j < R; j++)
#pragma unroll
        for (int r = 0; r < N; r++) acc[j][r] = 0.f;
    int ahead = min(prefetch / 2, k);  // bf16 values
#pragma unroll
    for (int j = 0; j < R; j++)
        for (int c = lane * 64; c < ahead; c += 32 * 64) prefetch_l2(wr[j] + c);
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
__device__ void gemv_rows(const bf16* x, const bf16* w, void* y, int k, int out, int y_f32,
                          int prefetch) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int o = blockIdx.x * (blockDim.x >> 5) + warp;
    if (o >= out) {
        pdl_enter();
        return;
    }
    const bf16* wr[1] = {w + (size_t)o * k};
    float acc[1][N];
    warp_dots<N, 1>(x, wr, k, lane, acc, prefetch);
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
                                int y_f32, int prefetch) {
    switch (n) {
        case 1: gemv_rows<1>(x, w, y, k, out, y_f32, prefetch); break;
        case 2: gemv_rows<2>(x, w, y, k, out, y_f32, prefetch); break;
        case 3: gemv_rows<3>(x, w, y, k, out, y_f32, prefetch); break;
        case 4: gemv_rows<4>(x, w, y, k, out, y_f32, prefetch); break;
        case 5: gemv_rows<5>(x, w, y, k, out, y_f32, prefetch); break;
        case 6: gemv_rows<6>(x, w, y, k, out, y_f32, prefetch); break;
        case 7: gemv_rows<7>(x, w, y, k, out, y_f32, prefetch); break;
        default: gemv_rows<8>(x, w, y, k, out, y_f32, prefetch); break;
    }
}

// The gate/up product and the activation in one pass, for one row (decode at batch
// 1): act[o] = silu(x · w[o]) * (x · w[inter + o]), w = [gate; up] of [2 inter, k].
// One warp reads both of its rows, so the activation needs no kernel of its own and
// the product's output never goes to memory. grid ceil(inter / 8), block 256.
extern "C" __global__ void gemv_silu(const bf16* x, const bf16* w, bf16* act, int k,
                                     int inter, int prefetch) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int o = blockIdx.x * (blockDim.x >> 5) + warp;
    if (o >= inter) {
        pdl_enter();
        return;
    }
    const bf16* wr[2] = {w + (size_t)o * k, w + ((size_t)inter + o) * k};
    float acc[2][1];
    warp_dots<1, 2>(x, wr, k, lane, acc, prefetch);
    if (lane == 0) {
        // Rounded to bf16 first, as the two-pass path stores the product.
        float g = bf(__float2bfloat16(acc[0][0])), u = bf(__float2bfloat16(acc[1][0]));
        act[o] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
    }
}

