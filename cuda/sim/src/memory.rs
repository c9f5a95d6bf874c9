//! Device global memory: buffers at fixed virtual addresses, shared by all blocks of a launch
//! (byte-wise atomics, so blocks may run on different host threads without undefined
//! behaviour even when a kernel races).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// Where the first buffer is placed; buffers are 256-byte aligned with a 64 KiB gap between.
pub const GLOBAL_BASE: u64 = 0x0000_1000_0000_0000;
const GAP: u64 = 1 << 16;

/// One allocation.
#[derive(Debug)]
pub struct Region {
    /// Virtual base address.
    pub base: u64,
    /// Bytes.
    pub data: Box<[AtomicU8]>,
    /// What it is, for messages (e.g. "buffer #2").
    pub label: String,
    /// Writes are an error (`.const`).
    pub read_only: bool,
}

#[allow(clippy::len_without_is_empty)]
impl Region {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// A copy of its bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }
}

/// Creates a region from bytes.
pub fn region(base: u64, bytes: &[u8], label: String, read_only: bool) -> Region {
    Region { base, data: bytes.iter().map(|&b| AtomicU8::new(b)).collect(), label, read_only }
}

/// The next base after `end`.
pub fn next_base(end: u64) -> u64 {
    (end + GAP).div_ceil(256) * 256
}

/// The regions one launch may touch, and the locks that make `atom` atomic across blocks.
pub struct GlobalView<'a> {
    /// Sorted by base.
    pub regions: Vec<&'a Region>,
    locks: Vec<Mutex<()>>,
    /// Per region (same order), the race-check shadow of its bytes; empty when off.
    shadow: Vec<RegionShadow>,
    /// Per region, bitsets of the bytes read and written (profiling); empty when off.
    touched: Vec<[Box<[AtomicU64]>; 2]>,
}

/// Who made a global access: the block's linear index, the thread's linear index in the block,
/// the bytes of a 4-byte word it touched and the block's barrier epoch, packed into one word
/// (0: nobody).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accessor(u64);

const EPOCH_BITS: u32 = 18;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;

impl Accessor {
    /// Packs block (< 2^32 - 1), thread (< 1024) and epoch (kept modulo 2^18).
    pub fn new(block: u64, thread: usize, epoch: u32) -> Self {
        Self(((block + 1) << 32) | ((thread as u64) << 22) | (u64::from(epoch) & EPOCH_MASK))
    }
    /// The block's linear index.
    pub fn block(self) -> u64 {
        (self.0 >> 32) - 1
    }
    /// The thread's linear index in its block.
    pub fn thread(self) -> usize {
        ((self.0 >> 22) & 0x3ff) as usize
    }
    fn bytes(self) -> u64 {
        (self.0 >> EPOCH_BITS) & 0xf
    }
    fn with_bytes(self, m: u64) -> Self {
        Self((self.0 & !(0xf << EPOCH_BITS)) | (m << EPOCH_BITS))
    }
    fn same_thread(self, o: Accessor) -> bool {
        self.0 >> 22 == o.0 >> 22
    }
    /// Touches some of `o`'s bytes and is unordered with it (another thread of another block,
    /// or of the same block in the same barrier epoch).
    fn races(self, o: Accessor) -> bool {
        o.0 != 0
            && self.bytes() & o.bytes() != 0
            && !self.same_thread(o)
            && (self.0 >> 32 != o.0 >> 32 || self.0 & EPOCH_MASK == o.0 & EPOCH_MASK)
    }
}

/// A global-memory race found by [`GlobalView::check_race`].
pub struct GlobalRace {
    /// `read-after-write`, `write-after-read` or `write-after-write`.
    pub hazard: &'static str,
    /// The buffer and offset.
    pub detail: String,
    /// The other access.
    pub other: Accessor,
    /// Its PTX line.
    pub other_line: u32,
}

