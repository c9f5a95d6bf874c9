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
//   gradient, token loss.
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
    // First non-finite (index, value) per thread: new, old, adv, ref, entropy, grad, token loss.
    long long bad[7] = {-1, -1, -1, -1, -1, -1, -1};
    float bad_value[7] = {0, 0, 0, 0, 0, 0, 0};
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
        const float vals[7] = {nw, od, a, r, e, gv, tl};
        for (int k = 0; k < 7; ++k) {
            if (bad[k] < 0 && !pl_finite(vals[k])) {
                bad[k] = t;  // this thread's tokens come in ascending order
                bad_value[k] = vals[k];
            }
        }
    }
    double* out = partials + (long long)PL_PARTIALS * s;
    const int sum_slot[8] = {0, 1, 2, 3, 4, 7, 8, 9};
    for (int k = 0; k < 8; ++k) {
        const double v = pl_reduce(acc[k], 0, sh);
        if (threadIdx.x == 0) out[sum_slot[k]] = v;
    }
    const double mn = pl_reduce((double)rmin, 1, sh), mx = pl_reduce((double)rmax, 2, sh);
    if (threadIdx.x == 0) {
        out[5] = mn;
        out[6] = mx;
    }
    for (int k = 0; k < 7; ++k) {
        const double first = pl_reduce(bad[k] < 0 ? 1e300 : (double)bad[k], 1, sh);
        // Only the thread that holds the first index adds its value (NaN + 0 stays NaN).
        const double value = pl_reduce((first < 1e300 && (double)bad[k] == first) ? (double)bad_value[k] : 0.0, 0, sh);
        if (threadIdx.x == 0) {
            out[10 + 2 * k] = first < 1e300 ? first : -1.0;
            out[11 + 2 * k] = value;
        }
    }
}
