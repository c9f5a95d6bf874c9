// Dense (and segment) flash attention on the tensor cores, FlashAttention-2 structure.
//
// Layout (packed varlen, row-major): q [total_q, HQ, DK], k [total_k, HKV, DK],
// v [total_k, HKV, DV], o [total_q, HQ, DV], lse [HQ, total_q] (natural log, f32). Storage is
// bf16 or f16 (one entry per type); every product runs on mma.sync.m16n8k16 with f32
// accumulation.
//
// Work comes from a schedule built on the host (never an empty tile), one int buffer: a header
//   total_q hq hkv causal window row_lo_at - -
// (row_lo_at: where the per-query key starts begin in the buffer, or -1), then the items, ten
// ints each:
//   q_base tq k_base tk | r0 rows | k_lo k_hi | full_lo full_hi
// = the sequence's first packed query and key rows and its lengths; the tile's rows r0..r0+rows
// (sequence coordinates, rows <= the tile height); the keys k_lo..k_hi that some row of the tile
// sees (only these are loaded); and the keys full_lo..full_hi that every row sees (a key tile
// inside it needs no mask). Query row i (position p = i + tk - tq, bottom-right aligned) sees
// key j when lo_i <= j < hi_i, hi_i = causal ? p + 1 : tk, lo_i = max(p - window + 1,
// row_lo[q_base + i] when present, 0): the dense mask (dense/mod.rs) and, through row_lo,
// the segment layout's per-query ranges.
//
// Shared tiles are swizzled: 16-byte chunk c of row r sits at chunk sq_swz(r, c), so the eight
// row addresses of every ldmatrix (eight consecutive rows, one logical chunk) hit eight
// different 16-byte bank groups.

#define SQ_WARPS 4
#define SQ_THREADS (SQ_WARPS * 32)
#define SQ_HEADER 8
#define SQ_ITEM 10
#define SQ_LN2 0.6931471805599453f

