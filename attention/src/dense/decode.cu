// Split-KV decode (flash-decoding) over packed or paged K/V, GQA-grouped, with a combine kernel:
// the device half of squid-attention's `dense::decode` / `decode_paged`.
//
// Work: the launcher builds a list of work items on the host, one per (sequence, kv head g,
// chunk of up to 16 query rows, split of the key tiles); items whose rows see no key are not
// launched (their o = 0 and lse = -inf are written before). The rows of a (sequence, g) are the
// group's query heads times the sequence's new tokens, ordered [head in group][token] as the CPU
// decode orders them, so every K/V tile is read from global memory once for all query heads of
// its group (and all new tokens of the sequence).
//
// Why FMA and not mma.sync: a decode step has group * new_tokens rows (1..16 per item: 1 for
// MHA, 4-8 for common GQA), so an m16n8k16 tile would be mostly padding and the step is bound by
// reading K/V (each element read once, used for `rows` multiply-adds: at most 16, below the ~20
// FMAs per bf16 element at which an H100's FP32 FMA rate, not its memory, would bind). One CTA
// of four warps per item, 32-key tiles:
//   1. the tile's row offsets are computed (packed: cu_k + pos; paged: the page table), then K
//      and V rows are copied to shared memory as stored (4-byte words, zero past the sequence);
//   2. scores: warp w takes rows w, w+4, w+8, w+12, lane j key j; each dot product runs over d in
//      order (Q and K as stored, f32 multiply-adds), then masks (causal bottom-right, window)
//      and the online softmax in base 2 (scale * log2 e folded in): row max and row sum by xor
//      butterflies (every lane ends with the same bits);
//   3. O: thread t owns columns t and t + 128 of every row: acc = acc * alpha + sum_j P[r][j] *
//      V[j][c], j in order.
// Each row's arithmetic is fixed by its own query, its visible keys and the 32-key tile grid
// (aligned at key 0 of the sequence): a tile a row does not see is skipped for that row exactly
// (alpha = 1, P = 0), so what else is in the item, the batch or the chunk changes no bit. With one
// split (the batch-invariant mode) the item writes o and lse itself; with several, each split
// writes (m, l, unnormalised o) in f32 and `squid_decode_combine_*` merges the splits in split
// order.
//
// Shared memory (dynamic): K [32][ks] and V [32][vs] and Q [16][ks] as stored (16-bit), with
// ks = dk + 2 (dk even) so lanes reading one word each of 32 different keys hit 32 banks; then
// P [16][32], alpha, m, l as f32; row offsets as 64-bit. 43.8 KiB at dk = dv = 256.
//
// meta (int32): a header, then per sequence (q0, tq, kbase, tk), then the work items (seq, g,
// row0, nrows, tile0, tile1, slot, 0) and the combine items (seq, g, row0, nrows, slot0, nsplit,
// 0, 0). kbase: the sequence's first key row (packed) or the offset of its page table (paged).

#define SQUID_DEC_BK 32
#define SQUID_DEC_RB 16
#define SQUID_DEC_THREADS 128
// At most 128 registers a thread, so four CTAs (16 warps) fit an SM's register file.
#define SQUID_DEC_MIN_BLOCKS 4
// Splits per combine item at most (the launcher caps the split count at this).
#define SQUID_DEC_MAX_SPLITS 64

// Header fields.
#define SQUID_DEC_HQ 0
#define SQUID_DEC_HKV 1
#define SQUID_DEC_DK 2
#define SQUID_DEC_DV 3
#define SQUID_DEC_TOTAL_Q 4
#define SQUID_DEC_CAUSAL 5
#define SQUID_DEC_WINDOW 6
#define SQUID_DEC_PAGE_SIZE 7
#define SQUID_DEC_GROUP 8
#define SQUID_DEC_SEQS_AT 9
#define SQUID_DEC_ITEMS_AT 10
#define SQUID_DEC_COMBINE_AT 11
#define SQUID_DEC_HEADER 12

__device__ __forceinline__ void squid_dec_unpack(unsigned w, squid_bf16, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}

