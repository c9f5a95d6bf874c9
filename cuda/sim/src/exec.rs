//! Running one thread block: per-thread registers, thread-serial execution between
//! synchronisation points, barriers and warp collectives, and the sanitizer checks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::float::*;
use crate::ir::*;
use crate::memory::{Accessor, GlobalFault, GlobalView};
use crate::parse::{LOCAL_WINDOW, PARAM_WINDOW, SHARED_WINDOW, WINDOW_SIZE};
use crate::profile::{shared_wavefronts, BlockProfile, LaneAccess, Profile};
use crate::{Fault, FaultKind};

/// What every block of one launch shares.
pub struct LaunchCtx<'a> {
    /// Entry name.
    pub kernel: &'a str,
    /// The entry.
    pub f: &'a Function,
    /// Grid dimensions.
    pub grid: [u32; 3],
    /// Block dimensions.
    pub block: [u32; 3],
    /// Dynamic shared bytes.
    pub dynamic_shared: u64,
    /// The parameter block.
    pub params: &'a [u8],
    /// Global memory visible to the launch.
    pub global: &'a GlobalView<'a>,
    /// Thread-instructions the whole launch may execute.
    pub step_limit: u64,
    /// Thread-instructions executed so far by every block (flushed in batches).
    pub steps_used: &'a AtomicU64,
    /// Set when a block has faulted (or the budget ran out): every block stops.
    pub abort: &'a AtomicBool,
    /// Check shared-memory races and uninitialised reads.
    pub check_shared: bool,
    /// Push approximate results to the edge of the ISA's error bound.
    pub approx_worst_case: bool,
    /// Count what each block does for a [`Profile`].
    pub profile: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TState {
    Ready,
    AtBarrier(u32),
    AtCollective(u32),
    Exited,
}

/// Shadow state of one shared-memory byte for race and initialisation checks.
#[derive(Clone, Copy, Default)]
struct Shadow {
    init: bool,
    /// The destination of a `cp.async` that no wait has completed yet; `w_tid`/`w_line` name
    /// the issuing thread and the copy.
    pending: bool,
    /// Last writer + 1 (0: none), the block epoch and its warp's epoch at the write, the line.
    w_tid: u32,
    w_epoch: u32,
    w_wep: u32,
    w_line: u32,
    /// Last reader + 1, epochs, line; `r_multi`: 0 one thread, 1 several in one warp, 2 several warps.
    r_tid: u32,
    r_epoch: u32,
    r_wep: u32,
    r_line: u32,
    r_multi: u8,
}

#[derive(Clone)]
struct BarState {
    /// bar.red accumulator: operation, threads with c true, threads counted.
    red: (BarRedOp, u32, u32),
    expected: u32,
    arrived: u32,
    waiters: Vec<usize>,
}

/// Deepest call nesting a thread may reach before it is reported as a runaway recursion.
pub const MAX_CALL_DEPTH: usize = 4096;

/// One active call of a device function.
struct Frame {
    /// The `call` instruction.
    call_pc: u32,
    /// The caller's frame base in local memory.
    caller_base: u64,
}

/// Steps a block runs before it adds them to the launch's count (and looks for an abort).
const STEP_FLUSH: u64 = 4096;

/// One `cp.async` issued and not yet completed by a wait.
struct AsyncCopy {
    /// Shared-memory offset of the destination.
    dst: u32,
    /// Bytes (4, 8 or 16), the source bytes read at issue and zeros after `src-size`.
    len: u8,
    data: [u8; 16],
    /// The thread's group: groups are numbered by commit, the open one is the thread's count.
    group: u32,
    /// PTX line of the copy.
    line: u32,
}

enum Stop {
    Exit,
    Barrier,
    Collective,
}

/// One block's state.
pub struct Block<'a> {
    ctx: &'a LaunchCtx<'a>,
    ctaid: [u32; 3],
    n: usize,
    nregs: usize,
    reg_mask: Vec<u64>,
    regs: Vec<u64>,
    pc: Vec<u32>,
    state: Vec<TState>,
    steps: Vec<u64>,
    shared: Vec<u8>,
    shadow: Vec<Shadow>,
    /// Each thread's local memory: the entry's frame, then one frame per active call.
    local: Vec<Vec<u8>>,
    /// Each thread's current frame base in its local memory.
    frame_base: Vec<u64>,
    /// Each thread's active calls.
    frames: Vec<Vec<Frame>>,
    /// Each thread's saved register windows of the functions it is inside (one per call).
    saved: Vec<Vec<u64>>,
    epoch: u32,
    wepoch: Vec<u32>,
    bars: Vec<BarState>,
    queue: VecDeque<usize>,
    /// Steps not yet added to the launch's count.
    unflushed: u64,
    /// Each thread's copies in flight, and the number of its open `cp.async` group.
    async_copies: Vec<Vec<AsyncCopy>>,
    async_group: Vec<u32>,
    /// The profile's counters (profiling only).
    prof: Option<Box<BlockProfile>>,
}

type R<T> = Result<T, Box<Fault>>;

fn f32b(v: u64) -> f32 {
    f32::from_bits(v as u32)
}
fn b32f(x: f32) -> u64 {
    u64::from(x.to_bits())
}
fn f64b(v: u64) -> f64 {
    f64::from_bits(v)
}

impl<'a> Block<'a> {
    /// A fresh block.
    pub fn new(ctx: &'a LaunchCtx<'a>, ctaid: [u32; 3]) -> Self {
        let n = (ctx.block[0] * ctx.block[1] * ctx.block[2]) as usize;
        let nregs = ctx.f.num_regs as usize;
        let shared_bytes = (ctx.f.dynamic_shared_offset + ctx.dynamic_shared) as usize;
        Self {
            ctx,
            ctaid,
            n,
            nregs,
            reg_mask: ctx.f.reg_bits.iter().map(|&b| width_mask(b)).collect(),
            regs: vec![0; n * nregs],
            pc: vec![0; n],
            state: vec![TState::Ready; n],
            steps: vec![0; n],
            shared: vec![0; shared_bytes],
            shadow: if ctx.check_shared { vec![Shadow::default(); shared_bytes] } else { Vec::new() },
            local: vec![vec![0; ctx.f.local_bytes as usize]; n],
            frame_base: vec![0; n],
            frames: (0..n).map(|_| Vec::new()).collect(),
            saved: (0..n).map(|_| Vec::new()).collect(),
            epoch: 1,
            wepoch: vec![1; n.div_ceil(32)],
            bars: vec![BarState { red: (BarRedOp::Popc, 0, 0), expected: 0, arrived: 0, waiters: Vec::new() }; 16],
            queue: (0..n).collect(),
            unflushed: 0,
            async_copies: (0..n).map(|_| Vec::new()).collect(),
            async_group: vec![0; n],
            prof: ctx.profile.then(|| Box::new(BlockProfile::new(n, ctx.f.insts.len()))),
        }
    }

    fn tid3(&self, t: usize) -> [u32; 3] {
        let [bx, by, _] = self.ctx.block;
        let t = t as u32;
        [t % bx, (t / bx) % by, t / (bx * by)]
    }

    fn fault(&self, t: usize, kind: FaultKind) -> Box<Fault> {
        let pc = self.pc[t] as usize;
        let line = self.ctx.f.insts.get(pc).map_or(self.ctx.f.line, |i| i.line) as usize;
        Box::new(Fault { kernel: self.ctx.kernel.to_string(), line, block: self.ctaid, thread: self.tid3(t), kind })
    }

    /// Runs the block to completion; returns the instructions executed and, when profiling,
    /// the block's profile.
    pub fn run(mut self) -> R<(u64, Option<Profile>)> {
        if self.ctx.abort.load(Ordering::Relaxed) {
            return Err(self.fault(0, FaultKind::Trap));
        }
        while let Some(t) = self.queue.pop_front() {
            if self.state[t] != TState::Ready {
                continue;
            }
            match self.run_thread(t)? {
                Stop::Exit => {
                    self.state[t] = TState::Exited;
                    // The hardware completes a thread's copies in flight when it exits.
                    self.complete_async(t, u32::MAX);
                    self.on_exit(t)?;
                }
                Stop::Barrier | Stop::Collective => {}
            }
        }
        self.flush_steps(0)?;
        if let Some(t) = (0..self.n).find(|&t| self.state[t] != TState::Exited) {
            return Err(self.deadlock(t));
        }
        let steps = self.steps.iter().sum();
        let prof = self.prof.take().map(|p| {
            let mut out = p.finish(&self.ctx.f.insts, self.n);
            out.thread_instructions = steps;
            out.barriers = u64::from(self.epoch - 1);
            out
        });
        Ok((steps, prof))
    }

    /// Records one lane's `ld`/`st`/`cp.async` access for the profile.
    #[cold]
    fn record_access(&mut self, t: usize, space: Space, addr: u64, bytes: u64, write: bool) {
        let (sp, a) = self.resolve(space, addr);
        let pc = self.pc[t] as usize;
        let Some(p) = self.prof.as_mut() else { return };
        let kind = match sp {
            Space::Global | Space::Const | Space::Generic => {
                self.ctx.global.touch(a, bytes, write);
                u8::from(write)
            }
            Space::Shared => {
                if space == Space::Generic {
                    p.pc_shared[pc] = true;
                }
                2
            }
            _ => return,
        };
        p.accesses.push(LaneAccess {
            kind,
            warp: (t / 32) as u32,
            pc: pc as u32,
            occurrence: p.counts[t * p.ninsts + pc],
            lane: (t % 32) as u32,
            addr: a,
            bytes: bytes as u32,
        });
    }

    /// Adds the block's unflushed steps to the launch's count: the launch's budget exhausted
    /// is a fault of thread `t`; another block's fault stops this one (its result is unused).
    #[cold]
    fn flush_steps(&mut self, t: usize) -> R<()> {
        let k = std::mem::take(&mut self.unflushed);
        let used = self.ctx.steps_used.fetch_add(k, Ordering::Relaxed) + k;
        if used > self.ctx.step_limit {
            return Err(self.fault(t, FaultKind::StepBudget { limit: self.ctx.step_limit }));
        }
        if self.ctx.abort.load(Ordering::Relaxed) {
            return Err(self.fault(t, FaultKind::Trap));
        }
        Ok(())
    }

