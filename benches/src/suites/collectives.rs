//! `collectives`: all-reduce, all-gather and reduce-scatter of squid-collectives, f32, on the
//! local backend (threads of this process; 2 and 4 ranks) or, with `--backend mpi` under
//! `mpirun`, on the MPI backend (one process per rank).
//!
//! Local backend: ours is the backend's algorithm (every rank reduces / copies its own block
//! straight between the ranks' buffers). The baseline is the naive scheme: every rank sends its
//! buffer to rank 0 (send/recv), rank 0 reduces or concatenates alone, then broadcasts the whole
//! result (the backend's broadcast; reduce-scatter ranks keep their block). For all-reduce in
//! place (what the tensor-parallel layers call) the baseline is the `Communicator` trait's
//! default: copy the buffer, then the out-of-place all-reduce. Rank 0 runs on the
//! calling thread, ranks 1.. on threads started at the first call and kept for the case; one
//! sample is timed from the start signal until every rank has finished.
//!
//! MPI backend (`cargo build --release -p squid-benches --features mpi`, then
//! `mpirun -np N target/release/squid-bench collectives --backend mpi`): ours is
//! `squid_collectives::mpi::MpiComm` (descriptor exchange, buffers staged through memory it
//! owns, rank-order reduction); the baseline is the MPI library's own collective on the same
//! buffers through rsmpi (`MPI_Allreduce` / `MPI_Allgather` / `MPI_Reduce_scatter_block`, f32
//! sum), checked once per case to give the same result. Every rank runs the same cases with a
//! fixed number of samples (so the ranks make the same calls), rank 0 times and prints.
//!
//! Sizes and rates follow nccl-tests: the size is the larger buffer (all-reduce: the buffer;
//! all-gather: the receive buffer; reduce-scatter: the send buffer), algbw = size / time, and
//! busbw = algbw x 2(n-1)/n for all-reduce, x (n-1)/n for all-gather and reduce-scatter. The
//! rate printed is **busbw**; the params give the factor to get algbw back. Small messages are
//! repeated within one sample (`calls=K`: the seconds printed are for K calls; the rate is per
//! byte moved either way), as nccl-tests times a loop of calls.

use std::sync::mpsc;

use squid_collectives::{Communicator, Error, LocalComm, LocalGroup, ReduceOp};

use crate::harness::{Budget, Case, Runner, Work};

/// One rank's part of one sample, with its buffers.
type RankOp = Box<dyn FnMut() + Send>;

#[derive(Clone, Copy, Debug)]
enum Coll {
    AllReduce,
    /// All-reduce in place (local backend only: the MPI backend has no in-place path of its own).
    AllReduceInPlace,
    AllGather,
    ReduceScatter,
}

/// The collectives of both backends.
#[cfg(feature = "mpi")]
const COLLS: [Coll; 3] = [Coll::AllReduce, Coll::AllGather, Coll::ReduceScatter];
/// The collectives of the local suite.
const LOCAL_COLLS: [Coll; 4] = [Coll::AllReduce, Coll::AllReduceInPlace, Coll::AllGather, Coll::ReduceScatter];

impl Coll {
    fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::AllReduceInPlace => "all_reduce_in_place",
            Self::AllGather => "all_gather",
            Self::ReduceScatter => "reduce_scatter",
        }
    }

    fn baseline(self) -> &'static str {
        match self {
            Self::AllReduce => "gather to rank 0 (send/recv), rank 0 sums alone, broadcast",
            Self::AllReduceInPlace => "copy the buffer, then the out-of-place all-reduce (the trait's default)",
            Self::AllGather => "gather to rank 0 (send/recv), rank 0 concatenates, broadcast",
            Self::ReduceScatter => "gather to rank 0 (send/recv), rank 0 sums alone, broadcast, keep own block",
        }
    }

    /// nccl-tests' busbw / algbw.
    fn bus_factor(self, world: usize) -> f64 {
        let n = world as f64;
        match self {
            Self::AllReduce | Self::AllReduceInPlace => 2.0 * (n - 1.0) / n,
            Self::AllGather | Self::ReduceScatter => (n - 1.0) / n,
        }
    }

    /// (send, recv) lengths for a larger buffer of `count` elements (a multiple of `world`).
    fn lengths(self, count: usize, world: usize) -> (usize, usize) {
        match self {
            Self::AllReduce | Self::AllReduceInPlace => (count, count),
            Self::AllGather => (count / world, count),
            Self::ReduceScatter => (count, count / world),
        }
    }

    /// One call of this collective (f32, sum) on `comm`; in place, `recv` is the buffer.
    fn call<C: Communicator>(self, comm: &C, send: &[f32], recv: &mut [f32]) -> Result<(), Error> {
        match self {
            Self::AllReduce => comm.all_reduce(send, recv, ReduceOp::Sum),
            Self::AllReduceInPlace => comm.all_reduce_in_place(recv, ReduceOp::Sum),
            Self::AllGather => comm.all_gather(send, recv),
            Self::ReduceScatter => comm.reduce_scatter(send, recv, ReduceOp::Sum),
        }
    }
}

