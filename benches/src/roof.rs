//! The machine's own roofs, measured in the run that quotes them: the FMA peak (independent
//! fused multiply-adds in registers, no memory traffic) per ISA on one core and on all cores,
//! the copy bandwidth, and which CPU it was.
//!
//! A GFLOP/s figure means nothing without the roof of the machine it ran on: cloud machines of
//! one kind are not all the same CPU (a Zen 4 core executes AVX-512 as two 256-bit halves, a
//! Zen 5 core at full width; a Zen 3 core has no AVX-512 at all), and a library's matmul is not
//! a roof (the gemm crate runs AVX2 kernels on AVX-512 machines).

use std::time::Instant;

use rayon::prelude::*;

/// The CPU as the OS names it (`/proc/cpuinfo` on Linux; `unknown` fields elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// `model name`, e.g. `AMD EPYC 9R14 96-Core Processor`.
    pub model_name: String,
    /// `vendor_id`, e.g. `AuthenticAMD`.
    pub vendor: String,
    /// `cpu family` (25 = AMD Zen 3/Zen 4, 26 = Zen 5; 6 = Intel Core/Xeon).
    pub family: String,
    /// `model` number within the family.
    pub model: String,
    /// `stepping`.
    pub stepping: String,
    /// Logical CPUs this process may run on.
    pub threads: usize,
}

impl CpuInfo {
    /// Reads the first processor's entry of `/proc/cpuinfo` (fields it lacks read `unknown`).
    pub fn detect() -> Self {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::parse(&text, std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Parses the first processor's entry of a `/proc/cpuinfo` text.
    pub fn parse(cpuinfo: &str, threads: usize) -> Self {
        let first = cpuinfo.split("\n\n").next().unwrap_or("");
        let field = |key: &str| {
            first
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == key)
                .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string())
        };
        Self {
            model_name: field("model name"),
            vendor: field("vendor_id"),
            family: field("cpu family"),
            model: field("model"),
            stepping: field("stepping"),
            threads,
        }
    }

    /// One line: `AMD EPYC (AuthenticAMD family 25 model 1 stepping 1), 2 threads`.
    pub fn summary(&self) -> String {
        format!(
            "{} ({} family {} model {} stepping {}), {} threads",
            self.model_name, self.vendor, self.family, self.model, self.stepping, self.threads
        )
    }
}

/// The instruction set an FMA loop runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FmaIsa {
    /// 512-bit `vfmadd231ps` (16 f32 lanes).
    Avx512,
    /// 256-bit `vfmadd231ps` (8 f32 lanes).
    Avx2,
    /// One f32 FMA per instruction (`vfmadd231ss`, or the target's scalar FMA).
    Scalar,
}

