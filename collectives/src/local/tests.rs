//! The local backend against the plain reference ([`crate::reference`]): every collective and
//! element type over proptest-generated world sizes and lengths (0, 1, lengths not divisible by
//! the world), the size rules, and the failure semantics (dropped, panicking and late ranks).
//!
//! Results are compared bit for bit: the backend documents that it reduces in rank order in
//! `Scalar::Acc` and rounds once, and the reference does exactly that.

use crate::reference::{seeded_inputs, SeededValue};
use std::sync::mpsc;
use std::time::Duration;

use half::{bf16, f16};
use proptest::prelude::*;

use super::*;
use crate::reference;

/// Short deadline for the tests of late ranks.
const SHORT: Duration = Duration::from_millis(200);
/// Deadline for the tests of lost ranks: their error comes at once, the deadline only has to
/// be long enough never to be reached first (a panic's unwinding can take a while on a loaded
/// machine).
const LONG: Duration = Duration::from_secs(10);

const OPS: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min, ReduceOp::Prod];

/// What one rank received from every collective of [`run_all`].
#[derive(Debug, PartialEq)]
struct Received<T> {
    all_reduce: Vec<Vec<T>>,
    all_reduce_in_place: Vec<T>,
    all_gather: Vec<T>,
    reduce_scatter: Vec<T>,
    broadcast: Vec<T>,
}

/// Runs every collective on a fresh group of `world` threads and checks each rank's results
/// against the reference.
fn run_all<T: SeededValue>(world: usize, len: usize, block: usize, rs_op: ReduceOp, root: usize, seed: u64) {
    let ar_in = seeded_inputs::<T>(world, len, seed);
    let ag_in = seeded_inputs::<T>(world, block, seed ^ 1);
    let rs_in = seeded_inputs::<T>(world, block * world, seed ^ 2);
    let bc_in = seeded_inputs::<T>(world, len, seed ^ 3);

    let outcomes = LocalGroup::new(world).unwrap().run(|comm| {
        let r = comm.rank();
        let mut all_reduce = Vec::new();
        for op in OPS {
            let mut out = vec![T::default(); len];
            comm.all_reduce(&ar_in[r], &mut out, op).unwrap();
            all_reduce.push(out);
        }
        let mut all_reduce_in_place = ar_in[r].clone();
        comm.all_reduce_in_place(&mut all_reduce_in_place, ReduceOp::Sum).unwrap();
        let mut all_gather = vec![T::default(); block * world];
        comm.all_gather(&ag_in[r], &mut all_gather).unwrap();
        let mut reduce_scatter = vec![T::default(); block];
        comm.reduce_scatter(&rs_in[r], &mut reduce_scatter, rs_op).unwrap();
        let mut broadcast = bc_in[r].clone();
        comm.broadcast(&mut broadcast, root).unwrap();
        comm.barrier().unwrap();
        Received { all_reduce, all_reduce_in_place, all_gather, reduce_scatter, broadcast }
    });

    let expected_rs = reference::reduce_scatter(&rs_in, rs_op);
    for (r, outcome) in outcomes.into_iter().enumerate() {
        let got = outcome.expect("rank panicked");
        let expected = Received {
            all_reduce: OPS.iter().map(|&op| reference::all_reduce(&ar_in, op)).collect(),
            all_reduce_in_place: reference::all_reduce(&ar_in, ReduceOp::Sum),
            all_gather: reference::all_gather(&ag_in),
            reduce_scatter: expected_rs[r].clone(),
            broadcast: bc_in[root].clone(),
        };
        assert_eq!(got, expected, "rank {r} of {world}, {} len {len} block {block}", T::DTYPE);
    }
}

fn params() -> impl Strategy<Value = (usize, usize, usize, usize, usize, u64)> {
    (1usize..=4, 0usize..=37, 0usize..=9, 0usize..5, any::<prop::sample::Index>(), any::<u64>())
        .prop_map(|(world, len, block, op, root, seed)| (world, len, block, op, root.index(world), seed))
}

