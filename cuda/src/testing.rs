//! Test support shared by every crate's kernel tests: decide whether a test that needs NVRTC
//! or a GPU runs, skips, or fails, and pick the device a kernel test runs on (`test_device`:
//! the GPU when present, else the simulator).

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

/// Chooses the device `test_device` returns: `sim` (always the simulator), `gpu` (a GPU is
/// required: its absence fails the test), or unset / `auto` (a GPU when present, else the
/// simulator).
pub const TEST_DEVICE_ENV: &str = "SQUID_TEST_DEVICE";

/// The device a kernel test runs on, so the test is written once: the first GPU when one is
/// present, otherwise the simulator (squid-ptxsim, sanitizer checks on, the approximate
/// functions at the edge of their documented error so a tolerance that passes holds on any
/// GPU). `None`, with a `skipped:` line, when there is neither a GPU nor NVRTC, which
/// `SQUID_REQUIRE_NVRTC=1` turns into a panic. [`TEST_DEVICE_ENV`] overrides the choice.
#[cfg(feature = "cuda")]
pub fn test_device() -> Option<crate::launch::Gpu> {
    use crate::launch::Gpu;
    let choice = std::env::var(TEST_DEVICE_ENV).unwrap_or_default();
    let gpu = match choice.as_str() {
        "sim" => None,
        "gpu" => Some(Gpu::first().unwrap_or_else(|e| panic!("{TEST_DEVICE_ENV}=gpu but no GPU could be opened: {e}"))),
        "" | "auto" => match Device::discover() {
            Ok(_) => Some(Gpu::first().unwrap_or_else(|e| panic!("a GPU was discovered but could not be opened: {e}"))),
            Err(e) if e.is_unavailable() => None,
            Err(e) => panic!("CUDA discovery failed: {e}"),
        },
        other => panic!("{TEST_DEVICE_ENV}={other}: expected `sim`, `gpu` or `auto`"),
    };
    if gpu.is_some() {
        return gpu;
    }
    if !nvrtc_available() {
        return None;
    }
    let options = crate::ptxsim::Options { approx_worst_case: true, ..Default::default() };
    Some(Gpu::simulator_with(options).unwrap_or_else(|e| panic!("NVRTC is available but the simulator failed: {e}")))
}
