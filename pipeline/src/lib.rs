#![doc = include_str!("../README.md")]

pub mod env;
pub mod kernels;

/// What the `squid` binary can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the CUDA layer.
    #[error(transparent)]
    Cuda(#[from] squid_cuda::Error),
    /// `squid kernels check` found kernels that failed or spilled.
    #[error("{failed} kernel check(s) failed")]
    KernelCheckFailed {
        /// How many (kernel, arch) pairs failed or spilled.
        failed: usize,
    },
}
