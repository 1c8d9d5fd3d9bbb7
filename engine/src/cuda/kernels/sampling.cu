// Sampling on the GPU (part of the program that starts with common.cuh): one block (1024 threads) per row of logits [rows, vocab].
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

// Calls f(i, row[i]) for i = threadIdx.x, + blockDim.x, ... below n, in that
// order (so results are those of the plain strided loop, bit for bit), with
// the loads of 8 elements issued before their uses. With one load in flight
// per thread a block reading a row of a 128k vocabulary waits out a memory
// latency per element step: ~50 µs a pass on the H200, where a row's
// sampling makes 1 pass (greedy) to 11 (top-k and top-p), and its log
// probabilities 2 + top_n.
template <typename F>
__device__ __forceinline__ void for_row(const float* row, int n, F f) {
    const int nt = blockDim.x;
    int i = threadIdx.x;
    for (; i + 7 * nt < n; i += 8 * nt) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = row[i + k * nt];
#pragma unroll
        for (int k = 0; k < 8; k++) f(i + k * nt, v[k]);
    }
    for (; i < n; i += nt) f(i, row[i]);
}

// Calls f(i, row[i]) for i in [a, b), in order, the loads of 8 issued together.
template <typename F>
__device__ __forceinline__ void for_range(const float* row, int a, int b, F f) {
    int i = a;
    for (; i + 8 <= b; i += 8) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = row[i + k];
#pragma unroll
        for (int k = 0; k < 8; k++) f(i + k, v[k]);
    }
    for (; i < b; i++) f(i, row[i]);
}

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
        for_row(row, vocab, [&](int, float l) {
            u32 k = order_key(l);
            if ((k & mask) == prefix) {
                float w = by_mass ? __expf((l - mx) * inv_t) : 1.f;
                atomicAdd(&hist[(k >> shift) & 255], w);
            }
        });
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
        for_row(row, vocab, [&](int i, float v) {
            if (v > best) {
                best = v;
                besti = i;
            }
        });
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
    for_row(row, vocab, [&](int, float l) { mx = fmaxf(mx, l); });
    mx = block_max(mx);

    u32 thr = 0;  // keep key >= thr
    if (top_k > 0 && top_k < vocab)
        thr = radix_threshold(row, vocab, mx, inv_t, (float)top_k, false, hist, &prefix_s,
                              &above_s);
    if (top_p < 1.f) {
        float kept = 0.f;
        for_row(row, vocab, [&](int, float l) {
            if (order_key(l) >= thr) kept += __expf((l - mx) * inv_t);
        });
        kept = block_sum(kept);
        u32 t = radix_threshold(row, vocab, mx, inv_t, top_p * kept, true, hist, &prefix_s,
                                &above_s);
        thr = max(thr, t);
    }

    // Contiguous ranges per thread, so a prefix scan walks the vocabulary in id order.
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int a = tid * per, b = min(vocab, a + per);
    float local = 0.f;
    for_range(row, a, b, [&](int, float l) {
        float p = __expf((l - mx) * inv_t);
        if (order_key(l) >= thr && p > 0.f && p >= min_p) local += p;
    });
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
            if (order_key(l) >= thr && p > 0.f && p >= min_p) {
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
            float p = __expf((l - mx) * inv_t);
            // p > 0: a masked (-inf) token is never the fallback pick.
            if (order_key(l) >= thr && p > 0.f && p >= min_p) {
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


// Structured output: a grammar's allowed tokens applied to rows of logits
// before sample_rows. masks[row] is the row's mask index into bits, -1 for a
// row without a constraint; a mask is (vocab + 31) / 32 words, bit t % 32 of
// word t / 32 set when token t may be drawn (the host's
// AllowedTokens::packed). One block per row; a token whose bit is clear gets -inf.
extern "C" __global__ void mask_logits(float* logits, const u32* bits, const int* masks,
                                       int vocab) {
    pdl_enter();
    int row = blockIdx.x;
    int m = masks[row];
    if (m < 0) return;
    int words = (vocab + 31) >> 5;
    const u32* b = bits + (size_t)m * words;
    float* l = logits + (size_t)row * vocab;
    // As for_row: the mask words of 8 steps loaded before their uses.
    const int nt = blockDim.x;
    int i = threadIdx.x;
    for (; i + 7 * nt < vocab; i += 8 * nt) {
        u32 w[8];
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = b[(i + k * nt) >> 5];
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (!((w[k] >> ((i + k * nt) & 31)) & 1u)) l[i + k * nt] = NEG_INF;
    }
    for (; i < vocab; i += nt)
        if (!((b[i >> 5] >> (i & 31)) & 1u)) l[i] = NEG_INF;
}

// The largest (value, then lowest index) over the block; NaN and index
// 0x7fffffff stand for "none".
__device__ void block_argmax(float& best, int& besti) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffff, best, o);
        int oi = __shfl_xor_sync(0xffffffff, besti, o);
        if (ov > best || (ov == best && oi < besti)) {
            best = ov;
            besti = oi;
        }
    }
    __syncthreads();
    if (lane == 0) {
        bv[warp] = best;
        bi[warp] = besti;
    }
    __syncthreads();
    best = bv[0];
    besti = bi[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++)
        if (bv[w] > best || (bv[w] == best && bi[w] < besti)) {
            best = bv[w];
            besti = bi[w];
        }
}

