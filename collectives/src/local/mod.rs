//! The in-process backend: the ranks are threads of one process and move data through shared
//! memory.
//!
//! Each collective publishes every rank's buffer addresses at one barrier; then each rank does
//! its share of the work directly on its peers' buffers, and a second barrier marks the end:
//!
//! - all-reduce: rank r reduces block r (of `len / world`, the remainder spread over the first
//!   ranks) from every rank's send buffer, one L1-sized piece at a time, and stores each reduced
//!   piece into block r of every rank's receive buffer (a reduce-scatter and an all-gather fused:
//!   every input byte is read once, every output byte written once). In place the buffer is both
//!   send and receive buffer and nothing is copied: each piece is read before it is written,
//!   and block r is touched by rank r alone;
//! - reduce-scatter: rank r reduces block r of every send buffer into its receive buffer;
//! - all-gather: rank r copies its send buffer into slot r of every receive buffer;
//! - broadcast: every rank copies the root's buffer.
//!
//! The work is spread evenly over the ranks; none of it goes through rank 0. Calls that write
//! at least 16 MiB over all ranks store their results with non-temporal stores on x86-64
//! (`stream`): such buffers do not stay in the cache anyway, and skipping the read of each
//! destination line takes a third of the memory traffic away.
//!
//! Failures: a barrier or receive that waits longer than the group's timeout, a communicator that
//! is dropped, or a thread that panics makes the group fail; every pending and later collective
//! on every rank then returns that [`Error::PeerLost`] or [`Error::Timeout`], and
//! [`LocalComm::failure`] says why. Send/recv fail the same way after a timeout or a panic; after
//! a rank is merely dropped (its thread finished), only send/recv with that rank fail (messages
//! it sent before are still delivered), so ranks that finish at different times do not break
//! the point-to-point traffic of the others. A rank leaving a call with an error first waits
//! until no peer is still reading or writing its buffers.

mod group;
mod stream;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use group::{Call, Kind, Message, Shared};
use stream::{copy_to, fence, reduce_to, should_stream, PIECE};

use crate::communicator::Communicator;
use crate::dtype::Scalar;
use crate::reduce::reduce_into;
use crate::{Collective, Error, ReduceOp};

/// Elements copied per piece in all-gather: each piece of the send buffer stays in L1 while it
/// is stored to every receive buffer.
const COPY_BLOCK: usize = 4096;

/// A group of ranks that are threads of this process; hands out one [`LocalComm`] per rank.
pub struct LocalGroup {
    comms: Vec<LocalComm>,
}

impl LocalGroup {
    /// How long a rank waits for its peers by default (PyTorch's process groups wait 10 to 30
    /// minutes; threads of one process need less).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// The most ranks a group holds (each is a thread, each pair has a mailbox).
    pub const MAX_WORLD: usize = 1 << 12;

    /// A group of `world` ranks with [`LocalGroup::DEFAULT_TIMEOUT`].
    pub fn new(world: usize) -> Result<Self, Error> {
        Self::with_timeout(world, Self::DEFAULT_TIMEOUT)
    }

    /// A group of `world` ranks in which a rank that waits longer than `timeout` for its peers
    /// (at a collective or a receive) makes the group fail with [`Error::Timeout`].
    pub fn with_timeout(world: usize, timeout: Duration) -> Result<Self, Error> {
        if world == 0 {
            return Err(Error::EmptyWorld);
        }
        // One thread per rank and `world^2` mailboxes: a huge world is an error, not an abort.
        if world > Self::MAX_WORLD {
            return Err(Error::WorldTooLarge { world, max: Self::MAX_WORLD });
        }
        let shared = Arc::new(Shared::new(world, timeout));
        let comms =
            (0..world).map(|rank| LocalComm { rank, shared: Arc::clone(&shared), _not_sync: PhantomData }).collect();
        Ok(Self { comms })
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.comms.len()
    }

    /// One communicator per rank, rank 0 first; move each into its own thread.
    pub fn into_communicators(self) -> Vec<LocalComm> {
        self.comms
    }

    /// Runs `f` on one scoped thread per rank and returns each rank's outcome in rank order (a
    /// rank that panicked gives `Err` with its panic payload; its peers see [`Error::PeerLost`]).
    pub fn run<R, F>(self, f: F) -> Vec<std::thread::Result<R>>
    where
        R: Send,
        F: Fn(LocalComm) -> R + Sync,
    {
        crate::communicator::run_per_rank(self.comms, "squid-rank", f)
    }
}

