// NSA's selected-block branch on the tensor cores, and the gated combine of the three branches.
//
// Layout as nsa/mod.rs: q [total, HQ, DK], k [total, HKV, DK], v [total, HKV, DV],
// o [total, HQ, DV], lse [HQ, total] (natural log, f32); bf16 or f16 storage, every product on
// mma.sync.m16n8k16 with f32 accumulation.
//
// Organised per GQA group: a CTA owns 64 query rows of one kv head g, and those rows are
// (token, head) pairs: hc = min(group, 64) heads of each of 64 / hc consecutive tokens (so a
// group of 1 fills the tile with 64 tokens, a group of 4 with 16 tokens x 4 heads, a group of
// 16 with 4 tokens x 16 heads; a group of 3 uses 63 rows of 21 tokens: no head is padded to
// 16). Groups above 64 split their heads over `chunks` CTAs per token. The host buckets the
// CTA's tokens by chosen block (nsa/cuda_selected.rs): the CTA walks the union of the blocks its
// tokens chose, in key tiles of BN keys that never straddle a block, and each tile carries the
// set of the CTA's tokens that chose its block. So every chosen K/V tile is loaded once for all
// the query heads of the group and all the CTA's tokens that chose it; a row whose token did not
// choose the tile's block masks it (and causal masking inside the current block).
//
// Schedule (one int buffer): a header
//   total hq hkv hc chunks tiles_at - -
// then the items, eight ints each:
//   q_base ntok t0 g chunk tile_lo tile_hi -
// (sequence's first packed row; the CTA's tokens t0..t0+ntok in sequence coordinates; kv head;
// head chunk; its tiles), then at tiles_at the tiles, four ints each:
//   n0 keys mask_lo mask_hi
// (keys n0..n0+keys of the sequence, all inside one selection block; bit i of the 64-bit mask
// set when token t0 + i chose that block and sees some key of the tile).
//
// Shared tiles are swizzled as in dense/flash.cu (16-byte chunk c of row r at c ^ (r & 7)).

#define NS_WARPS 4
#define NS_THREADS (NS_WARPS * 32)
#define NS_BM (16 * NS_WARPS)
#define NS_HEADER 8
#define NS_ITEM 8
#define NS_TILE 4
#define NS_LN2 0.6931471805599453f

