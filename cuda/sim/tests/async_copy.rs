//! `cp.async`: zero fill for any src-size, the ignore-src predicate, and the pending-copy
//! check (a destination read before the wait that covers it, or by another thread before the
//! barrier after that wait).

mod common;

use common::kernel;
use squid_ptxsim::{Arg, Error, Fault, FaultKind, LaunchConfig, Simulator};

fn line_of(ptx: &str, needle: &str) -> usize {
    ptx.lines().position(|l| l.contains(needle)).expect("needle in the PTX") + 1
}

const DECLS: &str = ".reg .b32 %r<12>; .reg .b64 %rd<8>; .reg .pred %p<4>; .shared .align 16 .b8 sm[256];";

/// One thread copies 16 source bytes (0x01..=0x10) with `copy` (which names `[%r1]` as the
/// destination and `%r_n` as the launch's n), waits, and writes the 16 shared bytes out.
fn copy_out(copy: &str, n: u32) -> Vec<u8> {
    let body = format!(
        "    mov.u32 %r1, sm;\n    {copy}\n    cp.async.commit_group;\n    cp.async.wait_group 0;\n    \
         ld.shared.v4.u32 {{%r4, %r5, %r6, %r7}}, [%r1];\n    st.global.v4.u32 [%rd_out], {{%r4, %r5, %r6, %r7}};\n"
    );
    let ptx = kernel(DECLS, &body);
    let mut sim = Simulator::new(&ptx).unwrap_or_else(|e| panic!("{e}"));
    let src: Vec<u8> = (1..=16).collect();
    let (i, o) = (sim.alloc(&src), sim.alloc_zeroed::<u8>(16));
    sim.launch("k", LaunchConfig::linear(1, 1), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(n)])
        .unwrap_or_else(|e| panic!("{e}"));
    sim.read(o).unwrap()
}

fn expected(copied: usize, cp_size: usize) -> Vec<u8> {
    (0..16u8)
        .map(|b| {
            if usize::from(b) < copied {
                b + 1
            } else if usize::from(b) < cp_size {
                0
            } else {
                0xee
            }
        })
        .collect()
}

#[test]
fn src_size_zero_fills_the_rest_for_every_size() {
    for cp_size in [4usize, 8, 16] {
        for src_size in 0..=cp_size as u32 {
            // The bytes past cp-size keep a marker the kernel writes first.
            let copy = format!(
                "mov.u32 %r2, 0xeeeeeeee;\n    st.shared.v4.u32 [%r1], {{%r2, %r2, %r2, %r2}};\n    \
                 cp.async.ca.shared.global [%r1], [%rd_in], {cp_size}, %r_n;"
            );
            assert_eq!(
                copy_out(&copy, src_size),
                expected(src_size as usize, cp_size),
                "cp-size {cp_size}, src-size {src_size}"
            );
        }
    }
}

#[test]
fn ignore_src_predicate_zero_fills_when_true_and_copies_when_false() {
    let copy = "setp.ne.u32 %p1, %r_n, 0;\n    cp.async.cg.shared.global [%r1], [%rd_in], 16, %p1;";
    assert_eq!(copy_out(copy, 0), expected(16, 16), "ignore-src false copies");
    assert_eq!(copy_out(copy, 1), expected(0, 16), "ignore-src true zero-fills");
    let negated = "setp.ne.u32 %p1, %r_n, 0;\n    cp.async.ca.shared.global [%r1], [%rd_in], 16, !%p1;";
    assert_eq!(copy_out(negated, 1), expected(16, 16));
    assert_eq!(copy_out(negated, 0), expected(0, 16));
}

