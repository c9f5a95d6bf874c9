//! Checks the MPI backend across processes. Run it under `mpirun`, e.g.
//!
//! ```text
//! cargo build -p squid-collectives --features mpi --example mpi_check
//! mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/examples/mpi_check
//! mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/examples/mpi_check timeout
//! mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/examples/mpi_check drop-timeout
//! ```
//!
//! `check` (the default) runs every collective over every element type, reduction and root, on
//! lengths from 0 to past 100k (not multiples of the world size), and compares each rank's
//! results bit for bit with `squid_collectives::reference` (the backend reduces in rank order
//! in `Scalar::Acc` and rounds once, as the reference does); then send/recv in a ring and the
//! typed errors (wrong sizes, mismatched calls, a mismatched receive that keeps the message).
//! Every rank exits non-zero if any rank saw a difference.
//!
//! The benchmark of this backend (algbw and busbw against MPI's own collectives) is the
//! `collectives` suite of squid-bench: `mpirun -np N squid-bench collectives --backend mpi`.
//!
//! `timeout` checks the failure semantics: rank 1 never arrives at a barrier, rank 0 gets
//! `Error::Timeout` naming rank 1 (and again from its next call), prints `TIMEOUT-OK`, and the
//! watchdog then aborts the whole job: `mpirun` must exit non-zero.
//!
//! `drop-timeout`: rank 1 never drops its communicator; rank 0's drop (the exchange before
//! `MPI_Finalize`) times out naming rank 1, and the watchdog aborts the job with that error
//! (`rank 0 waited ... for rank 1`) instead of hanging in `MPI_Finalize` without a name.

use squid_collectives::reference::{seeded_inputs, SeededValue};
use std::process::ExitCode;
use std::time::Duration;

use half::{bf16, f16};
use squid_collectives::mpi::{MpiComm, MpiOptions};
use squid_collectives::{reference, Communicator, Error, LocalGroup, ReduceOp};

/// The tp tests' 2-layer transformer block (`src/tp/two_layer_model.rs`), sharded over any
/// communicator.
#[allow(dead_code)] // `Params::get` and `Params::len` serve the tp tests' f64 reference.
mod two_layer {
    use squid_collectives::tp::{
        AttentionWeights, ColumnParallelLinear, ParallelAttention, RowParallelLinear, TpError, TpRank,
        VocabParallelCrossEntropy, VocabParallelEmbedding,
    };
    use squid_collectives::Communicator;

    include!("../src/tp/two_layer_model.rs");

    /// Whether the model's heads, FFN width and vocabulary divide over `world` ranks.
    pub fn fits(world: usize) -> bool {
        (HEADS.1 % world == 0 || world % HEADS.1 == 0) && HEADS.0 % world == 0 && FFN % world == 0 && VOCAB % world == 0
    }

    /// (log-probs, mean loss, every parameter gradient) of the model on fixed weights and
    /// tokens, sharded over `comm`'s ranks.
    pub fn run<C: Communicator>(comm: &C) -> Result<(Vec<f32>, f32, Vec<f32>), TpError> {
        let p = model_params();
        let mut state = 7u64;
        let full: Vec<f32> = (0..p.len)
            .map(|_| (squid_collectives::reference::splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let tokens = *MODEL_SEQS.last().expect("sequences") as usize;
        let ids: Vec<u32> = (0..tokens).map(|i| ((i * 7 + 3) % VOCAB) as u32).collect();
        let targets: Vec<u32> = (0..tokens).map(|i| ids[(i + 1) % tokens]).collect();
        sharded_model(comm, &p, &full, &ids, &targets)
    }
}

const OPS: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min, ReduceOp::Prod];

/// Records a failed check.
struct Checks {
    rank: usize,
    count: usize,
    failures: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.count += 1;
        if !ok {
            let what = what();
            eprintln!("mpi_check: rank {}: FAILED {what}", self.rank);
            self.failures.push(what);
        }
    }

