//! Device global memory: buffers at fixed virtual addresses, shared by all blocks of a launch
//! (byte-wise atomics, so blocks may run on different host threads without undefined
//! behaviour even when a kernel races).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

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
    pub fn new(mut regions: Vec<&'a Region>) -> Self {
        regions.sort_by_key(|r| r.base);
        Self { regions, locks: (0..64).map(|_| Mutex::new(())).collect() }
    }

    fn find(&self, addr: u64, size: u64) -> Result<(&'a Region, usize), GlobalFault> {
        for r in &self.regions {
            if addr >= r.base && addr.wrapping_add(size) <= r.base + r.len() && addr.wrapping_add(size) >= addr {
                return Ok((r, (addr - r.base) as usize));
            }
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
