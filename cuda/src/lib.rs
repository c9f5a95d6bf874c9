#![doc = include_str!("../README.md")]
//!
//! # Layers
//! - [`arch`], [`registry`], [`cache`], [`ptxas`]: plain Rust, in every build.
//! - [`nvrtc`], [`device`], [`launch`]: the CUDA paths. Without the `cuda` feature they
//!   compile to typed [`Error::CudaFeatureDisabled`] answers; with it they load NVRTC and the
//!   driver at run time through cudarc, so no build needs a CUDA install. The same feature
//!   brings the simulated device (`launch::Gpu::simulator`, squid-ptxsim), so a kernel
//!   test runs on a GPU when present and on the CPU otherwise. All `unsafe` of the crate
//!   lives in [`nvrtc`] (its own small `sys`/`result` layers over the NVRTC library it found)
//!   and [`launch`] (right above cudarc's `sys`/`result` layers, whose `safe` types it takes
//!   from callers).

pub mod arch;
pub mod cache;
pub mod check;
pub mod device;
pub mod dtype;
mod error;
pub mod launch;
pub mod nvrtc;
pub mod ops;
pub mod ptxas;
pub mod registry;
pub mod testing;

pub use arch::Arch;
pub use cache::{CacheKey, PtxCache};
/// The cudarc squid-cuda is built against: a caller's streams and slices must be of this one
/// (Cargo unifies it with the caller's own cudarc 0.19).
#[cfg(feature = "cuda")]
pub use cudarc;
pub use device::{Device, DeviceInfo};
pub use dtype::{DType, Element};
pub use error::Error;
pub use nvrtc::{compile, compile_cached, CompileOptions, Ptx};
pub use ptxas::{ResourceUsage, PTXAS_ENV};
pub use registry::{KernelRegistry, KernelSource};
/// The PTX simulator behind [`launch::Gpu::simulator`] (its options, faults and errors).
#[cfg(feature = "cuda")]
pub use squid_ptxsim as ptxsim;

/// The kernels this crate ships (test subjects for the whole workspace).
pub static KERNELS: &[KernelSource] =
    &[ops::axpy::KERNEL, ops::softmax::KERNEL, ops::logsumexp::KERNEL, ops::gemm::KERNEL];

/// The environment variable that turns "NVRTC not found, skipped" into a failure in tests.
pub const REQUIRE_NVRTC_ENV: &str = "SQUID_REQUIRE_NVRTC";

/// Whether the environment demands NVRTC (`SQUID_REQUIRE_NVRTC=1`), as CI does.
pub fn nvrtc_required() -> bool {
    std::env::var(REQUIRE_NVRTC_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}
