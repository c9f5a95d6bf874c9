// The PPO-style policy loss on packed sequences (see policy_loss/mod.rs for the formulas): the
// per-token loss and its gradient with respect to the new log-probs, and per-sequence partial sums
// of the loss and of every metric, which the host adds up in f64.
//
// squid_pl_counts: one block per sequence: its loss tokens (mask != 0) into counts[s].
// squid_pl_loss: one block per sequence, threads striding over its tokens with the sequence's
//   aggregation weight w[s] (computed on the host from the counts); grad[t] = mask w dl/dnew,
//   token_loss[t] = mask l_t. partials[PL_PARTIALS s ..] = loss, clip_low, clip_high, dual,
//   ratio_sum, ratio_min, ratio_max, approx_kl, kl, entropy, then (first index or -1, value) of a
//   non-finite new_logp, old_logp, advantage, ref_logp, entropy (any token, as the CPU path),
//   gradient, token loss (found by a second pass over the sequence, only when the first saw one).
// params (f32[9]): 1 - clip_low, 1 + clip_high, dual clip c, dual clip on, KL beta, k3 clamp
//   (inf: none), KL estimator (0 none, 1 k1, 2 k2, 3 k3, 4 k3+), has entropy, has ref_logp.

#define PL_BLOCK 128
#define PL_PARTIALS 24
#define PL_LOG_RATIO_CLAMP 20.0f

__device__ __forceinline__ bool pl_finite(float x) { return fabsf(x) <= 3.402823466e38f; }

// Block-wide sum (op 0), min (1) or max (2) of v; every thread gets it.
__device__ double pl_reduce(double v, int op, double* sh) {
    for (int o = 16; o > 0; o >>= 1) {
        const double u = __shfl_xor_sync(0xffffffffu, v, o);
        v = op == 0 ? v + u : (op == 1 ? fmin(v, u) : fmax(v, u));
    }
    __syncthreads();  // sh may still be read by the previous call
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    double t = sh[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) t = op == 0 ? t + sh[w] : (op == 1 ? fmin(t, sh[w]) : fmax(t, sh[w]));
    return t;
}

extern "C" __global__ void squid_pl_counts(const unsigned char* __restrict__ mask, const unsigned int* __restrict__ cu_seqlens,
                                           unsigned int* __restrict__ counts) {
    __shared__ double sh[PL_BLOCK / 32];
    const long long s = blockIdx.x;
    double n = 0.0;
    for (unsigned int t = cu_seqlens[s] + threadIdx.x; t < cu_seqlens[s + 1]; t += blockDim.x) n += mask[t] ? 1.0 : 0.0;
    n = pl_reduce(n, 0, sh);
    if (threadIdx.x == 0) counts[s] = (unsigned int)n;
}

