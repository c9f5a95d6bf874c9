//! Per-document KV, computed once and found again by content address.
//!
//! A document attends only to itself, so every layer's keys and values depend only on its own
//! tokens. [`DocCache`] stores them once, keys rotated for positions `0..tokens`, under the
//! document's [`DocKey`]; placing the document at offset `s` of a context rotates the cached keys
//! by `s` ([`DocCache::place`]); values are used as they are.
//!
//! Two tiers:
//! - memory: a byte budget; least-recently-used entries are evicted first, except entries that
//!   are pinned ([`DocCache::pin`]) or in use (an `Arc` handed out by the cache is still held);
//! - disk (optional): one verified file per entry ([`disk`] describes the format), written through
//!   on every prefill. A corrupt, truncated or foreign file is a miss: the document is prefilled
//!   again and the file replaced, never returned.
//!
//! Concurrency: one [`DocCache`] is shared by threads (`&self` everywhere). Within a process a key
//! is loaded or prefilled by one thread while the others asking for it wait; processes sharing a
//! directory take a file lock per key stripe around a prefill, so each document is prefilled once
//! even across processes. A prefill closure must not call back into the same cache.

pub mod disk;
mod memory;
#[cfg(test)]
mod tests;

use crate::rope::{Rope, RopeConfig};
use crate::{DocKey, Error};
use disk::{DiskTier, Expect, Loaded};
use memory::MemoryTier;
use squid_cuda::Element;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The dims of one document's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DocShape {
    /// Transformer layers.
    pub layers: usize,
    /// Tokens of the document.
    pub tokens: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dims per head.
    pub head_dim: usize,
}

impl DocShape {
    /// Elements of one layer's K (or V): `tokens * kv_heads * head_dim` (wrapping if the
    /// product overflows: [`DocShape::checked_len`] says whether it fits).
    pub fn layer_len(&self) -> usize {
        self.tokens.wrapping_mul(self.kv_heads).wrapping_mul(self.head_dim)
    }

    /// Elements of K (or V) over all layers (wrapping like [`DocShape::layer_len`]; every
    /// [`DocKv`] has a shape whose count fits).
    pub fn len(&self) -> usize {
        self.layers.wrapping_mul(self.layer_len())
    }

    /// Elements of K (or V) over all layers, or `None` if the count overflows `usize`.
    pub fn checked_len(&self) -> Option<usize> {
        [self.layers, self.tokens, self.kv_heads, self.head_dim].iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// Whether the document has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every layer's keys (rotated for positions `0..tokens`) and values of one document.
///
/// `k` and `v` are `[layers, tokens, kv_heads, head_dim]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct DocKv<T: Element> {
    shape: DocShape,
    k: Vec<T>,
    v: Vec<T>,
}

impl<T: Element> DocKv<T> {
    /// Wraps K and V after checking their lengths against the shape.
    pub fn new(shape: DocShape, k: Vec<T>, v: Vec<T>) -> Result<Self, Error> {
        // A count that wrapped could match a short buffer: refuse it first.
        let Some(len) = shape.checked_len() else {
            return Err(Error::ShapeMismatch(format!("document shape {shape:?} has more elements than usize holds")));
        };
        for (name, x) in [("K", &k), ("V", &v)] {
            if x.len() != len {
                return Err(Error::ShapeMismatch(format!(
                    "document {name} has {} elements, shape {shape:?} needs {}",
                    x.len(),
                    shape.len()
                )));
            }
        }
        Ok(Self { shape, k, v })
    }

    /// Its dims.
    pub fn shape(&self) -> &DocShape {
        &self.shape
    }

    /// All layers' keys at position 0.
    pub fn k(&self) -> &[T] {
        &self.k
    }

    /// All layers' values.
    pub fn v(&self) -> &[T] {
        &self.v
    }

    /// One layer's keys at position 0: `[tokens, kv_heads, head_dim]`. Panics if
    /// `layer >= shape().layers`, as slice indexing does ([`DocKv::place_layer_into`] checks it).
    pub fn k_layer(&self, layer: usize) -> &[T] {
        let n = self.shape.layer_len();
        &self.k[layer * n..(layer + 1) * n]
    }

