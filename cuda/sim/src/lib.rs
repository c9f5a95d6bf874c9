#![doc = include_str!("../README.md")]

mod exec;
mod float;
pub mod ir;
mod lex;
mod memory;
mod parse;
pub mod profile;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;

pub use ir::Module;
pub use profile::{occupancy, GpuModel, InstClass, Occupancy, Profile, Roofline, A100, H100_SXM};

/// What the simulator can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PTX text could not be parsed.
    #[error("PTX parse error at line {line}: {message}")]
    Parse {
        /// 1-based line in the PTX text.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An instruction (or form of one) the simulator does not implement.
    #[error("unsupported PTX instruction `{instruction}` at line {line}")]
    Unsupported {
        /// The opcode as written, e.g. `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`.
        instruction: String,
        /// 1-based line in the PTX text.
        line: usize,
    },
    /// The launch request is wrong (unknown entry, argument count or sizes, dimensions).
    #[error("bad launch of `{kernel}`: {message}")]
    Launch {
        /// The entry.
        kernel: String,
        /// What is wrong.
        message: String,
    },
    /// A buffer handle that does not belong to this simulator, or a wrong element size.
    #[error("bad buffer: {0}")]
    Buffer(String),
    /// The kernel did something wrong while running (sanitizer finding, deadlock, trap...).
    #[error("{0}")]
    Fault(Box<Fault>),
}

/// A fault found while running a kernel, with where it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The entry.
    pub kernel: String,
    /// 1-based PTX line of the faulting instruction.
    pub line: usize,
    /// `%ctaid` of the block.
    pub block: [u32; 3],
    /// `%tid` of the thread.
    pub thread: [u32; 3],
    /// What went wrong.
    pub kind: FaultKind,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kernel `{}`, PTX line {}, block ({},{},{}), thread ({},{},{}): {}",
            self.kernel,
            self.line,
            self.block[0],
            self.block[1],
            self.block[2],
            self.thread[0],
            self.thread[1],
            self.thread[2],
            self.kind
        )
    }
}

/// The kinds of [`Fault`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultKind {
    /// An access outside every buffer the launch passed (global), outside the block's shared
    /// memory, or outside a thread's local memory / the parameter block.
    #[error("out-of-bounds {} in {space} memory: {detail}", if *write { "write" } else { "read" })]
    OutOfBounds {
        /// The state space.
        space: &'static str,
        /// A write (else a read).
        write: bool,
        /// Where, relative to the nearest buffer.
        detail: String,
    },
    /// An access not aligned to its size.
    #[error("misaligned access in {space} memory: address 0x{addr:x} is not a multiple of {align}")]
    Misaligned {
        /// The state space.
        space: &'static str,
        /// The address (in its space).
        addr: u64,
        /// The required alignment.
        align: u64,
    },
    /// Two threads touched the same shared bytes, at least one writing, with no barrier between.
    #[error("shared-memory race ({hazard}) at shared offset {offset} with thread ({},{},{}) at PTX line {other_line}", other_thread[0], other_thread[1], other_thread[2])]
    SharedRace {
        /// `read-after-write`, `write-after-read` or `write-after-write`.
        hazard: &'static str,
        /// Byte offset in shared memory.
        offset: u64,
        /// The other thread's `%tid`.
        other_thread: [u32; 3],
        /// The other access's PTX line.
        other_line: usize,
    },
    /// An access to the shared-memory destination of a `cp.async` before the
    /// `cp.async.wait_group`/`wait_all` of the issuing thread that covers the copy.
    #[error("{} of shared offset {offset}, the destination of a cp.async (PTX line {copy_line}) by thread ({},{},{}) that no cp.async.wait_group/wait_all has completed", if *write { "write" } else { "read" }, issuer[0], issuer[1], issuer[2])]
    AsyncCopyPending {
        /// A write (else a read).
        write: bool,
        /// Byte offset in shared memory.
        offset: u64,
        /// `%tid` of the thread that issued the copy.
        issuer: [u32; 3],
        /// PTX line of the `cp.async`.
        copy_line: usize,
    },
    /// Two threads of one launch touched the same global bytes, at least one writing, with no
    /// atomic and nothing ordering them (another block, or the same block without a barrier).
    #[error("global-memory race ({hazard}) at {detail} with block ({},{},{}) thread ({},{},{}) at PTX line {other_line}", other_block[0], other_block[1], other_block[2], other_thread[0], other_thread[1], other_thread[2])]
    GlobalRace {
        /// `read-after-write`, `write-after-read` or `write-after-write`.
        hazard: &'static str,
        /// The buffer and the byte offset in it.
        detail: String,
        /// The other access's `%ctaid`.
        other_block: [u32; 3],
        /// The other access's `%tid`.
        other_thread: [u32; 3],
        /// The other access's PTX line.
        other_line: usize,
    },
    /// A read of shared memory that no thread of the block has written.
    #[error("read of uninitialised shared memory at offset {offset}")]
    UninitShared {
        /// Byte offset in shared memory.
        offset: u64,
    },
    /// A barrier that cannot complete (threads exited or diverged), or a bad barrier.
    #[error("barrier error: {0}")]
    Barrier(String),
    /// A warp collective (`shfl.sync`, `vote.sync`, `bar.warp.sync`) that cannot complete or
    /// is used wrongly.
    #[error("warp collective error: {0}")]
    Collective(String),
    /// The launch ran more thread-instructions than its budget (an endless loop?); the whole
    /// launch stops at once.
    #[error("the launch's step budget of {limit} thread-instructions is exhausted (an endless loop?)")]
    StepBudget {
        /// The budget.
        limit: u64,
    },
    /// A thread nested more calls than the simulator allows (a runaway recursion).
    #[error("call depth limit of {limit} nested calls exceeded (runaway recursion?)")]
    CallDepth {
        /// The limit.
        limit: usize,
    },
    /// `trap` executed.
    #[error("trap")]
    Trap,
}

