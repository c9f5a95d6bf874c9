//! The profile of a simulated launch: what the kernel asked of the machine (warp instructions
//! by class, memory requests, sectors, bank-conflict wavefronts, barriers, `cp.async` depth),
//! and from it an occupancy and a roofline **model** for A100 and H100. The counts are exact
//! for the simulated execution; the times are a model, never a measurement.

use crate::ir::{Op, Space};

/// The classes warp instructions are counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstClass {
    /// `mma.sync`
    Mma,
    /// `ldmatrix`
    Ldmatrix,
    /// `cp.async` and its commit/wait
    CpAsync,
    /// `ld`/`st` of global or const memory (generic addresses that resolve there too)
    GlobalMem,
    /// `ld`/`st` of shared memory
    SharedMem,
    /// `ld`/`st` of local and parameter memory
    LocalMem,
    /// `atom`/`red`
    Atomic,
    /// `shfl`, `vote`, `redux`, `match`, `bar.warp.sync`, `activemask`
    Shfl,
    /// `bar`/`barrier` (sync, arrive, red)
    Bar,
    /// `ex2 lg2 rcp rsqrt sqrt sin cos tanh` (the special-function unit's, in any mode)
    SpecialFn,
    /// float arithmetic, comparisons and conversions (f16, bf16, f32, f64)
    Float,
    /// integer arithmetic, logic, moves, address arithmetic, integer conversions
    Integer,
    /// `bra`, `call`, `ret`, `exit`, `trap`, no-ops
    Control,
}

impl InstClass {
    /// Every class, in table order.
    pub const ALL: [InstClass; 13] = [
        InstClass::Mma,
        InstClass::Ldmatrix,
        InstClass::CpAsync,
        InstClass::GlobalMem,
        InstClass::SharedMem,
        InstClass::LocalMem,
        InstClass::Atomic,
        InstClass::Shfl,
        InstClass::Bar,
        InstClass::SpecialFn,
        InstClass::Float,
        InstClass::Integer,
        InstClass::Control,
    ];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            InstClass::Mma => "mma",
            InstClass::Ldmatrix => "ldmatrix",
            InstClass::CpAsync => "cp.async",
            InstClass::GlobalMem => "global ld/st",
            InstClass::SharedMem => "shared ld/st",
            InstClass::LocalMem => "local/param ld/st",
            InstClass::Atomic => "atomic",
            InstClass::Shfl => "shfl/vote",
            InstClass::Bar => "bar",
            InstClass::SpecialFn => "special fn",
            InstClass::Float => "float",
            InstClass::Integer => "integer",
            InstClass::Control => "control",
        }
    }

    /// The class of an instruction (a generic `ld`/`st` counts as global unless it was seen
    /// to resolve to shared memory; see the caller).
    pub fn of(op: &Op) -> Self {
        match op {
            Op::Mma { .. } => InstClass::Mma,
            Op::Ldmatrix { .. } => InstClass::Ldmatrix,
            Op::CpAsync { .. } | Op::CpAsyncCommit | Op::CpAsyncWait { .. } => InstClass::CpAsync,
            Op::Ld { space, .. } | Op::St { space, .. } => match space {
                Space::Shared => InstClass::SharedMem,
                Space::Local | Space::Param => InstClass::LocalMem,
                _ => InstClass::GlobalMem,
            },
            Op::Atom { .. } => InstClass::Atomic,
            Op::Shfl(_) | Op::Vote(_) | Op::Redux(..) | Op::Match(..) | Op::WarpSync | Op::ActiveMask => {
                InstClass::Shfl
            }
            Op::Bar { .. } | Op::BarRed(_) => InstClass::Bar,
            Op::FFunc(..) => InstClass::SpecialFn,
            Op::FloatBin(..) | Op::Fma(..) | Op::FloatUn(..) | Op::HalfArith(..) | Op::HalfUn(..) => InstClass::Float,
            Op::Setp(_, _, ty, _) | Op::Set(_, _, _, ty, _) if ty.is_float() => InstClass::Float,
            Op::Cvt { dst, src, .. } if dst.is_float() || src.is_float() => InstClass::Float,
            Op::Bra | Op::Ret | Op::Exit | Op::Trap | Op::Nop | Op::Call { .. } => InstClass::Control,
            _ => InstClass::Integer,
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|&c| c == self).unwrap_or(0)
    }
}

