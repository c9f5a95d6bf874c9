//! NVRTC and ptxas on the real kernels: every kernel compiles for sm_80 and sm_90 and defines
//! its entry points, compile errors carry NVRTC's log, the disk cache serves a second process,
//! and, where a GPU is present, the kernels agree with the CPU paths.

use squid_cuda::cache::CacheHit;
use squid_cuda::testing::{gpu_available, nvrtc_available};
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

#[cfg(feature = "cuda")]
mod gpu {
    use half::bf16;
    use squid_cuda::launch::Gpu;
    use squid_cuda::ops::{axpy, softmax};

    use super::*;

    #[test]
    fn axpy_on_the_gpu_matches_the_cpu_path() {
        if !gpu_available() {
            return;
        }
        let gpu = Gpu::first().unwrap();
        for n in [1usize, 255, 256, 100_003] {
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
    fn softmax_on_the_gpu_matches_the_reference() {
        if !gpu_available() {
            return;
        }
        let gpu = Gpu::first().unwrap();
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