    fn deadlock(&self, t: usize) -> Box<Fault> {
        let exited = self.state.iter().filter(|s| **s == TState::Exited).count();
        let mut parts = Vec::new();
        for (id, b) in self.bars.iter().enumerate() {
            if b.arrived > 0 {
                parts.push(format!("barrier {id}: {} of {} threads arrived", b.arrived, b.expected));
            }
        }
        let at_coll = self.state.iter().filter(|s| matches!(s, TState::AtCollective(_))).count();
        if at_coll > 0 {
            parts.push(format!("{at_coll} threads wait at warp collectives whose other lanes never arrive"));
        }
        if exited > 0 {
            parts.push(format!("{exited} threads had exited"));
        }
        let kind = FaultKind::Barrier(format!("the block cannot make progress: {}", parts.join("; ")));
        let mut f = self.fault(t, kind);
        // Point at the instruction the thread waits on (pc was advanced past a barrier).
        if let TState::AtBarrier(_) = self.state[t] {
            let pc = self.pc[t].saturating_sub(1) as usize;
            f.line = self.ctx.f.insts.get(pc).map_or(f.line, |i| i.line as usize);
        }
        f
    }

    #[inline]
    fn rd(&self, t: usize, o: &Operand) -> u64 {
        match o {
            Operand::Reg(r) => self.regs[t * self.nregs + *r as usize],
            Operand::Imm(v) => *v,
            Operand::Special(s) => self.special(t, *s),
            Operand::Frame(o) => self.frame_base[t] + o,
            // A one-element vector in a predicate position is `!p`.
            Operand::Vec(v) if v.len() == 1 => u64::from(self.rd(t, &v[0]) == 0),
            _ => 0,
        }
    }

    #[inline]
    fn wr(&mut self, t: usize, o: &Operand, v: u64) {
        if let Operand::Reg(r) = o {
            let r = *r as usize;
            self.regs[t * self.nregs + r] = v & self.reg_mask[r];
        }
    }

    fn special(&self, t: usize, s: Special) -> u64 {
        let ctx = self.ctx;
        let lane = (t % 32) as u32;
        u64::from(match s {
            Special::Tid(d) => self.tid3(t)[d as usize],
            Special::Ntid(d) => ctx.block[d as usize],
            Special::Ctaid(d) => self.ctaid[d as usize],
            Special::Nctaid(d) => ctx.grid[d as usize],
            Special::LaneId => lane,
            Special::WarpId => (t / 32) as u32,
            Special::NWarpId => self.n.div_ceil(32) as u32,
            Special::LaneMask(k) => {
                let eq = 1u32 << lane;
                match k {
                    0 => eq,
                    1 => eq | (eq - 1),
                    2 => eq - 1,
                    3 => !(eq - 1),
                    _ => !(eq | (eq - 1)),
                }
            }
            Special::Zero => 0,
            Special::Clock => return self.steps[t],
            Special::DynamicSmem => ctx.dynamic_shared as u32,
            Special::TotalSmem => (ctx.f.dynamic_shared_offset + ctx.dynamic_shared) as u32,
        })
    }

    fn addr(&self, t: usize, o: &Operand) -> u64 {
        match o {
            Operand::Addr(a) => {
                let base = match a.base {
                    AddrBase::Reg(r) => self.regs[t * self.nregs + r as usize],
                    AddrBase::Abs(v) => v,
                    AddrBase::Frame(o) => self.frame_base[t] + o,
                };
                base.wrapping_add(a.offset as u64)
            }
            o => self.rd(t, o),
        }
    }

    fn resolve(&self, space: Space, addr: u64) -> (Space, u64) {
        if space != Space::Generic {
            return (space, addr);
        }
        if (SHARED_WINDOW..SHARED_WINDOW + WINDOW_SIZE).contains(&addr) {
            (Space::Shared, addr - SHARED_WINDOW)
        } else if (LOCAL_WINDOW..LOCAL_WINDOW + WINDOW_SIZE).contains(&addr) {
            (Space::Local, addr - LOCAL_WINDOW)
        } else if (PARAM_WINDOW..PARAM_WINDOW + WINDOW_SIZE).contains(&addr) {
            (Space::Param, addr - PARAM_WINDOW)
        } else {
            (Space::Global, addr)
        }
    }

    fn global_fault(&self, t: usize, space: Space, e: GlobalFault, write: bool) -> Box<Fault> {
        let kind = match e {
            GlobalFault::OutOfBounds(detail) => FaultKind::OutOfBounds { space: space.name(), write, detail },
            GlobalFault::ReadOnly(label) => {
                FaultKind::OutOfBounds { space: space.name(), write, detail: format!("write to read-only {label}") }
            }
        };
        self.fault(t, kind)
    }

    fn check_align(&self, t: usize, space: Space, addr: u64, align: u64) -> R<()> {
        if addr % align != 0 {
            return Err(self.fault(t, FaultKind::Misaligned { space: space.name(), addr, align }));
        }
        Ok(())
    }

    fn shared_range(&self, t: usize, off: u64, size: u64, write: bool) -> R<usize> {
        if off.checked_add(size).is_none_or(|e| e > self.shared.len() as u64) {
            return Err(self.fault(
                t,
                FaultKind::OutOfBounds {
                    space: "shared",
                    write,
                    detail: format!(
                        "{size} bytes at offset {off} of {} bytes of shared memory ({} static, {} dynamic)",
                        self.shared.len(),
                        self.ctx.f.dynamic_shared_offset,
                        self.ctx.dynamic_shared
                    ),
                },
            ));
        }
        Ok(off as usize)
    }

    fn check_shared_read(&mut self, t: usize, off: usize, size: usize) -> R<()> {
        if !self.ctx.check_shared {
            return Ok(());
        }
        let line = self.ctx.f.insts[self.pc[t] as usize].line;
        let w = t / 32;
        let (e, we) = (self.epoch, self.wepoch[w]);
        for i in off..off + size {
            let s = self.shadow[i];
            if s.pending {
                return Err(self.pending_fault(t, i, s, false));
            }
            if !s.init {
                return Err(self.fault(t, FaultKind::UninitShared { offset: i as u64 }));
            }
            if s.w_tid != 0 && s.w_tid - 1 != t as u32 && s.w_epoch == e {
                let wt = (s.w_tid - 1) as usize;
                if wt / 32 != w || s.w_wep == we {
                    return Err(self.race(t, "read-after-write", wt, s.w_line, i));
                }
            }
            let s = &mut self.shadow[i];
            if s.r_tid == 0 || s.r_epoch != e {
                *s = Shadow { r_tid: t as u32 + 1, r_epoch: e, r_wep: we, r_line: line, r_multi: 0, ..*s };
            } else if s.r_tid - 1 != t as u32 {
                let rw = (s.r_tid - 1) as usize / 32;
                s.r_multi = if rw != w { 2 } else { s.r_multi.max(1) };
                if s.r_multi < 2 {
                    s.r_wep = we;
                }
                s.r_tid = t as u32 + 1;
                s.r_line = line;
            }
        }
        Ok(())
    }

    fn check_shared_write(&mut self, t: usize, off: usize, size: usize) -> R<()> {
        if !self.ctx.check_shared {
            return Ok(());
        }
        let line = self.ctx.f.insts[self.pc[t] as usize].line;
        let w = t / 32;
        let (e, we) = (self.epoch, self.wepoch[w]);
        for i in off..off + size {
            let s = self.shadow[i];
            if s.pending {
                return Err(self.pending_fault(t, i, s, true));
            }
            if s.w_tid != 0 && s.w_tid - 1 != t as u32 && s.w_epoch == e {
                let wt = (s.w_tid - 1) as usize;
                if wt / 32 != w || s.w_wep == we {
                    return Err(self.race(t, "write-after-write", wt, s.w_line, i));
                }
            }
            if s.r_tid != 0 && s.r_epoch == e {
                let rt = (s.r_tid - 1) as usize;
                let hazard = match s.r_multi {
                    2 => true,
                    _ if rt / 32 != w => true,
                    m => (rt != t || m == 1) && s.r_wep == we,
                };
                if hazard {
                    return Err(self.race(t, "write-after-read", rt, s.r_line, i));
                }
            }
            self.shadow[i] =
                Shadow { init: true, w_tid: t as u32 + 1, w_epoch: e, w_wep: we, w_line: line, ..Shadow::default() };
        }
        Ok(())
    }

    fn pending_fault(&self, t: usize, offset: usize, s: Shadow, write: bool) -> Box<Fault> {
        self.fault(
            t,
            FaultKind::AsyncCopyPending {
                write,
                offset: offset as u64,
                issuer: self.tid3((s.w_tid - 1) as usize),
                copy_line: s.w_line as usize,
            },
        )
    }

    fn race(&self, t: usize, hazard: &'static str, other: usize, other_line: u32, offset: usize) -> Box<Fault> {
        self.fault(
            t,
            FaultKind::SharedRace {
                hazard,
                offset: offset as u64,
                other_thread: self.tid3(other),
                other_line: other_line as usize,
            },
        )
    }

    fn load(&mut self, t: usize, space: Space, addr: u64, size: u64) -> R<u64> {
        let (space, a) = self.resolve(space, addr);
        self.check_align(t, space, a, size)?;
        match space {
            Space::Global | Space::Const | Space::Generic => {
                let v = self.ctx.global.load(a, size).map_err(|e| self.global_fault(t, space, e, false))?;
                if self.ctx.global.checks_races() {
                    self.check_global_race(t, a, size, false)?;
                }
                Ok(v)
            }
            Space::Shared => {
                let off = self.shared_range(t, a, size, false)?;
                self.check_shared_read(t, off, size as usize)?;
                Ok(le(&self.shared[off..off + size as usize]))
            }
            Space::Local => {
                let len = self.local[t].len() as u64;
                if a.checked_add(size).is_none_or(|e| e > len) {
                    return Err(self.oob(t, "local", false, a, size, len));
                }
                Ok(le(&self.local[t][a as usize..(a + size) as usize]))
            }
            Space::Param => {
                let p = self.ctx.params;
                if a.checked_add(size).is_none_or(|e| e > p.len() as u64) {
                    return Err(self.oob(t, "param", false, a, size, p.len() as u64));
                }
                Ok(le(&p[a as usize..(a + size) as usize]))
            }
        }
    }

    fn check_global_race(&self, t: usize, addr: u64, size: u64, write: bool) -> R<()> {
        let [gx, gy, _] = self.ctx.grid.map(u64::from);
        let [bx, by, bz] = self.ctaid.map(u64::from);
        let who = Accessor::new(bx + gx * (by + gy * bz), t, self.epoch);
        let line = self.ctx.f.insts[self.pc[t] as usize].line;
        self.ctx.global.check_race(addr, size, write, who, line).map_err(|r| {
            let b = r.other.block();
            let other_block = [(b % gx) as u32, ((b / gx) % gy) as u32, (b / (gx * gy)) as u32];
            self.fault(
                t,
                FaultKind::GlobalRace {
                    hazard: r.hazard,
                    detail: r.detail,
                    other_block,
                    other_thread: self.tid3(r.other.thread()),
                    other_line: r.other_line as usize,
                },
            )
        })
    }

