//! The MPI backend (cargo feature `mpi`): ranks are processes started by `mpirun`, possibly on
//! several machines, and data moves through the system's MPI library (rsmpi's bindings).
//!
//! # What each call does
//! Every collective first exchanges a small call descriptor (collective, element type, length,
//! reduction or root, whether the sizes passed the rule) with every peer by point-to-point
//! messages. That exchange is the barrier, lets every rank return [`Error::Mismatch`] when the
//! calls disagree (MPI itself would corrupt memory or hang), and names the ranks that never
//! arrived when a deadline passes. Then:
//!
//! - all-reduce: the input is split into `world` equal blocks (the last padded), an
//!   `MPI_Ialltoall` gives rank r block r of every rank's input, rank r reduces them in rank
//!   order with the crate's own reduction (in [`crate::Scalar::Acc`], rounded once), and an
//!   `MPI_Iallgather` hands every rank every reduced block. Each rank sends and receives about
//!   `2 (n-1)/n` of the buffer, as a ring all-reduce does;
//! - reduce-scatter: the `MPI_Ialltoall` and the rank-order reduction of the all-reduce;
//! - all-gather: `MPI_Iallgather`; broadcast: `MPI_Ibcast`; barrier: the descriptor exchange;
//! - send: the data is copied and sent with `MPI_Isend` (buffered: `send` returns at once, the
//!   copy is freed when MPI is done with it); recv: `MPI_Iprobe` checks the type (carried in
//!   the tag) and length of the next message from the peer before `MPI_Irecv` takes it.
//!
//! MPI's own reductions are never used: MPI has no bf16/f16 types and does not fix the order
//! in which ranks are combined. So the semantics are exactly the local backend's: bf16/f16 (and
//! f32) sums accumulate in f32 in rank order and round once, integers wrap, `Avg` divides the
//! sum by the world size, and every rank receives bit-identical results. Data crosses the wire
//! in its own type (bf16 as 2 bytes).
//!
//! MPI only ever sees buffers this communicator owns: inputs are copied in and results copied
//! out, so an MPI operation left pending by a failure can never touch memory the caller has
//! freed. The collectives move their data in pieces of about [`MpiOptions::stage_bytes`]
//! (4 MiB by default; every block of an all-reduce advances by one piece per step), so these
//! buffers stay that small whatever the call's size, and each copy in or out touches memory
//! still in the cache instead of streaming the whole buffer through DRAM twice more. Point-to-
//! point messages are staged whole.
//!
//! # Failures
//! Every MPI call is non-blocking and polled until the communicator's deadline
//! ([`MpiOptions::timeout`]). A call that passes the deadline returns [`Error::Timeout`] (naming
//! the ranks whose descriptors never came; an empty list means every rank arrived and the data
//! transfer itself stalled); an error code from MPI (the communicators use
//! `MPI_ERRORS_RETURN`) returns [`Error::Backend`]. Both are sticky: every later call returns
//! the same error. MPI cannot resume a job after a lost peer or a failed operation, so a
//! watchdog thread then ends the whole job: [`MpiOptions::abort_grace`] after the failure
//! (time for the caller to log the error or leave on its own) it prints the error and calls
//! `MPI_Abort` on `MPI_COMM_WORLD` with exit code [`MpiComm::ABORT_CODE`] (or
//! `std::process::abort` where MPI does not provide `MPI_THREAD_MULTIPLE`), and `mpirun` then
//! kills every rank. The watchdog also aborts if a single MPI call (or `MPI_Finalize` when the
//! communicator is dropped) is still running `timeout + abort_grace` after it started. A peer
//! process that dies is, with Open MPI's `mpirun`, killed along with the whole job by the
//! launcher itself; [`Error::PeerLost`] is never returned by this backend.

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::mpi::environment::Universe;
use ::mpi::ffi;
use ::mpi::Threading;

use crate::communicator::Communicator;
use crate::dtype::{DataType, Scalar};
use crate::reduce::reduce_into;
use crate::{Collective, Error, ReduceOp};

/// The deadline and abort policy of an [`MpiComm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MpiOptions {
    /// How long one call may wait for its peers and its data before it fails with
    /// [`Error::Timeout`]; `Duration::MAX` means no deadline.
    pub timeout: Duration,
    /// How long after a failure the watchdog waits before it aborts the MPI job.
    pub abort_grace: Duration,
    /// Bytes of one staged piece: a collective moves its data through MPI in pieces of about
    /// this many bytes, so the memory the communicator stages through stays about twice this
    /// (whatever the call's size) and each piece is still in the cache when it is copied out.
    /// Every rank must use the same value (a difference is [`Error::Mismatch`]).
    pub stage_bytes: usize,
}

impl MpiOptions {
    /// The default deadline: PyTorch's and NCCL's watchdogs default to 10 minutes too.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
    /// The default time between a failure and the job's abort.
    pub const DEFAULT_ABORT_GRACE: Duration = Duration::from_secs(10);
    /// The default staged piece: fits in a last-level cache beside its copy.
    pub const DEFAULT_STAGE_BYTES: usize = 4 << 20;
}

impl Default for MpiOptions {
    fn default() -> Self {
        Self {
            timeout: Self::DEFAULT_TIMEOUT,
            abort_grace: Self::DEFAULT_ABORT_GRACE,
            stage_bytes: Self::DEFAULT_STAGE_BYTES,
        }
    }
}