__device__ __forceinline__ unsigned sq_smem(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void sq_cp_async_16(unsigned dst, const void* src, unsigned src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void sq_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void sq_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void sq_ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void sq_ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b for one 16 x 8 x 16 tile (a row-major 16 x 16, b column-major 16 x 8).
template <bool F16>
__device__ __forceinline__ void sq_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
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

// Two f32 rounded to the storage type, `lo` in the low half (the lower column of a fragment).
template <bool F16>
__device__ __forceinline__ unsigned sq_pack(float lo, float hi) {
    unsigned r;
    if (F16) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

__device__ __forceinline__ float sq_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float sq_log2(float x) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// The swizzled chunk of (row, chunk) in a row of C 16-byte chunks.
template <int C>
__device__ __forceinline__ int sq_swz(int row, int chunk) {
    if (C % 8 == 0) return chunk ^ (row & 7);
    // C = 12 (head dim 96): rows alternate between two halves of the 128-byte bank window, so
    // the low two bits take row / 2.
    if (C % 4 == 0) return (chunk & ~3) | ((chunk ^ (row >> 1)) & 3);
    return chunk;
}

// Shared address (bytes) of element (row, col) of a swizzled [*, D] tile at `base`; col % 8 == 0.
template <int D>
__device__ __forceinline__ unsigned sq_at(unsigned base, int row, int col) {
    return base + (unsigned)(row * D + sq_swz<D / 8>(row, col >> 3) * 8) * 2u;
}

// Copies rows 0..valid of a [ROWS, D] tile (row r at src + r * stride) into shared memory with
// cp.async, zero-filling rows valid..ROWS. `fallback` is any valid address of the tensor.
template <int ROWS, int D, int THREADS = SQ_THREADS>
__device__ __forceinline__ void sq_load_tile(unsigned base, const unsigned short* src, long long stride, int valid,
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
            sq_cp_async_16(base + (unsigned)(r * D + sq_swz<C>(r, ch) * 8) * 2u, p, ok ? 16u : 0u);
        }
    }
}

// The keys lo..hi that row i (sequence coordinates) of a tile sees; empty (0, 0) past the tile.
__device__ __forceinline__ void sq_row_range(int i, bool valid, int tq, int tk, int q_base, int causal, int window,
                                             const int* row_lo, int& lo, int& hi) {
    if (!valid) {
        lo = 0;
        hi = 0;
        return;
    }
    const int p = i + tk - tq;
    hi = causal ? min(max(p + 1, 0), tk) : tk;
    lo = window > 0 ? min(max(p - window + 1, 0), tk) : 0;
    if (row_lo) lo = max(lo, row_lo[q_base + i]);
}

// Q K^T for a warp's 16 rows against BN keys of a swizzled K tile: s[n8 tile][fragment].
template <int DK, int BN, bool F16>
__device__ __forceinline__ void sq_scores(float (&s)[BN / 8][4], const unsigned (&qf)[DK / 16][4], unsigned k_tile,
                                          int lane) {
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk)
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
            // Matrices: (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7),
            // (keys 8-15, dims 8-15): b0, b1 of two n8 tiles (K rows are B's columns).
            unsigned b[4];
            sq_ldsm_x4(b, sq_at<DK>(k_tile, np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
            sq_mma<F16>(s[2 * np], qf[kk], b[0], b[1]);
            sq_mma<F16>(s[2 * np + 1], qf[kk], b[2], b[3]);
        }
}

// acc[dv8][fragment] += P V for a warp's 16 rows, P from the score fragments (the C layout of
// two n8 tiles is the A layout of one k16 step), V a swizzled [BN, DV] tile.
// (The accumulator may cover columns col0..col0 + DV of a wider [BN, LD] tile.)
template <int DV, int BN, bool F16, int LD = DV>
__device__ __forceinline__ void sq_pv(float (&acc)[DV / 8][4], const float (&p)[BN / 8][4], unsigned v_tile,
                                      int lane, int col0 = 0) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        const unsigned a[4] = {sq_pack<F16>(p[2 * kk][0], p[2 * kk][1]), sq_pack<F16>(p[2 * kk][2], p[2 * kk][3]),
                               sq_pack<F16>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               sq_pack<F16>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < DV / 16; ++dp) {
            unsigned b[4];
            sq_ldsm_x4_t(b, sq_at<LD>(v_tile, kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                      col0 + dp * 16 + (lane >> 4) * 8));
            sq_mma<F16>(acc[2 * dp], a, b[0], b[1]);
            sq_mma<F16>(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// ---- forward ---------------------------------------------------------------------------------
//
// One CTA of four warps per (schedule item, GQA group or part of one); warp w owns rows
// 16w..16w+16 of the 64-row tile. The header's int 7 is the heads per CTA (HPC, a divisor of the
// group of at most 64): the tile stacks the HPC heads h0.. of each query position (row r is
// position r / HPC, head h0 + r % HPC; a schedule item then covers at most 64 / HPC positions),
// so each K/V tile is loaded once for all of them. Q is staged through shared memory once and kept in registers as mma A
// fragments; K and V tiles of BN keys stream through two cp.async stages (tile j + 1 loads while
// tile j is used). Online softmax in registers on scores pre-scaled by scale * log2(e), so every
// exponential is one ex2.
// STACK: false pins HPC to 1 (Dk = 256, whose registers are full: the stacking's extra live
// values made ptxas spill; the host then launches one CTA per head).
template <int DK, int DV, int BN, bool STACK, bool F16>
__device__ __forceinline__ void sq_flash_fwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                             const unsigned short* __restrict__ v, unsigned short* __restrict__ o,
                                             float* __restrict__ lse, const int* __restrict__ sched,
                                             float scale_log2) {
    constexpr int BM = 16 * SQ_WARPS;
    constexpr int STAGE = BN * (DK + DV);
    constexpr int ELEMS = (BM * DK > 2 * STAGE) ? BM * DK : 2 * STAGE;
    __shared__ __align__(128) unsigned short smem[ELEMS];
    const unsigned base = sq_smem(smem);

    const int total_q = sched[0], hq = sched[1], hkv = sched[2], causal = sched[3], window = sched[4];
    const int hpc = STACK ? max(sched[7], 1) : 1;
    const int* row_lo = sched[5] >= 0 ? sched + sched[5] : nullptr;
    const int* it = sched + SQ_HEADER + (long long)blockIdx.x * SQ_ITEM;
    const int q_base = it[0], tq = it[1], k_base = it[2], tk = it[3], r0 = it[4], rows = it[5];
    const int k_lo = it[6], k_hi = it[7], full_lo = it[8], full_hi = it[9];
    const int h0 = blockIdx.y * hpc, g = h0 / (hq / hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long k_stride = (long long)hkv * DK, v_stride = (long long)hkv * DV;

    // Q tile -> shared -> registers (the shared space is then reused by the K/V stages). A
    // position's HPC heads are adjacent in q, so consecutive tile rows stay contiguous.
    {
        constexpr int C = DK / 8;
#pragma unroll
        for (int i = 0; i < (BM * C + SQ_THREADS - 1) / SQ_THREADS; ++i) {
            const int c = threadIdx.x + i * SQ_THREADS;
            if ((BM * C) % SQ_THREADS == 0 || c < BM * C) {
                const int r = c / C, ch = c % C, pos = r / hpc;
                const bool ok = pos < rows;
                const unsigned short* src = ok ? q + ((long long)(q_base + r0 + pos) * hq + h0 + r % hpc) * DK + ch * 8 : q;
                sq_cp_async_16(base + (unsigned)(r * DK + sq_swz<C>(r, ch) * 8) * 2u, src, ok ? 16u : 0u);
            }
        }
    }
    sq_commit();
    sq_wait<0>();
    __syncthreads();
    unsigned qf[DK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) sq_ldsm_x4(qf[kk], sq_at<DK>(base, warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    __syncthreads();

    int lo[2], hi[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int pos = (warp * 16 + (lane >> 2) + e * 8) / hpc;
        sq_row_range(r0 + pos, pos < rows, tq, tk, q_base, causal, window, row_lo, lo[e], hi[e]);
    }

    const unsigned short* kg = k + ((long long)k_base * hkv + g) * DK;
    const unsigned short* vg = v + ((long long)k_base * hkv + g) * DV;
    auto load_kv = [&](int j) {
        const int n0 = k_lo + j * BN;
        const unsigned st = base + (unsigned)((j & 1) * STAGE) * 2u;
        const int valid = min(BN, k_hi - n0);
        sq_load_tile<BN, DK>(st, kg + n0 * k_stride, k_stride, valid, k);
        sq_load_tile<BN, DV>(st + BN * DK * 2, vg + n0 * v_stride, v_stride, valid, v);
    };

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float acc[DV / 8][4];
#pragma unroll
    for (int dt = 0; dt < DV / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dt][e] = 0.0f;

    const int tiles = (k_hi - k_lo + BN - 1) / BN;
    load_kv(0);
    sq_commit();
    for (int j = 0; j < tiles; ++j) {
        if (j + 1 < tiles) {
            // The other stage was last read in iteration j - 1, before its closing barrier.
            load_kv(j + 1);
            sq_commit();
            sq_wait<1>();
        } else {
            sq_wait<0>();
        }
        __syncthreads();
        const unsigned k_tile = base + (unsigned)((j & 1) * STAGE) * 2u;
        const unsigned v_tile = k_tile + BN * DK * 2;
        const int n0 = k_lo + j * BN;

        float s[BN / 8][4];
        sq_scores<DK, BN, F16>(s, qf, k_tile, lane);
        const bool full = n0 >= full_lo && n0 + BN <= full_hi;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = n0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                const bool seen = full || (key >= lo[e >> 1] && key < hi[e >> 1]);
                s[nt][e] = seen ? s[nt][e] * scale_log2 : -INFINITY;
            }

        // Online softmax; each row lives in the four lanes of a quad.
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float mx = m[e];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * e], s[nt][2 * e + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float ref = mx == -INFINITY ? 0.0f : mx;  // a row with nothing seen yet
            const float alpha = sq_exp2(m[e] - ref);
            m[e] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                s[nt][2 * e] = sq_exp2(s[nt][2 * e] - ref);
                s[nt][2 * e + 1] = sq_exp2(s[nt][2 * e + 1] - ref);
                sum += s[nt][2 * e] + s[nt][2 * e + 1];
            }
            l[e] = l[e] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < DV / 8; ++dt) {
                acc[dt][2 * e] *= alpha;
                acc[dt][2 * e + 1] *= alpha;
            }
        }
        sq_pv<DV, BN, F16>(acc, s, v_tile, lane);
        __syncthreads();
    }

#pragma unroll
    for (int e = 0; e < 2; ++e) {
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 1);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 2);
        const int local = warp * 16 + (lane >> 2) + e * 8, pos = local / hpc, h = h0 + local % hpc;
        if (pos >= rows) continue;
        const long long row = q_base + r0 + pos;
        const float inv = l[e] > 0.0f ? 1.0f / l[e] : 0.0f;
        unsigned* out = reinterpret_cast<unsigned*>(o + (row * hq + h) * DV + (lane & 3) * 2);
#pragma unroll
        for (int dt = 0; dt < DV / 8; ++dt) out[dt * 4] = sq_pack<F16>(acc[dt][2 * e] * inv, acc[dt][2 * e + 1] * inv);
        if ((lane & 3) == 0) lse[(long long)h * total_q + row] = l[e] > 0.0f ? (m[e] + sq_log2(l[e])) * SQ_LN2 : -INFINITY;
    }
}