/// What one simulated launch did, counted per warp instruction the way a GPU issues them:
/// lanes of a warp that execute the same instruction for the same time are one warp
/// instruction (a convergence model: the simulator runs threads one at a time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// The entry.
    pub kernel: String,
    /// Grid and block of the launch.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Shared memory per block: static plus dynamic bytes.
    pub shared_bytes_per_block: u64,
    /// Blocks run.
    pub blocks: u64,
    /// Instructions executed, summed over threads.
    pub thread_instructions: u64,
    /// Warp instructions by class ([`InstClass::ALL`] order).
    pub warp_instructions: [u64; 13],
    /// Active lanes summed over warp instructions (lanes whose guard was false included).
    pub active_lanes: u64,
    /// Floating-point operations of the `mma.sync` instructions (2 per multiply-add).
    pub tensor_flops: u64,
    /// Global load requests (warp-level `ld`, and the sources of `cp.async`).
    pub global_load_requests: u64,
    /// Global store requests (warp-level `st`).
    pub global_store_requests: u64,
    /// Bytes the lanes of those requests asked for.
    pub global_bytes_requested: u64,
    /// 32-byte sectors the requests touched (each request's distinct sectors, summed).
    pub global_sectors: u64,
    /// Distinct global bytes read by the launch (a lower bound on DRAM reads).
    pub unique_bytes_read: u64,
    /// Distinct global bytes written by the launch (a lower bound on DRAM writes).
    pub unique_bytes_written: u64,
    /// Shared-memory requests (`ld`/`st`, `ldmatrix`, the destinations of `cp.async`).
    pub shared_requests: u64,
    /// Wavefronts those requests take with 32 banks of 4 bytes (1 per request when there is
    /// no bank conflict and the request fits one wavefront).
    pub shared_wavefronts: u64,
    /// Bytes the shared requests moved.
    pub shared_bytes_requested: u64,
    /// The `ldmatrix` part of `shared_requests` and `shared_wavefronts` (4 wavefronts for a
    /// conflict-free `.x4`).
    pub ldmatrix_requests: u64,
    /// Wavefronts of the `ldmatrix` requests.
    pub ldmatrix_wavefronts: u64,
    /// Barriers completed, summed over blocks.
    pub barriers: u64,
    /// The most `cp.async` groups one thread had committed and not yet waited for.
    pub max_async_groups_in_flight: u32,
}

/// A GPU as the occupancy and roofline model see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuModel {
    /// Its name.
    pub name: &'static str,
    /// The target.
    pub arch: &'static str,
    /// Multiprocessors.
    pub sms: u32,
    /// The clock the rates below are at, in GHz.
    pub clock_ghz: f64,
    /// Dense f16/bf16 tensor-core FLOPs per clock per SM with `mma.sync`.
    pub mma_flops_per_clock_per_sm: f64,
    /// HBM bandwidth in bytes per second.
    pub dram_bytes_per_s: f64,
    /// Shared-memory wavefronts per clock per SM (32 banks x 4 bytes each).
    pub shared_wavefronts_per_clock_per_sm: f64,
    /// Warp instructions issued per clock per SM (one per scheduler).
    pub issue_per_clock_per_sm: f64,
    /// Resident warps per SM at most.
    pub max_warps_per_sm: u32,
    /// Resident blocks per SM at most.
    pub max_blocks_per_sm: u32,
    /// 32-bit registers per SM.
    pub registers_per_sm: u32,
    /// Shared memory per SM at the largest carve-out, in bytes.
    pub shared_per_sm: u64,
    /// Shared memory one block may have at most, in bytes.
    pub shared_per_block: u64,
}