/// A device buffer handle (valid for the [`Simulator`] that made it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Buffer {
    id: usize,
    sim: usize,
}

/// One kernel argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// The raw bytes of a by-value parameter (e.g. a struct), exactly as the entry lays it out.
    Bytes(Vec<u8>),
    /// A pointer to the start of a buffer.
    Ptr(Buffer),
    /// A pointer `bytes` into a buffer.
    PtrOffset(Buffer, u64),
    /// `.u32`/`.s32`/`.b32`
    U32(u32),
    /// `.s32`
    I32(i32),
    /// `.u64`/`.b64`
    U64(u64),
    /// `.s64`
    I64(i64),
    /// `.f32`
    F32(f32),
    /// `.f64`
    F64(f64),
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Bytes of dynamic (`extern .shared`) shared memory.
    pub dynamic_shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch.
    pub fn linear(grid: u32, block: u32) -> Self {
        Self { grid: [grid, 1, 1], block: [block, 1, 1], dynamic_shared_bytes: 0 }
    }
}

/// What a launch did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaunchReport {
    /// Thread-instructions executed (each thread's executed instructions, summed).
    pub thread_instructions: u64,
    /// Blocks run.
    pub blocks: u64,
    /// Wall time of the launch in seconds.
    pub seconds: f64,
}

impl LaunchReport {
    /// Simulated thread-instructions per second.
    pub fn thread_instructions_per_second(&self) -> f64 {
        self.thread_instructions as f64 / self.seconds.max(1e-9)
    }
}

/// Options of a simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Thread-instructions one launch may execute (all its threads together) before
    /// [`FaultKind::StepBudget`] stops the whole launch.
    pub step_limit: u64,
    /// Track shared-memory races and uninitialised reads (costs memory and time).
    pub check_shared: bool,
    /// Track global-memory races between the threads of a launch (plain accesses; atomics
    /// are not tracked).
    pub check_global: bool,
    /// Run blocks on the rayon pool (else one after another).
    pub parallel_blocks: bool,
    /// Return the `.approx` functions' results (`ex2 lg2 rcp rsqrt sqrt sin cos tanh`, f32)
    /// moved to the edge of the error bound the PTX ISA states, in an input-dependent
    /// direction, instead of the nearly exact value: a kernel test that passes this way has a
    /// tolerance wide enough for any conforming GPU.
    pub approx_worst_case: bool,
    /// Count a [`Profile`] of every launch ([`Simulator::last_profile`]); off by default
    /// (when off it costs one branch per instruction).
    pub profile: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            step_limit: 1 << 32,
            check_shared: true,
            check_global: true,
            parallel_blocks: true,
            approx_worst_case: false,
            profile: false,
        }
    }
}

