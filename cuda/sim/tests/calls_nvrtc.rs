//! A CUDA C kernel with `__noinline__` device functions (scalar and struct arguments and
//! returns, a loop, recursion, a warp shuffle inside a function), compiled by NVRTC for sm_80
//! and sm_90, run on the simulator and held to a host computation. Skipped where NVRTC is
//! unavailable, unless `SQUID_REQUIRE_NVRTC=1`.

use squid_cuda::{Arch, CompileOptions, KernelSource};
use squid_ptxsim::{Arg, LaunchConfig, Simulator};

static CALLS: KernelSource = KernelSource {
    name: "calls",
    crate_name: "squid-ptxsim",
    path: "tests/calls.cu",
    source: r#"
struct Pair { float s; int k; };

// Scalar arguments and return value.
__device__ __noinline__ float poly(float x, float a, float b) { return fmaf(a * x, x, b); }

// A struct passed and returned by value.
__device__ __noinline__ Pair scale_pair(Pair p, float a) {
    p.s *= a;
    p.k += 3;
    return p;
}

// A loop.
__device__ __noinline__ int collatz_steps(unsigned n) {
    int s = 0;
    while (n > 1 && s < 500) {
        n = (n & 1) ? 3 * n + 1 : n / 2;
        ++s;
    }
    return s;
}

// Recursion (two calls, so it stays recursive).
__device__ __noinline__ unsigned fib(unsigned n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

// A warp collective inside a function: every lane of the warp calls it.
__device__ __noinline__ int warp_sum(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void calls(const float* x, const unsigned* n, float* y, int* steps, unsigned* fibs,
                                 int* sums, float* pair_s, int* pair_k, int len) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int v = i < len ? (int)n[i] : 0;
    int s = warp_sum(v);
    if (i < len) {
        y[i] = poly(x[i], 0.5f, -1.0f);
        steps[i] = collatz_steps(n[i]);
        fibs[i] = fib(n[i] % 18);
        sums[i] = s;
        Pair p = scale_pair(Pair{x[i], (int)n[i]}, 1.5f);
        pair_s[i] = p.s;
        pair_k[i] = p.k;
    }
}
"#,
    entries: &["calls"],
    fast_math: false,
};

#[test]
fn nvrtc_noinline_device_functions_match_the_host() {
    if !squid_cuda::testing::nvrtc_available() {
        return;
    }
    let len = 100usize;
    let x: Vec<f32> = (0..len).map(|i| (i as f32 - 41.0) * 0.173).collect();
    let n: Vec<u32> = (0..len as u32).map(|i| (i * 37 + 5) % 97 + 1).collect();
    for arch in [Arch::SM80, Arch::SM90] {
        let ptx = squid_cuda::compile(&CALLS, &CompileOptions::for_kernel(&CALLS, arch)).expect("NVRTC compiles");
        let text = ptx.text.to_string();
        // The functions were not inlined: each is a `.func`, and the PTX calls them.
        for f in ["poly", "scale_pair", "collatz_steps", "fib", "warp_sum"] {
            assert!(text.lines().any(|l| l.contains(".func") && l.contains(f)), "{arch}: no .func {f} in\n{text}");
        }
        assert!(text.matches("call.uni").count() >= 5, "{arch}: fewer calls than functions in\n{text}");
        let mut sim = Simulator::new(&text).unwrap_or_else(|e| panic!("{arch}: {e}\n{text}"));
        let bx = sim.alloc(&x);
        let bn = sim.alloc(&n);
        let by = sim.alloc_zeroed::<f32>(len);
        let bsteps = sim.alloc_zeroed::<i32>(len);
        let bfibs = sim.alloc_zeroed::<u32>(len);
        let bsums = sim.alloc_zeroed::<i32>(len);
        let bps = sim.alloc_zeroed::<f32>(len);
        let bpk = sim.alloc_zeroed::<i32>(len);
        let args = [bx, bn, by, bsteps, bfibs, bsums, bps, bpk].map(Arg::Ptr);
        let mut args = args.to_vec();
        args.push(Arg::I32(len as i32));
        // 4 blocks of 32: the last warps are partly past `len` and still join the shuffle.
        sim.launch("calls", LaunchConfig::linear(4, 32), &args).unwrap_or_else(|e| panic!("{arch}: {e}"));

        let y = sim.read::<f32>(by).unwrap();
        let steps = sim.read::<i32>(bsteps).unwrap();
        let fibs = sim.read::<u32>(bfibs).unwrap();
        let sums = sim.read::<i32>(bsums).unwrap();
        let ps = sim.read::<f32>(bps).unwrap();
        let pk = sim.read::<i32>(bpk).unwrap();
        for i in 0..len {
            assert_eq!(y[i], (0.5f32 * x[i]).mul_add(x[i], -1.0), "{arch} poly {i}");
            let mut m = n[i];
            let mut s = 0;
            while m > 1 && s < 500 {
                m = if m & 1 == 1 { 3 * m + 1 } else { m / 2 };
                s += 1;
            }
            assert_eq!(steps[i], s, "{arch} collatz {i}");
            let (mut a, mut b) = (0u32, 1u32);
            for _ in 0..n[i] % 18 {
                (a, b) = (b, a + b);
            }
            assert_eq!(fibs[i], a, "{arch} fib {i}");
            let w = i / 32;
            let want: i32 = (w * 32..(w * 32 + 32).min(len)).map(|j| n[j] as i32).sum();
            assert_eq!(sums[i], want, "{arch} warp_sum {i}");
            assert_eq!(ps[i], x[i] * 1.5, "{arch} pair.s {i}");
            assert_eq!(pk[i], n[i] as i32 + 3, "{arch} pair.k {i}");
        }
    }
}