__device__ __forceinline__ void squid_dec_unpack(unsigned w, squid_f16, float& lo, float& hi) {
    squid_f16 a, b;
    a.bits = (unsigned short)(w & 0xffffu);
    b.bits = (unsigned short)(w >> 16);
    lo = squid_to_f32(a);
    hi = squid_to_f32(b);
}

__device__ __forceinline__ float squid_dec_elem(const unsigned short* p, squid_bf16) {
    squid_bf16 x;
    x.bits = *p;
    return squid_to_f32(x);
}

__device__ __forceinline__ float squid_dec_elem(const unsigned short* p, squid_f16) {
    squid_f16 x;
    x.bits = *p;
    return squid_to_f32(x);
}

// Even dims get 2 elements of padding (odd word stride: conflict-free column reads), odd ones 1.
__device__ __forceinline__ int squid_dec_stride(int d) { return (d & 1) ? d + 1 : d + 2; }

// Copies `d` elements of each of the tile's keys from global (row starts in `off`, -1 for a key
// past the sequence: zeros) into shared rows of `stride` elements.
__device__ __forceinline__ void squid_dec_load_tile(unsigned short* __restrict__ dst, int stride,
                                                    const unsigned short* __restrict__ src,
                                                    const long long* __restrict__ off, int d) {
    if ((d & 1) == 0) {
        const int words = d >> 1;
        for (int e = threadIdx.x; e < SQUID_DEC_BK * words; e += SQUID_DEC_THREADS) {
            const int j = e / words, w = e - j * words;
            const long long o = off[j];
            const unsigned val = o < 0 ? 0u : reinterpret_cast<const unsigned*>(src + o)[w];
            reinterpret_cast<unsigned*>(dst + j * stride)[w] = val;
        }
    } else {
        for (int e = threadIdx.x; e < SQUID_DEC_BK * d; e += SQUID_DEC_THREADS) {
            const int j = e / d, c = e - j * d;
            const long long o = off[j];
            dst[j * stride + c] = o < 0 ? (unsigned short)0 : src[o + c];
        }
    }
}

// Keys [lo, hi) that query i of a sequence with tq queries and tk keys sees (DenseConfig::key_range).
__device__ __forceinline__ void squid_dec_key_range(int i, int tq, int tk, int causal, int window, int& lo, int& hi) {
    const long long p = (long long)i + tk - tq;
    long long h = causal ? p + 1 : (long long)tk;
    h = h < 0 ? 0 : (h > tk ? tk : h);
    long long l = 0;
    if (window > 0) {
        l = p - window + 1;
        l = l < 0 ? 0 : (l > tk ? tk : l);
    }
    lo = (int)l;
    hi = (int)(h > l ? h : l);
}

template <typename T, int NR>
__device__ __forceinline__ void squid_dec_pv(float (&acc)[SQUID_DEC_RB][2], const float* __restrict__ ps,
                                             const float* __restrict__ alpha, const unsigned short* __restrict__ vs,
                                             int vstride, int c0, int c1, int dv) {
    const bool has0 = c0 < dv, has1 = c1 < dv;
#pragma unroll
    for (int r = 0; r < NR; ++r) {
        acc[r][0] *= alpha[r];
        acc[r][1] *= alpha[r];
    }
#pragma unroll 2
    for (int j = 0; j < SQUID_DEC_BK; ++j) {
        const float v0 = has0 ? squid_dec_elem(vs + j * vstride + c0, T()) : 0.0f;
        const float v1 = has1 ? squid_dec_elem(vs + j * vstride + c1, T()) : 0.0f;
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const float p = ps[r * SQUID_DEC_BK + j];
            acc[r][0] = fmaf(p, v0, acc[r][0]);
            acc[r][1] = fmaf(p, v1, acc[r][1]);
        }
    }
}

