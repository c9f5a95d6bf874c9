// NSA's compressed branch forward on the tensor cores, with the selection scores in the same
// kernel (launcher in nsa/cuda_compressed.rs).
//
// Layout as nsa/mod.rs: q [total_q, HQ, DK]; k_cmp [total_cmp, HKV, DK], v_cmp [total_cmp, HKV,
// DV] packed per sequence; o [total_q, HQ, DV]; lse [HQ, total_q] (natural log, f32); scores
// [total_q, HKV, stride] f32, zeroed by the launcher. bf16 or f16 storage, every product on
// mma.sync.m16n8k16 with f32 accumulation.
//
// Organised per GQA group as the selected branch (selected.cu): a CTA owns 64 query rows of one
// kv head g, the rows being hc = min(group, 64) heads of each of 64 / hc consecutive tokens, so
// every compressed K/V tile is loaded once for the whole group and all the CTA's tokens, and a
// small group fills the tile with tokens rather than padded heads. Query t (its position in the
// sequence's keys: chunked prefill puts the queries at the end) sees compressed block i when the
// whole block is at or before it: i d + l - 1 <= t.
//
// Two sweeps over the item's compressed key tiles (cp.async double-buffered):
// 1. Q K^T only: each row's max and sum, so its lse;
// 2. Q K^T again, p = exp(s - lse) exactly normalised, o += P V (no rescaling needed), and P
//    (f32) goes to shared memory, where the CTA maps it to selection blocks by the overlap rule
//    (weight of compressed block i in selection block j: the pairs m < l'/d, n < l/d with
//    i = (l'/d) j + m - n) summed over the group's heads, and adds the tile's share to
//    scores[token, g, j]. Scores are written once per tile per (token, j): no T x T/d matrix is
//    stored and no second kernel reads one. The tile's adds to one (token, j) are done by one
//    thread in tile order, so scores are deterministic unless the group is above 64 heads (its
//    head chunks add atomically from several CTAs).
//
// Schedule (one int buffer): a header
//   total hq hkv hc stride block_slc a b
// (a = l'/d, b = l/d) then the items, eight ints each:
//   q_row0 ntok pos0 cmp_base g chunk nkeys -
// (the CTA's first packed query row; its tokens; the first token's position; the sequence's
// first compressed row; kv head; head chunk; compressed blocks the CTA's last token sees).
//
// Shared tiles are swizzled as in dense/flash.cu (16-byte chunk c of row r at c ^ (r & 7)).

#define NC_WARPS 4
#define NC_THREADS (NC_WARPS * 32)
#define NC_BM (16 * NC_WARPS)
#define NC_HEADER 8
#define NC_ITEM 8
#define NC_LN2 0.6931471805599453f