__device__ __forceinline__ unsigned ns_smem(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void ns_cp_async_16(unsigned dst, const void* src, unsigned src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void ns_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void ns_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ns_ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ns_ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b for one 16 x 8 x 16 tile (a row-major 16 x 16, b column-major 16 x 8).
template <bool F16>
__device__ __forceinline__ void ns_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if (F16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two f32 rounded to the storage type, `lo` in the low half.
template <bool F16>
__device__ __forceinline__ unsigned ns_pack(float lo, float hi) {
    unsigned r;
    if (F16) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

__device__ __forceinline__ float ns_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float ns_log2(float x) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

template <int C>
__device__ __forceinline__ int ns_swz(int row, int chunk) {
    if (C % 8 == 0) return chunk ^ (row & 7);
    if (C % 4 == 0) return (chunk & ~3) | ((chunk ^ (row >> 1)) & 3);
    return chunk;
}

template <int D>
__device__ __forceinline__ unsigned ns_at(unsigned base, int row, int col) {
    return base + (unsigned)(row * D + ns_swz<D / 8>(row, col >> 3) * 8) * 2u;
}

// Copies rows 0..valid of a [ROWS, D] tile (row r at src + r * stride) into shared memory,
// zero-filling rows valid..ROWS. `fallback` is any valid address of the tensor.
template <int ROWS, int D, int THREADS = NS_THREADS>
__device__ __forceinline__ void ns_load_tile(unsigned base, const unsigned short* src, long long stride, int valid,
                                             const unsigned short* fallback) {
    constexpr int C = D / 8;
    constexpr int N = ROWS * C;
#pragma unroll
    for (int i = 0; i < (N + THREADS - 1) / THREADS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        if (N % THREADS == 0 || c < N) {
            const int r = c / C, ch = c % C;
            const bool ok = r < valid;
            const unsigned short* p = ok ? src + r * stride + ch * 8 : fallback;
            ns_cp_async_16(base + (unsigned)(r * D + ns_swz<C>(r, ch) * 8) * 2u, p, ok ? 16u : 0u);
        }
    }
}

// The CTA's 64 (token, head) rows of a [total, HQ, D] tensor into a swizzled [64, D] tile, rows
// past the CTA's tokens or the group's heads zero-filled.
template <int D>
__device__ __forceinline__ void ns_load_rows(unsigned base, const unsigned short* x, long long q_row0, int ntok,
                                             int hc, int head0, int heads_left, int hq) {
    constexpr int C = D / 8;
    constexpr int N = NS_BM * C;
#pragma unroll
    for (int i = 0; i < N / NS_THREADS; ++i) {
        const int c = threadIdx.x + i * NS_THREADS;
        const int r = c / C, ch = c % C;
        const int tok = r / hc, hh = r % hc;
        const bool ok = tok < ntok && hh < heads_left;
        const unsigned short* p = ok ? x + ((q_row0 + tok) * hq + head0 + hh) * D + ch * 8 : x;
        ns_cp_async_16(base + (unsigned)(r * D + ns_swz<C>(r, ch) * 8) * 2u, p, ok ? 16u : 0u);
    }
}

// Q K^T for a warp's 16 rows against BN keys of a swizzled K tile.
template <int DK, int BN, bool F16>
__device__ __forceinline__ void ns_scores(float (&s)[BN / 8][4], const unsigned (&qf)[DK / 16][4], unsigned k_tile,
                                          int lane) {
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk)
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
            unsigned b[4];
            ns_ldsm_x4(b, ns_at<DK>(k_tile, np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
            ns_mma<F16>(s[2 * np], qf[kk], b[0], b[1]);
            ns_mma<F16>(s[2 * np + 1], qf[kk], b[2], b[3]);
        }
}

// acc += P V for a warp's 16 rows (P from score fragments, V a swizzled [BN, DV] tile).
// With W < DV: only columns col0..col0 + W of the [BN, DV] tile (acc holds W / 8 tiles).
template <int DV, int BN, bool F16, int W = DV>
__device__ __forceinline__ void ns_pv(float (&acc)[W / 8][4], const float (&p)[BN / 8][4], unsigned v_tile,
                                      int lane, int col0 = 0) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        const unsigned a[4] = {ns_pack<F16>(p[2 * kk][0], p[2 * kk][1]), ns_pack<F16>(p[2 * kk][2], p[2 * kk][3]),
                               ns_pack<F16>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               ns_pack<F16>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < W / 16; ++dp) {
            unsigned b[4];
            ns_ldsm_x4_t(b, ns_at<DV>(v_tile, kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                      col0 + dp * 16 + (lane >> 4) * 8));
            ns_mma<F16>(acc[2 * dp], a, b[0], b[1]);
            ns_mma<F16>(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// ---- selected-branch forward -------------------------------------------------------------------
//
// One CTA of four warps per item; warp w owns rows 16w..16w+16. Q goes through shared memory
// once into registers; the item's K/V tiles stream through two cp.async stages; online softmax
// on scores pre-scaled by scale * log2(e), as the dense forward.
template <int DK, int DV, int BN, bool F16>
__device__ __forceinline__ void ns_slc_fwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                           const unsigned short* __restrict__ v, unsigned short* __restrict__ o,
                                           float* __restrict__ lse, const int* __restrict__ sched, float scale_log2) {
    constexpr int STAGE = BN * (DK + DV);
    constexpr int ELEMS = (NS_BM * DK > 2 * STAGE) ? NS_BM * DK : 2 * STAGE;
    __shared__ __align__(128) unsigned short smem[ELEMS];
    const unsigned base = ns_smem(smem);

    const int total = sched[0], hq = sched[1], hkv = sched[2], hc = sched[3];
    const int* tiles = sched + sched[5];
    const int* it = sched + NS_HEADER + (long long)blockIdx.x * NS_ITEM;
    const int q_base = it[0], ntok = it[1], t0 = it[2], g = it[3], chunk = it[4], tile_lo = it[5],
              tile_hi = it[6];
    const int group = hq / hkv, head0 = g * group + chunk * hc, heads_left = group - chunk * hc;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long k_stride = (long long)hkv * DK, v_stride = (long long)hkv * DV;

    ns_load_rows<DK>(base, q, (long long)q_base + t0, ntok, hc, head0, heads_left, hq);
    ns_commit();
    ns_wait<0>();
    __syncthreads();
    unsigned qf[DK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) ns_ldsm_x4(qf[kk], ns_at<DK>(base, warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    __syncthreads();

    // This thread's two rows: their token (index in the CTA) and position; -1 past the rows.
    int tok[2], pos[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int local = warp * 16 + (lane >> 2) + e * 8;
        const bool valid = local / hc < ntok && local % hc < heads_left;
        tok[e] = valid ? local / hc : -1;
        pos[e] = t0 + local / hc;
    }

    const unsigned short* kg = k + ((long long)q_base * hkv + g) * DK;
    const unsigned short* vg = v + ((long long)q_base * hkv + g) * DV;
    auto load_kv = [&](int j) {
        const int* tl = tiles + (long long)(tile_lo + j) * NS_TILE;
        const int n0 = tl[0], keys = tl[1];
        const unsigned st = base + (unsigned)((j & 1) * STAGE) * 2u;
        ns_load_tile<BN, DK>(st, kg + n0 * k_stride, k_stride, keys, k);
        ns_load_tile<BN, DV>(st + BN * DK * 2, vg + n0 * v_stride, v_stride, keys, v);
    };

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float acc[DV / 8][4];
#pragma unroll
    for (int dt = 0; dt < DV / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dt][e] = 0.0f;

    const int count = tile_hi - tile_lo;
    if (count > 0) {
        load_kv(0);
        ns_commit();
    }
    for (int j = 0; j < count; ++j) {
        if (j + 1 < count) {
            load_kv(j + 1);
            ns_commit();
            ns_wait<1>();
        } else {
            ns_wait<0>();
        }
        __syncthreads();
        const unsigned k_tile = base + (unsigned)((j & 1) * STAGE) * 2u;
        const unsigned v_tile = k_tile + BN * DK * 2;
        const int* tl = tiles + (long long)(tile_lo + j) * NS_TILE;
        const int n0 = tl[0], n1 = tl[0] + tl[1];
        const unsigned mask_lo = (unsigned)tl[2], mask_hi = (unsigned)tl[3];
        bool chose[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int t = tok[e];
            chose[e] = t >= 0 && (((t < 32 ? mask_lo : mask_hi) >> (t & 31)) & 1u);
        }

        float s[BN / 8][4];
        ns_scores<DK, BN, F16>(s, qf, k_tile, lane);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = n0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                const bool seen = chose[e >> 1] && key < n1 && key <= pos[e >> 1];
                s[nt][e] = seen ? s[nt][e] * scale_log2 : -INFINITY;
            }

#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float mx = m[e];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * e], s[nt][2 * e + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float ref = mx == -INFINITY ? 0.0f : mx;
            const float alpha = ns_exp2(m[e] - ref);
            m[e] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                s[nt][2 * e] = ns_exp2(s[nt][2 * e] - ref);
                s[nt][2 * e + 1] = ns_exp2(s[nt][2 * e + 1] - ref);
                sum += s[nt][2 * e] + s[nt][2 * e + 1];
            }
            l[e] = l[e] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < DV / 8; ++dt) {
                acc[dt][2 * e] *= alpha;
                acc[dt][2 * e + 1] *= alpha;
            }
        }
        ns_pv<DV, BN, F16>(acc, s, v_tile, lane);
        __syncthreads();
    }

#pragma unroll
    for (int e = 0; e < 2; ++e) {
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 1);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 2);
        if (tok[e] < 0) continue;
        const int local = warp * 16 + (lane >> 2) + e * 8;
        const long long row = (long long)q_base + t0 + tok[e];
        const int h = head0 + local % hc;
        const float inv = l[e] > 0.0f ? 1.0f / l[e] : 0.0f;
        unsigned* out = reinterpret_cast<unsigned*>(o + (row * hq + h) * DV + (lane & 3) * 2);
#pragma unroll
        for (int dt = 0; dt < DV / 8; ++dt) out[dt * 4] = ns_pack<F16>(acc[dt][2 * e] * inv, acc[dt][2 * e + 1] * inv);
        if ((lane & 3) == 0) lse[(long long)h * total + row] = l[e] > 0.0f ? (m[e] + ns_log2(l[e])) * NS_LN2 : -INFINITY;
    }
}

#define NS_FWD_ENTRY(DK, DV, BN, SFX, F16)                                                                          \
    extern "C" __global__ void __launch_bounds__(NS_THREADS) squid_nsa_slc_fwd_dk##DK##_dv##DV##_##SFX(             \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* o, float* lse,    \
        const int* sched, float scale_log2) {                                                                        \
        ns_slc_fwd<DK, DV, BN, F16>(q, k, v, o, lse, sched, scale_log2);                                             \
    }