/// Number of i64 words in a call descriptor: kind, parameter (reduction or root), element
/// type, count, sizes valid, staged piece bytes.
const DESC_WORDS: usize = 6;
type Desc = [i64; DESC_WORDS];

/// Tag of the descriptor messages (on the collectives' communicator).
const TAG_DESC: c_int = 1;
/// Tags of user messages: this plus the element type's code.
const TAG_DATA: c_int = 16;

/// Polls that spin before the wait loop starts yielding the CPU.
const SPIN_POLLS: u32 = 2000;
/// After this long without any request completing, the wait loop sleeps between polls.
const IDLE_BEFORE_SLEEP: Duration = Duration::from_secs(1);
/// The sleep between polls of a long wait.
const IDLE_SLEEP: Duration = Duration::from_micros(200);

/// One rank of an MPI job: `MPI_COMM_WORLD`, duplicated so this communicator's traffic never
/// meets the application's own MPI messages.
///
/// Made once per process by [`MpiComm::init`], which initialises MPI (with
/// `MPI_THREAD_MULTIPLE`, for the watchdog) and sets `MPI_ERRORS_RETURN` on `MPI_COMM_WORLD`;
/// dropping it finalises MPI, after waiting (up to the deadline) for its sends to be delivered.
/// Neither `Send` nor `Sync`: the thread that made it makes every call. See the [module
/// docs](self) for the algorithms and the failure semantics.
pub struct MpiComm {
    rank: usize,
    world: usize,
    options: MpiOptions,
    /// Descriptors and collectives.
    coll: ffi::MPI_Comm,
    /// User send/recv.
    p2p: ffi::MPI_Comm,
    watch: Arc<Watch>,
    watchdog: Option<JoinHandle<()>>,
    /// Buffers MPI reads or writes: staged inputs, received data, descriptors, pending sends.
    /// After a failure MPI may still touch them, so a failed communicator never frees them.
    bufs: RefCell<Buffers>,
    universe: Option<Universe>,
    _not_send: PhantomData<*const ()>,
}

#[derive(Default)]
struct Buffers {
    stage: Vec<u64>,
    result: Vec<u64>,
    desc: Vec<Desc>,
    sends: Vec<PendingSend>,
}

/// A buffered send MPI has not finished with.
struct PendingSend {
    request: ffi::MPI_Request,
    /// The destination rank (named if the send never completes).
    peer: usize,
    _data: Vec<u64>,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

/// What the watchdog thread watches.
struct Watch {
    rank: usize,
    options: MpiOptions,
    /// Whether MPI gave `MPI_THREAD_MULTIPLE`, so the watchdog thread may call `MPI_Abort`.
    mpi_abort: bool,
    state: Mutex<WatchState>,
    wake: Condvar,
}

#[derive(Default)]
struct WatchState {
    /// The sticky failure and when it happened.
    failure: Option<(Error, Instant)>,
    /// When the MPI call in progress (or `MPI_Finalize`) started.
    busy_since: Option<Instant>,
    /// The communicator was finalised cleanly: the watchdog exits.
    done: bool,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn failure(&self) -> Option<Error> {
        self.lock().failure.as_ref().map(|(e, _)| e.clone())
    }

    /// Records `error` unless a failure is already recorded; returns the sticky failure.
    fn fail(&self, error: Error) -> Error {
        let mut st = self.lock();
        let error = st.failure.get_or_insert_with(|| (error, Instant::now())).0.clone();
        drop(st);
        self.wake.notify_all();
        error
    }

    fn set_busy(&self, busy: bool) {
        self.lock().busy_since = busy.then(Instant::now);
        self.wake.notify_all();
    }

    /// The watchdog thread: aborts the job `abort_grace` after a failure, or when one call has
    /// run `timeout + abort_grace`.
    fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.done {
                return;
            }
            let (grace, timeout) = (self.options.abort_grace, self.options.timeout);
            let deadline = match (&st.failure, st.busy_since) {
                (Some((_, at)), _) => at.checked_add(grace),
                (None, Some(since)) => since.checked_add(timeout).and_then(|t| t.checked_add(grace)),
                (None, None) => None,
            };
            let now = Instant::now();
            st = match deadline {
                Some(d) if now >= d => {
                    let error = match &st.failure {
                        Some((e, _)) => e.clone(),
                        None => Error::Timeout { waiting: self.rank, missing: Vec::new(), after: timeout },
                    };
                    drop(st);
                    self.abort_job(&error)
                }
                Some(d) => self.wake.wait_timeout(st, d - now).unwrap_or_else(PoisonError::into_inner).0,
                None => self.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    fn abort_job(&self, error: &Error) -> ! {
        eprintln!(
            "squid-collectives (mpi): rank {}: {error}; aborting the MPI job with exit code {}",
            self.rank,
            MpiComm::ABORT_CODE
        );
        if self.mpi_abort {
            // SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE, so any thread may call it.
            unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, MpiComm::ABORT_CODE) };
        }
        std::process::abort()
    }
}

/// Marks an MPI call in progress for the watchdog.
struct Busy<'a>(&'a Watch);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.set_busy(false);
    }
}

