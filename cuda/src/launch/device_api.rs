//! The `cuda`-feature half of [`crate::launch`]: [`Gpu`] over two backends (cudarc on a real
//! GPU, squid-ptxsim on the CPU), the buffers and the typed kernels.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
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

/// Tells devices apart, so a buffer or kernel of one is never used on another.
static NEXT_DEVICE: AtomicUsize = AtomicUsize::new(1);

/// What a buffer's elements must be: copyable to the device as raw bytes (for the GPU, cudarc's
/// [`DeviceRepr`]; for the simulator, [`bytemuck::Pod`]) and valid as all-zero bits.
pub trait DeviceCopy: DeviceRepr + ValidAsZeroBits + bytemuck::Pod {}

impl<T: DeviceRepr + ValidAsZeroBits + bytemuck::Pod> DeviceCopy for T {}

/// One device kernels run on: a real GPU, or the simulator.
pub struct Gpu {
    id: usize,
    info: DeviceInfo,
    backend: Backend,
}

enum Backend {
    Cuda { stream: Arc<CudaStream>, modules: Mutex<HashMap<&'static str, Arc<CudaModule>>> },
    Sim(Arc<SimDevice>),
}

/// The simulated device: one [`Simulator`] holding every buffer and every loaded module. Its
/// mutex orders launches and copies the way one stream orders them on a GPU.
struct SimDevice {
    state: Mutex<SimState>,
}

struct SimState {
    sim: Simulator,
    /// Registry names of the kernel sources whose module is loaded.
    loaded: HashSet<&'static str>,
    /// Thread-instructions run by every launch so far.
    thread_instructions: u64,
    /// Wall seconds spent in launches so far.
    seconds: f64,
    /// The profile of the last launch, when the simulator's options ask for one.
    last_profile: Option<squid_ptxsim::Profile>,
}

impl SimDevice {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).field("simulated", &self.is_simulated()).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, after [`Device::discover`] has confirmed it exists (so a machine
    /// without CUDA gets `NoDriver`/`NoDevice`, never a panic).
    pub fn new(ordinal: usize) -> Result<Self, Error> {
        let info = Device::discover()?.into_iter().find(|d| d.ordinal == ordinal).ok_or(Error::NoDevice)?;
        let ctx: Arc<CudaContext> = CudaContext::new(ordinal).map_err(driver_err("cuCtxCreate"))?;
        Ok(Self {
            id: NEXT_DEVICE.fetch_add(1, Ordering::Relaxed),
            info,
            backend: Backend::Cuda { stream: ctx.default_stream(), modules: Mutex::new(HashMap::new()) },
        })
    }

    /// The first GPU.
    pub fn first() -> Result<Self, Error> {
        Self::new(0)
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
        crate::nvrtc::nvrtc_version()?;
        let mut sim = Simulator::empty();
        sim.options = options;
        let info = DeviceInfo {
            ordinal: 0,
            name: format!("squid-ptxsim (simulated {SIM_ARCH})"),
            arch: SIM_ARCH,
            total_memory_bytes: 0,
            multiprocessors: rayon::current_num_threads() as u32,
        };
        let state = SimState { sim, loaded: HashSet::new(), thread_instructions: 0, seconds: 0.0, last_profile: None };
        Ok(Self {
            id: NEXT_DEVICE.fetch_add(1, Ordering::Relaxed),
            info,
            backend: Backend::Sim(Arc::new(SimDevice { state: Mutex::new(state) })),
        })
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

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceCopy>(&self, host: &[T]) -> Result<DeviceBuffer<T>, Error> {
        let inner = match &self.backend {
            Backend::Cuda { stream, .. } => {
                BufferInner::Cuda(stream.clone_htod(host).map_err(driver_err("cuMemcpyHtoD"))?)
            }
            Backend::Sim(dev) => {
                let buffer = dev.lock().sim.alloc(host);
                BufferInner::Sim(SimBuffer { buffer, len: host.len(), device: dev.clone() })
            }
        };
        Ok(DeviceBuffer { device: self.id, inner })
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceCopy>(&self, len: usize) -> Result<DeviceBuffer<T>, Error> {
        let inner = match &self.backend {
            Backend::Cuda { stream, .. } => {
                BufferInner::Cuda(stream.alloc_zeros::<T>(len).map_err(driver_err("cuMemAlloc"))?)
            }
            Backend::Sim(dev) => {
                let buffer = dev.lock().sim.alloc_zeroed::<T>(len);
                BufferInner::Sim(SimBuffer { buffer, len, device: dev.clone() })
            }
        };
        Ok(DeviceBuffer { device: self.id, inner })
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceCopy>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>, Error> {
        self.check_owns(buf.device, "download")?;
        match (&self.backend, &buf.inner) {
            (Backend::Cuda { stream, .. }, BufferInner::Cuda(slice)) => {
                stream.clone_dtoh(slice).map_err(driver_err("cuMemcpyDtoH"))
            }
            (Backend::Sim(dev), BufferInner::Sim(b)) => Ok(dev.lock().sim.read::<T>(b.buffer)?),
            _ => Err(other_device("download")),
        }
    }

    /// Waits for all launched work (the simulator runs each launch to completion at once).
    pub fn synchronize(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Cuda { stream, .. } => stream.synchronize().map_err(driver_err("cuStreamSynchronize")),
            Backend::Sim(_) => Ok(()),
        }
    }

    fn check_owns(&self, device: usize, what: &str) -> Result<(), Error> {
        if device == self.id {
            Ok(())
        } else {
            Err(other_device(what))
        }
    }

    fn compiled(&self, source: &'static KernelSource) -> Result<crate::Ptx, Error> {
        let ptx = compile_cached(source, &CompileOptions::for_kernel(source, self.info.arch), PtxCache::global())?;
        source.check_ptx_entries(&ptx.text)?;
        Ok(ptx)
    }

    /// Loads entry point `entry` of `source` with argument types `A`.
    ///
    /// # Safety
    /// `A` must match the entry point's C signature, argument by argument: the scalar types
    /// exactly, and a [`DeviceBuffer<T>`] where the kernel takes `T*` (shared reference for
    /// `const T*`, mutable for `T*` it writes). The kernel must stay inside the buffers it is
    /// given for every launch its safe wrapper allows. (On the simulator a mismatch is caught
    /// and reported, but the contract is the GPU's.)
    pub unsafe fn typed_kernel<A: KernelArgs>(
        &self,
        source: &'static KernelSource,
        entry: &'static str,
    ) -> Result<TypedKernel<A>, Error> {
        if !source.entries.contains(&entry) {
            return Err(Error::MissingEntry { kernel: source.name.into(), entry: entry.into() });
        }
        let handle = match &self.backend {
            Backend::Cuda { stream, modules } => {
                let mut modules = modules.lock().unwrap_or_else(|p| p.into_inner());
                let module = match modules.get(source.name) {
                    Some(m) => m.clone(),
                    None => {
                        let ptx = self.compiled(source)?;
                        let module = stream
                            .context()
                            .load_module(CudarcPtx::from_src(ptx.text.to_string()))
                            .map_err(driver_err("cuModuleLoadData"))?;
                        modules.insert(source.name, module.clone());
                        module
                    }
                };
                KernelHandle::Cuda(module.load_function(entry).map_err(driver_err("cuModuleGetFunction"))?)
            }
            Backend::Sim(dev) => {
                let mut state = dev.lock();
                if !state.loaded.contains(source.name) {
                    let ptx = self.compiled(source)?;
                    state.sim.load(&ptx.text)?;
                    state.loaded.insert(source.name);
                }
                KernelHandle::Sim
            }
        };
        Ok(TypedKernel { device: self.id, handle, entry, _args: PhantomData })
    }
}

fn other_device(what: &str) -> Error {
    Error::Launch { kernel: what.to_string(), message: "a buffer or kernel of another device was used".into() }
}

/// A device allocation of `len` elements of `T`, on a GPU or on the simulator.
pub struct DeviceBuffer<T> {
    /// The id of the [`Gpu`] it lives on.
    device: usize,
    inner: BufferInner<T>,
}

/// The storage behind a buffer.
enum BufferInner<T> {
    Cuda(CudaSlice<T>),
    Sim(SimBuffer),
}

/// A simulator buffer; freed on drop.
struct SimBuffer {
    buffer: squid_ptxsim::Buffer,
    len: usize,
    device: Arc<SimDevice>,
}

impl Drop for SimBuffer {
    fn drop(&mut self) {
        // The handle is this device's and freed only here, so this cannot fail.
        let _ = self.device.lock().sim.free(self.buffer);
    }
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
}

/// One kernel argument: a scalar, or a buffer the kernel reads (`&DeviceBuffer`) or writes
/// (`&mut DeviceBuffer`).
pub trait KernelArg {
    /// Appends itself to a GPU launch; a simulator buffer is an error.
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error>;

    /// The argument for a simulated launch; a GPU buffer is an error.
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

impl<T> DeviceBuffer<T> {
    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        match &self.inner {
            BufferInner::Sim(b) if self.device == device => Ok(SimArg::Ptr(b.buffer)),
            _ => Err(other_device("launch")),
        }
    }
}

impl<T> KernelArg for &DeviceBuffer<T> {
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
        match &self.inner {
            BufferInner::Cuda(slice) if self.device == device => {
                args.arg(slice);
                Ok(())
            }
            _ => Err(other_device("launch")),
        }
    }

    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        DeviceBuffer::sim_arg(self, device)
    }
}

impl<T> KernelArg for &mut DeviceBuffer<T> {
    fn push_cuda<'a>(&'a mut self, device: usize, args: &mut LaunchArgs<'a>) -> Result<(), Error> {
        let same = self.device == device;
        match &mut self.inner {
            BufferInner::Cuda(slice) if same => {
                args.arg(slice);
                Ok(())
            }
            _ => Err(other_device("launch")),
        }
    }