proptest! {
    // Miri checks the unsafe buffer sharing on a few cases; natively, 48 per type.
    #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 3 } else { 48 }))]

    #[test]
    fn f32_matches_reference((world, len, block, op, root, seed) in params()) {
        run_all::<f32>(world, len, block, OPS[op], root, seed);
    }

    #[test]
    fn bf16_matches_reference((world, len, block, op, root, seed) in params()) {
        run_all::<bf16>(world, len, block, OPS[op], root, seed);
    }

    #[test]
    fn f16_matches_reference((world, len, block, op, root, seed) in params()) {
        run_all::<f16>(world, len, block, OPS[op], root, seed);
    }

    #[test]
    fn i32_matches_reference((world, len, block, op, root, seed) in params()) {
        run_all::<i32>(world, len, block, OPS[op], root, seed);
    }

    #[test]
    fn i64_matches_reference((world, len, block, op, root, seed) in params()) {
        run_all::<i64>(world, len, block, OPS[op], root, seed);
    }
}

#[test]
fn lengths_past_the_block_size_match_reference() {
    // Lengths that cross the reduction's and the copy's block boundaries unevenly.
    run_all::<f32>(3, 5003, 4099, ReduceOp::Sum, 2, 7);
    run_all::<bf16>(4, 2051, 1025, ReduceOp::Avg, 1, 8);
    run_all::<i64>(2, 1537, 513, ReduceOp::Max, 0, 9);
}

#[test]
fn calls_large_enough_to_stream_match_reference() {
    // Each collective here writes at least `stream::STREAM_MIN_BYTES` over all ranks, so its
    // results are stored with non-temporal stores (on x86-64); lengths are odd so the streamed
    // copies have unaligned heads and tails.
    let (world, len, block) = (3, 2_100_001, 1_400_001);
    let bytes = std::mem::size_of::<f32>();
    assert!((world - 1) * len * bytes >= super::stream::STREAM_MIN_BYTES, "broadcast would not stream");
    assert!(world * block * bytes >= super::stream::STREAM_MIN_BYTES, "reduce-scatter would not stream");
    run_all::<f32>(world, len, block, ReduceOp::Sum, 1, 10);
}

#[test]
fn in_place_and_out_of_place_ranks_mix_in_one_all_reduce() {
    for (world, len) in [(2, 5000), (3, 4099), (4, 7)] {
        let inputs = seeded_inputs::<f32>(world, len, 11 + world as u64);
        let want = reference::all_reduce(&inputs, ReduceOp::Sum);
        let outcomes = LocalGroup::new(world).unwrap().run(|comm| {
            let r = comm.rank();
            if r % 2 == 0 {
                let mut buf = inputs[r].clone();
                comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).map(|()| buf)
            } else {
                let mut out = vec![0.0; len];
                comm.all_reduce(&inputs[r], &mut out, ReduceOp::Sum).map(|()| out)
            }
        });
        for (r, got) in outcomes.into_iter().enumerate() {
            assert_eq!(got.unwrap().unwrap(), want, "rank {r} of {world}");
        }
    }
}

#[test]
fn many_calls_in_a_row_stay_in_step() {
    let results = LocalGroup::new(4).unwrap().run(|comm| {
        let mut checked = 0;
        for i in 0..300usize {
            let len = i % 13;
            let send = vec![(comm.rank() + i) as i64; len];
            let mut recv = vec![0i64; len];
            comm.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
            let expected = (0..4).map(|r| (r + i) as i64).sum::<i64>();
            assert!(recv.iter().all(|&x| x == expected));
            checked += len;
            if i % 7 == 0 {
                comm.barrier().unwrap();
            }
        }
        checked
    });
    for r in results {
        assert!(r.expect("rank panicked") > 0);
    }
}

#[test]
fn half_sums_accumulate_in_f32() {
    // 256 + 1 + 1 + 1 = 259, which bf16 rounds to 260 (ties to even). Summing in bf16 would
    // round 256 + 1 back to 256 at every step and return 256.
    let results = LocalGroup::new(4).unwrap().run(|comm| {
        let send = [bf16::from_f32(if comm.rank() == 0 { 256.0 } else { 1.0 })];
        let mut recv = [bf16::ZERO];
        comm.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
        recv[0].to_f32()
    });
    for r in results {
        assert_eq!(r.unwrap(), 260.0);
    }
}