impl FmaIsa {
    /// Every ISA, widest first.
    pub const ALL: [FmaIsa; 3] = [FmaIsa::Avx512, FmaIsa::Avx2, FmaIsa::Scalar];

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            FmaIsa::Avx512 => "avx512",
            FmaIsa::Avx2 => "avx2",
            FmaIsa::Scalar => "scalar",
        }
    }

    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                FmaIsa::Avx512 => std::is_x86_feature_detected!("avx512f"),
                FmaIsa::Avx2 | FmaIsa::Scalar => {
                    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == FmaIsa::Scalar
        }
    }

    /// FLOPs of one loop iteration (an FMA counts two).
    fn flops_per_iter(self) -> f64 {
        let lanes = match self {
            FmaIsa::Avx512 => 16.0,
            FmaIsa::Avx2 => 8.0,
            FmaIsa::Scalar => 1.0,
        };
        ACCUMULATORS as f64 * lanes * 2.0
    }

    /// Runs `iters` iterations; returns a value that depends on every FMA (so none is removed).
    fn run(self, iters: u64) -> f32 {
        let (a, b) = (std::hint::black_box(0.5f32), std::hint::black_box(0.25f32));
        #[cfg(target_arch = "x86_64")]
        {
            assert!(self.available(), "{} is not available on this CPU", self.name());
            // SAFETY: the CPU supports the ISA (checked above), which is all these need.
            unsafe {
                match self {
                    FmaIsa::Avx512 => x86::fma_avx512(iters, a, b),
                    FmaIsa::Avx2 => x86::fma_avx2(iters, a, b),
                    FmaIsa::Scalar => x86::fma_scalar(iters, a, b),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            portable_scalar(iters, a, b)
        }
    }
}

/// Independent accumulators per loop: enough to cover FMA latency times the FMA ports of current
/// cores (4 cycles x 2 ports on Zen 3-5 and Intel since Skylake), fewer than the 16 named ymm
/// registers so none spills.
const ACCUMULATORS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::ACCUMULATORS;

    /// 12 independent `acc = a*b + acc` chains of 512-bit FMAs.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_avx512(iters: u64, a: f32, b: f32) -> f32 {
        let (va, vb) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
        let mut acc = [_mm512_setzero_ps(); ACCUMULATORS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(va, vb, *r);
            }
        }
        acc.iter().map(|r| _mm512_reduce_add_ps(*r)).sum()
    }

    /// 12 independent chains of 256-bit FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_avx2(iters: u64, a: f32, b: f32) -> f32 {
        let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        let mut acc = [_mm256_setzero_ps(); ACCUMULATORS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(va, vb, *r);
            }
        }
        let mut lanes = [0.0f32; 8];
        let mut total = 0.0;
        for r in acc {
            // SAFETY: `lanes` holds the 8 f32s an unaligned store writes.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), r) };
            total += lanes.iter().sum::<f32>();
        }
        total
    }

    /// 12 independent chains of scalar FMAs, written in assembly so the compiler cannot pack
    /// the independent scalar chains into vector instructions (which would measure AVX).
    #[target_feature(enable = "fma")]
    pub(super) unsafe fn fma_scalar(iters: u64, a: f32, b: f32) -> f32 {
        let mut acc = [0.0f32; ACCUMULATORS];
        if iters == 0 {
            return 0.0;
        }
        let [mut x0, mut x1, mut x2, mut x3, mut x4, mut x5, mut x6, mut x7, mut x8, mut x9, mut x10, mut x11] = acc;
        // SAFETY: register-only arithmetic and a counted loop; the counter is decremented to 0.
        unsafe {
            std::arch::asm!(
                "2:",
                "vfmadd231ss {x0}, {a}, {b}",
                "vfmadd231ss {x1}, {a}, {b}",
                "vfmadd231ss {x2}, {a}, {b}",
                "vfmadd231ss {x3}, {a}, {b}",
                "vfmadd231ss {x4}, {a}, {b}",
                "vfmadd231ss {x5}, {a}, {b}",
                "vfmadd231ss {x6}, {a}, {b}",
                "vfmadd231ss {x7}, {a}, {b}",
                "vfmadd231ss {x8}, {a}, {b}",
                "vfmadd231ss {x9}, {a}, {b}",
                "vfmadd231ss {x10}, {a}, {b}",
                "vfmadd231ss {x11}, {a}, {b}",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters => _,
                a = in(xmm_reg) a,
                b = in(xmm_reg) b,
                x0 = inout(xmm_reg) x0,
                x1 = inout(xmm_reg) x1,
                x2 = inout(xmm_reg) x2,
                x3 = inout(xmm_reg) x3,
                x4 = inout(xmm_reg) x4,
                x5 = inout(xmm_reg) x5,
                x6 = inout(xmm_reg) x6,
                x7 = inout(xmm_reg) x7,
                x8 = inout(xmm_reg) x8,
                x9 = inout(xmm_reg) x9,
                x10 = inout(xmm_reg) x10,
                x11 = inout(xmm_reg) x11,
                options(nomem, nostack),
            );
        }
        acc = [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11];
        acc.iter().sum()
    }
}

/// Scalar FMA chains for targets without a hand-written loop (`mul_add` is the target's FMA
/// where it has one; the figure is then what this compiler makes of it).
#[cfg(not(target_arch = "x86_64"))]
fn portable_scalar(iters: u64, a: f32, b: f32) -> f32 {
    let mut acc = [0.0f32; ACCUMULATORS];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = a.mul_add(b, *r);
        }
    }
    acc.iter().sum()
}

/// One measured FMA throughput.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FmaRate {
    /// The ISA.
    pub isa: FmaIsa,
    /// Threads that ran the loop at once (one per core or hardware thread).
    pub threads: usize,
    /// GFLOP/s of all of them together (an FMA counts two FLOPs).
    pub gflops: f64,
}

/// The FMA throughput of `isa` on `threads` threads at once: each runs the same loop, the rate
/// is their FLOPs over the wall time of the slowest; the best of `repeats` runs of about
/// `seconds` each (a peak: interference only lowers it). `None` when the CPU lacks the ISA.
pub fn fma_rate(isa: FmaIsa, threads: usize, seconds: f64, repeats: usize) -> Option<FmaRate> {
    if !isa.available() || threads == 0 {
        return None;
    }
    // Calibrate the iteration count on one thread.
    let mut iters = 1u64 << 14;
    loop {
        let t = Instant::now();
        std::hint::black_box(isa.run(iters));
        let dt = t.elapsed().as_secs_f64();
        if dt > 0.02 || iters >= 1 << 40 {
            iters = ((iters as f64) * (seconds / dt.max(1e-9))).clamp(1.0, (1u64 << 40) as f64) as u64;
            break;
        }
        iters *= 4;
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok()?;
    let mut best = 0.0f64;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        pool.install(|| {
            (0..threads).into_par_iter().for_each(|_| {
                std::hint::black_box(isa.run(iters));
            })
        });
        let dt = t.elapsed().as_secs_f64();
        best = best.max(threads as f64 * iters as f64 * isa.flops_per_iter() / dt / 1e9);
    }
    Some(FmaRate { isa, threads, gflops: best })
}

