//! Compiling CUDA C to PTX with NVRTC, found at run time, with the [`PtxCache`] in front.
//!
//! NVRTC is looked for, in order, at `SQUID_NVRTC_LIB` (a path to `libnvrtc.so`), under
//! `CUDA_HOME` and `CUDA_PATH`, in the usual install directories, and finally by name through
//! the dynamic loader (`LD_LIBRARY_PATH`, the ld cache). The library found is loaded with
//! `RTLD_GLOBAL`, so cudarc's own lookup by soname resolves to that same copy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::cache::{CacheHit, CacheKey, PtxCache};
use crate::{Arch, Error, KernelSource};

/// Names a `libnvrtc.so` to use ahead of every other place.
pub const NVRTC_LIB_ENV: &str = "SQUID_NVRTC_LIB";

/// The sonames cudarc (built for CUDA 12) opens NVRTC by; a library we load must answer to one.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const NVRTC_SONAMES: &[&str] = &["libnvrtc.so.12", "libnvrtc.so"];

/// How a kernel is compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    /// The target; NVRTC emits PTX for its virtual architecture (`compute_XY`).
    pub arch: Arch,
    /// Pass `--use_fast_math` (approximate transcendental functions, flush-to-zero).
    pub fast_math: bool,
    /// Any further NVRTC options.
    pub extra: Vec<String>,
}

impl CompileOptions {
    /// The options a registered kernel asks for, at `arch`.
    pub fn for_kernel(kernel: &KernelSource, arch: Arch) -> Self {
        Self { arch, fast_math: kernel.fast_math, extra: Vec::new() }
    }

    /// The NVRTC command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![format!("--gpu-architecture={}", self.arch.compute_name()), "-std=c++17".to_string()];
        if self.fast_math {
            args.push("--use_fast_math".to_string());
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// PTX for one kernel source at one architecture.
#[derive(Debug, Clone)]
pub struct Ptx {
    /// The kernel's registry name.
    pub kernel: &'static str,
    /// The target.
    pub arch: Arch,
    /// The PTX text.
    pub text: Arc<str>,
    /// Wall time of the lookup and, on a miss, the compilation.
    pub compile_ms: f64,
    /// Where it came from.
    pub cache: CacheHit,
}

/// The places NVRTC is looked for, in order.
pub fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(NVRTC_LIB_ENV).filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).filter(|p| !p.is_empty()).map(PathBuf::from))
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots.push(PathBuf::from("/opt/cuda"));
    for root in roots {
        for lib in ["lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"] {
            for name in ["libnvrtc.so.12", "libnvrtc.so"] {
                out.push(root.join(lib).join(name));
            }
        }
    }
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"] {
        out.push(PathBuf::from(dir).join("libnvrtc.so.12"));
    }
    // Bare names: the dynamic loader's own search.
    out.extend(NVRTC_SONAMES.iter().map(PathBuf::from));
    out
}

/// The NVRTC version, e.g. `(12, 8)`.
pub fn nvrtc_version() -> Result<(i32, i32), Error> {
    imp::version()
}

/// Compiles a registered kernel (prelude included) to PTX, bypassing every cache.
pub fn compile(kernel: &'static KernelSource, options: &CompileOptions) -> Result<Ptx, Error> {
    let start = Instant::now();
    let text = imp::compile_source(kernel.name, kernel.path, &kernel.full_source(), options)?;
    Ok(Ptx {
        kernel: kernel.name,
        arch: options.arch,
        text: text.into(),
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
        cache: CacheHit::Miss,
    })
}

