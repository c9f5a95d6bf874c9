// Fused log-softmax + gather + entropy over logits [rows, vocab] (f32, bf16 or f16 storage, f32
// arithmetic), forward and backward, without a [rows, vocab] probability matrix.
//
// Forward (squid_logprob_fwd_*): one block per row. Each thread walks the vocabulary in steps
// of the block size keeping an online triple (max m, S = sum e^(x-m), W = sum e^(x-m) (x-m));
// the triples are merged with warp shuffles, then across warps in shared memory. The row gets
// lse = m + ln S, entropy H = ln S - W / S and logp = x[y] - lse. status[2 row ..] reports a
// target outside the vocabulary (code 1, the id) or a non-finite log-sum-exp or entropy
// (code 2, the lse: NaN when H is not finite), else code 0; the host turns codes into errors.
//
// Backward (squid_logprob_bwd_*): grid (rows, vocab chunks of LOGPROB_CHUNK); each element
// recomputes p = e^(x - lse) and writes d = g ([v = y] - p) - h p (log p + H), log p clamped at
// -87 (a -inf logit gives 0, not inf * 0). The chunk-0 block of each row checks that row's
// target and inputs (codes 1 target, 2 lse, 3 entropy, 4 grad_logp, 5 grad_entropy: the
// smallest that applies) and the row writes nothing when one fails.

#define LOGPROB_BLOCK 256
#define LOGPROB_CHUNK 2048

__device__ __forceinline__ bool lp_finite(float x) { return fabsf(x) <= 3.402823466e38f; }

// Folds (m2, s2, w2) into (m, s, w); an empty triple has s = 0.
__device__ __forceinline__ void lp_merge(float& m, float& s, float& w, float m2, float s2, float w2) {
    if (s2 == 0.0f) return;
    if (s == 0.0f) {
        m = m2;
        s = s2;
        w = w2;
        return;
    }
    const float mx = fmaxf(m, m2);
    const float a = expf(m - mx), b = expf(m2 - mx);
    w = a * (w + s * (m - mx)) + b * (w2 + s2 * (m2 - mx));
    s = a * s + b * s2;
    m = mx;
}