#define SQ_FWD_ENTRY(NAME, DK, DV, BN, STACK, F16)                                                                        \
    extern "C" __global__ void __launch_bounds__(SQ_THREADS)                                                         \
        NAME(const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* o,          \
             float* lse, const int* sched, float scale_log2) {                                                       \
        sq_flash_fwd<DK, DV, BN, STACK, F16>(q, k, v, o, lse, sched, scale_log2);                                         \
    }

// Key tile per head dim: the two K/V stages fit the 48 KiB of static shared memory.
SQ_FWD_ENTRY(squid_flash_fwd_dk64_dv64_bf16, 64, 64, 64, true, false)
SQ_FWD_ENTRY(squid_flash_fwd_dk64_dv64_f16, 64, 64, 64, true, true)
SQ_FWD_ENTRY(squid_flash_fwd_dk96_dv96_bf16, 96, 96, 32, true, false)
SQ_FWD_ENTRY(squid_flash_fwd_dk96_dv96_f16, 96, 96, 32, true, true)
SQ_FWD_ENTRY(squid_flash_fwd_dk128_dv128_bf16, 128, 128, 32, true, false)
SQ_FWD_ENTRY(squid_flash_fwd_dk128_dv128_f16, 128, 128, 32, true, true)
SQ_FWD_ENTRY(squid_flash_fwd_dk192_dv128_bf16, 192, 128, 32, true, false)
SQ_FWD_ENTRY(squid_flash_fwd_dk192_dv128_f16, 192, 128, 32, true, true)
SQ_FWD_ENTRY(squid_flash_fwd_dk256_dv256_bf16, 256, 256, 16, false, false)
SQ_FWD_ENTRY(squid_flash_fwd_dk256_dv256_f16, 256, 256, 16, false, true)

// ---- backward ----------------------------------------------------------------------------------
//
// FlashAttention-2's backward in three kernels (four with atomics):
// - pre: delta = rowsum(dO * O) per (query, head), f32 [HQ, total_q];
// - dK/dV: one CTA per (key tile, kv head) from a key-tile schedule (item: q_base tq k_base tk |
//   n0 keys | q_lo q_hi | qf_lo qf_hi = the queries that see some key of the tile, and those that
//   see all of it). Warp w owns keys 16w..16w+16; the CTA walks the query heads of its GQA group
//   and their query tiles of BMQ rows (Q and dO through two cp.async stages), recomputing
//   P^T = exp2(K Q^T * scale log2 e - lse log2 e), dP^T = V dO^T, dS^T = P^T (dP^T - delta), and
//   accumulating dV += P^T dO, dK += dS^T Q in registers, so dK/dV are summed over the group with
//   no atomics. With the atomic flag (header[7]) it also adds dS K into an f32 dQ buffer with
//   red.add (dS^T goes through shared memory to become an A operand);
// - dQ (the deterministic mode): one CTA per (forward schedule item, query head), the forward's
//   structure with dQ += dS K accumulated in registers over the key tiles and stored once.

