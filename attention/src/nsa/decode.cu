// NSA decode on the device: one step of each sequence's newest token against a device cache,
// the device half of squid-attention's `nsa::NsaCache` (launchers in nsa/cuda_decode.rs).
//
// Cache (all in the storage type): k [seqs][capacity][HKV][Dk], v [seqs][capacity][HKV][Dv]
// (and the window branch's own pair when it has one); k_cmp [seqs][max_blocks][HKV][Dk],
// v_cmp [seqs][max_blocks][HKV][Dv].
//
// `squid_nsa_dec_append_*`: copies new rows into their cache slots (the launcher's table gives
// each new row its destination row), one thread per element, grid-stride.
// `squid_nsa_dec_compress_*`: the compressed blocks the new tokens complete, out[b][c] = (sum
// over t < l of x[first[b] + t][c]) * inv_l with separate f32 roundings, in token order: the
// CPU cache's compression bit for bit (table: per block its destination row and first source row).
//
// `squid_nsa_dec_step_*`: one CTA of four warps per (sequence, kv head g); the group's query
// heads are taken 16 at a time (one chunk for groups up to 16), so every K/V row a branch reads
// is loaded from global memory once for all heads of the chunk (once per group for groups up to
// 16). Phases:
//   1. per chunk, the compressed branch over blocks 0 .. nc: scores written to scratch, online
//      softmax; the gated output g_cmp o_cmp to f32 scratch; then each block's probabilities,
//      summed over the group's heads in head order, into psum (scratch);
//   2. the selection-block importance by the overlap rule (as the CPU `Chooser`), then top-n by
//      warp 0: forced initial and local blocks, the rest by (f32 total order, lower index),
//      k rounds of a warp-wide maximum below the previous one (as select.cu, 32 lanes);
//      written ascending, NO_BLOCK padded, to `indices` (which phase 3 reads back);
//   3. per chunk, the selected branch over the chosen blocks up to t and the window branch over
//      the last w keys, each its own online softmax, added with its gate to g_cmp o_cmp; o stored.
// Every branch walks 32-key tiles: K rows to shared memory (as stored), scores by warp w for
// heads w, w + 4, w + 8, w + 12 with lane j on key j (dot product over d in order, f32 FMA),
// online softmax by xor butterflies, then V rows into the same shared tile and thread t owns
// columns t and t + 128 of every head: acc = acc * alpha + sum_j P[h][j] V[j][c].
// FMA, not mma.sync, for the dense decode kernel's reason (decode.cu): at most 16 rows per CTA,
// bound by reading K/V once.
//
// Shared memory (static): Q chunk [16][256] f32, the K/V tile [32][258] as stored (odd word
// stride: the 32 lanes reading one key each hit 32 banks), P [16][32] and per-head m, l, alpha,
// gate: 35.1 KiB. Dk, Dv <= 256 (the launcher refuses larger).
//
// meta (int32): header [hq, hkv, dk, dv, capacity, max_blocks, l, d, l', n, w, num_initial,
// num_local, separate_win, max_slc, softmax scale as f32 bits, sb], then per sequence (len, blocks).
// Scratch (f32) per CTA: scores [16][sb], psum [sb], slc [max_slc], o_cmp [group][dv], with sb and
// max_slc the step's most compressed and selection blocks of a sequence.

#define SQUID_NSD_THREADS 128
#define SQUID_NSD_BK 32
#define SQUID_NSD_HC 16
#define SQUID_NSD_DMAX 256
#define SQUID_NSD_KS 258
#define SQUID_NSD_HEADER 17

template <typename T>
__device__ __forceinline__ void squid_nsd_append(const T* __restrict__ src, T* __restrict__ dst,
                                                 const long long* __restrict__ dst_row, long long n, int row) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long r = e / row;
        const int c = (int)(e - r * row);
        dst[dst_row[r] * row + c] = src[e];
    }
}

