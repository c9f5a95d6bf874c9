//! The MPI backend in a world of one: MPI initialised as a singleton (no `mpirun`), in a child
//! process of the test binary (MPI can be initialised once per process, and the timeout test
//! ends its process with `MPI_Abort`). The multi-rank checks are `examples/mpi_check.rs`, run
//! under `mpirun`.
//!
//! Each parent test re-runs this test binary on one ignored child test with
//! `SQUID_MPI_CHILD=1` (and Open MPI's run-as-root variables). A child prints `MPI-INIT-OK`
//! once MPI is initialised: without it, the parent skips with the child's output as the reason
//! (MPI cannot start here); with it, any other outcome fails the test.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use half::{bf16, f16};

use super::*;
use crate::reference;

const CHILD_ENV: &str = "SQUID_MPI_CHILD";
const INIT_OK: &str = "MPI-INIT-OK";
const CHECKS_OK: &str = "MPI-SINGLETON-OK";
const TIMEOUT_OK: &str = "MPI-TIMEOUT-OK";

/// Runs the ignored test `name` of this binary in a child process (killed after `limit`).
fn run_child(name: &str, limit: Duration) -> Output {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new(exe)
        .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the test binary starts");
    let start = Instant::now();
    while child.try_wait().expect("waiting for the child").is_none() {
        if start.elapsed() > limit {
            child.kill().expect("kill the child");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("the child's output")
}

/// The child's output, or `None` (after printing why) when MPI could not start in it.
fn child_output(name: &str, limit: Duration) -> Option<(Output, String)> {
    let output = run_child(name, limit);
    let text = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !text.contains(INIT_OK) {
        println!("SKIPPED {name}: MPI could not be initialised as a singleton here ({:?}):\n{text}", output.status);
        return None;
    }
    Some((output, text))
}

fn is_child() -> bool {
    let child = std::env::var_os(CHILD_ENV).is_some();
    if !child {
        println!("run by its parent test in a child process");
    }
    child
}

fn values<T: Scalar>(len: usize, salt: usize, from_f32: impl Fn(f32) -> T) -> Vec<T> {
    (0..len).map(|i| from_f32((((i * 7 + salt * 13) % 23) as f32 - 11.0) * 0.375)).collect()
}

/// Every collective of a world of one, for one element type, against the reference.
fn world_of_one<T: Scalar>(comm: &MpiComm, from_f32: impl Fn(f32) -> T) {
    for len in [0usize, 1, 5, 1000, 4099] {
        let x = values(len, 1, &from_f32);
        let inputs = vec![x.clone()];
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min, ReduceOp::Prod] {
            let mut out = vec![T::default(); len];
            comm.all_reduce(&x, &mut out, op).unwrap();
            assert_eq!(out, reference::all_reduce(&inputs, op), "all_reduce {op:?} {} len {len}", T::DTYPE);
            let mut out = vec![T::default(); len];
            comm.reduce_scatter(&x, &mut out, op).unwrap();
            assert_eq!(out, reference::reduce_scatter(&inputs, op)[0], "reduce_scatter {op:?} {}", T::DTYPE);
        }
        let mut out = vec![T::default(); len];
        comm.all_gather(&x, &mut out).unwrap();
        assert_eq!(out, x, "all_gather {} len {len}", T::DTYPE);
        let mut buf = x.clone();
        comm.broadcast(&mut buf, 0).unwrap();
        assert_eq!(buf, x, "broadcast {} len {len}", T::DTYPE);
    }
    comm.barrier().unwrap();
}

#[test]
#[ignore = "run by `singleton_world_of_one_matches_reference` in a child process"]
fn child_singleton_checks() {
    if !is_child() {
        return;
    }
    let comm = MpiComm::init(MpiOptions::default()).unwrap();
    println!("{INIT_OK}");
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    world_of_one::<f32>(&comm, |x| x);
    world_of_one::<bf16>(&comm, bf16::from_f32);
    world_of_one::<f16>(&comm, f16::from_f32);
    world_of_one::<i32>(&comm, |x| (x * 8.0) as i32);
    world_of_one::<i64>(&comm, |x| (x * 8.0) as i64 * 1_000_000_007);

    // Typed errors, and the communicator stays usable after them.
    let got = comm.all_gather(&[1.0f32; 3], &mut [0.0; 4]);
    assert_eq!(got, Err(Error::BufferSize { op: "all_gather", what: "recv", got: 4, expected: 3, world: 1 }));
    let got = comm.reduce_scatter(&[1i32; 3], &mut [0; 2], ReduceOp::Sum);
    assert!(matches!(got, Err(Error::BufferSize { op: "reduce_scatter", what: "send", .. })), "{got:?}");
    let got = comm.broadcast(&mut [0i64; 2], 1);
    assert!(matches!(got, Err(Error::InvalidRank { what: "root", rank: 1, .. })), "{got:?}");
    assert!(matches!(comm.send(&[1.0f32], 0), Err(Error::InvalidRank { what: "peer", .. })));
    assert!(matches!(comm.recv(&mut [1.0f32], 3), Err(Error::InvalidRank { what: "peer", .. })));
    let mut out = [0i64; 2];
    comm.all_reduce(&[5, -7], &mut out, ReduceOp::Avg).unwrap();
    assert_eq!(out, [5, -7]);
    assert_eq!(comm.failure(), None);

    // MPI starts once per process.
    assert!(matches!(MpiComm::init(MpiOptions::default()), Err(Error::Backend { op: "mpi_init", .. })));
    drop(comm);
    println!("{CHECKS_OK}");
}

#[test]
fn singleton_world_of_one_matches_reference() {
    let Some((output, text)) = child_output("mpi::tests::child_singleton_checks", Duration::from_secs(120)) else {
        return;
    };
    assert!(output.status.success() && text.contains(CHECKS_OK), "the child failed ({:?}):\n{text}", output.status);
}

#[test]
#[ignore = "run by `a_hung_call_times_out_and_the_watchdog_aborts_the_job` in a child process"]
fn child_timeout() {
    if !is_child() {
        return;
    }
    let options = MpiOptions {
        timeout: Duration::from_millis(300),
        abort_grace: Duration::from_millis(500),
        ..MpiOptions::default()
    };
    let comm = MpiComm::init(options).unwrap();
    println!("{INIT_OK}");
    // A receive from this rank itself that no send matches: the one way a world of one can hang.
    let mut buf = vec![0u64; 4];
    let ptr = buf.as_mut_ptr();
    let got = comm.run_op("test", "MPI_Irecv", comm.deadline(), vec![0], |request| unsafe {
        // SAFETY: `buf` is never freed before the process ends (leaked below).
        ffi::MPI_Irecv(ptr.cast::<c_void>(), 4, ffi::RSMPI_UINT64_T, 0, 999, comm.p2p, request)
    });
    std::mem::forget(buf);
    let timeout = Error::Timeout { waiting: 0, missing: vec![0], after: options.timeout };
    assert_eq!(got, Err(timeout.clone()));
    // Sticky: every later call returns it.
    assert_eq!(comm.barrier(), Err(timeout.clone()));
    assert_eq!(comm.all_reduce(&[1.0f32], &mut [0.0], ReduceOp::Sum), Err(timeout.clone()));
    assert_eq!(comm.failure(), Some(timeout));
    println!("{TIMEOUT_OK}");
    // The watchdog aborts the process `abort_grace` after the failure; exiting 0 would fail the
    // parent test.
    std::thread::sleep(Duration::from_secs(30));
}

#[test]
fn a_hung_call_times_out_and_the_watchdog_aborts_the_job() {
    let Some((output, text)) = child_output("mpi::tests::child_timeout", Duration::from_secs(60)) else {
        return;
    };
    assert!(text.contains(TIMEOUT_OK), "the child did not see the timeout ({:?}):\n{text}", output.status);
    assert_eq!(output.status.code(), Some(MpiComm::ABORT_CODE), "the watchdog did not abort the job:\n{text}");
    assert!(text.contains("aborting the MPI job"), "{text}");
}