    fn sim_arg(&self, device: usize) -> Result<SimArg, Error> {
        DeviceBuffer::sim_arg(self, device)
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

/// An entry point whose argument types were fixed by [`Gpu::typed_kernel`], bound to the
/// device it was loaded on.
pub struct TypedKernel<A> {
    device: usize,
    handle: KernelHandle,
    entry: &'static str,
    _args: PhantomData<fn(A)>,
}

enum KernelHandle {
    Cuda(CudaFunction),
    /// The module is loaded in the device's simulator; launches go by entry name.
    Sim,
}

impl<A> std::fmt::Debug for TypedKernel<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedKernel").field("entry", &self.entry).finish_non_exhaustive()
    }
}

impl<A: KernelArgs> TypedKernel<A> {
    /// Launches on `gpu` after checking `dims`: on a GPU, queued on its stream; on the
    /// simulator, run to completion, a sanitizer finding coming back as [`Error::Simulated`].
    pub fn launch(&self, gpu: &Gpu, dims: LaunchDims, mut args: A) -> Result<(), Error> {
        dims.validate(self.entry)?;
        gpu.check_owns(self.device, self.entry)?;
        match (&gpu.backend, &self.handle) {
            (Backend::Cuda { stream, .. }, KernelHandle::Cuda(func)) => {
                let cfg =
                    LaunchConfig { grid_dim: dims.grid, block_dim: dims.block, shared_mem_bytes: dims.shared_bytes };
                let mut builder = stream.launch_builder(func);
                args.push_all(gpu.id, &mut builder)?;
                // SAFETY: the argument types match the kernel's signature (the contract of
                // `typed_kernel`), every buffer is on this GPU (checked by `push_all`) and the
                // dimensions were validated above.
                unsafe { builder.launch(cfg) }.map_err(driver_err("cuLaunchKernel"))?;
                Ok(())
            }
            (Backend::Sim(dev), KernelHandle::Sim) => {
                let sim_args = args.sim_args(gpu.id)?;
                let cfg = SimLaunchConfig {
                    grid: [dims.grid.0, dims.grid.1, dims.grid.2],
                    block: [dims.block.0, dims.block.1, dims.block.2],
                    dynamic_shared_bytes: dims.shared_bytes,
                };
                let mut state = dev.lock();
                let report = state.sim.launch(self.entry, cfg, &sim_args);
                if state.sim.options.profile {
                    state.last_profile = state.sim.last_profile();
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