/// One rank of a [`LocalGroup`]. `Send` (move it into the rank's thread) but not `Sync`: one
/// thread makes a rank's calls, one at a time.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalComm").field("rank", &self.rank).field("world", &self.shared.world).finish()
    }
}

impl LocalComm {
    /// How long this rank waits for its peers before the group fails.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Why the group can no longer be used, or `None` while it can.
    pub fn failure(&self) -> Option<Error> {
        self.shared.failure()
    }

    /// Publishes this rank's call, waits for every rank's, and checks they agree; on success
    /// this rank may touch its peers' buffers until the returned guard finishes.
    fn start(&self, call: Call, check: Result<(), Error>) -> Result<(Arc<[Call]>, PhaseGuard<'_>), Error> {
        let calls = self.shared.arrive(self.rank, call, true)?;
        let guard = PhaseGuard { comm: self, armed: true };
        check?;
        let op = call.kind.name();
        for (r, c) in calls.iter().enumerate() {
            if !c.valid {
                let detail = format!("rank {r}'s call to {} was rejected (buffer size, root)", c.kind.name());
                return Err(Error::Mismatch { op, detail });
            }
            if (c.kind, c.dtype, c.count) != (call.kind, call.dtype, call.count) {
                let detail = format!(
                    "rank {r} called {} with {} {} elements, rank {} called {} with {} {} elements",
                    describe(c.kind),
                    c.count,
                    c.dtype.map_or("-", |d| d.name()),
                    self.rank,
                    describe(call.kind),
                    call.count,
                    call.dtype.map_or("-", |d| d.name()),
                );
                return Err(Error::Mismatch { op, detail });
            }
        }
        Ok((calls, guard))
    }

    /// The all-reduce of `len` elements from the send buffer at `send` into the receive buffer
    /// at `recv` (the same address for an in-place call): rank r reduces block r of every send
    /// buffer one L1-sized piece at a time and stores it into block r of every receive buffer
    /// (a reduce-scatter and an all-gather fused: every input byte is read once, every output
    /// byte written once). When some rank's call is in place, or the stores stream, each piece
    /// is reduced into a scratch piece first and stored after its reads end, so a buffer that is
    /// both send and receive is never read and written through live references at once;
    /// otherwise the reduction writes the first receive buffer directly.
    fn all_reduce_at<T: Scalar>(
        &self,
        send: usize,
        recv: usize,
        len: usize,
        op: ReduceOp,
        check: Result<(), Error>,
    ) -> Result<(), Error> {
        let world = self.shared.world;
        let call =
            Call { kind: Kind::AllReduce(op), dtype: Some(T::DTYPE), count: len, send, recv, valid: check.is_ok() };
        let (calls, guard) = self.start(call, check)?;
        let (lo, hi) = block_range(len, world, self.rank);
        let stream = should_stream(world * len * std::mem::size_of::<T>());
        let in_place = calls.iter().any(|c| c.send == c.recv);
        if !stream && !in_place {
            // SAFETY: see the impl; block `lo..hi` of every receive buffer is written by this
            // rank only, and no receive buffer is a send buffer.
            unsafe {
                let srcs: Vec<&[T]> = calls.iter().map(|c| peer_slice::<T>(c.send, lo, hi)).collect();
                let mut outs: Vec<&mut [T]> = calls.iter().map(|c| peer_slice_mut::<T>(c.recv, lo, hi)).collect();
                reduce_into(&srcs, &mut outs, op);
            }
            return guard.finish();
        }
        // Sized to the block, so a small call does not clear a whole piece.
        let mut piece = vec![T::default(); PIECE.min(hi - lo)];
        let mut srcs: Vec<&[T]> = Vec::with_capacity(world);
        let mut start = lo;
        while start < hi {
            let end = (start + PIECE).min(hi);
            let piece = &mut piece[..end - start];
            // SAFETY: see the impl; block `lo..hi` of every buffer is read and written by this
            // rank only, and the source slices are dropped (cleared) before the piece is stored.
            unsafe {
                srcs.extend(calls.iter().map(|c| peer_slice::<T>(c.send, start, end)));
                reduce_into(&srcs, &mut [&mut *piece], op);
                srcs.clear();
                for c in calls.iter() {
                    copy_to(peer_slice_mut::<T>(c.recv, start, end), piece, stream);
                }
            }
            start = end;
        }
        fence(stream);
        guard.finish()
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<(), Error> {
        if peer >= self.shared.world || peer == self.rank {
            return Err(Error::InvalidRank { op, what: "peer", rank: peer, world: self.shared.world, this: self.rank });
        }
        Ok(())
    }
}

fn describe(kind: Kind) -> String {
    match kind {
        Kind::AllReduce(op) | Kind::ReduceScatter(op) => format!("{}({op:?})", kind.name()),
        Kind::Broadcast { root } => format!("broadcast(root {root})"),
        _ => kind.name().to_string(),
    }
}

/// Marks the span in which a rank may touch its peers' buffers; ends it on every exit path,
/// and if the thread panics inside a call, fails the group and waits for the peers to leave
/// this rank's buffers before the unwinding frees them.
struct PhaseGuard<'a> {
    comm: &'a LocalComm,
    armed: bool,
}