/// Inputs whose sums are exact in f32 in any order (multiples of 1/8 below 2^10), so any
/// correct baseline gives bit-identical results.
fn filled(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + seed * 13) % 31) as f32 * 0.125 - 2.0).collect()
}

/// Calls per timed sample: small messages are repeated so that one sample is long enough to
/// time and the per-sample start signal is paid once per many calls.
fn calls_per_sample(bytes: usize) -> usize {
    ((16 << 20) / bytes.max(1)).clamp(1, 100)
}

fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{}MiB", bytes >> 20)
    } else {
        format!("{}KiB", bytes >> 10)
    }
}

/// The case's row fields: name, params and work per sample.
fn describe(prefix: &str, coll: Coll, world: usize, count: usize, calls: usize) -> (String, String, Work) {
    let factor = coll.bus_factor(world);
    let bytes = count * 4;
    let case = format!("{prefix}{}_n{world}", coll.name());
    let params = format!("size={} f32 calls={calls} rate=busbw=algbw*{factor:.2}", size_label(bytes));
    (case, params, Work::Bytes(bytes as f64 * factor * calls as f64))
}

/// Our algorithm: the backend's collective, `calls` times.
fn ours(coll: Coll, count: usize, calls: usize, comm: LocalComm) -> RankOp {
    let world = comm.world_size();
    let (s, r) = coll.lengths(count, world);
    let send = filled(s, comm.rank());
    // In place, the buffer starts as the input (its sums grow call after call; that costs
    // nothing: no subnormals).
    let mut recv = if matches!(coll, Coll::AllReduceInPlace) { send.clone() } else { vec![0.0f32; r] };
    Box::new(move || {
        for _ in 0..calls {
            coll.call(&comm, &send, &mut recv).expect("collective failed");
        }
    })
}

/// The baseline, `calls` times: the naive scheme (gather to rank 0, rank 0 reduces or
/// concatenates alone, broadcast); in place, the copy then the out-of-place call.
fn naive(coll: Coll, count: usize, calls: usize, comm: LocalComm) -> RankOp {
    if matches!(coll, Coll::AllReduceInPlace) {
        let mut buf = filled(count, comm.rank());
        return Box::new(move || {
            for _ in 0..calls {
                let send = buf.clone();
                comm.all_reduce(&send, &mut buf, ReduceOp::Sum).expect("collective failed");
            }
        });
    }
    let world = comm.world_size();
    let rank = comm.rank();
    let (s, r) = coll.lengths(count, world);
    let send = filled(s, rank);
    let mut recv = vec![0.0f32; r];
    // Rank 0's staging: the whole result, and one peer's message.
    let mut full = vec![0.0f32; if rank == 0 || matches!(coll, Coll::ReduceScatter) { count } else { 0 }];
    let mut incoming = vec![0.0f32; if rank == 0 { s } else { 0 }];
    Box::new(move || {
        let mut step = || -> Result<(), Error> {
            if rank != 0 {
                comm.send(&send, 0)?;
            } else {
                match coll {
                    Coll::AllGather => full[..s].copy_from_slice(&send),
                    _ => full.copy_from_slice(&send),
                }
                for peer in 1..world {
                    comm.recv(&mut incoming, peer)?;
                    match coll {
                        Coll::AllGather => full[peer * s..(peer + 1) * s].copy_from_slice(&incoming),
                        _ => full.iter_mut().zip(&incoming).for_each(|(a, b)| *a += b),
                    }
                }
            }
            match coll {
                Coll::ReduceScatter => {
                    comm.broadcast(&mut full, 0)?;
                    recv.copy_from_slice(&full[rank * r..(rank + 1) * r]);
                }
                _ => {
                    if rank == 0 {
                        recv.copy_from_slice(&full);
                    }
                    comm.broadcast(&mut recv, 0)?;
                }
            }
            Ok(())
        };
        for _ in 0..calls {
            step().expect("naive collective failed");
        }
    })
}

/// Makes one rank's op of a case.
type MakeOp = fn(Coll, usize, usize, LocalComm) -> RankOp;

