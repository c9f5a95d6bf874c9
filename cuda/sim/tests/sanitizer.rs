//! Each check shown catching a planted bug, with kernel, PTX line, block and thread.

mod common;

use common::kernel;
use squid_ptxsim::{Arg, Error, Fault, FaultKind, LaunchConfig, Simulator};

fn line_of(ptx: &str, needle: &str) -> usize {
    ptx.lines().position(|l| l.contains(needle)).expect("needle in the PTX") + 1
}

/// Launches `k` with an out buffer of `out_len` u32 and expects a fault.
fn fault(ptx: &str, cfg: LaunchConfig, out_len: usize) -> Fault {
    let mut sim = Simulator::new(ptx).unwrap_or_else(|e| panic!("{e}"));
    let bin = sim.alloc(&[0u32; 4]);
    let bout = sim.alloc_zeroed::<u32>(out_len);
    match sim.launch("k", cfg, &[Arg::Ptr(bout), Arg::Ptr(bin), Arg::U32(out_len as u32)]) {
        Err(Error::Fault(f)) => {
            // The message names all of it.
            let msg = f.to_string();
            assert!(msg.contains("kernel `k`") && msg.contains(&format!("PTX line {}", f.line)), "{msg}");
            *f
        }
        other => panic!("expected a fault, got {other:?}"),
    }
}

const DECLS: &str = ".reg .b32 %r<8>; .reg .b64 %rd<8>; .reg .pred %p<4>; .shared .align 4 .b8 sm[256];";

#[test]
fn out_of_bounds_global_write_is_caught() {
    // out[tid] for tid < 33 with a 32-element buffer: thread 32 writes one past the end.
    let ptx = kernel(DECLS, "    mul.wide.u32 %rd1, %r_tid, 4;\n    add.s64 %rd2, %rd_out, %rd1;\n    st.global.u32 [%rd2], %r_tid; // planted\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 33), 32);
    assert_eq!(f.line, line_of(&ptx, "planted"));
    assert_eq!((f.block, f.thread), ([0, 0, 0], [32, 0, 0]));
    match f.kind {
        FaultKind::OutOfBounds { space: "global", write: true, detail } => {
            assert!(detail.contains("offset 128 of buffer #1 (128 bytes long)"), "{detail}")
        }
        k => panic!("{k:?}"),
    }
    // The same kernel on 32 threads is clean.
    let mut sim = Simulator::new(&ptx).unwrap();
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(32));
    sim.launch("k", LaunchConfig::linear(1, 32), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(32)]).unwrap();
    assert_eq!(sim.read::<u32>(o).unwrap(), (0..32).collect::<Vec<u32>>());
}