    /// One layer's values: `[tokens, kv_heads, head_dim]`. Panics if `layer >= shape().layers`.
    pub fn v_layer(&self, layer: usize) -> &[T] {
        let n = self.shape.layer_len();
        &self.v[layer * n..(layer + 1) * n]
    }

    /// Bytes held (K and V).
    pub fn bytes(&self) -> usize {
        2 * self.shape.len() * std::mem::size_of::<T>()
    }

    fn check_rope(&self, rope: &Rope) -> Result<(), Error> {
        if rope.config().head_dim != self.shape.head_dim {
            return Err(Error::ShapeMismatch(format!(
                "place: rope head_dim {} but the document has {}",
                rope.config().head_dim,
                self.shape.head_dim
            )));
        }
        Ok(())
    }

    /// Writes layer `layer`'s keys, moved to positions `offset..offset + tokens`, into `out`
    /// (`[tokens, kv_heads, head_dim]`), e.g. straight into a context's K buffer.
    pub fn place_layer_into(&self, rope: &Rope, layer: usize, offset: u64, out: &mut [T]) -> Result<(), Error> {
        self.check_rope(rope)?;
        if layer >= self.shape.layers {
            return Err(Error::OutOfRange(format!("layer {layer} of a {}-layer document", self.shape.layers)));
        }
        if out.len() != self.shape.layer_len() {
            return Err(Error::ShapeMismatch(format!(
                "place: output has {} elements, one layer has {}",
                out.len(),
                self.shape.layer_len()
            )));
        }
        out.copy_from_slice(self.k_layer(layer));
        rope.reposition(out, self.shape.kv_heads, 0, offset)
    }

    /// All layers' keys moved to positions `offset..offset + tokens` (`[layers, tokens, kv_heads,
    /// head_dim]`).
    pub fn place(&self, rope: &Rope, offset: u64) -> Result<Vec<T>, Error> {
        self.check_rope(rope)?;
        let mut out = self.k.clone();
        if self.shape.kv_heads > 0 {
            rope.reposition(&mut out, self.shape.kv_heads, 0, offset)?;
        }
        Ok(out)
    }
}

/// What a [`DocCache`] stores and where.
#[derive(Debug, Clone)]
pub struct DocCacheConfig {
    /// The model whose KV is cached; written into every file and checked on load.
    pub model_id: String,
    /// Layers of the model.
    pub layers: usize,
    /// Key/value heads of the model.
    pub kv_heads: usize,
    /// Dims per head.
    pub head_dim: usize,
    /// The model's rotary embedding, used by [`DocCache::place`].
    pub rope: RopeConfig,
    /// Byte budget of the memory tier (entries in use may exceed it until they are released).
    pub memory_budget_bytes: usize,
    /// The disk tier's directory; `None` for memory only.
    pub disk_dir: Option<PathBuf>,
}

impl DocCacheConfig {
    /// A memory-only cache of 1 GiB with the default RoPE for `head_dim`.
    pub fn new(model_id: impl Into<String>, layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            model_id: model_id.into(),
            layers,
            kv_heads,
            head_dim,
            rope: RopeConfig::new(head_dim),
            memory_budget_bytes: 1 << 30,
            disk_dir: None,
        }
    }

    /// Adds a disk tier in `dir` (created if missing).
    pub fn with_disk(mut self, dir: impl Into<PathBuf>) -> Self {
        self.disk_dir = Some(dir.into());
        self
    }

    /// Sets the memory tier's budget in bytes.
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        self.memory_budget_bytes = bytes;
        self
    }

    /// Sets the rotary embedding.
    pub fn with_rope(mut self, rope: RopeConfig) -> Self {
        self.rope = rope;
        self
    }
}

