//! Finding the GPUs of this machine without ever panicking when there is no CUDA.

use crate::{Arch, Error};

/// The names the CUDA driver library is looked up by.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The driver's index.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability.
    pub arch: Arch,
    /// Global memory.
    pub total_memory_bytes: usize,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
}

/// Entry point for device discovery.
#[derive(Debug, Clone, Copy)]
pub struct Device;

impl Device {
    /// The GPUs present. `Err(NoDriver)` when libcuda cannot be loaded, `Err(NoDevice)` when it
    /// loads but sees no GPU, `Err(CudaFeatureDisabled)` in a build without the `cuda` feature.
    /// The driver library is probed before cudarc touches it, so a machine without CUDA gets an
    /// answer, not a panic.
    pub fn discover() -> Result<Vec<DeviceInfo>, Error> {
        imp::discover()
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn discover() -> Result<Vec<DeviceInfo>, Error> {
        Err(Error::CudaFeatureDisabled)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use cudarc::driver::{result, sys};

    use super::*;

    fn driver_err(call: &'static str) -> impl Fn(result::DriverError) -> Error {
        move |e| match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => Error::NoDevice,
            _ => Error::Driver { call, message: format!("{e:?}") },
        }
    }

    /// Whether libcuda can be loaded; it is opened and closed again, cudarc keeps its own handle.
    pub(crate) fn driver_present() -> bool {
        DRIVER_NAMES.iter().any(|name| {
            // SAFETY: loading the driver library runs its initialisers, which have no
            // preconditions; the handle is dropped straight away.
            unsafe { libloading::Library::new(name) }.is_ok()
        })
    }

    pub fn discover() -> Result<Vec<DeviceInfo>, Error> {
        if !driver_present() {
            return Err(Error::NoDriver { tried: DRIVER_NAMES.iter().map(|s| s.to_string()).collect() });
        }
        result::init().map_err(driver_err("cuInit"))?;
        let count = result::device::get_count().map_err(driver_err("cuDeviceGetCount"))?;
        if count <= 0 {
            return Err(Error::NoDevice);
        }
        (0..count)
            .map(|ordinal| {
                let dev = result::device::get(ordinal).map_err(driver_err("cuDeviceGet"))?;
                let attr = |a| {
                    // SAFETY: `dev` is a valid device handle from cuDeviceGet.
                    unsafe { result::device::get_attribute(dev, a) }.map_err(driver_err("cuDeviceGetAttribute"))
                };
                use sys::CUdevice_attribute::*;
                let major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
                let minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
                let sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
                // SAFETY: as above.
                let total = unsafe { result::device::total_mem(dev) }.map_err(driver_err("cuDeviceTotalMem"))?;
                Ok(DeviceInfo {
                    ordinal: ordinal as usize,
                    name: result::device::get_name(dev).map_err(driver_err("cuDeviceGetName"))?,
                    arch: Arch::from_capability(major as u32, minor as u32)?,
                    total_memory_bytes: total,
                    multiprocessors: sms as u32,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without CUDA (this project's CI) discovery answers with a typed error; on a
    /// GPU machine it lists at least one device. Either way it never panics.
    #[test]
    fn discover_answers_without_panicking() {
        match Device::discover() {
            Ok(devices) => {
                assert!(!devices.is_empty());
                for d in &devices {
                    assert!(d.arch.number() >= 50 && d.total_memory_bytes > 0, "{d:?}");
                }
            }
            Err(e) => {
                assert!(e.is_unavailable(), "unexpected discovery error: {e}");
                println!("skipped: no CUDA device ({e})");
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn without_libcuda_the_answer_is_no_driver() {
        if imp::driver_present() {
            println!("skipped: this machine has a CUDA driver");
            return;
        }
        assert!(matches!(Device::discover(), Err(Error::NoDriver { .. })));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_the_answer_is_disabled() {
        assert!(matches!(Device::discover(), Err(Error::CudaFeatureDisabled)));
    }
}
