//! Assembling PTX with `ptxas -v` to read each kernel's resource use: registers, spills, stack,
//! shared and constant memory. Needs only the `ptxas` executable (no driver, no GPU).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Arch, Error};

/// Points at a `ptxas` executable, ahead of every other place.
pub const PTXAS_ENV: &str = "SQUID_PTXAS";

/// What ptxas reports for one entry point at one architecture.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceUsage {
    /// The entry point.
    pub entry: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of registers spilled to local memory.
    pub spill_stores: u64,
    /// Bytes loaded back from spills.
    pub spill_loads: u64,
    /// Bytes of per-thread stack frame.
    pub stack_frame: u64,
    /// Bytes of static shared memory (dynamic shared memory is set at launch, not here).
    pub shared_bytes: u64,
    /// Bytes of constant bank 0 (kernel parameters and constants).
    pub const_bytes: u64,
}

impl ResourceUsage {
    /// Spilling is a performance bug we refuse to ship.
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0
    }
}

/// The places `ptxas` is looked for, in order: `SQUID_PTXAS`, each `PATH` entry, `CUDA_HOME/bin`,
/// `CUDA_PATH/bin`, `/usr/local/cuda/bin`, `/opt/cuda/bin`.
pub fn ptxas_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(PTXAS_ENV).filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        out.extend(std::env::split_paths(&path).map(|d| d.join("ptxas")));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            out.push(PathBuf::from(home).join("bin").join("ptxas"));
        }
    }
    out.push(PathBuf::from("/usr/local/cuda/bin/ptxas"));
    out.push(PathBuf::from("/opt/cuda/bin/ptxas"));
    out
}

/// The first `ptxas` that exists.
pub fn find_ptxas() -> Result<PathBuf, Error> {
    let candidates = ptxas_candidates();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::PtxasNotFound { tried: candidates.iter().map(|p| p.display().to_string()).collect() })
}

/// Assembles `ptx` for `arch` with `ptxas -v` and returns the usage of every entry point.
pub fn assemble(ptxas: &Path, kernel: &str, ptx: &str, arch: Arch) -> Result<Vec<ResourceUsage>, Error> {
    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let input = dir.path().join(format!("{kernel}.ptx"));
    std::fs::write(&input, ptx).map_err(|e| Error::io(&input, e))?;
    let output = Command::new(ptxas)
        .arg("-v")
        .arg(format!("--gpu-name={arch}"))
        .arg("-o")
        .arg(dir.path().join(format!("{kernel}.cubin")))
        .arg(&input)
        .output()
        .map_err(|e| Error::io(ptxas, e))?;
    let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        return Err(Error::Ptxas { kernel: kernel.into(), arch: arch.to_string(), log });
    }
    Ok(parse_report(&log))
}

/// Reads the `ptxas -v` report: one [`ResourceUsage`] per "Compiling entry function" block.
pub fn parse_report(text: &str) -> Vec<ResourceUsage> {
    let mut out: Vec<ResourceUsage> = Vec::new();
    // The function a "Function properties for X" line announced; its figures are on the next line.
    let mut properties_of: Option<String> = None;
    for line in text.lines() {
        let body = line.split_once("info    :").map_or(line, |(_, b)| b).trim();
        if let Some(rest) = body.strip_prefix("Compiling entry function '") {
            let name = rest.split('\'').next().unwrap_or_default();
            out.push(ResourceUsage { entry: name.to_string(), ..Default::default() });
            properties_of = None;
        } else if let Some(rest) = body.strip_prefix("Function properties for ") {
            properties_of = Some(rest.trim().to_string());
        } else if body.contains("bytes stack frame") {
            let current = out.last_mut().filter(|u| properties_of.as_deref() == Some(u.entry.as_str()));
            if let Some(u) = current {
                for part in body.split(',') {
                    let n = leading_number(part);
                    if part.contains("stack frame") {
                        u.stack_frame = n;
                    } else if part.contains("spill stores") {
                        u.spill_stores = n;
                    } else if part.contains("spill loads") {
                        u.spill_loads = n;
                    }
                }
            }
            properties_of = None;
        } else if let Some(rest) = body.strip_prefix("Used ") {
            if let Some(u) = out.last_mut() {
                for part in rest.split(',') {
                    let part = part.trim();
                    let n = leading_number(part);
                    if part.ends_with("registers") {
                        u.registers = n as u32;
                    } else if part.ends_with("bytes smem") {
                        u.shared_bytes = n;
                    } else if part.ends_with("bytes cmem[0]") {
                        u.const_bytes = n;
                    }
                }
            }
        }
    }
    out
}

fn leading_number(s: &str) -> u64 {
    s.split_whitespace().next().and_then(|w| w.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'squid_softmax_bf16' for 'sm_90'
ptxas info    : Function properties for squid_softmax_bf16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 1 barriers, 256 bytes smem, 372 bytes cmem[0]
ptxas info    : Function properties for helper
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'spilly' for 'sm_90'
ptxas info    : Function properties for spilly
    40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, 380 bytes cmem[0]
";

    #[test]
    fn parses_each_entry_and_ignores_device_functions() {
        let usage = parse_report(REPORT);
        assert_eq!(usage.len(), 2);
        assert_eq!(
            usage[0],
            ResourceUsage {
                entry: "squid_softmax_bf16".into(),
                registers: 18,
                spill_stores: 0,
                spill_loads: 0,
                stack_frame: 0,
                shared_bytes: 256,
                const_bytes: 372,
            }
        );
        assert!(!usage[0].spills());
        assert_eq!((usage[1].registers, usage[1].spill_stores, usage[1].spill_loads), (255, 36, 28));
        assert_eq!(usage[1].stack_frame, 40);
        assert!(usage[1].spills());
    }

    #[test]
    fn explicit_ptxas_path_comes_first() {
        // Only reads the variable when set by the caller's environment; the list always ends
        // with the conventional install locations.
        let c = ptxas_candidates();
        assert_eq!(c.last().unwrap(), Path::new("/opt/cuda/bin/ptxas"));
        if let Some(p) = std::env::var_os(PTXAS_ENV).filter(|p| !p.is_empty()) {
            assert_eq!(c[0], PathBuf::from(p));
        }
    }
}