template <bool F16>
__device__ __forceinline__ float sq_load_f32(const unsigned short* p) {
    if (F16) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(*p));
        return f;
    }
    return __uint_as_float(((unsigned)*p) << 16);
}

__device__ __forceinline__ void sq_ldsm_x2_t(unsigned (&r)[2], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

__device__ __forceinline__ void sq_red_add(float* p, float x) {
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(x) : "memory");
}

// s = A[a_row0 .. a_row0 + 16, 0..D] * B[0..N, 0..D]^T, both swizzled [*, D] shared tiles.
template <int D, int N, bool F16>
__device__ __forceinline__ void sq_abt_smem(float (&s)[N / 8][4], unsigned a_tile, int a_row0, unsigned b_tile,
                                            int lane) {
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[4];
        sq_ldsm_x4(a, sq_at<D>(a_tile, a_row0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            unsigned b[4];
            sq_ldsm_x4(b, sq_at<D>(b_tile, np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
            sq_mma<F16>(s[2 * np], a, b[0], b[1]);
            sq_mma<F16>(s[2 * np + 1], a, b[2], b[3]);
        }
    }
}

template <bool F16>
__device__ __forceinline__ void sq_bwd_pre(const unsigned short* __restrict__ o, const unsigned short* __restrict__ d_o,
                                           float* __restrict__ delta, int total_q, int hq, int dv) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); w < (long long)total_q * hq;
         w += warps) {
        float sum = 0.0f;
        for (int d = lane; d < dv; d += 32) sum += sq_load_f32<F16>(o + w * dv + d) * sq_load_f32<F16>(d_o + w * dv + d);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) delta[(w % hq) * total_q + w / hq] = sum;
    }
}

template <bool F16>
__device__ __forceinline__ void sq_bwd_dq_convert(const float* __restrict__ acc, unsigned short* __restrict__ dq,
                                                  long long n, float scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        dq[i] = F16 ? squid_from_f32<squid_f16>(acc[i] * scale).bits : squid_from_f32<squid_bf16>(acc[i] * scale).bits;
    }
}

// Shared elements of the dK/dV kernel (declared by its entry, so the two passes of a split entry
// share one array): K and V tiles, two Q/dO stages, the dS^T tile. DS_IN_STAGE puts the dS^T
// tile in the dO half of the stage being read (dO is dead once dP and dV are done), for head
// dims whose separate tile would pass the 48 KiB of static shared memory (Dk = 256).
template <int DK, int DV, int WARPS, int BMQ, bool DS_IN_STAGE>
__host__ __device__ constexpr int sq_dkdv_smem() {
    return 16 * WARPS * (DK + DV) + 2 * BMQ * (DK + DV) + (DS_IN_STAGE ? 0 : 16 * WARPS * BMQ);
}

