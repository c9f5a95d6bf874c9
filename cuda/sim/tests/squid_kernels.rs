//! squid-cuda's registered kernels, compiled by NVRTC for sm_80, run on the simulator and
//! held to the crate's CPU references. Skipped (with a message) where NVRTC is unavailable,
//! unless `SQUID_REQUIRE_NVRTC=1`.

use half::bf16;
use squid_cuda::ops::{axpy, softmax};
use squid_cuda::{Arch, CompileOptions, KernelSource};
use squid_ptxsim::{Arg, LaunchConfig, Simulator};

fn ptx(kernel: &'static KernelSource, arch: Arch) -> String {
    let p = squid_cuda::compile(kernel, &CompileOptions::for_kernel(kernel, arch)).expect("NVRTC compiles the kernel");
    p.text.to_string()
}

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
fn axpy_matches_cpu_exactly() {
    if !squid_cuda::testing::nvrtc_available() {
        return;
    }
    for arch in [Arch::SM80, Arch::SM90] {
        let mut sim = Simulator::new(&ptx(&axpy::KERNEL, arch)).unwrap();
        // (n, block, grid): length 1, non-multiples of the block, a grid-stride loop.
        for (n, block, grid) in [(1usize, 256u32, 1u32), (37, 32, 1), (1000, 128, 3), (4099, 256, 2), (513, 64, 40)] {
            let a = 0.75f32;
            let x = data(n, 1 + n as u64, 8.0);
            let y0 = data(n, 7 + n as u64, 8.0);
            let mut y_ref = y0.clone();
            axpy::cpu(a, &x, &mut y_ref).unwrap();
            let (bx, by) = (sim.alloc(&x), sim.alloc(&y0));
            let cfg = LaunchConfig::linear(grid, block);
            sim.launch("squid_axpy_f32", cfg, &[Arg::I64(n as i64), Arg::F32(a), Arg::Ptr(bx), Arg::Ptr(by)]).unwrap();
            assert_eq!(sim.read::<f32>(by).unwrap(), y_ref, "f32 n={n} {arch}");

            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let yb0: Vec<bf16> = y0.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut yb_ref = yb0.clone();
            axpy::cpu(a, &xb, &mut yb_ref).unwrap();
            let (bx, by) = (sim.alloc(&xb), sim.alloc(&yb0));
            sim.launch("squid_axpy_bf16", cfg, &[Arg::I64(n as i64), Arg::F32(a), Arg::Ptr(bx), Arg::Ptr(by)]).unwrap();
            assert_eq!(sim.read::<bf16>(by).unwrap(), yb_ref, "bf16 n={n} {arch}");
        }
    }
}

#[test]
fn softmax_matches_cpu() {
    if !squid_cuda::testing::nvrtc_available() {
        return;
    }
    for arch in [Arch::SM80, Arch::SM90] {
        softmax_at(arch);
    }
}

fn softmax_at(arch: Arch) {
    let mut sim = Simulator::new(&ptx(&softmax::KERNEL, arch)).unwrap();
    for (rows, cols, block) in [(1usize, 1usize, 32u32), (3, 7, 128), (2, 129, 128), (4, 1000, 256), (1, 2049, 256)] {
        let mut x = data(rows * cols, (rows * 31 + cols) as u64, 20.0);
        if rows > 1 {
            // A fully masked row, and a partly masked one.
            x[cols..2 * cols].fill(f32::NEG_INFINITY);
            x[0] = f32::NEG_INFINITY;
        }
        let mut y_ref = vec![0.0f32; x.len()];
        softmax::cpu(&x, &mut y_ref, cols).unwrap();
        let bx = sim.alloc(&x);
        let by = sim.alloc_zeroed::<f32>(x.len());
        let cfg = LaunchConfig::linear(rows as u32, block);
        let report =
            sim.launch("squid_softmax_f32", cfg, &[Arg::Ptr(bx), Arg::Ptr(by), Arg::I64(cols as i64)]).unwrap();
        assert!(report.thread_instructions > 0);
        let y = sim.read::<f32>(by).unwrap();
        // ex2.approx.ftz has relative error ~2^-22 and the kernel sums in another order:
        // a few f32 ulps per element relative to the row's values.
        for (i, (r, s)) in y_ref.iter().zip(&y).enumerate() {
            assert!((r - s).abs() <= 1e-6 + 2e-5 * r.abs(), "f32 rows={rows} cols={cols} [{i}]: {r} vs {s}");
        }

        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut yb_ref = vec![bf16::ZERO; x.len()];
        softmax::cpu(&xb, &mut yb_ref, cols).unwrap();
        let bx = sim.alloc(&xb);
        let by = sim.alloc_zeroed::<bf16>(x.len());
        sim.launch("squid_softmax_bf16", cfg, &[Arg::Ptr(bx), Arg::Ptr(by), Arg::I64(cols as i64)]).unwrap();
        let yb = sim.read::<bf16>(by).unwrap();
        // Both round an f32 within a few ulps of each other to bf16: at most one bf16 step apart.
        for (i, (r, s)) in yb_ref.iter().zip(&yb).enumerate() {
            let (r, s) = (r.to_f32(), s.to_f32());
            assert!((r - s).abs() <= 1e-6 + r.abs() / 128.0, "bf16 rows={rows} cols={cols} [{i}]: {r} vs {s}");
        }
    }
}