#define MAX_TOP_LOGPROBS 20

// Log probabilities of the sampled tokens, as the host's TokenLogprobs::of:
// log_softmax(l * s) with s = 1 / temperature (1 for greedy; the temperature
// is word 0 of draws[5 * row], the row's draw), over the logits sampling chose
// from (mask applied). One block per row. lps[row * (1 + MAX_TOP_LOGPROBS)]
// gets the chosen token's (ids[row]) then the top_n most likely tokens' log
// probabilities, top_ids[row * MAX_TOP_LOGPROBS] those tokens, most likely
// first, the lower id first on ties (0x7fffffff past the vocabulary's end).
extern "C" __global__ void row_logprobs(const float* logits, const int* draws, const u32* ids,
                                        float* lps, u32* top_ids, int vocab, int top_n) {
    __shared__ float logz_s;
    pdl_enter();
    int r = blockIdx.x, tid = threadIdx.x;
    const float* row = logits + (size_t)r * vocab;
    float temp = __int_as_float(draws[5 * r]);
    float scale = temp > 0.f ? 1.f / temp : 1.f;
    float mx = NEG_INF;
    for_row(row, vocab, [&](int, float v) {
        if (isfinite(v)) mx = fmaxf(mx, v * scale);
    });
    mx = block_max(mx);
    float sum = 0.f;
    for_row(row, vocab, [&](int, float v) {
        if (!isnan(v)) sum += __expf(v * scale - mx);
    });
    sum = block_sum(sum);
    if (tid == 0) logz_s = mx == NEG_INF ? 0.f : mx + logf(sum);
    __syncthreads();
    float logz = logz_s;
    float* out = lps + (size_t)r * (1 + MAX_TOP_LOGPROBS);
    u32* out_ids = top_ids + (size_t)r * MAX_TOP_LOGPROBS;
    if (tid == 0) {
        u32 t = ids[r];
        out[0] = t < (u32)vocab ? row[t] * scale - logz : NEG_INF;
    }
    // The k-th most likely: the largest (value, lowest id) ranked after the (k-1)-th.
    float pv = __int_as_float(0x7f800000);
    int pi = -1;
    int n = min(top_n, MAX_TOP_LOGPROBS);
    for (int k = 0; k < n; k++) {
        float best = NEG_INF;
        int besti = 0x7fffffff;
        for_row(row, vocab, [&](int i, float v) {
            if (isnan(v)) return;
            if ((v < pv || (v == pv && i > pi)) && (v > best || (v == best && i < besti))) {
                best = v;
                besti = i;
            }
        });
        block_argmax(best, besti);
        if (tid == 0) {
            out_ids[k] = (u32)besti;
            out[1 + k] = besti == 0x7fffffff ? NEG_INF : best * scale - logz;
        }
        if (besti == 0x7fffffff) break;
        pv = best;
        pi = besti;
    }
}
