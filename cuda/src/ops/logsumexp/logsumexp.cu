// Per-row logsumexp of scale * x over a row-major [rows, cols] matrix, the reduction flash
// attention does over a row of scores: one warp per row, each lane walks its strided columns
// keeping an online (running max m, running sum s of exp(v - m)) pair, and the 32 pairs are
// merged with butterfly shuffles, so every lane ends with the row's (m, s). The result is
// m + log(s); a row that is entirely -inf (fully masked) gives -inf.
// Launch with blockDim.x a multiple of 32 (one row per warp), grid covering rows / warps.

__device__ __forceinline__ void squid_lse_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    // Both -inf: an empty partial sum stays empty (no exp(-inf - -inf) = NaN).
    s = mx == -INFINITY ? 0.0f : s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

template <typename T>
__device__ __forceinline__ void logsumexp_rows(const T* __restrict__ x, float* __restrict__ out, long long rows,
                                               long long cols, float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) {
        return;  // the whole warp leaves together: its shuffles below name only live lanes
    }
    const T* xr = x + row * cols;
    float m = -INFINITY;
    float s = 0.0f;
    for (long long j = lane; j < cols; j += 32) {
        const float v = scale * squid_to_f32(xr[j]);
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else if (v != -INFINITY) {
            s += expf(v - m);
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        squid_lse_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        out[row] = m == -INFINITY ? -INFINITY : m + logf(s);
    }
}

extern "C" __global__ void squid_logsumexp_f32(const float* __restrict__ x, float* __restrict__ out, long long rows,
                                               long long cols, float scale) {
    logsumexp_rows<float>(x, out, rows, cols, scale);
}

extern "C" __global__ void squid_logsumexp_bf16(const squid_bf16* __restrict__ x, float* __restrict__ out,
                                                long long rows, long long cols, float scale) {
    logsumexp_rows<squid_bf16>(x, out, rows, cols, scale);
}
