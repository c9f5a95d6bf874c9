//! `collectives`: all-reduce, all-gather and reduce-scatter on the local (threads) backend of
//! squid-collectives, 2 and 4 ranks, f32, 4 KiB to 64 MiB.
//!
//! Ours is the backend's algorithm (every rank reduces / copies its own block straight between
//! the ranks' buffers). The baseline is the naive scheme: every rank sends its buffer to rank 0
//! (send/recv), rank 0 reduces or concatenates alone, then broadcasts the whole result (the
//! backend's broadcast; reduce-scatter ranks keep their block).
//!
//! Sizes and rates follow nccl-tests: the size is the larger buffer (all-reduce: the buffer;
//! all-gather: the receive buffer; reduce-scatter: the send buffer), algbw = size / time, and
//! busbw = algbw x 2(n-1)/n for all-reduce, x (n-1)/n for all-gather and reduce-scatter. The
//! rate printed is **busbw**; the params give the factor to get algbw back.
//!
//! Rank 0 runs on the calling thread, ranks 1.. on threads started at the first call and kept
//! for the case; one call is timed from the start signal until every rank has finished.

use std::sync::mpsc;

use squid_collectives::{Communicator, LocalComm, LocalGroup, ReduceOp};

use crate::harness::{Case, Runner, Work};

/// One rank's part of one call, with its buffers.
type RankOp = Box<dyn FnMut() + Send>;

#[derive(Clone, Copy)]
enum Coll {
    AllReduce,
    AllGather,
    ReduceScatter,
}

impl Coll {
    fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::AllGather => "all_gather",
            Self::ReduceScatter => "reduce_scatter",
        }
    }

    fn baseline(self) -> &'static str {
        match self {
            Self::AllReduce => "gather to rank 0 (send/recv), rank 0 sums alone, broadcast",
            Self::AllGather => "gather to rank 0 (send/recv), rank 0 concatenates, broadcast",
            Self::ReduceScatter => "gather to rank 0 (send/recv), rank 0 sums alone, broadcast, keep own block",
        }
    }

    /// nccl-tests' busbw / algbw.
    fn bus_factor(self, world: usize) -> f64 {
        let n = world as f64;
        match self {
            Self::AllReduce => 2.0 * (n - 1.0) / n,
            Self::AllGather | Self::ReduceScatter => (n - 1.0) / n,
        }
    }

    /// (send, recv) lengths for a larger buffer of `count` elements.
    fn lengths(self, count: usize, world: usize) -> (usize, usize) {
        match self {
            Self::AllReduce => (count, count),
            Self::AllGather => (count / world, count),
            Self::ReduceScatter => (count, count / world),
        }
    }
}

fn filled(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + seed * 13) % 31) as f32 * 0.125 - 2.0).collect()
}

/// Our algorithm: the backend's collective.
fn ours(coll: Coll, count: usize, comm: LocalComm) -> RankOp {
    let world = comm.world_size();
    let (s, r) = coll.lengths(count, world);
    let send = filled(s, comm.rank());
    let mut recv = vec![0.0f32; r];
    Box::new(move || {
        let done = match coll {
            Coll::AllReduce => comm.all_reduce(&send, &mut recv, ReduceOp::Sum),
            Coll::AllGather => comm.all_gather(&send, &mut recv),
            Coll::ReduceScatter => comm.reduce_scatter(&send, &mut recv, ReduceOp::Sum),
        };
        done.expect("collective failed");
    })
}

/// The naive scheme: gather to rank 0, rank 0 reduces/concatenates alone, broadcast.
fn naive(coll: Coll, count: usize, comm: LocalComm) -> RankOp {
    let world = comm.world_size();
    let rank = comm.rank();
    let (s, r) = coll.lengths(count, world);
    let send = filled(s, rank);
    let mut recv = vec![0.0f32; r];
    // Rank 0's staging: the whole result, and one peer's message.
    let mut full = vec![0.0f32; if rank == 0 || matches!(coll, Coll::ReduceScatter) { count } else { 0 }];
    let mut incoming = vec![0.0f32; if rank == 0 { s } else { 0 }];
    Box::new(move || {
        let mut step = || -> Result<(), squid_collectives::Error> {
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
        step().expect("naive collective failed");
    })
}

/// A runner that starts `world` ranks at its first call (rank 0 on the calling thread) and
/// then, per call, runs every rank's op once and waits for all of them.
fn pool(world: usize, make: fn(Coll, usize, LocalComm) -> RankOp, coll: Coll, count: usize) -> Runner {
    struct Started {
        go: Vec<mpsc::Sender<()>>,
        done: mpsc::Receiver<()>,
        rank0: RankOp,
    }
    let mut started: Option<Started> = None;
    Box::new(move || {
        let pool = started.get_or_insert_with(|| {
            let mut comms = LocalGroup::new(world).expect("world >= 1").into_communicators().into_iter();
            let rank0 = make(coll, count, comms.next().expect("rank 0"));
            let (done_tx, done) = mpsc::channel();
            let go = comms
                .map(|comm| {
                    let (go_tx, go_rx) = mpsc::channel::<()>();
                    let done_tx = done_tx.clone();
                    std::thread::spawn(move || {
                        let mut op = make(coll, count, comm);
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

/// The cases: each collective at 2 and 4 ranks; sizes 4 KiB, 256 KiB, 4 MiB, 64 MiB (`--quick`:
/// 4 KiB, 1 MiB, 16 MiB).
pub fn cases(quick: bool) -> Vec<Case> {
    let sizes: &[usize] = if quick { &[4 << 10, 1 << 20, 16 << 20] } else { &[4 << 10, 256 << 10, 4 << 20, 64 << 20] };
    let mut cases = Vec::new();
    for coll in [Coll::AllReduce, Coll::AllGather, Coll::ReduceScatter] {
        for world in [2usize, 4] {
            for &bytes in sizes {
                let count = bytes / 4;
                let factor = coll.bus_factor(world);
                let size = if bytes >= 1 << 20 { format!("{}MiB", bytes >> 20) } else { format!("{}KiB", bytes >> 10) };
                cases.push(Case {
                    suite: "collectives",
                    case: format!("{}_n{world}", coll.name()),
                    params: format!("size={size} f32 rate=busbw=algbw*{factor:.2}"),
                    baseline: coll.baseline(),
                    ours: pool(world, ours, coll, count),
                    base: pool(world, naive, coll, count),
                    work: Work::Bytes(bytes as f64 * factor),
                });
            }
        }
    }
    cases
}