/// Compiles a registered kernel through `cache` (see [`PtxCache::global`] for the usual one).
pub fn compile_cached(kernel: &'static KernelSource, options: &CompileOptions, cache: &PtxCache) -> Result<Ptx, Error> {
    let start = Instant::now();
    let (major, minor) = nvrtc_version()?;
    let source = kernel.full_source();
    let key = CacheKey::new(&source, options.arch, &options.to_args(), &format!("nvrtc {major}.{minor}"));
    let (text, hit) = cache.get_or_compile(key, || imp::compile_source(kernel.name, kernel.path, &source, options))?;
    Ok(Ptx {
        kernel: kernel.name,
        arch: options.arch,
        text,
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
        cache: hit,
    })
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn version() -> Result<(i32, i32), Error> {
        Err(Error::CudaFeatureDisabled)
    }

    pub fn compile_source(_: &str, _: &str, _: &str, _: &CompileOptions) -> Result<String, Error> {
        Err(Error::CudaFeatureDisabled)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::ffi::{c_char, CString};
    use std::sync::OnceLock;

    use cudarc::nvrtc::{result, sys};
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

    use super::*;

    /// Loads NVRTC once per process; the library stays loaded for the life of the process.
    fn ensure_loaded() -> Result<(), Error> {
        static LOADED: OnceLock<Result<(), Vec<String>>> = OnceLock::new();
        LOADED
            .get_or_init(|| {
                let candidates = nvrtc_candidates();
                for c in &candidates {
                    let is_path = c.components().count() > 1;
                    if is_path && !c.is_file() {
                        continue;
                    }
                    // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
                    if let Ok(lib) = unsafe { Library::open(Some(c), RTLD_NOW | RTLD_GLOBAL) } {
                        // cudarc opens NVRTC by soname; check that one of its names now resolves
                        // (to the copy just loaded) so its loader can never panic.
                        let reachable = NVRTC_SONAMES.iter().any(|n| {
                            // SAFETY: as above; the library is already loaded.
                            unsafe { Library::open(Some(n), RTLD_NOW | RTLD_GLOBAL) }.is_ok()
                        });
                        if reachable {
                            std::mem::forget(lib);
                            return Ok(());
                        }
                    }
                }
                Err(candidates.iter().map(|p| p.display().to_string()).collect())
            })
            .clone()
            .map_err(|tried| Error::NvrtcNotFound { tried })
    }

    fn nvrtc_err(call: &'static str) -> impl Fn(result::NvrtcError) -> Error {
        move |e| Error::Nvrtc { call, message: format!("{e:?}") }
    }

    fn c_chars_to_string(chars: Vec<c_char>) -> String {
        let bytes: Vec<u8> = chars.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn version() -> Result<(i32, i32), Error> {
        ensure_loaded()?;
        static VERSION: OnceLock<(i32, i32)> = OnceLock::new();
        let (mut major, mut minor) = (0, 0);
        if let Some(v) = VERSION.get() {
            return Ok(*v);
        }
        // SAFETY: both pointers are valid for writes; NVRTC is loaded.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(nvrtc_err("nvrtcVersion"))?;
        Ok(*VERSION.get_or_init(|| (major, minor)))
    }

    /// Destroys the program when dropped, on every path out of `compile_source`.
    struct Program(sys::nvrtcProgram);

    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: the handle came from create_program and is destroyed exactly once.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }

    pub fn compile_source(kernel: &str, path: &str, source: &str, options: &CompileOptions) -> Result<String, Error> {
        ensure_loaded()?;
        let bad_text = |what: &str| Error::Compile {
            kernel: kernel.to_string(),
            arch: options.arch.to_string(),
            log: format!("the {what} contains a NUL byte"),
        };
        let src = CString::new(source).map_err(|_| bad_text("source"))?;
        let name = CString::new(path).map_err(|_| bad_text("file name"))?;
        let args = options.to_args();
        if args.iter().any(|a| a.contains('\0')) {
            return Err(bad_text("option list"));
        }
        // `src` and `name` outlive `program`: it is declared after them, so dropped first.
        let program = Program(result::create_program(&src, Some(&name)).map_err(nvrtc_err("nvrtcCreateProgram"))?);
        // SAFETY: the program is live until `program` drops, after these calls.
        let compiled = unsafe { result::compile_program(program.0, &args) };
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(program.0) }.map(c_chars_to_string).unwrap_or_default();
        if let Err(e) = compiled {
            let log = if log.trim().is_empty() { format!("{e:?}") } else { log };
            return Err(Error::Compile { kernel: kernel.to_string(), arch: options.arch.to_string(), log });
        }
        // SAFETY: as above; the program compiled.
        let ptx = unsafe { result::get_ptx(program.0) }.map_err(nvrtc_err("nvrtcGetPTX"))?;
        Ok(c_chars_to_string(ptx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_virtual_arch_and_fast_math_when_asked() {
        let k = &crate::ops::softmax::KERNEL;
        let args = CompileOptions::for_kernel(k, Arch::SM90).to_args();
        assert_eq!(args[0], "--gpu-architecture=compute_90");
        assert!(args.contains(&"-std=c++17".to_string()));
        assert_eq!(args.contains(&"--use_fast_math".to_string()), k.fast_math);
    }

    #[test]
    fn explicit_library_path_is_tried_first() {
        let c = nvrtc_candidates();
        assert_eq!(c.last().unwrap(), &PathBuf::from("libnvrtc.so"));
        if let Some(p) = std::env::var_os(NVRTC_LIB_ENV).filter(|p| !p.is_empty()) {
            assert_eq!(c[0], PathBuf::from(p));
        }
    }
}