template <typename T, bool PAGED>
__device__ __forceinline__ void squid_decode_split(const int* __restrict__ meta, const T* __restrict__ q_in,
                                                   const T* __restrict__ k_in, const T* __restrict__ v_in,
                                                   const unsigned* __restrict__ page_table, T* __restrict__ o,
                                                   float* __restrict__ lse, float* __restrict__ part_o,
                                                   float* __restrict__ part_ml, float scale_log2) {
    extern __shared__ __align__(16) unsigned char squid_dec_smem[];
    const unsigned short* q = reinterpret_cast<const unsigned short*>(q_in);
    const unsigned short* k = reinterpret_cast<const unsigned short*>(k_in);
    const unsigned short* v = reinterpret_cast<const unsigned short*>(v_in);
    const int hq = meta[SQUID_DEC_HQ], hkv = meta[SQUID_DEC_HKV], dk = meta[SQUID_DEC_DK], dv = meta[SQUID_DEC_DV];
    const int total_q = meta[SQUID_DEC_TOTAL_Q], causal = meta[SQUID_DEC_CAUSAL], window = meta[SQUID_DEC_WINDOW];
    const int page_size = meta[SQUID_DEC_PAGE_SIZE], group = meta[SQUID_DEC_GROUP];
    const int* item = meta + meta[SQUID_DEC_ITEMS_AT] + 8 * (long long)blockIdx.x;
    const int seq = item[0], g = item[1], row0 = item[2], nrows = item[3], tile0 = item[4], tile1 = item[5];
    const int slot = item[6];
    const int* sq = meta + meta[SQUID_DEC_SEQS_AT] + 4 * seq;
    const int q0 = sq[0], tq = sq[1], kbase = sq[2], tk = sq[3];

    const int ks = squid_dec_stride(dk), vst = squid_dec_stride(dv);
    unsigned short* kt = reinterpret_cast<unsigned short*>(squid_dec_smem);
    unsigned short* vt = kt + SQUID_DEC_BK * ks;
    unsigned short* qs = vt + SQUID_DEC_BK * vst;
    float* ps = reinterpret_cast<float*>(qs + SQUID_DEC_RB * ks);
    float* alpha = ps + SQUID_DEC_RB * SQUID_DEC_BK;
    float* m_s = alpha + SQUID_DEC_RB;
    float* l_s = m_s + SQUID_DEC_RB;
    long long* koff = reinterpret_cast<long long*>(l_s + SQUID_DEC_RB);  // 8-byte aligned (every part above is)
    long long* voff = koff + SQUID_DEC_BK;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // The item's query rows (as stored), rows past nrows zero; P and alpha of those rows stay 0, 1.
    for (int e = tid; e < SQUID_DEC_RB * dk; e += SQUID_DEC_THREADS) {
        const int r = e / dk, c = e - r * dk;
        unsigned short val = 0;
        if (r < nrows) {
            const int row = row0 + r, hh = row / tq, i = row - hh * tq;
            val = q[((long long)(q0 + i) * hq + g * group + hh) * dk + c];
        }
        qs[r * ks + c] = val;
    }
    for (int e = tid; e < SQUID_DEC_RB * SQUID_DEC_BK; e += SQUID_DEC_THREADS) ps[e] = 0.0f;
    if (tid < SQUID_DEC_RB) alpha[tid] = 1.0f;

    // Warp w's rows: w + 4 i. Their key ranges and running (max, sum), in base 2.
    int lo[4], hi[4];
    float m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = warp + 4 * i;
        lo[i] = 0;
        hi[i] = 0;
        if (r < nrows) {
            const int row = row0 + r, hh = row / tq;
            squid_dec_key_range(row - hh * tq, tq, tk, causal, window, lo[i], hi[i]);
        }
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }

    float acc[SQUID_DEC_RB][2];