/// Local memory a thread may have (CUDA's limit, 512 KiB).
pub const MAX_LOCAL_BYTES: u64 = 512 * 1024;

/// Registers and local memory one simulated block may need (1 GiB): over it a launch is a
/// typed error instead of an allocation that could abort the process.
pub const MAX_BLOCK_STATE_BYTES: u64 = 1 << 30;

static NEXT_SIM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Parsed PTX modules plus device memory: the simulated device.
pub struct Simulator {
    modules: Vec<LoadedModule>,
    regions: Vec<Option<memory::Region>>,
    next_base: u64,
    id: usize,
    /// The options in force.
    pub options: Options,
    /// The profile of the last launch made with [`Options::profile`] on.
    last_profile: Mutex<Option<Profile>>,
}

/// One module and the memory of its `.global`/`.const` variables.
struct LoadedModule {
    module: Module,
    regions: Vec<memory::Region>,
}

impl Simulator {
    /// A device with no module loaded.
    pub fn empty() -> Self {
        Self {
            modules: Vec::new(),
            regions: Vec::new(),
            next_base: memory::GLOBAL_BASE,
            id: NEXT_SIM.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            options: Options::default(),
            last_profile: Mutex::new(None),
        }
    }

    /// A device with `ptx` loaded (see [`Simulator::load`]).
    pub fn new(ptx: &str) -> Result<Self, Error> {
        let mut sim = Self::empty();
        sim.load(ptx)?;
        Ok(sim)
    }

    /// Parses and loads one more module; every instruction is decoded now, so an unsupported
    /// one fails here. Entry names must be unique across the loaded modules.
    pub fn load(&mut self, ptx: &str) -> Result<(), Error> {
        // Each module's variables get their own 4 GiB window of addresses.
        let base = parse::MODULE_GLOBAL_BASE + ((self.modules.len() as u64) << 32);
        let module = parse::parse_module(ptx, base)?;
        if let Some(dup) = module.entries.keys().find(|e| self.find_entry(e).is_some()) {
            return Err(Error::Launch {
                kernel: dup.clone(),
                message: "an entry of this name is already loaded".into(),
            });
        }
        let regions = module
            .globals
            .iter()
            .map(|(space, v, addr)| {
                let bytes = v.init.clone().unwrap_or_else(|| vec![0; v.size as usize]);
                memory::region(*addr, &bytes, format!("module variable {}", v.name), *space == ir::Space::Const)
            })
            .collect();
        self.modules.push(LoadedModule { module, regions });
        Ok(())
    }

    fn find_entry(&self, name: &str) -> Option<(&LoadedModule, &ir::Function)> {
        self.modules.iter().find_map(|m| m.module.entries.get(name).map(|f| (m, f)))
    }

