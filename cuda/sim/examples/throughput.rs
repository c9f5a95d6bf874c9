//! Simulated thread-instructions per second on squid's kernels (needs NVRTC):
//! `cargo run --release -p squid-ptxsim --example throughput`.

use half::bf16;
use squid_cuda::ops::{axpy, gemm, logsumexp, softmax};
use squid_cuda::{Arch, CompileOptions};
use squid_ptxsim::{Arg, LaunchConfig, Simulator};

fn main() {
    let compile = |k| squid_cuda::compile(k, &CompileOptions::for_kernel(k, Arch::SM80)).expect("NVRTC").text;
    let mut sim = Simulator::new(&compile(&axpy::KERNEL)).expect("parses");
    let n = 1 << 20;
    let (x, y) = (sim.alloc(&vec![1.0f32; n]), sim.alloc(&vec![2.0f32; n]));
    let r = sim
        .launch(
            "squid_axpy_f32",
            LaunchConfig::linear(1024, 256),
            &[Arg::I64(n as i64), Arg::F32(0.5), Arg::Ptr(x), Arg::Ptr(y)],
        )
        .expect("runs");
    println!(
        "axpy f32 n={n}: {} thread-instructions in {:.3} s = {:.1} M/s",
        r.thread_instructions,
        r.seconds,
        r.thread_instructions_per_second() / 1e6
    );
    let mut sim = Simulator::new(&compile(&softmax::KERNEL)).expect("parses");
    let (rows, cols) = (512, 4096);
    let (x, y) = (sim.alloc(&vec![0.25f32; rows * cols]), sim.alloc_zeroed::<f32>(rows * cols));
    for check in [true, false] {
        sim.options.check_shared = check;
        let r = sim
            .launch(
                "squid_softmax_f32",
                LaunchConfig::linear(rows as u32, 256),
                &[Arg::Ptr(x), Arg::Ptr(y), Arg::I64(cols as i64)],
            )
            .expect("runs");
        println!(
            "softmax f32 {rows}x{cols} (shared checks {}): {} thread-instructions in {:.3} s = {:.1} M/s",
            if check { "on" } else { "off" },
            r.thread_instructions,
            r.seconds,
            r.thread_instructions_per_second() / 1e6
        );
    }
    let report = |what: String, r: squid_ptxsim::LaunchReport| {
        println!(
            "{what}: {} thread-instructions in {:.3} s = {:.1} M/s",
            r.thread_instructions,
            r.seconds,
            r.thread_instructions_per_second() / 1e6
        )
    };
    let mut sim = Simulator::new(&compile(&logsumexp::KERNEL)).expect("parses");
    let (x, out) = (sim.alloc(&vec![bf16::from_f32(0.5); rows * cols]), sim.alloc_zeroed::<f32>(rows));
    let cfg = LaunchConfig::linear((rows / 4) as u32, 128);
    let args = [Arg::Ptr(x), Arg::Ptr(out), Arg::I64(rows as i64), Arg::I64(cols as i64), Arg::F32(1.0)];
    report(format!("logsumexp bf16 {rows}x{cols}"), sim.launch("squid_logsumexp_bf16", cfg, &args).expect("runs"));
    let mut sim = Simulator::new(&compile(&gemm::KERNEL)).expect("parses");
    let (m, n, k) = (512usize, 512usize, 512usize);
    let a = sim.alloc(&vec![bf16::from_f32(0.5); m * k]);
    let b = sim.alloc(&vec![bf16::from_f32(0.25); k * n]);
    let c = sim.alloc_zeroed::<f32>(m * n);
    let cfg = LaunchConfig { grid: [(n / 64) as u32, (m / 64) as u32, 1], block: [128, 1, 1], dynamic_shared_bytes: 0 };
    let args = [Arg::Ptr(a), Arg::Ptr(b), Arg::Ptr(c), Arg::I32(m as i32), Arg::I32(n as i32), Arg::I32(k as i32)];
    report(format!("gemm bf16 {m}x{n}x{k}"), sim.launch("squid_gemm_bf16_f32", cfg, &args).expect("runs"));
    assert!(sim.read::<f32>(c).expect("reads").iter().all(|&v| v == 0.125 * k as f32));
    // What each check and the profile cost on the gemm.
    for (what, shared, global, profile) in [
        ("no checks", false, false, false),
        ("shared checks only", true, false, false),
        ("global checks only", false, true, false),
        ("all checks, profile on", true, true, true),
    ] {
        sim.options.check_shared = shared;
        sim.options.check_global = global;
        sim.options.profile = profile;
        report(format!("gemm bf16 {m}x{n}x{k} ({what})"), sim.launch("squid_gemm_bf16_f32", cfg, &args).expect("runs"));
    }
}
