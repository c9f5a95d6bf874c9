//! Running kernels on a GPU: a [`Gpu`] owns a context, a stream and the loaded modules;
//! [`DeviceBuffer`]s move data host <-> device; a [`TypedKernel`] fixes an entry point's
//! argument types once, so every launch after that is checked by the compiler.
//!
//! Everything here needs the `cuda` feature; without it the module holds only [`LaunchDims`].

use crate::Error;

/// Grid and block dimensions plus dynamic shared memory, checked before launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Bytes of dynamic shared memory per block.
    pub shared_bytes: u32,
}

impl LaunchDims {
    /// A 1-D launch of `block` threads per block covering `n` items once, with the grid capped at
    /// `max_blocks` (kernels written as grid-stride loops cover the rest).
    pub fn linear(n: usize, block: u32, max_blocks: u32) -> Self {
        let blocks = n.div_ceil(block.max(1) as usize).clamp(1, max_blocks.max(1) as usize) as u32;
        Self { grid: (blocks, 1, 1), block: (block, 1, 1), shared_bytes: 0 }
    }

    /// One block of `block` threads per row.
    pub fn per_row(rows: u32, block: u32) -> Self {
        Self { grid: (rows, 1, 1), block: (block, 1, 1), shared_bytes: 0 }
    }

    /// Checks the limits every CUDA GPU since sm_50 shares.
    pub fn validate(&self, kernel: &str) -> Result<(), Error> {
        let bad = |message: String| Err(Error::Launch { kernel: kernel.to_string(), message });
        let (gx, gy, gz) = self.grid;
        let (bx, by, bz) = self.block;
        if [gx, gy, gz, bx, by, bz].contains(&0) {
            return bad(format!("zero dimension in grid {:?} / block {:?}", self.grid, self.block));
        }
        if u64::from(bx) * u64::from(by) * u64::from(bz) > 1024 || bz > 64 {
            return bad(format!("block {:?} exceeds 1024 threads (or z > 64)", self.block));
        }
        if gy > 65_535 || gz > 65_535 || gx > i32::MAX as u32 {
            return bad(format!("grid {:?} exceeds (2^31-1, 65535, 65535)", self.grid));
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub use gpu::*;

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;
    use std::marker::PhantomData;
    use std::sync::{Arc, Mutex};

    use cudarc::driver::{
        CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig,
        PushKernelArg, ValidAsZeroBits,
    };
    use cudarc::nvrtc::Ptx as CudarcPtx;

    use super::LaunchDims;
    use crate::nvrtc::{compile_cached, CompileOptions};
    use crate::{Device, DeviceInfo, Error, KernelSource, PtxCache};

    fn driver_err(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |e| Error::Driver { call, message: format!("{e:?}") }
    }

    /// One GPU: its context, the stream all work goes to, and the modules loaded on it.
    pub struct Gpu {
        info: DeviceInfo,
        stream: Arc<CudaStream>,
        modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    }

    impl std::fmt::Debug for Gpu {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Gpu").field("info", &self.info).finish_non_exhaustive()
        }
    }

    impl Gpu {
        /// Opens GPU `ordinal`, after [`Device::discover`] has confirmed it exists (so a machine
        /// without CUDA gets `NoDriver`/`NoDevice`, never a panic).
        pub fn new(ordinal: usize) -> Result<Self, Error> {
            let info = Device::discover()?.into_iter().find(|d| d.ordinal == ordinal).ok_or(Error::NoDevice)?;
            let ctx: Arc<CudaContext> = CudaContext::new(ordinal).map_err(driver_err("cuCtxCreate"))?;
            Ok(Self { info, stream: ctx.default_stream(), modules: Mutex::new(HashMap::new()) })
        }

        /// The first GPU.
        pub fn first() -> Result<Self, Error> {
            Self::new(0)
        }

        /// What the driver says about it.
        pub fn info(&self) -> &DeviceInfo {
            &self.info
        }

        /// Copies `host` to a new device buffer.
        pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<DeviceBuffer<T>, Error> {
            let slice = self.stream.clone_htod(host).map_err(driver_err("cuMemcpyHtoD"))?;
            Ok(DeviceBuffer { slice })
        }

        /// A zeroed device buffer of `len` elements.
        pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DeviceBuffer<T>, Error> {
            let slice = self.stream.alloc_zeros(len).map_err(driver_err("cuMemAlloc"))?;
            Ok(DeviceBuffer { slice })
        }

        /// Copies a device buffer back (waits for the stream).
        pub fn download<T: DeviceRepr>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>, Error> {
            self.stream.clone_dtoh(&buf.slice).map_err(driver_err("cuMemcpyDtoH"))
        }

        /// Waits for all launched work.
        pub fn synchronize(&self) -> Result<(), Error> {
            self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))
        }