    /// The loaded modules.
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.iter().map(|m| &m.module)
    }

    /// The entry names of every loaded module, sorted.
    pub fn entries(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.modules().flat_map(|m| m.entries.keys().map(String::as_str)).collect();
        v.sort_unstable();
        v
    }

    /// The profile of the last launch run with [`Options::profile`] on (also of one that
    /// faulted: the blocks that finished).
    pub fn last_profile(&self) -> Option<Profile> {
        self.last_profile.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Copies `data` into a new device buffer.
    pub fn alloc<T: bytemuck::Pod>(&mut self, data: &[T]) -> Buffer {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let id = self.regions.len();
        let base = self.next_base;
        self.next_base = memory::next_base(base + bytes.len() as u64);
        self.regions.push(Some(memory::region(base, bytes, format!("buffer #{id}"), false)));
        Buffer { id, sim: self.id }
    }

    /// A new zero-filled buffer of `len` elements of `T`.
    pub fn alloc_zeroed<T: bytemuck::Pod>(&mut self, len: usize) -> Buffer {
        let bytes = vec![0u8; len * std::mem::size_of::<T>()];
        self.alloc(&bytes)
    }

    fn region(&self, b: Buffer) -> Result<&memory::Region, Error> {
        if b.sim != self.id {
            return Err(Error::Buffer("the buffer belongs to another simulator".into()));
        }
        self.regions
            .get(b.id)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Buffer(format!("buffer #{} was freed", b.id)))
    }

    /// Copies a buffer back to the host.
    pub fn read<T: bytemuck::Pod>(&self, b: Buffer) -> Result<Vec<T>, Error> {
        let bytes = self.region(b)?.to_vec();
        let size = std::mem::size_of::<T>();
        if size == 0 || bytes.len() % size != 0 {
            return Err(Error::Buffer(format!("{} bytes are not a whole number of {size}-byte elements", bytes.len())));
        }
        Ok(bytes.chunks_exact(size).map(bytemuck::pod_read_unaligned).collect())
    }

    /// Frees a buffer.
    pub fn free(&mut self, b: Buffer) -> Result<(), Error> {
        self.region(b)?;
        self.regions[b.id] = None;
        Ok(())
    }

    /// Runs `entry` over `config.grid` blocks of `config.block` threads. Global memory the
    /// kernel may touch: the buffers passed as pointer arguments and the module's variables.
    pub fn launch(&self, entry: &str, config: LaunchConfig, args: &[Arg]) -> Result<LaunchReport, Error> {
        let bad = |message: String| Error::Launch { kernel: entry.to_string(), message };
        let (loaded, f) = self
            .find_entry(entry)
            .ok_or_else(|| bad(format!("no entry named `{entry}` (loaded: {})", self.entries().join(", "))))?;
        let threads: u64 = config.block.iter().map(|&d| u64::from(d)).product();
        if threads == 0 || threads > 1024 || config.grid.contains(&0) {
            return Err(bad(format!(
                "grid {:?} x block {:?}: every dimension must be positive and a block at most 1024 threads",
                config.grid, config.block
            )));
        }
        if config.block[2] > 64 || config.grid[0] > i32::MAX as u32 || config.grid[1] > 65535 || config.grid[2] > 65535
        {
            return Err(bad(format!(
                "grid {:?} x block {:?}: CUDA allows grids up to (2^31-1, 65535, 65535) and a block z of 64",
                config.grid, config.block
            )));
        }
        let blocks_total: u64 = config.grid.iter().map(|&d| u64::from(d)).product();
        let threads_total = blocks_total * threads;
        if threads_total > self.options.step_limit {
            return Err(bad(format!(
                "{threads_total} threads ({blocks_total} blocks of {threads}) exceed the step budget of {} \
                 thread-instructions before each ran one (Options::step_limit)",
                self.options.step_limit
            )));
        }
        if f.local_bytes > MAX_LOCAL_BYTES {
            return Err(bad(format!(
                "{} bytes of local memory per thread exceed the CUDA limit of {MAX_LOCAL_BYTES}",
                f.local_bytes
            )));
        }
        let block_bytes = threads * (u64::from(f.num_regs) * 8 + f.local_bytes);
        if block_bytes > MAX_BLOCK_STATE_BYTES {
            return Err(bad(format!(
                "a block's registers and local memory ({threads} threads x ({} registers, {} local bytes)) \
                 need {block_bytes} bytes, over the simulator's limit of {MAX_BLOCK_STATE_BYTES}",
                f.num_regs, f.local_bytes
            )));
        }
        if let Some(m) = f.max_threads {
            if threads > u64::from(m) {
                return Err(bad(format!("block of {threads} threads exceeds the kernel's .maxntid/.reqntid {m}")));
            }
        }
        let shared_total = f.dynamic_shared_offset + u64::from(config.dynamic_shared_bytes);
        if shared_total > 228 * 1024 {
            return Err(bad(format!("{shared_total} bytes of shared memory exceed 228 KiB")));
        }
        if args.len() != f.params.len() {
            return Err(bad(format!("{} arguments given, the entry takes {}", args.len(), f.params.len())));
        }
        let mut params = vec![0u8; f.param_bytes as usize];
        let mut visible: Vec<&memory::Region> = loaded.regions.iter().collect();
        for (i, (arg, p)) in args.iter().zip(&f.params).enumerate() {
            let (bytes, size): ([u8; 8], u64) = match *arg {
                Arg::Bytes(ref raw) => {
                    if raw.len() as u64 != p.size {
                        return Err(bad(format!(
                            "argument {i} has {} bytes, the parameter {} is {} bytes",
                            raw.len(),
                            p.name,
                            p.size
                        )));
                    }
                    params[p.offset as usize..(p.offset + p.size) as usize].copy_from_slice(raw);
                    continue;
                }
                Arg::Ptr(b) | Arg::PtrOffset(b, _) => {
                    let r = self.region(b)?;
                    let off = if let Arg::PtrOffset(_, o) = *arg { o } else { 0 };
                    if !visible.iter().any(|v| std::ptr::eq(*v, r)) {
                        visible.push(r);
                    }
                    ((r.base + off).to_le_bytes(), 8)
                }
                Arg::U32(v) => (u64::from(v).to_le_bytes(), 4),
                Arg::I32(v) => ((v as u32 as u64).to_le_bytes(), 4),
                Arg::U64(v) => (v.to_le_bytes(), 8),
                Arg::I64(v) => (v.to_le_bytes(), 8),
                Arg::F32(v) => (u64::from(v.to_bits()).to_le_bytes(), 4),
                Arg::F64(v) => (v.to_bits().to_le_bytes(), 8),
            };
            if size != p.size {
                return Err(bad(format!(
                    "argument {i} ({}) is {size} bytes, the parameter {} is {} bytes",
                    kind(arg),
                    p.name,
                    p.size
                )));
            }
            params[p.offset as usize..(p.offset + size) as usize].copy_from_slice(&bytes[..size as usize]);
        }
        let global = memory::GlobalView::new(visible, self.options.check_global, self.options.profile);
        let profile = Mutex::new(Profile::default());
        let steps_used = AtomicU64::new(0);
        let abort = AtomicBool::new(false);
        // The first fault of any block; it stops every other block.
        let first_fault: Mutex<Option<Box<Fault>>> = Mutex::new(None);
        let ctx = exec::LaunchCtx {
            kernel: entry,
            f,
            grid: config.grid,
            block: config.block,
            dynamic_shared: u64::from(config.dynamic_shared_bytes),
            params: &params,
            global: &global,
            step_limit: self.options.step_limit,
            steps_used: &steps_used,
            abort: &abort,
            check_shared: self.options.check_shared,
            approx_worst_case: self.options.approx_worst_case,
            profile: self.options.profile,
        };
        let [gx, gy, _] = config.grid.map(u64::from);
        let start = Instant::now();
        let run = |i: u64| -> u64 {
            if abort.load(Ordering::Relaxed) {
                return 0;
            }
            let b = [(i % gx) as u32, ((i / gx) % gy) as u32, (i / (gx * gy)) as u32];
            match exec::Block::new(&ctx, b).run() {
                Ok((n, prof)) => {
                    if let Some(p) = prof {
                        profile.lock().unwrap_or_else(|p| p.into_inner()).merge(&p);
                    }
                    n
                }
                Err(f) => {
                    let mut first = first_fault.lock().unwrap_or_else(|p| p.into_inner());
                    if first.is_none() && !abort.load(Ordering::Relaxed) {
                        *first = Some(f);
                    }
                    abort.store(true, Ordering::Relaxed);
                    0
                }
            }
        };
        let total: u64 = if self.options.parallel_blocks {
            (0..blocks_total).into_par_iter().map(run).sum()
        } else {
            (0..blocks_total).map(run).sum()
        };
        let seconds = start.elapsed().as_secs_f64();
        if self.options.profile {
            let mut p = profile.into_inner().unwrap_or_else(|p| p.into_inner());
            p.kernel = entry.to_string();
            p.grid = config.grid;
            p.block = config.block;
            p.shared_bytes_per_block = f.dynamic_shared_offset + u64::from(config.dynamic_shared_bytes);
            (p.unique_bytes_read, p.unique_bytes_written) = global.unique_bytes();
            *self.last_profile.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
        }
        if let Some(f) = first_fault.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(Error::Fault(f));
        }
        Ok(LaunchReport { thread_instructions: total, blocks: blocks_total, seconds })
    }
}

fn kind(a: &Arg) -> &'static str {
    match a {
        Arg::Bytes(_) => "bytes",
        Arg::Ptr(_) | Arg::PtrOffset(..) => "a pointer",
        Arg::U32(_) => "u32",
        Arg::I32(_) => "i32",
        Arg::U64(_) => "u64",
        Arg::I64(_) => "i64",
        Arg::F32(_) => "f32",
        Arg::F64(_) => "f64",
    }
}
