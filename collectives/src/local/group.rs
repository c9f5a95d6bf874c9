//! The state the ranks of one local group share: a barrier that carries each rank's call, the
//! sticky failure, and the mailboxes of send/recv.
//!
//! Memory safety of the collectives rests on one rule kept here: between two barriers a rank may
//! read or write its peers' buffers (it is "in a phase"), and a rank that leaves a call with an
//! error first waits until no peer is in a phase, so no peer can touch its buffers after it
//! returns.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::dtype::DataType;
use crate::{Error, ReduceOp};

/// Which call a rank arrived at the first barrier with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Kind {
    /// A later barrier of a call already matched (carries nothing).
    #[default]
    Step,
    AllReduce(ReduceOp),
    AllGather,
    ReduceScatter(ReduceOp),
    Broadcast {
        root: usize,
    },
    Barrier,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::AllReduce(_) => "all_reduce",
            Self::AllGather => "all_gather",
            Self::ReduceScatter(_) => "reduce_scatter",
            Self::Broadcast { .. } => "broadcast",
            Self::Barrier => "barrier",
        }
    }
}

/// One rank's call, published at the first barrier so every rank can check the calls agree and
/// find its peers' buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Call {
    pub kind: Kind,
    pub dtype: Option<DataType>,
    /// The length every rank must agree on (send for all-reduce/all-gather, recv for
    /// reduce-scatter, the buffer for broadcast).
    pub count: usize,
    /// Address of the send buffer (the buffer itself for broadcast).
    pub send: usize,
    /// Address of the receive buffer.
    pub recv: usize,
    /// Whether this rank's buffers passed the size rule.
    pub valid: bool,
}

/// A message of send/recv: the sender's data, copied.
pub(super) struct Message {
    pub dtype: DataType,
    pub len: usize,
    pub data: Box<dyn Any + Send>,
}

struct State {
    /// Completed barriers.
    generation: u64,
    /// Ranks waiting at the current barrier.
    arrived: usize,
    present: Vec<bool>,
    calls: Vec<Call>,
    /// The calls of the last completed barrier.
    released: Arc<[Call]>,
    /// Whether each rank may be touching its peers' buffers now.
    in_phase: Vec<bool>,
    /// The first failure; once set, every collective fails with it.
    failure: Option<Error>,
    /// Ranks whose communicator was dropped.
    gone: Vec<bool>,
    /// `mailboxes[src * world + dst]`.
    mailboxes: Vec<VecDeque<Message>>,
}

/// What the ranks of a group share.
pub(super) struct Shared {
    pub world: usize,
    pub timeout: Duration,
    state: Mutex<State>,
    cond: Condvar,
    /// Copies of `State::generation` and `State::failure.is_some()` that a waiting rank can
    /// poll without the lock.
    generation: AtomicU64,
    failed: AtomicBool,
}

/// Polls of a waiting rank before it sleeps on the condition variable: the first few spin (a
/// barrier on an idle multi-core machine completes within microseconds, and a sleep costs a
/// futex wake-up per rank), the rest yield (so a rank waiting on a busy machine hands its core
/// to the rank it waits for).
const SPIN_POLLS: u32 = 64;
const YIELD_POLLS: u32 = 64;