#[test]
fn half_sums_are_within_one_rounding_of_exact() {
    // Against an f64 sum: |out - exact| <= u(T) |exact| + world * eps(f32) * sum |x| (one final
    // rounding to the storage type plus f32 accumulation over `world` terms).
    fn check<T: SeededValue<Acc = f32>>(u: f64) {
        let (world, len) = (4, 3001);
        let ins = seeded_inputs::<T>(world, len, 11);
        let results = LocalGroup::new(world).unwrap().run(|comm| {
            let mut out = vec![T::default(); len];
            comm.all_reduce(&ins[comm.rank()], &mut out, ReduceOp::Sum).unwrap();
            out
        });
        for out in results {
            for (i, got) in out.unwrap().into_iter().enumerate() {
                let exact: f64 = ins.iter().map(|x| x[i].to_acc() as f64).sum();
                let abs: f64 = ins.iter().map(|x| (x[i].to_acc() as f64).abs()).sum();
                let bound = u * exact.abs() + world as f64 * f32::EPSILON as f64 * abs;
                let got = got.to_acc() as f64;
                assert!((got - exact).abs() <= bound, "{} element {i}: {got} vs {exact}", T::DTYPE);
            }
        }
    }
    check::<bf16>(1.0 / 256.0);
    check::<f16>(1.0 / 2048.0);
}

#[test]
fn integer_sums_wrap_and_averages_truncate() {
    let results = LocalGroup::new(2).unwrap().run(|comm| {
        let send = [i32::MAX, -7];
        let mut sum = [0i32; 2];
        let mut avg = [0i32; 2];
        comm.all_reduce(&send, &mut sum, ReduceOp::Sum).unwrap();
        comm.all_reduce(&send, &mut avg, ReduceOp::Avg).unwrap();
        (sum, avg)
    });
    for r in results {
        let (sum, avg) = r.unwrap();
        assert_eq!(sum, [i32::MAX.wrapping_mul(2), -14]);
        assert_eq!(avg, [i32::MAX.wrapping_mul(2) / 2, -7]);
    }
}

#[test]
fn send_recv_ring_and_order() {
    let world = 4;
    let results = LocalGroup::new(world).unwrap().run(|comm| {
        let r = comm.rank();
        let (next, prev) = ((r + 1) % world, (r + world - 1) % world);
        // Everyone sends before receiving: sends are buffered, so this cannot deadlock.
        for k in 0..3 {
            comm.send(&[r as f32, k as f32], next).unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut buf = [0f32; 2];
            comm.recv(&mut buf, prev).unwrap();
            got.push(buf);
        }
        (prev, got)
    });
    for r in results {
        let (prev, got) = r.unwrap();
        assert_eq!(got, vec![[prev as f32, 0.0], [prev as f32, 1.0], [prev as f32, 2.0]]);
    }
}

#[test]
fn wrong_sizes_are_typed_errors_and_the_group_stays_usable() {
    let results = LocalGroup::new(3).unwrap().run(|comm| {
        let r = comm.rank();
        // Rank 1's all-gather receive buffer is one short.
        let send = [1.0f32; 4];
        let mut recv = vec![0.0f32; if r == 1 { 11 } else { 12 }];
        let gather = comm.all_gather(&send, &mut recv);
        // Rank 2's reduce-scatter send buffer is not world x recv.
        let send = vec![1i32; if r == 2 { 7 } else { 6 }];
        let mut recv = [0i32; 2];
        let scatter = comm.reduce_scatter(&send, &mut recv, ReduceOp::Sum);
        // Rank 0 broadcasts from a root that does not exist.
        let mut buf = [0i64; 3];
        let bcast = comm.broadcast(&mut buf, if r == 0 { 3 } else { 0 });
        // The ranks disagree on the all-reduce length.
        let send = vec![1.0f32; 5 + r];
        let mut out = vec![0.0f32; 5 + r];
        let lengths = comm.all_reduce(&send, &mut out, ReduceOp::Sum);
        // And on the element type.
        let types = if r == 0 {
            comm.all_reduce(&[1i32], &mut [0i32], ReduceOp::Sum)
        } else {
            comm.all_reduce(&[1i64], &mut [0i64], ReduceOp::Sum)
        };
        // And on the collective.
        let kinds = if r == 0 { comm.barrier() } else { comm.all_gather(&[1.0f32], &mut [0.0f32; 3]) };
        // After all that, the group is usable and a correct call works (checked before the
        // last collective: after it, a rank that finishes drops its communicator).
        assert!(comm.failure().is_none());
        let mut sum = [0.0f32; 2];
        comm.all_reduce(&[1.0f32, 2.0], &mut sum, ReduceOp::Sum).unwrap();
        (r, gather, scatter, bcast, lengths, types, kinds, sum)
    });
    for outcome in results {
        let (r, gather, scatter, bcast, lengths, types, kinds, sum) = outcome.unwrap();
        match r {
            1 => assert_eq!(
                gather,
                Err(Error::BufferSize { op: "all_gather", what: "recv", got: 11, expected: 12, world: 3 })
            ),
            _ => assert!(matches!(gather, Err(Error::Mismatch { op: "all_gather", .. })), "{gather:?}"),
        }
        match r {
            2 => assert_eq!(
                scatter,
                Err(Error::BufferSize { op: "reduce_scatter", what: "send", got: 7, expected: 6, world: 3 })
            ),
            _ => assert!(matches!(scatter, Err(Error::Mismatch { op: "reduce_scatter", .. })), "{scatter:?}"),
        }
        match r {
            0 => assert!(matches!(bcast, Err(Error::InvalidRank { what: "root", rank: 3, .. })), "{bcast:?}"),
            _ => assert!(matches!(bcast, Err(Error::Mismatch { op: "broadcast", .. })), "{bcast:?}"),
        }
        assert!(matches!(lengths, Err(Error::Mismatch { op: "all_reduce", .. })), "{lengths:?}");
        assert!(matches!(types, Err(Error::Mismatch { op: "all_reduce", .. })), "{types:?}");
        assert!(matches!(kinds, Err(Error::Mismatch { .. })), "{kinds:?}");
        assert_eq!(sum, [3.0, 6.0]);
    }
}

