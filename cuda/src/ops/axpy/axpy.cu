// y <- a * x + y, element-wise, with f32 arithmetic for every storage type.
// A grid-stride loop with 64-bit indices: any n, any grid size.

template <typename T>
__device__ __forceinline__ void axpy(long long n, float a, const T* __restrict__ x, T* __restrict__ y) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = squid_from_f32<T>(fmaf(a, squid_to_f32(x[i]), squid_to_f32(y[i])));
    }
}

extern "C" __global__ void squid_axpy_f32(long long n, float a, const float* __restrict__ x, float* __restrict__ y) {
    axpy<float>(n, a, x, y);
}

extern "C" __global__ void squid_axpy_bf16(long long n, float a, const squid_bf16* __restrict__ x, squid_bf16* __restrict__ y) {
    axpy<squid_bf16>(n, a, x, y);
}
