// NSA top-n block selection on the device: per (query token, kv head), the forced initial and
// local blocks plus the highest-scoring free blocks, ties to the lower index, written ascending
// and NO_BLOCK-padded: the device half of squid-attention's `nsa::select_blocks_n` (launcher
// in nsa/cuda.rs).
//
// One thread per (token, kv head) row. Scores are ranked by f32 total order (the bits mapped
// so that unsigned order is `f32::total_cmp`'s), then by lower index: each block gets a unique
// 64-bit key. The k-th best free key is found by k passes that each take the largest key below
// the previous one (no per-thread list, so any n), then one ascending pass writes the forced
// blocks and the free blocks at or above it. O(k x blocks) per row: a first, simple version
// (no shared memory); the CPU path's lane-maximum threshold is the obvious next step.
//
// meta (int32, per row r = token * hkv + g): [3 r] the token's position t, [3 r + 1] its number
// of blocks n_t, [3 r + 2] unused.

__device__ __forceinline__ unsigned long long squid_nsa_rank_key(float s, unsigned j) {
    unsigned b = __float_as_uint(s);
    unsigned k = b ^ ((unsigned)(((int)b) >> 31) | 0x80000000u);
    return ((unsigned long long)k << 32) | (unsigned long long)(~j);
}

extern "C" __global__ void squid_nsa_select_topn(const float* __restrict__ scores, unsigned* __restrict__ out,
                                                 const int* __restrict__ meta, int rows, int stride, int n,
                                                 int block_slc, int num_initial, int num_local) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) {
        return;
    }
    const int t = meta[3 * r];
    const int n_t = meta[3 * r + 1];
    const int blocks = t / block_slc + 1;
    const int first = min(num_initial, blocks);
    const int end = max(blocks - num_local, 0);
    const int forced = blocks - max(end, first) + first;
    int k = max(n_t - forced, 0);
    const float* row = scores + (long long)r * stride;
    // The k-th best key among free blocks first .. end (0 = none chosen).
    unsigned long long kth = ~0ull;
    bool any = false;
    for (int round = 0; round < k; ++round) {
        unsigned long long best = 0;
        bool found = false;
        for (int j = first; j < end; ++j) {
            const unsigned long long key = squid_nsa_rank_key(row[j], (unsigned)j);
            if (key < kth && (!found || key > best)) {
                best = key;
                found = true;
            }
        }
        if (!found) {
            break;
        }
        kth = best;
        any = true;
    }
    unsigned* dst = out + (long long)r * n;
    int slot = 0;
    for (int j = 0; j < blocks && slot < n; ++j) {
        const bool is_forced = j < first || j >= max(end, first);
        const bool picked = !is_forced && any && squid_nsa_rank_key(row[j], (unsigned)j) >= kth;
        if (is_forced || picked) {
            dst[slot++] = (unsigned)j;
        }
    }
    for (; slot < n; ++slot) {
        dst[slot] = 0xffffffffu;
    }
}
