//! Finding libnccl before cudarc touches it: cudarc panics on the first NCCL call when the
//! library (or one of its functions) is missing, so every entry point of the backend asks
//! [`check`] first and gets a typed [`Error::Unavailable`] instead.

use std::sync::OnceLock;

use cudarc::nccl::sys;

use crate::Error;

/// The oldest NCCL this backend runs on: 2.14 brought `ncclCommInitRankConfig` and the
/// non-blocking communicators the deadlines are built on.
pub const MIN_VERSION: (u32, u32) = (2, 14);

/// Every NCCL function the backend calls (cudarc looks each one up on first use and panics if
/// it is absent, so all of them are checked up front).
const REQUIRED: &[&str] = &[
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclCommInitRankConfig",
    "ncclCommGetAsyncError",
    "ncclCommAbort",
    "ncclCommFinalize",
    "ncclCommDestroy",
    "ncclGroupStart",
    "ncclGroupEnd",
    "ncclAllReduce",
    "ncclAllGather",
    "ncclReduceScatter",
    "ncclBroadcast",
    "ncclSend",
    "ncclRecv",
];

/// The NCCL version found at run time, e.g. `(2, 21, 5)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level.
    pub patch: u32,
}

impl NcclVersion {
    /// The version as NCCL encodes it (`NCCL_VERSION(major, minor, patch)`), which is what a
    /// communicator config's `version` field carries.
    pub fn code(self) -> u32 {
        self.major * 10_000 + self.minor * 100 + self.patch
    }

    fn from_code(code: i32) -> Self {
        let code = code.max(0) as u32;
        // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch; older ones major * 1000 + ...
        if code >= 10_000 {
            Self { major: code / 10_000, minor: code / 100 % 100, patch: code % 100 }
        } else {
            Self { major: code / 1000, minor: code / 100 % 10, patch: code % 100 }
        }
    }
}

impl std::fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

fn unavailable(detail: String) -> Error {
    Error::Unavailable { backend: "nccl", detail }
}

/// Checks once per process that a GPU driver and a usable libnccl are present, then returns
/// NCCL's version. Never panics.
pub fn check() -> Result<NcclVersion, Error> {
    static FOUND: OnceLock<Result<NcclVersion, Error>> = OnceLock::new();
    FOUND.get_or_init(probe).clone()
}

fn probe() -> Result<NcclVersion, Error> {
    // libcuda and a GPU first: NCCL needs both, and cudarc's driver calls panic without libcuda.
    squid_cuda::Device::discover().map_err(|e| unavailable(format!("no usable CUDA device: {e}")))?;
    // The names cudarc tries, in its order: the first that opens is the one it will use.
    let candidates = cudarc::get_lib_name_candidates("nccl");
    let found = candidates.iter().find_map(|name| {
        // SAFETY: opening a shared library runs its initialisers, which have no preconditions;
        // the handle only serves to look symbols up and is dropped at the end of the probe.
        unsafe { libloading::Library::new(name) }.ok().map(|lib| (name, lib))
    });
    let Some((name, lib)) = found else {
        // NCCL's packages install libnccl.so.2, which cudarc does not look for.
        // SAFETY: as above.
        let versioned = unsafe { libloading::Library::new("libnccl.so.2") }.is_ok();
        let hint = if versioned {
            "; libnccl.so.2 is present but cudarc does not look for that name: add a libnccl.so \
             symlink to it in a directory on LD_LIBRARY_PATH"
        } else {
            ""
        };
        return Err(unavailable(format!("libnccl could not be loaded (tried {candidates:?}){hint}")));
    };
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        // SAFETY: only the symbol's presence is checked; the pointer is never called.
        .filter(|symbol| unsafe { lib.get::<*const ()>(symbol.as_bytes()) }.is_err())
        .collect();
    if !missing.is_empty() {
        return Err(unavailable(format!(
            "{name} lacks {missing:?} (NCCL >= {}.{} is needed)",
            MIN_VERSION.0, MIN_VERSION.1
        )));
    }
    drop(lib);
    let mut code = 0;
    // SAFETY: the library and the symbol are present (checked above); the out-pointer is valid.
    let result = unsafe { sys::ncclGetVersion(&mut code) };
    if result != sys::ncclResult_t::ncclSuccess {
        return Err(unavailable(format!("ncclGetVersion failed: {result:?}")));
    }
    let version = NcclVersion::from_code(code);
    if (version.major, version.minor) < MIN_VERSION {
        return Err(unavailable(format!(
            "{name} is NCCL {version}; NCCL >= {}.{} is needed",
            MIN_VERSION.0, MIN_VERSION.1
        )));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode() {
        assert_eq!(NcclVersion::from_code(22105), NcclVersion { major: 2, minor: 21, patch: 5 });
        assert_eq!(NcclVersion::from_code(2708), NcclVersion { major: 2, minor: 7, patch: 8 });
        assert_eq!(NcclVersion { major: 2, minor: 30, patch: 1 }.code(), 23001);
    }
}