// Key tiles as the dense forward's (two K/V stages within 48 KiB of static shared memory).
NS_FWD_ENTRY(64, 64, 64, bf16, false)
NS_FWD_ENTRY(64, 64, 64, f16, true)
NS_FWD_ENTRY(96, 96, 32, bf16, false)
NS_FWD_ENTRY(96, 96, 32, f16, true)
NS_FWD_ENTRY(128, 128, 32, bf16, false)
NS_FWD_ENTRY(128, 128, 32, f16, true)
NS_FWD_ENTRY(192, 128, 32, bf16, false)
NS_FWD_ENTRY(192, 128, 32, f16, true)
NS_FWD_ENTRY(256, 256, 16, bf16, false)
NS_FWD_ENTRY(256, 256, 16, f16, true)

// ---- gated combine -----------------------------------------------------------------------------
//
// o = g_cmp o_cmp + g_slc o_slc + g_win o_win per element, gates [total, HQ, 3]; f32 arithmetic,
// one rounding at the store. Grid-stride over rows * dv elements.
template <typename T>
__device__ __forceinline__ void ns_combine(const T* __restrict__ o_cmp, const T* __restrict__ o_slc,
                                           const T* __restrict__ o_win, const T* __restrict__ gates,
                                           T* __restrict__ o, long long n, int dv) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / dv;
        const float r = squid_to_f32(gates[row * 3]) * squid_to_f32(o_cmp[i]) +
                        squid_to_f32(gates[row * 3 + 1]) * squid_to_f32(o_slc[i]) +
                        squid_to_f32(gates[row * 3 + 2]) * squid_to_f32(o_win[i]);
        o[i] = squid_from_f32<T>(r);
    }
}