impl Shared {
    pub fn new(world: usize, timeout: Duration) -> Self {
        Self {
            world,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                present: vec![false; world],
                calls: vec![Call::default(); world],
                released: Arc::from(vec![Call::default(); world]),
                in_phase: vec![false; world],
                failure: None,
                gone: vec![false; world],
                mailboxes: (0..world * world).map(|_| VecDeque::new()).collect(),
            }),
            cond: Condvar::new(),
            generation: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// The state; a panic elsewhere while it was held does not make it unreadable (nothing
    /// user-supplied runs under this lock, and every field stays consistent between statements).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until<'a>(&self, st: MutexGuard<'a, State>, deadline: Option<Instant>) -> MutexGuard<'a, State> {
        match deadline {
            None => self.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                self.cond.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0
            }
        }
    }

    /// Records `error` as the group's failure unless one is already recorded, takes `rank` out
    /// of its phase, and waits until no peer is in a phase; returns the recorded failure.
    fn fail_locked(&self, mut st: MutexGuard<'_, State>, rank: usize, error: Error) -> Error {
        let failure = st.failure.get_or_insert(error).clone();
        self.failed.store(true, Ordering::Release);
        st.in_phase[rank] = false;
        self.cond.notify_all();
        while st.in_phase.iter().any(|&p| p) {
            st = self.wait_until(st, None);
        }
        failure
    }

    /// Makes the group fail with `error` (if it has not failed already) and waits until no
    /// rank is touching peer buffers.
    pub fn fail(&self, rank: usize, error: Error) -> Error {
        let st = self.lock();
        self.fail_locked(st, rank, error)
    }

    /// Rank `rank`'s communicator is gone: every collective fails from now on, and so does
    /// point-to-point traffic with `rank` (messages it sent before are still delivered).
    pub fn leave(&self, rank: usize, panicked: bool) {
        let mut st = self.lock();
        st.gone[rank] = true;
        self.fail_locked(st, rank, Error::PeerLost { rank, panicked });
    }

    /// Why send/recv with `peer` cannot go on: a timeout or a panic anywhere (the computation
    /// is broken), or `peer` being gone. A rank that was dropped normally
    /// does not stop traffic between the others.
    fn p2p_failure(st: &State, peer: usize) -> Option<Error> {
        match &st.failure {
            Some(Error::PeerLost { panicked: false, .. }) | None => {}
            Some(e) => return Some(e.clone()),
        }
        st.gone[peer].then_some(Error::PeerLost { rank: peer, panicked: false })
    }

    /// The group's failure, if any.
    pub fn failure(&self) -> Option<Error> {
        self.lock().failure.clone()
    }

    /// Waits until every rank has arrived with its call, or until the group fails or the
    /// deadline passes. On success returns every rank's call; if `enter_phase`, every rank is
    /// then in a phase (may touch peer buffers) until it arrives at the next barrier or calls
    /// [`Shared::leave_phase`].
    pub fn arrive(&self, rank: usize, call: Call, enter_phase: bool) -> Result<Arc<[Call]>, Error> {
        let mut st = self.lock();
        st.in_phase[rank] = false;
        if let Some(e) = st.failure.clone() {
            return Err(self.fail_locked(st, rank, e));
        }
        st.calls[rank] = call;
        st.present[rank] = true;
        st.arrived += 1;
        if st.arrived == self.world {
            st.arrived = 0;
            st.generation += 1;
            self.generation.store(st.generation, Ordering::Release);
            st.released = Arc::from(st.calls.as_slice());
            st.present.iter_mut().for_each(|p| *p = false);
            st.in_phase.iter_mut().for_each(|p| *p = enter_phase);
            self.cond.notify_all();
            return Ok(st.released.clone());
        }
        let generation = st.generation;
        // A timeout too long to represent means no deadline.
        let deadline = Instant::now().checked_add(self.timeout);
        drop(st);
        for poll in 0..SPIN_POLLS + YIELD_POLLS {
            if self.generation.load(Ordering::Acquire) != generation || self.failed.load(Ordering::Acquire) {
                break;
            }
            if poll < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let mut st = self.lock();
        loop {
            // Released first: a barrier that completed stays completed even if a peer fails
            // right after (that failure shows at the next barrier).
            if st.generation != generation {
                return Ok(st.released.clone());
            }
            if let Some(e) = st.failure.clone() {
                st.present[rank] = false;
                st.arrived -= 1;
                return Err(self.fail_locked(st, rank, e));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let missing = (0..self.world).filter(|&r| !st.present[r]).collect();
                st.present[rank] = false;
                st.arrived -= 1;
                let error = Error::Timeout { waiting: rank, missing, after: self.timeout };
                return Err(self.fail_locked(st, rank, error));
            }
            st = self.wait_until(st, deadline);
        }
    }

    /// Takes `rank` out of its phase (a call that ends without another barrier).
    pub fn leave_phase(&self, rank: usize) {
        let mut st = self.lock();
        if st.in_phase[rank] {
            st.in_phase[rank] = false;
            self.cond.notify_all();
        }
    }

    /// Queues a message from `src` to `dst`.
    pub fn post(&self, src: usize, dst: usize, message: Message) -> Result<(), Error> {
        let mut st = self.lock();
        if let Some(e) = Self::p2p_failure(&st, dst) {
            return Err(e);
        }
        st.mailboxes[src * self.world + dst].push_back(message);
        self.cond.notify_all();
        Ok(())
    }

    /// Takes the next message from `src` to `dst` once `accept` says it fits; a message that
    /// does not fit stays queued and `accept`'s error is returned.
    pub fn take(
        &self,
        src: usize,
        dst: usize,
        accept: impl Fn(&Message) -> Result<(), Error>,
    ) -> Result<Message, Error> {
        let mut st = self.lock();
        // A timeout too long to represent means no deadline.
        let deadline = Instant::now().checked_add(self.timeout);
        loop {
            let fatal = Self::p2p_failure(&st, src);
            if let Some(e @ (Error::Timeout { .. } | Error::PeerLost { panicked: true, .. })) = fatal.clone() {
                return Err(e);
            }
            let slot = src * self.world + dst;
            if let Some(front) = st.mailboxes[slot].front() {
                accept(front)?;
                if let Some(message) = st.mailboxes[slot].pop_front() {
                    return Ok(message);
                }
            }
            if let Some(e) = fatal {
                return Err(e);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let error = Error::Timeout { waiting: dst, missing: vec![src], after: self.timeout };
                return Err(self.fail_locked(st, dst, error));
            }
            st = self.wait_until(st, deadline);
        }
    }
}
