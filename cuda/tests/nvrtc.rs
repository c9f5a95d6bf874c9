//! NVRTC and ptxas on the real kernels: every kernel compiles for sm_80 and sm_90 and defines
//! its entry points, compile errors carry NVRTC's log, the disk cache serves a second process,
//! and the kernels agree with the CPU paths on the test device: the GPU where one is present,
//! else the simulator (so CI, with NVRTC and no GPU, runs them).

use squid_cuda::cache::CacheHit;
use squid_cuda::testing::nvrtc_available;
use squid_cuda::{compile, compile_cached, Arch, CompileOptions, Error, KernelSource, PtxCache, KERNELS};

#[test]
fn every_kernel_compiles_for_ampere_and_hopper_with_its_entries() {
    if !nvrtc_available() {
        return;
    }
    for kernel in KERNELS {
        for arch in [Arch::SM80, Arch::SM90] {
            let ptx = compile(kernel, &CompileOptions::for_kernel(kernel, arch)).unwrap();
            assert!(ptx.text.contains(&format!(".target {arch}")), "{}: wrong target", kernel.name);
            kernel.check_ptx_entries(&ptx.text).unwrap();
        }
    }
}

static BROKEN: KernelSource = KernelSource {
    name: "broken",
    crate_name: "squid-cuda",
    path: "tests/broken.cu",
    source: "extern \"C\" __global__ void broken(float* y) {\n    y[0] = undefined_name;\n}\n",
    entries: &["broken"],
    fast_math: false,
};

