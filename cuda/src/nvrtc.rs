//! Compiling CUDA C to PTX with NVRTC, found at run time, with the [`PtxCache`] in front.
//!
//! NVRTC is looked for, in order, at `SQUID_NVRTC_LIB` (a path to `libnvrtc.so*`), under
//! `CUDA_HOME` and `CUDA_PATH`, in the usual install directories, in the active Python
//! environment's NVIDIA wheels, and finally by name through the dynamic loader
//! (`LD_LIBRARY_PATH`, the ld cache). CUDA 13 and CUDA 12 are both found: in each place
//! `libnvrtc.so.13` is tried before `libnvrtc.so.12`, and the wheel layouts of both
//! (`nvidia/cu13/lib`, 13.x wheels; `nvidia/cuda_nvrtc/lib`, cu12 wheels) are searched. The
//! library found is called directly (not through cudarc's NVRTC loader, whose library names
//! follow the CUDA version its bindings were built for), so NVRTC 13 works in a build whose
//! cudarc has CUDA 12 bindings and the other way round.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::cache::{CacheHit, CacheKey, PtxCache};
use crate::{Arch, Error, KernelSource};

/// Names a `libnvrtc.so` to use ahead of every other place.
pub const NVRTC_LIB_ENV: &str = "SQUID_NVRTC_LIB";

/// The NVRTC file names tried in each directory, newest CUDA first.
const NVRTC_FILE_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// Where NVIDIA's PyPI wheels put NVRTC, relative to `site-packages`: the CUDA 13 wheels
/// (`nvidia-cuda-nvrtc` 13.x) share one `cu13` tree, the CUDA 12 ones (`-cu12`) have one per
/// component.
const WHEEL_LIB_DIRS: &[&str] = &["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"];

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
    // A toolkit root, or (CUDA_HOME pointed at a wheel install) `site-packages/nvidia/cu13`,
    // `site-packages/nvidia` or `site-packages` itself.
    let lib_dirs = ["lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "cu13/lib", "cuda_nvrtc/lib"];
    let mut dirs: Vec<PathBuf> =
        roots.iter().flat_map(|root| lib_dirs.iter().map(|d| root.join(d)).chain(wheel_dirs(root))).collect();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV").filter(|p| !p.is_empty()) {
        dirs.extend(site_packages(&PathBuf::from(venv)).iter().flat_map(|sp| wheel_dirs(sp)));
    }
    dirs.extend(["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"].map(PathBuf::from));
    for dir in dirs {
        out.extend(NVRTC_FILE_NAMES.iter().map(|name| dir.join(name)));
    }
    // Bare names: the dynamic loader's own search.
    out.extend(NVRTC_FILE_NAMES.iter().map(PathBuf::from));
    out
}

/// The wheel library directories under a `site-packages` directory.
fn wheel_dirs(site_packages: &std::path::Path) -> impl Iterator<Item = PathBuf> + '_ {
    WHEEL_LIB_DIRS.iter().map(move |d| site_packages.join(d))
}

/// `lib/python3.*/site-packages` under a Python environment.
fn site_packages(env: &std::path::Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(env.join("lib")) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages"))
        .collect();
    found.sort();
    found
}

/// The NVRTC library that was loaded (a path, or a bare name the loader resolved), once
/// [`nvrtc_version`] or a compilation has loaded one.
pub fn nvrtc_library() -> Option<PathBuf> {
    imp::loaded_library()
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
    let source = kernel.full_source();
    let key = cache_key(&source, options, nvrtc_version()?);
    let (text, hit) = cache.get_or_compile(key, || imp::compile_source(kernel.name, kernel.path, &source, options))?;
    Ok(Ptx {
        kernel: kernel.name,
        arch: options.arch,
        text,
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
        cache: hit,
    })
}

