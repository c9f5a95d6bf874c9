//! Running kernels on a device: a [`Gpu`] is either a real GPU (a context, a stream and the
//! loaded modules) or the simulated one ([`Gpu::simulator`], squid-ptxsim running the PTX that
//! NVRTC emits for [`SIM_ARCH`] on the CPU). Both go through the same API: [`DeviceBuffer`]s
//! move data host <-> device; a [`TypedKernel`] fixes an entry point's argument types once, so
//! every launch after that is checked by the compiler. A kernel's launcher and its tests are
//! written once and run on either.
//!
//! Everything here needs the `cuda` feature; without it the module holds only [`LaunchDims`].
// Without the feature the items these docs link to do not exist.
#![cfg_attr(not(feature = "cuda"), allow(rustdoc::broken_intra_doc_links))]

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
pub use device_api::*;

#[cfg(feature = "cuda")]
mod device_api;

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