/// 4-byte words per shadow page.
const SHADOW_PAGE: usize = 1024;

/// One 4-byte word's last writer and a reader that may still race (each with the bytes of the
/// word it touched), and their PTX lines.
#[derive(Default)]
struct WordShadow {
    w: AtomicU64,
    r: AtomicU64,
    w_line: AtomicU32,
    r_line: AtomicU32,
}

/// Shadow pages of one region, allocated when first touched.
struct RegionShadow {
    pages: Box<[OnceLock<Box<[WordShadow]>>]>,
}

impl RegionShadow {
    fn new(len: u64) -> Self {
        Self { pages: (0..(len as usize).div_ceil(4 * SHADOW_PAGE)).map(|_| OnceLock::new()).collect() }
    }
    fn word(&self, w: usize) -> &WordShadow {
        let page =
            self.pages[w / SHADOW_PAGE].get_or_init(|| (0..SHADOW_PAGE).map(|_| WordShadow::default()).collect());
        &page[w % SHADOW_PAGE]
    }
}

/// Why a global access failed.
pub enum GlobalFault {
    /// Not inside any region; a description of the nearest one.
    OutOfBounds(String),
    /// A write to read-only memory.
    ReadOnly(String),
}

impl<'a> GlobalView<'a> {
    /// A view over `regions`.
    pub fn new(mut regions: Vec<&'a Region>, check_races: bool, profile: bool) -> Self {
        regions.sort_by_key(|r| r.base);
        let shadow =
            if check_races { regions.iter().map(|r| RegionShadow::new(r.len())).collect() } else { Vec::new() };
        let bits = |len: u64| (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect::<Box<[AtomicU64]>>();
        let touched =
            if profile { regions.iter().map(|r| [bits(r.len()), bits(r.len())]).collect() } else { Vec::new() };
        Self { regions, locks: (0..64).map(|_| Mutex::new(())).collect(), shadow, touched }
    }

    /// Marks `size` bytes at `addr` read (or written) for the profile's unique-byte counts.
    pub fn touch(&self, addr: u64, size: u64, write: bool) {
        let Some((ri, off)) = self.find_index(addr, size) else { return };
        let Some(sets) = self.touched.get(ri) else { return };
        let set = &sets[usize::from(write)];
        for b in off..off + size as usize {
            set[b / 64].fetch_or(1 << (b % 64), Ordering::Relaxed);
        }
    }

    /// Distinct bytes read and written so far (profiling).
    pub fn unique_bytes(&self) -> (u64, u64) {
        let count = |i: usize| -> u64 {
            self.touched
                .iter()
                .map(|s| s[i].iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum::<u64>())
                .sum()
        };
        (count(0), count(1))
    }

    /// Whether plain accesses are race-checked.
    pub fn checks_races(&self) -> bool {
        !self.shadow.is_empty()
    }

    fn find_index(&self, addr: u64, size: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .position(|r| {
                addr >= r.base && addr.wrapping_add(size) <= r.base + r.len() && addr.wrapping_add(size) >= addr
            })
            .map(|i| (i, (addr - self.regions[i].base) as usize))
    }

    /// Records a plain (non-atomic) access of `size` bytes at `addr` by `who` and reports a
    /// race with an earlier access it is unordered with (another block, or the same block
    /// without a barrier between), at least one of them a write. Each 4-byte word remembers
    /// its last writer and one reader that may still race, with the bytes they touched.
    /// Read-only regions are not tracked.
    pub fn check_race(&self, addr: u64, size: u64, write: bool, who: Accessor, line: u32) -> Result<(), GlobalRace> {
        let Some((ri, off)) = self.find_index(addr, size) else { return Ok(()) };
        let region = self.regions[ri];
        if region.read_only {
            return Ok(());
        }
        let shadow = &self.shadow[ri];
        let end = off + size as usize;
        for word in off / 4..end.div_ceil(4) {
            let lo = off.max(4 * word) - 4 * word;
            let hi = end.min(4 * word + 4) - 4 * word;
            let me = who.with_bytes(((1u64 << hi) - 1) & !((1u64 << lo) - 1));
            let s = shadow.word(word);
            let race = |hazard, other: u64, other_line: &AtomicU32| GlobalRace {
                hazard,
                detail: format!("offset {} of {}", 4 * word + lo, region.label),
                other: Accessor(other),
                other_line: other_line.load(Ordering::Relaxed),
            };
            let w = Accessor(s.w.load(Ordering::Relaxed));
            if me.races(w) {
                return Err(race(if write { "write-after-write" } else { "read-after-write" }, w.0, &s.w_line));
            }
            let r = Accessor(s.r.load(Ordering::Relaxed));
            if write {
                if me.races(r) {
                    return Err(race("write-after-read", r.0, &s.r_line));
                }
                let merged = if w.0 != 0 && w.same_thread(me) && w.0 & EPOCH_MASK == me.0 & EPOCH_MASK {
                    me.with_bytes(me.bytes() | w.bytes())
                } else {
                    me
                };
                s.w.store(merged.0, Ordering::Relaxed);
                s.w_line.store(line, Ordering::Relaxed);
            } else if r.0 == 0 || r.same_thread(me) || !me.with_bytes(0xf).races(r.with_bytes(0xf)) {
                // Keep a reader of another thread that may still race with a later write.
                let merged = if r.0 != 0 && r.same_thread(me) { me.with_bytes(me.bytes() | r.bytes()) } else { me };
                if merged != r {
                    s.r.store(merged.0, Ordering::Relaxed);
                    s.r_line.store(line, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn find(&self, addr: u64, size: u64) -> Result<(&'a Region, usize), GlobalFault> {
        if let Some((i, off)) = self.find_index(addr, size) {
            return Ok((self.regions[i], off));
        }
        // Describe the nearest region.
        let near = self.regions.iter().min_by_key(|r| {
            if addr < r.base {
                r.base - addr
            } else {
                addr.saturating_sub(r.base + r.len())
            }
        });
        Err(GlobalFault::OutOfBounds(match near {
            Some(r) if addr >= r.base && addr < r.base + r.len() + GAP => {
                format!("{} bytes at offset {} of {} ({} bytes long)", size, addr - r.base, r.label, r.len())
            }
            Some(r) if addr < r.base && r.base - addr < GAP => {
                format!("{} bytes at {} bytes before {}", size, r.base - addr, r.label)
            }
            _ => format!("{size} bytes at 0x{addr:x}, in no buffer passed to the launch"),
        }))
    }

    /// Little-endian load of `size` (1..=8) bytes.
    pub fn load(&self, addr: u64, size: u64) -> Result<u64, GlobalFault> {
        let (r, off) = self.find(addr, size)?;
        let mut v = 0u64;
        for i in (0..size as usize).rev() {
            v = (v << 8) | u64::from(r.data[off + i].load(Ordering::Relaxed));
        }
        Ok(v)
    }

    /// Little-endian store of `size` (1..=8) bytes.
    pub fn store(&self, addr: u64, size: u64, v: u64) -> Result<(), GlobalFault> {
        let (r, off) = self.find(addr, size)?;
        if r.read_only {
            return Err(GlobalFault::ReadOnly(r.label.clone()));
        }
        for i in 0..size as usize {
            r.data[off + i].store((v >> (8 * i)) as u8, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Read-modify-write under a lock: `f(old) -> new`; returns old.
    pub fn rmw(&self, addr: u64, size: u64, f: impl FnOnce(u64) -> u64) -> Result<u64, GlobalFault> {
        let _guard = self.locks[((addr >> 3) % 64) as usize].lock().unwrap_or_else(|e| e.into_inner());
        let old = self.load(addr, size)?;
        self.store(addr, size, f(old))?;
        Ok(old)
    }
}