// DO_DK / DO_DV: which accumulators this CTA keeps; PART of PARTS: the slice of their columns
// (PARTS > 1 when even one accumulator does not fit the registers: Dk = 256).
template <int DK, int DV, int WARPS, int BMQ, bool DS_IN_STAGE, bool DO_DK, bool DO_DV, int PART, int PARTS, bool F16>
__device__ __forceinline__ void sq_flash_bwd_dkdv(
    const unsigned short* __restrict__ q, const unsigned short* __restrict__ k, const unsigned short* __restrict__ v,
    const unsigned short* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta,
    unsigned short* __restrict__ dk, unsigned short* __restrict__ dv, float* __restrict__ dq_acc,
    const int* __restrict__ sched, float scale_log2, float scale, unsigned base) {
    constexpr int THREADS = WARPS * 32;
    constexpr int BN = 16 * WARPS;
    constexpr int KV = BN * (DK + DV);
    constexpr int STAGE = BMQ * (DK + DV);
    const unsigned k_tile = base, v_tile = base + BN * DK * 2;
    static_assert(!DS_IN_STAGE || 16 * WARPS * BMQ <= BMQ * DV, "dS^T must fit the dO half of a stage");

    const int total_q = sched[0], hq = sched[1], hkv = sched[2], causal = sched[3], window = sched[4];
    const int* row_lo = sched[5] >= 0 ? sched + sched[5] : nullptr;
    const bool atomic = DO_DK && sched[7] != 0;
    const int* it = sched + SQ_HEADER + (long long)blockIdx.x * SQ_ITEM;
    const int q_base = it[0], tq = it[1], k_base = it[2], tk = it[3], n0 = it[4], keys = it[5];
    const int q_lo = it[6], q_hi = it[7], qf_lo = it[8], qf_hi = it[9];
    const int g = blockIdx.y, group = hq / hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long q_stride = (long long)hq * DK, o_stride = (long long)hq * DV;

    sq_load_tile<BN, DK, THREADS>(k_tile, k + ((long long)(k_base + n0) * hkv + g) * DK, (long long)hkv * DK, keys, k);
    sq_load_tile<BN, DV, THREADS>(v_tile, v + ((long long)(k_base + n0) * hkv + g) * DV, (long long)hkv * DV, keys, v);
    const int steps = (q_hi - q_lo + BMQ - 1) / BMQ, total = group * steps;
    auto load_step = [&](int t) {
        const int hh = g * group + t / steps, m0 = q_lo + (t % steps) * BMQ;
        const unsigned st = base + (unsigned)(KV + (t & 1) * STAGE) * 2u;
        const int valid = min(BMQ, q_hi - m0);
        sq_load_tile<BMQ, DK, THREADS>(st, q + ((long long)(q_base + m0) * hq + hh) * DK, q_stride, valid, q);
        sq_load_tile<BMQ, DV, THREADS>(st + BMQ * DK * 2, d_o + ((long long)(q_base + m0) * hq + hh) * DV, o_stride,
                                       valid, d_o);
    };
    load_step(0);
    sq_commit();

    // A pass that skips dK or dV keeps a one-tile dummy accumulator (never used).
    static_assert(DK % (16 * PARTS) == 0 && DV % (16 * PARTS) == 0, "column slices of whole k16 steps");
    constexpr int DKA = DO_DK ? DK / PARTS : 8, DVA = DO_DV ? DV / PARTS : 8;
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

    for (int t = 0; t < total; ++t) {
        if (t + 1 < total) {
            load_step(t + 1);
            sq_commit();
            sq_wait<1>();
        } else {
            sq_wait<0>();
        }
        __syncthreads();
        const int hh = g * group + t / steps, m0 = q_lo + (t % steps) * BMQ;
        const unsigned q_tile = base + (unsigned)(KV + (t & 1) * STAGE) * 2u;
        const unsigned do_tile = q_tile + BMQ * DK * 2;
        float p[BMQ / 8][4], ds[BMQ / 8][4];
        sq_abt_smem<DK, BMQ, F16>(p, k_tile, warp * 16, q_tile, lane);
        sq_abt_smem<DV, BMQ, F16>(ds, v_tile, warp * 16, do_tile, lane);
        const bool full = m0 >= qf_lo && m0 + BMQ <= qf_hi;
#pragma unroll
        for (int nt = 0; nt < BMQ / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int i = m0 + nt * 8 + (lane & 3) * 2 + c;
                const bool valid = i < q_hi;
                int lo, hi;
                sq_row_range(i, valid, tq, tk, q_base, causal, window, row_lo, lo, hi);
                const float l = valid ? lse[(long long)hh * total_q + q_base + i] : -INFINITY;
                const float l2 = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
                const float dl = valid ? delta[(long long)hh * total_q + q_base + i] : 0.0f;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const bool seen = key_ok[e] && (full || (key[e] >= lo && key[e] < hi));
                    const float pe = seen ? sq_exp2(p[nt][2 * e + c] * scale_log2 - l2) : 0.0f;
                    ds[nt][2 * e + c] = pe * (ds[nt][2 * e + c] - dl);
                    p[nt][2 * e + c] = pe;
                }
            }
        if (DO_DV) sq_pv<DVA, BMQ, F16, DV>(dv_acc, p, do_tile, lane, PART * DVA);
        if (DO_DK) sq_pv<DKA, BMQ, F16, DK>(dk_acc, ds, q_tile, lane, PART * DKA);
        if (atomic) {
            // dS^T -> shared [BN keys][BMQ queries]; then dQ[m0.., :] += dS K, the DK / 8 column
            // tiles shared out over the warps.
            const unsigned ds_tile = DS_IN_STAGE ? do_tile : base + (KV + 2 * STAGE) * 2;
            if (DS_IN_STAGE) __syncthreads();  // every warp is done reading this stage's dO
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int row = warp * 16 + (lane >> 2) + e * 8, col = nt * 8 + (lane & 3) * 2;
                    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(ds_tile + (unsigned)(row * BMQ + col) * 2u),
                                 "r"(sq_pack<F16>(ds[nt][2 * e], ds[nt][2 * e + 1]))
                                 : "memory");
                }
            __syncthreads();
            // A fixed trip count per warp (unrolled): a loop starting at `warp` made ptxas 13
            // spill at Dk = 96 on sm_100.
            // With PARTS > 1, each dK slice's CTA adds the same slice of dQ's columns.
            static_assert((DK / 8 / PARTS) % WARPS == 0, "dQ column tiles must share out evenly over the warps");