/// The poll loop's pacing: spin, then yield, then sleep once nothing has completed for a while
/// (Open MPI advances non-blocking operations only inside MPI calls, so the loop keeps polling).
struct Backoff {
    polls: u32,
    last_progress: Instant,
}

impl Backoff {
    fn new() -> Self {
        Self { polls: 0, last_progress: Instant::now() }
    }

    fn pause(&mut self, progressed: bool, now: Instant) {
        if progressed {
            self.last_progress = now;
        }
        self.polls = self.polls.saturating_add(1);
        if self.polls < SPIN_POLLS {
            std::hint::spin_loop();
        } else if now.duration_since(self.last_progress) > IDLE_BEFORE_SLEEP {
            std::thread::sleep(IDLE_SLEEP);
        } else {
            std::thread::yield_now();
        }
    }
}

/// `MPI_SUCCESS`, or the library's message for `code`.
fn mpi_result(code: c_int, op: &'static str, what: &str) -> Result<(), Error> {
    if code == ffi::MPI_SUCCESS as c_int {
        return Ok(());
    }
    let mut text = [0 as std::os::raw::c_char; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING characters, as MPI_Error_string requires.
    let described = unsafe { ffi::MPI_Error_string(code, text.as_mut_ptr(), &mut len) } == ffi::MPI_SUCCESS as c_int;
    let message = if described {
        let bytes: Vec<u8> =
            text[..len.clamp(0, ffi::MPI_MAX_ERROR_STRING as c_int) as usize].iter().map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        "unknown error".to_string()
    };
    Err(Error::Backend { op, detail: format!("{what} failed with MPI error {code}: {message}") })
}

/// A length as MPI's `int` count.
fn mpi_count(n: usize, op: &'static str) -> Result<c_int, Error> {
    c_int::try_from(n).map_err(|_| Error::Backend {
        op,
        detail: format!("{n} elements in one MPI message exceed MPI's int counts ({})", c_int::MAX),
    })
}

/// The MPI type that moves one `T` (the bits only: this backend never lets MPI reduce).
fn wire_type<T: Scalar>() -> ffi::MPI_Datatype {
    // SAFETY: reading the predefined datatype handles rsmpi exports.
    unsafe {
        match std::mem::size_of::<T>() {
            2 => ffi::RSMPI_UINT16_T,
            4 => ffi::RSMPI_UINT32_T,
            _ => ffi::RSMPI_UINT64_T,
        }
    }
}

/// `len` elements of `T` at the start of `words`, grown as needed.
fn typed<T: Scalar>(words: &mut Vec<u64>, len: usize) -> &mut [T] {
    const { assert!(std::mem::align_of::<T>() <= std::mem::align_of::<u64>()) };
    let need = (len * std::mem::size_of::<T>()).div_ceil(8);
    if words.len() < need {
        words.resize(need, 0);
    }
    // SAFETY: the buffer holds at least `len * size_of::<T>()` initialised bytes, aligned for T
    // (checked above); T is one of f32, bf16, f16, i32, i64 (Scalar is sealed), for which every
    // bit pattern is a valid value.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<T>(), len) }
}

/// Fills `part` with elements `from..` of `src`, zeros past its end.
fn take_padded<T: Scalar>(part: &mut [T], src: &[T], from: usize) {
    let from = from.min(src.len());
    let have = (src.len() - from).min(part.len());
    part[..have].copy_from_slice(&src[from..from + have]);
    part[have..].fill(T::default());
}

/// Writes `part` to `dst` from element `at`, dropping what falls past its end.
fn put_clipped<T: Scalar>(dst: &mut [T], at: usize, part: &[T]) {
    let at = at.min(dst.len());
    let fits = (dst.len() - at).min(part.len());
    dst[at..at + fits].copy_from_slice(&part[..fits]);
}

fn dtype_code(dtype: DataType) -> i64 {
    match dtype {
        DataType::F32 => 0,
        DataType::BF16 => 1,
        DataType::F16 => 2,
        DataType::I32 => 3,
        DataType::I64 => 4,
    }
}

fn dtype_of_code(code: i64) -> Option<DataType> {
    [DataType::F32, DataType::BF16, DataType::F16, DataType::I32, DataType::I64]
        .into_iter()
        .find(|&d| dtype_code(d) == code)
}

fn op_code(op: ReduceOp) -> i64 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
        ReduceOp::Prod => 4,
    }
}

/// One rank's call, as the descriptor exchange carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Barrier,
    AllReduce(ReduceOp),
    AllGather,
    ReduceScatter(ReduceOp),
    Broadcast {
        root: usize,
    },
    /// The exchange before `MPI_Finalize`: every rank must arrive, and one that does not is
    /// named (`MPI_Finalize` itself would hang without saying whom it waits for).
    Finalize,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Barrier => "barrier",
            Self::AllReduce(_) => Collective::AllReduce.name(),
            Self::AllGather => Collective::AllGather.name(),
            Self::ReduceScatter(_) => Collective::ReduceScatter.name(),
            Self::Broadcast { .. } => Collective::Broadcast.name(),
            Self::Finalize => "drop",
        }
    }

    fn encode(self) -> (i64, i64) {
        match self {
            Self::Barrier => (0, 0),
            Self::AllReduce(op) => (1, op_code(op)),
            Self::AllGather => (2, 0),
            Self::ReduceScatter(op) => (3, op_code(op)),
            Self::Broadcast { root } => (4, root as i64),
            Self::Finalize => (5, 0),
        }
    }

    fn describe(desc: &Desc) -> String {
        let ops = ["Sum", "Avg", "Max", "Min", "Prod"];
        let op = usize::try_from(desc[1]).ok().and_then(|i| ops.get(i)).copied().unwrap_or("?");
        let call = match desc[0] {
            0 => "barrier".to_string(),
            1 => format!("all_reduce({op})"),
            2 => "all_gather".to_string(),
            3 => format!("reduce_scatter({op})"),
            4 => format!("broadcast(root {})", desc[1]),
            5 => "drop (MPI_Finalize)".to_string(),
            _ => "an unknown call".to_string(),
        };
        let dtype = dtype_of_code(desc[2]).map_or("-", DataType::name);
        format!("{call} with {} {dtype} elements", desc[3])
    }
}

