//! The one API every backend implements.

use crate::dtype::Scalar;
use crate::{Error, ReduceOp};

/// One rank's handle on a group of `world_size()` ranks.
///
/// Every rank of the group must make the same sequence of collective calls (same collective,
/// element type, lengths, reduction and root); buffer sizes follow NCCL's rules and are checked
/// ([`crate::Collective::check_sizes`]). A call returns when this rank's part is done and its
/// buffers are no longer touched by any peer.
///
/// Reductions combine the ranks' values in rank order in [`Scalar::Acc`] (f32 for f32, bf16 and
/// f16; the type itself for i32 and i64, wrapping on overflow) and round once, so every rank
/// receives bit-identical results. `Avg` is the sum divided by the world size (integer division
/// truncates).
///
/// Failures are sticky: once a rank is lost (dropped, panicked) or late past the backend's
/// deadline, every pending and later call on every rank returns [`Error::PeerLost`] or
/// [`Error::Timeout`] and the group cannot be used again.
pub trait Communicator {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// `recv = op(send of rank 0, send of rank 1, ...)`, element-wise; `send.len() == recv.len()`.
    fn all_reduce<T: Scalar>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<(), Error>;

    /// [`Communicator::all_reduce`] with the result written over the input (one extra copy of
    /// the input is made).
    fn all_reduce_in_place<T: Scalar>(&self, buf: &mut [T], op: ReduceOp) -> Result<(), Error> {
        let send = buf.to_vec();
        self.all_reduce(&send, buf, op)
    }

    /// `recv = concat(send of rank 0, send of rank 1, ...)`; `recv.len() == world * send.len()`.
    fn all_gather<T: Scalar>(&self, send: &[T], recv: &mut [T]) -> Result<(), Error>;

    /// Rank r receives block r of the all-reduce of `send`; `send.len() == world * recv.len()`.
    fn reduce_scatter<T: Scalar>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<(), Error>;

    /// Every rank's `buf` becomes rank `root`'s `buf`.
    fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) -> Result<(), Error>;

    /// Sends `buf` to rank `peer`, which must post a matching [`Communicator::recv`] (same type
    /// and length). Messages from one rank to another arrive in the order they were sent.
    fn send<T: Scalar>(&self, buf: &[T], peer: usize) -> Result<(), Error>;

    /// Receives the next message from rank `peer` into `buf`.
    fn recv<T: Scalar>(&self, buf: &mut [T], peer: usize) -> Result<(), Error>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), Error>;
}

/// Runs `f` on one scoped thread per communicator (named `{prefix}-{rank}`, rank = index) and
/// returns each thread's outcome in rank order (a panicking rank gives `Err` with its payload).
/// Shared by the thread-group backends.
pub(crate) fn run_per_rank<C, R, F>(comms: Vec<C>, prefix: &str, f: F) -> Vec<std::thread::Result<R>>
where
    C: Send,
    R: Send,
    F: Fn(C) -> R + Sync,
{
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                std::thread::Builder::new().name(format!("{prefix}-{rank}")).spawn_scoped(scope, move || f(comm))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join(),
                Err(e) => Err(Box::new(e) as Box<dyn std::any::Any + Send>),
            })
            .collect()
    })
}
