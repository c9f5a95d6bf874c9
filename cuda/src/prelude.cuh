// squid prelude: prepended by squid-cuda to every kernel source before NVRTC sees it.
// It carries the few half-precision pieces our kernels use, so no kernel needs the CUDA
// headers (cuda_fp16.h / cuda_bf16.h) and NVRTC needs no include path.
// Storage types are plain 16-bit structs with the IEEE / bfloat16 bit layout of the `half`
// crate; arithmetic is always done in f32.

struct squid_bf16 { unsigned short bits; };
struct squid_f16 { unsigned short bits; };

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float squid_to_f32(float x) { return x; }

__device__ __forceinline__ float squid_to_f32(squid_bf16 x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}

__device__ __forceinline__ float squid_to_f32(squid_f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T squid_from_f32(float x);

template <> __device__ __forceinline__ float squid_from_f32<float>(float x) { return x; }

// Round to nearest even, NaN kept quiet.
template <> __device__ __forceinline__ squid_bf16 squid_from_f32<squid_bf16>(float x) {
    squid_bf16 r;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (unsigned short)(u >> 16);
    }
#endif
    return r;
}

template <> __device__ __forceinline__ squid_f16 squid_from_f32<squid_f16>(float x) {
    squid_f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
