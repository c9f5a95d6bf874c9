//! Pieces shared by the device paths (`cuda` feature): error mapping and grid sizes.

use crate::Error;

/// A squid-cuda error (NVRTC, the driver, a launch, the simulator) as this crate's error.
pub(crate) fn device_err(e: squid_cuda::Error) -> Error {
    Error::Device(e.to_string())
}

/// `ceil(n / per_block)` blocks as one grid dimension, or a typed error when it does not fit.
pub(crate) fn blocks(what: &'static str, n: usize, per_block: usize) -> Result<u32, Error> {
    u32::try_from(n.div_ceil(per_block).max(1))
        .map_err(|_| Error::Size { what, why: format!("{n} items need more than 2^32 - 1 blocks") })
}

/// Checks that a device view has the length the host-side shape says.
pub(crate) fn check_view_len(what: &'static str, expected: usize, got: usize) -> Result<(), Error> {
    crate::check_len(what, expected, got)
}

/// A host count as a `u32` device index (offsets and sample ids are 32-bit on the device).
pub(crate) fn to_u32(what: &'static str, n: usize) -> Result<u32, Error> {
    u32::try_from(n).map_err(|_| Error::Size { what, why: format!("{n} does not fit the kernels' 32-bit indices") })
}
