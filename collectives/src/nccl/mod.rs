//! The NCCL backend (cargo feature `cuda`): one [`NcclComm`] per GPU, collectives on device
//! buffers through cudarc's NCCL bindings (libnccl and libcuda are loaded at run time).
//!
//! # Buffers
//! The collectives take cudarc device memory: anything that is [`DevicePtr`] /
//! [`DevicePtrMut`] ([`CudaSlice`], `CudaView`, `CudaViewMut`), on the communicator's GPU.
//! squid-cuda's `DeviceBuffer` is not accepted: it may be a simulator buffer NCCL cannot
//! touch, and it does not expose its device pointer. Allocate on [`NcclComm::stream`] (any
//! stream of the same GPU works: cudarc makes the communicator's stream wait for the buffer's
//! last writer and records the collective as the buffer's new writer).
//!
//! [`NcclComm`] also implements [`Communicator`] on host slices, staging each buffer through
//! a device buffer (one copy each way), so code generic over `Communicator` (the `tp` layers)
//! runs over NCCL ranks. The device-buffer methods shadow the trait's on an `NcclComm` value:
//! call the host ones as `Communicator::all_reduce(&comm, ..)`.
//!
//! # Semantics (NCCL's, which differ from the CPU backends')
//! - **Reductions are NCCL's**: the order in which ranks are combined follows NCCL's ring or
//!   tree, not rank order, and **bf16/f16 sums accumulate in bf16/f16** (every partial sum is
//!   rounded to the storage type), unlike the CPU backends, which accumulate in f32 and round
//!   once. The error of a bf16 sum thus grows with the number of ranks; results are still
//!   identical on every rank. Integers wrap; `Avg` is `ncclAvg` (for integers the sum divided
//!   by the world size, truncated).
//! - **Sizes** are checked with [`Collective::check_sizes`] (and roots / peers with
//!   [`Error::InvalidRank`]) before any NCCL call, so a wrong size is a typed error on the rank
//!   that made it. NCCL does not exchange call descriptors: a rank whose *peers* called a
//!   different collective or length is not told so; the call hangs or fails and the deadline
//!   turns that into [`Error::Timeout`].
//! - **Every call waits** until its work on the GPU is done (the stream drained), polling
//!   `ncclCommGetAsyncError` and the stream until [`NcclOptions::timeout`]. So `send` returns
//!   once the peer has received; two ranks that exchange data must put the send and the
//!   receive in one [`NcclBatch`] (one `ncclGroupStart`/`ncclGroupEnd`), and one thread that
//!   drives several communicators must do the same (each communicator's part of a collective
//!   in one batch), or the first call waits for peers that were never launched.
//! - **Barrier** is an all-reduce of one `i32` (NCCL has no barrier).
//!
//! # Failures
//! Communicators are created non-blocking (`ncclConfig_t::blocking = 0`), so neither
//! initialisation nor a collective can hang the calling thread: a call whose NCCL async error
//! becomes an error returns [`Error::Backend`] (with NCCL's last-error text), one that passes
//! the deadline returns [`Error::Timeout`], and either way the communicator is aborted
//! (`ncclCommAbort`, which also stops its kernels) and every later call returns the same error.
//! In an [`NcclGroup`] a failed or panicked rank also fails its peers' pending and later calls
//! (with its error, or [`Error::PeerLost`] for a panic); a rank that was dropped fails its
//! peers' later calls with [`Error::PeerLost`], and a pending call that cannot finish without
//! it at its deadline. Across processes, a peer learns of a
//! failure through NCCL (a remote error) or its own deadline. A missing libnccl or GPU is
//! [`Error::Unavailable`], never a panic.

mod library;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::sys;

pub use library::{NcclVersion, MIN_VERSION};

use crate::communicator::Communicator;
use crate::dtype::{DataType, Scalar};
use crate::{Collective, Error, ReduceOp};

/// The deadline of an [`NcclComm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclOptions {
    /// How long initialisation or one call may take before it fails with [`Error::Timeout`]
    /// and the communicator is aborted; `Duration::MAX` means no deadline.
    pub timeout: Duration,
}

impl NcclOptions {
    /// PyTorch's NCCL watchdog defaults to 10 minutes too.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self { timeout: Self::DEFAULT_TIMEOUT }
    }
}

/// The NCCL version this process can use, after checking that libcuda, a GPU and a recent
/// enough libnccl are present ([`Error::Unavailable`] otherwise).
pub fn nccl_version() -> Result<NcclVersion, Error> {
    library::check()
}