    fn equal<V: PartialEq + std::fmt::Debug>(&mut self, got: Result<V, Error>, want: V, what: impl Fn() -> String) {
        match got {
            Ok(got) => {
                let ok = got == want;
                self.check(ok, || format!("{}: results differ from the reference", what()));
            }
            Err(e) => self.check(false, || format!("{}: {e}", what())),
        }
    }
}

fn collectives<T: SeededValue>(comm: &MpiComm, checks: &mut Checks) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let dtype = T::DTYPE;
    for (i, len) in [0usize, 1, 2, 3, 7, 64, 513, 4099, 100_003].into_iter().enumerate() {
        let seed = 1000 * i as u64 + dtype.size_bytes() as u64 + 17 * dtype.name().len() as u64;
        let ar_in = seeded_inputs::<T>(world, len, seed);
        for op in OPS {
            let mut out = vec![T::default(); len];
            let got = comm.all_reduce(&ar_in[rank], &mut out, op).map(|()| out);
            checks.equal(got, reference::all_reduce(&ar_in, op), || format!("all_reduce({op:?}) {dtype} len {len}"));
        }
        let mut in_place = ar_in[rank].clone();
        let got = comm.all_reduce_in_place(&mut in_place, ReduceOp::Sum).map(|()| in_place);
        checks.equal(got, reference::all_reduce(&ar_in, ReduceOp::Sum), || {
            format!("all_reduce_in_place {dtype} len {len}")
        });

        let bc_in = seeded_inputs::<T>(world, len, seed ^ 3);
        for root in 0..world {
            let mut buf = bc_in[rank].clone();
            let got = comm.broadcast(&mut buf, root).map(|()| buf);
            checks.equal(got, bc_in[root].clone(), || format!("broadcast(root {root}) {dtype} len {len}"));
        }
    }
    for (i, block) in [0usize, 1, 5, 1000, 33_333].into_iter().enumerate() {
        let seed = 77 + i as u64 * 31 + dtype.size_bytes() as u64;
        let ag_in = seeded_inputs::<T>(world, block, seed);
        let mut out = vec![T::default(); block * world];
        let got = comm.all_gather(&ag_in[rank], &mut out).map(|()| out);
        checks.equal(got, reference::all_gather(&ag_in), || format!("all_gather {dtype} block {block}"));
        let rs_in = seeded_inputs::<T>(world, block * world, seed ^ 2);
        for op in OPS {
            let mut out = vec![T::default(); block];
            let got = comm.reduce_scatter(&rs_in[rank], &mut out, op).map(|()| out);
            let want = reference::reduce_scatter(&rs_in, op).swap_remove(rank);
            checks.equal(got, want, || format!("reduce_scatter({op:?}) {dtype} block {block}"));
        }
    }
    // Send/recv around the ring, several messages of several lengths, in order.
    if world > 1 {
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let messages = |from: usize| -> Vec<Vec<T>> {
            (0..4).map(|k| seeded_inputs::<T>(1, k * 37 + from, 9 + k as u64).remove(0)).collect()
        };
        for m in messages(rank) {
            if let Err(e) = comm.send(&m, next) {
                checks.check(false, || format!("send {dtype} to {next}: {e}"));
            }
        }
        for (k, want) in messages(prev).into_iter().enumerate() {
            let mut got = vec![T::default(); want.len()];
            let got = comm.recv(&mut got, prev).map(|()| got);
            checks.equal(got, want, || format!("recv {dtype} message {k} from {prev}"));
        }
    }
    if let Err(e) = comm.barrier() {
        checks.check(false, || format!("barrier after {dtype}: {e}"));
    }
}

