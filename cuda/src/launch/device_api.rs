//! The `cuda`-feature half of [`crate::launch`]: [`Gpu`] over two backends (cudarc on a real
//! GPU, squid-ptxsim on the CPU), the memory kernels take and the typed kernels.
//!
//! Everything launches on a stream its owner hands over ([`Gpu::from_stream`]): a framework's
//! own `Arc<CudaStream>` (its context, its stream, its [`CudaSlice`]s, no copy and no second
//! context), or the simulator's stand-in [`SimStream`] with host-backed [`SimSlice`]s. A
//! [`Gpu`] made by [`Gpu::new`] or [`Gpu::simulator`] is the same thing over a stream squid
//! made itself, and a [`DeviceBuffer`] is an owned `CudaSlice` / `SimSlice`; both go through
//! the one path below.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, DeviceSlice,
    LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx as CudarcPtx;
use squid_ptxsim::{Arg as SimArg, LaunchConfig as SimLaunchConfig, Options as SimOptions, Simulator};

use super::LaunchDims;
use crate::nvrtc::{compile_cached, CompileOptions};
use crate::{Arch, Device, DeviceInfo, Error, KernelSource, PtxCache};

/// The architecture the simulated device compiles kernels for (the simulator runs the PTX
/// NVRTC emits for it; sm_80 PTX is the common subset of every GPU squid targets).
pub const SIM_ARCH: Arch = Arch::SM80;

fn driver_err(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Driver { call, message: format!("{e:?}") }
}

/// What a buffer's elements must be: copyable to the device as raw bytes (for the GPU, cudarc's
/// [`DeviceRepr`]; for the simulator, [`bytemuck::Pod`]) and valid as all-zero bits.
pub trait DeviceCopy: DeviceRepr + ValidAsZeroBits + bytemuck::Pod {}

impl<T: DeviceRepr + ValidAsZeroBits + bytemuck::Pod> DeviceCopy for T {}

/// Identifies the memory space a buffer, view or loaded kernel belongs to: the CUDA context
/// (`CUcontext` address), or the simulated device (its address). Launches check that every
/// argument shares the stream's.
type Domain = usize;

fn cuda_domain(ctx: &CudaContext) -> Domain {
    ctx.cu_ctx() as Domain
}

fn other_device(what: &str) -> Error {
    Error::Launch {
        kernel: what.to_string(),
        message: "memory or a kernel of another context or device was used".into(),
    }
}

// ---- streams -------------------------------------------------------------------------------

/// The stream a [`Gpu`] launches on, as its owner hands it over: a cudarc stream on a real GPU,
/// or the simulator's stand-in.
#[derive(Debug, Clone)]
pub enum CallerStream {
    /// A cudarc stream: its context is where squid's modules are loaded and launched.
    Cuda(Arc<CudaStream>),
    /// The simulated device's stream.
    Sim(SimStream),
}

impl From<Arc<CudaStream>> for CallerStream {
    fn from(stream: Arc<CudaStream>) -> Self {
        Self::Cuda(stream)
    }
}

impl From<&Arc<CudaStream>> for CallerStream {
    fn from(stream: &Arc<CudaStream>) -> Self {
        Self::Cuda(stream.clone())
    }
}

impl From<SimStream> for CallerStream {
    fn from(stream: SimStream) -> Self {
        Self::Sim(stream)
    }
}

impl From<&SimStream> for CallerStream {
    fn from(stream: &SimStream) -> Self {
        Self::Sim(stream.clone())
    }
}

/// The simulated device, as a framework would hold a GPU: the stand-in for a CUDA context with
/// its one stream (the simulator runs every launch to completion, in call order). Clones share
/// the device, its memory and its loaded modules. Memory comes as host-backed [`SimSlice`]s,
/// the stand-in for cudarc's [`CudaSlice`].
#[derive(Clone)]
pub struct SimStream {
    device: Arc<SimDevice>,
}

impl std::fmt::Debug for SimStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimStream").field("device", &Arc::as_ptr(&self.device)).finish()
    }
}

impl SimStream {
    /// A new simulated device with the simulator's default options.
    pub fn new() -> Self {
        Self::with_options(SimOptions::default())
    }

    /// A new simulated device with `options` (sanitizer switches, step budget...).
    pub fn with_options(options: SimOptions) -> Self {
        let mut sim = Simulator::empty();
        sim.options = options;
        let state = SimState {
            sim,
            loaded: HashMap::new(),
            thread_instructions: 0,
            seconds: 0.0,
            last_profile: None,
            profiles: Vec::new(),
        };
        Self { device: Arc::new(SimDevice { state: Mutex::new(state) }) }
    }

    /// Copies `host` into a new simulated allocation (cudarc: `CudaStream::clone_htod`).
    pub fn clone_htod<T: DeviceCopy>(&self, host: &[T]) -> SimSlice<T> {
        let buffer = self.device.lock().sim.alloc(host);
        SimSlice { buffer, len: host.len(), device: self.device.clone(), _elem: PhantomData }
    }

    /// A zeroed simulated allocation of `len` elements (cudarc: `CudaStream::alloc_zeros`).
    pub fn alloc_zeros<T: DeviceCopy>(&self, len: usize) -> SimSlice<T> {
        let buffer = self.device.lock().sim.alloc_zeroed::<T>(len);
        SimSlice { buffer, len, device: self.device.clone(), _elem: PhantomData }
    }

    /// Copies an allocation of this device back (cudarc: `CudaStream::clone_dtoh`).
    pub fn clone_dtoh<T: DeviceCopy>(&self, slice: &SimSlice<T>) -> Result<Vec<T>, Error> {
        if !Arc::ptr_eq(&self.device, &slice.device) {
            return Err(other_device("clone_dtoh"));
        }
        Ok(self.device.lock().sim.read::<T>(slice.buffer)?)
    }