#[test]
fn a_compile_error_carries_nvrtcs_log_with_the_files_own_line() {
    if !nvrtc_available() {
        return;
    }
    let err = compile(&BROKEN, &CompileOptions::for_kernel(&BROKEN, Arch::SM80)).unwrap_err();
    match err {
        Error::Compile { kernel, arch, log } => {
            assert_eq!((kernel.as_str(), arch.as_str()), ("broken", "sm_80"));
            assert!(log.contains("undefined_name"), "log: {log}");
            // The #line directive maps the error to line 2 of the kernel's own file.
            assert!(log.contains("tests/broken.cu(2)"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other}"),
    }
}

#[test]
fn the_disk_cache_serves_a_second_process_and_keys_on_options() {
    if !nvrtc_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = &KERNELS[0];
    let opts = CompileOptions::for_kernel(kernel, Arch::SM80);
    let first = compile_cached(kernel, &opts, &PtxCache::with_dir(dir.path())).unwrap();
    assert_eq!(first.cache, CacheHit::Miss);
    let second = compile_cached(kernel, &opts, &PtxCache::with_dir(dir.path())).unwrap();
    assert_eq!(second.cache, CacheHit::Disk);
    assert_eq!(first.text, second.text);
    let other = CompileOptions { fast_math: !opts.fast_math, ..opts };
    assert_eq!(compile_cached(kernel, &other, &PtxCache::with_dir(dir.path())).unwrap().cache, CacheHit::Miss);
}

/// The PTX cache keys on the version of the NVRTC that compiles: PTX filed under another
/// version (planted here, as a CUDA 12 process would have left it for a CUDA 13 one) is never
/// served, while the same PTX filed under this process's version is.
#[test]
fn the_ptx_cache_keys_on_the_nvrtc_version() {
    if !nvrtc_available() {
        return;
    }
    let (major, minor) = squid_cuda::nvrtc::nvrtc_version().unwrap();
    println!("NVRTC {major}.{minor} from {:?}", squid_cuda::nvrtc::nvrtc_library());
    let kernel = &KERNELS[0];
    let opts = CompileOptions::for_kernel(kernel, Arch::SM80);
    let source = kernel.full_source();
    let planted = "// PTX left by another NVRTC\n";
    for (version, served) in [((major + 1, minor), false), ((major, minor + 1), false), ((major, minor), true)] {
        let dir = tempfile::tempdir().unwrap();
        let key = squid_cuda::nvrtc::cache_key(&source, &opts, version);
        PtxCache::with_dir(dir.path()).get_or_compile(key, || Ok(planted.to_string())).unwrap();
        let ptx = compile_cached(kernel, &opts, &PtxCache::with_dir(dir.path())).unwrap();
        assert_eq!(&*ptx.text == planted, served, "entry filed under NVRTC {version:?}");
        assert_eq!(ptx.cache, if served { CacheHit::Disk } else { CacheHit::Miss });
    }
}

#[cfg(feature = "cuda")]
mod device {
    use half::bf16;
    use squid_cuda::ops::gemm::{self, GemmShape};
    use squid_cuda::ops::{axpy, logsumexp, softmax};
    use squid_cuda::testing::test_device;

    /// Deterministic values in [-scale/2, scale/2).
    fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    #[test]
    fn gemm_on_the_device_matches_the_reference() {
        let Some(gpu) = test_device() else { return };
        // (m, n, k): one element; one mma tile; exactly one block tile; tile multiples with
        // several k steps; edges on every side with K, N multiples of 8 (the cp.async path);
        // odd K and N (the element-load path); several blocks both ways; k = 0.
        let shapes = [
            (1usize, 1usize, 1usize),
            (16, 8, 16),
            (64, 64, 32),
            (128, 64, 96),
            (70, 72, 40),
            (33, 17, 37),
            (130, 65, 100),
            (5, 9, 0),
        ];
        for (m, n, k) in shapes {
            let shape = GemmShape { m, n, k };
            let a: Vec<bf16> = data(m * k, (m * 7 + k) as u64, 4.0).iter().map(|&v| bf16::from_f32(v)).collect();
            let b: Vec<bf16> = data(k * n, (n * 13 + k) as u64, 4.0).iter().map(|&v| bf16::from_f32(v)).collect();
            let mut expect = vec![0.0f32; m * n];
            gemm::naive(shape, &a, &b, &mut expect).unwrap();
            let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
            let mut dc = gpu.upload(&vec![f32::NAN; m * n]).unwrap();
            gemm::cuda::gemm_bf16(&gpu, shape, &da, &db, &mut dc).unwrap();
            let got = gpu.download(&dc).unwrap();
            for i in 0..m {
                for j in 0..n {
                    // bf16 products are exact in f32; the tensor cores add them in f32 with
                    // one rounding (or truncation) per step of 16: a few ulps of sum |a||b| per step.
                    let abs: f32 = (0..k).map(|p| (a[i * k + p].to_f32() * b[p * n + j].to_f32()).abs()).sum();
                    let tol = 4.0 * ((k / 16) as f32 + 1.0) * f32::EPSILON * abs;
                    let (g, e) = (got[i * n + j], expect[i * n + j]);
                    assert!((g - e).abs() <= tol, "{m}x{n}x{k} [{i},{j}]: {g} vs {e}");
                }
            }
        }
        if let Some((instructions, seconds)) = gpu.simulated_work() {
            println!("gemm on the simulator: {instructions} thread-instructions in {seconds:.3} s");
        }
    }

    #[test]
    fn logsumexp_on_the_device_matches_the_reference() {
        let Some(gpu) = test_device() else { return };
        // Rows not a multiple of the 4 rows per block, columns not a multiple of the warp.
        for (rows, cols, scale) in
            [(1usize, 1usize, 1.0f32), (3, 33, 0.5), (6, 100, 1.0), (9, 257, 0.125), (2, 1000, -2.0)]
        {
            let mut x = data(rows * cols, (rows * 131 + cols) as u64, 40.0);
            if rows > 2 {
                // A fully masked row and a partly masked one.
                x[cols..2 * cols].fill(f32::NEG_INFINITY);
                x[2 * cols] = f32::NEG_INFINITY;
            }
            // ex2/lg2.approx (at their error bound on the simulator) and f32 sums in another
            // order: about cols ulps of the sum, plus the rounding of max + log(sum).
            let tol = |e: f32| 4.0 * f32::EPSILON * cols as f32 + 1e-5 * (1.0 + e.abs());
            let mut expect = vec![0.0f32; rows];
            logsumexp::naive(&x, &mut expect, cols, scale).unwrap();
            let (dx, mut dy) = (gpu.upload(&x).unwrap(), gpu.zeros::<f32>(rows).unwrap());
            logsumexp::cuda::logsumexp_f32(&gpu, &dx, &mut dy, cols, scale).unwrap();
            for (g, e) in gpu.download(&dy).unwrap().iter().zip(&expect) {
                assert!(g == e || (g - e).abs() <= tol(*e), "f32 {rows}x{cols}: {g} vs {e}");
            }
            if rows > 2 {
                assert_eq!(expect[1], f32::NEG_INFINITY);
            }
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            logsumexp::naive(&xb, &mut expect, cols, scale).unwrap();
            let (dx, mut dy) = (gpu.upload(&xb).unwrap(), gpu.zeros::<f32>(rows).unwrap());
            logsumexp::cuda::logsumexp_bf16(&gpu, &dx, &mut dy, cols, scale).unwrap();
            for (g, e) in gpu.download(&dy).unwrap().iter().zip(&expect) {
                assert!(g == e || (g - e).abs() <= tol(*e), "bf16 {rows}x{cols}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn axpy_on_the_device_matches_the_cpu_path() {
        let Some(gpu) = test_device() else { return };
        for n in [1usize, 255, 256, 20_003] {
            let x: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.25 - 3.0).collect();
            let y: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
            let mut expect = y.clone();
            axpy::cpu(1.5, &x, &mut expect).unwrap();
            let (dx, mut dy) = (gpu.upload(&x).unwrap(), gpu.upload(&y).unwrap());
            axpy::cuda::axpy_f32(&gpu, 1.5, &dx, &mut dy).unwrap();
            assert_eq!(gpu.download(&dy).unwrap(), expect, "f32 n={n}");

            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let yb: Vec<bf16> = y.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut expect = yb.clone();
            axpy::cpu(1.5, &xb, &mut expect).unwrap();
            let (dx, mut dy) = (gpu.upload(&xb).unwrap(), gpu.upload(&yb).unwrap());
            axpy::cuda::axpy_bf16(&gpu, 1.5, &dx, &mut dy).unwrap();
            assert_eq!(gpu.download(&dy).unwrap(), expect, "bf16 n={n}");
        }
    }

    #[test]
    fn softmax_on_the_device_matches_the_reference() {
        let Some(gpu) = test_device() else { return };
        for (rows, cols) in [(1usize, 1usize), (3, 33), (7, 1000), (2, 5000)] {
            let mut x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0).collect();
            x[0] = f32::NEG_INFINITY;
            let mut expect = vec![0.0f32; x.len()];
            softmax::naive(&x, &mut expect, cols).unwrap();
            let (dx, mut dy) = (gpu.upload(&x).unwrap(), gpu.zeros::<f32>(x.len()).unwrap());
            softmax::cuda::softmax_f32(&gpu, &dx, &mut dy, cols).unwrap();
            let got = gpu.download(&dy).unwrap();
            // fast-math exp: a few ulp of relative error per element.
            for (g, e) in got.iter().zip(&expect) {
                assert!((g - e).abs() <= 1e-6 + 1e-5 * e.abs(), "{rows}x{cols}: {g} vs {e}");
            }
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut expect = vec![bf16::ZERO; x.len()];
            softmax::naive(&xb, &mut expect, cols).unwrap();
            let (dx, mut dy) = (gpu.upload(&xb).unwrap(), gpu.zeros::<bf16>(x.len()).unwrap());
            softmax::cuda::softmax_bf16(&gpu, &dx, &mut dy, cols).unwrap();
            for (g, e) in gpu.download(&dy).unwrap().iter().zip(&expect) {
                assert!((g.to_f32() - e.to_f32()).abs() <= 1e-6 + e.to_f32().abs() / 128.0, "bf16 {g} vs {e}");
            }
        }
    }
}

/// Generated shapes on the test device, including awkward ones (one row or column, sizes not a
/// multiple of any tile or of the warp).
#[cfg(feature = "cuda")]
mod generated_shapes {
    use std::sync::OnceLock;

    use half::bf16;
    use proptest::prelude::*;
    use squid_cuda::launch::Gpu;
    use squid_cuda::ops::gemm::{self, GemmShape};
    use squid_cuda::ops::logsumexp;

    /// One device for every case (the kernels are compiled and loaded once).
    fn device() -> Option<&'static Gpu> {
        static DEVICE: OnceLock<Option<Gpu>> = OnceLock::new();
        DEVICE.get_or_init(squid_cuda::testing::test_device).as_ref()
    }

    fn bf16s(n: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        #[test]
        fn gemm_any_shape(m in 1usize..80, n in 1usize..80, k in 0usize..80, seed in any::<u64>()) {
            let Some(gpu) = device() else { return Ok(()) };
            let shape = GemmShape { m, n, k };
            let (a, b) = (bf16s(m * k, seed), bf16s(k * n, !seed));
            let mut expect = vec![0.0f32; m * n];
            gemm::naive(shape, &a, &b, &mut expect).unwrap();
            let mut dc = gpu.zeros::<f32>(m * n).unwrap();
            gemm::cuda::gemm_bf16(gpu, shape, &gpu.upload(&a).unwrap(), &gpu.upload(&b).unwrap(), &mut dc).unwrap();
            for (idx, (g, e)) in gpu.download(&dc).unwrap().iter().zip(&expect).enumerate() {
                let (i, j) = (idx / n, idx % n);
                let abs: f32 = (0..k).map(|p| (a[i * k + p].to_f32() * b[p * n + j].to_f32()).abs()).sum();
                prop_assert!((g - e).abs() <= 4.0 * ((k / 16) as f32 + 1.0) * f32::EPSILON * abs, "[{},{}] {} vs {}", i, j, g, e);
            }
        }

        #[test]
        fn logsumexp_any_shape(rows in 1usize..12, cols in 1usize..300, scale in -2.0f32..2.0, seed in any::<u64>()) {
            let Some(gpu) = device() else { return Ok(()) };
            let x = bf16s(rows * cols, seed);
            let mut expect = vec![0.0f32; rows];
            logsumexp::naive(&x, &mut expect, cols, scale).unwrap();
            let mut out = gpu.zeros::<f32>(rows).unwrap();
            logsumexp::cuda::logsumexp_bf16(gpu, &gpu.upload(&x).unwrap(), &mut out, cols, scale).unwrap();
            for (g, e) in gpu.download(&out).unwrap().iter().zip(&expect) {
                prop_assert!((g - e).abs() <= 4.0 * f32::EPSILON * cols as f32 + 1e-5 * (1.0 + e.abs()), "{} vs {}", g, e);
            }
        }
    }
}