    fn oob(&self, t: usize, space: &'static str, write: bool, a: u64, size: u64, len: u64) -> Box<Fault> {
        self.fault(
            t,
            FaultKind::OutOfBounds { space, write, detail: format!("{size} bytes at offset {a} of {len} bytes") },
        )
    }

    fn store(&mut self, t: usize, space: Space, addr: u64, size: u64, v: u64) -> R<()> {
        let (space, a) = self.resolve(space, addr);
        self.check_align(t, space, a, size)?;
        match space {
            Space::Global | Space::Generic => {
                self.ctx.global.store(a, size, v).map_err(|e| self.global_fault(t, space, e, true))?;
                if self.ctx.global.checks_races() {
                    self.check_global_race(t, a, size, true)?;
                }
                Ok(())
            }
            Space::Shared => {
                let off = self.shared_range(t, a, size, true)?;
                self.check_shared_write(t, off, size as usize)?;
                put_le(&mut self.shared[off..off + size as usize], v);
                Ok(())
            }
            Space::Local => {
                let len = self.local[t].len() as u64;
                if a.checked_add(size).is_none_or(|e| e > len) {
                    return Err(self.oob(t, "local", true, a, size, len));
                }
                put_le(&mut self.local[t][a as usize..(a + size) as usize], v);
                Ok(())
            }
            Space::Const | Space::Param => Err(self.fault(
                t,
                FaultKind::OutOfBounds {
                    space: space.name(),
                    write: true,
                    detail: "a store to a read-only space".into(),
                },
            )),
        }
    }

    fn run_thread(&mut self, t: usize) -> R<Stop> {
        let f: &'a Function = self.ctx.f;
        let base = t * self.nregs;
        loop {
            let pc = self.pc[t] as usize;
            let Some(inst) = f.insts.get(pc) else {
                return Ok(Stop::Exit);
            };
            self.steps[t] += 1;
            self.unflushed += 1;
            if let Some(p) = self.prof.as_mut() {
                p.counts[t * p.ninsts + pc] += 1;
            }
            if self.unflushed >= STEP_FLUSH {
                self.flush_steps(t)?;
            }
            if let Some((p, neg)) = inst.guard {
                if (self.regs[base + p as usize] != 0) == neg {
                    self.pc[t] += 1;
                    continue;
                }
            }
            let a = &inst.args;
            match &inst.op {
                Op::Mov(ty) => self.exec_mov(t, *ty, a),
                Op::Ld { space, ty } => {
                    let addr = self.addr(t, &a[1]);
                    let esz = ty.bytes();
                    let vec = u64::from(inst.vec);
                    if self.prof.is_some() {
                        self.record_access(t, *space, addr, esz * vec, false);
                    }
                    if vec > 1 {
                        let (sp, at) = self.resolve(*space, addr);
                        self.check_align(t, sp, at, esz * vec)?;
                    }
                    for i in 0..vec {
                        let v = self.load(t, *space, addr.wrapping_add(i * esz), esz)?;
                        let v = if ty.is_signed() { sext(v, ty.bits()) as u64 } else { v };
                        let d = match &a[0] {
                            Operand::Vec(v) => &v[i as usize],
                            d => d,
                        };
                        self.wr(t, d, v);
                    }
                }
                Op::St { space, ty } => {
                    let addr = self.addr(t, &a[0]);
                    let esz = ty.bytes();
                    let vec = u64::from(inst.vec);
                    if self.prof.is_some() {
                        self.record_access(t, *space, addr, esz * vec, true);
                    }
                    if vec > 1 {
                        let (sp, at) = self.resolve(*space, addr);
                        self.check_align(t, sp, at, esz * vec)?;
                    }
                    for i in 0..vec {
                        let s = match &a[1] {
                            Operand::Vec(v) => &v[i as usize],
                            s => s,
                        };
                        let v = self.rd(t, s) & ty.mask();
                        self.store(t, *space, addr.wrapping_add(i * esz), esz, v)?;
                    }
                }
                Op::Cvta { to, space } => {
                    let v = self.rd(t, &a[1]);
                    let win = match space {
                        Space::Shared => SHARED_WINDOW,
                        Space::Local => LOCAL_WINDOW,
                        Space::Param => PARAM_WINDOW,
                        _ => 0,
                    };
                    let r = if *to { v.wrapping_sub(win) } else { v.wrapping_add(win) };
                    self.wr(t, &a[0], r);
                }
                Op::IntBin(op, ty, sat) => {
                    let x = self.rd(t, &a[1]);
                    let y = self.rd(t, &a[2]);
                    let r = int_bin(*op, *ty, *sat, x, y);
                    self.wr(t, &a[0], r);
                }
                Op::IntMad(op, ty) => {
                    let x = self.rd(t, &a[1]);
                    let y = self.rd(t, &a[2]);
                    let z = self.rd(t, &a[3]);
                    let p = int_bin(*op, *ty, false, x, y);
                    let bits = if *op == BinOp::MulWide { ty.bits() * 2 } else { ty.bits() };
                    self.wr(t, &a[0], p.wrapping_add(z) & width_mask(bits));
                }
                Op::FloatBin(op, ty, m) => {
                    let x = self.rd(t, &a[1]);
                    let y = self.rd(t, &a[2]);
                    let mut r = float_bin(*op, *ty, *m, x, y);
                    // div.approx / div.full (f32 without a rounding mode): 2 ulp in the ISA.
                    if self.ctx.approx_worst_case && *op == BinOp::Div && *ty == Ty::F32 && m.rnd.is_none() {
                        let q = f64::from(f32b(r));
                        let up = (x as u32 ^ (y as u32).rotate_left(7)).wrapping_mul(0x9e37_79b9) >> 31 == 1;
                        if q.is_finite() && q != 0.0 {
                            let d = 0.9 * q.abs() * 2f64.powi(-22);
                            r = b32f((if up { q + d } else { q - d }) as f32);
                        }
                    }
                    self.wr(t, &a[0], r);
                }
                Op::Fma(ty, m) => {
                    let (x, y, z) = (self.rd(t, &a[1]), self.rd(t, &a[2]), self.rd(t, &a[3]));
                    let rnd = m.rnd.unwrap_or(Rnd::Rn);
                    let r = if *ty == Ty::F32 {
                        let fl = |v| if m.ftz { ftz32(f32b(v)) } else { f32b(v) };
                        b32f(post32(fma32(fl(x), fl(y), fl(z), rnd), m))
                    } else {
                        // f64: exact for .rn; directed modes use the nearest result (documented).
                        let r = f64b(x).mul_add(f64b(y), f64b(z));
                        post64(r, m).to_bits()
                    };
                    self.wr(t, &a[0], r);
                }
                Op::IntUn(op, ty) => {
                    let x = self.rd(t, &a[1]);
                    self.wr(t, &a[0], int_un(*op, *ty, x));
                }
                Op::FloatUn(op, ty, m) => {
                    let x = self.rd(t, &a[1]);
                    let r = if *ty == Ty::F32 {
                        let v = if m.ftz { ftz32(f32b(x)) } else { f32b(x) };
                        b32f(if *op == UnOp::Neg { -v } else { v.abs() })
                    } else {
                        let v = f64b(x);
                        (if *op == UnOp::Neg { -v } else { v.abs() }).to_bits()
                    };
                    self.wr(t, &a[0], r);
                }
                Op::FFunc(func, ty, m) => {
                    let x = self.rd(t, &a[1]);
                    let r = ffunc(*func, *ty, *m, x);
                    let r = if self.ctx.approx_worst_case && m.rnd.is_none() && *ty == Ty::F32 {
                        let xin = if m.ftz { ftz32(f32b(x)) } else { f32b(x) };
                        b32f(worst_case(*func, xin, f32b(r), m.ftz))
                    } else {
                        r
                    };
                    self.wr(t, &a[0], r);
                }
                Op::Setp(cmp, bop, ty, ftz) => {
                    let r = compare(*cmp, *ty, *ftz, self.rd(t, &a[1]), self.rd(t, &a[2]));
                    let (p, q) = match bop {
                        Some(b) => {
                            let c = self.rd(t, &a[3]) != 0;
                            (boolop(*b, r, c), boolop(*b, !r, c))
                        }
                        None => (r, !r),
                    };
                    self.wr(t, &a[0], u64::from(p));
                    if let Some(pd) = inst.pdst {
                        self.wr(t, &Operand::Reg(pd), u64::from(q));
                    }
                }
                Op::Set(cmp, bop, dty, sty, ftz) => {
                    let mut r = compare(*cmp, *sty, *ftz, self.rd(t, &a[1]), self.rd(t, &a[2]));
                    if let Some(b) = bop {
                        r = boolop(*b, r, self.rd(t, &a[3]) != 0);
                    }
                    let v = match dty {
                        Ty::F32 => b32f(if r { 1.0 } else { 0.0 }),
                        t => {
                            if r {
                                t.mask()
                            } else {
                                0
                            }
                        }
                    };
                    self.wr(t, &a[0], v);
                }
                Op::Selp(_) => {
                    let v = if self.rd(t, &a[3]) != 0 { self.rd(t, &a[1]) } else { self.rd(t, &a[2]) };
                    self.wr(t, &a[0], v);
                }
                Op::Cvt { dst, src, mods } => {
                    let x = self.rd(t, &a[1]);
                    let r = if matches!(dst, Ty::F16x2 | Ty::Bf16x2) {
                        let y = self.rd(t, &a[2]);
                        let h = if *dst == Ty::F16x2 { Ty::F16 } else { Ty::Bf16 };
                        (cvt(h, Ty::F32, *mods, x) << 16) | cvt(h, Ty::F32, *mods, y)
                    } else {
                        cvt(*dst, *src, *mods, x)
                    };
                    self.wr(t, &a[0], r);
                }
                Op::Bfe(ty) => {
                    let r =
                        bfe(*ty, self.rd(t, &a[1]), self.rd(t, &a[2]) as u32 & 0xff, self.rd(t, &a[3]) as u32 & 0xff);
                    self.wr(t, &a[0], r);
                }
                Op::Bfi(ty) => {
                    let bits = ty.bits();
                    let (fv, bv) = (self.rd(t, &a[1]), self.rd(t, &a[2]));
                    let pos = self.rd(t, &a[3]) as u32 & 0xff;
                    let len = self.rd(t, &a[4]) as u32 & 0xff;
                    let mut r = bv;
                    for i in 0..len {
                        if pos + i >= bits {
                            break;
                        }
                        let bit = (fv >> i) & 1;
                        r = (r & !(1 << (pos + i))) | (bit << (pos + i));
                    }
                    self.wr(t, &a[0], r & ty.mask());
                }
                Op::Prmt => {
                    let (x, y, c) = (self.rd(t, &a[1]), self.rd(t, &a[2]), self.rd(t, &a[3]));
                    let tmp = (x & 0xffff_ffff) | ((y & 0xffff_ffff) << 32);
                    let mut r = 0u64;
                    for i in 0..4 {
                        let sel = (c >> (4 * i)) & 0xf;
                        let mut byte = (tmp >> (8 * (sel & 7))) & 0xff;
                        if sel & 8 != 0 {
                            byte = if byte & 0x80 != 0 { 0xff } else { 0 };
                        }
                        r |= byte << (8 * i);
                    }
                    self.wr(t, &a[0], r);
                }
                Op::Lop3 => {
                    let (x, y, z, lut) = (self.rd(t, &a[1]), self.rd(t, &a[2]), self.rd(t, &a[3]), self.rd(t, &a[4]));
                    let mut r = 0u64;
                    for i in 0..8u64 {
                        if lut & (1 << i) != 0 {
                            let mx = if i & 4 != 0 { x } else { !x };
                            let my = if i & 2 != 0 { y } else { !y };
                            let mz = if i & 1 != 0 { z } else { !z };
                            r |= mx & my & mz;
                        }
                    }
                    self.wr(t, &a[0], r & 0xffff_ffff);
                }
                Op::Shf(left, clamp) => {
                    let (lo, hi, c) =
                        (self.rd(t, &a[1]) & 0xffff_ffff, self.rd(t, &a[2]) & 0xffff_ffff, self.rd(t, &a[3]));
                    let nshift = if *clamp { c.min(32) } else { c & 31 };
                    let wide = (hi << 32) | lo;
                    let r = if *left { (wide << nshift) >> 32 } else { wide >> nshift };
                    self.wr(t, &a[0], r & 0xffff_ffff);
                }
                Op::Bra => {
                    if let Operand::Label(target) = a[0] {
                        self.pc[t] = target as u32;
                        continue;
                    }
                }
                Op::Ret => {
                    if self.frames[t].is_empty() {
                        return Ok(Stop::Exit);
                    }
                    self.ret(t)?;
                    continue;
                }
                Op::Call { callee, nret } => {
                    self.call(t, *callee, usize::from(*nret))?;
                    continue;
                }
                Op::Exit => return Ok(Stop::Exit),
                Op::Trap => return Err(self.fault(t, FaultKind::Trap)),
                Op::Nop => {}
                Op::ActiveMask => {
                    let w = t / 32;
                    let mut m = 0u64;
                    for l in 0..32 {
                        let tt = w * 32 + l;
                        if tt < self.n && self.state[tt] != TState::Exited {
                            m |= 1 << l;
                        }
                    }
                    self.wr(t, &a[0], m);
                }
                Op::HalfArith(op, ty, m, fma) => {
                    let (x, y) = (self.rd(t, &a[1]), self.rd(t, &a[2]));
                    let z = if *fma { self.rd(t, &a[3]) } else { 0 };
                    self.wr(t, &a[0], half_arith(*op, *ty, *m, *fma, x, y, z));
                }
                Op::HalfUn(op, ty) => {
                    let x = self.rd(t, &a[1]);
                    let lanes = if matches!(ty, Ty::F16x2 | Ty::Bf16x2) { 2 } else { 1 };
                    let mut r = 0u64;
                    for i in 0..lanes {
                        let h = (x >> (16 * i)) & 0xffff;
                        let v = if *op == UnOp::Neg { h ^ 0x8000 } else { h & 0x7fff };
                        r |= v << (16 * i);
                    }
                    self.wr(t, &a[0], r);
                }
                Op::BarRed(kind) => {
                    let id = self.rd(t, &a[1]) as u32;
                    let count = if a.len() == 4 { Some(self.rd(t, &a[2]) as u32) } else { None };
                    let c = self.rd(t, &a[a.len() - 1]) != 0;
                    self.pc[t] += 1;
                    self.arrive_barrier_red(t, id, count, *kind, c)?;
                    return Ok(Stop::Barrier);
                }
                Op::Bar { wait } => {
                    let id = self.rd(t, &a[0]) as u32;
                    let count = a.get(1).map(|c| self.rd(t, c) as u32);
                    self.pc[t] += 1;
                    self.arrive_barrier(t, id, count, *wait)?;
                    if *wait {
                        return Ok(Stop::Barrier);
                    }
                    continue;
                }
                Op::CpAsync { ignore_src } => self.cp_async(t, *ignore_src, a)?,
                Op::CpAsyncCommit => {
                    self.async_group[t] += 1;
                    if let Some(p) = self.prof.as_mut() {
                        let mut groups: Vec<u32> = self.async_copies[t].iter().map(|c| c.group).collect();
                        groups.dedup();
                        let depth = groups.len() as u32;
                        p.out.max_async_groups_in_flight = p.out.max_async_groups_in_flight.max(depth);
                    }
                }
                Op::CpAsyncWait { n, all } => {
                    if *all {
                        self.async_group[t] += 1;
                    }
                    // Groups committed before the newest `n` are complete.
                    let done = self.async_group[t].saturating_sub(u32::from(*n));
                    self.complete_async(t, done);
                }
                Op::WarpSync
                | Op::Shfl(_)
                | Op::Vote(_)
                | Op::Mma { .. }
                | Op::Ldmatrix { .. }
                | Op::Redux(..)
                | Op::Match(..) => {
                    self.arrive_collective(t)?;
                    return Ok(Stop::Collective);
                }
                Op::Atom { space, op, ty, has_dst } => {
                    let i0 = usize::from(*has_dst);
                    let addr = self.addr(t, &a[i0]);
                    let b = self.rd(t, &a[i0 + 1]);
                    let c = a.get(i0 + 2).map_or(0, |o| self.rd(t, o));
                    let old = self.atomic(t, *space, addr, *op, *ty, b, c)?;
                    if *has_dst {
                        self.wr(t, &a[0], old);
                    }
                }
            }
            self.pc[t] += 1;
        }
    }