/// Counters of one [`DocCache`] since it was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from memory.
    pub memory_hits: u64,
    /// Lookups answered from disk (then kept in memory).
    pub disk_hits: u64,
    /// Lookups found in neither tier (prefilled if a prefill was given).
    pub misses: u64,
    /// Entries loaded from disk by [`DocCache::prefetch`].
    pub prefetched: u64,
    /// Entries dropped from memory to stay within budget.
    pub evictions: u64,
    /// Files on disk that were corrupt, truncated or foreign (each a miss).
    pub rejected_files: u64,
    /// The last rejected file and why (`<path>: truncated`, `... checksum mismatch`, ...).
    pub last_rejected: Option<String>,
    /// Entry files that could not be written (the entry stayed in memory).
    pub write_errors: u64,
    /// Bytes in the memory tier now.
    pub memory_bytes: u64,
    /// Entries in the memory tier now.
    pub memory_entries: usize,
    /// Bytes of entry files in the directory now (every process's; a directory scan).
    pub disk_bytes: u64,
    /// Entry files in the directory now.
    pub disk_entries: usize,
    /// Time spent reading and verifying files (prefetch included).
    pub load_time: Duration,
    /// Time spent in prefill closures.
    pub prefill_time: Duration,
    /// Time spent writing files.
    pub write_time: Duration,
}

/// What one [`DocCache::prefetch`] call did, key by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Loaded from disk into memory.
    pub loaded: usize,
    /// Already in memory, or being loaded by another thread.
    pub already_present: usize,
    /// Not on disk (or no disk tier), or the file was rejected: left for a prefill.
    pub not_found: usize,
    /// Failed with an I/O error.
    pub errors: usize,
}

/// A prefetch under way; [`PrefetchTicket::wait`] blocks until it is done.
#[derive(Debug)]
pub struct PrefetchTicket {
    done: mpsc::Receiver<PrefetchReport>,
}

impl PrefetchTicket {
    /// Blocks until every key of the request was handled.
    pub fn wait(self) -> PrefetchReport {
        self.done.recv().unwrap_or_default()
    }
}

#[derive(Default)]
struct Counters {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    prefetched: AtomicU64,
    evictions: AtomicU64,
    rejected_files: AtomicU64,
    write_errors: AtomicU64,
    load_nanos: AtomicU64,
    prefill_nanos: AtomicU64,
    write_nanos: AtomicU64,
}

fn add_time(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
}

struct State<T: Element> {
    memory: MemoryTier<T>,
    /// Keys some thread is loading or prefilling right now.
    in_flight: HashSet<DocKey>,
}

/// The part shared with the prefetch thread.
struct Shared<T: Element> {
    config: DocCacheConfig,
    rope: Rope,
    state: Mutex<State<T>>,
    /// Signalled whenever a key leaves `in_flight`.
    settled: Condvar,
    disk: Option<DiskTier>,
    counters: Counters,
    last_rejected: Mutex<Option<String>>,
}

/// Answer to "who provides this key".
enum Claim<'a, T: Element> {
    Hit(Arc<DocKv<T>>),
    /// The caller loads it; the others wait until the guard drops.
    Leader(Leader<'a, T>),
    /// Another thread is loading it (only when not waiting).
    Busy,
}

/// Holds a key in `in_flight`; dropping it (also by unwinding) releases the waiters.
struct Leader<'a, T: Element> {
    shared: &'a Shared<T>,
    key: DocKey,
}

impl<T: Element> Drop for Leader<'_, T> {
    fn drop(&mut self) {
        self.shared.lock().in_flight.remove(&self.key);
        self.shared.settled.notify_all();
    }
}