    /// How many kernel modules the simulated device holds (each loaded once per device, for
    /// every `Gpu` on it).
    pub fn loaded_modules(&self) -> usize {
        self.device.lock().loaded.len()
    }

    fn domain(&self) -> Domain {
        Arc::as_ptr(&self.device) as Domain
    }
}

impl Default for SimStream {
    fn default() -> Self {
        Self::new()
    }
}

/// The simulated device: one [`Simulator`] holding every buffer and every loaded module. Its
/// mutex orders launches and copies the way one stream orders them on a GPU.
struct SimDevice {
    state: Mutex<SimState>,
}

struct SimState {
    sim: Simulator,
    /// The kernel sources whose module is loaded (see [`ModuleKey`]).
    loaded: HashMap<ModuleKey, ()>,
    /// Thread-instructions run by every launch so far.
    thread_instructions: u64,
    /// Wall seconds spent in launches so far.
    seconds: f64,
    /// The profile of the last launch, when the simulator's options ask for one.
    last_profile: Option<squid_ptxsim::Profile>,
    /// Every profiled launch since the last [`Gpu::take_profiles`]: entry name and profile.
    profiles: Vec<(&'static str, squid_ptxsim::Profile)>,
}

impl SimDevice {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A simulated allocation of `len` elements of `T`, freed on drop: the stand-in for cudarc's
/// [`CudaSlice`], made by [`SimStream::clone_htod`] / [`SimStream::alloc_zeros`].
pub struct SimSlice<T> {
    buffer: squid_ptxsim::Buffer,
    len: usize,
    device: Arc<SimDevice>,
    _elem: PhantomData<T>,
}

impl<T> SimSlice<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn domain(&self) -> Domain {
        Arc::as_ptr(&self.device) as Domain
    }
}

impl<T> std::fmt::Debug for SimSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSlice").field("len", &self.len).finish_non_exhaustive()
    }
}

impl<T> Drop for SimSlice<T> {
    fn drop(&mut self) {
        // The handle is this device's and freed only here, so this cannot fail.
        let _ = self.device.lock().sim.free(self.buffer);
    }
}

// ---- modules, per context ------------------------------------------------------------------

/// A kernel source as loaded: its registry name and a hash of its text (two test kernels may
/// share a name; a module is never reused for different source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ModuleKey {
    name: &'static str,
    source: [u8; 32],
}

impl ModuleKey {
    fn of(source: &KernelSource) -> Self {
        Self { name: source.name, source: *blake3::hash(source.source.as_bytes()).as_bytes() }
    }
}

type ContextModules = HashMap<(Domain, ModuleKey), Weak<CudaModule>>;

/// The modules loaded in each CUDA context, shared by every [`Gpu`] on that context (a
/// framework may wrap several of its streams). Entries are weak: a module lives as long as some
/// `Gpu` or kernel uses it, so squid never keeps a caller's context alive by itself. The PTX
/// behind them is shared across contexts too, through [`PtxCache::global`].
fn context_modules() -> MutexGuard<'static, ContextModules> {
    static MODULES: OnceLock<Mutex<ContextModules>> = OnceLock::new();
    MODULES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

/// `source`'s module in `ctx`: already loaded there, or compiled (through the PTX cache) and
/// loaded now.
fn load_in_context(
    ctx: &Arc<CudaContext>,
    source: &'static KernelSource,
    arch: Arch,
) -> Result<Arc<CudaModule>, Error> {
    let key = (cuda_domain(ctx), ModuleKey::of(source));
    if let Some(module) = context_modules().get(&key).and_then(Weak::upgrade) {
        return Ok(module);
    }
    let ptx = compiled(source, arch)?;
    let module = ctx.load_module(CudarcPtx::from_src(ptx.text.to_string())).map_err(driver_err("cuModuleLoadData"))?;
    let mut modules = context_modules();
    modules.retain(|_, m| m.strong_count() > 0);
    modules.insert(key, Arc::downgrade(&module));
    Ok(module)
}

fn compiled(source: &'static KernelSource, arch: Arch) -> Result<crate::Ptx, Error> {
    let ptx = compile_cached(source, &CompileOptions::for_kernel(source, arch), PtxCache::global())?;
    source.check_ptx_entries(&ptx.text)?;
    Ok(ptx)
}

// ---- the device ----------------------------------------------------------------------------

/// One device kernels run on: a stream of a real GPU (squid's own or a caller's), or the
/// simulator.
pub struct Gpu {
    domain: Domain,
    info: DeviceInfo,
    backend: Backend,
}

