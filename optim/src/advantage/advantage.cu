// Group advantages on the device: segmented reductions over groups given as CSR (the samples of
// group g are members[offsets[g] .. offsets[g + 1]], groups in order of first appearance, as
// Groups::resolve numbers them). Means and sums of squares in f64, as the CPU path.
//
// squid_adv_batch_stats: one block; count, mean and sum of squared deviations of the finite
//   rewards of the whole batch into batch[0..3] (TRL's scale_rewards="batch").
// squid_adv_groups: one warp per group; per group its statistics into stats[7 g ..] and the
//   advantages of its samples into out. stats: count, mean, std, first non-finite reward index
//   (-1: none), that reward, first non-finite advantage index (-1: none), that advantage.
// squid_adv_broadcast: one block per sequence; out[t] = mask[t] ? adv[s] : 0; bad[s] = adv[s]
//   where it is not finite, else 0 (the host then names it).

#define ADV_BLOCK 256

__device__ __forceinline__ bool adv_finite(float x) { return fabsf(x) <= 3.402823466e38f; }

__device__ double adv_block_sum(double v, double* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += sh[w];
    return t;
}

extern "C" __global__ void squid_adv_batch_stats(const float* __restrict__ rewards, long long n,
                                                 double* __restrict__ batch) {
    __shared__ double sh[ADV_BLOCK / 32];
    double cnt = 0.0, sum = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const float r = rewards[i];
        if (adv_finite(r)) {
            cnt += 1.0;
            sum += (double)r;
        }
    }
    cnt = adv_block_sum(cnt, sh);
    sum = adv_block_sum(sum, sh);
    const double mean = cnt > 0.0 ? sum / cnt : 0.0;
    double ss = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const float r = rewards[i];
        if (adv_finite(r)) {
            const double d = (double)r - mean;
            ss += d * d;
        }
    }
    ss = adv_block_sum(ss, sh);
    if (threadIdx.x == 0) {
        batch[0] = cnt;
        batch[1] = mean;
        batch[2] = ss;
    }
}

__device__ __forceinline__ double adv_std(double n, double ss, int unbiased) {
    const double dof = unbiased ? n - 1.0 : n;
    return dof > 0.0 ? sqrt(ss / dof) : 0.0;
}