#pragma unroll
    for (int r = 0; r < SQUID_DEC_RB; ++r) acc[r][0] = acc[r][1] = 0.0f;
    const int c0 = tid, c1 = tid + SQUID_DEC_THREADS;

    for (int tile = tile0; tile < tile1; ++tile) {
        const int kstart = tile * SQUID_DEC_BK;
        if (tid < SQUID_DEC_BK) {
            const int pos = kstart + tid;
            long long ko = -1, vo = -1;
            if (pos < tk) {
                long long token;
                if (PAGED) {
                    const long long page = page_table[kbase + pos / page_size];
                    token = page * page_size + pos % page_size;
                } else {
                    token = (long long)kbase + pos;
                }
                ko = (token * hkv + g) * dk;
                vo = (token * hkv + g) * dv;
            }
            koff[tid] = ko;
            voff[tid] = vo;
        }
        __syncthreads();  // offsets ready; the previous tile's P, alpha and V are no longer read
        squid_dec_load_tile(kt, ks, k, koff, dk);
        squid_dec_load_tile(vt, vst, v, voff, dv);
        __syncthreads();

        // Scores, masks and the online softmax, one row per warp at a time.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = warp + 4 * i;
            if (r >= nrows) break;
            const int pos = kstart + lane;
            const bool visible = pos >= lo[i] && pos < hi[i];
            float s = -INFINITY;
            if (visible) {
                const unsigned short* qr = qs + r * ks;
                const unsigned short* kr = kt + lane * ks;
                float dot = 0.0f;
                int d = 0;
                for (; d + 1 < dk; d += 2) {
                    const unsigned qw = *reinterpret_cast<const unsigned*>(qr + d);
                    const unsigned kw = *reinterpret_cast<const unsigned*>(kr + d);
                    float qa, qb, ka, kb;
                    squid_dec_unpack(qw, T(), qa, qb);
                    squid_dec_unpack(kw, T(), ka, kb);
                    dot = fmaf(qa, ka, dot);
                    dot = fmaf(qb, kb, dot);
                }
                if (d < dk) {
                    dot = fmaf(squid_dec_elem(qr + d, T()), squid_dec_elem(kr + d, T()), dot);
                }
                s = dot * scale_log2;
            }
            float tmax = s;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
            float p = 0.0f, a = 1.0f;
            if (tmax != -INFINITY) {  // warp-uniform: a tile the row does not see changes nothing
                const float m_new = fmaxf(m[i], tmax);
                a = exp2f(m[i] - m_new);
                p = visible ? exp2f(s - m_new) : 0.0f;
                float sum = p;
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                l[i] = l[i] * a + sum;
                m[i] = m_new;
            }
            ps[r * SQUID_DEC_BK + lane] = p;
            if (lane == 0) alpha[r] = a;
        }
        __syncthreads();

        if (nrows <= 1) {
            squid_dec_pv<T, 1>(acc, ps, alpha, vt, vst, c0, c1, dv);
        } else if (nrows <= 2) {
            squid_dec_pv<T, 2>(acc, ps, alpha, vt, vst, c0, c1, dv);
        } else if (nrows <= 4) {
            squid_dec_pv<T, 4>(acc, ps, alpha, vt, vst, c0, c1, dv);
        } else if (nrows <= 8) {
            squid_dec_pv<T, 8>(acc, ps, alpha, vt, vst, c0, c1, dv);
        } else {
            squid_dec_pv<T, 16>(acc, ps, alpha, vt, vst, c0, c1, dv);
        }
    }

    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = warp + 4 * i;
            if (r < nrows) {
                m_s[r] = m[i];
                l_s[r] = l[i];
            }
        }
    }
    __syncthreads();

#pragma unroll
    for (int r = 0; r < SQUID_DEC_RB; ++r) {
        if (r >= nrows) break;
        const float mr = m_s[r], lr = l_s[r];
        if (slot < 0) {
            const int row = row0 + r, hh = row / tq, i = row - hh * tq;
            const int head = g * group + hh;
            const long long orow = ((long long)(q0 + i) * hq + head) * dv;
            const bool seen = lr > 0.0f;
            if (c0 < dv) o[orow + c0] = squid_from_f32<T>(seen ? __fdiv_rn(acc[r][0], lr) : 0.0f);
            if (c1 < dv) o[orow + c1] = squid_from_f32<T>(seen ? __fdiv_rn(acc[r][1], lr) : 0.0f);
            if (tid == 0) lse[(long long)head * total_q + q0 + i] = seen ? (mr + log2f(lr)) * 0.69314718055994531f : -INFINITY;
        } else {
            const long long prow = (long long)slot * SQUID_DEC_RB + r;
            if (c0 < dv) part_o[prow * dv + c0] = acc[r][0];
            if (c1 < dv) part_o[prow * dv + c1] = acc[r][1];
            if (tid == 0) {
                part_ml[2 * prow] = mr;
                part_ml[2 * prow + 1] = lr;
            }
        }
    }
}