#[test]
fn recv_of_the_wrong_size_keeps_the_message() {
    let results = LocalGroup::new(2).unwrap().run(|comm| {
        if comm.rank() == 0 {
            comm.send(&[1i32, 2, 3], 1).unwrap();
            assert!(matches!(comm.send(&[1i32], 0), Err(Error::InvalidRank { what: "peer", .. })));
            assert!(matches!(comm.send(&[1i32], 2), Err(Error::InvalidRank { what: "peer", .. })));
            comm.barrier().unwrap();
            None
        } else {
            let mut short = [0i32; 2];
            let wrong_len = comm.recv(&mut short, 0);
            let mut wrong_type = [0f32; 3];
            let wrong_dtype = comm.recv(&mut wrong_type, 0);
            let mut right = [0i32; 3];
            comm.recv(&mut right, 0).unwrap();
            comm.barrier().unwrap();
            Some((wrong_len, wrong_dtype, right))
        }
    });
    let (wrong_len, wrong_dtype, right) = results[1].as_ref().unwrap().clone().unwrap();
    assert!(matches!(wrong_len, Err(Error::Mismatch { op: "recv", .. })), "{wrong_len:?}");
    assert!(matches!(wrong_dtype, Err(Error::Mismatch { op: "recv", .. })), "{wrong_dtype:?}");
    assert_eq!(right, [1, 2, 3]);
}

#[test]
fn empty_world_is_an_error() {
    assert!(matches!(LocalGroup::new(0), Err(Error::EmptyWorld)));
}

/// Runs `f` on its own thread and fails the test if it has not returned after `limit`: a hang
/// in the failure tests is a failure, not a stuck test run.
fn within<R: Send + 'static>(limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the group hung instead of failing")
}

/// A peer's view: its first call, its second call, and what `failure()` said after.
type PeerView = Option<(Result<(), Error>, Result<(), Error>, Option<Error>)>;

/// Every rank but `lost` runs an all-reduce, then another call; returns each rank's view.
fn peers_of_a_lost_rank(world: usize, lost: usize, lose: impl Fn(LocalComm) + Sync + Send + 'static) -> Vec<PeerView> {
    within(Duration::from_secs(60), move || {
        let group = LocalGroup::with_timeout(world, LONG).unwrap();
        group
            .run(|comm| {
                if comm.rank() == lost {
                    lose(comm);
                    return None;
                }
                let mut out = [0.0f32; 8];
                let first = comm.all_reduce(&[1.0f32; 8], &mut out, ReduceOp::Sum);
                let second = comm.barrier();
                Some((first, second, comm.failure()))
            })
            .into_iter()
            .map(|r| r.unwrap_or(None))
            .collect()
    })
}

#[test]
fn a_dropped_rank_fails_its_peers() {
    let results = peers_of_a_lost_rank(4, 3, drop);
    for (r, outcome) in results.into_iter().enumerate().filter(|&(r, _)| r != 3) {
        let (first, second, failure) = outcome.unwrap();
        let lost = Error::PeerLost { rank: 3, panicked: false };
        assert_eq!(first, Err(lost.clone()), "rank {r}");
        assert_eq!(second, Err(lost.clone()), "rank {r}");
        assert_eq!(failure, Some(lost));
    }
}