/// Wrong sizes, mismatched calls and mismatched receives give typed errors on every rank, and
/// the communicator stays usable.
fn errors(comm: &MpiComm, checks: &mut Checks) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let last = world - 1;
    // The last rank's receive buffer is one too long: it gets BufferSize, its peers Mismatch.
    let send = vec![1.0f32; 5];
    let mut recv = vec![0.0f32; if rank == last { 6 } else { 5 }];
    let got = comm.all_reduce(&send, &mut recv, ReduceOp::Sum);
    let ok = if rank == last {
        matches!(got, Err(Error::BufferSize { op: "all_reduce", got: 6, expected: 5, .. }))
    } else {
        matches!(got, Err(Error::Mismatch { op: "all_reduce", .. }))
    };
    checks.check(ok, || format!("a wrong size on rank {last} gave {got:?}"));
    // A bad root is an InvalidRank error on every rank.
    let got = comm.broadcast(&mut [0i32; 3], world);
    checks.check(matches!(got, Err(Error::InvalidRank { what: "root", .. })), || format!("root {world} gave {got:?}"));
    let got = comm.send(&[1i32], rank);
    checks.check(matches!(got, Err(Error::InvalidRank { what: "peer", .. })), || format!("send to self gave {got:?}"));
    if world > 1 {
        // Rank 0 calls all_gather with i32, the others all_reduce with f32: Mismatch everywhere.
        let got = if rank == 0 {
            comm.all_gather(&[1i32; 2], &mut vec![0; 2 * world])
        } else {
            comm.all_reduce(&[1.0f32; 2], &mut [0.0; 2], ReduceOp::Max)
        };
        checks.check(matches!(got, Err(Error::Mismatch { .. })), || format!("mismatched calls gave {got:?}"));
        // A receive of the wrong length or type fails and keeps the message.
        if rank == 0 {
            let sent = comm.send(&[1.5f32, 2.5, 3.5], 1);
            checks.check(sent.is_ok(), || format!("send to 1 gave {sent:?}"));
        } else if rank == 1 {
            let got = comm.recv(&mut [0.0f32; 4], 0);
            checks.check(matches!(got, Err(Error::Mismatch { op: "recv", .. })), || format!("recv of 4 gave {got:?}"));
            let got = comm.recv(&mut [0i32; 3], 0);
            checks
                .check(matches!(got, Err(Error::Mismatch { op: "recv", .. })), || format!("recv of i32 gave {got:?}"));
            let mut buf = [0.0f32; 3];
            let got = comm.recv(&mut buf, 0).map(|()| buf);
            checks.equal(got, [1.5, 2.5, 3.5], || "the kept message".to_string());
        }
    }
    // Still usable.
    let mut sum = [0i64; 2];
    let got = comm.all_reduce(&[rank as i64, 1], &mut sum, ReduceOp::Sum).map(|()| sum);
    let n = world as i64;
    checks.equal(got, [n * (n - 1) / 2, n], || "all_reduce after the errors".to_string());
    checks.check(comm.failure().is_none(), || format!("the communicator failed: {:?}", comm.failure()));
}

/// The tp tests' 2-layer transformer sharded over the MPI ranks equals the same model on one
/// rank of the local backend (which the tp tests hold to an f64 reference with finite-difference
/// gradients) within the tp tests' cross-world tolerance, `1e-5 + 1e-4 |value|`.
fn tensor_parallel(comm: &MpiComm, checks: &mut Checks) {
    let world = comm.world_size();
    if !two_layer::fits(world) {
        println!("mpi_check: the tp block does not split over {world} ranks; skipped");
        return;
    }
    let one = LocalGroup::new(1).map(|g| g.run(|c| two_layer::run(&c)).remove(0));
    let (want, got) = match (one, two_layer::run(comm)) {
        (Ok(Ok(Ok(want))), Ok(got)) => (want, got),
        (one, got) => {
            let one = one.map(|r| r.map(|r| r.map(|_| ()).map_err(|e| e.to_string())).map_err(|_| "panicked"));
            checks.check(false, || format!("tp block: one rank gave {one:?}, the MPI ranks {:?}", got.map(|_| ())));
            return;
        }
    };
    let close = |a: &[f32], b: &[f32]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 + 1e-4 * y.abs())
    };
    checks.check(close(&got.0, &want.0), || {
        format!("tp block over {world} ranks: log-probs {:?} vs {:?}", got.0, want.0)
    });
    checks.check(close(&[got.1], &[want.1]), || format!("tp block over {world} ranks: loss {} vs {}", got.1, want.1));
    checks.check(close(&got.2, &want.2), || format!("tp block over {world} ranks: gradients differ"));
    checks.check(want.2.iter().any(|g| g.abs() > 1e-2), || "tp block: the gradients are all tiny".to_string());
}

