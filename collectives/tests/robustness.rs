//! Bad input never panics, aborts or hangs: a fuzz-style proptest over the thread backend's
//! entry points with world sizes, buffer lengths, roots and peers near the integer limits. Every
//! call gets a typed error or a result checked against a plain sum.

use std::time::Duration;

use proptest::prelude::*;
use squid_collectives::{Communicator, Error, LocalGroup, ReduceOp};

#[test]
fn a_huge_local_world_is_an_error_not_an_abort() {
    for world in [LocalGroup::MAX_WORLD + 1, 1 << 32, usize::MAX / 2 + 1, usize::MAX] {
        let got = std::panic::catch_unwind(|| LocalGroup::new(world).map(|_| ()));
        assert!(matches!(got, Ok(Err(Error::WorldTooLarge { .. }))), "world {world}: {got:?}");
    }
    assert!(matches!(LocalGroup::new(0), Err(Error::EmptyWorld)));
}

/// Lengths, roots and peers: small, or near the integer limits.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..9,
        1 => prop::sample::select(vec![usize::MAX, usize::MAX - 1, usize::MAX / 2 + 1, 1 << 32, u32::MAX as usize]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]

    /// Every rank makes the same call (so a hang could only be the backend's): a typed error or
    /// the right values, never a panic (a panicking rank shows as an `Err` thread result).
    #[test]
    fn local_collectives_give_a_result_or_a_typed_error(
        world in 1usize..4,
        op in 0u8..7,
        len in size(),
        out_len in size(),
        target in size(),
    ) {
        // Buffers are only as long as the small sizes: a huge length goes to the backend as a
        // shape of an empty or short slice.
        let (len, out_len) = (len.min(64), out_len.min(64));
        let group = LocalGroup::with_timeout(world, Duration::from_secs(20)).unwrap();
        let results = group.run(move |comm| {
            let rank = comm.rank();
            let send: Vec<f32> = vec![(rank + 1) as f32; len];
            let mut recv = vec![0f32; out_len];
            let res = match op {
                0 => comm.all_reduce(&send, &mut recv, ReduceOp::Sum),
                1 => comm.all_gather(&send, &mut recv),
                2 => comm.reduce_scatter(&send, &mut recv, ReduceOp::Max),
                3 => comm.broadcast(&mut recv, target),
                4 => comm.barrier(),
                5 => {
                    // A ring: every rank sends to the next and receives from the previous.
                    let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
                    comm.send(&send, if target < 9 { next } else { target })
                        .and_then(|()| comm.recv(&mut recv, if target < 9 { prev } else { target }))
                }
                _ => comm.all_reduce_in_place(&mut recv, ReduceOp::Avg),
            };
            (res, recv)
        });
        for (rank, r) in results.into_iter().enumerate() {
            let (res, recv) = r.map_err(|_| TestCaseError::fail(format!("rank {rank} panicked")))?;
            match res {
                Ok(()) if op == 0 => {
                    let sum = (world * (world + 1) / 2) as f32;
                    prop_assert!(recv.iter().all(|&x| x == sum), "all_reduce: {recv:?}");
                }
                Ok(()) if op == 1 => {
                    let want: Vec<f32> = (0..world).flat_map(|r| vec![(r + 1) as f32; len]).collect();
                    prop_assert_eq!(recv, want);
                }
                Ok(()) => {}
                // A typed error, but never a timeout: every rank made the same call, so a
                // timeout would be a hang the deadline cut short.
                Err(e) => prop_assert!(!matches!(e, Error::Timeout { .. }), "rank {rank}: {e}"),
            }
        }
    }
}

mod tp {
    use super::size;
    use proptest::prelude::*;
    use squid_collectives::tp::{
        ColumnParallelLinear, ParallelAttention, RowParallelLinear, TpRank, VocabParallelCrossEntropy,
        VocabParallelEmbedding,
    };
    use squid_collectives::LocalGroup;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 80, ..ProptestConfig::default() })]

        /// The tensor-parallel layers on one rank with dims near the integer limits: a typed
        /// `TpError` or a result, never a panic.
        #[test]
        fn tp_layers_give_a_result_or_a_typed_error(
            a in size(),
            b in size(),
            len in 0usize..48,
            id in prop_oneof![0u32..8, Just(u32::MAX)],
        ) {
            let results = LocalGroup::new(1).unwrap().run(move |comm| {
                let tp = TpRank::of(&comm);
                let x = vec![0.5f32; len];
                let mut y = vec![0f32; len];
                if let Ok(col) = ColumnParallelLinear::new(a, b, true, tp) {
                    let _ = col.shard_weight(&x);
                    let _ = col.forward(&x, &x, Some(&x), &mut y);
                }
                if let Ok(row) = RowParallelLinear::new(a, b, false, tp) {
                    let _ = row.shard_weight(&x);
                    let _ = row.forward(&comm, &x, &x, None, &mut y);
                }
                if let Ok(emb) = VocabParallelEmbedding::new(a, b, tp) {
                    let _ = emb.shard_table(&x);
                    let _ = emb.forward(&comm, &[id, 0], &x, &mut y);
                    let _ = emb.backward(&[id], &x, &mut y);
                }
                if let Ok(ce) = VocabParallelCrossEntropy::new(a, tp) {
                    let _ = ce.forward(&comm, &x, &[id, 1]);
                }
                let _ = TpRank::new(a, b);
                if let Ok(attn) = ParallelAttention::new(a, b, b, len.max(1), tp) {
                    let _ = attn.shard(&x, &x, &x, &x);
                    // Small layers, or ones beyond any address space: a valid large one
                    // really allocates.
                    let bytes = (a as u128).saturating_mul(b as u128).saturating_mul(len.max(1) as u128 * 4);
                    let huge = bytes >= 1 << 50;
                    if huge {
                        assert!(attn.zeros().is_err(), "{bytes} bytes of weights allocated");
                    }
                    if let Some(Ok(w)) = (a <= 64 && b <= 64).then(|| attn.zeros()) {
                        let _ = attn.forward(&comm, &x, &[0, 1], &w, &mut y);
                    }
                }
            });
            for r in results {
                prop_assert!(r.is_ok(), "a layer panicked on a = {a}, b = {b}, len = {len}, id = {id}");
            }
        }
    }
}
