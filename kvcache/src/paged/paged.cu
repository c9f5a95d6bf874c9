// Device page pools of DevicePages (squid-kvcache, paged/cuda.rs): the storage half of PagedKv on
// a device. The page bookkeeping (tables, reference counts, the free list) stays on the host; these
// kernels move rows. Pools are addressed in 16-bit units so one entry serves every element type
// (f32 is two units, bf16/f16 one).
//
// squid_kv_copy_page: pool[to * n + i] = pool[from * n + i] for i < n (copy on write of one page of
//   one pool; grid-stride).
// squid_kv_write_rows: rows[r * row + c] -> the page slot of position start + r, through the
//   sequence's page table (grid-stride over n_units = rows * row).

extern "C" __global__ void squid_kv_copy_page(unsigned short* __restrict__ pool, long long from, long long to,
                                              long long n) {
    const unsigned short* src = pool + from * n;
    unsigned short* dst = pool + to * n;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        dst[i] = src[i];
    }
}

extern "C" __global__ void squid_kv_write_rows(unsigned short* __restrict__ pool, const unsigned short* __restrict__ rows,
                                               const unsigned int* __restrict__ pages, long long start,
                                               long long n_units, long long row, long long page_size) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_units;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / row, c = i - r * row;
        const long long pos = start + r;
        const long long page = (long long)pages[pos / page_size];
        pool[(page * page_size + pos % page_size) * row + c] = rows[i];
    }
}
