// NSA compression by mean pooling on the device: the device half of squid-attention's
// `nsa::compress_mean` and `nsa::compress_mean_backward` (launchers in nsa/cuda.rs).
//
// Forward: out[b][c] = (sum over t < l of x[first[b] + t][c]) * inv_l, one thread per output
// element (c runs over the H * D values of a row, so neighbouring threads read neighbouring
// elements of each input row), a grid-stride loop with 64-bit indices. The launcher's table
// `first` gives each compressed block's first input row (its sequence's start + i d).
// Backward: dx[r][c] = sum over the blocks that cover row r, ascending, of dx_cmp[b][c] * inv_l;
// the table gives each input row its first covering block and how many cover it (0: dx = 0).
//
// Both sum in f32 in the CPU path's order with the multiply and the add rounded separately
// (__fmul_rn / __fadd_rn: no contraction into an FMA), so they equal the CPU path bit for bit.
// Bound by memory (l reads per output element in the forward, l / d in the backward); no
// shared memory, no tensor cores (there is no product to run on them).

template <typename T>
__device__ __forceinline__ void squid_nsa_compress_fwd(const T* __restrict__ x, T* __restrict__ out,
                                                       const int* __restrict__ first, long long n, int row, int l,
                                                       float inv_l) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long b = e / row;
        const int c = (int)(e - b * row);
        const T* src = x + (long long)first[b] * row + c;
        float acc = 0.0f;
        for (int t = 0; t < l; ++t) {
            acc = __fadd_rn(acc, squid_to_f32(src[(long long)t * row]));
        }
        out[e] = squid_from_f32<T>(__fmul_rn(acc, inv_l));
    }
}

template <typename T>
__device__ __forceinline__ void squid_nsa_compress_bwd(const T* __restrict__ dx_cmp, T* __restrict__ dx,
                                                       const int* __restrict__ cover, long long n, int row,
                                                       float inv_l) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long r = e / row;
        const int c = (int)(e - r * row);
        const int b0 = cover[2 * r];
        const int count = cover[2 * r + 1];
        float acc = 0.0f;
        for (int i = 0; i < count; ++i) {
            acc = __fadd_rn(acc, __fmul_rn(squid_to_f32(dx_cmp[(long long)(b0 + i) * row + c]), inv_l));
        }
        dx[e] = squid_from_f32<T>(acc);
    }
}

extern "C" __global__ void squid_nsa_compress_mean_fwd_bf16(const squid_bf16* __restrict__ x,
                                                            squid_bf16* __restrict__ out,
                                                            const int* __restrict__ first, long long n, int row,
                                                            int l, float inv_l) {
    squid_nsa_compress_fwd<squid_bf16>(x, out, first, n, row, l, inv_l);
}

extern "C" __global__ void squid_nsa_compress_mean_fwd_f16(const squid_f16* __restrict__ x,
                                                           squid_f16* __restrict__ out,
                                                           const int* __restrict__ first, long long n, int row,
                                                           int l, float inv_l) {
    squid_nsa_compress_fwd<squid_f16>(x, out, first, n, row, l, inv_l);
}

extern "C" __global__ void squid_nsa_compress_mean_bwd_bf16(const squid_bf16* __restrict__ dx_cmp,
                                                            squid_bf16* __restrict__ dx,
                                                            const int* __restrict__ cover, long long n, int row,
                                                            float inv_l) {
    squid_nsa_compress_bwd<squid_bf16>(dx_cmp, dx, cover, n, row, inv_l);
}

extern "C" __global__ void squid_nsa_compress_mean_bwd_f16(const squid_f16* __restrict__ dx_cmp,
                                                           squid_f16* __restrict__ dx,
                                                           const int* __restrict__ cover, long long n, int row,
                                                           float inv_l) {
    squid_nsa_compress_bwd<squid_f16>(dx_cmp, dx, cover, n, row, inv_l);
}