enum Backend {
    /// The stream, and the modules this `Gpu` holds (shared per context, see
    /// [`context_modules`]).
    Cuda {
        stream: Arc<CudaStream>,
        modules: Mutex<HashMap<ModuleKey, Arc<CudaModule>>>,
    },
    Sim(Arc<SimDevice>),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).field("simulated", &self.is_simulated()).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, after [`Device::discover`] has confirmed it exists (so a machine
    /// without CUDA gets `NoDriver`/`NoDevice`, never a panic): its primary context and that
    /// context's default stream.
    pub fn new(ordinal: usize) -> Result<Self, Error> {
        Device::discover()?.into_iter().find(|d| d.ordinal == ordinal).ok_or(Error::NoDevice)?;
        let ctx: Arc<CudaContext> = CudaContext::new(ordinal).map_err(driver_err("cuCtxCreate"))?;
        Self::from_stream(ctx.default_stream())
    }

    /// The first GPU.
    pub fn first() -> Result<Self, Error> {
        Self::new(0)
    }

    /// Launches on a stream its owner hands over, and nothing else: no context or stream is
    /// created. For a cudarc stream, squid's modules are loaded into the stream's context
    /// (once per context, see [`Gpu::typed_kernel`]), kernels are queued on that stream over
    /// the caller's own memory ([`DeviceView`], [`DeviceViewMut`]: `CudaSlice`, `CudaView`,
    /// `CudaViewMut`, raw pointers) without copies, and [`Gpu::upload`] / [`Gpu::zeros`]
    /// allocate on it. For a [`SimStream`], the same on the simulated device.
    ///
    /// Ordering is the stream's: squid never synchronises it except in [`Gpu::download`] and
    /// [`Gpu::synchronize`]. See the crate README for the whole contract.
    pub fn from_stream(stream: impl Into<CallerStream>) -> Result<Self, Error> {
        match stream.into() {
            CallerStream::Cuda(stream) => {
                let ctx = stream.context();
                let (major, minor) = ctx.compute_capability().map_err(driver_err("cuDeviceGetAttribute"))?;
                let sms = ctx
                    .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                    .map_err(driver_err("cuDeviceGetAttribute"))?;
                let info = DeviceInfo {
                    ordinal: ctx.ordinal(),
                    name: ctx.name().map_err(driver_err("cuDeviceGetName"))?,
                    arch: Arch::from_capability(major as u32, minor as u32)?,
                    total_memory_bytes: ctx.total_mem().map_err(driver_err("cuDeviceTotalMem"))?,
                    multiprocessors: sms as u32,
                };
                let domain = cuda_domain(ctx);
                Ok(Self { domain, info, backend: Backend::Cuda { stream, modules: Mutex::new(HashMap::new()) } })
            }
            CallerStream::Sim(stream) => {
                crate::nvrtc::nvrtc_version()?;
                let info = DeviceInfo {
                    ordinal: 0,
                    name: format!("squid-ptxsim (simulated {SIM_ARCH})"),
                    arch: SIM_ARCH,
                    total_memory_bytes: 0,
                    multiprocessors: rayon::current_num_threads() as u32,
                };
                Ok(Self { domain: stream.domain(), info, backend: Backend::Sim(stream.device) })
            }
        }
    }

    /// The simulated device with the simulator's default options (see [`Gpu::simulator_with`]).
    pub fn simulator() -> Result<Self, Error> {
        Self::simulator_with(SimOptions::default())
    }

    /// The simulated device: kernels are compiled by NVRTC for [`SIM_ARCH`] and their PTX runs
    /// on squid-ptxsim with its sanitizer checks (out-of-bounds and misaligned accesses,
    /// shared-memory races and uninitialised reads, barrier misuse, a step budget), which come
    /// back as [`Error::Simulated`]. Needs NVRTC (`Err(NvrtcNotFound)` otherwise), no GPU.
    /// A launch is a correctness result only: nothing about speed is modelled.
    pub fn simulator_with(options: SimOptions) -> Result<Self, Error> {
        Self::from_stream(SimStream::with_options(options))
    }

    /// What the driver says about it; for the simulator, a description with [`SIM_ARCH`], no
    /// memory limit (`total_memory_bytes` 0) and one "multiprocessor" per rayon thread.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Whether this is the simulator rather than a GPU.
    pub fn is_simulated(&self) -> bool {
        matches!(self.backend, Backend::Sim(_))
    }

    /// The cudarc stream launches go to (`None` on the simulator).
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.backend {
            Backend::Cuda { stream, .. } => Some(stream),
            Backend::Sim(_) => None,
        }
    }

    /// The simulated device's stream, to allocate [`SimSlice`]s on (`None` on a GPU).
    pub fn sim_stream(&self) -> Option<SimStream> {
        match &self.backend {
            Backend::Cuda { .. } => None,
            Backend::Sim(device) => Some(SimStream { device: device.clone() }),
        }
    }

    /// For the simulator: the thread-instructions its launches have run so far and the wall
    /// seconds they took (the simulator's speed, not a GPU's). `None` on a GPU.
    pub fn simulated_work(&self) -> Option<(u64, f64)> {
        match &self.backend {
            Backend::Cuda { .. } => None,
            Backend::Sim(dev) => {
                let state = dev.lock();
                Some((state.thread_instructions, state.seconds))
            }
        }
    }

    /// For the simulator made with [`squid_ptxsim::Options::profile`] on
    /// ([`Gpu::simulator_with`]): the [`squid_ptxsim::Profile`] of the last kernel launch
    /// (warp instructions, memory requests, bank conflicts; counts of the simulated run, from
    /// which a roofline *model* follows). `None` on a GPU or without the option.
    pub fn last_profile(&self) -> Option<squid_ptxsim::Profile> {
        match &self.backend {
            Backend::Cuda { .. } => None,
            Backend::Sim(dev) => dev.lock().last_profile.clone(),
        }
    }

    /// For the simulator made with [`squid_ptxsim::Options::profile`] on: the entry name and
    /// profile of every launch since the last call, in launch order (an op that runs several
    /// kernels profiles each), and forgets them. Empty on a GPU or without the option.
    pub fn take_profiles(&self) -> Vec<(&'static str, squid_ptxsim::Profile)> {
        match &self.backend {
            Backend::Cuda { .. } => Vec::new(),
            Backend::Sim(dev) => std::mem::take(&mut dev.lock().profiles),
        }
    }

    /// Copies the memory a view reads back to the host (waits for the stream): a caller's
    /// slice, a sub-range of a buffer or a raw pointer alike.
    pub fn download_view<T: DeviceCopy>(&self, view: &DeviceView<'_, T>) -> Result<Vec<T>, Error> {
        self.check_owns(view.domain(), "download_view")?;
        match (&self.backend, &view.mem) {
            (Backend::Cuda { stream, .. }, ViewMem::Cuda(v)) => {
                stream.clone_dtoh(v).map_err(driver_err("cuMemcpyDtoH"))
            }
            (Backend::Cuda { stream, .. }, &ViewMem::Raw { ptr, len, .. }) => {
                stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
                let mut host = vec![T::zeroed(); len];
                // SAFETY: `from_raw`'s contract: `ptr` addresses `len` initialised `T`s of this
                // context's memory; the stream was synchronised above, so its writes are done.
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host, ptr) }
                    .map_err(driver_err("cuMemcpyDtoH"))?;
                Ok(host)
            }
            (Backend::Sim(dev), &ViewMem::Sim { buffer, offset, len, .. }) => {
                let bytes = dev.lock().sim.read::<u8>(buffer)?;
                let size = std::mem::size_of::<T>();
                let start = offset as usize;
                let piece = bytes.get(start..start + len * size).ok_or_else(|| other_device("download_view"))?;
                Ok(piece.chunks_exact(size).map(bytemuck::pod_read_unaligned).collect())
            }
            _ => Err(other_device("download_view")),
        }
    }

    /// Copies `host` to a new device buffer (allocated on this stream).
    pub fn upload<T: DeviceCopy>(&self, host: &[T]) -> Result<DeviceBuffer<T>, Error> {
        let inner = match &self.backend {
            Backend::Cuda { stream, .. } => {
                BufferInner::Cuda(stream.clone_htod(host).map_err(driver_err("cuMemcpyHtoD"))?)
            }
            Backend::Sim(device) => BufferInner::Sim(SimStream { device: device.clone() }.clone_htod(host)),
        };
        Ok(DeviceBuffer { domain: self.domain, inner })
    }

    /// A zeroed device buffer of `len` elements (allocated on this stream).
    pub fn zeros<T: DeviceCopy>(&self, len: usize) -> Result<DeviceBuffer<T>, Error> {
        let inner = match &self.backend {
            Backend::Cuda { stream, .. } => {
                BufferInner::Cuda(stream.alloc_zeros::<T>(len).map_err(driver_err("cuMemAlloc"))?)
            }
            Backend::Sim(device) => BufferInner::Sim(SimStream { device: device.clone() }.alloc_zeros(len)),
        };
        Ok(DeviceBuffer { domain: self.domain, inner })
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceCopy>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>, Error> {
        self.check_owns(buf.domain, "download")?;
        match (&self.backend, &buf.inner) {
            (Backend::Cuda { stream, .. }, BufferInner::Cuda(slice)) => {
                stream.clone_dtoh(slice).map_err(driver_err("cuMemcpyDtoH"))
            }
            (Backend::Sim(dev), BufferInner::Sim(b)) => Ok(dev.lock().sim.read::<T>(b.buffer)?),
            _ => Err(other_device("download")),
        }
    }

    /// Waits for all work queued on the stream, squid's and the caller's (the simulator runs
    /// each launch to completion at once).
    pub fn synchronize(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Cuda { stream, .. } => stream.synchronize().map_err(driver_err("cuStreamSynchronize")),
            Backend::Sim(_) => Ok(()),
        }
    }

    fn check_owns(&self, domain: Domain, what: &str) -> Result<(), Error> {
        if domain == self.domain {
            Ok(())
        } else {
            Err(other_device(what))
        }
    }

    /// Loads entry point `entry` of `source` with argument types `A`. The module is loaded once
    /// per CUDA context (every `Gpu` on the context shares it) from PTX compiled once per
    /// architecture and NVRTC version (the [`PtxCache`]); the kernel may be launched on any
    /// `Gpu` of the same context.
    ///
    /// # Safety
    /// `A` must match the entry point's C signature, argument by argument: the scalar types
    /// exactly, and a buffer or view of `T` (a [`DeviceBuffer<T>`], [`DeviceView<T>`],
    /// cudarc's `CudaSlice<T>`...) where the kernel takes `T*` (shared for `const T*`, mutable
    /// for `T*` it writes). The kernel must stay inside the memory it is given for every
    /// launch its safe wrapper allows. (On the simulator a mismatch is caught and reported,
    /// but the contract is the GPU's.)
    pub unsafe fn typed_kernel<A: KernelArgs>(
        &self,
        source: &'static KernelSource,
        entry: &'static str,
    ) -> Result<TypedKernel<A>, Error> {
        if !source.entries.contains(&entry) {
            return Err(Error::MissingEntry { kernel: source.name.into(), entry: entry.into() });
        }
        let key = ModuleKey::of(source);
        let handle = match &self.backend {
            Backend::Cuda { stream, modules } => {
                let mut modules = modules.lock().unwrap_or_else(|p| p.into_inner());
                let module = match modules.get(&key) {
                    Some(m) => m.clone(),
                    None => {
                        let module = load_in_context(stream.context(), source, self.info.arch)?;
                        modules.insert(key, module.clone());
                        module
                    }
                };
                KernelHandle::Cuda(module.load_function(entry).map_err(driver_err("cuModuleGetFunction"))?)
            }
            Backend::Sim(dev) => {
                let mut state = dev.lock();
                if !state.loaded.contains_key(&key) {
                    let ptx = compiled(source, SIM_ARCH)?;
                    state.sim.load(&ptx.text)?;
                    state.loaded.insert(key, ());
                }
                KernelHandle::Sim(dev.clone())
            }
        };
        Ok(TypedKernel { domain: self.domain, handle, entry, _args: PhantomData })
    }
}