/// A100 SXM4 80 GB: 108 SMs at 1.41 GHz, 1024 dense f16/bf16 FMA per clock per SM (312
/// TFLOPS), 2039 GB/s.
pub const A100: GpuModel = GpuModel {
    name: "A100 SXM4 80GB",
    arch: "sm_80",
    sms: 108,
    clock_ghz: 1.41,
    mma_flops_per_clock_per_sm: 2048.0,
    dram_bytes_per_s: 2039e9,
    shared_wavefronts_per_clock_per_sm: 1.0,
    issue_per_clock_per_sm: 4.0,
    max_warps_per_sm: 64,
    max_blocks_per_sm: 32,
    registers_per_sm: 65536,
    shared_per_sm: 164 * 1024,
    shared_per_block: 163 * 1024,
};

/// H100 SXM5: 132 SMs at 1.83 GHz, 3.35 TB/s. The dense bf16 peak (989 TFLOPS, 4096
/// FLOPs per clock per SM) is reached with `wgmma`; `mma.sync` is modelled at half of it
/// (an assumption of this model: the older instruction does not reach Hopper's peak).
pub const H100_SXM: GpuModel = GpuModel {
    name: "H100 SXM5",
    arch: "sm_90",
    sms: 132,
    clock_ghz: 1.83,
    mma_flops_per_clock_per_sm: 2048.0,
    dram_bytes_per_s: 3350e9,
    shared_wavefronts_per_clock_per_sm: 1.0,
    issue_per_clock_per_sm: 4.0,
    max_warps_per_sm: 64,
    max_blocks_per_sm: 32,
    registers_per_sm: 65536,
    shared_per_sm: 228 * 1024,
    shared_per_block: 227 * 1024,
};

/// Resident blocks and warps per SM by the CUDA occupancy rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Occupancy {
    /// Blocks resident per SM.
    pub blocks_per_sm: u32,
    /// Warps resident per SM.
    pub warps_per_sm: u32,
    /// `warps_per_sm / max_warps_per_sm`.
    pub fraction: f64,
    /// What limits it: `warps`, `blocks`, `registers` or `shared memory` (or `does not fit`).
    pub limiter: &'static str,
}

/// Occupancy of blocks of `threads` threads using `registers` registers per thread (as ptxas
/// reports them) and `shared_bytes` of shared memory per block (static plus dynamic):
/// registers are allocated per warp in units of 256 (per thread rounded up to 8), shared
/// memory in units of 128 bytes plus 1 KiB the system reserves per block.
pub fn occupancy(gpu: &GpuModel, threads: u32, registers: u32, shared_bytes: u64) -> Occupancy {
    let warps = threads.div_ceil(32).max(1);
    let by_warps = gpu.max_warps_per_sm / warps;
    let regs_per_warp = (registers.max(1).next_multiple_of(8) * 32).next_multiple_of(256);
    let by_regs = if registers > 255 { 0 } else { (gpu.registers_per_sm / regs_per_warp) / warps };
    let smem = (shared_bytes + 1024).next_multiple_of(128);
    let by_shared = if shared_bytes > gpu.shared_per_block { 0 } else { (gpu.shared_per_sm / smem) as u32 };
    let limits =
        [(by_warps, "warps"), (gpu.max_blocks_per_sm, "blocks"), (by_regs, "registers"), (by_shared, "shared memory")];
    let (blocks, mut limiter) = limits.iter().copied().min_by_key(|l| l.0).unwrap_or((0, "warps"));
    if blocks == 0 {
        limiter = "does not fit";
    }
    Occupancy {
        blocks_per_sm: blocks,
        warps_per_sm: blocks * warps,
        fraction: f64::from(blocks * warps) / f64::from(gpu.max_warps_per_sm),
        limiter,
    }
}

/// Lower bounds on the launch's time on one GPU, from each resource alone: a **model**.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roofline {
    /// Tensor-core FLOPs at the dense `mma.sync` rate.
    pub tensor_s: f64,
    /// Unique global bytes at HBM bandwidth.
    pub dram_s: f64,
    /// Shared-memory wavefronts at one per clock per SM.
    pub shared_s: f64,
    /// Warp instructions at the issue rate.
    pub issue_s: f64,
    /// The largest of the four.
    pub estimate_s: f64,
    /// Which one that is: `tensor`, `dram`, `shared` or `issue`.
    pub bound: &'static str,
    /// SMs the launch's blocks occupy (the block scheduler spreads blocks over idle SMs
    /// first, so fewer blocks than SMs leave some idle).
    pub sms_used: u32,
}

