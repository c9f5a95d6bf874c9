// Rotary position embedding on x [tokens, heads, head_dim] in place, f32 math on f32, bf16 or
// f16 storage: the device half of squid-kvcache's `Rope`.
//
// The angles are not computed here: the launcher uploads cos/sin tables that the host computed
// in f64 and rounded once to f32 (the same values as the CPU path's tables), `[rows, half]` with
// half = rotary_dim / 2. `squid_rope_*` rotates token t by table row positions[t] (forward, or
// backward with sin_sign = -1: a rotation's transpose is the rotation by the negative angle);
// `squid_rope_shift_*` rotates every token by table row 0 (re-positioning cached keys by one
// offset). Each product and the difference are rounded separately (__fmul_rn / __fsub_rn, no
// contraction into an FMA), as the CPU path computes them, so results are bit for bit the CPU's.
//
// One thread per rotated pair (token, head, i), grid-stride; consecutive threads take
// consecutive pairs of a head, so rotate-half reads two contiguous runs and interleaved one.
// Dims past rotary_dim are not touched. Launch: 1-D, any block size.

template <typename T>
__device__ __forceinline__ void squid_rope_pair(T* __restrict__ x, long long base, int ia, int ib, float c, float s) {
    const float a = squid_to_f32(x[base + ia]);
    const float b = squid_to_f32(x[base + ib]);
    x[base + ia] = squid_from_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
    x[base + ib] = squid_from_f32<T>(__fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c)));
}

// positions == nullptr: every token uses table row 0.
template <typename T>
__device__ __forceinline__ void squid_rope_rows(T* __restrict__ x, const unsigned* __restrict__ positions,
                                                const float* __restrict__ cos_table,
                                                const float* __restrict__ sin_table, long long tokens, int heads,
                                                int head_dim, int half, int interleaved, float sin_sign) {
    const long long pairs = tokens * heads * half;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < pairs;
         idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const long long token_head = idx / half;
        const long long t = token_head / heads;
        const long long row = positions == nullptr ? 0 : (long long)positions[t];
        const float c = cos_table[row * half + i];
        const float s = sin_sign * sin_table[row * half + i];  // exact: sign is +-1
        const int ia = interleaved ? 2 * i : i;
        const int ib = interleaved ? 2 * i + 1 : i + half;
        squid_rope_pair<T>(x, token_head * head_dim, ia, ib, c, s);
    }
}

#define SQUID_ROPE_ENTRIES(SUFFIX, T)                                                                              \
    extern "C" __global__ void squid_rope_##SUFFIX(T* __restrict__ x, const unsigned* __restrict__ positions,     \
                                                   const float* __restrict__ cos_table,                            \
                                                   const float* __restrict__ sin_table, long long tokens,          \
                                                   int heads, int head_dim, int half, int interleaved,             \
                                                   float sin_sign) {                                               \
        squid_rope_rows<T>(x, positions, cos_table, sin_table, tokens, heads, head_dim, half, interleaved,         \
                           sin_sign);                                                                              \
    }                                                                                                              \
    extern "C" __global__ void squid_rope_shift_##SUFFIX(T* __restrict__ x, const float* __restrict__ cos_table,  \
                                                         const float* __restrict__ sin_table, long long tokens,    \
                                                         int heads, int head_dim, int half, int interleaved) {     \
        squid_rope_rows<T>(x, nullptr, cos_table, sin_table, tokens, heads, head_dim, half, interleaved, 1.0f);   \
    }

SQUID_ROPE_ENTRIES(f32, float)
SQUID_ROPE_ENTRIES(bf16, squid_bf16)
SQUID_ROPE_ENTRIES(f16, squid_f16)