impl PhaseGuard<'_> {
    /// The closing barrier: once every rank is here, no peer touches this rank's buffers.
    fn finish(mut self) -> Result<(), Error> {
        let result = self.comm.shared.arrive(self.comm.rank, Call::default(), false).map(|_| ());
        self.armed = false;
        result
    }
}

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        let rank = self.comm.rank;
        if std::thread::panicking() {
            self.comm.shared.fail(rank, Error::PeerLost { rank, panicked: true });
        } else if self.armed {
            self.comm.shared.leave_phase(rank);
        }
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        self.shared.leave(self.rank, std::thread::panicking());
    }
}

/// Rank `rank`'s block of `len` elements split over `world` ranks: sizes differ by at most
/// one, the first `len % world` ranks taking the larger.
pub(crate) fn block_range(len: usize, world: usize, rank: usize) -> (usize, usize) {
    let base = len / world;
    let extra = len % world;
    let lo = rank * base + rank.min(extra);
    (lo, lo + base + usize::from(rank < extra))
}

/// Elements `lo..hi` of a peer's buffer published at `addr`.
///
/// # Safety
/// `addr` is the exposed address of a live buffer of at least `hi` elements of `T`, and nobody
/// writes `lo..hi` while the slice is alive.
unsafe fn peer_slice<'a, T>(addr: usize, lo: usize, hi: usize) -> &'a [T] {
    let ptr = std::ptr::with_exposed_provenance::<T>(addr);
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts(ptr.add(lo), hi - lo) }
}

/// Elements `lo..hi` of a peer's buffer published at `addr`, for writing.
///
/// # Safety
/// `addr` is the exposed address of a live buffer of at least `hi` elements of `T`, and nobody
/// else reads or writes `lo..hi` while the slice is alive.
unsafe fn peer_slice_mut<'a, T>(addr: usize, lo: usize, hi: usize) -> &'a mut [T] {
    let ptr = std::ptr::with_exposed_provenance_mut::<T>(addr);
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts_mut(ptr.add(lo), hi - lo) }
}