impl<T: Element> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic elsewhere (e.g. in a prefill) cannot leave the state half-updated: every
        // mutation is a few plain statements, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expect(&self) -> Expect<'_> {
        Expect {
            model_id: &self.config.model_id,
            layers: self.config.layers,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    fn claim(&self, key: DocKey, wait: bool, count_hit: bool) -> Claim<'_, T> {
        let mut state = self.lock();
        loop {
            if let Some(kv) = state.memory.get(&key) {
                if count_hit {
                    self.counters.memory_hits.fetch_add(1, Relaxed);
                }
                return Claim::Hit(kv);
            }
            if !state.in_flight.contains(&key) {
                state.in_flight.insert(key);
                return Claim::Leader(Leader { shared: self, key });
            }
            if !wait {
                return Claim::Busy;
            }
            state = self.settled.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn insert(&self, key: DocKey, kv: DocKv<T>) -> Arc<DocKv<T>> {
        let kv = Arc::new(kv);
        let evicted = self.lock().memory.insert(key, Arc::clone(&kv));
        self.counters.evictions.fetch_add(evicted, Relaxed);
        kv
    }

    /// A verified entry from disk, or `None` (absent or rejected). A rejection is counted unless
    /// `seen_rejected` says this lookup already counted the same file.
    fn load_from_disk(
        &self,
        disk: &DiskTier,
        key: &DocKey,
        seen_rejected: &mut bool,
    ) -> Result<Option<DocKv<T>>, Error> {
        let start = Instant::now();
        let loaded = disk.load::<T>(key, &self.expect());
        add_time(&self.counters.load_nanos, start);
        Ok(match loaded? {
            Loaded::Absent => None,
            Loaded::Entry(kv) => Some(kv),
            Loaded::Rejected(why) => {
                if !std::mem::replace(seen_rejected, true) {
                    self.counters.rejected_files.fetch_add(1, Relaxed);
                    let what = format!("{}: {why}", disk.path_of(key).display());
                    *self.last_rejected.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
                }
                None
            }
        })
    }

    fn check_shape(&self, kv: &DocKv<T>) -> Result<(), Error> {
        let s = kv.shape();
        let c = &self.config;
        if (s.layers, s.kv_heads, s.head_dim) != (c.layers, c.kv_heads, c.head_dim) {
            return Err(Error::ShapeMismatch(format!(
                "prefill returned [{} layers, {} heads, {} dims], the cache holds [{}, {}, {}]",
                s.layers, s.kv_heads, s.head_dim, c.layers, c.kv_heads, c.head_dim
            )));
        }
        Ok(())
    }

    fn run_prefill<F, E>(&self, prefill: F) -> Result<DocKv<T>, Error>
    where
        F: FnOnce() -> Result<DocKv<T>, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.counters.misses.fetch_add(1, Relaxed);
        let start = Instant::now();
        let kv = prefill().map_err(|e| Error::Prefill(e.into()));
        add_time(&self.counters.prefill_nanos, start);
        let kv = kv?;
        self.check_shape(&kv)?;
        Ok(kv)
    }

    /// Memory, then disk, then (if given) the prefill, written through to disk.
    fn lookup<F, E>(&self, key: DocKey, prefill: Option<F>) -> Result<Option<Arc<DocKv<T>>>, Error>
    where
        F: FnOnce() -> Result<DocKv<T>, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _leader = match self.claim(key, true, true) {
            Claim::Hit(kv) => return Ok(Some(kv)),
            Claim::Leader(leader) => leader,
            Claim::Busy => unreachable!("claim waits"),
        };
        let Some(disk) = &self.disk else {
            let Some(prefill) = prefill else {
                self.counters.misses.fetch_add(1, Relaxed);
                return Ok(None);
            };
            let kv = self.run_prefill(prefill)?;
            return Ok(Some(self.insert(key, kv)));
        };
        let mut seen_rejected = false;
        if let Some(kv) = self.load_from_disk(disk, &key, &mut seen_rejected)? {
            self.counters.disk_hits.fetch_add(1, Relaxed);
            return Ok(Some(self.insert(key, kv)));
        }
        let Some(prefill) = prefill else {
            self.counters.misses.fetch_add(1, Relaxed);
            return Ok(None);
        };
        // Another process may be prefilling this key: wait for its lock, then look again.
        let _stripe = disk.lock(&key)?;
        if let Some(kv) = self.load_from_disk(disk, &key, &mut seen_rejected)? {
            self.counters.disk_hits.fetch_add(1, Relaxed);
            return Ok(Some(self.insert(key, kv)));
        }
        let kv = self.run_prefill(prefill)?;
        let start = Instant::now();
        if disk.store(&key, &self.config.model_id, &kv).is_err() {
            self.counters.write_errors.fetch_add(1, Relaxed);
        }
        add_time(&self.counters.write_nanos, start);
        Ok(Some(self.insert(key, kv)))
    }

    fn prefetch_one(&self, key: DocKey, report: &mut PrefetchReport) {
        let _leader = match self.claim(key, false, false) {
            Claim::Hit(_) | Claim::Busy => {
                report.already_present += 1;
                return;
            }
            Claim::Leader(leader) => leader,
        };
        let Some(disk) = &self.disk else {
            report.not_found += 1;
            return;
        };
        match self.load_from_disk(disk, &key, &mut false) {
            Ok(Some(kv)) => {
                self.counters.prefetched.fetch_add(1, Relaxed);
                self.insert(key, kv);
                report.loaded += 1;
            }
            Ok(None) => report.not_found += 1,
            Err(_) => report.errors += 1,
        }
    }
}