extern "C" __global__ void squid_nsa_combine_bf16(const squid_bf16* o_cmp, const squid_bf16* o_slc,
                                                  const squid_bf16* o_win, const squid_bf16* gates, squid_bf16* o,
                                                  long long n, int dv) {
    ns_combine(o_cmp, o_slc, o_win, gates, o, n, dv);
}

extern "C" __global__ void squid_nsa_combine_f16(const squid_f16* o_cmp, const squid_f16* o_slc,
                                                 const squid_f16* o_win, const squid_f16* gates, squid_f16* o,
                                                 long long n, int dv) {
    ns_combine(o_cmp, o_slc, o_win, gates, o, n, dv);
}

// ---- backward ----------------------------------------------------------------------------------
//
// With the chosen blocks held fixed, the branch is attention over a per-row key set, so its
// backward is FlashAttention-2's with the selected branch's masks:
// - gate backward: per (token, head) dgates = (o_cmp.dO, o_slc.dO, o_win.dO), each branch's
//   output gradient g_b dO (stored), and delta_slc = rowsum(dO_slc * o_slc);
// - dQ: one CTA per forward item (the forward's rows and tiles), P and dS recomputed from lse,
//   dQ += dS K in registers, stored in f32 (the window branch's dQ is added afterwards);
// - dK/dV: one CTA per (key tile of one chosen block, kv head): the host lists the tokens that
//   chose the block and see a key of the tile, and the CTA walks their rows (tokens x the
//   group's heads, 16 at a time, gathered through two cp.async stages) with the K and V tile
//   loaded once: dV += P^T dO, dK += dS^T Q in registers, no atomics (a key tile belongs to one
//   block, one item). Stored in f32.
//
// Key schedule: header total hq hkv - - lists_at - -; items, eight ints each:
//   q_base n0 keys g list_lo list_hi - -
// and at lists_at the token lists (sequence positions, ascending).

__device__ __forceinline__ void ns_ldsm_x2_t(unsigned (&r)[2], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

template <bool F16>
__device__ __forceinline__ float ns_f32(unsigned short bits) {
    if (F16) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
        return f;
    }
    return __uint_as_float(((unsigned)bits) << 16);
}

template <bool F16>
__device__ __forceinline__ float ns_load_f32(const unsigned short* p) {
    return ns_f32<F16>(*p);
}

template <bool F16>
__device__ __forceinline__ unsigned short ns_store(float x) {
    return F16 ? squid_from_f32<squid_f16>(x).bits : squid_from_f32<squid_bf16>(x).bits;
}