/// The 128-byte id every rank of one NCCL communicator starts from: made once (by rank 0),
/// then handed to every rank out of band (a thread group shares it, [`NcclComm::from_mpi`]
/// broadcasts it over MPI; [`NcclId::to_bytes`] / [`NcclId::from_bytes`] for any other way).
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`).
    pub fn new() -> Result<Self, Error> {
        library::check()?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: the library is present (checked above); `id` is a valid out-pointer.
        let result = unsafe { sys::ncclGetUniqueId(&mut id) };
        nccl_ok(result, "init", "ncclGetUniqueId", None)?;
        Ok(Self(id))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal.map(|c| c as u8)
    }

    /// The id from the bytes rank 0 sent.
    pub fn from_bytes(bytes: [u8; 128]) -> Self {
        Self(sys::ncclUniqueId { internal: bytes.map(|b| b as std::ffi::c_char) })
    }
}

/// NCCL's text for a result code, plus the communicator's last error when there is one.
fn describe(result: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> String {
    // SAFETY: both functions return pointers to static or communicator-owned C strings (or
    // null), read at once; the library is present (every caller went through `check`).
    unsafe {
        let text = sys::ncclGetErrorString(result);
        let mut out = if text.is_null() {
            format!("{result:?}")
        } else {
            format!("{result:?} ({})", CStr::from_ptr(text).to_string_lossy())
        };
        if let Some(comm) = comm {
            let last = sys::ncclGetLastError(comm);
            if !last.is_null() {
                let last = CStr::from_ptr(last).to_string_lossy();
                if !last.is_empty() {
                    out.push_str(&format!("; last error: {last}"));
                }
            }
        }
        out
    }
}

fn nccl_ok(
    result: sys::ncclResult_t,
    op: &'static str,
    call: &str,
    comm: Option<sys::ncclComm_t>,
) -> Result<(), Error> {
    match result {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        other => Err(Error::Backend { op, detail: format!("{call} failed: {}", describe(other, comm)) }),
    }
}

fn driver_error(op: &'static str, call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Backend { op, detail: format!("{call} failed: {e:?}") }
}

fn nccl_type(dtype: DataType) -> sys::ncclDataType_t {
    match dtype {
        DataType::F32 => sys::ncclDataType_t::ncclFloat32,
        DataType::BF16 => sys::ncclDataType_t::ncclBfloat16,
        DataType::F16 => sys::ncclDataType_t::ncclFloat16,
        DataType::I32 => sys::ncclDataType_t::ncclInt32,
        DataType::I64 => sys::ncclDataType_t::ncclInt64,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Min => sys::ncclRedOp_t::ncclMin,
        ReduceOp::Prod => sys::ncclRedOp_t::ncclProd,
    }
}

/// A config that makes the communicator non-blocking and leaves everything else to NCCL
/// (`NCCL_CONFIG_INITIALIZER` with `blocking = 0`). The struct is cudarc's (NCCL 2.30's
/// layout); an older libnccl reads only its own `size` of it and honours `blocking` from
/// version 2.14 on, which `version` (the library's own) declares.
fn nonblocking_config(version: NcclVersion) -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version.code(),
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// What the ranks of one [`NcclGroup`] share: the first failure of any of them.
#[derive(Debug, Default)]
struct GroupState {
    failure: Mutex<Option<Error>>,
}

impl GroupState {
    fn get(&self) -> Option<Error> {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, error: &Error) {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(|| error.clone());
    }
}

/// One rank of an NCCL communicator, bound to one GPU and one stream of it.
///
/// `Send` (move it to the thread that drives it) but not `Sync`: NCCL communicators must not
/// be used by two threads at once. Dropping it finalises and destroys the communicator (or
/// aborts it, after a failure or past the deadline). See the [module docs](self).
pub struct NcclComm {
    /// Null once aborted or destroyed.
    comm: Cell<sys::ncclComm_t>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    options: NcclOptions,
    failure: RefCell<Option<Error>>,
    group: Option<Arc<GroupState>>,
    /// The barrier's one-element buffer.
    scratch: CudaSlice<i32>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as one thread uses it at a
// time, which `!Sync` (the Cell) guarantees; the CUDA context is bound to the calling thread
// before every call.
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("gpu", &self.stream.context().ordinal())
            .finish_non_exhaustive()
    }
}

/// A communicator being initialised: the handle NCCL returned and the stream it will use.
struct Pending {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
}

/// Opens GPU `device` and starts a non-blocking `ncclCommInitRankConfig` for `rank` on it
/// (inside a group when the caller started one).
fn start_init(device: usize, rank: usize, world: usize, id: &NcclId, version: NcclVersion) -> Result<Pending, Error> {
    const OP: &str = "init";
    let ctx = CudaContext::new(device).map_err(driver_error(OP, "cuCtxCreate"))?;
    ctx.bind_to_thread().map_err(driver_error(OP, "cuCtxSetCurrent"))?;
    let stream = ctx.new_stream().map_err(driver_error(OP, "cuStreamCreate"))?;
    let (nranks, rank_c) = match (i32::try_from(world), i32::try_from(rank)) {
        (Ok(n), Ok(r)) => (n, r),
        _ => return Err(Error::Backend { op: OP, detail: format!("world size {world} exceeds NCCL's int ranks") }),
    };
    let mut config = nonblocking_config(version);
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: the library is present, the context of `device` is current, and every pointer
    // is valid for the call (NCCL copies the config).
    let result = unsafe { sys::ncclCommInitRankConfig(&mut comm, nranks, id.0, rank_c, &mut config) };
    nccl_ok(result, OP, "ncclCommInitRankConfig", None)?;
    Ok(Pending { comm, stream, rank })
}

/// Polls `comm`'s async error until it leaves `ncclInProgress` (or `deadline` passes).
/// Returns the final result, or `None` on timeout.
fn poll_ready(comm: sys::ncclComm_t, deadline: Option<Instant>) -> Option<sys::ncclResult_t> {
    let mut backoff = Backoff::new();
    loop {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a live communicator handle; the out-pointer is valid.
        let result = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        if result != sys::ncclResult_t::ncclSuccess {
            return Some(result);
        }
        if state != sys::ncclResult_t::ncclInProgress {
            return Some(state);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        backoff.pause();
    }
}

/// Waits for every pending initialisation; on any failure aborts them all.
fn finish_init(
    pending: Vec<Pending>,
    world: usize,
    options: NcclOptions,
    group: Option<Arc<GroupState>>,
    started: Instant,
) -> Result<Vec<NcclComm>, Error> {
    const OP: &str = "init";
    let deadline = started.checked_add(options.timeout);
    let mut failure = None;
    for p in &pending {
        match poll_ready(p.comm, deadline) {
            Some(sys::ncclResult_t::ncclSuccess) => {}
            Some(other) => {
                failure.get_or_insert(Error::Backend {
                    op: OP,
                    detail: format!(
                        "rank {}: ncclCommInitRankConfig failed: {}",
                        p.rank,
                        describe(other, Some(p.comm))
                    ),
                });
            }
            None => {
                failure.get_or_insert(Error::Timeout { waiting: p.rank, missing: Vec::new(), after: options.timeout });
            }
        }
        if failure.is_some() {
            break;
        }
    }
    let alloc = |p: &Pending| {
        p.stream.context().bind_to_thread().map_err(driver_error(OP, "cuCtxSetCurrent"))?;
        p.stream.alloc_zeros::<i32>(1).map_err(driver_error(OP, "cuMemAlloc"))
    };
    let scratch: Vec<Result<CudaSlice<i32>, Error>> = pending.iter().map(alloc).collect();
    if failure.is_none() {
        failure = scratch.iter().find_map(|s| s.as_ref().err().cloned());
    }
    if let Some(error) = failure {
        for p in &pending {
            // SAFETY: a handle from ncclCommInitRankConfig, aborted once and never used again.
            unsafe { sys::ncclCommAbort(p.comm) };
        }
        return Err(error);
    }
    Ok(pending
        .into_iter()
        .zip(scratch)
        .map(|(p, scratch)| NcclComm {
            comm: Cell::new(p.comm),
            stream: p.stream,
            rank: p.rank,
            world,
            options,
            failure: RefCell::new(None),
            group: group.clone(),
            scratch: scratch.expect("checked above"),
        })
        .collect())
}

impl NcclComm {
    /// Rank `rank` of a `world`-rank communicator on GPU `device`, every rank starting from the
    /// same `id` (process per GPU: the caller hands the id out, or see [`NcclComm::from_mpi`]).
    /// Waits until every rank has joined, up to the deadline.
    pub fn init_rank(
        device: usize,
        rank: usize,
        world: usize,
        id: &NcclId,
        options: NcclOptions,
    ) -> Result<Self, Error> {
        let version = library::check()?;
        if world == 0 {
            return Err(Error::EmptyWorld);
        }
        if rank >= world {
            return Err(Error::InvalidRank { op: "init", what: "rank", rank, world, this: rank });
        }
        let started = Instant::now();
        let pending = start_init(device, rank, world, id, version)?;
        let mut comms = finish_init(vec![pending], world, options, None, started)?;
        Ok(comms.pop().expect("one communicator was initialised"))
    }

    /// This process's rank of an MPI job as an NCCL rank on GPU `device`: rank 0 makes the id
    /// and broadcasts it over `mpi` (so every rank of `mpi` must call this). If rank 0 cannot
    /// make an id, every rank gets the error.
    #[cfg(feature = "mpi")]
    pub fn from_mpi(mpi: &crate::mpi::MpiComm, device: usize, options: NcclOptions) -> Result<Self, Error> {
        use crate::Communicator;
        // Word 0: 1 when rank 0 has an id, then the id's 128 bytes in 16 words.
        let mut words = [0i64; 17];
        let mut local = Ok(());
        if mpi.rank() == 0 {
            match NcclId::new() {
                Ok(id) => {
                    words[0] = 1;
                    for (w, chunk) in words[1..].iter_mut().zip(id.to_bytes().chunks_exact(8)) {
                        *w = i64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                    }
                }
                Err(e) => local = Err(e),
            }
        }
        mpi.broadcast(&mut words, 0)?;
        local?;
        if words[0] != 1 {
            return Err(Error::Backend { op: "init", detail: "rank 0 could not make an NCCL id".into() });
        }
        let mut bytes = [0u8; 128];
        for (chunk, w) in bytes.chunks_exact_mut(8).zip(&words[1..]) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Self::init_rank(device, mpi.rank(), mpi.world_size(), &NcclId::from_bytes(bytes), options)
    }

    /// This rank, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The stream the collectives run on (allocate buffers on it to avoid cross-stream waits).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The GPU's ordinal.
    pub fn device(&self) -> usize {
        self.stream.context().ordinal()
    }

    /// The deadline of every call.
    pub fn options(&self) -> NcclOptions {
        self.options
    }

    /// The error that made the communicator unusable (its own, or in an [`NcclGroup`] a peer's),
    /// if any.
    pub fn failure(&self) -> Option<Error> {
        self.failure.borrow().clone().or_else(|| self.group.as_ref().and_then(|g| g.get()))
    }

    /// Ok while the communicator can be used; otherwise aborts it (once) and returns why.
    fn usable(&self) -> Result<(), Error> {
        match self.failure() {
            None => Ok(()),
            Some(error) => Err(self.fail(error)),
        }
    }

    /// Records `error` (unless one is recorded), aborts the communicator, tells the group, and
    /// returns the sticky error.
    fn fail(&self, error: Error) -> Error {
        let error = self.failure.borrow_mut().get_or_insert(error).clone();
        if let Some(group) = &self.group {
            group.set(&error);
        }
        let comm = self.comm.replace(std::ptr::null_mut());
        if !comm.is_null() {
            // SAFETY: the live handle, aborted once (it is nulled above); aborting also stops
            // the communicator's kernels, so the stream drains.
            unsafe { sys::ncclCommAbort(comm) };
        }
        error
    }

    fn bind(&self, op: &'static str) -> Result<(), Error> {
        self.stream.context().bind_to_thread().map_err(|e| self.fail(driver_error(op, "cuCtxSetCurrent")(e)))
    }

    /// Waits until this communicator's queued work is done: NCCL's async error leaves
    /// `ncclInProgress` and the stream drains, polled to `deadline`.
    fn wait(&self, op: &'static str, deadline: Option<Instant>) -> Result<(), Error> {
        let comm = self.comm.get();
        let mut backoff = Backoff::new();
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live (the communicator is not failed); the out-pointer is valid.
            let result = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            let state = if result == sys::ncclResult_t::ncclSuccess { state } else { result };
            match state {
                sys::ncclResult_t::ncclSuccess => {
                    // SAFETY: the communicator's own live stream.
                    let query = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
                    match query {
                        cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
                        cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                        other => {
                            let detail = format!("rank {}: cuStreamQuery failed: {other:?}", self.rank);
                            return Err(self.fail(Error::Backend { op, detail }));
                        }
                    }
                }
                sys::ncclResult_t::ncclInProgress => {}
                other => {
                    let detail = format!("rank {}: NCCL async error: {}", self.rank, describe(other, Some(comm)));
                    return Err(self.fail(Error::Backend { op, detail }));
                }
            }
            // A peer's failure or panic fails this call at once. A peer that was merely dropped
            // may have taken part in this call before it left (its last call), so the call
            // goes on to its deadline and reports the lost peer only if it does not finish.
            let peer = self.group.as_ref().and_then(|g| g.get());
            match peer {
                Some(Error::PeerLost { panicked: false, .. }) | None => {}
                Some(error) => return Err(self.fail(error)),
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let timeout = Error::Timeout { waiting: self.rank, missing: Vec::new(), after: self.options.timeout };
                return Err(self.fail(peer.unwrap_or(timeout)));
            }
            backoff.pause();
        }
    }

    fn check_rank(&self, op: &'static str, what: &'static str, rank: usize, peer: bool) -> Result<(), Error> {
        if rank >= self.world || (peer && rank == self.rank) {
            return Err(Error::InvalidRank { op, what, rank, world: self.world, this: self.rank });
        }
        Ok(())
    }

    fn check_device<T, B: DeviceSlice<T> + ?Sized>(&self, op: &'static str, buf: &B) -> Result<(), Error> {
        let on = buf.stream().context().ordinal();
        if on != self.device() {
            let detail =
                format!("a buffer on GPU {on} was given to rank {}'s communicator on GPU {}", self.rank, self.device());
            return Err(Error::Backend { op, detail });
        }
        Ok(())
    }

    fn single<'a>(&'a self, add: impl FnOnce(&mut NcclBatch<'a>) -> Result<(), Error>) -> Result<(), Error> {
        let mut batch = NcclBatch::new();
        add(&mut batch)?;
        batch.run()
    }

    /// `recv = op(send of every rank)`, element-wise; `send.len() == recv.len()`.
    pub fn all_reduce<T: Scalar, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
        op: ReduceOp,
    ) -> Result<(), Error> {
        self.single(|b| b.all_reduce(self, send, recv, op))
    }

    /// [`NcclComm::all_reduce`] with the result written over the input (NCCL's in-place form,
    /// no copy).
    pub fn all_reduce_in_place<T: Scalar, B: DevicePtrMut<T>>(&self, buf: &mut B, op: ReduceOp) -> Result<(), Error> {
        self.single(|b| b.all_reduce_in_place(self, buf, op))
    }

    /// `recv = concat(send of rank 0, rank 1, ...)`; `recv.len() == world * send.len()`.
    pub fn all_gather<T: Scalar, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
    ) -> Result<(), Error> {
        self.single(|b| b.all_gather(self, send, recv))
    }

    /// Rank r receives block r of the reduction of `send`; `send.len() == world * recv.len()`.
    pub fn reduce_scatter<T: Scalar, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
        op: ReduceOp,
    ) -> Result<(), Error> {
        self.single(|b| b.reduce_scatter(self, send, recv, op))
    }

    /// Every rank's `buf` becomes rank `root`'s `buf`.
    pub fn broadcast<T: Scalar, B: DevicePtrMut<T>>(&self, buf: &mut B, root: usize) -> Result<(), Error> {
        self.single(|b| b.broadcast(self, buf, root))
    }

    /// Sends `buf` to `peer` and waits until it has been received (NCCL's send is not
    /// buffered: exchanges go in one [`NcclBatch`]).
    pub fn send<T: Scalar, S: DevicePtr<T>>(&self, buf: &S, peer: usize) -> Result<(), Error> {
        self.single(|b| b.send(self, buf, peer))
    }

    /// Receives `buf.len()` elements from `peer` (which must send exactly that many).
    pub fn recv<T: Scalar, R: DevicePtrMut<T>>(&self, buf: &mut R, peer: usize) -> Result<(), Error> {
        self.single(|b| b.recv(self, buf, peer))
    }

    /// Returns once every rank has called it (an all-reduce of one `i32`).
    pub fn barrier(&self) -> Result<(), Error> {
        const OP: &str = "barrier";
        self.usable()?;
        self.bind(OP)?;
        let deadline = Instant::now().checked_add(self.options.timeout);
        let (ptr, record) = self.scratch.device_ptr(&self.stream);
        // SAFETY: the library is present, the context is current, the communicator is live and
        // `ptr` is one i32 on this GPU, kept alive (and tracked) by `record` until after the wait.
        let result = unsafe {
            sys::ncclAllReduce(
                ptr as *const std::ffi::c_void,
                ptr as *mut std::ffi::c_void,
                1,
                sys::ncclDataType_t::ncclInt32,
                sys::ncclRedOp_t::ncclSum,
                self.comm.get(),
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        nccl_ok(result, OP, "ncclAllReduce", Some(self.comm.get())).map_err(|e| self.fail(e))?;
        drop(record);
        self.wait(OP, deadline)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let failed = self.failure().is_some();
        if let (Some(group), false) = (&self.group, failed) {
            group.set(&Error::PeerLost { rank: self.rank, panicked: std::thread::panicking() });
        }
        let comm = self.comm.replace(std::ptr::null_mut());
        if comm.is_null() {
            return;
        }
        if failed {
            // A peer failed: finalising could wait for it. Abort instead.
            // SAFETY: the live handle, aborted once (nulled above).
            unsafe { sys::ncclCommAbort(comm) };
            return;
        }
        let deadline = Instant::now().checked_add(self.options.timeout);
        // SAFETY: the live handle, finalised then destroyed (or aborted) once; the context is
        // bound first so NCCL frees on the right GPU.
        unsafe {
            let bound = self.stream.context().bind_to_thread().is_ok();
            let finalized = bound
                && nccl_ok(sys::ncclCommFinalize(comm), "drop", "ncclCommFinalize", None).is_ok()
                && poll_ready(comm, deadline) == Some(sys::ncclResult_t::ncclSuccess);
            if finalized {
                sys::ncclCommDestroy(comm);
            } else {
                sys::ncclCommAbort(comm);
            }
        }
    }
}

/// Several NCCL calls issued together between one `ncclGroupStart` and `ncclGroupEnd`: what
/// one thread driving several communicators needs (each rank's part of a collective in one
/// batch), and what a send/recv exchange between two ranks needs. Sizes and ranks are checked
/// as calls are added (typed errors, nothing is issued); [`NcclBatch::run`] issues them all
/// and waits for every communicator involved, to the earliest deadline.
#[derive(Default)]
pub struct NcclBatch<'a> {
    calls: Vec<Call<'a>>,
}

impl std::fmt::Debug for NcclBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclBatch").field("calls", &self.calls.len()).finish()
    }
}

struct Call<'a> {
    comm: &'a NcclComm,
    kind: Kind,
    send: u64,
    recv: u64,
    count: usize,
    dtype: sys::ncclDataType_t,
    /// cudarc's stream-ordering records, dropped after the group ends so they mark the call.
    _records: Vec<SyncOnDrop<'a>>,
}

#[derive(Clone, Copy)]
enum Kind {
    AllReduce(ReduceOp),
    AllGather,
    ReduceScatter(ReduceOp),
    Broadcast(usize),
    Send(usize),
    Recv(usize),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::AllReduce(_) => "all_reduce",
            Self::AllGather => "all_gather",
            Self::ReduceScatter(_) => "reduce_scatter",
            Self::Broadcast(_) => "broadcast",
            Self::Send(_) => "send",
            Self::Recv(_) => "recv",
        }
    }
}

impl<'a> NcclBatch<'a> {
    /// An empty batch.
    pub fn new() -> Self {
        Self { calls: Vec::new() }
    }

    /// The calls added so far.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether no call was added.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    #[allow(clippy::too_many_arguments)]
    fn push<T: Scalar>(
        &mut self,
        comm: &'a NcclComm,
        kind: Kind,
        send: u64,
        recv: u64,
        count: usize,
        records: Vec<SyncOnDrop<'a>>,
    ) {
        self.push_raw(comm, kind, send, recv, count, T::DTYPE, records);
    }

    #[allow(clippy::too_many_arguments)]
    fn push_raw(
        &mut self,
        comm: &'a NcclComm,
        kind: Kind,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DataType,
        records: Vec<SyncOnDrop<'a>>,
    ) {
        let dtype = nccl_type(dtype);
        self.calls.push(Call { comm, kind, send, recv, count, dtype, _records: records });
    }

    /// Adds `comm`'s part of an all-reduce (see [`NcclComm::all_reduce`]).
    pub fn all_reduce<T: Scalar, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &mut self,
        comm: &'a NcclComm,
        send: &'a S,
        recv: &'a mut R,
        op: ReduceOp,
    ) -> Result<(), Error> {
        const OP: &str = "all_reduce";
        Collective::AllReduce.check_sizes(send.len(), recv.len(), comm.world)?;
        comm.check_device(OP, send)?;
        comm.check_device(OP, &*recv)?;
        let count = send.len();
        let (s, rs) = send.device_ptr(&comm.stream);
        let (r, rr) = recv.device_ptr_mut(&comm.stream);
        self.push::<T>(comm, Kind::AllReduce(op), s, r, count, vec![rs, rr]);
        Ok(())
    }

    /// Adds `comm`'s part of an in-place all-reduce.
    pub fn all_reduce_in_place<T: Scalar, B: DevicePtrMut<T>>(
        &mut self,
        comm: &'a NcclComm,
        buf: &'a mut B,
        op: ReduceOp,
    ) -> Result<(), Error> {
        comm.check_device("all_reduce", &*buf)?;
        let count = buf.len();
        let (p, rec) = buf.device_ptr_mut(&comm.stream);
        self.push::<T>(comm, Kind::AllReduce(op), p, p, count, vec![rec]);
        Ok(())
    }

    /// Adds `comm`'s part of an all-gather (see [`NcclComm::all_gather`]).
    pub fn all_gather<T: Scalar, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &mut self,
        comm: &'a NcclComm,
        send: &'a S,
        recv: &'a mut R,
    ) -> Result<(), Error> {
        const OP: &str = "all_gather";
        Collective::AllGather.check_sizes(send.len(), recv.len(), comm.world)?;
        comm.check_device(OP, send)?;
        comm.check_device(OP, &*recv)?;
        let count = send.len();
        let (s, rs) = send.device_ptr(&comm.stream);
        let (r, rr) = recv.device_ptr_mut(&comm.stream);
        self.push::<T>(comm, Kind::AllGather, s, r, count, vec![rs, rr]);
        Ok(())
    }

    /// Adds `comm`'s part of a reduce-scatter (see [`NcclComm::reduce_scatter`]).
    pub fn reduce_scatter<T: Scalar, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &mut self,
        comm: &'a NcclComm,
        send: &'a S,
        recv: &'a mut R,
        op: ReduceOp,
    ) -> Result<(), Error> {
        const OP: &str = "reduce_scatter";
        Collective::ReduceScatter.check_sizes(send.len(), recv.len(), comm.world)?;
        comm.check_device(OP, send)?;
        comm.check_device(OP, &*recv)?;
        let count = recv.len();
        let (s, rs) = send.device_ptr(&comm.stream);
        let (r, rr) = recv.device_ptr_mut(&comm.stream);
        self.push::<T>(comm, Kind::ReduceScatter(op), s, r, count, vec![rs, rr]);
        Ok(())
    }

    /// Adds `comm`'s part of a broadcast from `root` (in place).
    pub fn broadcast<T: Scalar, B: DevicePtrMut<T>>(
        &mut self,
        comm: &'a NcclComm,
        buf: &'a mut B,
        root: usize,
    ) -> Result<(), Error> {
        const OP: &str = "broadcast";
        comm.check_rank(OP, "root", root, false)?;
        Collective::Broadcast.check_sizes(buf.len(), buf.len(), comm.world)?;
        comm.check_device(OP, &*buf)?;
        let count = buf.len();
        let (p, rec) = buf.device_ptr_mut(&comm.stream);
        self.push::<T>(comm, Kind::Broadcast(root), p, p, count, vec![rec]);
        Ok(())
    }

    /// Adds a send of `buf` from `comm`'s rank to `peer`.
    pub fn send<T: Scalar, S: DevicePtr<T>>(
        &mut self,
        comm: &'a NcclComm,
        buf: &'a S,
        peer: usize,
    ) -> Result<(), Error> {
        const OP: &str = "send";
        comm.check_rank(OP, "peer", peer, true)?;
        comm.check_device(OP, buf)?;
        let count = buf.len();
        let (p, rec) = buf.device_ptr(&comm.stream);
        self.push::<T>(comm, Kind::Send(peer), p, 0, count, vec![rec]);
        Ok(())
    }

    /// Adds a receive into `buf` on `comm`'s rank from `peer`.
    pub fn recv<T: Scalar, R: DevicePtrMut<T>>(
        &mut self,
        comm: &'a NcclComm,
        buf: &'a mut R,
        peer: usize,
    ) -> Result<(), Error> {
        const OP: &str = "recv";
        comm.check_rank(OP, "peer", peer, true)?;
        comm.check_device(OP, &*buf)?;
        let count = buf.len();
        let (p, rec) = buf.device_ptr_mut(&comm.stream);
        self.push::<T>(comm, Kind::Recv(peer), 0, p, count, vec![rec]);
        Ok(())
    }

    /// Issues every call in one NCCL group and waits until each communicator involved is done
    /// (or failed: then every one of them is aborted and returns the error).
    pub fn run(self) -> Result<(), Error> {
        let Some(first) = self.calls.first() else { return Ok(()) };
        let op = first.kind.name();
        // Each communicator once, in the order first used.
        let mut comms: Vec<&NcclComm> = Vec::new();
        for call in &self.calls {
            if !comms.iter().any(|c| std::ptr::eq(*c, call.comm)) {
                comms.push(call.comm);
            }
        }
        for comm in &comms {
            comm.usable()?;
        }
        let fail_all = |error: Error| {
            for comm in &comms {
                comm.fail(error.clone());
            }
            error
        };
        let deadline = comms.iter().filter_map(|c| Instant::now().checked_add(c.options.timeout)).min();
        // SAFETY: the library is present (every communicator was made after `check`).
        nccl_ok(unsafe { sys::ncclGroupStart() }, op, "ncclGroupStart", None).map_err(fail_all)?;
        let mut issued = Ok(());
        for call in &self.calls {
            issued = call.comm.bind(op).and_then(|()| call.issue());
            if issued.is_err() {
                break;
            }
        }
        // The group is ended even after a failed call, so NCCL's group state stays consistent.
        // SAFETY: matches the ncclGroupStart above.
        let ended = nccl_ok(unsafe { sys::ncclGroupEnd() }, op, "ncclGroupEnd", None);
        drop(self.calls);
        issued.and(ended).map_err(fail_all)?;
        let mut result = Ok(());
        for comm in &comms {
            if let Err(e) = comm.wait(op, deadline) {
                result = Err(fail_all(e));
                break;
            }
        }
        result
    }
}

impl Call<'_> {
    fn issue(&self) -> Result<(), Error> {
        let comm = self.comm.comm.get();
        let stream = self.comm.stream.cu_stream() as sys::cudaStream_t;
        let (send, recv) = (self.send as *const std::ffi::c_void, self.recv as *mut std::ffi::c_void);
        let (count, dtype) = (self.count, self.dtype);
        let name = self.kind.name();
        // SAFETY: the library is present, the communicator is live (checked by `usable`) and
        // its context current; the pointers are device memory of this GPU holding the counts
        // the size rules require (checked when the call was added), kept alive by the batch's
        // borrows until it has waited for the stream.
        let result = unsafe {
            match self.kind {
                Kind::AllReduce(op) => sys::ncclAllReduce(send, recv, count, dtype, nccl_op(op), comm, stream),
                Kind::AllGather => sys::ncclAllGather(send, recv, count, dtype, comm, stream),
                Kind::ReduceScatter(op) => sys::ncclReduceScatter(send, recv, count, dtype, nccl_op(op), comm, stream),
                Kind::Broadcast(root) => sys::ncclBroadcast(send, recv, count, dtype, root as i32, comm, stream),
                Kind::Send(peer) => sys::ncclSend(send, count, dtype, peer as i32, comm, stream),
                Kind::Recv(peer) => sys::ncclRecv(recv, count, dtype, peer as i32, comm, stream),
            }
        };
        nccl_ok(result, name, &format!("nccl {name}"), Some(comm))
    }
}

/// `s` as raw bytes.
fn as_bytes<T: Scalar>(s: &[T]) -> &[u8] {
    // SAFETY: T is one of f32, bf16, f16, i32, i64 (Scalar is sealed): plain data without
    // padding, so every byte is initialised.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// `s` as raw bytes, to write.
fn as_bytes_mut<T: Scalar>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every bit pattern is a valid T.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Host-slice calls (the [`Communicator`] impl): each buffer is staged through a device buffer
/// of the communicator's GPU, one copy each way.
impl NcclComm {
    /// A device copy of `bytes` (one byte when empty: CUDA does not allocate zero bytes).
    fn upload(&self, op: &'static str, bytes: &[u8]) -> Result<CudaSlice<u8>, Error> {
        self.usable()?;
        self.bind(op)?;
        if bytes.is_empty() {
            return self.stream.alloc_zeros::<u8>(1).map_err(driver_error(op, "cuMemAlloc"));
        }
        self.stream.clone_htod(bytes).map_err(driver_error(op, "cuMemcpyHtoD"))
    }

    fn download(&self, op: &'static str, device: &CudaSlice<u8>, host: &mut [u8]) -> Result<(), Error> {
        if host.is_empty() {
            return Ok(());
        }
        let bytes = self.stream.clone_dtoh(device).map_err(driver_error(op, "cuMemcpyDtoH"))?;
        host.copy_from_slice(&bytes[..host.len()]);
        Ok(())
    }

    /// One call on staged buffers (`recv` may be `send`, for in-place calls).
    fn staged(
        &self,
        kind: Kind,
        dtype: DataType,
        send: Option<&CudaSlice<u8>>,
        recv: Option<&mut CudaSlice<u8>>,
        count: usize,
    ) -> Result<(), Error> {
        let mut batch = NcclBatch::new();
        let mut records = Vec::new();
        let send = send.map(|s| {
            let (p, r) = s.device_ptr(&self.stream);
            records.push(r);
            p
        });
        let recv = recv.map(|s| {
            let (p, r) = s.device_ptr_mut(&self.stream);
            records.push(r);
            p
        });
        let (send, recv) = (send.or(recv).unwrap_or(0), recv.or(send).unwrap_or(0));
        batch.push_raw(self, kind, send, recv, count, dtype, records);
        batch.run()
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce<T: Scalar>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<(), Error> {
        const OP: &str = "all_reduce";
        Collective::AllReduce.check_sizes(send.len(), recv.len(), self.world)?;
        let mut buf = self.upload(OP, as_bytes(send))?;
        self.staged(Kind::AllReduce(op), T::DTYPE, None, Some(&mut buf), send.len())?;
        self.download(OP, &buf, as_bytes_mut(recv))
    }

    fn all_gather<T: Scalar>(&self, send: &[T], recv: &mut [T]) -> Result<(), Error> {
        const OP: &str = "all_gather";
        Collective::AllGather.check_sizes(send.len(), recv.len(), self.world)?;
        let staged_send = self.upload(OP, as_bytes(send))?;
        let mut staged_recv = self.upload(OP, as_bytes(recv))?;
        self.staged(Kind::AllGather, T::DTYPE, Some(&staged_send), Some(&mut staged_recv), send.len())?;
        self.download(OP, &staged_recv, as_bytes_mut(recv))
    }

    fn reduce_scatter<T: Scalar>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<(), Error> {
        const OP: &str = "reduce_scatter";
        Collective::ReduceScatter.check_sizes(send.len(), recv.len(), self.world)?;
        let staged_send = self.upload(OP, as_bytes(send))?;
        let mut staged_recv = self.upload(OP, as_bytes(recv))?;
        self.staged(Kind::ReduceScatter(op), T::DTYPE, Some(&staged_send), Some(&mut staged_recv), recv.len())?;
        self.download(OP, &staged_recv, as_bytes_mut(recv))
    }

    fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) -> Result<(), Error> {
        const OP: &str = "broadcast";
        self.check_rank(OP, "root", root, false)?;
        let mut staged = self.upload(OP, as_bytes(buf))?;
        self.staged(Kind::Broadcast(root), T::DTYPE, None, Some(&mut staged), buf.len())?;
        self.download(OP, &staged, as_bytes_mut(buf))
    }

    fn send<T: Scalar>(&self, buf: &[T], peer: usize) -> Result<(), Error> {
        const OP: &str = "send";
        self.check_rank(OP, "peer", peer, true)?;
        let staged = self.upload(OP, as_bytes(buf))?;
        self.staged(Kind::Send(peer), T::DTYPE, Some(&staged), None, buf.len())
    }

    fn recv<T: Scalar>(&self, buf: &mut [T], peer: usize) -> Result<(), Error> {
        const OP: &str = "recv";
        self.check_rank(OP, "peer", peer, true)?;
        let mut staged = self.upload(OP, as_bytes(buf))?;
        self.staged(Kind::Recv(peer), T::DTYPE, None, Some(&mut staged), buf.len())?;
        self.download(OP, &staged, as_bytes_mut(buf))
    }

    fn barrier(&self) -> Result<(), Error> {
        NcclComm::barrier(self)
    }
}

/// One process driving several GPUs: `devices.len()` ranks, rank r on GPU `devices[r]`, made
/// from one shared id (inside one NCCL group, as one thread must). Hand each communicator to
/// its own thread ([`NcclGroup::run`], [`NcclGroup::into_communicators`]), or drive them all
/// from one thread with [`NcclBatch`]. A failed, dropped or panicked rank fails its peers'
/// calls too.
#[derive(Debug)]
pub struct NcclGroup {
    comms: Vec<NcclComm>,
}

impl NcclGroup {
    /// One rank per GPU in `devices` (distinct ordinals: NCCL refuses two ranks on one GPU),
    /// default deadline.
    pub fn new(devices: &[usize]) -> Result<Self, Error> {
        Self::with_options(devices, NcclOptions::default())
    }

    /// [`NcclGroup::new`] with a chosen deadline.
    pub fn with_options(devices: &[usize], options: NcclOptions) -> Result<Self, Error> {
        const OP: &str = "init";
        let version = library::check()?;
        if devices.is_empty() {
            return Err(Error::EmptyWorld);
        }
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                return Err(Error::Backend { op: OP, detail: format!("GPU {d} is listed twice: one rank per GPU") });
            }
        }
        let id = NcclId::new()?;
        let world = devices.len();
        let started = Instant::now();
        // SAFETY: the library is present.
        nccl_ok(unsafe { sys::ncclGroupStart() }, OP, "ncclGroupStart", None)?;
        let mut pending = Vec::with_capacity(world);
        let mut started_all = Ok(());
        for (rank, &device) in devices.iter().enumerate() {
            match start_init(device, rank, world, &id, version) {
                Ok(p) => pending.push(p),
                Err(e) => {
                    started_all = Err(e);
                    break;
                }
            }
        }
        // SAFETY: matches the ncclGroupStart above.
        let ended = nccl_ok(unsafe { sys::ncclGroupEnd() }, OP, "ncclGroupEnd", None);
        if let Err(e) = started_all.and(ended) {
            for p in &pending {
                // SAFETY: handles from ncclCommInitRankConfig, aborted once, never used again.
                unsafe { sys::ncclCommAbort(p.comm) };
            }
            return Err(e);
        }
        let comms = finish_init(pending, world, options, Some(Arc::new(GroupState::default())), started)?;
        Ok(Self { comms })
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.comms.len()
    }

    /// The communicators, rank 0 first.
    pub fn communicators(&self) -> &[NcclComm] {
        &self.comms
    }

    /// The communicators, rank 0 first, to move to their threads.
    pub fn into_communicators(self) -> Vec<NcclComm> {
        self.comms
    }

    /// Runs `f` once per rank, each on its own scoped thread; returns each rank's result (or
    /// its panic), rank 0 first.
    pub fn run<R, F>(self, f: F) -> Vec<std::thread::Result<R>>
    where
        R: Send,
        F: Fn(NcclComm) -> R + Sync,
    {
        crate::communicator::run_per_rank(self.comms, "squid-nccl-rank", f)
    }
}

/// Poll pacing: spin briefly, then yield, then sleep 50 us between polls.
struct Backoff {
    polls: u32,
}

impl Backoff {
    fn new() -> Self {
        Self { polls: 0 }
    }

    fn pause(&mut self) {
        self.polls = self.polls.saturating_add(1);
        if self.polls < 1000 {
            std::hint::spin_loop();
        } else if self.polls < 11_000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