template <typename T>
__device__ __forceinline__ void squid_nsd_compress(const T* __restrict__ x, T* __restrict__ out,
                                                   const long long* __restrict__ table, long long n, int row, int l,
                                                   float inv_l) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long b = e / row;
        const int c = (int)(e - b * row);
        const T* src = x + table[2 * b + 1] * row + c;
        float acc = 0.0f;
        for (int t = 0; t < l; ++t) {
            acc = __fadd_rn(acc, squid_to_f32(src[(long long)t * row]));
        }
        out[table[2 * b] * row + c] = squid_from_f32<T>(__fmul_rn(acc, inv_l));
    }
}

// Shared state of a step CTA.
template <typename T>
struct SquidNsdShared {
    float q[SQUID_NSD_HC][SQUID_NSD_DMAX];
    T kv[SQUID_NSD_BK][SQUID_NSD_KS];
    float p[SQUID_NSD_HC][SQUID_NSD_BK];
    float m[SQUID_NSD_HC];
    float l[SQUID_NSD_HC];
    float alpha[SQUID_NSD_HC];
    float gate[SQUID_NSD_HC];
};

__device__ __forceinline__ float squid_nsd_warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    }
    return x;
}

__device__ __forceinline__ float squid_nsd_warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, o);
    }
    return x;
}

// Resets the online softmax of a branch.
template <typename T>
__device__ __forceinline__ void squid_nsd_reset(SquidNsdShared<T>& sh, float (&acc)[SQUID_NSD_HC][2]) {
    if (threadIdx.x < SQUID_NSD_HC) {
        sh.m[threadIdx.x] = -INFINITY;
        sh.l[threadIdx.x] = 0.0f;
    }
#pragma unroll
    for (int h = 0; h < SQUID_NSD_HC; ++h) {
        acc[h][0] = 0.0f;
        acc[h][1] = 0.0f;
    }
}

// The keys start .. end (rows of kbase / vbase, `stride` elements apart) into a branch's online
// softmax for the chunk's hc heads. With `scores`, each head's raw score of key c is also
// written to scores[h * sstride + c].
template <typename T>
__device__ __forceinline__ void squid_nsd_attend(SquidNsdShared<T>& sh, float (&acc)[SQUID_NSD_HC][2], const T* __restrict__ kbase,
                                 const T* __restrict__ vbase, long long kstride, long long vstride, int start,
                                 int end, int hc, int dk, int dv, float* __restrict__ scores, long long sstride) {
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    for (int k0 = start; k0 < end; k0 += SQUID_NSD_BK) {
        const int nk = min(SQUID_NSD_BK, end - k0);
        __syncthreads();
        for (int e = tid; e < nk * dk; e += SQUID_NSD_THREADS) {
            const int r = e / dk;
            const int c = e - r * dk;
            sh.kv[r][c] = kbase[(long long)(k0 + r) * kstride + c];
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < SQUID_NSD_HC / 4; ++i) {
            const int h = warp + 4 * i;
            if (h < hc) {
                float s = -INFINITY;
                if (lane < nk) {
                    float dot = 0.0f;
                    for (int d = 0; d < dk; ++d) {
                        dot = fmaf(sh.q[h][d], squid_to_f32(sh.kv[lane][d]), dot);
                    }
                    s = dot;
                    if (scores != nullptr) {
                        scores[(long long)h * sstride + k0 + lane] = s;
                    }
                }
                const float m_old = sh.m[h];
                const float m_new = fmaxf(m_old, squid_nsd_warp_max(s));
                const float p = lane < nk ? expf(s - m_new) : 0.0f;
                const float sum = squid_nsd_warp_sum(p);
                const float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                sh.p[h][lane] = p;
                __syncwarp();
                if (lane == 0) {
                    sh.l[h] = sh.l[h] * alpha + sum;
                    sh.m[h] = m_new;
                    sh.alpha[h] = alpha;
                }
            }
        }
        __syncthreads();
        for (int e = tid; e < nk * dv; e += SQUID_NSD_THREADS) {
            const int r = e / dv;
            const int c = e - r * dv;
            sh.kv[r][c] = vbase[(long long)(k0 + r) * vstride + c];
        }
        __syncthreads();
        const int c0 = tid;
        const int c1 = tid + SQUID_NSD_THREADS;
#pragma unroll
        for (int h = 0; h < SQUID_NSD_HC; ++h) {
            if (h < hc) {
                const float a = sh.alpha[h];
                float x0 = acc[h][0] * a;
                float x1 = acc[h][1] * a;
                for (int j = 0; j < nk; ++j) {
                    const float p = sh.p[h][j];
                    if (c0 < dv) {
                        x0 = fmaf(p, squid_to_f32(sh.kv[j][c0]), x0);
                    }
                    if (c1 < dv) {
                        x1 = fmaf(p, squid_to_f32(sh.kv[j][c1]), x1);
                    }
                }
                acc[h][0] = x0;
                acc[h][1] = x1;
            }
        }
    }
    __syncthreads();
}

