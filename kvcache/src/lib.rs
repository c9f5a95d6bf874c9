#![doc = include_str!("../README.md")]
//!
//! # Modules
//! - [`rope`]: rotary embedding forward/backward and [`rope::Rope::reposition`] for cached keys.
//! - [`paged`]: [`PagedKv`], private KV in fixed-size pages with copy-on-write forks.
//! - [`doc_cache`]: [`DocCache`], per-document KV by content address, memory and disk tiers.

pub mod doc_cache;
mod key;
pub mod paged;
pub mod rope;

pub use doc_cache::{CacheStats, DocCache, DocCacheConfig, DocKv, DocShape, PrefetchReport, PrefetchTicket};
pub use key::DocKey;
pub use paged::{PagedKv, PagedKvConfig, PagedKvView, SeqId};
pub use rope::{Rope, RopeConfig, RopeLayout};

/// The kernels this crate ships (RoPE forward/backward and re-positioning; the device page
/// pools' copies and row writes).
pub static KERNELS: &[squid_cuda::KernelSource] = &[rope::KERNEL, paged::KERNEL];

use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong in the KV cache.
#[derive(Debug, Error)]
pub enum Error {
    /// A document key was given in a form that cannot be parsed.
    #[error("invalid document key `{0}`: expected 64 lowercase hex digits")]
    InvalidKey(String),
    /// A configuration that cannot work (zero or odd dims, a non-finite base, ...).
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A buffer whose length or shape does not match what the operation expects.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// The page pool cannot supply the pages an operation needs; nothing was changed.
    #[error("out of KV pages: need {needed}, {free} free")]
    OutOfPages {
        /// Pages the operation needed.
        needed: usize,
        /// Pages that were free.
        free: usize,
    },
    /// A sequence id that is not (or no longer) allocated.
    #[error("unknown sequence id {0}")]
    UnknownSequence(u64),
    /// A token position outside a sequence.
    #[error("position out of range: {0}")]
    OutOfRange(String),
    /// A file-system operation of the disk tier failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A buffer whose size comes from the caller could not be allocated; nothing was changed.
    #[error("out of memory: {what} needs {bytes} bytes")]
    OutOfMemory {
        /// Which buffer.
        what: &'static str,
        /// Its size (saturated at `usize::MAX`).
        bytes: usize,
    },
    /// The caller's prefill closure failed; nothing was cached.
    #[error("prefill failed: {0}")]
    Prefill(Box<dyn std::error::Error + Send + Sync>),
    /// A device operation (upload, compile, launch) failed.
    #[error("device: {0}")]
    Device(#[from] squid_cuda::Error),
}

/// A zero-filled buffer of `len` elements, or [`Error::OutOfMemory`] if the allocator refuses it
/// (a size from the caller must give an error, not abort the process).
pub(crate) fn try_zeroed<T: bytemuck::Zeroable>(what: &'static str, len: usize) -> Result<Vec<T>, Error> {
    bytemuck::allocation::try_zeroed_vec(len)
        .map_err(|()| Error::OutOfMemory { what, bytes: len.saturating_mul(std::mem::size_of::<T>()) })
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