    /// `cp.async`: the source is read now (one legal time for it), the destination is
    /// written when a `cp.async.wait_group`/`wait_all` covers the copy (or the thread exits);
    /// until then it is pending and any access to it is a fault.
    fn cp_async(&mut self, t: usize, ignore_src: bool, a: &[Operand]) -> R<()> {
        let dst = self.addr(t, &a[0]);
        let src = self.addr(t, &a[1]);
        let size = self.rd(t, &a[2]);
        let src_size = match a.get(3) {
            Some(p) if ignore_src => {
                if self.rd(t, p) != 0 {
                    0
                } else {
                    size
                }
            }
            Some(o) => self.rd(t, o) & 0xffff_ffff,
            None => size,
        };
        if src_size > size {
            return Err(self.fault(
                t,
                FaultKind::OutOfBounds {
                    space: "global",
                    write: false,
                    detail: format!("cp.async src-size {src_size} is larger than its cp-size {size}"),
                },
            ));
        }
        let (gs, ga) = self.resolve(Space::Global, src);
        self.check_align(t, gs, ga, size)?;
        let (ds, da) = self.resolve(Space::Shared, dst);
        if ds != Space::Shared {
            return Err(self.fault(
                t,
                FaultKind::OutOfBounds {
                    space: ds.name(),
                    write: true,
                    detail: "the destination of a cp.async must be shared memory".into(),
                },
            ));
        }
        self.check_align(t, Space::Shared, da, size)?;
        let mut data = [0u8; 16];
        let mut i = 0;
        while i < src_size {
            // Whole words where they fit, then the bytes of a partial one.
            let step = if src_size - i >= 4 { 4 } else { 1 };
            let v = self.load(t, Space::Global, src + i, step)?;
            data[i as usize..(i + step) as usize].copy_from_slice(&v.to_le_bytes()[..step as usize]);
            i += step;
        }
        if self.prof.is_some() {
            if src_size > 0 {
                self.record_access(t, Space::Global, src, src_size, false);
            }
            self.record_access(t, Space::Shared, da, size, true);
        }
        let off = self.shared_range(t, da, size, true)?;
        // The copy writes the destination at some time before the wait: a hazard with every
        // access of other threads in this epoch, as a store would be.
        self.check_shared_write(t, off, size as usize)?;
        if self.ctx.check_shared {
            for s in &mut self.shadow[off..off + size as usize] {
                s.pending = true;
            }
        }
        let line = self.ctx.f.insts[self.pc[t] as usize].line;
        self.async_copies[t].push(AsyncCopy {
            dst: off as u32,
            len: size as u8,
            data,
            group: self.async_group[t],
            line,
        });
        Ok(())
    }

    /// Completes thread `t`'s copies of groups before `group`: their bytes land in shared
    /// memory, written by `t` in the current epoch (so another thread must still wait for a
    /// barrier before it reads them).
    fn complete_async(&mut self, t: usize, group: u32) {
        if self.async_copies[t].is_empty() {
            return;
        }
        // Taken out and put back, so the thread's list keeps its allocation.
        let mut copies = std::mem::take(&mut self.async_copies[t]);
        let (e, we) = (self.epoch, self.wepoch[t / 32]);
        for c in &copies {
            if c.group >= group {
                continue;
            }
            let (off, len) = (c.dst as usize, usize::from(c.len));
            self.shared[off..off + len].copy_from_slice(&c.data[..len]);
            if self.ctx.check_shared {
                for s in &mut self.shadow[off..off + len] {
                    *s = Shadow {
                        init: true,
                        w_tid: t as u32 + 1,
                        w_epoch: e,
                        w_wep: we,
                        w_line: c.line,
                        ..Shadow::default()
                    };
                }
            }
        }
        copies.retain(|c| c.group >= group);
        self.async_copies[t] = copies;
    }

