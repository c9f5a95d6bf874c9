// C = A * B with A bf16 [M, K], B bf16 [K, N] row-major and C f32 [M, N] row-major, on the
// tensor cores: mma.sync m16n8k16 (bf16 inputs, f32 accumulation).
//
// Block tile 64 x 64 x 32, four warps in a 2 x 2 grid, each warp a 32 x 32 tile of C
// (2 x 4 mma tiles, accumulators in registers). K is walked in 32-wide steps through two
// shared-memory stages: while one stage feeds the tensor cores, cp.async fills the other.
// Fragments come out of shared memory with ldmatrix (A as stored, B transposed, since mma
// wants B column-major and it is stored row-major). Shared rows are padded by 8 elements
// (16 bytes) so ldmatrix's eight row addresses fall in different banks and stay 16-byte
// aligned.
//
// Edges: tiles past M, N or K are zero-filled (cp.async with src-size 0, or a predicated
// load), so any M, N, K works and C is written only inside [M, N]. cp.async moves 16 bytes (8
// elements) at a time and needs 16-byte aligned sources: it is used when K and N are multiples
// of 8 and A, B are 16-byte aligned; otherwise the tiles are loaded element by element (same
// layout, same compute).
// Launch: block (128, 1, 1), grid (ceil(N / 64), ceil(M / 64), 1), no dynamic shared memory.

#define SQUID_GEMM_BM 64
#define SQUID_GEMM_BN 64
#define SQUID_GEMM_BK 32
#define SQUID_GEMM_PAD 8
#define SQUID_GEMM_THREADS 128
#define SQUID_GEMM_A_STRIDE (SQUID_GEMM_BK + SQUID_GEMM_PAD)
#define SQUID_GEMM_B_STRIDE (SQUID_GEMM_BN + SQUID_GEMM_PAD)

__device__ __forceinline__ unsigned squid_smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// 16 bytes global -> shared; bytes past src_bytes (0 or 16 here) are zero-filled.
__device__ __forceinline__ void squid_cp_async_16(unsigned dst, const void* src, unsigned src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void squid_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void squid_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

struct SquidGemmSmem {
    unsigned short a[2][SQUID_GEMM_BM][SQUID_GEMM_A_STRIDE];
    unsigned short b[2][SQUID_GEMM_BK][SQUID_GEMM_B_STRIDE];
};

// Fills stage `stage` with A[m0.., k0..] and B[k0.., n0..], zeros outside the matrices.
__device__ __forceinline__ void squid_gemm_load(SquidGemmSmem& s, int stage, const unsigned short* __restrict__ a,
                                                const unsigned short* __restrict__ b, int m, int n, int k, int m0,
                                                int n0, int k0, bool vectorised) {
    const int tid = threadIdx.x;
    if (vectorised) {
        // A: 64 rows x 4 chunks of 8; B: 32 rows x 8 chunks of 8; two chunks of each per thread.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * SQUID_GEMM_THREADS;
            const int row = c >> 2, col = (c & 3) * 8;
            const int gr = m0 + row, gc = k0 + col;
            const bool ok = gr < m && gc < k;
            const unsigned short* src = ok ? a + (long long)gr * k + gc : a;
            squid_cp_async_16(squid_smem_addr(&s.a[stage][row][col]), src, ok ? 16u : 0u);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * SQUID_GEMM_THREADS;
            const int row = c >> 3, col = (c & 7) * 8;
            const int gr = k0 + row, gc = n0 + col;
            const bool ok = gr < k && gc < n;
            const unsigned short* src = ok ? b + (long long)gr * n + gc : b;
            squid_cp_async_16(squid_smem_addr(&s.b[stage][row][col]), src, ok ? 16u : 0u);
        }
    } else {
#pragma unroll 1
        for (int i = 0; i < SQUID_GEMM_BM * SQUID_GEMM_BK / SQUID_GEMM_THREADS; ++i) {
            const int e = tid + i * SQUID_GEMM_THREADS;
            const int row = e / SQUID_GEMM_BK, col = e % SQUID_GEMM_BK;
            const int gr = m0 + row, gc = k0 + col;
            s.a[stage][row][col] = (gr < m && gc < k) ? a[(long long)gr * k + gc] : (unsigned short)0;
        }
#pragma unroll 1
        for (int i = 0; i < SQUID_GEMM_BK * SQUID_GEMM_BN / SQUID_GEMM_THREADS; ++i) {
            const int e = tid + i * SQUID_GEMM_THREADS;
            const int row = e / SQUID_GEMM_BN, col = e % SQUID_GEMM_BN;
            const int gr = k0 + row, gc = n0 + col;
            s.b[stage][row][col] = (gr < k && gc < n) ? b[(long long)gr * n + gc] : (unsigned short)0;
        }
    }
}