        fn module(&self, source: &'static KernelSource) -> Result<Arc<CudaModule>, Error> {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = modules.get(source.name) {
                return Ok(m.clone());
            }
            let ptx = compile_cached(source, &CompileOptions::for_kernel(source, self.info.arch), PtxCache::global())?;
            let module = self
                .stream
                .context()
                .load_module(CudarcPtx::from_src(ptx.text.to_string()))
                .map_err(driver_err("cuModuleLoadData"))?;
            modules.insert(source.name, module.clone());
            Ok(module)
        }

        /// Loads entry point `entry` of `source` with argument types `A`.
        ///
        /// # Safety
        /// `A` must match the entry point's C signature, argument by argument: the scalar types
        /// exactly, and a [`DeviceBuffer<T>`] where the kernel takes `T*` (shared reference for
        /// `const T*`, mutable for `T*` it writes). The kernel must stay inside the buffers it is
        /// given for every launch its safe wrapper allows.
        pub unsafe fn typed_kernel<A: KernelArgs>(
            &self,
            source: &'static KernelSource,
            entry: &'static str,
        ) -> Result<TypedKernel<A>, Error> {
            if !source.entries.contains(&entry) {
                return Err(Error::MissingEntry { kernel: source.name.into(), entry: entry.into() });
            }
            let module = self.module(source)?;
            let func = module.load_function(entry).map_err(driver_err("cuModuleGetFunction"))?;
            Ok(TypedKernel { func, entry, _args: PhantomData })
        }
    }

    /// A device allocation of `len` elements of `T`.
    #[derive(Debug)]
    pub struct DeviceBuffer<T> {
        slice: CudaSlice<T>,
    }

    impl<T> DeviceBuffer<T> {
        /// Number of elements.
        pub fn len(&self) -> usize {
            self.slice.len()
        }

        /// Whether it holds no element.
        pub fn is_empty(&self) -> bool {
            self.slice.len() == 0
        }
    }

    /// One kernel argument.
    pub trait KernelArg {
        /// Appends itself to the launch.
        fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>);
    }

    macro_rules! scalar_arg {
        ($($t:ty),*) => {$(
            impl KernelArg for $t {
                fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
                    args.arg(&*self);
                }
            }
        )*};
    }
    scalar_arg!(i32, u32, i64, u64, f32, f64);

    impl<T> KernelArg for &DeviceBuffer<T> {
        fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
            args.arg(&self.slice);
        }
    }

    impl<T> KernelArg for &mut DeviceBuffer<T> {
        fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
            args.arg(&mut self.slice);
        }
    }

    /// A kernel's whole argument list, as a tuple.
    pub trait KernelArgs {
        /// Appends every argument in order.
        fn push_all<'a>(&'a mut self, args: &mut LaunchArgs<'a>);
    }

    macro_rules! tuple_args {
        ($($name:ident . $idx:tt),+) => {
            impl<$($name: KernelArg),+> KernelArgs for ($($name,)+) {
                fn push_all<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
                    $( self.$idx.push(args); )+
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

    /// An entry point whose argument types were fixed by [`Gpu::typed_kernel`].
    pub struct TypedKernel<A> {
        func: CudaFunction,
        entry: &'static str,
        _args: PhantomData<fn(A)>,
    }

    impl<A: KernelArgs> TypedKernel<A> {
        /// Launches on `gpu`'s stream after checking `dims`.
        pub fn launch(&self, gpu: &Gpu, dims: LaunchDims, mut args: A) -> Result<(), Error> {
            dims.validate(self.entry)?;
            let cfg = LaunchConfig { grid_dim: dims.grid, block_dim: dims.block, shared_mem_bytes: dims.shared_bytes };
            let mut builder = gpu.stream.launch_builder(&self.func);
            args.push_all(&mut builder);
            // SAFETY: the argument types match the kernel's signature (the contract of
            // `typed_kernel`) and the dimensions were validated above.
            unsafe { builder.launch(cfg) }.map_err(driver_err("cuLaunchKernel"))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_cover_the_work_and_respect_limits() {
        let d = LaunchDims::linear(1000, 256, 1024);
        assert_eq!(d.grid.0, 4);
        assert_eq!(LaunchDims::linear(0, 256, 1024).grid.0, 1);
        assert_eq!(LaunchDims::linear(1 << 30, 256, 1024).grid.0, 1024);
        assert!(d.validate("k").is_ok());
        assert!(LaunchDims { block: (1025, 1, 1), ..d }.validate("k").is_err());
        assert!(LaunchDims { block: (32, 32, 2), ..d }.validate("k").is_err());
        assert!(LaunchDims { grid: (1, 70_000, 1), ..d }.validate("k").is_err());
        assert!(LaunchDims { grid: (0, 1, 1), ..d }.validate("k").is_err());
    }
}