// ---- memory --------------------------------------------------------------------------------

/// A device allocation of `len` elements of `T` that squid owns: a cudarc `CudaSlice` on a
/// GPU, a [`SimSlice`] on the simulator. Launches read it through [`DeviceView`] and write it
/// through [`DeviceViewMut`], the same path as a caller's memory.
pub struct DeviceBuffer<T> {
    domain: Domain,
    inner: BufferInner<T>,
}

/// The storage behind a buffer.
enum BufferInner<T> {
    Cuda(CudaSlice<T>),
    Sim(SimSlice<T>),
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("len", &self.len())
            .field("simulated", &matches!(self.inner, BufferInner::Sim(_)))
            .finish_non_exhaustive()
    }
}

impl<T> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.inner {
            BufferInner::Cuda(s) => s.len(),
            BufferInner::Sim(b) => b.len,
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole buffer, for a kernel to read.
    pub fn view(&self) -> DeviceView<'_, T> {
        DeviceView::from(self)
    }

    /// The whole buffer, for a kernel to write.
    pub fn view_mut(&mut self) -> DeviceViewMut<'_, T> {
        DeviceViewMut::from(self)
    }

    /// The cudarc allocation behind it, to hand to other cudarc code (`None` on the simulator).
    pub fn as_cuda_slice(&self) -> Option<&CudaSlice<T>> {
        match &self.inner {
            BufferInner::Cuda(s) => Some(s),
            BufferInner::Sim(_) => None,
        }
    }
}