    /// `call`: a new frame in the thread's local memory, the arguments copied into it, the
    /// callee's registers saved (a recursive call reuses them), and a jump to the callee.
    fn call(&mut self, t: usize, callee: u32, nret: usize) -> R<()> {
        let f: &'a Function = self.ctx.f;
        let pc = self.pc[t];
        let c = &f.callees[callee as usize];
        if self.frames[t].len() >= MAX_CALL_DEPTH {
            return Err(self.fault(t, FaultKind::CallDepth { limit: MAX_CALL_DEPTH }));
        }
        let caller_base = self.frame_base[t];
        let base = (self.local[t].len() as u64).next_multiple_of(c.frame_align.max(16));
        self.local[t].resize((base + c.frame_bytes) as usize, 0);
        let args = &f.insts[pc as usize].args[nret..];
        for (arg, &(off, size)) in args.iter().zip(&c.params) {
            let from = self.rd(t, arg);
            let from_end = from.checked_add(size).filter(|&e| e <= base);
            let Some(from_end) = from_end else {
                self.local[t].truncate(base as usize);
                return Err(self.oob(t, "local", false, from, size, base));
            };
            let to = (base + off) as usize;
            self.local[t].copy_within(from as usize..from_end as usize, to);
        }
        let r0 = (t * self.nregs) + c.reg_offset as usize;
        let window = r0..r0 + c.reg_count as usize;
        self.saved[t].extend_from_slice(&self.regs[window]);
        self.frames[t].push(Frame { call_pc: pc, caller_base });
        self.frame_base[t] = base;
        self.pc[t] = c.start;
        Ok(())
    }

    /// `ret` inside a device function: return values copied to the caller's variables, the
    /// callee's registers restored, its frame freed.
    fn ret(&mut self, t: usize) -> R<()> {
        let f: &'a Function = self.ctx.f;
        let frame = self.frames[t].pop().expect("a frame");
        let call = &f.insts[frame.call_pc as usize];
        let Op::Call { callee, nret } = call.op else { unreachable!("frames are pushed by calls") };
        let c = &f.callees[callee as usize];
        let base = self.frame_base[t];
        for (dst, &(off, size)) in call.args[..usize::from(nret)].iter().zip(&c.rets) {
            let to = match dst {
                Operand::Frame(o) => frame.caller_base + o,
                _ => unreachable!("call operands are frame variables"),
            };
            let from = (base + off) as usize;
            if to + size > base {
                return Err(self.oob(t, "local", true, to, size, base));
            }
            self.local[t].copy_within(from..from + size as usize, to as usize);
        }
        let r0 = (t * self.nregs) + c.reg_offset as usize;
        let n = c.reg_count as usize;
        let keep = self.saved[t].len() - n;
        self.regs[r0..r0 + n].copy_from_slice(&self.saved[t][keep..]);
        self.saved[t].truncate(keep);
        self.local[t].truncate(base as usize);
        self.frame_base[t] = frame.caller_base;
        self.pc[t] = frame.call_pc + 1;
        Ok(())
    }

