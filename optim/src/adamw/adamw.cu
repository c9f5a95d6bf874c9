// Multi-tensor AdamW on the device: f32 master weights behind bf16/f16 parameters (or plain f32
// parameters, their own master), global-norm clipping, and the refusal of a step that would make
// anything non-finite. The host launches, per parameter tensor:
//   squid_adamw_sumsq_*: sum of squares of the gradient in f64 per block (grid-stride), with the
//     block's first non-finite element: partials[3 b ..] = (sum, index or -1, value);
//   squid_adamw_<param>_<grad> with write = 0: the whole update computed, nothing written, the
//     block's first element that would become non-finite: partials[3 b ..] = (code, index or -1,
//     value), code 0 parameter, 1 parameter in its storage type, 2 exp_avg, 3 exp_avg_sq,
//     4 max_exp_avg_sq (the CPU path's order);
//   the same entry with write = 1 once every tensor passed: the update applied.
// squid_adamw_master_*: the f32 master copy of bf16/f16 parameters.
// k (f32[7]): beta1, beta2, eps, decay = 1 - lr wd, step_size = lr / (1 - beta1^t),
// inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t), clip. flags: bit 0 write, bit 1 has master, bit 2 amsgrad.

#define ADAMW_BLOCK 256

__device__ __forceinline__ bool aw_finite(float x) { return fabsf(x) <= 3.402823466e38f; }

// Block-wide: the smallest (index, a, b) over threads by index (index < 0: none); thread 0 gets it.
__device__ void aw_first_bad(long long& idx, float& a, float& b) {
    __shared__ long long s_idx[ADAMW_BLOCK / 32];
    __shared__ float s_a[ADAMW_BLOCK / 32], s_b[ADAMW_BLOCK / 32];
    unsigned long long key = idx < 0 ? ~0ull : (unsigned long long)idx;
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long k2 = __shfl_xor_sync(0xffffffffu, key, o);
        const float a2 = __shfl_xor_sync(0xffffffffu, a, o), b2 = __shfl_xor_sync(0xffffffffu, b, o);
        if (k2 < key) {
            key = k2;
            a = a2;
            b = b2;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_idx[warp] = (long long)key;
        s_a[warp] = a;
        s_b[warp] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
            if ((unsigned long long)s_idx[w] < key) {
                key = (unsigned long long)s_idx[w];
                a = s_a[w];
                b = s_b[w];
            }
        }
        idx = key == ~0ull ? -1 : (long long)key;
    }
}

template <typename G>
__device__ __forceinline__ void adamw_sumsq(const G* __restrict__ g, long long n, double* __restrict__ partials) {
    __shared__ double sh[ADAMW_BLOCK / 32];
    double sum = 0.0;
    long long bad = -1;
    float bad_value = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = squid_to_f32(g[i]);
        if (aw_finite(x)) {
            sum += (double)x * (double)x;
        } else if (bad < 0) {
            bad = i;  // the grid-stride order visits this thread's indices ascending
            bad_value = x;
        }
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = sum;
    float unused = 0.0f;
    aw_first_bad(bad, bad_value, unused);  // contains the barrier that publishes sh
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += sh[w];
        partials[3 * blockIdx.x] = t;
        partials[3 * blockIdx.x + 1] = (double)bad;
        partials[3 * blockIdx.x + 2] = (double)bad_value;
    }
}

template <typename T, typename G>
__device__ __forceinline__ void adamw_update(T* __restrict__ p, const G* __restrict__ g, float* __restrict__ master,
                                             float* __restrict__ m, float* __restrict__ v, float* __restrict__ vmax,
                                             const float* __restrict__ k, double* __restrict__ partials, long long n,
                                             int flags) {
    const float beta1 = k[0], beta2 = k[1], eps = k[2], decay = k[3], step_size = k[4], inv_sqrt_bc2 = k[5],
                clip = k[6];
    const bool write = flags & 1, has_master = flags & 2, amsgrad = flags & 4;
    long long bad = -1;
    float bad_code = 0.0f, bad_value = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gi = squid_to_f32(g[i]) * clip;
        const float w0 = has_master ? master[i] : squid_to_f32(p[i]);
        const float pd = w0 * decay;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        const float vm = amsgrad ? fmaxf(vmax[i], vi) : vi;
        const float w = pd - step_size * mi / (sqrtf(vm) * inv_sqrt_bc2 + eps);
        const T stored = squid_from_f32<T>(w);
        if (write) {
            p[i] = stored;
            if (has_master) master[i] = w;
            m[i] = mi;
            v[i] = vi;
            if (amsgrad) vmax[i] = vm;
        } else if (bad < 0) {
            const float vals[5] = {w, squid_to_f32(stored), mi, vi, amsgrad ? vm : 0.0f};
            for (int c = 0; c < 5; ++c) {
                if (!aw_finite(vals[c])) {
                    bad = i;
                    bad_code = (float)c;
                    bad_value = vals[c];
                    break;
                }
            }
        }
    }
    if (write) return;  // uniform across the block
    aw_first_bad(bad, bad_code, bad_value);
    if (threadIdx.x == 0) {
        partials[3 * blockIdx.x] = (double)bad_code;
        partials[3 * blockIdx.x + 1] = (double)bad;
        partials[3 * blockIdx.x + 2] = (double)bad_value;
    }
}

template <typename T>
__device__ __forceinline__ void adamw_master(const T* __restrict__ p, float* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        out[i] = squid_to_f32(p[i]);
    }
}

#define ADAMW_SUMSQ(NAME, G)                                                                                    \
    extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK)                                                   \
        NAME(const G* __restrict__ g, long long n, double* __restrict__ partials) {                             \
        adamw_sumsq<G>(g, n, partials);                                                                          \
    }
#define ADAMW_UPDATE(NAME, T, G)                                                                                 \
    extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK)                                                    \
        NAME(T* __restrict__ p, const G* __restrict__ g, float* __restrict__ master, float* __restrict__ m,     \
             float* __restrict__ v, float* __restrict__ vmax, const float* __restrict__ k,                       \
             double* __restrict__ partials, long long n, int flags) {                                            \
        adamw_update<T, G>(p, g, master, m, v, vmax, k, partials, n, flags);                                     \
    }
#define ADAMW_MASTER(NAME, T)                                                                                    \
    extern "C" __global__ void NAME(const T* __restrict__ p, float* __restrict__ out, long long n) {            \
        adamw_master<T>(p, out, n);                                                                              \
    }

ADAMW_SUMSQ(squid_adamw_sumsq_f32, float)
ADAMW_SUMSQ(squid_adamw_sumsq_bf16, squid_bf16)
ADAMW_SUMSQ(squid_adamw_sumsq_f16, squid_f16)
ADAMW_UPDATE(squid_adamw_f32_f32, float, float)
ADAMW_UPDATE(squid_adamw_bf16_bf16, squid_bf16, squid_bf16)
ADAMW_UPDATE(squid_adamw_bf16_f32, squid_bf16, float)
ADAMW_UPDATE(squid_adamw_f16_f16, squid_f16, squid_f16)
ADAMW_UPDATE(squid_adamw_f16_f32, squid_f16, float)
ADAMW_MASTER(squid_adamw_master_bf16, squid_bf16)
ADAMW_MASTER(squid_adamw_master_f16, squid_f16)