// Adds gate[h] * acc / l (0 where the branch saw no key) into the chunk's f32 rows of `out`
// (`[hc][dv]`; each thread its own columns, so no other thread touches them).
template <typename T>
__device__ __forceinline__ void squid_nsd_finish(const SquidNsdShared<T>& sh, const float (&acc)[SQUID_NSD_HC][2],
                                                 float* __restrict__ out, int hc, int dv) {
    __syncthreads();
    const int c0 = threadIdx.x;
    const int c1 = threadIdx.x + SQUID_NSD_THREADS;
#pragma unroll
    for (int h = 0; h < SQUID_NSD_HC; ++h) {
        if (h < hc) {
            const float l = sh.l[h];
            const float f = l > 0.0f ? sh.gate[h] / l : 0.0f;
            if (c0 < dv) {
                out[(long long)h * dv + c0] = fmaf(acc[h][0], f, out[(long long)h * dv + c0]);
            }
            if (c1 < dv) {
                out[(long long)h * dv + c1] = fmaf(acc[h][1], f, out[(long long)h * dv + c1]);
            }
        }
    }
}

// Loads the chunk's queries (scaled, f32) and its gates of branch b.
template <typename T>
__device__ __forceinline__ void squid_nsd_load_q(SquidNsdShared<T>& sh, const T* __restrict__ q, int head0, int hc,
                                                 int dk, float scale) {
    __syncthreads();
    for (int e = threadIdx.x; e < hc * dk; e += SQUID_NSD_THREADS) {
        const int h = e / dk;
        const int d = e - h * dk;
        sh.q[h][d] = squid_to_f32(q[(long long)(head0 + h) * dk + d]) * scale;
    }
}

template <typename T>
__device__ __forceinline__ void squid_nsd_load_gate(SquidNsdShared<T>& sh, const T* __restrict__ gates, int head0,
                                                    int hc, int b) {
    __syncthreads();
    if (threadIdx.x < hc) {
        sh.gate[threadIdx.x] = squid_to_f32(gates[(long long)(head0 + threadIdx.x) * 3 + b]);
    }
    __syncthreads();
}

__device__ __forceinline__ unsigned long long squid_nsd_rank_key(float s, unsigned j) {
    unsigned b = __float_as_uint(s);
    unsigned k = b ^ ((unsigned)(((int)b) >> 31) | 0x80000000u);
    return ((unsigned long long)k << 32) | (unsigned long long)(~j);
}

__device__ __forceinline__ unsigned long long squid_nsd_warp_max_u64(unsigned long long x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long y = __shfl_xor_sync(0xffffffffu, x, o);
        x = y > x ? y : x;
    }
    return x;
}