    fn exec_mov(&mut self, t: usize, ty: Ty, a: &[Operand]) {
        match (&a[0], &a[1]) {
            (Operand::Vec(ds), s) => {
                let v = self.rd(t, s);
                let w = ty.bits() / ds.len() as u32;
                for (i, d) in ds.iter().enumerate() {
                    self.wr(t, d, (v >> (w * i as u32)) & width_mask(w));
                }
            }
            (d, Operand::Vec(ss)) if ss.len() > 1 => {
                let w = ty.bits() / ss.len() as u32;
                let mut v = 0u64;
                for (i, s) in ss.iter().enumerate() {
                    v |= (self.rd(t, s) & width_mask(w)) << (w * i as u32);
                }
                self.wr(t, d, v);
            }
            (d, s) => {
                let v = self.rd(t, s) & ty.mask();
                self.wr(t, d, v);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn atomic(&mut self, t: usize, space: Space, addr: u64, op: AtomOp, ty: Ty, b: u64, c: u64) -> R<u64> {
        let (space, a) = self.resolve(space, addr);
        let size = ty.bytes();
        self.check_align(t, space, a, size)?;
        let f = |old: u64| atom_apply(op, ty, old, b, c);
        match space {
            Space::Shared => {
                let off = self.shared_range(t, a, size, true)?;
                if self.ctx.check_shared && self.shadow[off..off + size as usize].iter().any(|s| !s.init) {
                    return Err(self.fault(t, FaultKind::UninitShared { offset: off as u64 }));
                }
                let old = le(&self.shared[off..off + size as usize]);
                put_le(&mut self.shared[off..off + size as usize], f(old));
                Ok(old)
            }
            Space::Global | Space::Generic => {
                self.ctx.global.rmw(a, size, f).map_err(|e| self.global_fault(t, space, e, true))
            }
            _ => Err(self.fault(
                t,
                FaultKind::OutOfBounds { space: space.name(), write: true, detail: "atomic on this space".into() },
            )),
        }
    }

    fn arrive_barrier_red(&mut self, t: usize, id: u32, count: Option<u32>, kind: BarRedOp, c: bool) -> R<()> {
        if let Some(b) = self.bars.get_mut(id as usize) {
            if b.arrived == 0 {
                b.red = (kind, 0, 0);
            } else if b.red.0 != kind {
                return Err(
                    self.fault(t, FaultKind::Barrier(format!("barrier {id} used with different bar.red operations")))
                );
            }
            b.red.1 += u32::from(c);
            b.red.2 += 1;
        }
        self.arrive_barrier(t, id, count, true)
    }

    /// Writes the `bar.red` result to every waiter (whose pc is already past the barrier).
    fn finish_bar_red(&mut self, waiters: &[usize], red: (BarRedOp, u32, u32)) {
        let f = self.ctx.f;
        for &w in waiters {
            let i = &f.insts[self.pc[w] as usize - 1];
            if let Op::BarRed(_) = i.op {
                let v = match red.0 {
                    BarRedOp::Popc => u64::from(red.1),
                    BarRedOp::And => u64::from(red.1 == red.2),
                    BarRedOp::Or => u64::from(red.1 > 0),
                };
                let d = i.args[0].clone();
                self.wr(w, &d, v);
            }
        }
    }

    fn arrive_barrier(&mut self, t: usize, id: u32, count: Option<u32>, wait: bool) -> R<()> {
        if id >= 16 {
            return Err(self.fault(t, FaultKind::Barrier(format!("barrier id {id} is not in 0..16"))));
        }
        let expected = count.unwrap_or(self.n as u32);
        if expected == 0 || expected as usize > self.n {
            return Err(self.fault(
                t,
                FaultKind::Barrier(format!("barrier {id} expects {expected} threads; the block has {}", self.n)),
            ));
        }
        let b = &mut self.bars[id as usize];
        if b.arrived > 0 && b.expected != expected {
            let msg = format!("barrier {id} used with thread counts {} and {expected} at once", b.expected);
            return Err(self.fault(t, FaultKind::Barrier(msg)));
        }
        b.expected = expected;
        b.arrived += 1;
        if wait {
            b.waiters.push(t);
            self.state[t] = TState::AtBarrier(id);
        }
        if b.arrived == b.expected {
            let waiters = std::mem::take(&mut b.waiters);
            b.arrived = 0;
            let red = b.red;
            b.red = (BarRedOp::Popc, 0, 0);
            self.finish_bar_red(&waiters, red);
            for w in waiters {
                self.state[w] = TState::Ready;
                self.queue.push_back(w);
            }
            self.epoch += 1;
        }
        Ok(())
    }

    fn arrive_collective(&mut self, t: usize) -> R<()> {
        let f = self.ctx.f;
        let inst = &f.insts[self.pc[t] as usize];
        let mask_op = match inst.op {
            Op::Shfl(_) => &inst.args[4],
            Op::Vote(_) | Op::Redux(..) | Op::Match(..) => &inst.args[2],
            Op::Mma { .. } | Op::Ldmatrix { .. } => &Operand::Imm(0xffff_ffff),
            _ => &inst.args[0],
        };
        let mask = self.rd(t, mask_op) as u32;
        let w = t / 32;
        let lane = t % 32;
        if mask & (1 << lane) == 0 {
            return Err(self.fault(
                t,
                FaultKind::Collective(format!("membermask 0x{mask:08x} leaves out the thread's own lane {lane}")),
            ));
        }
        let lanes: Vec<usize> = (0..32).filter(|l| mask & (1 << l) != 0).collect();
        if let Some(l) = lanes.iter().find(|&&l| w * 32 + l >= self.n) {
            return Err(self.fault(
                t,
                FaultKind::Collective(format!(
                    "membermask 0x{mask:08x} names lane {l}, which this block does not have"
                )),
            ));
        }
        self.state[t] = TState::AtCollective(mask);
        self.try_complete_collective(t, mask)
    }

    /// A thread exited: collectives of its warp that waited for it may now complete.
    fn on_exit(&mut self, t: usize) -> R<()> {
        let w = t / 32;
        for l in 0..32 {
            let tt = w * 32 + l;
            if tt >= self.n {
                break;
            }
            if let TState::AtCollective(mask) = self.state[tt] {
                if mask & (1 << (t % 32)) != 0 {
                    self.try_complete_collective(tt, mask)?;
                }
            }
        }
        Ok(())
    }

    /// Completes the collective thread `t` waits at when every lane of `mask` that has not
    /// exited is there (the ISA waits only for non-exited members); `mma` and `ldmatrix`
    /// need the whole warp.
    fn try_complete_collective(&mut self, t: usize, mask: u32) -> R<()> {
        let f = self.ctx.f;
        let inst = &f.insts[self.pc[t] as usize];
        let w = t / 32;
        let lane = t % 32;
        let whole_warp = matches!(inst.op, Op::Mma { .. } | Op::Ldmatrix { .. });
        let mut lane_buf = [0usize; 32];
        let mut nlanes = 0;
        let mut exited = 0u32;
        for l in (0..32).filter(|l| mask & (1 << l) != 0) {
            match self.state[w * 32 + l] {
                TState::AtCollective(m) if m == mask => {
                    lane_buf[nlanes] = l;
                    nlanes += 1;
                }
                TState::Exited if !whole_warp => exited |= 1 << l,
                TState::Exited => {
                    return Err(self.fault(
                        t,
                        FaultKind::Collective(format!("membermask 0x{mask:08x} names lane {l}, which has exited")),
                    ))
                }
                _ => return Ok(()),
            }
        }
        let lanes = &lane_buf[..nlanes];
        // Every non-exited lane is here: the same collective?
        let op0 = &inst.op;
        for &l in lanes {
            let tt = w * 32 + l;
            let other = &f.insts[self.pc[tt] as usize];
            if std::mem::discriminant(&other.op) != std::mem::discriminant(op0) || other.op != *op0 {
                return Err(self.fault(
                    t,
                    FaultKind::Collective(format!(
                        "divergent warp collective: lane {lane} is at line {}, lane {l} at line {}",
                        inst.line, other.line
                    )),
                ));
            }
        }
        match *op0 {
            Op::Shfl(mode) => {
                let vals: [u64; 32] = std::array::from_fn(|l| {
                    if (mask & !exited) & (1 << l) != 0 {
                        self.rd(w * 32 + l, &f.insts[self.pc[w * 32 + l] as usize].args[1])
                    } else {
                        0
                    }
                });
                let mut outs = [(0usize, 0u64, false); 32];
                let mut nout = 0;
                for &l in lanes {
                    let tt = w * 32 + l;
                    let i = &f.insts[self.pc[tt] as usize];
                    let b = (self.rd(tt, &i.args[2]) & 0x1f) as i32;
                    let c = self.rd(tt, &i.args[3]) as u32;
                    let clamp = (c & 0x1f) as i32;
                    let seg = ((c >> 8) & 0x1f) as i32;
                    let li = l as i32;
                    let max_lane = (li & seg) | (clamp & !seg);
                    let min_lane = li & seg;
                    let (j, p) = match mode {
                        ShflMode::Up => (li - b, li - b >= max_lane),
                        ShflMode::Down => (li + b, li + b <= max_lane),
                        ShflMode::Bfly => (li ^ b, (li ^ b) <= max_lane),
                        ShflMode::Idx => (min_lane | (b & !seg), (min_lane | (b & !seg)) <= max_lane),
                    };
                    let j = if p { j as usize } else { l };
                    if exited & (1 << j) != 0 {
                        return Err(
                            self.fault(tt, FaultKind::Collective(format!("shfl reads lane {j}, which has exited")))
                        );
                    }
                    if mask & (1 << j) == 0 {
                        return Err(self.fault(
                            tt,
                            FaultKind::Collective(format!("shfl reads lane {j}, outside membermask 0x{mask:08x}")),
                        ));
                    }
                    outs[nout] = (tt, vals[j], p);
                    nout += 1;
                }
                for &(tt, v, p) in &outs[..nout] {
                    let i = &f.insts[self.pc[tt] as usize];
                    self.wr(tt, &i.args[0], v);
                    if let Some(pd) = i.pdst {
                        self.wr(tt, &Operand::Reg(pd), u64::from(p));
                    }
                }
            }
            Op::Vote(mode) => {
                let mut ballot = 0u64;
                for &l in lanes {
                    let tt = w * 32 + l;
                    if self.rd(tt, &f.insts[self.pc[tt] as usize].args[1]) != 0 {
                        ballot |= 1 << l;
                    }
                }
                let active = u64::from(mask & !exited);
                let r = match mode {
                    VoteMode::All => u64::from(ballot == active),
                    VoteMode::Any => u64::from(ballot != 0),
                    VoteMode::Uni => u64::from(ballot == 0 || ballot == active),
                    VoteMode::Ballot => ballot,
                };
                for &l in lanes {
                    let tt = w * 32 + l;
                    let d = &f.insts[self.pc[tt] as usize].args[0];
                    self.wr(tt, d, r);
                }
            }
            Op::Redux(op, ty) => {
                let mut acc: Option<u64> = None;
                for &l in lanes {
                    let tt = w * 32 + l;
                    let v = self.rd(tt, &f.insts[self.pc[tt] as usize].args[1]) & ty.mask();
                    acc = Some(match acc {
                        None => v,
                        Some(a) => atom_apply(op, ty, a, v, 0),
                    });
                }
                for &l in lanes {
                    let tt = w * 32 + l;
                    let d = &f.insts[self.pc[tt] as usize].args[0];
                    self.wr(tt, d, acc.unwrap_or(0));
                }
            }
            Op::Match(all, ty) => {
                let vals: Vec<(usize, u64)> = lanes
                    .iter()
                    .map(|&l| (l, self.rd(w * 32 + l, &f.insts[self.pc[w * 32 + l] as usize].args[1]) & ty.mask()))
                    .collect();
                let all_equal = vals.iter().all(|v| v.1 == vals[0].1);
                for &(l, v) in &vals {
                    let tt = w * 32 + l;
                    let i = &f.insts[self.pc[tt] as usize];
                    let r = if all {
                        if all_equal {
                            u64::from(mask & !exited)
                        } else {
                            0
                        }
                    } else {
                        vals.iter().filter(|o| o.1 == v).fold(0u64, |m, o| m | (1 << o.0))
                    };
                    let (d, pd) = (i.args[0].clone(), i.pdst);
                    self.wr(tt, &d, r);
                    if let Some(pd) = pd {
                        self.wr(tt, &Operand::Reg(pd), u64::from(all_equal));
                    }
                }
            }
            Op::Mma { k, bf16 } => self.mma(w, k, bf16),
            Op::Ldmatrix { num, trans, space } => self.ldmatrix(w, num, trans, space)?,
            _ => {}
        }
        for &l in lanes {
            let tt = w * 32 + l;
            self.pc[tt] += 1;
            self.state[tt] = TState::Ready;
            self.queue.push_back(tt);
        }
        self.wepoch[w] += 1;
        Ok(())
    }
}

impl Block<'_> {
    /// Reads operand `idx` (a vector of registers) of lane `l`'s instruction.
    /// (Up to 4 elements, without allocating: the mma fragments.)
    fn lane_vec(&self, tt: usize, idx: usize) -> [u64; 4] {
        let mut out = [0u64; 4];
        match &self.ctx.f.insts[self.pc[tt] as usize].args[idx] {
            Operand::Vec(v) => {
                for (o, x) in out.iter_mut().zip(v) {
                    *o = self.rd(tt, x);
                }
            }
            o => out[0] = self.rd(tt, o),
        }
        out
    }

    /// `mma.sync` m16n8k{8,16}: D = A (16 x K, row) * B (K x 8, col) + C, f32 accumulation,
    /// with the PTX ISA's fragment layouts (groupID = lane / 4, tig = lane % 4). Products are
    /// exact and the sum is rounded once to f32.
    fn mma(&mut self, w: usize, k: u8, bf16: bool) {
        let k = usize::from(k);
        if let Some(p) = self.prof.as_mut() {
            p.out.tensor_flops += 2 * 16 * 8 * k as u64;
        }
        let half = |bits: u64| -> f64 {
            if bf16 {
                f64::from(half::bf16::from_bits(bits as u16).to_f32())
            } else {
                f64::from(half::f16::from_bits(bits as u16).to_f32())
            }
        };
        let mut a = [[0f64; 16]; 16];
        let mut b = [[0f64; 8]; 16];
        let mut c = [[0f64; 8]; 16];
        for l in 0..32 {
            let tt = w * 32 + l;
            let (g, tig) = (l / 4, l % 4);
            let (ra, rb, rc) = (self.lane_vec(tt, 1), self.lane_vec(tt, 2), self.lane_vec(tt, 3));
            let na = if k == 16 { 8 } else { 4 };
            for i in 0..na {
                let v = half(ra[i / 2] >> (16 * (i % 2)));
                let row = if (i / 2) % 2 == 0 { g } else { g + 8 };
                let col = tig * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
                a[row][col] = v;
            }
            let nb = if k == 16 { 4 } else { 2 };
            for i in 0..nb {
                let v = half(rb[i / 2] >> (16 * (i % 2)));
                let row = tig * 2 + (i & 1) + if i >= 2 { 8 } else { 0 };
                b[row][g] = v;
            }
            for i in 0..4 {
                let row = if i < 2 { g } else { g + 8 };
                c[row][tig * 2 + (i & 1)] = f64::from(f32b(rc[i]));
            }
        }
        for l in 0..32 {
            let tt = w * 32 + l;
            let (g, tig) = (l / 4, l % 4);
            let f: &Function = self.ctx.f;
            let Operand::Vec(ds) = &f.insts[self.pc[tt] as usize].args[0] else { continue };
            for (i, dreg) in ds.iter().enumerate().take(4) {
                let row = if i < 2 { g } else { g + 8 };
                let col = tig * 2 + (i & 1);
                let mut acc = c[row][col];
                for (kk, brow) in b.iter().enumerate().take(k) {
                    acc += a[row][kk] * brow[col];
                }
                self.wr(tt, dreg, b32f(acc as f32));
            }
        }
    }

    /// `ldmatrix`: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives, of
    /// each matrix, elements (l / 4, 2 (l % 4) + {0, 1}), or their transpose with `.trans`.
    fn ldmatrix(&mut self, w: usize, num: u8, trans: bool, space: Space) -> R<()> {
        let num = usize::from(num);
        if self.prof.is_some() {
            // The rows the lanes address, as the shared-memory unit sees them.
            let mut rows = Vec::with_capacity(8 * num);
            for r in 0..8 * num {
                let tt = w * 32 + r;
                let addr = self.addr(tt, &self.ctx.f.insts[self.pc[tt] as usize].args[1]);
                rows.push((self.resolve(space, addr).1, 16));
            }
            if let Some(p) = self.prof.as_mut() {
                let wavefronts = shared_wavefronts(&rows);
                p.out.ldmatrix_requests += 1;
                p.out.ldmatrix_wavefronts += wavefronts;
                p.out.shared_requests += 1;
                p.out.shared_wavefronts += wavefronts;
                p.out.shared_bytes_requested += 16 * rows.len() as u64;
            }
        }
        let mut m = vec![[[0u16; 8]; 8]; num];
        for (mi, mat) in m.iter_mut().enumerate() {
            for (r, row) in mat.iter_mut().enumerate() {
                let tt = w * 32 + mi * 8 + r;
                let addr = self.addr(tt, &self.ctx.f.insts[self.pc[tt] as usize].args[1]);
                let (sp, a) = self.resolve(space, addr);
                self.check_align(tt, sp, a, 16)?;
                // The row as two 8-byte halves (16-byte aligned, checked above).
                for half in 0..2 {
                    let v = self.load(tt, space, addr + 8 * half as u64, 8)?;
                    for j in 0..4 {
                        row[4 * half + j] = (v >> (16 * j)) as u16;
                    }
                }
            }
        }
        for l in 0..32 {
            let tt = w * 32 + l;
            let f: &Function = self.ctx.f;
            let regs: &[Operand] = match &f.insts[self.pc[tt] as usize].args[0] {
                Operand::Vec(v) => v,
                o => std::slice::from_ref(o),
            };
            for (mi, reg) in regs.iter().enumerate().take(num) {
                let (r, c0) = (l / 4, 2 * (l % 4));
                let (e0, e1) = if trans { (m[mi][c0][r], m[mi][c0 + 1][r]) } else { (m[mi][r][c0], m[mi][r][c0 + 1]) };
                self.wr(tt, reg, u64::from(e0) | (u64::from(e1) << 16));
            }
        }
        Ok(())
    }
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x))
}

fn put_le(b: &mut [u8], v: u64) {
    for (i, x) in b.iter_mut().enumerate() {
        *x = (v >> (8 * i)) as u8;
    }
}

