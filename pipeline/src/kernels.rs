//! Every CUDA kernel of the workspace, gathered from the crates that own them.

use squid_cuda::check::{check_kernel, EntryReport};
use squid_cuda::{Arch, KernelRegistry};

use crate::Error;

/// The registry of every `.cu` source in the workspace. A crate that adds kernels adds its
/// `KERNELS` list here; a workspace test fails if a `.cu` file is missing from it.
pub fn workspace_registry() -> Result<KernelRegistry, Error> {
    let mut registry = KernelRegistry::new();
    registry.register_all(squid_cuda::KERNELS)?;
    registry.register_all(squid_attention::KERNELS)?;
    registry.register_all(squid_kvcache::KERNELS)?;
    Ok(registry)
}

/// The outcome of checking every kernel at every architecture.
#[derive(Debug, Default)]
pub struct CheckOutcome {
    /// One row per entry point and architecture that compiled.
    pub rows: Vec<EntryReport>,
    /// `(kernel, arch, error)` for every source that failed to compile or assemble.
    pub failures: Vec<(String, Arch, squid_cuda::Error)>,
}

impl CheckOutcome {
    /// Rows whose entry spilled registers.
    pub fn spilled(&self) -> impl Iterator<Item = &EntryReport> {
        self.rows.iter().filter(|r| r.usage.as_ref().is_some_and(|u| u.spills()))
    }

    /// Failures plus spilling entries: what makes the check exit non-zero.
    pub fn problems(&self) -> usize {
        self.failures.len() + self.spilled().count()
    }
}

/// Compiles and (with `ptxas`) assembles every kernel of `registry` for every arch, calling
/// `progress` after each (kernel, arch) pair.
pub fn check_all(
    registry: &KernelRegistry,
    archs: &[Arch],
    ptxas: Option<&std::path::Path>,
    mut progress: impl FnMut(&str, Arch),
) -> CheckOutcome {
    let mut outcome = CheckOutcome::default();
    for kernel in registry.iter() {
        for &arch in archs {
            match check_kernel(kernel, arch, ptxas) {
                Ok(rows) => outcome.rows.extend(rows),
                Err(e) => outcome.failures.push((kernel.name.to_string(), arch, e)),
            }
            progress(kernel.name, arch);
        }
    }
    outcome
}
