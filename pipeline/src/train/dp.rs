//! Data parallelism for `squid train`: the ranks of a group (MPI processes under `mpirun`, or
//! threads of a `LocalGroup` in tests) each roll out and train on their share of a step's
//! tasks, and every rank applies the same update.
//!
//! What each rank does in a GRPO step (world `W`, `n` rolled tasks):
//! - rank `r` rolls out tasks `[r n / W, (r + 1) n / W)` (whole groups: advantages are per
//!   group), each sample drawing from the stream its global task index gives it, so a sample
//!   is the one the single-process run draws;
//! - the rewards are all-gathered, so dynamic sampling and the advantages are computed on the
//!   whole step's rewards, identically on every rank;
//! - per minibatch, each rank packs the kept groups it rolled out, the loss is normalised by the
//!   minibatch's global token and sequence counts (squid-optim's `Denominators`), the weight
//!   gradients are summed over the ranks (rank order, f32, so every rank gets bit-identical
//!   sums), and every rank clips by the same global norm and takes the same AdamW step;
//! - rank 0 alone evaluates and writes the run directory; the other ranks wait for it at the
//!   next collective.
//!
//! The warm-up splits each step's traces the same way. Tensor parallelism (`--tp`, threads in
//! each process) composes: every process holds all `tp` shards, and each shard's gradient is
//! summed over the processes.

use squid_collectives::{Communicator, ReduceOp};

use crate::Error;

/// The collectives the trainer needs from a data-parallel group. Object safe, so the trainer
/// takes `&dyn DataParallel` whatever the backend.
pub trait DataParallel {
    /// This rank, in `0..world()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// Element-wise sum over the ranks (in rank order, every rank receives the same bits).
    fn sum_f32(&self, buf: &mut [f32]) -> Result<(), Error>;
    /// Element-wise sum over the ranks.
    fn sum_i64(&self, buf: &mut [i64]) -> Result<(), Error>;
    /// Element-wise maximum over the ranks.
    fn max_i64(&self, buf: &mut [i64]) -> Result<(), Error>;
    /// `recv = concat(send of every rank)`; `recv.len() == world * send.len()`.
    fn gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error>;
    /// Every rank's `buf` becomes rank 0's.
    fn broadcast_i64(&self, buf: &mut [i64]) -> Result<(), Error>;
}

/// The group of one: the single-process run.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl DataParallel for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<(), Error> {
        Ok(())
    }
    fn sum_i64(&self, _: &mut [i64]) -> Result<(), Error> {
        Ok(())
    }
    fn max_i64(&self, _: &mut [i64]) -> Result<(), Error> {
        Ok(())
    }
    fn gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error> {
        if send.len() != recv.len() {
            return Err(Error::Shape(format!("gather: {} elements into {}", send.len(), recv.len())));
        }
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_i64(&self, _: &mut [i64]) -> Result<(), Error> {
        Ok(())
    }
}

/// Any squid-collectives communicator (MPI processes, local threads) as a data-parallel group.
#[derive(Debug)]
pub struct CommGroup<C>(pub C);

impl<C: Communicator> DataParallel for CommGroup<C> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world_size()
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<(), Error> {
        Ok(self.0.all_reduce_in_place(buf, ReduceOp::Sum)?)
    }
    fn sum_i64(&self, buf: &mut [i64]) -> Result<(), Error> {
        Ok(self.0.all_reduce_in_place(buf, ReduceOp::Sum)?)
    }
    fn max_i64(&self, buf: &mut [i64]) -> Result<(), Error> {
        Ok(self.0.all_reduce_in_place(buf, ReduceOp::Max)?)
    }
    fn gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error> {
        Ok(self.0.all_gather(send, recv)?)
    }
    fn broadcast_i64(&self, buf: &mut [i64]) -> Result<(), Error> {
        Ok(self.0.broadcast(buf, 0)?)
    }
}

/// The tasks `[start, end)` of `n` that rank `rank` of `world` rolls out (contiguous, sizes
/// differing by at most one; a rank may get none when `n < world`).
pub fn share(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let base = n / world;
    let extra = n % world;
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Every rank's `local` values (each rank's count given by [`share`] of `n` times `per_item`)
/// concatenated in rank order: the whole step's values on every rank.
pub fn gather_shares(dp: &dyn DataParallel, local: &[f32], n: usize, per_item: usize) -> Result<Vec<f32>, Error> {
    let world = dp.world();
    let widest = n.div_ceil(world) * per_item;
    let mut send = vec![f32::NAN; widest];
    if local.len() > widest {
        return Err(Error::Shape(format!("gather: {} local values, at most {widest} expected", local.len())));
    }
    send[..local.len()].copy_from_slice(local);
    let mut all = vec![0f32; widest * world];
    dp.gather_f32(&send, &mut all)?;
    let mut out = Vec::with_capacity(n * per_item);
    for r in 0..world {
        let len = share(n, r, world).len() * per_item;
        out.extend_from_slice(&all[r * widest..r * widest + len]);
    }
    Ok(out)
}

/// Fails unless every rank passes the same `fingerprint` (the run's configuration): ranks
/// started with different flags would train different runs and deadlock.
pub fn check_same_config(dp: &dyn DataParallel, fingerprint: &str) -> Result<(), Error> {
    if dp.world() == 1 {
        return Ok(());
    }
    let digest = blake3::hash(fingerprint.as_bytes());
    let words: Vec<i64> =
        digest.as_bytes()[..16].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    let (mut hi, mut lo) = (words.clone(), words.iter().map(|w| w.wrapping_neg()).collect::<Vec<_>>());
    dp.max_i64(&mut hi)?;
    dp.max_i64(&mut lo)?;
    let same = hi == words && lo.iter().zip(&words).all(|(l, w)| *l == w.wrapping_neg());
    if !same {
        return Err(Error::Config(format!(
            "data parallelism: rank {} was started with another configuration than its peers (every rank must get the same flags)",
            dp.rank()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use squid_collectives::LocalGroup;

    #[test]
    fn shares_cover_every_task_once() {
        for n in 0..20 {
            for world in 1..7 {
                let ranges: Vec<_> = (0..world).map(|r| share(n, r, world)).collect();
                let mut next = 0;
                for r in &ranges {
                    assert_eq!(r.start, next);
                    assert!(r.len() == n / world || r.len() == n / world + 1, "n {n} world {world}: {r:?}");
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn gather_shares_concatenates_uneven_shares_in_rank_order() {
        let (n, per) = (7, 2);
        let out = LocalGroup::new(3).unwrap().run(|comm| {
            let dp = CommGroup(comm);
            let mine: Vec<f32> = share(n, dp.rank(), 3).flat_map(|t| [t as f32, t as f32 + 0.5]).collect();
            gather_shares(&dp, &mine, n, per).unwrap()
        });
        let want: Vec<f32> = (0..n).flat_map(|t| [t as f32, t as f32 + 0.5]).collect();
        for r in out {
            assert_eq!(r.unwrap(), want);
        }
    }

    #[test]
    fn ranks_with_other_configs_are_refused() {
        let out = LocalGroup::new(2).unwrap().run(|comm| {
            let dp = CommGroup(comm);
            let same = check_same_config(&dp, "a").is_ok();
            let other = check_same_config(&dp, if dp.rank() == 0 { "a" } else { "b" });
            (same, other.is_err())
        });
        for r in out {
            assert_eq!(r.unwrap(), (true, true));
        }
    }
}