template <typename T>
__device__ __forceinline__ void squid_nsd_step(const T* __restrict__ q, const T* __restrict__ gates,
                                               const T* __restrict__ k, const T* __restrict__ v,
                                               const T* __restrict__ kw, const T* __restrict__ vw,
                                               const T* __restrict__ kc, const T* __restrict__ vc, T* __restrict__ o,
                                               unsigned* __restrict__ indices, float* __restrict__ scratch,
                                               const int* __restrict__ meta) {
    __shared__ SquidNsdShared<T> sh;
    const int hq = meta[0], hkv = meta[1], dk = meta[2], dv = meta[3], capacity = meta[4], max_blocks = meta[5];
    const int lc = meta[6], dc = meta[7], ls = meta[8], n = meta[9], w = meta[10];
    const int num_initial = meta[11], num_local = meta[12], separate = meta[13], max_slc = meta[14];
    const float scale = __int_as_float(meta[15]);
    const int sb = meta[16];
    const int s = blockIdx.x / hkv;
    const int g = blockIdx.x - s * hkv;
    const int len = meta[SQUID_NSD_HEADER + 2 * s];
    const int nc = meta[SQUID_NSD_HEADER + 2 * s + 1];
    const int t = len - 1;
    const int group = hq / hkv;
    const int tid = threadIdx.x;
    const long long cta = blockIdx.x;
    float* sc_scores = scratch + cta * ((long long)(SQUID_NSD_HC + 1) * sb + max_slc + (long long)group * dv);
    float* psum = sc_scores + (long long)SQUID_NSD_HC * sb;
    float* slc = psum + sb;
    float* ocmp = slc + max_slc;
    const T* qs = q + (long long)s * hq * dk;
    const T* gs = gates + (long long)s * hq * 3;
    const long long kstride = (long long)hkv * dk;
    const long long vstride = (long long)hkv * dv;
    const T* kseq = k + (long long)s * capacity * kstride + (long long)g * dk;
    const T* vseq = v + (long long)s * capacity * vstride + (long long)g * dv;
    const T* kcs = kc + (long long)s * max_blocks * kstride + (long long)g * dk;
    const T* vcs = vc + (long long)s * max_blocks * vstride + (long long)g * dv;
    unsigned* chosen = indices + cta * n;
    float acc[SQUID_NSD_HC][2];

    // 1. Compressed branch, chunk by chunk.
    for (int c = tid; c < nc; c += SQUID_NSD_THREADS) {
        psum[c] = 0.0f;
    }
    for (int h0 = 0; h0 < group; h0 += SQUID_NSD_HC) {
        const int hc = min(SQUID_NSD_HC, group - h0);
        const int head0 = g * group + h0;
        squid_nsd_load_q(sh, qs, head0, hc, dk, scale);
        squid_nsd_load_gate(sh, gs, head0, hc, 0);
        squid_nsd_reset(sh, acc);
        squid_nsd_attend(sh, acc, kcs, vcs, kstride, vstride, 0, nc, hc, dk, dv, sc_scores, sb);
        float* ochunk = ocmp + (long long)h0 * dv;
        for (int e = tid; e < hc * dv; e += SQUID_NSD_THREADS) {
            ochunk[e] = 0.0f;
        }
        squid_nsd_finish(sh, acc, ochunk, hc, dv);
        for (int c = tid; c < nc; c += SQUID_NSD_THREADS) {
            float a = psum[c];
            for (int h = 0; h < hc; ++h) {
                a += expf(sc_scores[(long long)h * sb + c] - sh.m[h]) * (1.0f / sh.l[h]);
            }
            psum[c] = a;
        }
        __syncthreads();
    }

    // 2. Selection-block importance (the overlap rule), then top-n.
    const int blocks = t / ls + 1;
    const int per_slc = ls / dc;
    const int per_cmp = lc / dc;
    const int taps = per_slc + per_cmp - 1;
    const int used = min(nc, per_slc * blocks);
    for (int j = tid; j < blocks; j += SQUID_NSD_THREADS) {
        float a = 0.0f;
        for (int kk = 0; kk < taps; ++kk) {
            const int i = per_slc * j + kk - (per_cmp - 1);
            const float p = (i >= 0 && i < used) ? psum[i] : 0.0f;
            const float wgt = (float)(min(kk + 1, per_slc) - max(kk + 1 - per_cmp, 0));
            a = __fadd_rn(a, __fmul_rn(wgt, p));
        }
        slc[j] = a;
    }
    __syncthreads();
    if (tid < 32) {
        const int lane = tid;
        const int first = min(num_initial, blocks);
        const int end = max(blocks - num_local, 0);
        const int forced = blocks - max(end, first) + first;
        const int kfree = max(n - forced, 0);
        unsigned long long kth = ~0ull;
        bool any = false;
        for (int round = 0; round < kfree; ++round) {
            unsigned long long best = 0;
            for (int j = first + lane; j < end; j += 32) {
                const unsigned long long key = squid_nsd_rank_key(slc[j], (unsigned)j);
                if (key < kth && key > best) {
                    best = key;
                }
            }
            best = squid_nsd_warp_max_u64(best);
            if (best == 0) {
                break;
            }
            kth = best;
            any = true;
        }
        if (lane == 0) {
            int slot = 0;
            for (int j = 0; j < blocks && slot < n; ++j) {
                const bool is_forced = j < first || j >= max(end, first);
                const bool picked = !is_forced && any && squid_nsd_rank_key(slc[j], (unsigned)j) >= kth;
                if (is_forced || picked) {
                    chosen[slot++] = (unsigned)j;
                }
            }
            for (; slot < n; ++slot) {
                chosen[slot] = 0xffffffffu;
            }
        }
    }
    __syncthreads();

    // 3. Selected and window branches, chunk by chunk.
    const T* kwin = separate ? kw + (long long)s * capacity * kstride + (long long)g * dk : kseq;
    const T* vwin = separate ? vw + (long long)s * capacity * vstride + (long long)g * dv : vseq;
    for (int h0 = 0; h0 < group; h0 += SQUID_NSD_HC) {
        const int hc = min(SQUID_NSD_HC, group - h0);
        const int head0 = g * group + h0;
        squid_nsd_load_q(sh, qs, head0, hc, dk, scale);
        float* ochunk = ocmp + (long long)h0 * dv;
        squid_nsd_load_gate(sh, gs, head0, hc, 1);
        squid_nsd_reset(sh, acc);
        for (int i = 0; i < n; ++i) {
            const unsigned j = chosen[i];
            if (j == 0xffffffffu) {
                break;
            }
            const int a = (int)j * ls;
            const int b = min(a + ls, t + 1);
            squid_nsd_attend(sh, acc, kseq, vseq, kstride, vstride, a, b, hc, dk, dv, (float*)nullptr, 0);
        }
        squid_nsd_finish(sh, acc, ochunk, hc, dv);
        squid_nsd_load_gate(sh, gs, head0, hc, 2);
        squid_nsd_reset(sh, acc);
        squid_nsd_attend(sh, acc, kwin, vwin, kstride, vstride, max(t + 1 - w, 0), t + 1, hc, dk, dv, (float*)nullptr,
                         0);
        squid_nsd_finish(sh, acc, ochunk, hc, dv);
        T* os = o + ((long long)s * hq + head0) * dv;
        __syncthreads();
        for (int e = tid; e < hc * dv; e += SQUID_NSD_THREADS) {
            os[e] = squid_from_f32<T>(ochunk[e]);
        }
    }
}