// s = A[a_row0 .. a_row0 + 16, 0..D] * B[0..N, 0..D]^T, both swizzled [*, D] shared tiles.
template <int D, int N, bool F16>
__device__ __forceinline__ void ns_abt_smem(float (&s)[N / 8][4], unsigned a_tile, int a_row0, unsigned b_tile,
                                            int lane) {
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[4];
        ns_ldsm_x4(a, ns_at<D>(a_tile, a_row0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            unsigned b[4];
            ns_ldsm_x4(b, ns_at<D>(b_tile, np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
            ns_mma<F16>(s[2 * np], a, b[0], b[1]);
            ns_mma<F16>(s[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// One warp per (token, head): dgates, the three branch output gradients, delta of the selected
// branch. dims = (total, hq, dv).
template <bool F16>
__device__ __forceinline__ void ns_gate_bwd(const unsigned short* __restrict__ o_cmp,
                                            const unsigned short* __restrict__ o_slc,
                                            const unsigned short* __restrict__ o_win,
                                            const unsigned short* __restrict__ gates,
                                            const unsigned short* __restrict__ d_o, unsigned short* __restrict__ dgates,
                                            unsigned short* __restrict__ d_o_cmp, unsigned short* __restrict__ d_o_slc,
                                            unsigned short* __restrict__ d_o_win, float* __restrict__ delta_slc,
                                            const int* __restrict__ dims) {
    const int total = dims[0], hq = dims[1], dv = dims[2];
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); w < (long long)total * hq;
         w += warps) {
        const float g0 = ns_load_f32<F16>(gates + w * 3), g1 = ns_load_f32<F16>(gates + w * 3 + 1),
                    g2 = ns_load_f32<F16>(gates + w * 3 + 2);
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, dl = 0.0f;
        for (int d = lane; d < dv; d += 32) {
            const long long i = w * dv + d;
            const float g = ns_load_f32<F16>(d_o + i), os = ns_load_f32<F16>(o_slc + i);
            s0 += ns_load_f32<F16>(o_cmp + i) * g;
            s1 += os * g;
            s2 += ns_load_f32<F16>(o_win + i) * g;
            const unsigned short gs = ns_store<F16>(g1 * g);
            d_o_cmp[i] = ns_store<F16>(g0 * g);
            d_o_slc[i] = gs;
            d_o_win[i] = ns_store<F16>(g2 * g);
            dl += ns_f32<F16>(gs) * os;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            s0 += __shfl_xor_sync(0xffffffffu, s0, off);
            s1 += __shfl_xor_sync(0xffffffffu, s1, off);
            s2 += __shfl_xor_sync(0xffffffffu, s2, off);
            dl += __shfl_xor_sync(0xffffffffu, dl, off);
        }
        if (lane == 0) {
            dgates[w * 3] = ns_store<F16>(s0);
            dgates[w * 3 + 1] = ns_store<F16>(s1);
            dgates[w * 3 + 2] = ns_store<F16>(s2);
            delta_slc[(w % hq) * total + w / hq] = dl;
        }
    }
}

// dQ of the selected branch over the forward's schedule (f32 out, scale applied). Q is held in
// registers; dO too up to Dk = 128, while for Dk = 192 it stays in shared memory (read by
// ldmatrix for each key tile) and the dQ columns are split over two CTAs (grid z: columns
// z * DK / 2 ..), each recomputing P and dS, so the Q fragments and the accumulators fit the
// registers.
template <int DK, int DV, int BN, bool F16>
__device__ __forceinline__ void ns_slc_bwd_dq(const unsigned short* __restrict__ q,
                                              const unsigned short* __restrict__ k,
                                              const unsigned short* __restrict__ v,
                                              const unsigned short* __restrict__ d_o, const float* __restrict__ lse,
                                              const float* __restrict__ delta, float* __restrict__ dq,
                                              const int* __restrict__ sched, float scale_log2, float scale) {
    constexpr bool DO_SMEM = DK > 128;
    constexpr int STAGE = BN * (DK + DV);
    // Registers: Q (and dO) staged at the start, then the K/V stages; DO_SMEM: dO after them.
    constexpr int REUSED = DO_SMEM ? ((NS_BM * DK > 2 * STAGE) ? NS_BM * DK : 2 * STAGE)
                                   : ((NS_BM * (DK + DV) > 2 * STAGE) ? NS_BM * (DK + DV) : 2 * STAGE);
    constexpr int ELEMS = REUSED + (DO_SMEM ? NS_BM * DV : 0);
    __shared__ __align__(128) unsigned short smem[ELEMS];
    const unsigned base = ns_smem(smem);
    const unsigned do_base = base + (DO_SMEM ? REUSED : NS_BM * DK) * 2;

    const int total = sched[0], hq = sched[1], hkv = sched[2], hc = sched[3];
    const int* tiles = sched + sched[5];
    const int* it = sched + NS_HEADER + (long long)blockIdx.x * NS_ITEM;
    const int q_base = it[0], ntok = it[1], t0 = it[2], g = it[3], chunk = it[4], tile_lo = it[5],
              tile_hi = it[6];
    const int group = hq / hkv, head0 = g * group + chunk * hc, heads_left = group - chunk * hc;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long k_stride = (long long)hkv * DK, v_stride = (long long)hkv * DV;

    ns_load_rows<DK>(base, q, (long long)q_base + t0, ntok, hc, head0, heads_left, hq);
    ns_load_rows<DV>(do_base, d_o, (long long)q_base + t0, ntok, hc, head0, heads_left, hq);
    ns_commit();
    ns_wait<0>();
    __syncthreads();
    constexpr int DF = DO_SMEM ? 1 : DV / 16;
    unsigned qf[DK / 16][4], df[DF][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) ns_ldsm_x4(qf[kk], ns_at<DK>(base, warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    if constexpr (!DO_SMEM) {
#pragma unroll
        for (int kk = 0; kk < DF; ++kk)
            ns_ldsm_x4(df[kk], ns_at<DV>(do_base, warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    }
    __syncthreads();

    // Per row: its token index in the CTA (positions t0 + tok), and lse (log2, +inf for a row
    // past the CTA's rows, so its P is 0) and delta.
    int tok[2];
    float l2[2], dl[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int local = warp * 16 + (lane >> 2) + e * 8;
        const bool valid = local / hc < ntok && local % hc < heads_left;
        tok[e] = local / hc;
        const long long at = (long long)(head0 + local % hc) * total + q_base + t0 + tok[e];
        const float l = valid ? lse[at] : -INFINITY;
        l2[e] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
        dl[e] = valid ? delta[at] : 0.0f;
    }

    const unsigned short* kg = k + ((long long)q_base * hkv + g) * DK;
    const unsigned short* vg = v + ((long long)q_base * hkv + g) * DV;
    auto load_kv = [&](int j) {
        const int* tl = tiles + (long long)(tile_lo + j) * NS_TILE;
        const int n0 = tl[0], keys = tl[1];
        const unsigned st = base + (unsigned)((j & 1) * STAGE) * 2u;
        ns_load_tile<BN, DK>(st, kg + n0 * k_stride, k_stride, keys, k);
        ns_load_tile<BN, DV>(st + BN * DK * 2, vg + n0 * v_stride, v_stride, keys, v);
    };
    constexpr int DQ = DO_SMEM ? DK / 2 : DK;
    const int col0 = DO_SMEM ? (int)blockIdx.z * DQ : 0;
    float acc[DQ / 8][4];
#pragma unroll
    for (int i = 0; i < DQ / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;

    const int count = tile_hi - tile_lo;
    if (count > 0) {
        load_kv(0);
        ns_commit();
    }
    for (int j = 0; j < count; ++j) {
        if (j + 1 < count) {
            load_kv(j + 1);
            ns_commit();
            ns_wait<1>();
        } else {
            ns_wait<0>();
        }
        __syncthreads();
        const unsigned k_tile = base + (unsigned)((j & 1) * STAGE) * 2u;
        const unsigned v_tile = k_tile + BN * DK * 2;
        const int* tl = tiles + (long long)(tile_lo + j) * NS_TILE;
        const int n0 = tl[0], n1 = tl[0] + tl[1];
        const unsigned mask_lo = (unsigned)tl[2], mask_hi = (unsigned)tl[3];
        bool chose[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int t = tok[e];
            chose[e] = ((t < 32 ? mask_lo : mask_hi) >> (t & 31)) & 1u;
        }
        float s[BN / 8][4], dp[BN / 8][4];
        ns_scores<DK, BN, F16>(s, qf, k_tile, lane);
        if constexpr (DO_SMEM) {
            ns_abt_smem<DV, BN, F16>(dp, do_base, warp * 16, v_tile, lane);
        } else {
            ns_scores<DV, BN, F16>(dp, df, v_tile, lane);
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = n0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                const bool seen = chose[e >> 1] && key < n1 && key <= t0 + tok[e >> 1];
                const float p = seen ? ns_exp2(s[nt][e] * scale_log2 - l2[e >> 1]) : 0.0f;
                s[nt][e] = p * (dp[nt][e] - dl[e >> 1]);
            }
        ns_pv<DK, BN, F16, DQ>(acc, s, k_tile, lane, col0);
        __syncthreads();
    }

#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int local = warp * 16 + (lane >> 2) + e * 8;
        if (tok[e] >= ntok || local % hc >= heads_left) continue;
        const long long row = (long long)q_base + t0 + tok[e];
        float2* out = reinterpret_cast<float2*>(dq + (row * hq + head0 + local % hc) * DK + col0 + (lane & 3) * 2);
#pragma unroll
        for (int i = 0; i < DQ / 8; ++i) out[i * 4] = make_float2(acc[i][2 * e] * scale, acc[i][2 * e + 1] * scale);
    }
}

// Copies BMQ gathered query rows (token from the list, head of the group) of a [total, HQ, D]
// tensor into a swizzled tile; rows past `rows` zero-filled.
template <int BMQ, int D, int THREADS>
__device__ __forceinline__ void ns_load_gathered(unsigned base, const unsigned short* x, const int* list,
                                                 long long q_base, int r0, int rows, int group, int head0, int hq) {
    constexpr int C = D / 8;
    constexpr int N = BMQ * C;
#pragma unroll
    for (int i = 0; i < (N + THREADS - 1) / THREADS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        if (N % THREADS == 0 || c < N) {
            const int r = c / C, ch = c % C;
            const int rr = r0 + r;
            const bool ok = rr < rows;
            const unsigned short* p =
                ok ? x + ((q_base + list[rr / group]) * hq + head0 + rr % group) * D + ch * 8 : x;
            ns_cp_async_16(base + (unsigned)(r * D + ns_swz<C>(r, ch) * 8) * 2u, p, ok ? 16u : 0u);
        }
    }
}

template <int DK, int DV, int WARPS, int BMQ>
__host__ __device__ constexpr int ns_dkdv_smem() {
    return 16 * WARPS * (DK + DV) + 2 * BMQ * (DK + DV);
}

template <int DK, int DV, int WARPS, int BMQ, bool DO_DK, bool DO_DV, bool F16>
__device__ __forceinline__ void ns_slc_bwd_dkdv(const unsigned short* __restrict__ q,
                                                const unsigned short* __restrict__ k,
                                                const unsigned short* __restrict__ v,
                                                const unsigned short* __restrict__ d_o,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                float* __restrict__ dk, float* __restrict__ dv,
                                                const int* __restrict__ sched, float scale_log2, float scale,
                                                unsigned base) {
    constexpr int THREADS = WARPS * 32;
    constexpr int BN = 16 * WARPS;
    constexpr int KV = BN * (DK + DV);
    constexpr int STAGE = BMQ * (DK + DV);
    const unsigned k_tile = base, v_tile = base + BN * DK * 2;

    const int total = sched[0], hq = sched[1], hkv = sched[2];
    const int* lists = sched + sched[5];
    const int* it = sched + NS_HEADER + (long long)blockIdx.x * NS_ITEM;
    const int q_base = it[0], n0 = it[1], keys = it[2], g = it[3], list_lo = it[4], list_hi = it[5];
    const int group = hq / hkv, head0 = g * group;
    const int* list = lists + list_lo;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    ns_load_tile<BN, DK, THREADS>(k_tile, k + ((long long)(q_base + n0) * hkv + g) * DK, (long long)hkv * DK, keys,
                                    k);
    ns_load_tile<BN, DV, THREADS>(v_tile, v + ((long long)(q_base + n0) * hkv + g) * DV, (long long)hkv * DV, keys,
                                    v);
    const int rows = (list_hi - list_lo) * group;
    const int steps = (rows + BMQ - 1) / BMQ;
    auto load_step = [&](int t) {
        const unsigned st = base + (unsigned)(KV + (t & 1) * STAGE) * 2u;
        ns_load_gathered<BMQ, DK, THREADS>(st, q, list, q_base, t * BMQ, rows, group, head0, hq);
        ns_load_gathered<BMQ, DV, THREADS>(st + BMQ * DK * 2, d_o, list, q_base, t * BMQ, rows, group, head0, hq);
    };
    load_step(0);
    ns_commit();

    constexpr int DKA = DO_DK ? DK : 8, DVA = DO_DV ? DV : 8;
    float dk_acc[DKA / 8][4], dv_acc[DVA / 8][4];
#pragma unroll
    for (int i = 0; i < DKA / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[i][e] = 0.0f;
#pragma unroll
    for (int i = 0; i < DVA / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dv_acc[i][e] = 0.0f;
    int key[2];
    bool key_ok[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int local = warp * 16 + (lane >> 2) + e * 8;
        key[e] = n0 + local;
        key_ok[e] = local < keys;
    }

    for (int t = 0; t < steps; ++t) {
        if (t + 1 < steps) {
            load_step(t + 1);
            ns_commit();
            ns_wait<1>();
        } else {
            ns_wait<0>();
        }
        __syncthreads();
        const unsigned q_tile = base + (unsigned)(KV + (t & 1) * STAGE) * 2u;
        const unsigned do_tile = q_tile + BMQ * DK * 2;
        float p[BMQ / 8][4], ds[BMQ / 8][4];
        ns_abt_smem<DK, BMQ, F16>(p, k_tile, warp * 16, q_tile, lane);
        ns_abt_smem<DV, BMQ, F16>(ds, v_tile, warp * 16, do_tile, lane);
#pragma unroll
        for (int nt = 0; nt < BMQ / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int rr = t * BMQ + nt * 8 + (lane & 3) * 2 + c;
                const bool valid = rr < rows;
                const int pos = valid ? list[rr / group] : -1;
                const long long at = (long long)(head0 + (valid ? rr % group : 0)) * total + q_base + (valid ? pos : 0);
                const float l = valid ? lse[at] : -INFINITY;
                const float l2 = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
                const float dl = valid ? delta[at] : 0.0f;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const bool seen = valid && key_ok[e] && key[e] <= pos;
                    const float pe = seen ? ns_exp2(p[nt][2 * e + c] * scale_log2 - l2) : 0.0f;
                    ds[nt][2 * e + c] = pe * (ds[nt][2 * e + c] - dl);
                    p[nt][2 * e + c] = pe;
                }
            }
        if (DO_DV) ns_pv<DVA, BMQ, F16>(dv_acc, p, do_tile, lane);
        if (DO_DK) ns_pv<DKA, BMQ, F16>(dk_acc, ds, q_tile, lane);
        __syncthreads();
    }

#pragma unroll
    for (int e = 0; e < 2; ++e) {
        if (!key_ok[e]) continue;
        const long long row = (long long)(q_base + key[e]) * hkv + g;
        if (DO_DK) {
            float2* out_k = reinterpret_cast<float2*>(dk + row * DK + (lane & 3) * 2);
#pragma unroll
            for (int i = 0; i < DKA / 8; ++i) out_k[i * 4] = make_float2(dk_acc[i][2 * e] * scale, dk_acc[i][2 * e + 1] * scale);
        }
        if (DO_DV) {
            float2* out_v = reinterpret_cast<float2*>(dv + row * DV + (lane & 3) * 2);
#pragma unroll
            for (int i = 0; i < DVA / 8; ++i) out_v[i * 4] = make_float2(dv_acc[i][2 * e], dv_acc[i][2 * e + 1]);
        }
    }
}

#define NS_BWD_ENTRIES(DK, DV, WARPS, BN, SPLIT, SFX, F16)                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) squid_nsa_slc_bwd_dkdv_dk##DK##_dv##DV##_##SFX(       \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned short* d_o,       \
        const float* lse, const float* delta, float* dk, float* dv, const int* sched, float scale_log2,             \
        float scale) {                                                                                               \
        __shared__ __align__(128) unsigned short smem[ns_dkdv_smem<DK, DV, WARPS, 16>()];                           \
        const unsigned base = ns_smem(smem);                                                                         \
        if (!SPLIT) {                                                                                                \
            ns_slc_bwd_dkdv<DK, DV, WARPS, 16, true, true, F16>(q, k, v, d_o, lse, delta, dk, dv, sched,             \
                                                                scale_log2, scale, base);                            \
        } else if (blockIdx.z == 0) {                                                                                \
            ns_slc_bwd_dkdv<DK, DV, WARPS, 16, false, true, F16>(q, k, v, d_o, lse, delta, dk, dv, sched,            \
                                                                 scale_log2, scale, base);                           \
        } else {                                                                                                     \
            ns_slc_bwd_dkdv<DK, DV, WARPS, 16, true, false, F16>(q, k, v, d_o, lse, delta, dk, dv, sched,            \
                                                                 scale_log2, scale, base);                           \
        }                                                                                                            \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(NS_THREADS) squid_nsa_slc_bwd_dq_dk##DK##_dv##DV##_##SFX(          \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned short* d_o,       \
        const float* lse, const float* delta, float* dq, const int* sched, float scale_log2, float scale) {         \
        ns_slc_bwd_dq<DK, DV, BN, F16>(q, k, v, d_o, lse, delta, dq, sched, scale_log2, scale);                    \
    }

// dK/dV four warps (64 keys) for Dk 64, two (32 keys) above (96 included: with four it spills at
// sm_80), Dk = 192 split into a dV and a dK CTA (grid z = 2); dQ key tiles of 64 / 32 / 32 / 16
// keys, Dk = 192's dQ split by columns (grid z = 2). Head dim 256 has no backward.
NS_BWD_ENTRIES(64, 64, 4, 64, false, bf16, false)
NS_BWD_ENTRIES(64, 64, 4, 64, false, f16, true)
NS_BWD_ENTRIES(96, 96, 2, 32, false, bf16, false)
NS_BWD_ENTRIES(96, 96, 2, 32, false, f16, true)
NS_BWD_ENTRIES(128, 128, 2, 32, false, bf16, false)
NS_BWD_ENTRIES(128, 128, 2, 32, false, f16, true)
NS_BWD_ENTRIES(192, 128, 2, 16, true, bf16, false)
NS_BWD_ENTRIES(192, 128, 2, 16, true, f16, true)

extern "C" __global__ void squid_nsa_gate_bwd_bf16(const unsigned short* o_cmp, const unsigned short* o_slc,
                                                   const unsigned short* o_win, const unsigned short* gates,
                                                   const unsigned short* d_o, unsigned short* dgates,
                                                   unsigned short* d_o_cmp, unsigned short* d_o_slc,
                                                   unsigned short* d_o_win, float* delta_slc, const int* dims) {
    ns_gate_bwd<false>(o_cmp, o_slc, o_win, gates, d_o, dgates, d_o_cmp, d_o_slc, d_o_win, delta_slc, dims);
}

extern "C" __global__ void squid_nsa_gate_bwd_f16(const unsigned short* o_cmp, const unsigned short* o_slc,
                                                  const unsigned short* o_win, const unsigned short* gates,
                                                  const unsigned short* d_o, unsigned short* dgates,
                                                  unsigned short* d_o_cmp, unsigned short* d_o_slc,
                                                  unsigned short* d_o_win, float* delta_slc, const int* dims) {
    ns_gate_bwd<true>(o_cmp, o_slc, o_win, gates, d_o, dgates, d_o_cmp, d_o_slc, d_o_win, delta_slc, dims);
}

// out = a + b (a in the storage type, b in f32), rounded once.
template <bool F16>
__device__ __forceinline__ void ns_add(const unsigned short* __restrict__ a, const float* __restrict__ b,
                                       unsigned short* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        out[i] = ns_store<F16>(ns_load_f32<F16>(a + i) + b[i]);
    }
}

extern "C" __global__ void squid_nsa_add_bf16(const unsigned short* a, const float* b, unsigned short* out,
                                              long long n) {
    ns_add<false>(a, b, out, n);
}

extern "C" __global__ void squid_nsa_add_f16(const unsigned short* a, const float* b, unsigned short* out,
                                             long long n) {
    ns_add<true>(a, b, out, n);
}