fn launch(ptx: &str, threads: u32) -> Result<Vec<u32>, Box<Fault>> {
    let mut sim = Simulator::new(ptx).unwrap_or_else(|e| panic!("{e}"));
    let (i, o) = (sim.alloc(&(0..64u32).collect::<Vec<_>>()), sim.alloc_zeroed::<u32>(64));
    match sim.launch("k", LaunchConfig::linear(1, threads), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)]) {
        Ok(_) => Ok(sim.read(o).unwrap()),
        Err(Error::Fault(f)) => {
            let msg = f.to_string();
            assert!(msg.contains("kernel `k`") && msg.contains(&format!("PTX line {}", f.line)), "{msg}");
            Err(f)
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn reading_a_copy_before_its_wait_is_an_error() {
    let ptx = kernel(
        DECLS,
        "    mov.u32 %r1, sm;\n    cp.async.ca.shared.global [%r1], [%rd_in], 16; // the copy\n    cp.async.commit_group;\n    \
         ld.shared.u32 %r2, [%r1+4]; // planted\n    cp.async.wait_group 0;\n    st.global.u32 [%rd_out], %r2;\n",
    );
    let f = launch(&ptx, 1).unwrap_err();
    assert_eq!(f.line, line_of(&ptx, "planted"));
    assert_eq!(
        f.kind,
        FaultKind::AsyncCopyPending {
            write: false,
            offset: 4,
            issuer: [0, 0, 0],
            copy_line: line_of(&ptx, "the copy")
        }
    );
    // With the wait first it is clean.
    let fixed = ptx.replace(
        "    ld.shared.u32 %r2, [%r1+4]; // planted\n    cp.async.wait_group 0;\n",
        "    cp.async.wait_group 0;\n    ld.shared.u32 %r2, [%r1+4];\n",
    );
    assert_eq!(launch(&fixed, 1).unwrap()[0], 1);
}

#[test]
fn wait_group_n_leaves_the_newest_n_groups_pending() {
    // Two groups (bytes 0..16 and 16..32); wait_group 1 completes the first only.
    let body =
        "    mov.u32 %r1, sm;\n    cp.async.ca.shared.global [%r1], [%rd_in], 16;\n    cp.async.commit_group;\n    \
                cp.async.ca.shared.global [%r1+16], [%rd_in+16], 16; // second\n    cp.async.commit_group;\n    \
                cp.async.wait_group 1;\n    ld.shared.u32 %r2, [%r1+12];\n    st.global.u32 [%rd_out], %r2;\n    \
                ld.shared.u32 %r3, [%r1+16]; // planted\n";
    let ptx = kernel(DECLS, body);
    let f = launch(&ptx, 1).unwrap_err();
    assert_eq!(f.line, line_of(&ptx, "planted"));
    assert!(
        matches!(f.kind, FaultKind::AsyncCopyPending { offset: 16, copy_line, .. } if copy_line == line_of(&ptx, "second")),
        "{f}"
    );
    // An uncommitted copy is not covered by wait_group 0 either; wait_all commits it.
    let open =
        "    mov.u32 %r1, sm;\n    cp.async.ca.shared.global [%r1], [%rd_in], 16;\n    cp.async.wait_group 0;\n    \
                ld.shared.u32 %r2, [%r1]; // planted\n";
    let ptx = kernel(DECLS, open);
    assert_eq!(launch(&ptx, 1).unwrap_err().line, line_of(&ptx, "planted"));
    let ptx = kernel(
        DECLS,
        &open.replace("wait_group 0", "wait_all").replace("// planted", "\n    st.global.u32 [%rd_out], %r2;"),
    );
    assert_eq!(launch(&ptx, 1).unwrap()[0], 0);
}

/// Thread `copier` copies, the other of two threads reads the copy: `between` goes after the
/// copy (copier only), `reader_sync` before the read.
fn two_threads(copier: u32, between: &str, reader_sync: &str) -> String {
    kernel(
        DECLS,
        &format!(
            "    mov.u32 %r1, sm;\n    setp.ne.u32 %p1, %r_tid, {copier};\n    @%p1 bra $L_reader;\n    \
             cp.async.ca.shared.global [%r1], [%rd_in], 16; // the copy\n    cp.async.commit_group;\n{between}    bra.uni $L_end;\n\
             $L_reader:\n{reader_sync}    ld.shared.u32 %r2, [%r1+8]; // planted\n    st.global.u32 [%rd_out], %r2;\n$L_end:\n"
        ),
    )
}

#[test]
fn another_thread_must_wait_for_the_barrier_after_the_wait() {
    // The wait after the barrier (the classic missing-wait pipeline bug): thread 0 reads the
    // copy thread 1 issued while it is pending.
    let ptx = two_threads(1, "    bar.sync 0;\n    cp.async.wait_group 0;\n", "    bar.sync 0;\n");
    let f = launch(&ptx, 2).unwrap_err();
    assert_eq!((f.line, f.thread), (line_of(&ptx, "planted"), [0, 0, 0]));
    assert_eq!(
        f.kind,
        FaultKind::AsyncCopyPending {
            write: false,
            offset: 8,
            issuer: [1, 0, 0],
            copy_line: line_of(&ptx, "the copy")
        }
    );
    // The same bug where the simulator happens to run the copier's wait first: the read is
    // then a race with the copy (no barrier after the wait).
    for between in ["    bar.sync 0;\n    cp.async.wait_group 0;\n", "    cp.async.wait_group 0;\n    bar.sync 0;\n"] {
        let reader_sync = if between.starts_with("    bar") { "    bar.sync 0;\n" } else { "" };
        let ptx = two_threads(0, between, reader_sync);
        let f = launch(&ptx, 2).unwrap_err();
        assert_eq!((f.line, f.thread), (line_of(&ptx, "planted"), [1, 0, 0]));
        assert!(
            matches!(f.kind, FaultKind::SharedRace { hazard: "read-after-write", other_thread: [0, 0, 0], other_line, .. } if other_line == line_of(&ptx, "the copy")),
            "{f}"
        );
    }
    // Wait, then barrier, then read: clean.
    for copier in [0, 1] {
        let ptx = two_threads(copier, "    cp.async.wait_group 0;\n    bar.sync 0;\n", "    bar.sync 0;\n");
        assert_eq!(launch(&ptx, 2).unwrap()[0], 2);
    }
}