#pragma unroll
            for (int ni = 0; ni < DK / 8 / PARTS / WARPS; ++ni) {
                const int nt = PART * (DK / 8 / PARTS) + warp + ni * WARPS;
#pragma unroll
                for (int mq = 0; mq < BMQ / 16; ++mq) {
                    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                    for (int kk = 0; kk < BN / 16; ++kk) {
                        // A = dS (queries x keys) from its transposed store; B = K (keys x dims).
                        const int mi = lane >> 3;
                        unsigned a[4], b[2];
                        sq_ldsm_x4_t(a, ds_tile + (unsigned)((kk * 16 + (mi >> 1) * 8 + (lane & 7)) * BMQ + mq * 16 +
                                                             (mi & 1) * 8) * 2u);
                        sq_ldsm_x2_t(b, sq_at<DK>(k_tile, kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, nt * 8));
                        sq_mma<F16>(acc, a, b[0], b[1]);
                    }
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = m0 + mq * 16 + (lane >> 2) + (e >> 1) * 8;
                        if (i < q_hi) {
                            sq_red_add(dq_acc + ((long long)(q_base + i) * hq + hh) * DK + nt * 8 + (lane & 3) * 2 + (e & 1),
                                       acc[e]);
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int e = 0; e < 2; ++e) {
        if (!key_ok[e]) continue;
        const long long row = (long long)(k_base + key[e]) * hkv + g;
        unsigned* out_k = reinterpret_cast<unsigned*>(dk + row * DK + (lane & 3) * 2);
        unsigned* out_v = reinterpret_cast<unsigned*>(dv + row * DV + (lane & 3) * 2);
        if (DO_DK) {
#pragma unroll
            for (int i = 0; i < DKA / 8; ++i)
                out_k[(PART * DKA / 8 + i) * 4] = sq_pack<F16>(dk_acc[i][2 * e] * scale, dk_acc[i][2 * e + 1] * scale);
        }
        if (DO_DV) {
#pragma unroll
            for (int i = 0; i < DVA / 8; ++i)
                out_v[(PART * DVA / 8 + i) * 4] = sq_pack<F16>(dv_acc[i][2 * e], dv_acc[i][2 * e + 1]);
        }
    }
}

// WARPS warps of 16 query rows (the host's schedule uses tiles of 16 * WARPS rows). DO_SMEM: dO
// stays in shared memory (read back by ldmatrix per key tile) instead of registers, for head
// dims whose Q and dO fragments together leave too few registers (Dk = 192 spilled under ptxas
// 13 on sm_100); dO then comes first and Q's staging area is reused by the K/V stages. Q_SMEM
// (with DO_SMEM): Q stays in shared memory too, read back per key tile, for Dk = 256 whose f32
// dQ accumulator alone takes 128 registers. PARTS: CTAs per query tile (grid z), CTA z
// accumulating dQ's column slice z (each recomputes S and dP), for the same reason.
template <int DK, int DV, int WARPS, int BN, bool DO_SMEM, bool Q_SMEM, int PARTS, bool F16>
__device__ __forceinline__ void sq_flash_bwd_dq(const unsigned short* __restrict__ q,
                                                const unsigned short* __restrict__ k,
                                                const unsigned short* __restrict__ v,
                                                const unsigned short* __restrict__ d_o, const float* __restrict__ lse,
                                                const float* __restrict__ delta, unsigned short* __restrict__ dq,
                                                const int* __restrict__ sched, float scale_log2, float scale) {
    constexpr int THREADS = WARPS * 32;
    constexpr int BM = 16 * WARPS;
    constexpr int STAGE = BN * (DK + DV);
    // Without DO_SMEM: [Q | dO] staging, then the K/V stages over both; with it: [dO | Q staging,
    // then the K/V stages].
    // then the K/V stages]; with Q_SMEM too: [dO | Q | the K/V stages].
    static_assert(DO_SMEM || !Q_SMEM, "Q_SMEM needs DO_SMEM");
    constexpr int QKV = Q_SMEM ? BM * DK + 2 * STAGE : (BM * DK > 2 * STAGE) ? BM * DK : 2 * STAGE;
    constexpr int ELEMS = DO_SMEM ? BM * DV + QKV : ((BM * (DK + DV) > 2 * STAGE) ? BM * (DK + DV) : 2 * STAGE);
    __shared__ __align__(128) unsigned short smem[ELEMS];
    const unsigned base = DO_SMEM ? sq_smem(smem) + BM * DV * 2 : sq_smem(smem);
    const unsigned do_smem = DO_SMEM ? sq_smem(smem) : base + BM * DK * 2;
    const unsigned kv_base = Q_SMEM ? base + BM * DK * 2 : base;

    const int total_q = sched[0], hq = sched[1], hkv = sched[2], causal = sched[3], window = sched[4];
    const int* row_lo = sched[5] >= 0 ? sched + sched[5] : nullptr;
    const int* it = sched + SQ_HEADER + (long long)blockIdx.x * SQ_ITEM;
    const int q_base = it[0], tq = it[1], k_base = it[2], tk = it[3], r0 = it[4], rows = it[5];
    const int k_lo = it[6], k_hi = it[7], full_lo = it[8], full_hi = it[9];
    const int h = blockIdx.y, g = h / (hq / hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long k_stride = (long long)hkv * DK, v_stride = (long long)hkv * DV;

    sq_load_tile<BM, DK, THREADS>(base, q + ((long long)(q_base + r0) * hq + h) * DK, (long long)hq * DK, rows, q);
    sq_load_tile<BM, DV, THREADS>(do_smem, d_o + ((long long)(q_base + r0) * hq + h) * DV, (long long)hq * DV, rows,
                                  d_o);
    sq_commit();
    sq_wait<0>();
    __syncthreads();
    // Fragments kept in shared memory are one-step dummies (never read).
    constexpr int DF = DO_SMEM ? 1 : DV / 16, QF = Q_SMEM ? 1 : DK / 16;
    unsigned qf[QF][4], df[DF][4];
    if constexpr (!Q_SMEM) {
#pragma unroll
        for (int kk = 0; kk < QF; ++kk)
            sq_ldsm_x4(qf[kk], sq_at<DK>(base, warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    }
    if constexpr (!DO_SMEM) {
#pragma unroll
        for (int kk = 0; kk < DF; ++kk)
            sq_ldsm_x4(df[kk], sq_at<DV>(do_smem, warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    }
    __syncthreads();

    int lo[2], hi[2];
    float l2[2], dl[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int local = warp * 16 + (lane >> 2) + e * 8;
        const bool valid = local < rows;
        sq_row_range(r0 + local, valid, tq, tk, q_base, causal, window, row_lo, lo[e], hi[e]);
        const float l = valid ? lse[(long long)h * total_q + q_base + r0 + local] : -INFINITY;
        l2[e] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
        dl[e] = valid ? delta[(long long)h * total_q + q_base + r0 + local] : 0.0f;
    }

    const unsigned short* kg = k + ((long long)k_base * hkv + g) * DK;
    const unsigned short* vg = v + ((long long)k_base * hkv + g) * DV;
    auto load_kv = [&](int j) {
        const int n0 = k_lo + j * BN;
        const unsigned st = kv_base + (unsigned)((j & 1) * STAGE) * 2u;
        const int valid = min(BN, k_hi - n0);
        sq_load_tile<BN, DK, THREADS>(st, kg + n0 * k_stride, k_stride, valid, k);
        sq_load_tile<BN, DV, THREADS>(st + BN * DK * 2, vg + n0 * v_stride, v_stride, valid, v);
    };
    static_assert(DK % (16 * PARTS) == 0, "column slices of whole k16 steps");
    constexpr int DA = DK / PARTS;
    const int col0 = PARTS > 1 ? (int)blockIdx.z * DA : 0;
    float acc[DA / 8][4];
#pragma unroll
    for (int i = 0; i < DA / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;

    const int tiles = (k_hi - k_lo + BN - 1) / BN;
    load_kv(0);
    sq_commit();
    for (int j = 0; j < tiles; ++j) {
        if (j + 1 < tiles) {
            load_kv(j + 1);
            sq_commit();
            sq_wait<1>();
        } else {
            sq_wait<0>();
        }
        __syncthreads();
        const unsigned k_tile = kv_base + (unsigned)((j & 1) * STAGE) * 2u;
        const unsigned v_tile = k_tile + BN * DK * 2;
        const int n0 = k_lo + j * BN;
        float s[BN / 8][4], dp[BN / 8][4];
        if constexpr (Q_SMEM) {
            sq_abt_smem<DK, BN, F16>(s, base, warp * 16, k_tile, lane);
        } else {
            sq_scores<DK, BN, F16>(s, qf, k_tile, lane);
        }
        if constexpr (DO_SMEM) {
            sq_abt_smem<DV, BN, F16>(dp, do_smem, warp * 16, v_tile, lane);
        } else {
            sq_scores<DV, BN, F16>(dp, df, v_tile, lane);
        }
        const bool full = n0 >= full_lo && n0 + BN <= full_hi;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = n0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                const bool seen = full || (key >= lo[e >> 1] && key < hi[e >> 1]);
                const float p = seen ? sq_exp2(s[nt][e] * scale_log2 - l2[e >> 1]) : 0.0f;
                s[nt][e] = p * (dp[nt][e] - dl[e >> 1]);
            }
        sq_pv<DA, BN, F16, DK>(acc, s, k_tile, lane, col0);
        __syncthreads();
    }

#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int local = warp * 16 + (lane >> 2) + e * 8;
        if (local >= rows) continue;
        const long long row = q_base + r0 + local;
        unsigned* out = reinterpret_cast<unsigned*>(dq + (row * hq + h) * DK + col0 + (lane & 3) * 2);
#pragma unroll
        for (int i = 0; i < DA / 8; ++i) out[i * 4] = sq_pack<F16>(acc[i][2 * e] * scale, acc[i][2 * e + 1] * scale);
    }
}

// The dK/dV CTA of grid z-index `z`: everything when PARTS = 0; else z < PARTS: column slice z of
// dV, and z >= PARTS: slice z - PARTS of dK (and the atomic dQ's same columns).
template <int DK, int DV, int WARPS, bool DS, int PARTS, bool F16>
__device__ __forceinline__ void sq_dkdv_entry(const unsigned short* q, const unsigned short* k, const unsigned short* v,
                                              const unsigned short* d_o, const float* lse, const float* delta,
                                              unsigned short* dk, unsigned short* dv, float* dq_acc, const int* sched,
                                              float scale_log2, float scale, unsigned base) {
    const int z = blockIdx.z;
    if constexpr (PARTS == 0) {
        sq_flash_bwd_dkdv<DK, DV, WARPS, 16, DS, true, true, 0, 1, F16>(q, k, v, d_o, lse, delta, dk, dv, dq_acc, sched,
                                                                        scale_log2, scale, base);
    } else if constexpr (PARTS == 1) {
        if (z == 0)
            sq_flash_bwd_dkdv<DK, DV, WARPS, 16, DS, false, true, 0, 1, F16>(q, k, v, d_o, lse, delta, dk, dv, dq_acc,
                                                                             sched, scale_log2, scale, base);
        else
            sq_flash_bwd_dkdv<DK, DV, WARPS, 16, DS, true, false, 0, 1, F16>(q, k, v, d_o, lse, delta, dk, dv, dq_acc,
                                                                             sched, scale_log2, scale, base);
    } else {
        static_assert(PARTS == 2, "dK/dV column slices: 0 (no split), 1 or 2");
        if (z == 0)
            sq_flash_bwd_dkdv<DK, DV, WARPS, 16, DS, false, true, 0, 2, F16>(q, k, v, d_o, lse, delta, dk, dv, dq_acc,
                                                                             sched, scale_log2, scale, base);
        else if (z == 1)
            sq_flash_bwd_dkdv<DK, DV, WARPS, 16, DS, false, true, 1, 2, F16>(q, k, v, d_o, lse, delta, dk, dv, dq_acc,
                                                                             sched, scale_log2, scale, base);
        else if (z == 2)
            sq_flash_bwd_dkdv<DK, DV, WARPS, 16, DS, true, false, 0, 2, F16>(q, k, v, d_o, lse, delta, dk, dv, dq_acc,
                                                                             sched, scale_log2, scale, base);
        else
            sq_flash_bwd_dkdv<DK, DV, WARPS, 16, DS, true, false, 1, 2, F16>(q, k, v, d_o, lse, delta, dk, dv, dq_acc,
                                                                             sched, scale_log2, scale, base);
    }
}

// WARPS warps of 16 keys per dK/dV CTA; PARTS: the split (sq_dkdv_entry; grid z = 1, 2 or 4 CTAs
// per key tile); DS: the dS^T tile in a dO stage (sq_dkdv_smem); DQ_WARPS warps of 16 query rows
// per deterministic dQ CTA over BN-key tiles; DQ_SMEM: 0, or 1 to keep dO in shared memory, 2 to
// keep dO and Q there, 3 to also split dQ's columns over two CTAs (grid z = 2; sq_flash_bwd_dq).
#define SQ_BWD_ENTRIES(DK, DV, WARPS, PARTS, DS, DQ_WARPS, BN, DQ_SMEM, SFX, F16)                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) squid_flash_bwd_dkdv_dk##DK##_dv##DV##_##SFX(     \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned short* d_o,   \
        const float* lse, const float* delta, unsigned short* dk, unsigned short* dv, float* dq_acc,            \
        const int* sched, float scale_log2, float scale) {                                                      \
        __shared__ __align__(128) unsigned short smem[sq_dkdv_smem<DK, DV, WARPS, 16, DS>()];                   \
        sq_dkdv_entry<DK, DV, WARPS, DS, PARTS, F16>(q, k, v, d_o, lse, delta, dk, dv, dq_acc, sched, scale_log2, \
                                                     scale, sq_smem(smem));                                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(DQ_WARPS * 32) squid_flash_bwd_dq_dk##DK##_dv##DV##_##SFX(    \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned short* d_o,   \
        const float* lse, const float* delta, unsigned short* dq, const int* sched, float scale_log2,           \
        float scale) {                                                                                           \
        sq_flash_bwd_dq<DK, DV, DQ_WARPS, BN, (DQ_SMEM >= 1), (DQ_SMEM >= 2), (DQ_SMEM >= 3 ? 2 : 1), F16>(     \
            q, k, v, d_o, lse, delta, dq, sched, scale_log2, scale);                                             \
    }

// dK/dV: four warps (64 keys) where the accumulators and tiles allow, two (32 keys) above; for
// Dk = 192 the dK and dV accumulators together do not fit the registers, so it is SPLIT: grid z
// = 2, CTA z = 0 computes dV and z = 1 dK (and the atomic dQ), each recomputing P and dS.
// Dk = 256: one warp (16 keys) per CTA, whose K and V tiles and two Q/dO stages are exactly the
// 48 KiB of static shared memory (the dS^T tile goes in a dO stage), and four CTAs per key tile
// (dV's and dK's column halves: even one 256-wide f32 accumulator is 128 registers).
// dQ: the forward's key tiles (16 keys for Dk = 192, whose Q fragments fill the registers; its dO
// stays in shared memory); Dk = 256: one warp of 16 query rows per CTA (the host's schedule
// uses that tile height), Q and dO in shared memory, two CTAs per tile (dQ's column halves).
SQ_BWD_ENTRIES(64, 64, 4, 0, false, 4, 64, 0, bf16, false)
SQ_BWD_ENTRIES(64, 64, 4, 0, false, 4, 64, 0, f16, true)
SQ_BWD_ENTRIES(96, 96, 4, 0, false, 4, 32, 0, bf16, false)
SQ_BWD_ENTRIES(96, 96, 4, 0, false, 4, 32, 0, f16, true)
SQ_BWD_ENTRIES(128, 128, 2, 0, false, 4, 32, 0, bf16, false)
SQ_BWD_ENTRIES(128, 128, 2, 0, false, 4, 32, 0, f16, true)
SQ_BWD_ENTRIES(192, 128, 2, 1, false, 4, 16, 1, bf16, false)
SQ_BWD_ENTRIES(192, 128, 2, 1, false, 4, 16, 1, f16, true)
SQ_BWD_ENTRIES(256, 256, 1, 2, true, 1, 16, 3, bf16, false)
SQ_BWD_ENTRIES(256, 256, 1, 2, true, 1, 16, 3, f16, true)

extern "C" __global__ void squid_flash_bwd_pre_bf16(const unsigned short* o, const unsigned short* d_o, float* delta,
                                                    int total_q, int hq, int dv) {
    sq_bwd_pre<false>(o, d_o, delta, total_q, hq, dv);
}

extern "C" __global__ void squid_flash_bwd_pre_f16(const unsigned short* o, const unsigned short* d_o, float* delta,
                                                   int total_q, int hq, int dv) {
    sq_bwd_pre<true>(o, d_o, delta, total_q, hq, dv);
}

extern "C" __global__ void squid_flash_bwd_dq_convert_bf16(const float* acc, unsigned short* dq, long long n,
                                                           float scale) {
    sq_bwd_dq_convert<false>(acc, dq, n, scale);
}

extern "C" __global__ void squid_flash_bwd_dq_convert_f16(const float* acc, unsigned short* dq, long long n,
                                                          float scale) {
    sq_bwd_dq_convert<true>(acc, dq, n, scale);
}