#[test]
fn a_rank_dropped_while_peers_wait_fails_them() {
    let results = peers_of_a_lost_rank(3, 0, |comm| {
        std::thread::sleep(Duration::from_millis(50));
        drop(comm);
    });
    for outcome in results.into_iter().skip(1) {
        let (first, second, _) = outcome.unwrap();
        assert_eq!(first, Err(Error::PeerLost { rank: 0, panicked: false }));
        assert_eq!(second, first);
    }
}

#[test]
fn a_panicking_rank_fails_its_peers() {
    let results = peers_of_a_lost_rank(4, 2, |_comm| panic!("rank 2 fails on purpose"));
    for outcome in results.into_iter().enumerate().filter(|&(r, _)| r != 2).map(|(_, o)| o) {
        let (first, second, _) = outcome.unwrap();
        assert_eq!(first, Err(Error::PeerLost { rank: 2, panicked: true }));
        assert_eq!(second, first);
    }
}

#[test]
fn a_late_rank_times_out_its_peers_and_itself() {
    let results = within(Duration::from_secs(30), || {
        LocalGroup::with_timeout(4, SHORT).unwrap().run(|comm| {
            if comm.rank() == 3 {
                // Arrives well after the peers' deadline.
                std::thread::sleep(SHORT * 4);
            }
            let mut out = [0i64; 5];
            let first = comm.all_reduce(&[1i64; 5], &mut out, ReduceOp::Sum);
            let second = comm.all_gather(&[1i64], &mut [0i64; 4]);
            (first, second)
        })
    });
    let mut errors = Vec::new();
    for outcome in results {
        let (first, second) = outcome.unwrap();
        match &first {
            Err(Error::Timeout { missing, after, .. }) => {
                assert_eq!(missing, &vec![3]);
                assert_eq!(*after, SHORT);
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(second, first);
        errors.push(first);
    }
    // Every rank reports the same failure: the first deadline that passed.
    assert!(errors.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn a_recv_with_no_sender_times_out() {
    let results = within(Duration::from_secs(30), || {
        LocalGroup::with_timeout(2, SHORT).unwrap().run(|comm| {
            if comm.rank() == 0 {
                // Alive but never sends; waits for the peer's verdict.
                std::thread::sleep(SHORT * 3);
                comm.barrier()
            } else {
                comm.recv(&mut [0f32; 4], 0)
            }
        })
    });
    let expected = Error::Timeout { waiting: 1, missing: vec![0], after: SHORT };
    for outcome in results {
        assert_eq!(outcome.unwrap(), Err(expected.clone()));
    }
}

#[test]
fn a_finished_rank_only_stops_traffic_with_itself() {
    let results = within(Duration::from_secs(30), || {
        LocalGroup::with_timeout(3, LONG).unwrap().run(|comm| match comm.rank() {
            0 => {
                // Sends one message to rank 1 and leaves.
                comm.send(&[5i32], 1).unwrap();
                None
            }
            1 => {
                // Let rank 0 leave first.
                std::thread::sleep(Duration::from_millis(50));
                let mut from_0 = [0i32];
                let queued = comm.recv(&mut from_0, 0).map(|()| from_0[0]);
                let after = comm.recv(&mut from_0, 0);
                let mut from_2 = [0i32];
                let others = comm.recv(&mut from_2, 2).map(|()| from_2[0]);
                let collective = comm.barrier();
                Some((queued, after, others, collective))
            }
            _ => {
                std::thread::sleep(Duration::from_millis(50));
                comm.send(&[7i32], 1).unwrap();
                None
            }
        })
    });
    let (queued, after, others, collective) = results[1].as_ref().unwrap().clone().unwrap();
    let lost = Error::PeerLost { rank: 0, panicked: false };
    assert_eq!(queued, Ok(5), "a message sent before leaving is delivered");
    assert_eq!(after, Err(lost.clone()));
    assert_eq!(others, Ok(7), "ranks 1 and 2 still talk");
    assert_eq!(collective, Err(lost));
}

#[test]
fn an_unbounded_timeout_is_accepted() {
    let results = LocalGroup::with_timeout(2, Duration::MAX).unwrap().run(|comm| {
        let mut out = [0i32; 3];
        comm.all_reduce(&[1, 2, 3], &mut out, ReduceOp::Prod).map(|()| out)
    });
    for r in results {
        assert_eq!(r.unwrap(), Ok([1, 4, 9]));
    }
}