__device__ __forceinline__ unsigned nc_smem(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void nc_cp_async_16(unsigned dst, const void* src, unsigned src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void nc_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void nc_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void nc_ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void nc_ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b for one 16 x 8 x 16 tile (a row-major 16 x 16, b column-major 16 x 8).
template <bool F16>
__device__ __forceinline__ void nc_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
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
__device__ __forceinline__ unsigned nc_pack(float lo, float hi) {
    unsigned r;
    if (F16) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

__device__ __forceinline__ float nc_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float nc_log2(float x) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

template <int C>
__device__ __forceinline__ int nc_swz(int row, int chunk) {
    if (C % 8 == 0) return chunk ^ (row & 7);
    if (C % 4 == 0) return (chunk & ~3) | ((chunk ^ (row >> 1)) & 3);
    return chunk;
}

template <int D>
__device__ __forceinline__ unsigned nc_at(unsigned base, int row, int col) {
    return base + (unsigned)(row * D + nc_swz<D / 8>(row, col >> 3) * 8) * 2u;
}

// Copies rows 0..valid of a [ROWS, D] tile (row r at src + r * stride) into shared memory,
// zero-filling rows valid..ROWS. `fallback` is any valid address of the tensor.
template <int ROWS, int D, int THREADS = NC_THREADS>
__device__ __forceinline__ void nc_load_tile(unsigned base, const unsigned short* src, long long stride, int valid,
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
            nc_cp_async_16(base + (unsigned)(r * D + nc_swz<C>(r, ch) * 8) * 2u, p, ok ? 16u : 0u);
        }
    }
}

// The CTA's 64 (token, head) rows of a [total, HQ, D] tensor into a swizzled [64, D] tile, rows
// past the CTA's tokens or the group's heads zero-filled.
template <int D>
__device__ __forceinline__ void nc_load_rows(unsigned base, const unsigned short* x, long long q_row0, int ntok,
                                             int hc, int head0, int heads_left, int hq) {
    constexpr int C = D / 8;
    constexpr int N = NC_BM * C;
#pragma unroll
    for (int i = 0; i < N / NC_THREADS; ++i) {
        const int c = threadIdx.x + i * NC_THREADS;
        const int r = c / C, ch = c % C;
        const int tok = r / hc, hh = r % hc;
        const bool ok = tok < ntok && hh < heads_left;
        const unsigned short* p = ok ? x + ((q_row0 + tok) * hq + head0 + hh) * D + ch * 8 : x;
        nc_cp_async_16(base + (unsigned)(r * D + nc_swz<C>(r, ch) * 8) * 2u, p, ok ? 16u : 0u);
    }
}

// Q K^T for a warp's 16 rows against BN keys of a swizzled K tile.
template <int DK, int BN, bool F16>
__device__ __forceinline__ void nc_scores(float (&s)[BN / 8][4], const unsigned (&qf)[DK / 16][4], unsigned k_tile,
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
            nc_ldsm_x4(b, nc_at<DK>(k_tile, np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
            nc_mma<F16>(s[2 * np], qf[kk], b[0], b[1]);
            nc_mma<F16>(s[2 * np + 1], qf[kk], b[2], b[3]);
        }
}

// acc += P V for a warp's 16 rows (P from score fragments, V a swizzled [BN, DV] tile).
// With W < DV: only columns col0..col0 + W of the [BN, DV] tile (acc holds W / 8 tiles).
template <int DV, int BN, bool F16, int W = DV>
__device__ __forceinline__ void nc_pv(float (&acc)[W / 8][4], const float (&p)[BN / 8][4], unsigned v_tile,
                                      int lane, int col0 = 0) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        const unsigned a[4] = {nc_pack<F16>(p[2 * kk][0], p[2 * kk][1]), nc_pack<F16>(p[2 * kk][2], p[2 * kk][3]),
                               nc_pack<F16>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               nc_pack<F16>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < W / 16; ++dp) {
            unsigned b[4];
            nc_ldsm_x4_t(b, nc_at<DV>(v_tile, kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                      col0 + dp * 16 + (lane >> 4) * 8));
            nc_mma<F16>(acc[2 * dp], a, b[0], b[1]);
            nc_mma<F16>(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// ---- compressed-branch forward and selection scores --------------------------------------------

template <int DK, int DV, int BN, bool F16>
__device__ __forceinline__ void nc_cmp_fwd(const unsigned short* __restrict__ q,
                                           const unsigned short* __restrict__ k,
                                           const unsigned short* __restrict__ v, unsigned short* __restrict__ o,
                                           float* __restrict__ lse, float* __restrict__ scores,
                                           const int* __restrict__ sched, float scale_log2) {
    constexpr int STAGE = BN * (DK + DV);
    constexpr int ELEMS = (NC_BM * DK > 2 * STAGE) ? NC_BM * DK : 2 * STAGE;
    __shared__ __align__(128) unsigned short smem[ELEMS];
    // The current tile's probabilities, [NC_BM][BN].
    __shared__ float pbuf[NC_BM * BN];
    const unsigned base = nc_smem(smem);

    const int total = sched[0], hq = sched[1], hkv = sched[2], hc = sched[3], stride = sched[4],
              block_slc = sched[5], a = sched[6], b = sched[7];
    const int* it = sched + NC_HEADER + (long long)blockIdx.x * NC_ITEM;
    const int q_row0 = it[0], ntok = it[1], pos0 = it[2], cmp_base = it[3], g = it[4], chunk = it[5],
              nkeys = it[6];
    const int group = hq / hkv, head0 = g * group + chunk * hc, heads_left = group - chunk * hc;
    const int heads_here = min(hc, heads_left);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long k_stride = (long long)hkv * DK, v_stride = (long long)hkv * DV;
    // The compression geometry: l = b d, so block i is visible to position t iff
    // (i + b - 1) d <= t, with d = block_slc / a.
    const int d = block_slc / a;

    nc_load_rows<DK>(base, q, (long long)q_row0, ntok, hc, head0, heads_left, hq);
    nc_commit();
    nc_wait<0>();
    __syncthreads();
    unsigned qf[DK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk)
        nc_ldsm_x4(qf[kk], nc_at<DK>(base, warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    __syncthreads();

    // This thread's two rows: token index in the CTA (-1 past the rows) and visible blocks.
    int tok[2], vis[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int local = warp * 16 + (lane >> 2) + e * 8;
        const bool valid = local / hc < ntok && local % hc < heads_left;
        tok[e] = valid ? local / hc : -1;
        const int t = pos0 + local / hc;
        vis[e] = valid && t + 1 >= b * d ? (t + 1 - b * d) / d + 1 : 0;
    }

    const unsigned short* kg = k + ((long long)cmp_base * hkv + g) * DK;
    const unsigned short* vg = v + ((long long)cmp_base * hkv + g) * DV;
    const int count = (nkeys + BN - 1) / BN;
    auto load = [&](int j, bool with_v) {
        const int n0 = j * BN, keys = min(BN, nkeys - n0);
        const unsigned st = base + (unsigned)((j & 1) * STAGE) * 2u;
        nc_load_tile<BN, DK>(st, kg + n0 * k_stride, k_stride, keys, k);
        if (with_v) nc_load_tile<BN, DV>(st + BN * DK * 2, vg + n0 * v_stride, v_stride, keys, v);
    };
    // Scores s (pre-scaled by scale log2 e) of tile j, -inf where a row does not see the key.
    auto tile_scores = [&](float (&s)[BN / 8][4], int j, unsigned k_tile) {
        nc_scores<DK, BN, F16>(s, qf, k_tile, lane);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j * BN + nt * 8 + (lane & 3) * 2 + (e & 1);
                s[nt][e] = key < vis[e >> 1] ? s[nt][e] * scale_log2 : -INFINITY;
            }
    };

    // Sweep 1: row max and sum.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    if (count > 0) {
        load(0, false);
        nc_commit();
    }
    for (int j = 0; j < count; ++j) {
        if (j + 1 < count) {
            load(j + 1, false);
            nc_commit();
            nc_wait<1>();
        } else {
            nc_wait<0>();
        }
        __syncthreads();
        float s[BN / 8][4];
        tile_scores(s, j, base + (unsigned)((j & 1) * STAGE) * 2u);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float mx = m[e];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * e], s[nt][2 * e + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float ref = mx == -INFINITY ? 0.0f : mx;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) sum += nc_exp2(s[nt][2 * e] - ref) + nc_exp2(s[nt][2 * e + 1] - ref);
            l[e] = l[e] * nc_exp2(m[e] - ref) + sum;
            m[e] = mx;
        }
        __syncthreads();
    }
    // lse in log2 units; +inf for a row that sees nothing (so its p is 0).
    float lse2[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 1);
        l[e] += __shfl_xor_sync(0xffffffffu, l[e], 2);
        lse2[e] = l[e] > 0.0f ? m[e] + nc_log2(l[e]) : INFINITY;
    }

    // Sweep 2: normalised P, o += P V, P mapped to selection blocks.
    float acc[DV / 8][4];
#pragma unroll
    for (int dt = 0; dt < DV / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dt][e] = 0.0f;
    if (count > 0) {
        load(0, true);
        nc_commit();
    }
    for (int j = 0; j < count; ++j) {
        if (j + 1 < count) {
            load(j + 1, true);
            nc_commit();
            nc_wait<1>();
        } else {
            nc_wait<0>();
        }
        __syncthreads();
        const unsigned k_tile = base + (unsigned)((j & 1) * STAGE) * 2u;
        const unsigned v_tile = k_tile + BN * DK * 2;
        float s[BN / 8][4];
        tile_scores(s, j, k_tile);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] = nc_exp2(s[nt][e] - lse2[e >> 1]);
                const int row = warp * 16 + (lane >> 2) + (e >> 1) * 8;
                pbuf[row * BN + nt * 8 + (lane & 3) * 2 + (e & 1)] = s[nt][e];
            }
        nc_pv<DV, BN, F16>(acc, s, v_tile, lane);
        __syncthreads();
        // Selection blocks the tile's keys n0 .. n1 touch: j_sel with a j_sel + a - 1 >= n0 and
        // a j_sel - (b - 1) <= n1 - 1.
        const int n0 = j * BN, n1 = min(n0 + BN, nkeys);
        const int j_lo = n0 / a, nj = (n1 + b - 2) / a - j_lo + 1;
        for (int w = threadIdx.x; w < ntok * nj; w += NC_THREADS) {
            const int tk = w / nj, js = j_lo + w % nj;
            if (js * block_slc > pos0 + tk || js >= stride) continue;
            const int i_lo = max(n0, a * js - b + 1), i_hi = min(n1, a * js + a);
            float sum = 0.0f;
            for (int i = i_lo; i < i_hi; ++i) {
                const int shift = i - a * js;
                const float wgt = (float)(min(shift + b, a) - max(shift, 0));
                float ps = 0.0f;
                for (int hh = 0; hh < heads_here; ++hh) ps += pbuf[(tk * hc + hh) * BN + (i - n0)];
                sum += wgt * ps;
            }
            if (sum != 0.0f) atomicAdd(scores + ((long long)(q_row0 + tk) * hkv + g) * stride + js, sum);
        }
        __syncthreads();
    }

