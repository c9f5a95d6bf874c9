//! Simulated thread-instructions per second on squid's kernels (needs NVRTC):
//! `cargo run --release -p squid-ptxsim --example throughput`.

use squid_cuda::ops::{axpy, softmax};
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
}