extern "C" __global__ void __launch_bounds__(PL_BLOCK)
    squid_pl_loss(const float* __restrict__ new_logp, const float* __restrict__ old_logp, const float* __restrict__ ref_logp,
                  const float* __restrict__ adv, const unsigned char* __restrict__ mask, const float* __restrict__ entropy,
                  const unsigned int* __restrict__ cu_seqlens, const float* __restrict__ weights,
                  const float* __restrict__ params, float* __restrict__ grad, float* __restrict__ token_loss,
                  double* __restrict__ partials) {
    __shared__ double sh[PL_BLOCK / 32];
    const long long s = blockIdx.x;
    const float lo = params[0], hi = params[1], dual_c = params[2], beta = params[4], k3_clamp = params[5];
    const bool dual_on = params[3] != 0.0f, has_entropy = params[7] != 0.0f, has_ref = params[8] != 0.0f;
    const int kl_mode = (int)params[6];
    const float w = weights[s];
    // Sums in f64 per thread: loss, clip_low, clip_high, dual, ratio_sum, approx_kl, kl, entropy.
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float rmin = INFINITY, rmax = -INFINITY;
    // Whether this thread saw a non-finite input, gradient or token loss (the first ones are
    // found by a second pass, only then).
    bool any_bad = false;
    for (unsigned int t = cu_seqlens[s] + threadIdx.x; t < cu_seqlens[s + 1]; t += blockDim.x) {
        const float nw = new_logp[t], od = old_logp[t], a = adv[t];
        const float r = has_ref ? ref_logp[t] : nw;
        const float e = has_entropy ? entropy[t] : 0.0f;
        const float diff = nw - od;
        const bool inside = fabsf(diff) < PL_LOG_RATIO_CLAMP;
        const float ratio = expf(fminf(fmaxf(diff, -PL_LOG_RATIO_CLAMP), PL_LOG_RATIO_CLAMP));
        const float l1 = -a * ratio;
        const float l2 = -a * fminf(fmaxf(ratio, lo), hi);
        const bool clipped = l2 > l1;
        float pg = clipped ? l2 : l1;
        float dpg = (clipped || !inside) ? 0.0f : l1;
        const bool dual = dual_on && a < 0.0f && pg > -a * dual_c;
        if (dual) {
            pg = -a * dual_c;
            dpg = 0.0f;
        }
        const float d = r - nw;
        float kv = 0.0f, kg = 0.0f;
        if (kl_mode == 1) {
            kv = -d;
            kg = 1.0f;
        } else if (kl_mode == 2) {
            kv = 0.5f * d * d;
            kg = -d;
        } else if (kl_mode >= 3) {
            const float dc = fminf(fmaxf(d, -PL_LOG_RATIO_CLAMP), PL_LOG_RATIO_CLAMP);
            const float ex = expf(dc);
            const float v = ex - dc - 1.0f;
            const float g3 = (fabsf(d) < PL_LOG_RATIO_CLAMP && v <= k3_clamp) ? 1.0f - ex : 0.0f;
            kv = fminf(v, k3_clamp);
            kg = kl_mode == 4 ? -d : g3;
        }
        const float loss_t = pg + beta * kv, grad_t = dpg + beta * kg;
        const bool keep = mask[t] != 0;
        const float m = keep ? 1.0f : 0.0f, mw = m * w;
        const float gv = mw * grad_t, tl = m * loss_t;
        grad[t] = gv;
        token_loss[t] = tl;
        acc[0] += (double)(mw * loss_t);
        acc[1] += (double)(m * ((clipped && a < 0.0f) ? 1.0f : 0.0f));
        acc[2] += (double)(m * ((clipped && a > 0.0f) ? 1.0f : 0.0f));
        acc[3] += (double)(m * (dual ? 1.0f : 0.0f));
        acc[4] += (double)(m * ratio);
        acc[5] += (double)(m * (od - nw));
        acc[6] += (double)(m * kv);
        acc[7] += (double)(m * e);
        if (keep) {
            rmin = fminf(rmin, ratio);
            rmax = fmaxf(rmax, ratio);
        }
        any_bad |= !(pl_finite(nw) && pl_finite(od) && pl_finite(a) && pl_finite(r) && pl_finite(e) && pl_finite(gv) &&
                     pl_finite(tl));
    }
    double* out = partials + (long long)PL_PARTIALS * s;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const double v = pl_reduce(acc[k], 0, sh);
        if (threadIdx.x == 0) out[k < 5 ? k : k + 2] = v;  // slots 0-4, then 7-9
    }
    const double mn = pl_reduce((double)rmin, 1, sh), mx = pl_reduce((double)rmax, 2, sh);
    const bool block_bad = pl_reduce(any_bad ? 1.0 : 0.0, 2, sh) > 0.0;
    if (threadIdx.x == 0) {
        out[5] = mn;
        out[6] = mx;
    }
    // The rare error path: per kind, the first non-finite token of the sequence and its value.
    // Gradients and token losses are read back from this block's own writes (made visible to
    // the block by the barriers in pl_reduce).
    const unsigned int begin = cu_seqlens[s], end = cu_seqlens[s + 1];
#pragma unroll 1
    for (int k = 0; k < 7; ++k) {
        double first = 1e300;
        if (block_bad) {
            for (unsigned int t = begin + threadIdx.x; t < end; t += blockDim.x) {
                const float v = k == 0 ? new_logp[t]
                              : k == 1 ? old_logp[t]
                              : k == 2 ? adv[t]
                              : k == 3 ? (has_ref ? ref_logp[t] : new_logp[t])
                              : k == 4 ? (has_entropy ? entropy[t] : 0.0f)
                              : k == 5 ? grad[t]
                                       : token_loss[t];
                if (!pl_finite(v)) {
                    first = (double)t;  // this thread's tokens come in ascending order
                    break;
                }
            }
            first = pl_reduce(first, 1, sh);
        }
        if (threadIdx.x == 0) {
            const bool found = first < 1e300;
            const unsigned int t = found ? (unsigned int)first : 0u;
            const float v = !found ? 0.0f
                          : k == 0 ? new_logp[t]
                          : k == 1 ? old_logp[t]
                          : k == 2 ? adv[t]
                          : k == 3 ? (has_ref ? ref_logp[t] : new_logp[t])
                          : k == 4 ? (has_entropy ? entropy[t] : 0.0f)
                          : k == 5 ? grad[t]
                                   : token_loss[t];
            out[10 + 2 * k] = found ? first : -1.0;
            out[11 + 2 * k] = (double)v;
        }
    }
}
