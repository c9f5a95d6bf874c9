#![doc = include_str!("../README.md")]

use thiserror::Error;

pub mod dense;
mod kernels;
mod layout;
pub mod nsa;
pub mod paged;
pub mod segments;

pub use layout::{validate_cu_seqlens, Heads, MAX_HEAD_DIM};

/// The CUDA sources of this crate, for the workspace registry (`squid kernels check`).
pub static KERNELS: &[squid_cuda::KernelSource] = &[
    dense::flash::KERNEL,
    dense::DECODE_KERNEL,
    nsa::SELECTED_KERNEL,
    nsa::COMPRESS_KERNEL,
    nsa::SELECT_KERNEL,
    nsa::COMPRESSED_KERNEL,
    nsa::DECODE_KERNEL,
];

/// What can be wrong with an attention call's inputs.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// `cu_seqlens` must start at 0, never decrease, and end at the number of packed tokens.
    #[error("invalid cu_seqlens: {0}")]
    CuSeqlens(String),
    /// A tensor's length does not match the shape the other inputs imply.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Head counts or head dimensions that the ops do not accept.
    #[error("invalid heads: {0}")]
    Heads(String),
    /// A configuration value out of range (zero block sizes, bad divisibility, bad scale, ...).
    #[error("invalid config: {0}")]
    Config(String),
    /// A NaN or infinity in an input, found because `check_finite` was set.
    #[error("non-finite value in {tensor} at flat index {index}")]
    NonFinite {
        /// Which input.
        tensor: &'static str,
        /// Flat element index of the first bad value.
        index: usize,
    },
    /// A decode cache used inconsistently (unknown sequence, wrong token count).
    #[error("cache: {0}")]
    Cache(String),
    /// A buffer whose size comes from the inputs could not be allocated.
    #[error("out of memory: {what} needs {bytes} bytes")]
    OutOfMemory {
        /// Which buffer.
        what: &'static str,
        /// Its size (saturated at `usize::MAX`).
        bytes: usize,
    },
    /// Something the device kernels do not implement (a storage type, a head-dim pair, a size
    /// beyond their 32-bit indices); the message says what to do instead.
    #[error("unsupported on the device: {0}")]
    Unsupported(String),
    /// The device (squid-cuda: NVRTC, the driver, a launch, the simulator) failed; its message.
    #[error("device: {0}")]
    Device(String),
}
