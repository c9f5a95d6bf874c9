use std::path::PathBuf;

/// Everything squid-cuda can fail with. Each variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CUDA path was called in a build without the `cuda` feature.
    #[error("squid was built without the `cuda` feature: rebuild with `--features cuda`")]
    CudaFeatureDisabled,
    /// No CUDA driver library could be loaded.
    #[error("no CUDA driver: libcuda could not be loaded (tried {tried:?})")]
    NoDriver {
        /// The library names that were tried.
        tried: Vec<String>,
    },
    /// The driver loaded but reports no GPU.
    #[error("no CUDA device: the driver loaded but reports no GPU")]
    NoDevice,
    /// A CUDA driver call failed.
    #[error("CUDA driver call `{call}` failed: {message}")]
    Driver {
        /// The call.
        call: &'static str,
        /// The driver's message.
        message: String,
    },
    /// NVRTC could not be found anywhere it is looked for.
    #[error(
        "NVRTC not found (tried {tried:?}): run `source scripts/cuda-tools.sh` (fetches it once), \
         install the CUDA toolkit, set CUDA_HOME, or point SQUID_NVRTC_LIB at libnvrtc.so"
    )]
    NvrtcNotFound {
        /// The paths and names that were tried.
        tried: Vec<String>,
    },
    /// NVRTC rejected a kernel source; `log` is NVRTC's own log.
    #[error("NVRTC failed to compile `{kernel}` for {arch}:\n{log}")]
    Compile {
        /// The kernel's registry name.
        kernel: String,
        /// The target.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// An NVRTC API call failed outside compilation.
    #[error("NVRTC call `{call}` failed: {message}")]
    Nvrtc {
        /// The call.
        call: &'static str,
        /// The error.
        message: String,
    },
    /// An architecture name that is not `sm_XY`.
    #[error("invalid GPU architecture `{0}`: expected sm_XY with XY >= 50, such as sm_80 or sm_90")]
    InvalidArch(String),
    /// ptxas could not be found.
    #[error(
        "ptxas not found (tried {tried:?}): run `source scripts/cuda-tools.sh` (fetches it once), set \
         SQUID_PTXAS or CUDA_HOME, or put ptxas on PATH"
    )]
    PtxasNotFound {
        /// The paths that were tried.
        tried: Vec<String>,
    },
    /// ptxas rejected the PTX or its report could not be read.
    #[error("ptxas failed on `{kernel}` for {arch}:\n{log}")]
    Ptxas {
        /// The kernel's registry name.
        kernel: String,
        /// The target.
        arch: String,
        /// ptxas's output.
        log: String,
    },
    /// Two kernel sources registered under one name.
    #[error("kernel `{0}` is registered twice")]
    DuplicateKernel(String),
    /// A registry lookup for a name that is not there.
    #[error("kernel `{0}` is not in the registry")]
    UnknownKernel(String),
    /// A PTX module does not define an entry point its registry entry promises.
    #[error("kernel `{kernel}`: entry point `{entry}` is not in the compiled PTX")]
    MissingEntry {
        /// The kernel's registry name.
        kernel: String,
        /// The missing entry point.
        entry: String,
    },
    /// Buffers or launch dimensions that do not fit the kernel.
    #[error("bad launch of `{kernel}`: {message}")]
    Launch {
        /// The entry point.
        kernel: String,
        /// What is wrong.
        message: String,
    },
    /// The simulated device refused a launch or found a fault while running it (an
    /// out-of-bounds or misaligned access, a shared-memory race or uninitialised read, a
    /// barrier that cannot complete, the step budget...), reported with kernel, PTX line,
    /// block and thread.
    #[cfg(feature = "cuda")]
    #[error("simulated device: {0}")]
    Simulated(#[from] squid_ptxsim::Error),
    /// File-system trouble, with the path it happened on.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// True for the answers that mean "this machine has no CUDA", as opposed to a failure.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::CudaFeatureDisabled | Self::NoDriver { .. } | Self::NoDevice | Self::NvrtcNotFound { .. })
    }
}