extern "C" __global__ void squid_gemm_bf16_f32(const squid_bf16* __restrict__ a_in, const squid_bf16* __restrict__ b_in,
                                               float* __restrict__ c, int m, int n, int k) {
    __shared__ __align__(16) SquidGemmSmem s;
    const unsigned short* a = reinterpret_cast<const unsigned short*>(a_in);
    const unsigned short* b = reinterpret_cast<const unsigned short*>(b_in);
    const int m0 = blockIdx.y * SQUID_GEMM_BM, n0 = blockIdx.x * SQUID_GEMM_BN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const bool vectorised = (k % 8 == 0) && (n % 8 == 0) && ((reinterpret_cast<unsigned long long>(a) & 15) == 0) &&
                            ((reinterpret_cast<unsigned long long>(b) & 15) == 0);

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    const int k_tiles = (k + SQUID_GEMM_BK - 1) / SQUID_GEMM_BK;
    squid_gemm_load(s, 0, a, b, m, n, k, m0, n0, 0, vectorised);
    squid_cp_async_commit();
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int stage = kt & 1;
        if (kt + 1 < k_tiles) {
            // The other stage was last read in iteration kt - 1, before its closing barrier.
            squid_gemm_load(s, stage ^ 1, a, b, m, n, k, m0, n0, (kt + 1) * SQUID_GEMM_BK, vectorised);
            squid_cp_async_commit();
            squid_cp_async_wait<1>();  // stage `stage` has landed; the next may still fly
        } else {
            squid_cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < SQUID_GEMM_BK; kk += 16) {
            unsigned af[2][4], bfr[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                // Lanes 0-15 point at rows 0-15 (k 0-7), lanes 16-31 at rows 0-15 (k 8-15):
                // the four 8x8 matrices are a0..a3 of the mma A fragment.
                const unsigned addr = squid_smem_addr(&s.a[stage][wm + i * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                             : "=r"(af[i][0]), "=r"(af[i][1]), "=r"(af[i][2]), "=r"(af[i][3])
                             : "r"(addr));
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                // Matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15),
                // transposed on the way: b0, b1 of two n8 tiles.
                const unsigned addr =
                    squid_smem_addr(&s.b[stage][kk + (lane & 7) + ((lane >> 3) & 1) * 8][wn + j * 16 + (lane >> 4) * 8]);
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                             : "=r"(bfr[2 * j][0]), "=r"(bfr[2 * j][1]), "=r"(bfr[2 * j + 1][0]), "=r"(bfr[2 * j + 1][1])
                             : "r"(addr));
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    asm volatile(
                        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                        "{%8, %9}, {%0, %1, %2, %3};\n"
                        : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]), "+f"(acc[i][j][3])
                        : "r"(af[i][0]), "r"(af[i][1]), "r"(af[i][2]), "r"(af[i][3]), "r"(bfr[j][0]), "r"(bfr[j][1]));
        }
        __syncthreads();
    }

    // Accumulator layout: c0, c1 at (row lane / 4, cols 2 * (lane % 4) + {0, 1}), c2, c3 eight rows down.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = m0 + wm + i * 16 + (lane >> 2) + (r >> 1) * 8;
                const int col = n0 + wn + j * 8 + (lane & 3) * 2 + (r & 1);
                if (row < m && col < n) {
                    c[(long long)row * n + col] = acc[i][j][r];
                }
            }
}
