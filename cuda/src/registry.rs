//! Every `.cu` source of the workspace, with its entry points, in one place.
//!
//! Each op crate declares its kernels with [`kernel_source!`](crate::kernel_source) (the source
//! is embedded with `include_str!`, so the binary carries it) and lists them in a `KERNELS`
//! static; the `squid` binary gathers those lists into one [`KernelRegistry`], and a workspace
//! test checks that no `.cu` file is left out.

use crate::Error;

/// The prelude prepended to every kernel: half-precision storage types and conversions, so no
/// kernel needs the CUDA headers.
pub const PRELUDE: &str = include_str!("prelude.cuh");

/// One CUDA C source file and the `extern "C"` entry points it defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// Registry name, unique in the workspace (e.g. `axpy`).
    pub name: &'static str,
    /// The package that owns the file (e.g. `squid-cuda`).
    pub crate_name: &'static str,
    /// The file's path inside its package (e.g. `src/ops/axpy/axpy.cu`).
    pub path: &'static str,
    /// The source text, without the prelude.
    pub source: &'static str,
    /// The `extern "C" __global__` functions it defines.
    pub entries: &'static [&'static str],
    /// Whether it is compiled with `--use_fast_math` (approximate `expf` and friends).
    pub fast_math: bool,
}

impl KernelSource {
    /// What NVRTC compiles: the prelude, then a `#line` directive so that compile errors name
    /// the kernel's own file and line, then the source.
    pub fn full_source(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}\"\n{}", self.path, self.source)
    }

    /// Checks that compiled PTX defines every entry point this source declares.
    pub fn check_ptx_entries(&self, ptx: &str) -> Result<(), Error> {
        let found = ptx_entries(ptx);
        match self.entries.iter().find(|e| !found.iter().any(|f| f == *e)) {
            Some(e) => Err(Error::MissingEntry { kernel: self.name.into(), entry: (*e).into() }),
            None => Ok(()),
        }
    }
}

/// Declares a [`KernelSource`] for a `.cu` file of the calling package.
///
/// ```
/// # use squid_cuda::kernel_source;
/// static AXPY: squid_cuda::KernelSource =
///     kernel_source!("axpy_doc", "src/ops/axpy/axpy.cu", ["squid_axpy_f32", "squid_axpy_bf16"], fast_math = false);
/// assert!(AXPY.source.contains("squid_axpy_f32"));
/// ```
#[macro_export]
macro_rules! kernel_source {
    ($name:literal, $path:literal, [$($entry:literal),* $(,)?], fast_math = $fast:literal) => {
        $crate::KernelSource {
            name: $name,
            crate_name: env!("CARGO_PKG_NAME"),
            path: $path,
            source: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $path)),
            entries: &[$($entry),*],
            fast_math: $fast,
        }
    };
}

/// A set of kernel sources with unique names.
#[derive(Debug, Default, Clone)]
pub struct KernelRegistry {
    kernels: Vec<&'static KernelSource>,
}

impl KernelRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one source; a name already present is an error.
    pub fn register(&mut self, kernel: &'static KernelSource) -> Result<(), Error> {
        if self.get(kernel.name).is_some() {
            return Err(Error::DuplicateKernel(kernel.name.to_string()));
        }
        self.kernels.push(kernel);
        Ok(())
    }

    /// Adds a crate's `KERNELS` list.
    pub fn register_all(&mut self, kernels: &'static [KernelSource]) -> Result<(), Error> {
        kernels.iter().try_for_each(|k| self.register(k))
    }

    /// Looks a source up by name.
    pub fn get(&self, name: &str) -> Option<&'static KernelSource> {
        self.kernels.iter().copied().find(|k| k.name == name)
    }

    /// Looks a source up by name, or says it is missing.
    pub fn require(&self, name: &str) -> Result<&'static KernelSource, Error> {
        self.get(name).ok_or_else(|| Error::UnknownKernel(name.to_string()))
    }

    /// All sources, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &'static KernelSource> + '_ {
        self.kernels.iter().copied()
    }

    /// How many sources are registered.
    pub fn len(&self) -> usize {
        self.kernels.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.kernels.is_empty()
    }
}

/// The names of the `.entry` functions a PTX module defines, in order.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            let rest = line.trim_start();
            let rest = rest.strip_prefix(".visible").unwrap_or(rest).trim_start();
            let rest = rest.strip_prefix(".entry")?;
            let name: String =
                rest.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$').collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_lookups_work() {
        let mut reg = KernelRegistry::new();
        reg.register_all(crate::KERNELS).unwrap();
        assert_eq!(reg.len(), crate::KERNELS.len());
        assert_eq!(reg.require("axpy").unwrap().path, "src/ops/axpy/axpy.cu");
        assert!(matches!(reg.require("nope"), Err(Error::UnknownKernel(_))));
        assert!(matches!(reg.register(&crate::KERNELS[0]), Err(Error::DuplicateKernel(_))));
    }

    #[test]
    fn declared_entries_are_defined_in_the_source() {
        for k in crate::KERNELS {
            for e in k.entries {
                assert!(
                    k.source.contains(&format!("__global__ void {e}(")),
                    "{}: entry {e} not defined in {}",
                    k.name,
                    k.path
                );
            }
        }
    }

    #[test]
    fn full_source_maps_lines_back_to_the_file() {
        let k = &crate::KERNELS[0];
        let full = k.full_source();
        assert!(full.starts_with(PRELUDE));
        assert!(full.contains(&format!("#line 1 \"{}\"\n", k.path)));
    }

    #[test]
    fn reads_entry_names_from_ptx() {
        let ptx = "//\n.version 8.7\n.visible .entry squid_axpy_f32(\n\t.param .u64 a\n)\n{\n}\n\
                   .entry local_one(\n)\n.visible .func helper(\n)\n";
        assert_eq!(ptx_entries(ptx), vec!["squid_axpy_f32", "local_one"]);
    }
}