#[test]
fn reads_before_a_buffer_and_in_no_buffer_are_caught() {
    let ptx = kernel(DECLS, "    ld.global.u32 %r1, [%rd_in+-4]; // planted\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 1), 4);
    assert!(
        matches!(&f.kind, FaultKind::OutOfBounds { write: false, detail, .. } if detail.contains("before buffer #0")),
        "{f}"
    );
    let ptx = kernel(DECLS, "    mov.u64 %rd1, 4096;\n    ld.global.u32 %r1, [%rd1]; // planted\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 1), 4);
    assert!(matches!(&f.kind, FaultKind::OutOfBounds { detail, .. } if detail.contains("in no buffer")), "{f}");
}

#[test]
fn misaligned_global_access_is_caught() {
    let ptx = kernel(DECLS, "    ld.global.u32 %r1, [%rd_in+2]; // planted\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 1), 4);
    assert_eq!(f.line, line_of(&ptx, "planted"));
    assert!(matches!(f.kind, FaultKind::Misaligned { space: "global", align: 4, .. }), "{f}");
    // A v4 load needs 16-byte alignment even when each element is aligned.
    let ptx = kernel(".reg .b32 %r<8>;", "    ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd_in+4]; // planted\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 1), 4);
    assert!(matches!(f.kind, FaultKind::Misaligned { align: 16, .. }), "{f}");
}

#[test]
fn shared_out_of_bounds_is_caught() {
    // sm is 256 bytes: thread 64 stores at byte 256.
    let ptx = kernel(DECLS, "    shl.b32 %r1, %r_tid, 2;\n    mov.u32 %r2, sm;\n    add.s32 %r3, %r2, %r1;\n    cvt.u64.u32 %rd1, %r3;\n    st.shared.u32 [%rd1], %r_tid; // planted\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 65), 4);
    assert_eq!(f.thread, [64, 0, 0]);
    assert!(matches!(&f.kind, FaultKind::OutOfBounds { space: "shared", write: true, .. }), "{f}");
}

#[test]
fn shared_race_without_barrier_is_caught_and_barrier_fixes_it() {
    // Thread 0 writes sm[0]; every thread reads it; planted: no bar.sync between.
    let body = |bar: &str| {
        format!(
            "    setp.ne.u32 %p1, %r_tid, 0;\n    @%p1 bra $L_r;\n    st.shared.u32 [sm], 5; // write\n$L_r:\n{bar}    ld.shared.u32 %r1, [sm]; // read\n    mul.wide.u32 %rd1, %r_tid, 4;\n    add.s64 %rd2, %rd_out, %rd1;\n    st.global.u32 [%rd2], %r1;\n"
        )
    };
    let ptx = kernel(DECLS, &body(""));
    let f = fault(&ptx, LaunchConfig::linear(1, 64), 64);
    assert_eq!(f.line, line_of(&ptx, "// read"));
    match f.kind {
        FaultKind::SharedRace { hazard, offset, other_thread, other_line } => {
            assert_eq!((hazard, offset, other_thread), ("read-after-write", 0, [0, 0, 0]));
            assert_eq!(other_line, line_of(&ptx, "// write"));
        }
        k => panic!("{k:?}"),
    }
    let ptx = kernel(DECLS, &body("    bar.sync 0;\n"));
    let mut sim = Simulator::new(&ptx).unwrap();
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(64));
    sim.launch("k", LaunchConfig::linear(1, 64), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(64)]).unwrap();
    assert_eq!(sim.read::<u32>(o).unwrap(), vec![5; 64]);
}

#[test]
fn write_after_read_race_is_caught() {
    // Thread t reads sm[(t+1) % 48] then writes sm[t]: thread t+1's write races with thread t's read.
    let body = "    mul.wide.u32 %rd1, %r_tid, 4;\n    mov.u64 %rd2, sm;\n    add.s64 %rd3, %rd2, %rd1;\n    st.shared.u32 [%rd3], 0;\n    bar.sync 0;\n    add.u32 %r2, %r_tid, 1;\n    rem.u32 %r2, %r2, 48;\n    mul.wide.u32 %rd4, %r2, 4;\n    add.s64 %rd5, %rd2, %rd4;\n    ld.shared.u32 %r1, [%rd5]; // read\n    st.shared.u32 [%rd3], %r1; // planted\n";
    let ptx = kernel(DECLS, body);
    let f = fault(&ptx, LaunchConfig::linear(1, 48), 4);
    assert_eq!(f.line, line_of(&ptx, "planted"));
    assert_eq!(f.thread, [1, 0, 0]);
    match f.kind {
        FaultKind::SharedRace { hazard, other_thread, other_line, .. } => {
            assert_eq!((hazard, other_thread), ("write-after-read", [0, 0, 0]));
            assert_eq!(other_line, line_of(&ptx, "// read"));
        }
        k => panic!("{k:?}"),
    }
}

#[test]
fn uninitialised_shared_read_is_caught() {
    let ptx = kernel(DECLS, "    ld.shared.u32 %r1, [sm+8]; // planted\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 1), 4);
    assert_eq!(f.line, line_of(&ptx, "planted"));
    assert_eq!(f.kind, FaultKind::UninitShared { offset: 8 });
}

#[test]
fn divergent_barrier_is_an_error_not_a_hang() {
    // Only threads < 16 reach the barrier.
    let ptx =
        kernel(DECLS, "    setp.ge.u32 %p1, %r_tid, 16;\n    @%p1 bra $L_end;\n    bar.sync 0; // planted\n$L_end:\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 64), 4);
    assert_eq!(f.line, line_of(&ptx, "planted"));
    match &f.kind {
        FaultKind::Barrier(msg) => {
            assert!(msg.contains("16 of 64 threads arrived") && msg.contains("48 threads had exited"), "{msg}")
        }
        k => panic!("{k:?}"),
    }
}

#[test]
fn shuffle_with_an_exited_lane_is_an_error() {
    let ptx = kernel(DECLS, "    setp.eq.u32 %p1, %r_tid, 5;\n    @%p1 bra $L_end;\n    shfl.sync.bfly.b32 %r1, %r_tid, 1, 31, -1; // planted\n$L_end:\n");
    let f = fault(&ptx, LaunchConfig::linear(1, 32), 4);
    assert!(matches!(&f.kind, FaultKind::Collective(m) if m.contains("lane 5")), "{f}");
}

#[test]
fn step_budget_stops_an_endless_loop() {
    let ptx = kernel(DECLS, "$L_forever:\n    bra.uni $L_forever;\n");
    let mut sim = Simulator::new(&ptx).unwrap();
    sim.options.step_limit = 10_000;
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(1));
    match sim.launch("k", LaunchConfig::linear(2, 4), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(1)]) {
        Err(Error::Fault(f)) => assert_eq!(f.kind, FaultKind::StepBudget { limit: 10_000 }),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_instruction_names_itself_and_its_line() {
    let ptx = kernel(DECLS, "    frobnicate.b32 %r1, %r2;\n");
    match Simulator::new(&ptx) {
        Err(Error::Unsupported { instruction, line }) => {
            assert_eq!(instruction, "frobnicate.b32");
            assert_eq!(line, line_of(&ptx, "frobnicate"));
        }
        other => panic!("{:?}", other.err()),
    }
    let bad = kernel(DECLS, "    add.s32 %r1, %nosuch, 1;\n");
    assert!(matches!(Simulator::new(&bad), Err(Error::Parse { .. })));
}

#[test]
fn bad_launches_are_typed_errors() {
    let ptx = kernel(DECLS, "");
    let mut sim = Simulator::new(&ptx).unwrap();
    let b = sim.alloc(&[0u32]);
    let launch = |args: &[Arg], cfg| sim.launch("k", cfg, args);
    let cfg = LaunchConfig::linear(1, 32);
    assert!(matches!(launch(&[Arg::Ptr(b)], cfg), Err(Error::Launch { .. })));
    assert!(matches!(launch(&[Arg::Ptr(b), Arg::Ptr(b), Arg::U64(1)], cfg), Err(Error::Launch { .. })));
    assert!(matches!(
        launch(&[Arg::Ptr(b), Arg::Ptr(b), Arg::U32(1)], LaunchConfig::linear(1, 2048)),
        Err(Error::Launch { .. })
    ));
    assert!(matches!(sim.launch("nope", cfg, &[]), Err(Error::Launch { .. })));
    let mut other = Simulator::new(&ptx).unwrap();
    let foreign = other.alloc(&[0u32]);
    assert!(matches!(sim.launch("k", cfg, &[Arg::Ptr(foreign), Arg::Ptr(b), Arg::U32(1)]), Err(Error::Buffer(_))));
}

#[test]
fn unmodelled_modifiers_are_refused() {
    for inst in
        ["fma.rn.relu.bf16x2 %r1, %r2, %r3, %r4;", "add.cc.u32 %r1, %r2, %r3;", "cvt.rn.satfinite.f16.f32 %rs1, %f1;"]
    {
        let ptx = kernel(".reg .b32 %r<8>; .reg .b16 %rs<2>; .reg .f32 %f<2>;", &format!("    {inst}\n"));
        assert!(matches!(Simulator::new(&ptx), Err(Error::Unsupported { .. })), "{inst}");
    }
}

#[test]
fn full_mask_collectives_wait_only_for_lanes_that_have_not_exited() {
    // Lanes 16..32 return early; lanes 0..16 then use the full mask (legal in the ISA).
    let body = "    setp.ge.u32 %p1, %r_tid, 16;\n    @%p1 bra $L_end;\n    \
                shfl.sync.bfly.b32 %r1, %r_tid, 1, 31, -1;\n    \
                setp.lt.u32 %p2, %r_tid, 3;\n    vote.sync.ballot.b32 %r2, %p2, -1;\n    \
                redux.sync.add.u32 %r3, %r_tid, -1;\n    setp.lt.u32 %p3, %r_tid, 16;\n    vote.sync.all.pred %p3, %p3, -1;\n    selp.u32 %r4, 1, 0, %p3;\n    \
                mul.wide.u32 %rd1, %r_tid, 16;\n    add.s64 %rd2, %rd_out, %rd1;\n    \
                st.global.v4.u32 [%rd2], {%r1, %r2, %r3, %r4};\n$L_end:\n";
    let ptx = kernel(DECLS, body);
    let mut sim = Simulator::new(&ptx).unwrap();
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(4 * 32));
    sim.launch("k", LaunchConfig::linear(1, 32), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = sim.read::<u32>(o).unwrap();
    for t in 0..16u32 {
        // shfl from lane t^1; ballot of lanes 0..3; the sum of 0..16; "tid < 16" holds on every live lane.
        assert_eq!(&out[4 * t as usize..4 * t as usize + 4], &[t ^ 1, 0b111, 120, 1], "lane {t}");
    }
    assert!(out[64..].iter().all(|&v| v == 0));
    // The exited lanes may exit after the others arrive (they run later here): lanes 0..16
    // wait at the shfl, lanes 16..32 exit, the shfl completes then.
    let late = kernel(
        DECLS,
        "    setp.lt.u32 %p1, %r_tid, 16;\n    @%p1 bra $L_go;\n    ret;\n$L_go:\n    shfl.sync.down.b32 %r1, %r_tid, 1, 15, -1;\n    \
         mul.wide.u32 %rd1, %r_tid, 4;\n    add.s64 %rd2, %rd_out, %rd1;\n    st.global.u32 [%rd2], %r1;\n",
    );
    let mut sim = Simulator::new(&late).unwrap();
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(32));
    sim.launch("k", LaunchConfig::linear(1, 32), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = sim.read::<u32>(o).unwrap();
    assert_eq!(&out[..16], &(0..16u32).map(|t| if t < 15 { t + 1 } else { t }).collect::<Vec<_>>()[..]);
    // Reading a value from an exited lane stays an error.
    let bad = kernel(DECLS, "    setp.ge.u32 %p1, %r_tid, 16;\n    @%p1 bra $L_end;\n    shfl.sync.idx.b32 %r1, %r_tid, 20, 31, -1; // planted\n$L_end:\n");
    let f = fault(&bad, LaunchConfig::linear(1, 32), 4);
    assert_eq!(f.line, line_of(&bad, "planted"));
    assert!(matches!(&f.kind, FaultKind::Collective(m) if m.contains("lane 20, which has exited")), "{f}");
}

#[test]
fn global_races_between_blocks_and_within_a_block_are_caught() {
    // Every block writes out[0]: a write-after-write race between blocks.
    let ptx = kernel(DECLS, "    setp.ne.u32 %p1, %r_tid, %r_ctaid;\n    @%p1 bra $L_end;\n    st.global.u32 [%rd_out], %r_ctaid; // planted\n$L_end:\n");
    let f = fault(&ptx, LaunchConfig::linear(4, 1), 4);
    assert_eq!(f.line, line_of(&ptx, "planted"));
    match &f.kind {
        FaultKind::GlobalRace { hazard: "write-after-write", detail, other_line, .. } => {
            assert!(detail.contains("offset 0 of buffer #1"), "{detail}");
            assert_eq!(*other_line, line_of(&ptx, "planted"));
        }
        k => panic!("{k:?}"),
    }
    // Thread 0 writes, thread 1 reads, no barrier: read-after-write; a barrier between fixes it.
    let body = |sync: &str| {
        format!(
            "    setp.ne.u32 %p1, %r_tid, 0;\n    @%p1 bra $L_skip;\n    st.global.u32 [%rd_out], 7; // the write\n$L_skip:\n{sync}    \
             setp.ne.u32 %p2, %r_tid, 1;\n    @%p2 bra $L_end;\n    ld.global.u32 %r1, [%rd_out]; // planted\n    st.global.u32 [%rd_out+4], %r1;\n$L_end:\n"
        )
    };
    let ptx = kernel(DECLS, &body(""));
    let f = fault(&ptx, LaunchConfig::linear(1, 2), 4);
    assert_eq!((f.line, f.thread), (line_of(&ptx, "planted"), [1, 0, 0]));
    assert!(
        matches!(&f.kind, FaultKind::GlobalRace { hazard: "read-after-write", other_block: [0, 0, 0], other_thread: [0, 0, 0], other_line, .. } if *other_line == line_of(&ptx, "the write")),
        "{f}"
    );
    let ptx = kernel(DECLS, &body("    bar.sync 0;\n"));
    let mut sim = Simulator::new(&ptx).unwrap();
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(2));
    sim.launch("k", LaunchConfig::linear(1, 2), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sim.read::<u32>(o).unwrap(), vec![7, 7]);
    // Thread 0 reads, thread 1 then writes: write-after-read.
    let ptx = kernel(
        DECLS,
        "    setp.ne.u32 %p1, %r_tid, 0;\n    @%p1 bra $L_w;\n    ld.global.u32 %r1, [%rd_in]; // the read\n    bra.uni $L_end;\n\
         $L_w:\n    st.global.u32 [%rd_in], 1; // planted\n$L_end:\n",
    );
    let f = fault(&ptx, LaunchConfig::linear(1, 2), 4);
    assert!(
        matches!(&f.kind, FaultKind::GlobalRace { hazard: "write-after-read", other_line, detail, .. } if *other_line == line_of(&ptx, "the read") && detail.contains("buffer #0")),
        "{f}"
    );
    // Atomics, neighbouring bytes and reads shared by many threads are not races.
    let ptx = kernel(
        DECLS,
        "    atom.global.add.u32 %r1, [%rd_out], 1;\n    ld.global.u32 %r2, [%rd_in];\n    \
         cvt.u64.u32 %rd1, %r_tid;\n    add.s64 %rd2, %rd_out, %rd1;\n    st.global.u8 [%rd2+4], %r_tid;\n",
    );
    let mut sim = Simulator::new(&ptx).unwrap();
    let (i, o) = (sim.alloc(&[5u32]), sim.alloc_zeroed::<u8>(4 + 64));
    sim.launch("k", LaunchConfig::linear(2, 32), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sim.read::<u8>(o).unwrap()[..5], [64, 0, 0, 0, 0]);
    // With the check off the racy kernel runs.
    let ptx = kernel(DECLS, "    st.global.u32 [%rd_out], %r_ctaid;\n");
    let mut sim = Simulator::new(&ptx).unwrap();
    sim.options.check_global = false;
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(1));
    sim.launch("k", LaunchConfig::linear(3, 1), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)]).unwrap();
}
