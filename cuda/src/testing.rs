//! Test support shared by every crate's kernel tests: decide whether a test that needs NVRTC
//! or a GPU runs, skips, or fails.

use crate::{nvrtc_required, Device};

/// True when NVRTC can be used. When it cannot, prints `skipped: NVRTC not found (...)` and
/// returns false, unless `SQUID_REQUIRE_NVRTC=1`, in which case it panics (CI sets it, so a
/// missing NVRTC fails the run instead of silently skipping every kernel test).
pub fn nvrtc_available() -> bool {
    match crate::nvrtc::nvrtc_version() {
        Ok(_) => true,
        Err(e) => {
            assert!(!nvrtc_required(), "SQUID_REQUIRE_NVRTC=1 but NVRTC is unavailable: {e}");
            println!("skipped: NVRTC not found ({e})");
            false
        }
    }
}

/// True when a GPU is present; otherwise prints `skipped: no CUDA device (...)` and returns false.
/// Any other discovery failure (a broken driver) panics, since it is not "no GPU".
pub fn gpu_available() -> bool {
    match Device::discover() {
        Ok(_) => true,
        Err(e) if e.is_unavailable() => {
            println!("skipped: no CUDA device ({e})");
            false
        }
        Err(e) => panic!("CUDA discovery failed: {e}"),
    }
}