// The combine entries say "at least one CTA an SM" explicitly: with only the thread bound, ptxas
// 13 at sm_90 held them to 40 registers and spilled 8 bytes (issue 15); with it every toolchain
// and arch assembles them without spills (66-96 registers; the kernel is bound by reading the
// partial results, not by occupancy).
//
// Merges the splits of one (sequence, kv head, row chunk) in split order: o = sum_s o_s 2^(m_s - M)
// / sum_s l_s 2^(m_s - M), lse = (M + log2 L) ln 2. One CTA of 128 threads per combine item; per
// row, warp 0 finds M and the splits' weights 2^(m_s - M) once (in shared memory), then every
// thread sums its columns in split order. (Recomputing the weights per column, as an earlier
// version did, made NVRTC 13 spill at sm_90.)
template <typename T>
__device__ __forceinline__ void squid_decode_combine(const int* __restrict__ meta, const float* __restrict__ part_o,
                                                     const float* __restrict__ part_ml, T* __restrict__ o,
                                                     float* __restrict__ lse) {
    __shared__ float weight[SQUID_DEC_MAX_SPLITS];
    __shared__ float total_s;
    const int hq = meta[SQUID_DEC_HQ], dv = meta[SQUID_DEC_DV], total_q = meta[SQUID_DEC_TOTAL_Q];
    const int group = meta[SQUID_DEC_GROUP];
    const int* item = meta + meta[SQUID_DEC_COMBINE_AT] + 8 * (long long)blockIdx.x;
    const int seq = item[0], g = item[1], row0 = item[2], nrows = item[3], slot0 = item[4], nsplit = item[5];
    const int* sq = meta + meta[SQUID_DEC_SEQS_AT] + 4 * seq;
    const int q0 = sq[0], tq = sq[1];
    for (int r = 0; r < nrows; ++r) {
        if (threadIdx.x < 32) {
            float mx = -INFINITY;
            for (int s = threadIdx.x; s < nsplit; s += 32)
                mx = fmaxf(mx, part_ml[2 * ((long long)(slot0 + s) * SQUID_DEC_RB + r)]);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            for (int s = threadIdx.x; s < nsplit; s += 32) {
                const float ms = part_ml[2 * ((long long)(slot0 + s) * SQUID_DEC_RB + r)];
                weight[s] = ms != -INFINITY ? exp2f(ms - mx) : 0.0f;
            }
            __syncwarp();
            if (threadIdx.x == 0) {
                float total = 0.0f;
                for (int s = 0; s < nsplit; ++s)
                    total = fmaf(part_ml[2 * ((long long)(slot0 + s) * SQUID_DEC_RB + r) + 1], weight[s], total);
                total_s = total;
                const int row = row0 + r, hh = row / tq, i = row - hh * tq;
                lse[(long long)(g * group + hh) * total_q + q0 + i] =
                    total > 0.0f ? (mx + log2f(total)) * 0.69314718055994531f : -INFINITY;
            }
        }
        __syncthreads();
        const float total = total_s;
        const int row = row0 + r, hh = row / tq, i = row - hh * tq;
        const long long orow = ((long long)(q0 + i) * hq + g * group + hh) * dv;
        const float* po = part_o + (long long)slot0 * SQUID_DEC_RB * dv + (long long)r * dv;
        for (int c = threadIdx.x; c < dv; c += blockDim.x) {
            float sum = 0.0f;
            for (int s = 0; s < nsplit; ++s) sum = fmaf(po[(long long)s * SQUID_DEC_RB * dv + c], weight[s], sum);
            o[orow + c] = squid_from_f32<T>(total > 0.0f ? __fdiv_rn(sum, total) : 0.0f);
        }
        __syncthreads();  // weight and total_s are rewritten for the next row
    }
}

extern "C" __global__ void __launch_bounds__(SQUID_DEC_THREADS, SQUID_DEC_MIN_BLOCKS)
    squid_decode_bf16(const int* __restrict__ meta, const squid_bf16* __restrict__ q, const squid_bf16* __restrict__ k,
                      const squid_bf16* __restrict__ v, const unsigned* __restrict__ page_table,
                      squid_bf16* __restrict__ o, float* __restrict__ lse, float* __restrict__ part_o,
                      float* __restrict__ part_ml, float scale_log2) {
    squid_decode_split<squid_bf16, false>(meta, q, k, v, page_table, o, lse, part_o, part_ml, scale_log2);
}