/// A runner that starts `world` ranks at its first call (rank 0 on the calling thread) and
/// then, per call, runs every rank's op once and waits for all of them.
fn pool(world: usize, make: MakeOp, coll: Coll, count: usize, calls: usize) -> Runner {
    struct Started {
        go: Vec<mpsc::Sender<()>>,
        done: mpsc::Receiver<()>,
        rank0: RankOp,
    }
    let mut started: Option<Started> = None;
    Box::new(move || {
        let pool = started.get_or_insert_with(|| {
            let mut comms = LocalGroup::new(world).expect("world >= 1").into_communicators().into_iter();
            let rank0 = make(coll, count, calls, comms.next().expect("rank 0"));
            let (done_tx, done) = mpsc::channel();
            let go = comms
                .map(|comm| {
                    let (go_tx, go_rx) = mpsc::channel::<()>();
                    let done_tx = done_tx.clone();
                    std::thread::spawn(move || {
                        let mut op = make(coll, count, calls, comm);
                        while go_rx.recv().is_ok() {
                            op();
                            if done_tx.send(()).is_err() {
                                break;
                            }
                        }
                    });
                    go_tx
                })
                .collect();
            Started { go, done, rank0 }
        });
        for go in &pool.go {
            go.send(()).expect("rank thread alive");
        }
        (pool.rank0)();
        for _ in &pool.go {
            pool.done.recv().expect("rank thread alive");
        }
    })
}

/// The local-backend cases: each collective (and all-reduce in place) at 2 and 4 ranks; sizes 4 KiB, 256 KiB, 4 MiB,
/// 64 MiB, 256 MiB (`--quick`: 4 KiB, 1 MiB, 16 MiB).
pub fn cases(quick: bool) -> Vec<Case> {
    let sizes: &[usize] =
        if quick { &[4 << 10, 1 << 20, 16 << 20] } else { &[4 << 10, 256 << 10, 4 << 20, 64 << 20, 256 << 20] };
    let mut cases = Vec::new();
    for coll in LOCAL_COLLS {
        for world in [2usize, 4] {
            for &bytes in sizes {
                let count = bytes / 4 / world * world;
                let calls = calls_per_sample(bytes);
                let (case, params, work) = describe("", coll, world, count, calls);
                cases.push(Case {
                    suite: "collectives",
                    case,
                    params,
                    baseline: coll.baseline(),
                    ours: pool(world, ours, coll, count, calls),
                    base: pool(world, naive, coll, count, calls),
                    work,
                });
            }
        }
    }
    cases
}

/// The MPI-backend suite of this process: its rank, the cases (identical on every rank) and
/// the budget every rank must use (a fixed number of samples, so all ranks make the same calls).
pub struct MpiSuite {
    /// This process's rank; only rank 0 should print.
    pub rank: usize,
    /// The number of ranks.
    pub world: usize,
    /// The cases, in the same order on every rank.
    pub cases: Vec<Case>,
    /// One warm-up call and a fixed number of samples of each side.
    pub budget: Budget,
}

/// Initialises MPI and builds the MPI-backend cases (run the program under `mpirun`): each
/// collective at this job's world size, sizes 4 KiB, 64 KiB, 1 MiB, 16 MiB, 64 MiB, 256 MiB
/// (`--quick`: 4 KiB, 1 MiB, 16 MiB). MPI is finalised when the last case is dropped.
pub fn mpi_cases(quick: bool) -> Result<MpiSuite, String> {
    #[cfg(feature = "mpi")]
    {
        mpi_backend::cases(quick)
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = quick;
        Err("this squid-bench was built without the `mpi` feature \
             (cargo build --release -p squid-benches --features mpi)"
            .to_string())
    }
}