impl Profile {
    /// Warp instructions of every class.
    pub fn total_warp_instructions(&self) -> u64 {
        self.warp_instructions.iter().sum()
    }

    /// Warp instructions of one class.
    pub fn warp_instructions_of(&self, class: InstClass) -> u64 {
        self.warp_instructions[class.index()]
    }

    /// Mean active lanes per warp instruction (32 when no lane ever idles).
    pub fn lanes_per_warp_instruction(&self) -> f64 {
        self.active_lanes as f64 / self.total_warp_instructions().max(1) as f64
    }

    /// Mean 32-byte sectors per global request (4 for a coalesced 4-byte-per-lane access).
    pub fn sectors_per_request(&self) -> f64 {
        self.global_sectors as f64 / (self.global_load_requests + self.global_store_requests).max(1) as f64
    }

    /// Mean wavefronts per shared request (1 without bank conflicts).
    pub fn wavefronts_per_request(&self) -> f64 {
        self.shared_wavefronts as f64 / self.shared_requests.max(1) as f64
    }

    /// Barriers completed per block.
    pub fn barriers_per_block(&self) -> f64 {
        self.barriers as f64 / self.blocks.max(1) as f64
    }

    /// Threads per block.
    pub fn threads_per_block(&self) -> u32 {
        self.block.iter().product()
    }

    /// The roofline model on `gpu`: each resource's work at its full rate on the SMs the
    /// grid occupies. (Occupancy does not enter the bounds; it says how much latency the
    /// resident warps can hide, which the model does not estimate.)
    pub fn roofline(&self, gpu: &GpuModel) -> Roofline {
        let sms_used = self.blocks.clamp(1, u64::from(gpu.sms)) as u32;
        let per_s = f64::from(sms_used) * gpu.clock_ghz * 1e9;
        let tensor_s = self.tensor_flops as f64 / (gpu.mma_flops_per_clock_per_sm * per_s);
        let dram_s = (self.unique_bytes_read + self.unique_bytes_written) as f64 / gpu.dram_bytes_per_s;
        let shared_s = self.shared_wavefronts as f64 / (gpu.shared_wavefronts_per_clock_per_sm * per_s);
        let issue_s = self.total_warp_instructions() as f64 / (gpu.issue_per_clock_per_sm * per_s);
        let all = [(tensor_s, "tensor"), (dram_s, "dram"), (shared_s, "shared"), (issue_s, "issue")];
        let (estimate_s, bound) = all.iter().copied().fold((0.0, "issue"), |m, x| if x.0 > m.0 { x } else { m });
        Roofline { tensor_s, dram_s, shared_s, issue_s, estimate_s, bound, sms_used }
    }

    /// Adds another block's counts.
    pub(crate) fn merge(&mut self, o: &Profile) {
        self.blocks += o.blocks;
        self.thread_instructions += o.thread_instructions;
        for (a, b) in self.warp_instructions.iter_mut().zip(&o.warp_instructions) {
            *a += b;
        }
        self.active_lanes += o.active_lanes;
        self.tensor_flops += o.tensor_flops;
        self.global_load_requests += o.global_load_requests;
        self.global_store_requests += o.global_store_requests;
        self.global_bytes_requested += o.global_bytes_requested;
        self.global_sectors += o.global_sectors;
        self.shared_requests += o.shared_requests;
        self.shared_wavefronts += o.shared_wavefronts;
        self.shared_bytes_requested += o.shared_bytes_requested;
        self.ldmatrix_requests += o.ldmatrix_requests;
        self.ldmatrix_wavefronts += o.ldmatrix_wavefronts;
        self.barriers += o.barriers;
        self.max_async_groups_in_flight = self.max_async_groups_in_flight.max(o.max_async_groups_in_flight);
    }