#pragma unroll
    for (int e = 0; e < 2; ++e) {
        if (tok[e] < 0) continue;
        const int local = warp * 16 + (lane >> 2) + e * 8;
        const long long row = (long long)q_row0 + tok[e];
        const int h = head0 + local % hc;
        unsigned* out = reinterpret_cast<unsigned*>(o + (row * hq + h) * DV + (lane & 3) * 2);
#pragma unroll
        for (int dt = 0; dt < DV / 8; ++dt) out[dt * 4] = nc_pack<F16>(acc[dt][2 * e], acc[dt][2 * e + 1]);
        if ((lane & 3) == 0) lse[(long long)h * total + row] = l[e] > 0.0f ? lse2[e] * NC_LN2 : -INFINITY;
    }
}

#define NC_FWD_ENTRY(DK, DV, BN, SFX, F16)                                                                          \
    extern "C" __global__ void __launch_bounds__(NC_THREADS, 1) squid_nsa_cmp_fwd_dk##DK##_dv##DV##_##SFX(             \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* o, float* lse,    \
        float* scores, const int* sched, float scale_log2) {                                                         \
        nc_cmp_fwd<DK, DV, BN, F16>(q, k, v, o, lse, scores, sched, scale_log2);                                     \
    }

// Key tiles as the selected forward's: two K/V stages and the f32 P tile within 48 KiB of
// static shared memory.
NC_FWD_ENTRY(64, 64, 64, bf16, false)
NC_FWD_ENTRY(64, 64, 64, f16, true)
NC_FWD_ENTRY(96, 96, 32, bf16, false)
NC_FWD_ENTRY(96, 96, 32, f16, true)
NC_FWD_ENTRY(128, 128, 32, bf16, false)
NC_FWD_ENTRY(128, 128, 32, f16, true)
NC_FWD_ENTRY(192, 128, 32, bf16, false)
NC_FWD_ENTRY(192, 128, 32, f16, true)
NC_FWD_ENTRY(256, 256, 16, bf16, false)
NC_FWD_ENTRY(256, 256, 16, f16, true)