mod generated_shapes {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::*;

    fn compiled(kernel: &'static KernelSource, cell: &'static OnceLock<String>) -> &'static str {
        cell.get_or_init(|| ptx(kernel, Arch::SM80))
    }

    /// Asked once, so a skip is reported once rather than per generated case.
    fn nvrtc() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(squid_cuda::testing::nvrtc_available)
    }

    static AXPY: OnceLock<String> = OnceLock::new();
    static SOFTMAX: OnceLock<String> = OnceLock::new();

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Any length and launch shape: bit-exact against the CPU path (one fma, one rounding).
        #[test]
        fn axpy_any_shape(n in 1usize..3000, block_pow in 5u32..9, grid in 1u32..6, a in -3.0f32..3.0, seed in any::<u64>()) {
            if !nvrtc() {
                return Ok(());
            }
            let mut sim = Simulator::new(compiled(&axpy::KERNEL, &AXPY)).unwrap();
            let x: Vec<bf16> = data(n, seed, 100.0).iter().map(|&v| bf16::from_f32(v)).collect();
            let y0: Vec<bf16> = data(n, seed ^ 0x55, 100.0).iter().map(|&v| bf16::from_f32(v)).collect();
            let mut y_ref = y0.clone();
            axpy::cpu(a, &x, &mut y_ref).unwrap();
            let (bx, by) = (sim.alloc(&x), sim.alloc(&y0));
            let cfg = LaunchConfig::linear(grid, 1 << block_pow);
            sim.launch("squid_axpy_bf16", cfg, &[Arg::I64(n as i64), Arg::F32(a), Arg::Ptr(bx), Arg::Ptr(by)]).unwrap();
            prop_assert_eq!(sim.read::<bf16>(by).unwrap(), y_ref);
        }

        /// Row-wise softmax for any rows x cols and block size (a multiple of 32).
        #[test]
        fn softmax_any_shape(rows in 1usize..5, cols in 1usize..700, warps in 1u32..9, scale in 0.1f32..40.0, seed in any::<u64>()) {
            if !nvrtc() {
                return Ok(());
            }
            let mut sim = Simulator::new(compiled(&softmax::KERNEL, &SOFTMAX)).unwrap();
            // The tolerance must hold for any GPU: approximate functions at their error bound.
            sim.options.approx_worst_case = true;
            let x = data(rows * cols, seed, scale);
            let mut y_ref = vec![0.0f32; x.len()];
            softmax::cpu(&x, &mut y_ref, cols).unwrap();
            let (bx, by) = (sim.alloc(&x), sim.alloc_zeroed::<f32>(x.len()));
            let cfg = LaunchConfig::linear(rows as u32, 32 * warps);
            sim.launch("squid_softmax_f32", cfg, &[Arg::Ptr(bx), Arg::Ptr(by), Arg::I64(cols as i64)]).unwrap();
            for (r, s) in y_ref.iter().zip(&sim.read::<f32>(by).unwrap()) {
                prop_assert!((r - s).abs() <= 1e-6 + 2e-5 * r.abs(), "{} vs {}", r, s);
            }
        }
    }
}

/// Every registered kernel of squid-cuda, at both targets, is decoded completely: a kernel
/// added with an instruction the simulator lacks fails here, naming the instruction and line.
#[test]
fn every_registered_kernel_parses() {
    if !squid_cuda::testing::nvrtc_available() {
        return;
    }
    for arch in [Arch::SM80, Arch::SM90] {
        // One simulated device holding every module, as a test binary would use it.
        let mut device = Simulator::empty();
        for kernel in squid_cuda::KERNELS {
            let text = ptx(kernel, arch);
            device.load(&text).unwrap_or_else(|e| panic!("{} at {arch}: {e}", kernel.name));
        }
        let all: Vec<&str> = squid_cuda::KERNELS.iter().flat_map(|k| k.entries.iter().copied()).collect();
        for entry in &all {
            assert!(device.entries().contains(entry), "{entry} missing at {arch}");
        }
        // Loading a module twice is refused (entry names must be unique).
        let again = device.load(&ptx(&axpy::KERNEL, arch));
        assert!(matches!(again, Err(squid_ptxsim::Error::Launch { .. })), "{again:?}");
    }
}