    /// The counters as a table (one `name value` row each).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("  {k:<34} {v}\n"));
        row("kernel", self.kernel.clone());
        row("grid x block", format!("{:?} x {:?}", self.grid, self.block));
        row("shared memory per block", format!("{} bytes", self.shared_bytes_per_block));
        row("thread instructions", self.thread_instructions.to_string());
        row("warp instructions", self.total_warp_instructions().to_string());
        for c in InstClass::ALL {
            let n = self.warp_instructions_of(c);
            if n > 0 {
                row(&format!("  {}", c.name()), n.to_string());
            }
        }
        row("active lanes per warp instruction", format!("{:.2}", self.lanes_per_warp_instruction()));
        row("tensor FLOPs (mma.sync)", self.tensor_flops.to_string());
        row(
            "global requests (load / store)",
            format!("{} / {}", self.global_load_requests, self.global_store_requests),
        );
        row("global bytes requested", self.global_bytes_requested.to_string());
        row("global sectors (per request)", format!("{} ({:.2})", self.global_sectors, self.sectors_per_request()));
        row("unique bytes read / written", format!("{} / {}", self.unique_bytes_read, self.unique_bytes_written));
        row("shared requests", self.shared_requests.to_string());
        row(
            "shared wavefronts (per request)",
            format!("{} ({:.2})", self.shared_wavefronts, self.wavefronts_per_request()),
        );
        row("shared bytes requested", self.shared_bytes_requested.to_string());
        row("  of which ldmatrix (wavefronts)", format!("{} ({})", self.ldmatrix_requests, self.ldmatrix_wavefronts));
        row("barriers per block", format!("{:.1}", self.barriers_per_block()));
        row("cp.async groups in flight (max)", self.max_async_groups_in_flight.to_string());
        s
    }

    /// The counters as a JSON object.
    pub fn json(&self) -> String {
        let classes: Vec<String> =
            InstClass::ALL.iter().map(|c| format!("\"{}\": {}", c.name(), self.warp_instructions_of(*c))).collect();
        format!(
            "{{\"kernel\": \"{}\", \"grid\": {:?}, \"block\": {:?}, \"shared_bytes_per_block\": {}, \"blocks\": {}, \
             \"thread_instructions\": {}, \"warp_instructions\": {}, \"warp_instructions_by_class\": {{{}}}, \
             \"active_lanes_per_warp_instruction\": {:.4}, \"tensor_flops\": {}, \"global_load_requests\": {}, \
             \"global_store_requests\": {}, \"global_bytes_requested\": {}, \"global_sectors\": {}, \
             \"sectors_per_request\": {:.4}, \"unique_bytes_read\": {}, \"unique_bytes_written\": {}, \
             \"shared_requests\": {}, \"shared_wavefronts\": {}, \"wavefronts_per_request\": {:.4}, \
             \"shared_bytes_requested\": {}, \"ldmatrix_requests\": {}, \"ldmatrix_wavefronts\": {}, \
             \"barriers_per_block\": {:.4}, \"max_async_groups_in_flight\": {}}}",
            self.kernel.replace('"', "'"),
            self.grid,
            self.block,
            self.shared_bytes_per_block,
            self.blocks,
            self.thread_instructions,
            self.total_warp_instructions(),
            classes.join(", "),
            self.lanes_per_warp_instruction(),
            self.tensor_flops,
            self.global_load_requests,
            self.global_store_requests,
            self.global_bytes_requested,
            self.global_sectors,
            self.sectors_per_request(),
            self.unique_bytes_read,
            self.unique_bytes_written,
            self.shared_requests,
            self.shared_wavefronts,
            self.wavefronts_per_request(),
            self.shared_bytes_requested,
            self.ldmatrix_requests,
            self.ldmatrix_wavefronts,
            self.barriers_per_block(),
            self.max_async_groups_in_flight,
        )
    }
}

/// Wavefronts of one shared-memory request: lanes (in lane order) with their byte address
/// and size. Lanes are served in phases of 128 bytes (32 lanes of up to 4 bytes, 16 of 8,
/// 8 of 16); in each phase a bank serves one 4-byte word per wavefront, and lanes reading
/// the same word share it (broadcast).
pub fn shared_wavefronts(lanes: &[(u64, u32)]) -> u64 {
    let widest = lanes.iter().map(|l| l.1).max().unwrap_or(4).max(4);
    let per_phase = (128 / widest).max(1) as usize;
    let mut total = 0;
    let mut words: Vec<u64> = Vec::with_capacity(128);
    for phase in lanes.chunks(per_phase) {
        words.clear();
        for &(addr, bytes) in phase {
            let first = addr / 4;
            let last = (addr + u64::from(bytes.max(1)) - 1) / 4;
            words.extend(first..=last);
        }
        words.sort_unstable();
        words.dedup();
        let mut per_bank = [0u64; 32];
        for w in &words {
            per_bank[(w % 32) as usize] += 1;
        }
        total += per_bank.iter().copied().max().unwrap_or(0).max(1);
    }
    total
}

