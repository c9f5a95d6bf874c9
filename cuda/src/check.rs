//! `squid kernels check`: compile every registered kernel with NVRTC, assemble it with
//! `ptxas -v`, and report each entry point's resources.

use std::path::Path;
use std::time::Instant;

use crate::nvrtc::{compile, CompileOptions};
use crate::ptxas::{assemble, ResourceUsage};
use crate::{Arch, Error, KernelSource};

/// One row of the check table: an entry point at an architecture.
#[derive(Debug, Clone)]
pub struct EntryReport {
    /// The kernel source's registry name.
    pub kernel: &'static str,
    /// The target.
    pub arch: Arch,
    /// NVRTC wall time for the whole source, in milliseconds.
    pub compile_ms: f64,
    /// ptxas wall time for the whole source, in milliseconds (None without ptxas).
    pub assemble_ms: Option<f64>,
    /// The resources, when ptxas ran (None without ptxas); `usage.entry` names the entry.
    pub usage: Option<ResourceUsage>,
    /// The entry point.
    pub entry: &'static str,
    /// The version of the NVRTC that compiled it, e.g. `(13, 0)`.
    pub nvrtc: (i32, i32),
}

/// Compiles `kernel` for `arch` (fresh, no cache, so the time is real), checks that every
/// declared entry point is in the PTX, and, if `ptxas` is given, assembles it and reports the
/// resources of each entry.
pub fn check_kernel(
    kernel: &'static KernelSource,
    arch: Arch,
    ptxas: Option<&Path>,
) -> Result<Vec<EntryReport>, Error> {
    let ptx = compile(kernel, &CompileOptions::for_kernel(kernel, arch))?;
    let nvrtc = crate::nvrtc::nvrtc_version()?;
    kernel.check_ptx_entries(&ptx.text)?;
    let (usages, assemble_ms) = match ptxas {
        Some(p) => {
            let start = Instant::now();
            let u = assemble(p, kernel.name, &ptx.text, arch)?;
            (Some(u), Some(start.elapsed().as_secs_f64() * 1e3))
        }
        None => (None, None),
    };
    kernel
        .entries
        .iter()
        .map(|&entry| {
            let usage = match &usages {
                Some(list) => Some(list.iter().find(|u| u.entry == entry).cloned().ok_or_else(|| Error::Ptxas {
                    kernel: kernel.name.into(),
                    arch: arch.to_string(),
                    log: format!("ptxas reported nothing for entry `{entry}`"),
                })?),
                None => None,
            };
            Ok(EntryReport { kernel: kernel.name, entry, arch, compile_ms: ptx.compile_ms, assemble_ms, usage, nvrtc })
        })
        .collect()
}

/// The table `squid kernels check` prints (the `nvrtc` column names the compiler of each row).
pub fn format_table(rows: &[EntryReport]) -> String {
    let dash = || "-".to_string();
    let mut out = format!(
        "{:<12} {:<22} {:<6} {:<6} {:>5} {:>11} {:>10} {:>10} {:>11} {:>10}\n",
        "kernel", "entry", "arch", "nvrtc", "regs", "spill_st_B", "spill_ld_B", "smem_B", "compile_ms", "ptxas_ms"
    );
    for r in rows {
        let u = r.usage.as_ref();
        out += &format!(
            "{:<12} {:<22} {:<6} {:<6} {:>5} {:>11} {:>10} {:>10} {:>11.1} {:>10}\n",
            r.kernel,
            r.entry,
            r.arch.to_string(),
            format!("{}.{}", r.nvrtc.0, r.nvrtc.1),
            u.map_or_else(dash, |u| u.registers.to_string()),
            u.map_or_else(dash, |u| u.spill_stores.to_string()),
            u.map_or_else(dash, |u| u.spill_loads.to_string()),
            u.map_or_else(dash, |u| u.shared_bytes.to_string()),
            r.compile_ms,
            r.assemble_ms.map_or_else(dash, |ms| format!("{ms:.1}")),
        );
    }
    out
}