template <typename T>
__device__ __forceinline__ void logprob_fwd(const T* __restrict__ logits, const unsigned int* __restrict__ targets,
                                            float* __restrict__ logp, float* __restrict__ entropy,
                                            float* __restrict__ lse, unsigned int* __restrict__ status, long long vocab) {
    __shared__ float sh[3][LOGPROB_BLOCK / 32];
    const long long row = blockIdx.x;
    const T* x = logits + row * vocab;
    float m = -INFINITY, s = 0.0f, w = 0.0f;
    for (long long j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = squid_to_f32(x[j]);
        if (v == -INFINITY) continue;  // e^-inf = 0: no term (and no -inf - -inf)
        if (v > m) {
            if (s > 0.0f) {
                const float a = expf(m - v);
                w = a * (w + s * (m - v));
                s *= a;
            }
            s += 1.0f;  // the new max's own term: e^0 = 1, (x - m) = 0
            m = v;
        } else {
            const float d = v - m;  // NaN stays NaN and poisons the row
            const float e = expf(d);
            s += e;
            w += e * d;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        const float w2 = __shfl_xor_sync(0xffffffffu, w, o);
        lp_merge(m, s, w, m2, s2, w2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sh[0][warp] = m;
        sh[1][warp] = s;
        sh[2][warp] = w;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < (int)(blockDim.x >> 5); ++k) lp_merge(m, s, w, sh[0][k], sh[1][k], sh[2][k]);
        const float ln_s = logf(s);
        const float h = ln_s - w / s;
        const float l = lp_finite(h) ? m + ln_s : __int_as_float(0x7fc00000);
        const unsigned int y = targets[row];
        unsigned int code = 0, payload = 0;
        float lp = __int_as_float(0x7fc00000);
        if (y >= vocab) {
            code = 1;
            payload = y;
        } else {
            lp = squid_to_f32(x[y]) - l;
            if (!lp_finite(l)) {
                code = 2;
                payload = __float_as_uint(l);
            }
        }
        lse[row] = l;
        entropy[row] = h;
        logp[row] = lp;
        status[2 * row] = code;
        status[2 * row + 1] = payload;
    }
}

template <typename T, typename G>
__device__ __forceinline__ void logprob_bwd(const T* __restrict__ logits, const unsigned int* __restrict__ targets,
                                            const float* __restrict__ lse, const float* __restrict__ entropy,
                                            const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                                            G* __restrict__ grad_logits, unsigned int* __restrict__ status,
                                            long long vocab, int has_grad_entropy) {
    const long long row = blockIdx.x;
    const unsigned int y = targets[row];
    const float l = lse[row], ent = entropy[row], g = grad_logp[row];
    const float h = has_grad_entropy ? grad_entropy[row] : 0.0f;
    unsigned int code = 0, payload = 0;
    if (y >= vocab) {
        code = 1;
        payload = y;
    } else if (!lp_finite(l)) {
        code = 2;
        payload = __float_as_uint(l);
    } else if (!lp_finite(ent)) {
        code = 3;
        payload = __float_as_uint(ent);
    } else if (!lp_finite(g)) {
        code = 4;
        payload = __float_as_uint(g);
    } else if (!lp_finite(h)) {
        code = 5;
        payload = __float_as_uint(h);
    }
    if (blockIdx.y == 0 && threadIdx.x == 0) {
        status[2 * row] = code;
        status[2 * row + 1] = payload;
    }
    if (code != 0) return;  // the whole block: the row's inputs are bad
    const T* x = logits + row * vocab;
    G* dx = grad_logits + row * vocab;
    const float c = g + h * ent;
    const long long begin = (long long)blockIdx.y * LOGPROB_CHUNK;
    const long long end = min(begin + LOGPROB_CHUNK, vocab);
    for (long long j = begin + threadIdx.x; j < end; j += blockDim.x) {
        const float lp = fminf(fmaxf(squid_to_f32(x[j]) - l, -87.0f), 0.0f);
        const float p = expf(lp);
        float d = -p * (c + h * lp);
        if (j == (long long)y) d += g;
        dx[j] = squid_from_f32<G>(d);
    }
}

#define LOGPROB_FWD(NAME, T)                                                                                    \
    extern "C" __global__ void __launch_bounds__(LOGPROB_BLOCK) NAME(                                           \
        const T* __restrict__ logits, const unsigned int* __restrict__ targets, float* __restrict__ logp,      \
        float* __restrict__ entropy, float* __restrict__ lse, unsigned int* __restrict__ status, long long vocab) { \
        logprob_fwd<T>(logits, targets, logp, entropy, lse, status, vocab);                                      \
    }

#define LOGPROB_BWD(NAME, T, G)                                                                                  \
    extern "C" __global__ void __launch_bounds__(LOGPROB_BLOCK) NAME(                                            \
        const T* __restrict__ logits, const unsigned int* __restrict__ targets, const float* __restrict__ lse,   \
        const float* __restrict__ entropy, const float* __restrict__ grad_logp,                                 \
        const float* __restrict__ grad_entropy, G* __restrict__ grad_logits, unsigned int* __restrict__ status, \
        long long vocab, int has_grad_entropy) {                                                                 \
        logprob_bwd<T, G>(logits, targets, lse, entropy, grad_logp, grad_entropy, grad_logits, status, vocab,    \
                          has_grad_entropy);                                                                     \
    }

LOGPROB_FWD(squid_logprob_fwd_f32, float)
LOGPROB_FWD(squid_logprob_fwd_bf16, squid_bf16)
LOGPROB_FWD(squid_logprob_fwd_f16, squid_f16)
LOGPROB_BWD(squid_logprob_bwd_f32_f32, float, float)
LOGPROB_BWD(squid_logprob_bwd_bf16_bf16, squid_bf16, squid_bf16)
LOGPROB_BWD(squid_logprob_bwd_bf16_f32, squid_bf16, float)
LOGPROB_BWD(squid_logprob_bwd_f16_f16, squid_f16, squid_f16)
LOGPROB_BWD(squid_logprob_bwd_f16_f32, squid_f16, float)