/// Distinct 32-byte sectors of one global request.
pub fn global_sectors(lanes: &[(u64, u32)]) -> u64 {
    let mut sectors: Vec<u64> = Vec::with_capacity(lanes.len() * 2);
    for &(addr, bytes) in lanes {
        sectors.extend(addr / 32..=(addr + u64::from(bytes.max(1)) - 1) / 32);
    }
    sectors.sort_unstable();
    sectors.dedup();
    sectors.len() as u64
}

/// One lane's memory access, recorded while a block runs and grouped into warp-level
/// requests when it ends.
#[derive(Clone, Copy)]
pub(crate) struct LaneAccess {
    /// 0 global load, 1 global store, 2 shared.
    pub kind: u8,
    pub warp: u32,
    pub pc: u32,
    /// The lane's execution count of this instruction (the same for the lanes of one warp
    /// instruction).
    pub occurrence: u32,
    pub lane: u32,
    pub addr: u64,
    pub bytes: u32,
}

/// A block's profile while it runs.
pub(crate) struct BlockProfile {
    /// Per thread, per instruction: times executed.
    pub counts: Vec<u32>,
    pub ninsts: usize,
    /// Generic `ld`/`st` seen to resolve to shared memory.
    pub pc_shared: Vec<bool>,
    pub accesses: Vec<LaneAccess>,
    pub out: Profile,
}

impl BlockProfile {
    pub fn new(threads: usize, ninsts: usize) -> Self {
        Self {
            counts: vec![0; threads * ninsts],
            ninsts,
            pc_shared: vec![false; ninsts],
            accesses: Vec::new(),
            out: Profile { blocks: 1, ..Profile::default() },
        }
    }

    /// Folds the per-lane counts into warp instructions and the lane accesses into requests.
    pub fn finish(mut self, insts: &[crate::ir::Inst], threads: usize) -> Profile {
        let n = self.ninsts;
        for w in 0..threads.div_ceil(32) {
            for (pc, inst) in insts.iter().enumerate().take(n) {
                let (mut max, mut sum) = (0u32, 0u64);
                for t in w * 32..(w * 32 + 32).min(threads) {
                    let c = self.counts[t * n + pc];
                    max = max.max(c);
                    sum += u64::from(c);
                }
                if max == 0 {
                    continue;
                }
                let mut class = InstClass::of(&inst.op);
                if self.pc_shared[pc] && class == InstClass::GlobalMem {
                    class = InstClass::SharedMem;
                }
                self.out.warp_instructions[class.index()] += u64::from(max);
                self.out.active_lanes += sum;
            }
        }
        let mut acc = std::mem::take(&mut self.accesses);
        acc.sort_unstable_by_key(|a| (a.kind, a.warp, a.pc, a.occurrence, a.lane));
        let mut lanes: Vec<(u64, u32)> = Vec::with_capacity(64);
        for req in acc.chunk_by(|a, b| (a.kind, a.warp, a.pc, a.occurrence) == (b.kind, b.warp, b.pc, b.occurrence)) {
            lanes.clear();
            lanes.extend(req.iter().map(|a| (a.addr, a.bytes)));
            let bytes: u64 = lanes.iter().map(|l| u64::from(l.1)).sum();
            match req[0].kind {
                2 => {
                    self.out.shared_requests += 1;
                    self.out.shared_wavefronts += shared_wavefronts(&lanes);
                    self.out.shared_bytes_requested += bytes;
                }
                k => {
                    if k == 0 {
                        self.out.global_load_requests += 1;
                    } else {
                        self.out.global_store_requests += 1;
                    }
                    self.out.global_sectors += global_sectors(&lanes);
                    self.out.global_bytes_requested += bytes;
                }
            }
        }
        self.out
    }
}