extern "C" __global__ void __launch_bounds__(SQUID_DEC_THREADS, SQUID_DEC_MIN_BLOCKS)
    squid_decode_f16(const int* __restrict__ meta, const squid_f16* __restrict__ q, const squid_f16* __restrict__ k,
                     const squid_f16* __restrict__ v, const unsigned* __restrict__ page_table, squid_f16* __restrict__ o,
                     float* __restrict__ lse, float* __restrict__ part_o, float* __restrict__ part_ml,
                     float scale_log2) {
    squid_decode_split<squid_f16, false>(meta, q, k, v, page_table, o, lse, part_o, part_ml, scale_log2);
}

extern "C" __global__ void __launch_bounds__(SQUID_DEC_THREADS, SQUID_DEC_MIN_BLOCKS)
    squid_decode_paged_bf16(const int* __restrict__ meta, const squid_bf16* __restrict__ q,
                            const squid_bf16* __restrict__ k, const squid_bf16* __restrict__ v,
                            const unsigned* __restrict__ page_table, squid_bf16* __restrict__ o,
                            float* __restrict__ lse, float* __restrict__ part_o, float* __restrict__ part_ml,
                            float scale_log2) {
    squid_decode_split<squid_bf16, true>(meta, q, k, v, page_table, o, lse, part_o, part_ml, scale_log2);
}

extern "C" __global__ void __launch_bounds__(SQUID_DEC_THREADS, SQUID_DEC_MIN_BLOCKS)
    squid_decode_paged_f16(const int* __restrict__ meta, const squid_f16* __restrict__ q,
                           const squid_f16* __restrict__ k, const squid_f16* __restrict__ v,
                           const unsigned* __restrict__ page_table, squid_f16* __restrict__ o,
                           float* __restrict__ lse, float* __restrict__ part_o, float* __restrict__ part_ml,
                           float scale_log2) {
    squid_decode_split<squid_f16, true>(meta, q, k, v, page_table, o, lse, part_o, part_ml, scale_log2);
}

extern "C" __global__ void __launch_bounds__(SQUID_DEC_THREADS, 1)
    squid_decode_combine_bf16(const int* __restrict__ meta, const float* __restrict__ part_o,
                              const float* __restrict__ part_ml, squid_bf16* __restrict__ o,
                              float* __restrict__ lse) {
    squid_decode_combine<squid_bf16>(meta, part_o, part_ml, o, lse);
}

extern "C" __global__ void __launch_bounds__(SQUID_DEC_THREADS, 1)
    squid_decode_combine_f16(const int* __restrict__ meta, const float* __restrict__ part_o,
                             const float* __restrict__ part_ml, squid_f16* __restrict__ o, float* __restrict__ lse) {
    squid_decode_combine<squid_f16>(meta, part_o, part_ml, o, lse);
}

// ---- helpers of the launchers that write into the caller's memory --------------------------
//
// Outputs are the caller's (views of its buffers), so the rows no work item writes (queries that
// see no key: o = 0, lse = -inf) and the f32/16-bit accumulators that start at zero are filled
// here rather than by an allocation. Grid-stride, one element a thread and step.

extern "C" __global__ void __launch_bounds__(256) squid_attn_fill_b16(unsigned short* __restrict__ x, long long n,
                                                                      unsigned bits) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = (unsigned short)bits;
}

extern "C" __global__ void __launch_bounds__(256) squid_attn_fill_f32(float* __restrict__ x, long long n, float value) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = value;
}

// Packs paged K or V rows: dst row t (`row` 16-bit elements) = src row rows[t] (a pool row:
// page * page_size + position in page). The batch-invariant paged decode reads its keys through
// this copy so that it can run the prefill forward kernel (and get its bits).
extern "C" __global__ void __launch_bounds__(256) squid_decode_gather_rows_b16(const unsigned short* __restrict__ src,
                                                                               const unsigned* __restrict__ rows,
                                                                               unsigned short* __restrict__ dst,
                                                                               long long tokens, int row) {
    const long long n = tokens * row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / row, c = i - t * row;
        dst[i] = src[(long long)rows[t] * row + c];
    }
}