/// Device memory a kernel reads, borrowed from whoever owns it for `'a`: a squid
/// [`DeviceBuffer`], a caller's `CudaSlice` / `CudaView` (cudarc's event tracking still
/// orders it against the caller's other streams), a raw device pointer
/// ([`DeviceView::from_raw`]), or a [`SimSlice`] on the simulator.
pub struct DeviceView<'a, T> {
    mem: ViewMem<'a, T>,
}

enum ViewMem<'a, T> {
    Cuda(CudaView<'a, T>),
    Raw { ptr: sys::CUdeviceptr, len: usize, domain: Domain, _elem: PhantomData<&'a [T]> },
    Sim { buffer: squid_ptxsim::Buffer, offset: u64, len: usize, domain: Domain, _elem: PhantomData<&'a [T]> },
}

/// Device memory a kernel writes, borrowed mutably for `'a`: a squid [`DeviceBuffer`], a
/// caller's `CudaSlice` / `CudaViewMut`, a raw device pointer ([`DeviceViewMut::from_raw`]),
/// or a [`SimSlice`] on the simulator.
pub struct DeviceViewMut<'a, T> {
    mem: ViewMemMut<'a, T>,
}

enum ViewMemMut<'a, T> {
    Cuda(CudaViewMut<'a, T>),
    Raw { ptr: sys::CUdeviceptr, len: usize, domain: Domain, _elem: PhantomData<&'a mut [T]> },
    Sim { buffer: squid_ptxsim::Buffer, offset: u64, len: usize, domain: Domain, _elem: PhantomData<&'a mut [T]> },
}

impl<T> std::fmt::Debug for DeviceView<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceView").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl<T> std::fmt::Debug for DeviceViewMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceViewMut").field("len", &self.len()).finish_non_exhaustive()
    }
}

/// `start..end` of a `len`-element range, or a typed error naming the bounds.
fn range_in(bounds: impl RangeBounds<usize>, len: usize) -> Result<(usize, usize), Error> {
    let start = match bounds.start_bound() {
        Bound::Included(&s) => Some(s),
        Bound::Excluded(&s) => s.checked_add(1),
        Bound::Unbounded => Some(0),
    };
    let end = match bounds.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => Some(len),
    };
    match (start, end) {
        (Some(s), Some(e)) if s <= e && e <= len => Ok((s, e)),
        _ => Err(Error::Launch {
            kernel: "slice".into(),
            message: format!(
                "range {:?}..{:?} is outside the {len} elements",
                bounds.start_bound(),
                bounds.end_bound()
            ),
        }),
    }
}

/// Checks what a raw pointer promises before it becomes a view.
fn check_raw<T>(gpu: &Gpu, ptr: sys::CUdeviceptr, len: usize) -> Result<Domain, Error> {
    let bad = |message: String| Err(Error::Launch { kernel: "from_raw".into(), message });
    let bytes = len.checked_mul(std::mem::size_of::<T>()).and_then(|b| u64::try_from(b).ok());
    if bytes.and_then(|b| ptr.checked_add(b)).is_none() {
        return bad(format!("{len} elements from {ptr:#x} overflow the address space"));
    }
    if len > 0 && ptr == 0 {
        return bad(format!("null pointer for {len} elements"));
    }
    if ptr % std::mem::align_of::<T>() as u64 != 0 {
        return bad(format!(
            "pointer {ptr:#x} is not aligned to {} bytes for {}",
            std::mem::align_of::<T>(),
            std::any::type_name::<T>()
        ));
    }
    if gpu.is_simulated() {
        return bad("a raw device pointer needs a GPU stream, not the simulator (use a SimSlice)".into());
    }
    Ok(gpu.domain)
}