// SAFETY (for every collective below): `start` returns only when every rank has published a
// call of the same kind, element type and count whose buffers passed the size rule, so every
// published address is a live buffer of that type and length, kept alive by its rank until that
// rank's closing barrier (`finish`) or, on an error, until no peer is in a phase (`Shared::fail`).
// Between `start` and `finish` the ranks write disjoint ranges (rank r writes only block/slot r
// of the receive buffers, or only its own buffer), and nobody writes a send buffer (except an
// in-place all-reduce's, which is also its receive buffer: block r of it is read and written by
// rank r alone).
impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce<T: Scalar>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<(), Error> {
        let check = Collective::AllReduce.check_sizes(send.len(), recv.len(), self.shared.world);
        let (send_addr, recv_addr) = (send.as_ptr().expose_provenance(), recv.as_mut_ptr().expose_provenance());
        self.all_reduce_at::<T>(send_addr, recv_addr, send.len(), op, check)
    }

    /// In place with no copy: every rank reads and writes only its own block of every buffer,
    /// one piece at a time (the module docs describe the scheme).
    fn all_reduce_in_place<T: Scalar>(&self, buf: &mut [T], op: ReduceOp) -> Result<(), Error> {
        let addr = buf.as_mut_ptr().expose_provenance();
        self.all_reduce_at::<T>(addr, addr, buf.len(), op, Ok(()))
    }

    fn all_gather<T: Scalar>(&self, send: &[T], recv: &mut [T]) -> Result<(), Error> {
        let world = self.shared.world;
        let check = Collective::AllGather.check_sizes(send.len(), recv.len(), world);
        let call = Call {
            kind: Kind::AllGather,
            dtype: Some(T::DTYPE),
            count: send.len(),
            send: send.as_ptr().expose_provenance(),
            recv: recv.as_mut_ptr().expose_provenance(),
            valid: check.is_ok(),
        };
        let (calls, guard) = self.start(call, check)?;
        let len = send.len();
        let (lo, hi) = (self.rank * len, (self.rank + 1) * len);
        let stream = should_stream(world * len * std::mem::size_of::<T>());
        // SAFETY: see the impl; slot `lo..hi` of every receive buffer is written by this rank only.
        unsafe {
            let mut outs: Vec<&mut [T]> = calls.iter().map(|c| peer_slice_mut::<T>(c.recv, lo, hi)).collect();
            let mut start = 0;
            while start < len {
                let end = (start + COPY_BLOCK).min(len);
                for out in outs.iter_mut() {
                    copy_to(&mut out[start..end], &send[start..end], stream);
                }
                start = end;
            }
        }
        fence(stream);
        guard.finish()
    }

    fn reduce_scatter<T: Scalar>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<(), Error> {
        let world = self.shared.world;
        let check = Collective::ReduceScatter.check_sizes(send.len(), recv.len(), world);
        let call = Call {
            kind: Kind::ReduceScatter(op),
            dtype: Some(T::DTYPE),
            count: recv.len(),
            send: send.as_ptr().expose_provenance(),
            recv: recv.as_mut_ptr().expose_provenance(),
            valid: check.is_ok(),
        };
        let (calls, guard) = self.start(call, check)?;
        let len = recv.len();
        let (lo, hi) = (self.rank * len, (self.rank + 1) * len);
        let stream = should_stream(std::mem::size_of_val(send));
        // SAFETY: see the impl; only this rank writes its receive buffer.
        unsafe {
            let srcs: Vec<&[T]> = calls.iter().map(|c| peer_slice::<T>(c.send, lo, hi)).collect();
            let mut outs = [peer_slice_mut::<T>(calls[self.rank].recv, 0, len)];
            reduce_to(&srcs, &mut outs, op, stream);
        }
        guard.finish()
    }

    fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) -> Result<(), Error> {
        let world = self.shared.world;
        let check = if root >= world {
            Err(Error::InvalidRank { op: "broadcast", what: "root", rank: root, world, this: self.rank })
        } else {
            Collective::Broadcast.check_sizes(buf.len(), buf.len(), world)
        };
        let addr = buf.as_mut_ptr().expose_provenance();
        let call = Call {
            kind: Kind::Broadcast { root },
            dtype: Some(T::DTYPE),
            count: buf.len(),
            send: addr,
            recv: addr,
            valid: check.is_ok(),
        };
        let (calls, guard) = self.start(call, check)?;
        if self.rank != root {
            let len = buf.len();
            let stream = should_stream((world - 1) * len * std::mem::size_of::<T>());
            // SAFETY: see the impl; the root's buffer is only read, this rank's only written by it.
            unsafe {
                let src = peer_slice::<T>(calls[root].send, 0, len);
                copy_to(peer_slice_mut::<T>(addr, 0, len), src, stream);
            }
            fence(stream);
        }
        guard.finish()
    }

    fn send<T: Scalar>(&self, buf: &[T], peer: usize) -> Result<(), Error> {
        self.check_peer("send", peer)?;
        let message = Message { dtype: T::DTYPE, len: buf.len(), data: Box::new(buf.to_vec()) };
        self.shared.post(self.rank, peer, message)
    }

    fn recv<T: Scalar>(&self, buf: &mut [T], peer: usize) -> Result<(), Error> {
        self.check_peer("recv", peer)?;
        let (len, this) = (buf.len(), self.rank);
        let mismatch = |m: &Message| Error::Mismatch {
            op: "recv",
            detail: format!(
                "rank {peer} sent {} {} elements, rank {this} posted a receive of {len} {} elements",
                m.len,
                m.dtype,
                T::DTYPE
            ),
        };
        let message = self.shared.take(peer, this, |m| {
            if m.dtype == T::DTYPE && m.len == len {
                Ok(())
            } else {
                Err(mismatch(m))
            }
        })?;
        let Message { dtype, len: sent, data } = message;
        match data.downcast::<Vec<T>>() {
            Ok(data) => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            Err(data) => Err(mismatch(&Message { dtype, len: sent, data })),
        }
    }

    fn barrier(&self) -> Result<(), Error> {
        let call = Call { kind: Kind::Barrier, valid: true, ..Call::default() };
        let (_, guard) = self.start(call, Ok(()))?;
        drop(guard);
        Ok(())
    }
}