// mode: bits 0-1 estimator-and-scope (0 GRPO no std, 1 GRPO group std, 2 GRPO batch std, 3 RLOO),
// bit 2 unbiased std, bits 3-4 singleton policy (0 error, 1 zero, 2 raw score).
extern "C" __global__ void squid_adv_groups(const float* __restrict__ rewards, const unsigned int* __restrict__ offsets,
                                            const unsigned int* __restrict__ members, const double* __restrict__ batch,
                                            float* __restrict__ out, double* __restrict__ stats, long long num_groups,
                                            int mode, float eps) {
    const int lane = threadIdx.x & 31;
    const long long g = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (g >= num_groups) return;  // whole warp
    const int kind = mode & 3, unbiased = (mode >> 2) & 1, singleton = (mode >> 3) & 3;
    const unsigned int begin = offsets[g], end = offsets[g + 1];
    double cnt = 0.0, sum = 0.0;
    float lo = INFINITY, hi = -INFINITY;
    unsigned int bad = 0xffffffffu;
    for (unsigned int k = begin + lane; k < end; k += 32) {
        const unsigned int i = members[k];
        const float r = rewards[i];
        if (adv_finite(r)) {
            cnt += 1.0;
            sum += (double)r;
            lo = fminf(lo, r);
            hi = fmaxf(hi, r);
        } else {
            bad = min(bad, i);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        bad = min(bad, __shfl_xor_sync(0xffffffffu, bad, o));
    }
    const double mean = cnt > 0.0 ? sum / cnt : 0.0;
    double ss = 0.0;
    for (unsigned int k = begin + lane; k < end; k += 32) {
        const float r = rewards[members[k]];
        if (adv_finite(r)) {
            const double d = (double)r - mean;
            ss += d * d;
        }
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const double batch_std = adv_std(batch[0], batch[2], unbiased);
    const double own_std = adv_std(cnt, ss, kind == 3 ? 1 : unbiased);
    // 0: advantage 0; 1: (r - shift) * scale; 2: the raw reward.
    int action = 1;
    double scale = 1.0;
    if (cnt == 0.0 || lo == hi) {
        action = 0;  // nothing finite, or all equal (a singleton too: handled below)
    }
    if (cnt == 1.0) {
        action = singleton == 2 ? 2 : 0;
    }
    if (kind == 1) scale = 1.0 / (own_std + (double)eps);
    if (kind == 2) scale = 1.0 / (batch_std + (double)eps);
    if (kind == 3) scale = cnt / (cnt - 1.0);
    unsigned int bad_out = 0xffffffffu;
    float bad_value = 0.0f;
    for (unsigned int k = begin + lane; k < end; k += 32) {
        const unsigned int i = members[k];
        const float r = rewards[i];
        float a = 0.0f;
        if (adv_finite(r)) {
            if (action == 1) a = (float)(((double)r - mean) * scale);
            if (action == 2) a = r;
        }
        out[i] = a;
        if (!adv_finite(a) && i < bad_out) {
            bad_out = i;
            bad_value = a;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned int b2 = __shfl_xor_sync(0xffffffffu, bad_out, o);
        const float v2 = __shfl_xor_sync(0xffffffffu, bad_value, o);
        if (b2 < bad_out) {
            bad_out = b2;
            bad_value = v2;
        }
    }
    if (lane == 0) {
        double* s = stats + 7 * g;
        s[0] = cnt;
        s[1] = mean;
        s[2] = kind == 2 ? batch_std : own_std;
        s[3] = bad == 0xffffffffu ? -1.0 : (double)bad;
        s[4] = bad == 0xffffffffu ? 0.0 : (double)rewards[bad];
        s[5] = bad_out == 0xffffffffu ? -1.0 : (double)bad_out;
        s[6] = (double)bad_value;
    }
}

extern "C" __global__ void squid_adv_broadcast(const float* __restrict__ adv, const unsigned int* __restrict__ cu_seqlens,
                                               const unsigned char* __restrict__ mask, float* __restrict__ out,
                                               float* __restrict__ bad) {
    const long long s = blockIdx.x;
    const unsigned int begin = cu_seqlens[s], end = cu_seqlens[s + 1];
    const float a = adv[s];
    if (threadIdx.x == 0) bad[s] = adv_finite(a) ? 0.0f : a;
    for (unsigned int t = begin + threadIdx.x; t < end; t += blockDim.x) {
        out[t] = mask[t] ? a : 0.0f;
    }
}

// ---- the zero-variance group filter and the REINFORCE++ estimators ---------------------------
//
// squid_adv_group_varies: one warp per group (CSR as squid_adv_groups); flags[2 g ..] = (1 when
//   the group's finite rewards are not all equal, else 0; first non-finite reward index or -1), and
//   keep[i] = that flag for each member i (the informative-sample mask).
// squid_adv_returns: one thread per sequence, backwards over its tokens: discounted returns at
//   loss tokens (f64 running sum), 0 elsewhere; a masked token adds its reward undiscounted;
//   bad[s] = the sequence's first non-finite reward index or -1.
// squid_adv_whiten_stats: one block over all tokens: stats = (count of mask tokens, their mean,
//   sum of squared deviations, 1 when all are equal to the first).
// squid_adv_whiten_apply: grid-stride; out = mask ? (x - mean) * inv : 0 (all 0 when all equal);
//   bad[2 b ..] = (first non-finite output index or -1, its value) per block.
// squid_adv_baseline_tokens: one block per sequence; keep = mask && reward finite; tokens get the
//   sequence's centred reward where kept (else 0) and keep_out the new mask.
// squid_adv_zero_seqs: one block per sequence; zero[s] != 0 sets its tokens to 0.

__device__ double adv_block_min(double v, double* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    double t = sh[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) t = fmin(t, sh[w]);
    return t;
}

extern "C" __global__ void squid_adv_group_varies(const float* __restrict__ rewards,
                                                  const unsigned int* __restrict__ offsets,
                                                  const unsigned int* __restrict__ members,
                                                  double* __restrict__ flags, unsigned char* __restrict__ keep,
                                                  long long num_groups) {
    const int lane = threadIdx.x & 31;
    const long long g = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (g >= num_groups) return;  // whole warp
    const unsigned int begin = offsets[g], end = offsets[g + 1];
    float lo = INFINITY, hi = -INFINITY;
    unsigned int bad = 0xffffffffu;
    for (unsigned int k = begin + lane; k < end; k += 32) {
        const unsigned int i = members[k];
        const float r = rewards[i];
        if (adv_finite(r)) {
            lo = fminf(lo, r);
            hi = fmaxf(hi, r);
        } else {
            bad = min(bad, i);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        bad = min(bad, __shfl_xor_sync(0xffffffffu, bad, o));
    }
    for (unsigned int k = begin + lane; k < end; k += 32) keep[members[k]] = lo < hi ? 1 : 0;
    if (lane == 0) {
        flags[2 * g] = lo < hi ? 1.0 : 0.0;
        flags[2 * g + 1] = bad == 0xffffffffu ? -1.0 : (double)bad;
    }
}

extern "C" __global__ void squid_adv_returns(const float* __restrict__ rewards,
                                             const unsigned int* __restrict__ cu_seqlens,
                                             const unsigned char* __restrict__ mask, float* __restrict__ out,
                                             double* __restrict__ bad, long long num_seqs, float gamma) {
    const long long s = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= num_seqs) return;
    const unsigned int begin = cu_seqlens[s], end = cu_seqlens[s + 1];
    double running = 0.0, first_bad = -1.0;
    for (unsigned int t = end; t > begin;) {
        --t;
        if (!adv_finite(rewards[t])) first_bad = (double)t;
        const double r = (double)rewards[t];
        if (mask[t]) {
            running = r + (double)gamma * running;
            out[t] = (float)running;
        } else {
            running += r;
            out[t] = 0.0f;
        }
    }
    bad[s] = first_bad;
}

extern "C" __global__ void squid_adv_whiten_stats(const float* __restrict__ x, const unsigned char* __restrict__ mask,
                                                  long long n, double* __restrict__ stats) {
    __shared__ double sh[ADV_BLOCK / 32];
    double cnt = 0.0, sum = 0.0, first = 1e300;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        if (mask[i]) {
            if (first == 1e300) first = (double)i;
            cnt += 1.0;
            sum += (double)x[i];
        }
    }
    cnt = adv_block_sum(cnt, sh);
    sum = adv_block_sum(sum, sh);
    first = adv_block_min(first, sh);
    const double mean = cnt > 0.0 ? sum / cnt : 0.0;
    const float x0 = cnt > 0.0 ? x[(long long)first] : 0.0f;
    double ss = 0.0, differ = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        if (mask[i]) {
            const float v = x[i];
            const double d = (double)v - mean;
            ss += d * d;
            if (v != x0) differ = 1.0;
        }
    }
    ss = adv_block_sum(ss, sh);
    differ = adv_block_sum(differ, sh);
    if (threadIdx.x == 0) {
        stats[0] = cnt;
        stats[1] = mean;
        stats[2] = ss;
        stats[3] = differ > 0.0 ? 0.0 : 1.0;
    }
}

extern "C" __global__ void squid_adv_whiten_apply(const float* __restrict__ x, const unsigned char* __restrict__ mask,
                                                  float* __restrict__ out, double* __restrict__ bad, long long n,
                                                  double mean, double inv, int all_equal) {
    __shared__ double sh[ADV_BLOCK / 32];
    double first = 1e300;
    float first_value = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = 0.0f;
        if (mask[i] && !all_equal) a = (float)(((double)x[i] - mean) * inv);
        out[i] = a;
        if (!adv_finite(a) && first == 1e300) {
            first = (double)i;
            first_value = a;
        }
    }
    const double block_first = adv_block_min(first, sh);
    if (first == block_first && block_first != 1e300) {
        bad[2 * blockIdx.x] = block_first;
        bad[2 * blockIdx.x + 1] = (double)first_value;
    } else if (threadIdx.x == 0 && block_first == 1e300) {
        bad[2 * blockIdx.x] = -1.0;
        bad[2 * blockIdx.x + 1] = 0.0;
    }
}

extern "C" __global__ void squid_adv_baseline_tokens(const float* __restrict__ rewards, const float* __restrict__ centred,
                                                     const unsigned int* __restrict__ cu_seqlens,
                                                     const unsigned char* __restrict__ mask, float* __restrict__ out,
                                                     unsigned char* __restrict__ keep_out) {
    const long long s = blockIdx.x;
    const unsigned int begin = cu_seqlens[s], end = cu_seqlens[s + 1];
    const bool finite = adv_finite(rewards[s]);
    const float a = centred[s];
    for (unsigned int t = begin + threadIdx.x; t < end; t += blockDim.x) {
        const bool keep = finite && mask[t];
        out[t] = keep ? a : 0.0f;
        keep_out[t] = keep ? 1 : 0;
    }
}

extern "C" __global__ void squid_adv_zero_seqs(float* __restrict__ out, const unsigned int* __restrict__ cu_seqlens,
                                               const unsigned int* __restrict__ zero) {
    const long long s = blockIdx.x;
    if (!zero[s]) return;  // whole block
    for (unsigned int t = cu_seqlens[s] + threadIdx.x; t < cu_seqlens[s + 1]; t += blockDim.x) out[t] = 0.0f;
}
