// Row-wise softmax over a row-major [rows, cols] matrix: one block per row.
// One pass keeps a running (max, sum of exp) per thread (online softmax), the block merges
// the pairs with warp shuffles and one shared-memory step, and a second pass writes
// exp(x - max) / sum. A row that is entirely -inf (fully masked) is written as zeros.
// Launch with blockDim.x a multiple of 32, at most 1024.

__device__ __forceinline__ void squid_merge_max_sum(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) {
        s = 0.0f;
    } else {
        s = s * expf(m - mx) + s2 * expf(m2 - mx);
    }
    m = mx;
}

__device__ __forceinline__ void squid_warp_merge(float& m, float& s) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        squid_merge_max_sum(m, s, m2, s2);
    }
}

template <typename T>
__device__ __forceinline__ void softmax_rows(const T* __restrict__ x, T* __restrict__ y, long long cols) {
    __shared__ float warp_max[32];
    __shared__ float warp_sum[32];
    const T* xr = x + (long long)blockIdx.x * cols;
    T* yr = y + (long long)blockIdx.x * cols;

    float m = -INFINITY;
    float s = 0.0f;
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = squid_to_f32(xr[j]);
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else if (v != -INFINITY) {
            s += expf(v - m);
        }
    }
    squid_warp_merge(m, s);

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int num_warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < num_warps ? warp_max[lane] : -INFINITY;
        s = lane < num_warps ? warp_sum[lane] : 0.0f;
        squid_warp_merge(m, s);
        if (lane == 0) {
            warp_max[0] = m;
            warp_sum[0] = s;
        }
    }
    __syncthreads();
    const float row_max = warp_max[0];
    const float row_sum = warp_sum[0];
    const float inv = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;

    for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = squid_to_f32(xr[j]);
        const float p = row_max == -INFINITY ? 0.0f : expf(v - row_max) * inv;
        yr[j] = squid_from_f32<T>(p);
    }
}

extern "C" __global__ void squid_softmax_f32(const float* __restrict__ x, float* __restrict__ y, long long cols) {
    softmax_rows<float>(x, y, cols);
}

extern "C" __global__ void squid_softmax_bf16(const squid_bf16* __restrict__ x, squid_bf16* __restrict__ y, long long cols) {
    softmax_rows<squid_bf16>(x, y, cols);
}