fn boolop(b: BoolOp, x: bool, y: bool) -> bool {
    match b {
        BoolOp::And => x && y,
        BoolOp::Or => x || y,
        BoolOp::Xor => x ^ y,
    }
}

fn int_bin(op: BinOp, ty: Ty, sat: bool, x: u64, y: u64) -> u64 {
    let bits = ty.bits();
    let m = ty.mask();
    let (x, y) = (x & m, y);
    let s = ty.is_signed();
    let (sx, sy) = (sext(x, bits), sext(y & m, bits));
    match op {
        BinOp::Add if sat && s => (i128::from(sx) + i128::from(sy)).clamp(i32::MIN.into(), i32::MAX.into()) as u64 & m,
        BinOp::Sub if sat && s => (i128::from(sx) - i128::from(sy)).clamp(i32::MIN.into(), i32::MAX.into()) as u64 & m,
        BinOp::Add => x.wrapping_add(y) & m,
        BinOp::Sub => x.wrapping_sub(y) & m,
        BinOp::Mul => x.wrapping_mul(y) & m,
        BinOp::MulHi => {
            if s {
                ((i128::from(sx) * i128::from(sy)) >> bits) as u64 & m
            } else {
                ((u128::from(x) * u128::from(y & m)) >> bits) as u64 & m
            }
        }
        BinOp::MulWide => {
            let wm = width_mask(bits * 2);
            if s {
                (i128::from(sx) * i128::from(sy)) as u64 & wm
            } else {
                (u128::from(x) * u128::from(y & m)) as u64 & wm
            }
        }
        BinOp::Div => {
            if y & m == 0 {
                m
            } else if s {
                sx.wrapping_div(sy) as u64 & m
            } else {
                x / (y & m)
            }
        }
        BinOp::Rem => {
            if y & m == 0 {
                x
            } else if s {
                sx.wrapping_rem(sy) as u64 & m
            } else {
                x % (y & m)
            }
        }
        BinOp::Min => {
            if s {
                sx.min(sy) as u64 & m
            } else {
                x.min(y & m)
            }
        }
        BinOp::Max => {
            if s {
                sx.max(sy) as u64 & m
            } else {
                x.max(y & m)
            }
        }
        BinOp::And => x & y & m,
        BinOp::Or => (x | y) & m,
        BinOp::Xor => (x ^ y) & m,
        BinOp::Shl => {
            let n = y & 0xffff_ffff;
            if n >= u64::from(bits) {
                0
            } else {
                (x << n) & m
            }
        }
        BinOp::Shr => {
            let n = (y & 0xffff_ffff).min(u64::from(bits) - 1 + u64::from(!s));
            if s {
                (sx >> n.min(63)) as u64 & m
            } else if n >= u64::from(bits) {
                0
            } else {
                x >> n
            }
        }
    }
}

fn int_un(op: UnOp, ty: Ty, x: u64) -> u64 {
    let bits = ty.bits();
    let m = ty.mask();
    let x = x & m;
    match op {
        UnOp::Neg => x.wrapping_neg() & m,
        UnOp::Abs => sext(x, bits).unsigned_abs() & m,
        UnOp::Not => !x & m,
        UnOp::Cnot => u64::from(x == 0),
        UnOp::Popc => u64::from(x.count_ones()),
        UnOp::Clz => u64::from(x.leading_zeros() - (64 - bits)),
        UnOp::Brev => x.reverse_bits() >> (64 - bits),
        UnOp::Bfind(shiftamt) => {
            let v = if ty.is_signed() && sext(x, bits) < 0 { !x & m } else { x };
            if v == 0 {
                0xffff_ffff
            } else {
                let pos = 63 - u64::from(v.leading_zeros());
                if shiftamt {
                    u64::from(bits) - 1 - pos
                } else {
                    pos
                }
            }
        }
    }
}

fn post32(r: f32, m: &FMods) -> f32 {
    let r = if m.ftz { ftz32(r) } else { r };
    if m.sat {
        if r.is_nan() {
            0.0
        } else {
            r.clamp(0.0, 1.0)
        }
    } else {
        r
    }
}

fn post64(r: f64, m: &FMods) -> f64 {
    if m.sat {
        if r.is_nan() {
            0.0
        } else {
            r.clamp(0.0, 1.0)
        }
    } else {
        r
    }
}

fn float_bin(op: BinOp, ty: Ty, m: FMods, x: u64, y: u64) -> u64 {
    let rnd = match m.rnd {
        Some(r) => r,
        None => Rnd::Rn,
    };
    if ty == Ty::F32 {
        let fl = |v| if m.ftz { ftz32(f32b(v)) } else { f32b(v) };
        let (a, b) = (fl(x), fl(y));
        let r = match op {
            BinOp::Add => add32(a, b, rnd),
            BinOp::Sub => add32(a, -b, rnd),
            BinOp::Mul => mul32(a, b, rnd),
            BinOp::Div => div32(a, b, rnd),
            BinOp::Min => a.min(b),
            BinOp::Max => a.max(b),
            _ => f32::NAN,
        };
        b32f(post32(r, &m))
    } else {
        let (a, b) = (f64b(x), f64b(y));
        let r = match op {
            BinOp::Add => add64(a, b, rnd),
            BinOp::Sub => add64(a, -b, rnd),
            BinOp::Mul => mul64(a, b, rnd),
            BinOp::Div => div64(a, b, rnd),
            BinOp::Min => a.min(b),
            BinOp::Max => a.max(b),
            _ => f64::NAN,
        };
        post64(r, &m).to_bits()
    }
}

/// The float functions: the approximate forms are computed in f64 and rounded once, which is
/// inside every error bound the PTX ISA states for them.
fn ffunc(func: FFunc, ty: Ty, m: FMods, x: u64) -> u64 {
    if ty == Ty::F32 {
        let v = if m.ftz { ftz32(f32b(x)) } else { f32b(x) };
        let d = f64::from(v);
        let r = match func {
            FFunc::Ex2 => d.exp2() as f32,
            FFunc::Lg2 => d.log2() as f32,
            FFunc::Rcp => match m.rnd {
                Some(r) => div32(1.0, v, r),
                None => (1.0 / d) as f32,
            },
            FFunc::Rsqrt => (1.0 / d.sqrt()) as f32,
            FFunc::Sqrt => match m.rnd {
                Some(r) => sqrt32(v, r),
                None => d.sqrt() as f32,
            },
            FFunc::Sin => d.sin() as f32,
            FFunc::Cos => d.cos() as f32,
            FFunc::Tanh => d.tanh() as f32,
        };
        b32f(post32(r, &m))
    } else {
        let d = if m.ftz { ftz64(f64b(x)) } else { f64b(x) };
        let rnd = m.rnd.unwrap_or(Rnd::Rn);
        let r = match func {
            FFunc::Ex2 => d.exp2(),
            FFunc::Lg2 => d.log2(),
            FFunc::Rcp => div64(1.0, d, rnd),
            FFunc::Rsqrt => 1.0 / d.sqrt(),
            FFunc::Sqrt => sqrt64(d, rnd),
            FFunc::Sin => d.sin(),
            FFunc::Cos => d.cos(),
            FFunc::Tanh => d.tanh(),
        };
        post64(r, &m).to_bits()
    }
}

/// The error bound the PTX ISA states for an approximate f32 function at input `x`
/// (sections "Floating Point Instructions: rcp, sqrt, rsqrt, sin, cos, lg2, ex2, tanh").
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ApproxBound {
    /// At most this many ulp from the correctly rounded result.
    Ulp(u32),
    /// `|result - exact| <= bound * |exact|`.
    Relative(f64),
    /// `|result - exact| <= bound`.
    Absolute(f64),
    /// The ISA states the result exactly (a special value), or no bound for this input.
    Exact,
}

/// The bound [`worst_case`] pushes `func` to at input `x` (after any `.ftz` flush):
/// ex2 2 ulp and rcp 1 ulp over the full range; sqrt 2^-23 and rsqrt 2^-22.9 relative over the
/// positive finite range; lg2 2^-22 absolute on (0.5, 2) and 2^-22 relative elsewhere (positive
/// finite); sin and cos 2^-20.5 absolute on [-2pi, 2pi] and 2^-14.7 on [-100pi, 100pi] (the ISA
/// gives no bound outside: the 2^-14.7 is kept); tanh 2^-11 relative, subnormal inputs passed
/// through. Zeros, infinities and NaN inputs follow the ISA's tables exactly.
pub fn approx_bound(func: FFunc, x: f32) -> ApproxBound {
    if x == 0.0 || !x.is_finite() {
        return ApproxBound::Exact;
    }
    let pi = std::f32::consts::PI;
    match func {
        FFunc::Ex2 => ApproxBound::Ulp(2),
        FFunc::Rcp => ApproxBound::Ulp(1),
        FFunc::Sqrt if x > 0.0 => ApproxBound::Relative(2f64.powi(-23)),
        FFunc::Rsqrt if x > 0.0 => ApproxBound::Relative(2f64.powf(-22.9)),
        FFunc::Lg2 if x > 0.5 && x < 2.0 => ApproxBound::Absolute(2f64.powi(-22)),
        FFunc::Lg2 if x > 0.0 => ApproxBound::Relative(2f64.powi(-22)),
        FFunc::Sin | FFunc::Cos if x.abs() <= 2.0 * pi => ApproxBound::Absolute(2f64.powf(-20.5)),
        FFunc::Sin | FFunc::Cos => ApproxBound::Absolute(2f64.powf(-14.7)),
        FFunc::Tanh if x.is_normal() => ApproxBound::Relative(2f64.powi(-11)),
        _ => ApproxBound::Exact,
    }
}

/// The next f32 away from `r` in direction `up` (through zero and the subnormals).
fn step32(r: f32, up: bool) -> f32 {
    if r == 0.0 {
        let tiny = f32::from_bits(1);
        return if up { tiny } else { -tiny };
    }
    let away = (r > 0.0) == up;
    let b = r.to_bits();
    f32::from_bits(if away { b + 1 } else { b - 1 })
}