struct PrefetchJob {
    keys: Vec<DocKey>,
    done: mpsc::Sender<PrefetchReport>,
}

struct Prefetcher {
    jobs: mpsc::Sender<PrefetchJob>,
    thread: JoinHandle<()>,
}

/// Content-addressed per-document KV with a memory and an optional disk tier.
///
/// `T` is the storage type of K and V (f32, bf16 or f16).
pub struct DocCache<T: Element> {
    shared: Arc<Shared<T>>,
    prefetcher: Mutex<Option<Prefetcher>>,
}

impl<T: Element> std::fmt::Debug for DocCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocCache").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

impl<T: Element> DocCache<T> {
    /// Opens a cache (creating the disk directory if one is configured).
    pub fn new(config: DocCacheConfig) -> Result<Self, Error> {
        if config.layers == 0 || config.kv_heads == 0 || config.head_dim == 0 {
            return Err(Error::InvalidConfig(format!(
                "doc cache: layers {}, kv_heads {}, head_dim {} must be positive",
                config.layers, config.kv_heads, config.head_dim
            )));
        }
        if config.rope.head_dim != config.head_dim {
            return Err(Error::InvalidConfig(format!(
                "doc cache: rope head_dim {} differs from head_dim {}",
                config.rope.head_dim, config.head_dim
            )));
        }
        let rope = Rope::new(config.rope)?;
        let disk = config.disk_dir.as_deref().map(|dir| DiskTier::open(dir, T::DTYPE)).transpose()?;
        let shared = Shared {
            rope,
            state: Mutex::new(State { memory: MemoryTier::new(config.memory_budget_bytes), in_flight: HashSet::new() }),
            settled: Condvar::new(),
            disk,
            counters: Counters::default(),
            last_rejected: Mutex::new(None),
            config,
        };
        Ok(Self { shared: Arc::new(shared), prefetcher: Mutex::new(None) })
    }

    /// Its configuration.
    pub fn config(&self) -> &DocCacheConfig {
        &self.shared.config
    }

    /// The rotary embedding used by [`DocCache::place`].
    pub fn rope(&self) -> &Rope {
        &self.shared.rope
    }