/// The roofs one run judges its figures against.
#[derive(Debug, Clone, PartialEq)]
pub struct Roof {
    /// The CPU.
    pub cpu: CpuInfo,
    /// The widest available ISA's FMA rate on all threads: the compute roof.
    pub fma: FmaRate,
    /// Copy bandwidth on all threads, GB/s (read + write counted, as STREAM does).
    pub copy_gbps: f64,
}

impl Roof {
    /// Measures the roofs (about a second): FMA on all threads with the widest ISA, and a
    /// 64 MiB parallel copy (best of three).
    pub fn measure() -> Self {
        let cpu = CpuInfo::detect();
        let threads = rayon::current_num_threads();
        let fma = FmaIsa::ALL.iter().find_map(|&isa| fma_rate(isa, threads, 0.15, 3)).unwrap_or(FmaRate {
            isa: FmaIsa::Scalar,
            threads,
            gflops: f64::NAN,
        });
        Self { cpu, fma, copy_gbps: copy_gbps(64 << 20, 3) }
    }

    /// `rate` as a fraction of the roof of its kind: GFLOP/s of the FMA peak, GB/s of copy.
    pub fn fraction(&self, unit: &str, rate: f64) -> Option<f64> {
        match unit {
            "gflops" => Some(rate / self.fma.gflops),
            "gbps" => Some(rate / self.copy_gbps),
            _ => None,
        }
    }

    /// Two lines naming the machine and its roofs.
    pub fn describe(&self) -> String {
        format!(
            "machine: {}\nroofs (this run): FMA peak {:.1} GFLOP/s ({} x {} threads), copy {:.1} GB/s",
            self.cpu.summary(),
            self.fma.gflops,
            self.fma.isa.name(),
            self.fma.threads,
            self.copy_gbps
        )
    }
}

/// The best of `repeats` parallel copies of `bytes` bytes, in GB/s (read + write counted).
pub fn copy_gbps(bytes: usize, repeats: usize) -> f64 {
    let len = bytes / 4;
    let src = vec![1.0f32; len];
    let mut dst = vec![0.0f32; len];
    // First touch outside the timing.
    dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
    let mut best = 0.0f64;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.max(2.0 * (len * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&dst);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_fields_come_from_the_first_processor() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n\
                    model name\t: AMD EPYC 9R14\nstepping\t: 1\nflags\t\t: fma avx2\n\n\
                    processor\t: 1\nvendor_id\t: Other\n";
        let cpu = CpuInfo::parse(text, 2);
        assert_eq!(cpu.vendor, "AuthenticAMD");
        assert_eq!(cpu.family, "25");
        assert_eq!(cpu.model, "17");
        assert_eq!(cpu.model_name, "AMD EPYC 9R14");
        assert_eq!(cpu.summary(), "AMD EPYC 9R14 (AuthenticAMD family 25 model 17 stepping 1), 2 threads");
        assert_eq!(CpuInfo::parse("", 1).family, "unknown");
    }

    #[test]
    fn every_available_loop_computes_its_fmas() {
        // 0.5 * 0.25 added `iters` times to each of the accumulators (and lanes): exact in f32.
        for isa in FmaIsa::ALL.into_iter().filter(|i| i.available()) {
            let lanes = isa.flops_per_iter() / 2.0;
            let got = isa.run(64);
            assert_eq!(got as f64, 64.0 * 0.125 * lanes, "{}", isa.name());
        }
    }

    #[test]
    fn a_rate_is_positive_and_missing_isas_are_none() {
        for isa in FmaIsa::ALL.into_iter().filter(|i| i.available()) {
            let r = fma_rate(isa, 1, 0.005, 1).expect("an available ISA has a rate");
            assert!(r.gflops > 0.0 && r.gflops.is_finite(), "{r:?}");
        }
        for isa in FmaIsa::ALL.into_iter().filter(|i| !i.available()) {
            assert!(fma_rate(isa, 1, 0.005, 1).is_none());
        }
    }
}