/// A fixed-count budget: with no warm-up or measuring time, the harness makes exactly one
/// warm-up call and `samples` samples of each side.
#[cfg(feature = "mpi")]
fn fixed_budget(samples: usize) -> Budget {
    Budget {
        warmup: std::time::Duration::ZERO,
        measure: std::time::Duration::ZERO,
        min_samples: samples,
        max_samples: samples,
    }
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    use std::cell::RefCell;
    use std::rc::Rc;

    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    use mpi::topology::SimpleCommunicator;
    use squid_collectives::mpi::{MpiComm, MpiOptions};
    use squid_collectives::{Communicator, ReduceOp};

    use super::{calls_per_sample, describe, filled, fixed_budget, Coll, MpiSuite, COLLS};
    use crate::harness::Case;

    /// One case's buffers, made at its first call and shared by both sides: the same input,
    /// a receive buffer each (compared after the baseline's first call).
    struct Buffers {
        send: Vec<f32>,
        ours: Vec<f32>,
        base: Vec<f32>,
        /// Whether the two results were compared yet.
        checked: bool,
    }

    fn baseline(coll: Coll) -> &'static str {
        match coll {
            Coll::AllReduce | Coll::AllReduceInPlace => "MPI_Allreduce (f32 sum) on the same buffers, via rsmpi",
            Coll::AllGather => "MPI_Allgather on the same buffers, via rsmpi",
            Coll::ReduceScatter => "MPI_Reduce_scatter_block (f32 sum) on the same buffers, via rsmpi",
        }
    }

    pub(super) fn cases(quick: bool) -> Result<MpiSuite, String> {
        let comm = MpiComm::init(MpiOptions::default()).map_err(|e| e.to_string())?;
        let (rank, world) = (comm.rank(), comm.world_size());
        let comm = Rc::new(comm);
        let sizes: &[usize] = if quick {
            &[4 << 10, 1 << 20, 16 << 20]
        } else {
            &[4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20]
        };
        let mut cases = Vec::new();
        for coll in COLLS {
            for &bytes in sizes {
                let count = bytes / 4 / world * world;
                let calls = calls_per_sample(bytes);
                let (case, params, work) = describe("mpi_", coll, world, count, calls);
                let (s, r) = coll.lengths(count, world);
                let buffers: Rc<RefCell<Option<Buffers>>> = Rc::new(RefCell::new(None));
                let make =
                    move || Buffers { send: filled(s, rank), ours: vec![0.0; r], base: vec![0.0; r], checked: false };
                let ours = {
                    let (comm, buffers) = (Rc::clone(&comm), Rc::clone(&buffers));
                    Box::new(move || {
                        let mut guard = buffers.borrow_mut();
                        let b = guard.get_or_insert_with(make);
                        for _ in 0..calls {
                            coll.call(&*comm, &b.send, &mut b.ours).expect("MPI backend collective failed");
                        }
                    })
                };
                let base = {
                    let comm = Rc::clone(&comm);
                    let mpi_world = SimpleCommunicator::world();
                    Box::new(move || {
                        let mut guard = buffers.borrow_mut();
                        let b = guard.get_or_insert_with(make);
                        for _ in 0..calls {
                            match coll {
                                Coll::AllReduce | Coll::AllReduceInPlace => {
                                    mpi_world.all_reduce_into(&b.send[..], &mut b.base[..], SystemOperation::sum())
                                }
                                Coll::AllGather => mpi_world.all_gather_into(&b.send[..], &mut b.base[..]),
                                Coll::ReduceScatter => mpi_world.reduce_scatter_block_into(
                                    &b.send[..],
                                    &mut b.base[..],
                                    SystemOperation::sum(),
                                ),
                            }
                        }
                        if !b.checked {
                            b.checked = true;
                            let differs = [i32::from(b.ours != b.base)];
                            let mut anywhere = [0i32];
                            comm.all_reduce(&differs, &mut anywhere, ReduceOp::Max).expect("MPI backend failed");
                            assert!(anywhere[0] == 0, "{coll:?}: the MPI backend and MPI's own collective differ");
                        }
                    })
                };
                cases.push(Case { suite: "collectives", case, params, baseline: baseline(coll), ours, base, work });
            }
        }
        let budget = fixed_budget(if quick { 5 } else { 15 });
        Ok(MpiSuite { rank, world, cases, budget })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_nccl_tests_and_lengths_follow_the_size_rules() {
        assert_eq!(Coll::AllReduce.bus_factor(4), 1.5);
        assert_eq!(Coll::AllGather.bus_factor(4), 0.75);
        assert_eq!(Coll::ReduceScatter.lengths(8, 4), (8, 2));
        assert_eq!(Coll::AllGather.lengths(8, 4), (2, 8));
        let (_, params, work) = describe("", Coll::AllReduce, 2, 1024, 3);
        assert!(params.contains("calls=3"), "{params}");
        assert_eq!(work, Work::Bytes(4096.0 * 1.0 * 3.0));
        assert_eq!(calls_per_sample(4 << 10), 100);
        assert_eq!(calls_per_sample(256 << 20), 1);
    }

    #[test]
    fn every_local_runner_runs_at_awkward_sizes() {
        for coll in LOCAL_COLLS {
            for (world, count) in [(2, 6), (3, 9)] {
                pool(world, ours, coll, count, 2)();
                pool(world, naive, coll, count, 2)();
            }
        }
    }
}