/// The key [`compile_cached`] files PTX under: the full source, the options and the version of
/// the NVRTC that compiles it (PTX from NVRTC 12 is never served to a process running NVRTC 13,
/// whose PTX ISA and code generation differ).
pub fn cache_key(full_source: &str, options: &CompileOptions, nvrtc: (i32, i32)) -> CacheKey {
    CacheKey::new(full_source, options.arch, &options.to_args(), &format!("nvrtc {}.{}", nvrtc.0, nvrtc.1))
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn loaded_library() -> Option<PathBuf> {
        None
    }

    pub fn version() -> Result<(i32, i32), Error> {
        Err(Error::CudaFeatureDisabled)
    }

    pub fn compile_source(_: &str, _: &str, _: &str, _: &CompileOptions) -> Result<String, Error> {
        Err(Error::CudaFeatureDisabled)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    //! NVRTC's C API called through the library squid found itself, in cudarc's layering:
    //! [`Api`] is the `sys` layer (the raw entry points, all of the `unsafe`), the free
    //! functions below it the `result` layer (status codes to `Result`, owned programs), and
    //! [`compile_source`] / [`version`] the safe one. Not going through cudarc's NVRTC loader
    //! keeps compilation independent of the CUDA version cudarc's bindings were built for, so
    //! NVRTC 12 and 13 both work whatever cudarc was built with.

    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::sync::OnceLock;

    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

    use super::*;

    type NvrtcResult = c_int;
    type Program = *mut c_void;

    /// The entry points squid uses; the library stays loaded for the life of the process.
    struct Api {
        version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
        error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
        create_program: unsafe extern "C" fn(
            *mut Program,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> NvrtcResult,
        compile_program: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
        program_log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
        program_log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
        ptx_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
        ptx: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
        destroy_program: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
        path: PathBuf,
    }

    impl Api {
        /// Opens `path` and resolves every entry point, or says which is missing.
        fn open(path: &std::path::Path) -> Result<Self, String> {
            preload_builtins_beside(path);
            // SAFETY: loading NVRTC runs its initialisers, which have no preconditions. It is
            // opened RTLD_GLOBAL so that any other loader in the process that asks for this
            // soname (cudarc's, a framework's) gets this same copy.
            let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
            macro_rules! sym {
                ($name:literal) => {
                    // SAFETY: the symbol is NVRTC's, and the field it is stored in has the
                    // signature nvrtc.h declares for it (identical in CUDA 11, 12 and 13).
                    *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                        .map_err(|e| format!("missing {}: {e}", $name))?
                };
            }
            let api = Self {
                version: sym!("nvrtcVersion"),
                error_string: sym!("nvrtcGetErrorString"),
                create_program: sym!("nvrtcCreateProgram"),
                compile_program: sym!("nvrtcCompileProgram"),
                program_log_size: sym!("nvrtcGetProgramLogSize"),
                program_log: sym!("nvrtcGetProgramLog"),
                ptx_size: sym!("nvrtcGetPTXSize"),
                ptx: sym!("nvrtcGetPTX"),
                destroy_program: sym!("nvrtcDestroyProgram"),
                path: path.to_path_buf(),
            };
            // The function pointers above stay valid because the library is never unloaded.
            std::mem::forget(lib);
            Ok(api)
        }

        /// `Err` with NVRTC's own name for a non-zero status.
        fn check(&self, call: &'static str, status: NvrtcResult) -> Result<(), Error> {
            if status == 0 {
                return Ok(());
            }
            // SAFETY: nvrtcGetErrorString takes any status and returns a static C string (or
            // null, handled below).
            let text = unsafe { (self.error_string)(status) };
            let message = if text.is_null() {
                format!("NVRTC status {status}")
            } else {
                // SAFETY: non-null, NUL-terminated and static, per nvrtc.h.
                format!("{} ({status})", unsafe { CStr::from_ptr(text) }.to_string_lossy())
            };
            Err(Error::Nvrtc { call, message })
        }
    }

    /// NVRTC opens its builtins library (`libnvrtc-builtins.so.X.Y`) by name when it compiles.
    /// The CUDA 13 wheels ship it beside `libnvrtc.so.13` without the `$ORIGIN` run path the
    /// toolkit and the cu12 wheels have, so it is loaded here first (`RTLD_GLOBAL`), and
    /// NVRTC's lookup by soname finds it. Nothing happens for a bare name or an empty directory.
    fn preload_builtins_beside(nvrtc: &std::path::Path) {
        let Some(dir) = nvrtc.parent().filter(|d| !d.as_os_str().is_empty()) else { return };
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("libnvrtc-builtins.so.") {
                // SAFETY: loading the builtins runs their initialisers, which have no
                // preconditions; they stay loaded (forgotten handle) for NVRTC to find.
                if let Ok(lib) = unsafe { Library::open(Some(entry.path()), RTLD_NOW | RTLD_GLOBAL) } {
                    std::mem::forget(lib);
                }
            }
        }
    }

    // SAFETY: the table holds plain function pointers into a library that is never unloaded;
    // NVRTC's API is thread-safe for distinct programs.
    unsafe impl Send for Api {}
    // SAFETY: as above.
    unsafe impl Sync for Api {}

    /// The first candidate that loads and has every entry point, or every place tried.
    fn api() -> Result<&'static Api, Error> {
        static API: OnceLock<Result<Api, Vec<String>>> = OnceLock::new();
        API.get_or_init(|| {
            let mut tried = Vec::new();
            for c in nvrtc_candidates() {
                let is_path = c.components().count() > 1;
                if is_path && !c.is_file() {
                    tried.push(c.display().to_string());
                    continue;
                }
                match Api::open(&c) {
                    Ok(api) => return Ok(api),
                    Err(e) => tried.push(format!("{} ({e})", c.display())),
                }
            }
            Err(tried)
        })
        .as_ref()
        .map_err(|tried| Error::NvrtcNotFound { tried: tried.clone() })
    }

    pub fn loaded_library() -> Option<PathBuf> {
        api().ok().map(|a| a.path.clone())
    }

    pub fn version() -> Result<(i32, i32), Error> {
        let api = api()?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both pointers are valid for writes.
        api.check("nvrtcVersion", unsafe { (api.version)(&mut major, &mut minor) })?;
        Ok((major, minor))
    }

    /// An NVRTC program, destroyed when dropped (on every path out of `compile_source`).
    struct OwnedProgram<'a> {
        api: &'a Api,
        handle: Program,
    }

    impl<'a> OwnedProgram<'a> {
        fn create(api: &'a Api, src: &CStr, name: &CStr) -> Result<Self, Error> {
            let mut handle: Program = std::ptr::null_mut();
            // SAFETY: `handle` is valid for writes; the strings are NUL-terminated and NVRTC
            // copies them; no headers are passed (count 0, null arrays).
            let status = unsafe {
                (api.create_program)(&mut handle, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null())
            };
            api.check("nvrtcCreateProgram", status)?;
            Ok(Self { api, handle })
        }

        /// Compiles with `options`; `Err` carries NVRTC's status, the log is read separately.
        fn compile(&self, options: &[CString]) -> Result<(), Error> {
            let ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
            let count = c_int::try_from(ptrs.len())
                .map_err(|_| Error::Nvrtc { call: "nvrtcCompileProgram", message: "too many options".into() })?;
            // SAFETY: the program is live; `ptrs` holds `count` NUL-terminated strings that
            // outlive the call.
            self.api
                .check("nvrtcCompileProgram", unsafe { (self.api.compile_program)(self.handle, count, ptrs.as_ptr()) })
        }

        /// Reads a size-then-text pair of NVRTC calls (the log, the PTX) into a `String`.
        fn text(
            &self,
            call: &'static str,
            size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
            read: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
        ) -> Result<String, Error> {
            let mut len = 0usize;
            // SAFETY: the program is live and `len` is valid for writes.
            self.api.check(call, unsafe { size(self.handle, &mut len) })?;
            let mut buf = vec![0u8; len.max(1)];
            // SAFETY: `buf` has room for the `len` bytes (NUL included) NVRTC just reported.
            self.api.check(call, unsafe { read(self.handle, buf.as_mut_ptr().cast()) })?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
        }

        fn log(&self) -> Result<String, Error> {
            self.text("nvrtcGetProgramLog", self.api.program_log_size, self.api.program_log)
        }

        fn ptx(&self) -> Result<String, Error> {
            self.text("nvrtcGetPTX", self.api.ptx_size, self.api.ptx)
        }
    }

    impl Drop for OwnedProgram<'_> {
        fn drop(&mut self) {
            // SAFETY: the handle came from nvrtcCreateProgram and is destroyed exactly once.
            let _ = unsafe { (self.api.destroy_program)(&mut self.handle) };
        }
    }

    pub fn compile_source(kernel: &str, path: &str, source: &str, options: &CompileOptions) -> Result<String, Error> {
        let api = api()?;
        let bad_text = |what: &str| Error::Compile {
            kernel: kernel.to_string(),
            arch: options.arch.to_string(),
            log: format!("the {what} contains a NUL byte"),
        };
        let src = CString::new(source).map_err(|_| bad_text("source"))?;
        let name = CString::new(path).map_err(|_| bad_text("file name"))?;
        let args = options
            .to_args()
            .into_iter()
            .map(CString::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad_text("option list"))?;
        let program = OwnedProgram::create(api, &src, &name)?;
        let compiled = program.compile(&args);
        let log = program.log().unwrap_or_default();
        if let Err(e) = compiled {
            let log = if log.trim().is_empty() { e.to_string() } else { log };
            return Err(Error::Compile { kernel: kernel.to_string(), arch: options.arch.to_string(), log });
        }
        program.ptx()
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

    #[test]
    fn cuda_13_is_looked_for_before_12_in_toolkits_and_wheels() {
        let c = nvrtc_candidates();
        let at = |p: &str| c.iter().position(|x| x == &PathBuf::from(p)).unwrap_or_else(|| panic!("{p} not tried"));
        assert!(at("/usr/local/cuda/lib64/libnvrtc.so.13") < at("/usr/local/cuda/lib64/libnvrtc.so.12"));
        assert!(at("libnvrtc.so.13") < at("libnvrtc.so.12"));
        // CUDA_HOME at a wheel install's site-packages (or its nvidia/cu13) finds both layouts.
        at("/opt/cuda/cu13/lib/libnvrtc.so.13");
        at("/usr/local/cuda/nvidia/cu13/lib/libnvrtc.so.13");
        at("/usr/local/cuda/nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
    }

    #[test]
    fn the_cache_key_changes_with_the_nvrtc_version() {
        let opts = CompileOptions::for_kernel(&crate::ops::axpy::KERNEL, Arch::SM80);
        let src = crate::ops::axpy::KERNEL.full_source();
        assert_eq!(cache_key(&src, &opts, (12, 8)), cache_key(&src, &opts, (12, 8)));
        assert_ne!(cache_key(&src, &opts, (12, 8)), cache_key(&src, &opts, (13, 0)));
        assert_ne!(cache_key(&src, &opts, (12, 8)), cache_key(&src, &opts, (12, 9)));
    }
}