/// Moves an approximate f32 result to exactly the edge of the error bound the PTX ISA states
/// for the instruction at this input (the farthest f32 from the exact value that is still
/// inside it), up or down depending on the input's bits, so a kernel test run this way shows
/// its tolerance covers any conforming GPU. `r` is the correctly rounded result.
fn worst_case(func: FFunc, x: f32, r: f32, ftz: bool) -> f32 {
    let up = (x.to_bits().wrapping_mul(0x9e37_79b9) >> 31) == 1;
    let exact = || {
        let d = f64::from(x);
        match func {
            FFunc::Ex2 => d.exp2(),
            FFunc::Lg2 => d.log2(),
            FFunc::Rcp => 1.0 / d,
            FFunc::Rsqrt => 1.0 / d.sqrt(),
            FFunc::Sqrt => d.sqrt(),
            FFunc::Sin => d.sin(),
            FFunc::Cos => d.cos(),
            FFunc::Tanh => d.tanh(),
        }
    };
    let pushed = match approx_bound(func, x) {
        ApproxBound::Exact => return r,
        ApproxBound::Ulp(n) => {
            if !r.is_finite() {
                return r;
            }
            let mut v = r;
            for _ in 0..n {
                let next = step32(v, up);
                if !next.is_finite() {
                    break;
                }
                v = next;
            }
            v
        }
        ApproxBound::Relative(b) | ApproxBound::Absolute(b) => {
            let e = exact();
            if !e.is_finite() {
                return r;
            }
            let tol = if let ApproxBound::Relative(_) = approx_bound(func, x) { b * e.abs() } else { b };
            let inside = |v: f32| (f64::from(v) - e).abs() <= tol;
            // The f32 nearest the edge, then stepped back inside.
            let mut v = (if up { e + tol } else { e - tol }) as f32;
            while !inside(v) && v.is_finite() {
                v = step32(v, !up);
            }
            if !v.is_finite() {
                return r;
            }
            v
        }
    };
    if ftz {
        ftz32(pushed)
    } else {
        pushed
    }
}

fn compare(cmp: Cmp, ty: Ty, ftz: bool, x: u64, y: u64) -> bool {
    if ty.is_float() {
        let (a, b) = if ty == Ty::F32 {
            let fl = |v| if ftz { ftz32(f32b(v)) } else { f32b(v) };
            (f64::from(fl(x)), f64::from(fl(y)))
        } else {
            (f64b(x), f64b(y))
        };
        let nan = a.is_nan() || b.is_nan();
        return match cmp {
            Cmp::Eq => a == b,
            Cmp::Ne => !nan && a != b,
            Cmp::Lt | Cmp::Lo => a < b,
            Cmp::Le | Cmp::Ls => a <= b,
            Cmp::Gt | Cmp::Hi => a > b,
            Cmp::Ge | Cmp::Hs => a >= b,
            Cmp::Equ => nan || a == b,
            Cmp::Neu => nan || a != b,
            Cmp::Ltu => nan || a < b,
            Cmp::Leu => nan || a <= b,
            Cmp::Gtu => nan || a > b,
            Cmp::Geu => nan || a >= b,
            Cmp::Num => !nan,
            Cmp::Nan => nan,
        };
    }
    let bits = ty.bits();
    let m = ty.mask();
    let (x, y) = (x & m, y & m);
    let (sx, sy) = (sext(x, bits), sext(y, bits));
    let signed = ty.is_signed();
    let o = if signed { sx.cmp(&sy) } else { x.cmp(&y) };
    use std::cmp::Ordering::*;
    match cmp {
        Cmp::Eq | Cmp::Equ => x == y,
        Cmp::Ne | Cmp::Neu => x != y,
        Cmp::Lt | Cmp::Ltu => o == Less,
        Cmp::Le | Cmp::Leu => o != Greater,
        Cmp::Gt | Cmp::Gtu => o == Greater,
        Cmp::Ge | Cmp::Geu => o != Less,
        Cmp::Lo => x < y,
        Cmp::Ls => x <= y,
        Cmp::Hi => x > y,
        Cmp::Hs => x >= y,
        Cmp::Num => true,
        Cmp::Nan => false,
    }
}

fn bfe(ty: Ty, a: u64, pos: u32, len: u32) -> u64 {
    let bits = ty.bits();
    let msb = bits - 1;
    let a = a & ty.mask();
    let sbit = if ty.is_signed() && len > 0 { (a >> (pos + len - 1).min(msb)) & 1 } else { 0 };
    let mut r = 0u64;
    for i in 0..bits {
        let bit = if i < len && pos + i <= msb { (a >> (pos + i)) & 1 } else { sbit };
        r |= bit << i;
    }
    r
}

/// A float value of a scalar float type, as f64 (exact).
fn float_val(ty: Ty, v: u64) -> f64 {
    match ty {
        Ty::F16 => f64::from(half::f16::from_bits(v as u16).to_f32()),
        Ty::Bf16 => f64::from(half::bf16::from_bits(v as u16).to_f32()),
        Ty::F32 => f64::from(f32b(v)),
        _ => f64b(v),
    }
}

fn int_range(ty: Ty) -> (i128, i128) {
    let bits = ty.bits();
    if ty.is_signed() {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    }
}

fn cvt(dst: Ty, src: Ty, m: FMods, x: u64) -> u64 {
    let x = x & src.mask();
    let rnd = m.rnd.unwrap_or(Rnd::Rn);
    if !src.is_float() {
        let v: i128 = if src.is_signed() { i128::from(sext(x, src.bits())) } else { i128::from(x) };
        if !dst.is_float() {
            let v = if m.sat {
                let (lo, hi) = int_range(dst);
                v.clamp(lo, hi)
            } else {
                v
            };
            let v = v as u64 & dst.mask();
            return if dst.is_signed() { sext(v, dst.bits()) as u64 } else { v };
        }
        return match dst {
            Ty::F32 => b32f(post32(int_to_f32(v, rnd), &m)),
            Ty::F64 => post64(int_to_f64(v, rnd), &m).to_bits(),
            Ty::F16 => u64::from(f64_to_f16(int_to_f64_odd(v), rnd)),
            _ => u64::from(f64_to_bf16(int_to_f64_odd(v), rnd)),
        };
    }
    let mut d = float_val(src, x);
    if m.ftz && src == Ty::F32 {
        d = f64::from(ftz32(d as f32));
    }
    if !dst.is_float() {
        if d.is_nan() {
            return 0;
        }
        let r = round_int64(d, rnd);
        let (lo, hi) = int_range(dst);
        let v = if r <= lo as f64 {
            lo
        } else if r >= hi as f64 {
            hi
        } else {
            r as i128
        };
        let v = v as u64 & dst.mask();
        return if dst.is_signed() { sext(v, dst.bits()) as u64 } else { v };
    }
    let integral = matches!(m.rnd, Some(Rnd::Rni | Rnd::Rzi | Rnd::Rmi | Rnd::Rpi));
    match dst {
        Ty::F32 => {
            let r = if src == Ty::F64 {
                if integral {
                    round_int64(d, rnd) as f32
                } else {
                    f64_to_f32(d, rnd)
                }
            } else if integral {
                round_int64(d, rnd) as f32
            } else {
                d as f32
            };
            b32f(post32(r, &m))
        }
        Ty::F64 => post64(if integral { round_int64(d, rnd) } else { d }, &m).to_bits(),
        Ty::F16 | Ty::Bf16 => {
            let mut v = if integral { round_int64(d, rnd) } else { d };
            if m.sat {
                v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
            }
            let r = if integral { Rnd::Rn } else { rnd };
            u64::from(if dst == Ty::F16 { f64_to_f16(v, r) } else { f64_to_bf16(v, r) })
        }
        _ => x,
    }
}

/// f16/bf16 arithmetic, per 16-bit lane: exact in f64, then one rounding to nearest even
/// (an fma whose f64 sum is inexact rounds twice; see the README).
fn half_arith(op: BinOp, ty: Ty, m: FMods, fma: bool, x: u64, y: u64, z: u64) -> u64 {
    let bf = matches!(ty, Ty::Bf16 | Ty::Bf16x2);
    let lanes = if matches!(ty, Ty::F16x2 | Ty::Bf16x2) { 2 } else { 1 };
    let to_f = |h: u64| -> f64 {
        let v = if bf {
            f64::from(half::bf16::from_bits(h as u16).to_f32())
        } else {
            f64::from(half::f16::from_bits(h as u16).to_f32())
        };
        // .ftz: f16 subnormals read as zero.
        if m.ftz && !bf && v != 0.0 && v.abs() < 6.103_515_625e-5 {
            0.0f64.copysign(v)
        } else {
            v
        }
    };
    let mut r = 0u64;
    for i in 0..lanes {
        let sh = 16 * i;
        let (a, b, c) = (to_f((x >> sh) & 0xffff), to_f((y >> sh) & 0xffff), to_f((z >> sh) & 0xffff));
        let mut v = match (op, fma) {
            (_, true) => a.mul_add(b, c),
            (BinOp::Add, _) => a + b,
            (BinOp::Sub, _) => a - b,
            (BinOp::Mul, _) => a * b,
            (BinOp::Min, _) => a.min(b),
            _ => a.max(b),
        };
        if m.sat {
            v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
        }
        let bits = if bf { f64_to_bf16(v, Rnd::Rn) } else { f64_to_f16(v, Rnd::Rn) };
        let bits = if m.ftz && !bf && bits & 0x7c00 == 0 { bits & 0x8000 } else { bits };
        r |= u64::from(bits) << sh;
    }
    r
}

fn atom_apply(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> u64 {
    let m = ty.mask();
    let bits = ty.bits();
    if ty.is_float() {
        let (o, v) = (float_val(ty, old), float_val(ty, b));
        let r = match op {
            AtomOp::Add => o + v,
            AtomOp::Min => o.min(v),
            AtomOp::Max => o.max(v),
            AtomOp::Exch => return b & m,
            AtomOp::Cas => return if old & m == b & m { c & m } else { old },
            _ => o,
        };
        return if ty == Ty::F32 {
            // f32 add: the f64 sum of two f32 rounds to the correctly rounded f32 sum.
            b32f(if op == AtomOp::Add { f32b(old) + f32b(b) } else { r as f32 })
        } else {
            r.to_bits()
        };
    }
    let s = ty.is_signed();
    let (so, sb) = (sext(old, bits), sext(b, bits));
    (match op {
        AtomOp::Add => old.wrapping_add(b),
        AtomOp::Min => {
            if s {
                so.min(sb) as u64
            } else {
                (old & m).min(b & m)
            }
        }
        AtomOp::Max => {
            if s {
                so.max(sb) as u64
            } else {
                (old & m).max(b & m)
            }
        }
        AtomOp::And => old & b,
        AtomOp::Or => old | b,
        AtomOp::Xor => old ^ b,
        AtomOp::Exch => b,
        AtomOp::Cas => {
            if old & m == b & m {
                c
            } else {
                old
            }
        }
        AtomOp::Inc => {
            if old & m >= b & m {
                0
            } else {
                old + 1
            }
        }
        AtomOp::Dec => {
            if old & m == 0 || old & m > b & m {
                b
            } else {
                old - 1
            }
        }
    }) & m
}