impl<'a, T> DeviceView<'a, T> {
    /// Device memory that is not a cudarc allocation (another framework's tensor).
    ///
    /// Checked: `gpu` is a GPU, `ptr` is non-null (unless `len` is 0) and aligned for `T`, and
    /// the range does not wrap.
    ///
    /// # Safety
    /// `ptr` must address `len` initialised `T`s of device memory usable in the context of
    /// `gpu`'s stream, that stay allocated, and are not written by other work, for `'a` and
    /// until every launch reading them has finished on the stream (squid does not order raw
    /// memory against other streams: that is the caller's).
    pub unsafe fn from_raw(gpu: &Gpu, ptr: sys::CUdeviceptr, len: usize) -> Result<Self, Error> {
        let domain = check_raw::<T>(gpu, ptr, len)?;
        Ok(Self { mem: ViewMem::Raw { ptr, len, domain, _elem: PhantomData } })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.mem {
            ViewMem::Cuda(v) => v.len(),
            ViewMem::Raw { len, .. } | ViewMem::Sim { len, .. } => *len,
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` of it (an error, not a panic, when out of bounds).
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<DeviceView<'a, T>, Error> {
        let (start, end) = range_in(range, self.len())?;
        let size = std::mem::size_of::<T>() as u64;
        let mem = match &self.mem {
            ViewMem::Cuda(v) => ViewMem::Cuda(v.slice(start..end)),
            &ViewMem::Raw { ptr, domain, .. } => {
                ViewMem::Raw { ptr: ptr + start as u64 * size, len: end - start, domain, _elem: PhantomData }
            }
            &ViewMem::Sim { buffer, offset, domain, .. } => ViewMem::Sim {
                buffer,
                offset: offset + start as u64 * size,
                len: end - start,
                domain,
                _elem: PhantomData,
            },
        };
        Ok(DeviceView { mem })
    }

    /// Whether the first element's device address is a multiple of `bytes` (a kernel that
    /// loads 16-byte chunks needs 16; a sub-slice at an odd offset may not have it). For a
    /// cudarc view, asking orders the view's stream after its last write (cudarc's event
    /// tracking), which a launch over it does anyway.
    pub fn is_aligned(&self, bytes: u64) -> bool {
        let bytes = bytes.max(1);
        match &self.mem {
            ViewMem::Cuda(v) => {
                use cudarc::driver::DevicePtr;
                let (ptr, _record) = v.device_ptr(v.stream());
                ptr % bytes == 0
            }
            // Simulated allocations start 256-byte aligned.
            ViewMem::Raw { ptr: addr, .. } | ViewMem::Sim { offset: addr, .. } => addr % bytes == 0,
        }
    }

    fn domain(&self) -> Domain {
        match &self.mem {
            ViewMem::Cuda(v) => cuda_domain(v.stream().context()),
            ViewMem::Raw { domain, .. } | ViewMem::Sim { domain, .. } => *domain,
        }
    }
}

impl<T> Clone for DeviceView<'_, T> {
    fn clone(&self) -> Self {
        let mem = match &self.mem {
            ViewMem::Cuda(v) => ViewMem::Cuda(v.slice(..)),
            &ViewMem::Raw { ptr, len, domain, .. } => ViewMem::Raw { ptr, len, domain, _elem: PhantomData },
            &ViewMem::Sim { buffer, offset, len, domain, .. } => {
                ViewMem::Sim { buffer, offset, len, domain, _elem: PhantomData }
            }
        };
        Self { mem }
    }
}

impl<'a, T> DeviceViewMut<'a, T> {
    /// The same memory borrowed for a shorter time (to pass to a launch and keep the view).
    pub fn reborrow(&mut self) -> DeviceViewMut<'_, T> {
        let mem = match &mut self.mem {
            ViewMemMut::Cuda(v) => ViewMemMut::Cuda(v.slice_mut(..)),
            &mut ViewMemMut::Raw { ptr, len, domain, .. } => ViewMemMut::Raw { ptr, len, domain, _elem: PhantomData },
            &mut ViewMemMut::Sim { buffer, offset, len, domain, .. } => {
                ViewMemMut::Sim { buffer, offset, len, domain, _elem: PhantomData }
            }
        };
        DeviceViewMut { mem }
    }

    /// Device memory that is not a cudarc allocation, for a kernel to write. Checked as
    /// [`DeviceView::from_raw`].
    ///
    /// # Safety
    /// As [`DeviceView::from_raw`], and nothing else may read or write the memory for `'a`
    /// and until every launch writing it has finished on the stream.
    pub unsafe fn from_raw(gpu: &Gpu, ptr: sys::CUdeviceptr, len: usize) -> Result<Self, Error> {
        let domain = check_raw::<T>(gpu, ptr, len)?;
        Ok(Self { mem: ViewMemMut::Raw { ptr, len, domain, _elem: PhantomData } })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.mem {
            ViewMemMut::Cuda(v) => v.len(),
            ViewMemMut::Raw { len, .. } | ViewMemMut::Sim { len, .. } => *len,
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` of it, for a kernel to write (an error, not a panic, when out of
    /// bounds).
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> Result<DeviceViewMut<'_, T>, Error> {
        let (start, end) = range_in(range, self.len())?;
        let size = std::mem::size_of::<T>() as u64;
        let mem = match &mut self.mem {
            ViewMemMut::Cuda(v) => ViewMemMut::Cuda(v.slice_mut(start..end)),
            &mut ViewMemMut::Raw { ptr, domain, .. } => {
                ViewMemMut::Raw { ptr: ptr + start as u64 * size, len: end - start, domain, _elem: PhantomData }
            }
            &mut ViewMemMut::Sim { buffer, offset, domain, .. } => ViewMemMut::Sim {
                buffer,
                offset: offset + start as u64 * size,
                len: end - start,
                domain,
                _elem: PhantomData,
            },
        };
        Ok(DeviceViewMut { mem })
    }

    /// Whether the first element's device address is a multiple of `bytes` (see
    /// [`DeviceView::is_aligned`]).
    pub fn is_aligned(&self, bytes: u64) -> bool {
        let bytes = bytes.max(1);
        match &self.mem {
            ViewMemMut::Cuda(v) => {
                use cudarc::driver::DevicePtr;
                let (ptr, _record) = v.device_ptr(v.stream());
                ptr % bytes == 0
            }
            ViewMemMut::Raw { ptr: addr, .. } | ViewMemMut::Sim { offset: addr, .. } => addr % bytes == 0,
        }
    }

    fn domain(&self) -> Domain {
        match &self.mem {
            ViewMemMut::Cuda(v) => cuda_domain(v.stream().context()),
            ViewMemMut::Raw { domain, .. } | ViewMemMut::Sim { domain, .. } => *domain,
        }
    }
}

impl<'a, T> From<&'a CudaSlice<T>> for DeviceView<'a, T> {
    fn from(slice: &'a CudaSlice<T>) -> Self {
        Self { mem: ViewMem::Cuda(slice.as_view()) }
    }
}

impl<'a, T> From<CudaView<'a, T>> for DeviceView<'a, T> {
    fn from(view: CudaView<'a, T>) -> Self {
        Self { mem: ViewMem::Cuda(view) }
    }
}

impl<'a, T> From<&'a SimSlice<T>> for DeviceView<'a, T> {
    fn from(slice: &'a SimSlice<T>) -> Self {
        Self {
            mem: ViewMem::Sim {
                buffer: slice.buffer,
                offset: 0,
                len: slice.len,
                domain: slice.domain(),
                _elem: PhantomData,
            },
        }
    }
}

impl<'a, T> From<&'a DeviceBuffer<T>> for DeviceView<'a, T> {
    fn from(buffer: &'a DeviceBuffer<T>) -> Self {
        match &buffer.inner {
            BufferInner::Cuda(s) => s.into(),
            BufferInner::Sim(s) => s.into(),
        }
    }
}

impl<'a, T> From<&'a mut CudaSlice<T>> for DeviceViewMut<'a, T> {
    fn from(slice: &'a mut CudaSlice<T>) -> Self {
        Self { mem: ViewMemMut::Cuda(slice.as_view_mut()) }
    }
}

impl<'a, T> From<CudaViewMut<'a, T>> for DeviceViewMut<'a, T> {
    fn from(view: CudaViewMut<'a, T>) -> Self {
        Self { mem: ViewMemMut::Cuda(view) }
    }
}

impl<'a, T> From<&'a mut SimSlice<T>> for DeviceViewMut<'a, T> {
    fn from(slice: &'a mut SimSlice<T>) -> Self {
        Self {
            mem: ViewMemMut::Sim {
                buffer: slice.buffer,
                offset: 0,
                len: slice.len,
                domain: slice.domain(),
                _elem: PhantomData,
            },
        }
    }
}

impl<'a, T> From<&'a mut DeviceBuffer<T>> for DeviceViewMut<'a, T> {
    fn from(buffer: &'a mut DeviceBuffer<T>) -> Self {
        match &mut buffer.inner {
            BufferInner::Cuda(s) => s.into(),
            BufferInner::Sim(s) => s.into(),
        }
    }
}

// ---- kernel arguments ----------------------------------------------------------------------

/// One kernel argument: a scalar, or memory the kernel reads (`&DeviceBuffer`, [`DeviceView`],
/// `&CudaSlice`, `&SimSlice`) or writes (`&mut DeviceBuffer`, [`DeviceViewMut`],
/// `&mut CudaSlice`, `&mut SimSlice`). Memory of another context or device is refused.
pub trait KernelArg {
    /// Appends itself to a GPU launch on the context `device` identifies; simulator memory is
    /// an error.
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error>;

    /// The argument for a launch on the simulated device `device` identifies; GPU memory is an
    /// error.
    fn sim_arg(&self, device: usize) -> Result<SimArg, Error>;
}

macro_rules! scalar_arg {
    ($($t:ty => $variant:ident),*) => {$(
        impl KernelArg for $t {
            fn push_cuda<'a>(&'a mut self, _: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
                args.arg(&*self);
                Ok(())
            }

            fn sim_arg(&self, _: usize) -> Result<SimArg, Error> {
                Ok(SimArg::$variant(*self))
            }
        }
    )*};
}
scalar_arg!(i32 => I32, u32 => U32, i64 => I64, u64 => U64, f32 => F32, f64 => F64);

fn sim_ptr(buffer: squid_ptxsim::Buffer, offset: u64) -> SimArg {
    if offset == 0 {
        SimArg::Ptr(buffer)
    } else {
        SimArg::PtrOffset(buffer, offset)
    }
}

impl<T> KernelArg for DeviceView<'_, T> {
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
        if self.domain() != device {
            return Err(other_device("launch"));
        }
        match &self.mem {
            // cudarc makes the stream wait for the slice's last write and records this read.
            ViewMem::Cuda(view) => args.arg(view),
            ViewMem::Raw { ptr, .. } => args.arg(ptr),
            ViewMem::Sim { .. } => return Err(other_device("launch")),
        };
        Ok(())
    }

    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        match self.mem {
            ViewMem::Sim { buffer, offset, domain, .. } if domain == device => Ok(sim_ptr(buffer, offset)),
            _ => Err(other_device("launch")),
        }
    }
}

impl<T> KernelArg for DeviceViewMut<'_, T> {
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
        if self.domain() != device {
            return Err(other_device("launch"));
        }
        match &mut self.mem {
            // cudarc makes the stream wait for the slice's last read and write, and records
            // this write.
            ViewMemMut::Cuda(view) => args.arg(view),
            ViewMemMut::Raw { ptr, .. } => args.arg(&*ptr),
            ViewMemMut::Sim { .. } => return Err(other_device("launch")),
        };
        Ok(())
    }

    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        match self.mem {
            ViewMemMut::Sim { buffer, offset, domain, .. } if domain == device => Ok(sim_ptr(buffer, offset)),
            _ => Err(other_device("launch")),
        }
    }
}

impl<T> KernelArg for &CudaSlice<T> {
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
        if cuda_domain(self.context()) != device {
            return Err(other_device("launch"));
        }
        args.arg(*self);
        Ok(())
    }

    fn sim_arg(&self, _: usize) -> Result<SimArg, Error> {
        Err(other_device("launch"))
    }
}

impl<T> KernelArg for &mut CudaSlice<T> {
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
        if cuda_domain(self.context()) != device {
            return Err(other_device("launch"));
        }
        args.arg(&mut **self);
        Ok(())
    }

    fn sim_arg(&self, _: usize) -> Result<SimArg, Error> {
        Err(other_device("launch"))
    }
}

impl<T> KernelArg for &SimSlice<T> {
    fn push_cuda<'a>(&'a mut self, _: usize, _: &mut LaunchArgs<'a>) -> Result<(), Error> {
        Err(other_device("launch"))
    }

    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        if self.domain() != device {
            return Err(other_device("launch"));
        }
        Ok(SimArg::Ptr(self.buffer))
    }
}

impl<T> KernelArg for &mut SimSlice<T> {
    fn push_cuda<'a>(&'a mut self, _: usize, _: &mut LaunchArgs<'a>) -> Result<(), Error> {
        Err(other_device("launch"))
    }

    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        (&**self).sim_arg(device)
    }
}

impl<T> KernelArg for &DeviceBuffer<T> {
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
        match &self.inner {
            BufferInner::Cuda(slice) => {
                if cuda_domain(slice.context()) != device {
                    return Err(other_device("launch"));
                }
                args.arg(slice);
                Ok(())
            }
            BufferInner::Sim(_) => Err(other_device("launch")),
        }
    }

    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        match &self.inner {
            BufferInner::Sim(slice) => slice.sim_arg(device),
            BufferInner::Cuda(_) => Err(other_device("launch")),
        }
    }
}

impl<T> KernelArg for &mut DeviceBuffer<T> {
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
        match &mut self.inner {
            BufferInner::Cuda(slice) => {
                if cuda_domain(slice.context()) != device {
                    return Err(other_device("launch"));
                }
                args.arg(slice);
                Ok(())
            }
            BufferInner::Sim(_) => Err(other_device("launch")),
        }
    }

    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        match &self.inner {
            BufferInner::Sim(slice) => slice.sim_arg(device),
            BufferInner::Cuda(_) => Err(other_device("launch")),
        }
    }
}

/// A kernel's whole argument list, as a tuple.
pub trait KernelArgs {
    /// Appends every argument in order to a GPU launch.
    fn push_all<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error>;

    /// Every argument, in order, for a simulated launch.
    fn sim_args(&self, device: usize) -> Result<Vec<SimArg>, Error>;
}

macro_rules! tuple_args {
    ($($name:ident . $idx:tt),+) => {
        impl<$($name: KernelArg),+> KernelArgs for ($($name,)+) {
            fn push_all<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
                $( self.$idx.push_cuda(device, args)?; )+
                Ok(())
            }

            fn sim_args(&self, device: usize) -> Result<Vec<SimArg>, Error> {
                Ok(vec![$( self.$idx.sim_arg(device)? ),+])
            }
        }
    };
}
tuple_args!(A.0);
tuple_args!(A.0, B.1);
tuple_args!(A.0, B.1, C.2);
tuple_args!(A.0, B.1, C.2, D.3);
tuple_args!(A.0, B.1, C.2, D.3, E.4);
tuple_args!(A.0, B.1, C.2, D.3, E.4, F.5);
tuple_args!(A.0, B.1, C.2, D.3, E.4, F.5, G.6);
tuple_args!(A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7);
tuple_args!(A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7, I.8);
tuple_args!(A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7, I.8, J.9);
tuple_args!(A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7, I.8, J.9, K.10);
tuple_args!(A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7, I.8, J.9, K.10, L.11);

// ---- kernels -------------------------------------------------------------------------------

/// An entry point whose argument types were fixed by [`Gpu::typed_kernel`], bound to the
/// context (or simulated device) it was loaded in.
pub struct TypedKernel<A> {
    domain: Domain,
    handle: KernelHandle,
    entry: &'static str,
    _args: PhantomData<fn(A)>,
}

enum KernelHandle {
    Cuda(CudaFunction),
    /// The module is loaded in this simulated device; launches go by entry name.
    Sim(Arc<SimDevice>),
}

impl<A> std::fmt::Debug for TypedKernel<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedKernel").field("entry", &self.entry).finish_non_exhaustive()
    }
}

impl<A: KernelArgs> TypedKernel<A> {
    /// Launches on `gpu`'s stream after checking `dims` and that the kernel and every memory
    /// argument belong to its context: on a GPU, queued on the stream (asynchronous: the call
    /// returns before the kernel runs); on the simulator, run to completion, a sanitizer
    /// finding coming back as [`Error::Simulated`].
    pub fn launch(&self, gpu: &Gpu, dims: LaunchDims, mut args: A) -> Result<(), Error> {
        dims.validate(self.entry)?;
        gpu.check_owns(self.domain, self.entry)?;
        match (&gpu.backend, &self.handle) {
            (Backend::Cuda { stream, .. }, KernelHandle::Cuda(func)) => {
                let cfg =
                    LaunchConfig { grid_dim: dims.grid, block_dim: dims.block, shared_mem_bytes: dims.shared_bytes };
                let mut builder = stream.launch_builder(func);
                args.push_all(gpu.domain, &mut builder)?;
                // SAFETY: the argument types match the kernel's signature (the contract of
                // `typed_kernel`), every piece of memory is in this stream's context (checked
                // by `push_all`) and the dimensions were validated above.
                unsafe { builder.launch(cfg) }.map_err(driver_err("cuLaunchKernel"))?;
                Ok(())
            }
            (Backend::Sim(dev), KernelHandle::Sim(loaded_in)) if Arc::ptr_eq(dev, loaded_in) => {
                let sim_args = args.sim_args(gpu.domain)?;
                let cfg = SimLaunchConfig {
                    grid: [dims.grid.0, dims.grid.1, dims.grid.2],
                    block: [dims.block.0, dims.block.1, dims.block.2],
                    dynamic_shared_bytes: dims.shared_bytes,
                };
                let mut state = dev.lock();
                let report = state.sim.launch(self.entry, cfg, &sim_args);
                if state.sim.options.profile {
                    state.last_profile = state.sim.last_profile();
                    if let Some(p) = state.last_profile.clone() {
                        state.profiles.push((self.entry, p));
                    }
                }
                let report = report?;
                state.thread_instructions += report.thread_instructions;
                state.seconds += report.seconds;
                Ok(())
            }
            _ => Err(other_device(self.entry)),
        }
    }
}