#define SQUID_NSD_ENTRIES(SFX, TY)                                                                                  \
    extern "C" __global__ void squid_nsa_dec_append_##SFX(const TY* __restrict__ src, TY* __restrict__ dst,          \
                                                          const long long* __restrict__ dst_row, long long n,       \
                                                          int row) {                                                \
        squid_nsd_append<TY>(src, dst, dst_row, n, row);                                                            \
    }                                                                                                               \
    extern "C" __global__ void squid_nsa_dec_compress_##SFX(const TY* __restrict__ x, TY* __restrict__ out,         \
                                                            const long long* __restrict__ table, long long n,       \
                                                            int row, int l, float inv_l) {                          \
        squid_nsd_compress<TY>(x, out, table, n, row, l, inv_l);                                                    \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(SQUID_NSD_THREADS, 1) squid_nsa_dec_step_##SFX(                       \
        const TY* __restrict__ q, const TY* __restrict__ gates, const TY* __restrict__ k, const TY* __restrict__ v, \
        const TY* __restrict__ kw, const TY* __restrict__ vw, const TY* __restrict__ kc, const TY* __restrict__ vc, \
        TY* __restrict__ o, unsigned* __restrict__ indices, float* __restrict__ scratch,                            \
        const int* __restrict__ meta) {                                                                             \
        squid_nsd_step<TY>(q, gates, k, v, kw, vw, kc, vc, o, indices, scratch, meta);                               \
    }

SQUID_NSD_ENTRIES(bf16, squid_bf16)
SQUID_NSD_ENTRIES(f16, squid_f16)