fn check() -> ExitCode {
    // Small staged pieces, so the lengths below go through MPI in many pieces (a piece boundary
    // inside a block, a padded last block split over pieces).
    let options =
        MpiOptions { timeout: Duration::from_secs(120), abort_grace: Duration::from_secs(5), stage_bytes: 4096 };
    let comm = match MpiComm::init(options) {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("mpi_check: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut checks = Checks { rank, count: 0, failures: Vec::new() };
    collectives::<f32>(&comm, &mut checks);
    collectives::<bf16>(&comm, &mut checks);
    collectives::<f16>(&comm, &mut checks);
    collectives::<i32>(&comm, &mut checks);
    collectives::<i64>(&comm, &mut checks);
    errors(&comm, &mut checks);
    tensor_parallel(&comm, &mut checks);
    // Every rank learns how many checks failed anywhere.
    let mut failed = [0i64];
    let total = comm.all_reduce(&[checks.failures.len() as i64], &mut failed, ReduceOp::Sum);
    let failed = match total {
        Ok(()) => failed[0],
        Err(e) => {
            eprintln!("mpi_check: rank {rank}: cannot sum the failures: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "mpi_check: rank {rank} of {world}: {} checks, {} failed here, {failed} failed on all ranks",
        checks.count,
        checks.failures.len()
    );
    drop(comm);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn timeout() -> ExitCode {
    let options =
        MpiOptions { timeout: Duration::from_secs(2), abort_grace: Duration::from_secs(2), ..MpiOptions::default() };
    let comm = match MpiComm::init(options) {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("mpi_check timeout: {e}");
            return ExitCode::FAILURE;
        }
    };
    if comm.world_size() < 2 {
        eprintln!("mpi_check timeout: needs at least 2 ranks");
        return ExitCode::FAILURE;
    }
    if comm.rank() == 1 {
        // Never arrives; the watchdog of a peer aborts the job long before this ends.
        std::thread::sleep(Duration::from_secs(60));
        return ExitCode::SUCCESS;
    }
    let first = comm.barrier();
    let again = comm.all_reduce(&[1.0f32], &mut [0.0], ReduceOp::Sum);
    let expected = matches!(&first, Err(Error::Timeout { missing, .. }) if missing.contains(&1)) && again == first;
    println!("mpi_check timeout: rank {} got {first:?}, then {again:?}", comm.rank());
    if expected && comm.rank() == 0 {
        println!("TIMEOUT-OK");
    }
    // Wait for the watchdog's abort (an exit code 0 here would mean it never came).
    std::thread::sleep(Duration::from_secs(60));
    ExitCode::SUCCESS
}

fn drop_timeout() -> ExitCode {
    let options =
        MpiOptions { timeout: Duration::from_secs(2), abort_grace: Duration::from_secs(2), ..MpiOptions::default() };
    let comm = match MpiComm::init(options) {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("mpi_check drop-timeout: {e}");
            return ExitCode::FAILURE;
        }
    };
    if comm.world_size() < 2 {
        eprintln!("mpi_check drop-timeout: needs at least 2 ranks");
        return ExitCode::FAILURE;
    }
    if comm.rank() == 1 {
        // Never drops; rank 0's watchdog aborts the job long before this ends.
        std::thread::sleep(Duration::from_secs(60));
        std::mem::forget(comm);
        return ExitCode::SUCCESS;
    }
    drop(comm);
    // The abort comes from the watchdog `abort_grace` after the failed drop.
    std::thread::sleep(Duration::from_secs(60));
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None | Some("check") => check(),
        Some("timeout") => timeout(),
        Some("drop-timeout") => drop_timeout(),
        Some("bench") => {
            eprintln!(
                "mpi_check: the benchmark moved to the squid-bench suite: cargo build --release -p squid-benches \
                 --features mpi, then mpirun -np N target/release/squid-bench collectives --backend mpi"
            );
            ExitCode::FAILURE
        }
        Some(other) => {
            eprintln!("mpi_check: unknown mode {other:?} (check | timeout | drop-timeout)");
            ExitCode::FAILURE
        }
    }
}
