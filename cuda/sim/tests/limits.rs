//! Bounds on what a launch or a module may ask for: a launch-wide step budget that stops every
//! block at once, lazily expanded register ranges, and typed errors (never an allocation
//! abort) for huge grids and huge `.local`/`.global` declarations.

mod common;

use common::kernel;
use squid_ptxsim::{Arg, Error, FaultKind, LaunchConfig, Simulator};

const DECLS: &str = ".reg .b32 %r<8>; .reg .b64 %rd<8>; .reg .pred %p<4>;";

#[test]
fn the_step_budget_stops_the_whole_launch_at_once() {
    // Each block counts itself in out[0], then loops forever: with a launch-wide budget the
    // launch stops long before every block has started (a per-thread budget ran them all).
    let ptx = kernel(DECLS, "    atom.global.add.u32 %r1, [%rd_out], 1;\n$L_forever:\n    bra.uni $L_forever;\n");
    let mut sim = Simulator::new(&ptx).unwrap();
    sim.options.step_limit = 200_000;
    let blocks = 2048;
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(1));
    match sim.launch("k", LaunchConfig::linear(blocks, 32), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)]) {
        Err(Error::Fault(f)) => assert_eq!(f.kind, FaultKind::StepBudget { limit: 200_000 }, "{f}"),
        other => panic!("{other:?}"),
    }
    let started = sim.read::<u32>(o).unwrap()[0];
    // One block spends the budget in 6250 loop iterations per thread; a few more may start
    // on other workers before they see the stop.
    assert!(started >= 1 && started < blocks / 8, "{started} of {blocks} blocks started");
    // A launch within the budget runs, and reports every thread-instruction.
    let ok = kernel(DECLS, "    mov.u32 %r1, 1;\n");
    let mut sim = Simulator::new(&ok).unwrap();
    sim.options.step_limit = 64 * 32 * 20;
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(1));
    let r = sim.launch("k", LaunchConfig::linear(64, 32), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)]).unwrap();
    assert_eq!(r.blocks, 64);
    assert!(r.thread_instructions > 64 * 32 && r.thread_instructions <= 64 * 32 * 20);
}

#[test]
fn a_huge_register_range_costs_only_the_registers_used() {
    let ptx = kernel(
        ".reg .b64 %rbig<1000000000>; .reg .b32 %r<10000000>; .reg .b64 %rd<4>;",
        "    mov.u64 %rbig999999999, 40;\n    cvt.u32.u64 %r9999999, %rbig999999999;\n    add.u32 %r3, %r9999999, 2;\n    \
         st.global.u32 [%rd_out], %r3;\n",
    );
    let mut sim = Simulator::new(&ptx).unwrap_or_else(|e| panic!("{e}"));
    let f = &sim.modules().next().unwrap().entries["k"];
    assert!(f.num_regs < 16, "{} registers", f.num_regs);
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(1));
    sim.launch("k", LaunchConfig::linear(1, 1), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)]).unwrap();
    assert_eq!(sim.read::<u32>(o).unwrap(), vec![42]);
    // A name past the range is not a register.
    let bad = kernel(".reg .b32 %q<4>;", "    mov.u32 %q4, 1;\n");
    assert!(matches!(Simulator::new(&bad), Err(Error::Parse { .. })));
    let bad = kernel(".reg .b32 %q<4>;", "    mov.u32 %q01, 1;\n");
    assert!(matches!(Simulator::new(&bad), Err(Error::Parse { .. })));
}

#[test]
fn huge_grids_are_typed_errors() {
    let ptx = kernel(DECLS, "");
    let mut sim = Simulator::new(&ptx).unwrap();
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(1));
    let args = [Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)];
    for grid in [[u32::MAX, 1, 1], [1, 65536, 1], [1, 1, 1 << 20]] {
        let cfg = LaunchConfig { grid, block: [32, 1, 1], dynamic_shared_bytes: 0 };
        let e = sim.launch("k", cfg, &args).unwrap_err();
        assert!(matches!(&e, Error::Launch { message, .. } if message.contains("CUDA allows")), "{e}");
    }
    // 2^31 - 1 blocks are legal in CUDA but far past the step budget: refused up front.
    let e = sim.launch("k", LaunchConfig::linear(i32::MAX as u32, 32), &args).unwrap_err();
    assert!(matches!(&e, Error::Launch { message, .. } if message.contains("step budget")), "{e}");
}

#[test]
fn huge_local_and_global_declarations_are_typed_errors() {
    for decl in [
        ".local .align 4 .b8 big[1000000000000];",
        ".local .b32 big[4294967296][4294967296];",
        ".local .b64 big[2305843009213693952];",
    ] {
        let ptx = kernel(&format!("{DECLS} {decl}"), "");
        match Simulator::new(&ptx) {
            Err(Error::Parse { message, .. }) => assert!(message.contains("limit"), "{message}"),
            other => panic!("{decl}: {:?}", other.err()),
        }
    }
    let global = kernel(DECLS, "").replacen(
        ".address_size 64\n",
        ".address_size 64\n.global .align 8 .b8 g[1000000000000];\n",
        1,
    );
    assert!(matches!(Simulator::new(&global), Err(Error::Parse { .. })));
    // Many variables that together pass the limit.
    let many: String = (0..3).map(|k| format!(".global .b8 g{k}[500000000];\n")).collect();
    let ptx = kernel(DECLS, "").replacen(".address_size 64\n", &format!(".address_size 64\n{many}"), 1);
    assert!(matches!(Simulator::new(&ptx), Err(Error::Parse { .. })));
    // Local memory over CUDA's 512 KiB per thread parses but does not launch.
    let ptx = kernel(&format!("{DECLS} .local .align 4 .b8 big[1048576];"), "");
    let mut sim = Simulator::new(&ptx).unwrap();
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(1));
    let e = sim.launch("k", LaunchConfig::linear(1, 1024), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)]).unwrap_err();
    assert!(matches!(&e, Error::Launch { message, .. } if message.contains("local memory")), "{e}");
}