impl MpiComm {
    /// The exit code the watchdog passes to `MPI_Abort` (`EX_SOFTWARE`).
    pub const ABORT_CODE: c_int = 70;

    /// Initialises MPI (`MPI_Init_thread`, asking for `MPI_THREAD_MULTIPLE`) and returns this
    /// process's rank of `MPI_COMM_WORLD`. Every process of the job must call it; it is itself a
    /// collective (it duplicates the world communicator) and fails with [`Error::Timeout`] past
    /// the deadline, after which the watchdog aborts the job as after any failure. MPI can be
    /// initialised once per process: a second call, or a call after the application
    /// initialised MPI itself, is [`Error::Backend`].
    pub fn init(options: MpiOptions) -> Result<Self, Error> {
        const OP: &str = "mpi_init";
        if ::mpi::environment::is_initialized() || ::mpi::environment::is_finalized() {
            let detail = "MPI was already initialised in this process; MpiComm::init must make its one MPI_Init";
            return Err(Error::Backend { op: OP, detail: detail.to_string() });
        }
        let Some((universe, threading)) = ::mpi::initialize_with_threading(Threading::Multiple) else {
            return Err(Error::Backend { op: OP, detail: "MPI_Init_thread did not initialise MPI".to_string() });
        };
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: MPI is initialised; the out-pointers are valid.
        unsafe {
            mpi_result(
                ffi::MPI_Comm_set_errhandler(ffi::RSMPI_COMM_WORLD, ffi::RSMPI_ERRORS_RETURN),
                OP,
                "MPI_Comm_set_errhandler",
            )?;
            mpi_result(ffi::MPI_Comm_rank(ffi::RSMPI_COMM_WORLD, &mut rank), OP, "MPI_Comm_rank")?;
            mpi_result(ffi::MPI_Comm_size(ffi::RSMPI_COMM_WORLD, &mut size), OP, "MPI_Comm_size")?;
        }
        let (rank, world) = (rank as usize, size as usize);
        let watch = Arc::new(Watch {
            rank,
            options,
            mpi_abort: threading == Threading::Multiple,
            state: Mutex::new(WatchState::default()),
            wake: Condvar::new(),
        });
        let watched = Arc::clone(&watch);
        let watchdog = std::thread::Builder::new()
            .name("squid-mpi-watchdog".to_string())
            .spawn(move || watched.run())
            .map_err(|e| Error::Backend { op: OP, detail: format!("cannot start the watchdog thread: {e}") })?;
        // SAFETY: reading rsmpi's exported null handle.
        let null = unsafe { ffi::RSMPI_COMM_NULL };
        let bufs = Buffers { desc: vec![[0; DESC_WORDS]; world], ..Buffers::default() };
        let mut comm = Self {
            rank,
            world,
            options,
            coll: null,
            p2p: null,
            watch,
            watchdog: Some(watchdog),
            bufs: RefCell::new(bufs),
            universe: Some(universe),
            _not_send: PhantomData,
        };
        comm.coll = comm.dup_world()?;
        comm.p2p = comm.dup_world()?;
        Ok(comm)
    }

    /// The deadline and abort policy.
    pub fn options(&self) -> MpiOptions {
        self.options
    }

    /// Why this communicator can no longer be used, or `None` while it can.
    pub fn failure(&self) -> Option<Error> {
        self.watch.failure()
    }

    /// The rsmpi universe this communicator initialised, for the application's own MPI calls
    /// (for example to share an NCCL unique id); its world communicator is `MPI_COMM_WORLD`.
    pub fn universe(&self) -> Option<&Universe> {
        self.universe.as_ref()
    }

    fn deadline(&self) -> Option<Instant> {
        Instant::now().checked_add(self.options.timeout)
    }