    /// The entry of `key` from memory or disk; on a miss, runs `prefill` (only then), checks the
    /// shape, writes the result through to disk and keeps it in memory.
    ///
    /// The returned `Arc` keeps the entry in memory (never evicted) while it is held.
    pub fn get_or_insert_with<F, E>(&self, key: DocKey, prefill: F) -> Result<Arc<DocKv<T>>, Error>
    where
        F: FnOnce() -> Result<DocKv<T>, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Ok(self.shared.lookup(key, Some(prefill))?.expect("a lookup with a prefill always yields an entry"))
    }

    /// The entry of `key` from memory or disk, or `None` (counted as a miss).
    pub fn get(&self, key: DocKey) -> Result<Option<Arc<DocKv<T>>>, Error> {
        self.shared.lookup(key, None::<fn() -> Result<DocKv<T>, Error>>)
    }

    /// Whether `key` is in the memory tier now (does not count as a lookup or touch its age).
    pub fn in_memory(&self, key: &DocKey) -> bool {
        self.shared.lock().memory.contains(key)
    }

    /// The entry's keys moved to positions `offset..offset + tokens`: `[layers, tokens, kv_heads,
    /// head_dim]`. Values need no change.
    pub fn place(&self, entry: &DocKv<T>, offset: u64) -> Result<Vec<T>, Error> {
        entry.place(&self.shared.rope, offset)
    }

    /// Keeps `key` in memory whatever the budget until a matching [`DocCache::unpin`]. False if it
    /// is not in memory.
    pub fn pin(&self, key: &DocKey) -> bool {
        self.shared.lock().memory.pin(key)
    }

    /// Removes one pin; the entry may then be evicted. False if it was not pinned.
    pub fn unpin(&self, key: &DocKey) -> bool {
        let mut state = self.shared.lock();
        let was = state.memory.unpin(key);
        let evicted = state.memory.evict_over_budget();
        self.shared.counters.evictions.fetch_add(evicted, Relaxed);
        was
    }

    /// Evicts least-recently-used entries no longer in use until within budget; returns how many.
    pub fn trim(&self) -> u64 {
        let evicted = self.shared.lock().memory.evict_over_budget();
        self.shared.counters.evictions.fetch_add(evicted, Relaxed);
        evicted
    }

    /// Drops `key` from memory (its file stays). False if it was not in memory.
    pub fn forget(&self, key: &DocKey) -> bool {
        self.shared.lock().memory.forget(key)
    }

    /// Starts loading `keys` from disk into memory on a background thread and returns at once;
    /// a later lookup of a key still loading waits for that load instead of reading again.
    pub fn prefetch(&self, keys: &[DocKey]) -> PrefetchTicket {
        let (done, rx) = mpsc::channel();
        let job = PrefetchJob { keys: keys.to_vec(), done };
        let mut slot = self.prefetcher.lock().unwrap_or_else(|p| p.into_inner());
        let prefetcher = slot.get_or_insert_with(|| {
            let (jobs, queue) = mpsc::channel::<PrefetchJob>();
            let shared = Arc::clone(&self.shared);
            let thread = std::thread::Builder::new()
                .name("squid-doc-prefetch".into())
                .spawn(move || {
                    for job in queue {
                        let mut report = PrefetchReport::default();
                        for key in job.keys {
                            shared.prefetch_one(key, &mut report);
                        }
                        let _ = job.done.send(report);
                    }
                })
                .expect("spawning the prefetch thread");
            Prefetcher { jobs, thread }
        });
        if let Err(mpsc::SendError(job)) = prefetcher.jobs.send(job) {
            // The thread is gone (it panicked): do the work here rather than lose it.
            let mut report = PrefetchReport::default();
            for key in job.keys {
                self.shared.prefetch_one(key, &mut report);
            }
            let _ = job.done.send(report);
        }
        PrefetchTicket { done: rx }
    }

    /// The counters, memory and disk usage now.
    pub fn stats(&self) -> CacheStats {
        let c = &self.shared.counters;
        let (memory_bytes, memory_entries) = {
            let state = self.shared.lock();
            (state.memory.bytes() as u64, state.memory.len())
        };
        let (disk_bytes, disk_entries) = self.shared.disk.as_ref().map_or((0, 0), DiskTier::usage);
        CacheStats {
            memory_hits: c.memory_hits.load(Relaxed),
            disk_hits: c.disk_hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            prefetched: c.prefetched.load(Relaxed),
            evictions: c.evictions.load(Relaxed),
            rejected_files: c.rejected_files.load(Relaxed),
            last_rejected: self.shared.last_rejected.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            write_errors: c.write_errors.load(Relaxed),
            memory_bytes,
            memory_entries,
            disk_bytes,
            disk_entries,
            load_time: Duration::from_nanos(c.load_nanos.load(Relaxed)),
            prefill_time: Duration::from_nanos(c.prefill_nanos.load(Relaxed)),
            write_time: Duration::from_nanos(c.write_nanos.load(Relaxed)),
        }
    }

    /// The path of `key`'s file in the disk tier, if there is one (whether or not it exists).
    pub fn file_path(&self, key: &DocKey) -> Option<PathBuf> {
        self.shared.disk.as_ref().map(|d| d.path_of(key))
    }
}

impl<T: Element> Drop for DocCache<T> {
    fn drop(&mut self) {
        let prefetcher = self.prefetcher.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Prefetcher { jobs, thread }) = prefetcher {
            drop(jobs); // ends the thread's loop once queued jobs are done
            let _ = thread.join();
        }
    }
}