    fn busy(&self) -> Busy<'_> {
        self.watch.set_busy(true);
        Busy(&self.watch)
    }

    /// Fails the communicator (sticky) and returns the failure.
    fn fail(&self, error: Error) -> Error {
        self.watch.fail(error)
    }

    fn usable(&self) -> Result<(), Error> {
        self.watch.failure().map_or(Ok(()), Err)
    }

    /// An MPI return code; any error fails the communicator.
    fn mpi(&self, code: c_int, op: &'static str, what: &str) -> Result<(), Error> {
        mpi_result(code, op, what).map_err(|e| self.fail(e))
    }

    fn timeout(&self, missing: Vec<usize>) -> Error {
        self.fail(Error::Timeout { waiting: self.rank, missing, after: self.options.timeout })
    }

    /// Polls `requests` (completed ones become `MPI_REQUEST_NULL`) until all are complete; past
    /// `deadline`, fails with the error `on_timeout` makes from the requests still pending.
    fn wait(
        &self,
        op: &'static str,
        requests: &mut [ffi::MPI_Request],
        deadline: Option<Instant>,
        on_timeout: impl FnOnce(&[bool]) -> Vec<usize>,
    ) -> Result<(), Error> {
        // SAFETY: reading rsmpi's exported null handle.
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        let mut backoff = Backoff::new();
        loop {
            let mut progressed = false;
            let mut pending = false;
            for request in requests.iter_mut().filter(|r| **r != null) {
                let mut done: c_int = 0;
                // SAFETY: `request` is an active request this communicator started.
                let code = unsafe { ffi::MPI_Test(request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
                self.mpi(code, op, "MPI_Test")?;
                progressed |= done != 0;
                pending |= done == 0;
            }
            if !pending {
                return Ok(());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                let still: Vec<bool> = requests.iter().map(|r| *r != null).collect();
                return Err(self.timeout(on_timeout(&still)));
            }
            backoff.pause(progressed, now);
        }
    }

    /// `MPI_Comm_idup` of `MPI_COMM_WORLD`, polled to the deadline.
    fn dup_world(&self) -> Result<ffi::MPI_Comm, Error> {
        const OP: &str = "mpi_init";
        let _busy = self.busy();
        // MPI writes the new handle when the request completes: keep it on the heap, and leak it
        // if the request never completes.
        // SAFETY: reading rsmpi's exported null handles.
        let mut new = Box::new(unsafe { ffi::RSMPI_COMM_NULL });
        let mut request = [unsafe { ffi::RSMPI_REQUEST_NULL }];
        // SAFETY: MPI is initialised; `new` and `request` outlive the operation (below).
        let code = unsafe { ffi::MPI_Comm_idup(ffi::RSMPI_COMM_WORLD, &mut *new, &mut request[0]) };
        self.mpi(code, OP, "MPI_Comm_idup")?;
        let all_others = (0..self.world).filter(|&r| r != self.rank).collect::<Vec<_>>();
        match self.wait(OP, &mut request, self.deadline(), |_| all_others) {
            Ok(()) => Ok(*new),
            Err(e) => {
                std::mem::forget(new);
                Err(e)
            }
        }
    }

    /// Completes the buffered sends MPI is done with.
    fn reap_sends(&self, op: &'static str) -> Result<(), Error> {
        let mut bufs = self.bufs.borrow_mut();
        let mut first_error = Ok(());
        bufs.sends.retain_mut(|send| {
            if first_error.is_err() {
                return true;
            }
            let mut done: c_int = 0;
            // SAFETY: an active send request of this communicator.
            let code = unsafe { ffi::MPI_Test(&mut send.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            first_error = self.mpi(code, op, "MPI_Test");
            first_error.is_ok() && done == 0
        });
        first_error
    }

    /// Exchanges this rank's call descriptor with every peer (the barrier of every collective)
    /// and checks that the calls agree. `check` is this rank's own size check: its error is
    /// returned after the exchange, and its peers get [`Error::Mismatch`].
    fn start(&self, kind: Kind, dtype: Option<DataType>, count: usize, check: Result<(), Error>) -> Result<(), Error> {
        let op = kind.name();
        self.usable()?;
        self.reap_sends(op)?;
        let (code, param) = kind.encode();
        let stage = self.options.stage_bytes as i64;
        let mine: Desc = [code, param, dtype.map_or(-1, dtype_code), count as i64, i64::from(check.is_ok()), stage];
        let (world, rank) = (self.world, self.rank);
        let descs = {
            let mut bufs = self.bufs.borrow_mut();
            bufs.desc[rank] = mine;
            // SAFETY: reading rsmpi's exported handles.
            let (null, int64) = unsafe { (ffi::RSMPI_REQUEST_NULL, ffi::RSMPI_INT64_T) };
            let mut requests = vec![null; 2 * world];
            let base = bufs.desc.as_mut_ptr();
            for peer in (0..world).filter(|&p| p != rank) {
                // SAFETY: `desc` has `world` entries and is never resized; entry `peer` is only
                // written by this receive, entry `rank` only read by the sends. After a failure
                // the buffers are never freed (see `Drop`), so pending operations stay valid.
                unsafe {
                    let code = ffi::MPI_Irecv(
                        base.add(peer).cast::<c_void>(),
                        DESC_WORDS as c_int,
                        int64,
                        peer as c_int,
                        TAG_DESC,
                        self.coll,
                        &mut requests[peer],
                    );
                    self.mpi(code, op, "MPI_Irecv")?;
                    let code = ffi::MPI_Isend(
                        base.add(rank).cast::<c_void>(),
                        DESC_WORDS as c_int,
                        int64,
                        peer as c_int,
                        TAG_DESC,
                        self.coll,
                        &mut requests[world + peer],
                    );
                    self.mpi(code, op, "MPI_Isend")?;
                }
            }
            self.wait(op, &mut requests, self.deadline(), |pending| (0..world).filter(|&p| pending[p]).collect())?;
            bufs.desc.clone()
        };
        check?;
        for (r, d) in descs.iter().enumerate() {
            if d[4] == 0 {
                let detail = format!("rank {r}'s call {} was rejected (buffer size, root)", Kind::describe(d));
                return Err(Error::Mismatch { op, detail });
            }
            if d[..4] != mine[..4] {
                let detail =
                    format!("rank {r} called {}, rank {rank} called {}", Kind::describe(d), Kind::describe(&mine));
                return Err(Error::Mismatch { op, detail });
            }
            if d[5] != mine[5] {
                let detail = format!("rank {r} stages {} bytes per piece, rank {rank} {}", d[5], mine[5]);
                return Err(Error::Mismatch { op, detail });
            }
        }
        Ok(())
    }

    /// Runs one non-blocking MPI operation started by `post` (which gets the request slot) to
    /// completion within the deadline; a timeout names `missing` (empty for a collective whose
    /// ranks all arrived: the transfer itself stalled).
    fn run_op(
        &self,
        op: &'static str,
        what: &str,
        deadline: Option<Instant>,
        missing: Vec<usize>,
        post: impl FnOnce(&mut ffi::MPI_Request) -> c_int,
    ) -> Result<(), Error> {
        // SAFETY: reading rsmpi's exported null handle.
        let mut request = [unsafe { ffi::RSMPI_REQUEST_NULL }];
        self.mpi(post(&mut request[0]), op, what)?;
        self.wait(op, &mut request, deadline, |_| missing)
    }

    /// Elements of `T` per staged piece of `parts` equal parts (at least one).
    fn piece_len<T: Scalar>(&self, parts: usize) -> usize {
        (self.options.stage_bytes / (std::mem::size_of::<T>() * parts.max(1))).max(1)
    }

    /// The all-to-all at the heart of all-reduce and reduce-scatter: `bufs.stage` holds `world`
    /// parts of `count` elements, and part p of `bufs.result` becomes rank p's part `rank`.
    fn all_to_all<T: Scalar>(
        &self,
        op: &'static str,
        bufs: &mut Buffers,
        count: usize,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        let total = count * self.world;
        let mpi_count = mpi_count(count, op)?;
        let stage = typed::<T>(&mut bufs.stage, total).as_ptr();
        let result = typed::<T>(&mut bufs.result, total).as_mut_ptr();
        // SAFETY: both buffers hold `world * count` elements, owned by `bufs` (never freed while
        // an operation may be pending, see `Drop`); the type moves whole elements.
        self.run_op(op, "MPI_Ialltoall", deadline, Vec::new(), |request| unsafe {
            ffi::MPI_Ialltoall(
                stage.cast::<c_void>(),
                mpi_count,
                wire_type::<T>(),
                result.cast::<c_void>(),
                mpi_count,
                wire_type::<T>(),
                self.coll,
                request,
            )
        })
    }

    /// `MPI_Iallgather` of the first `count` elements of `bufs.stage` into `bufs.result`.
    fn gather_stage<T: Scalar>(
        &self,
        op: &'static str,
        bufs: &mut Buffers,
        count: usize,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        let mpi_count = mpi_count(count, op)?;
        let stage = typed::<T>(&mut bufs.stage, count).as_ptr();
        let result = typed::<T>(&mut bufs.result, count * self.world).as_mut_ptr();
        // SAFETY: as in `all_to_all`: `count` elements in, `world * count` out, owned by `bufs`.
        self.run_op(op, "MPI_Iallgather", deadline, Vec::new(), |request| unsafe {
            ffi::MPI_Iallgather(
                stage.cast::<c_void>(),
                mpi_count,
                wire_type::<T>(),
                result.cast::<c_void>(),
                mpi_count,
                wire_type::<T>(),
                self.coll,
                request,
            )
        })
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<(), Error> {
        if peer >= self.world || peer == self.rank {
            return Err(Error::InvalidRank { op, what: "peer", rank: peer, world: self.world, this: self.rank });
        }
        Ok(())
    }

    /// Waits (to the deadline) until MPI is done with every buffered send.
    fn flush_sends(&self) -> Result<(), Error> {
        const OP: &str = "drop";
        let _busy = self.busy();
        let mut bufs = self.bufs.borrow_mut();
        let mut requests: Vec<ffi::MPI_Request> = bufs.sends.iter().map(|s| s.request).collect();
        let peers: Vec<usize> = bufs.sends.iter().map(|s| s.peer).collect();
        // The ranks whose receives never took our sends.
        self.wait(OP, &mut requests, self.deadline(), |pending| {
            let mut missing: Vec<usize> = peers.iter().zip(pending).filter(|(_, &p)| p).map(|(&r, _)| r).collect();
            missing.sort_unstable();
            missing.dedup();
            missing
        })?;
        bufs.sends.clear();
        Ok(())
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        // Every rank must reach its drop: the exchange names one that does not (a timeout, then
        // the watchdog's abort) where MPI_Finalize would wait for it without a word.
        let clean =
            self.usable().is_ok() && self.flush_sends().is_ok() && self.start(Kind::Finalize, None, 0, Ok(())).is_ok();
        if !clean {
            // MPI may still read or write these buffers, and MPI_Finalize would wait for peers
            // that may never come: leak them and leave MPI running; the watchdog aborts the job
            // `abort_grace` after the failure unless the process exits first.
            std::mem::forget(std::mem::take(self.bufs.get_mut()));
            std::mem::forget(self.universe.take());
            drop(self.watchdog.take());
            return;
        }
        let watch = Arc::clone(&self.watch);
        let busy = Busy(&watch);
        watch.set_busy(true);
        for comm in [&mut self.coll, &mut self.p2p] {
            // SAFETY: reading rsmpi's exported null handle; freeing a communicator this value
            // duplicated, with no operation pending on it.
            unsafe {
                if *comm != ffi::RSMPI_COMM_NULL {
                    ffi::MPI_Comm_free(comm);
                }
            }
        }
        // MPI_Finalize, watched: the watchdog aborts if it hangs past the deadline.
        drop(self.universe.take());
        drop(busy);
        watch.lock().done = true;
        watch.wake.notify_all();
        if let Some(watchdog) = self.watchdog.take() {
            // The watchdog only returns or aborts the process; a join error cannot happen.
            let _ = watchdog.join();
        }
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce<T: Scalar>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<(), Error> {
        const OP: &str = "all_reduce";
        let _busy = self.busy();
        let deadline = self.deadline();
        let check = Collective::AllReduce.check_sizes(send.len(), recv.len(), self.world);
        self.start(Kind::AllReduce(op), Some(T::DTYPE), send.len(), check)?;
        let world = self.world;
        // Rank p reduces block p (the last one padded); piece by piece, offset `at` of every
        // block goes through the all-to-all, the reduction and the all-gather together.
        let block = send.len().div_ceil(world);
        let piece = self.piece_len::<T>(world);
        let mut bufs = self.bufs.borrow_mut();
        let bufs = &mut *bufs;
        let mut at = 0;
        while at < block {
            let count = piece.min(block - at);
            let stage = typed::<T>(&mut bufs.stage, count * world);
            for (p, part) in stage.chunks_exact_mut(count).enumerate() {
                take_padded(part, send, p * block + at);
            }
            self.all_to_all::<T>(OP, bufs, count, deadline)?;
            {
                // Rank order: part p of `result` came from rank p. The reduced part goes to the
                // front of `stage` (free again once the all-to-all is done).
                let result = typed::<T>(&mut bufs.result, count * world);
                let srcs: Vec<&[T]> = result.chunks_exact(count).collect();
                reduce_into(&srcs, &mut [typed::<T>(&mut bufs.stage, count)], op);
            }
            self.gather_stage::<T>(OP, bufs, count, deadline)?;
            let result = typed::<T>(&mut bufs.result, count * world);
            for (p, part) in result.chunks_exact(count).enumerate() {
                put_clipped(recv, p * block + at, part);
            }
            at += count;
        }
        Ok(())
    }

    fn all_gather<T: Scalar>(&self, send: &[T], recv: &mut [T]) -> Result<(), Error> {
        const OP: &str = "all_gather";
        let _busy = self.busy();
        let deadline = self.deadline();
        let check = Collective::AllGather.check_sizes(send.len(), recv.len(), self.world);
        self.start(Kind::AllGather, Some(T::DTYPE), send.len(), check)?;
        let (len, piece) = (send.len(), self.piece_len::<T>(self.world));
        let mut bufs = self.bufs.borrow_mut();
        let bufs = &mut *bufs;
        let mut at = 0;
        while at < len {
            let count = piece.min(len - at);
            typed::<T>(&mut bufs.stage, count).copy_from_slice(&send[at..at + count]);
            self.gather_stage::<T>(OP, bufs, count, deadline)?;
            let result = typed::<T>(&mut bufs.result, count * self.world);
            for (p, part) in result.chunks_exact(count).enumerate() {
                recv[p * len + at..p * len + at + count].copy_from_slice(part);
            }
            at += count;
        }
        Ok(())
    }

    fn reduce_scatter<T: Scalar>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<(), Error> {
        const OP: &str = "reduce_scatter";
        let _busy = self.busy();
        let deadline = self.deadline();
        let check = Collective::ReduceScatter.check_sizes(send.len(), recv.len(), self.world);
        self.start(Kind::ReduceScatter(op), Some(T::DTYPE), recv.len(), check)?;
        let (world, block) = (self.world, recv.len());
        let piece = self.piece_len::<T>(world);
        let mut bufs = self.bufs.borrow_mut();
        let bufs = &mut *bufs;
        let mut at = 0;
        while at < block {
            let count = piece.min(block - at);
            let stage = typed::<T>(&mut bufs.stage, count * world);
            for (p, part) in stage.chunks_exact_mut(count).enumerate() {
                part.copy_from_slice(&send[p * block + at..p * block + at + count]);
            }
            self.all_to_all::<T>(OP, bufs, count, deadline)?;
            let result = typed::<T>(&mut bufs.result, count * world);
            let srcs: Vec<&[T]> = result.chunks_exact(count).collect();
            reduce_into(&srcs, &mut [&mut recv[at..at + count]], op);
            at += count;
        }
        Ok(())
    }

    fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) -> Result<(), Error> {
        const OP: &str = "broadcast";
        let _busy = self.busy();
        let deadline = self.deadline();
        let check = if root >= self.world {
            Err(Error::InvalidRank { op: OP, what: "root", rank: root, world: self.world, this: self.rank })
        } else {
            Collective::Broadcast.check_sizes(buf.len(), buf.len(), self.world)
        };
        self.start(Kind::Broadcast { root }, Some(T::DTYPE), buf.len(), check)?;
        let (len, piece) = (buf.len(), self.piece_len::<T>(1));
        let mut bufs = self.bufs.borrow_mut();
        let mut at = 0;
        while at < len {
            let count = piece.min(len - at);
            let mpi_count = mpi_count(count, OP)?;
            let stage = typed::<T>(&mut bufs.stage, count);
            if self.rank == root {
                stage.copy_from_slice(&buf[at..at + count]);
            }
            let ptr = stage.as_mut_ptr();
            // SAFETY: `count` elements owned by `bufs` (never freed while pending, see `Drop`).
            self.run_op(OP, "MPI_Ibcast", deadline, Vec::new(), |request| unsafe {
                ffi::MPI_Ibcast(ptr.cast::<c_void>(), mpi_count, wire_type::<T>(), root as c_int, self.coll, request)
            })?;
            if self.rank != root {
                buf[at..at + count].copy_from_slice(typed::<T>(&mut bufs.stage, count));
            }
            at += count;
        }
        Ok(())
    }

    fn send<T: Scalar>(&self, buf: &[T], peer: usize) -> Result<(), Error> {
        const OP: &str = "send";
        self.check_peer(OP, peer)?;
        self.usable()?;
        let _busy = self.busy();
        self.reap_sends(OP)?;
        let count = mpi_count(buf.len(), OP)?;
        let mut data = Vec::new();
        typed::<T>(&mut data, buf.len()).copy_from_slice(buf);
        // SAFETY: reading rsmpi's exported null handle.
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `data` is moved into the pending list below without moving its heap buffer,
        // and is freed only once MPI reports the send complete (or never, after a failure).
        let code = unsafe {
            ffi::MPI_Isend(
                data.as_ptr().cast::<c_void>(),
                count,
                wire_type::<T>(),
                peer as c_int,
                TAG_DATA + dtype_code(T::DTYPE) as c_int,
                self.p2p,
                &mut request,
            )
        };
        self.mpi(code, OP, "MPI_Isend")?;
        self.bufs.borrow_mut().sends.push(PendingSend { request, peer, _data: data });
        Ok(())
    }

    fn recv<T: Scalar>(&self, buf: &mut [T], peer: usize) -> Result<(), Error> {
        const OP: &str = "recv";
        self.check_peer(OP, peer)?;
        self.usable()?;
        let _busy = self.busy();
        self.reap_sends(OP)?;
        let deadline = self.deadline();
        // Wait for the next message from `peer` without taking it, so a mismatched one stays.
        let mut status = MaybeUninit::<ffi::MPI_Status>::zeroed();
        let mut backoff = Backoff::new();
        loop {
            let mut found: c_int = 0;
            // SAFETY: `status` is a valid MPI_Status to write.
            let code = unsafe {
                ffi::MPI_Iprobe(peer as c_int, ffi::RSMPI_ANY_TAG, self.p2p, &mut found, status.as_mut_ptr())
            };
            self.mpi(code, OP, "MPI_Iprobe")?;
            if found != 0 {
                break;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(self.timeout(vec![peer]));
            }
            backoff.pause(false, now);
        }
        // SAFETY: MPI_Iprobe wrote the status of the message it found.
        let status = unsafe { status.assume_init() };
        let mut bytes: c_int = 0;
        // SAFETY: a status from MPI_Iprobe; counting in bytes.
        let code = unsafe { ffi::MPI_Get_count(&status, ffi::RSMPI_UINT8_T, &mut bytes) };
        self.mpi(code, OP, "MPI_Get_count")?;
        let sent_type = dtype_of_code(i64::from(status.MPI_TAG - TAG_DATA));
        let sent_len = sent_type.map(|d| bytes as usize / d.size_bytes());
        if sent_type != Some(T::DTYPE) || sent_len != Some(buf.len()) {
            let detail = format!(
                "rank {peer} sent {} {} elements, rank {} posted a receive of {} {} elements",
                sent_len.map_or("?".to_string(), |n| n.to_string()),
                sent_type.map_or("unknown", DataType::name),
                self.rank,
                buf.len(),
                T::DTYPE
            );
            return Err(Error::Mismatch { op: OP, detail });
        }
        let count = mpi_count(buf.len(), OP)?;
        let mut bufs = self.bufs.borrow_mut();
        let ptr = typed::<T>(&mut bufs.result, buf.len()).as_mut_ptr();
        // SAFETY: `buf.len()` elements owned by `bufs` (never freed while pending, see `Drop`);
        // the probed message has exactly that many.
        self.run_op(OP, "MPI_Irecv", deadline, vec![peer], |request| unsafe {
            ffi::MPI_Irecv(
                ptr.cast::<c_void>(),
                count,
                wire_type::<T>(),
                peer as c_int,
                status.MPI_TAG,
                self.p2p,
                request,
            )
        })?;
        buf.copy_from_slice(typed::<T>(&mut bufs.result, buf.len()));
        Ok(())
    }

    fn barrier(&self) -> Result<(), Error> {
        let _busy = self.busy();
        self.start(Kind::Barrier, None, 0, Ok(()))
    }
}
