//! The PTX cache: compiled PTX keyed by (source hash, arch, options, compiler version), kept in
//! memory and in one file per entry on disk.
//!
//! Disk entries are written to a temporary file in the same directory, fsynced and renamed, so
//! a reader sees a whole entry or none. Each file starts with a header holding its key, the
//! body's length and the body's BLAKE3 hash; a file whose header, length or hash does not match
//! is a miss (and is removed), never PTX handed to the driver.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::{Arch, Error};

/// Overrides the cache directory (default: the user's cache dir + `squid/ptx`).
pub const CACHE_DIR_ENV: &str = "SQUID_CACHE_DIR";
const HEADER_MAGIC: &str = "// squid-ptx-cache v1";

/// What an entry is filed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// Hashes everything the PTX depends on: the full source, the target, the compile options
    /// and the compiler's version.
    pub fn new(source: &str, arch: Arch, options: &[String], compiler: &str) -> Self {
        let mut h = blake3::Hasher::new();
        for part in [source, &arch.to_string(), compiler] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(&(options.len() as u64).to_le_bytes());
        for o in options {
            h.update(&(o.len() as u64).to_le_bytes());
            h.update(o.as_bytes());
        }
        Self(*h.finalize().as_bytes())
    }

    /// 64 hex digits: the entry's file name stem.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

/// Where a [`PtxCache::get_or_compile`] answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheHit {
    /// Found in memory.
    Memory,
    /// Read and verified from disk.
    Disk,
    /// Compiled now.
    Miss,
}

/// Counters of cache traffic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Answers from memory.
    pub memory_hits: u64,
    /// Answers from disk.
    pub disk_hits: u64,
    /// Compilations.
    pub misses: u64,
    /// Disk files rejected (bad header, length or hash).
    pub corrupt_entries: u64,
    /// Disk writes that failed (the PTX was still returned).
    pub write_errors: u64,
}

/// Compiled PTX, in memory and optionally on disk.
#[derive(Debug, Default)]
pub struct PtxCache {
    memory: Mutex<HashMap<CacheKey, Arc<str>>>,
    dir: Option<PathBuf>,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    corrupt_entries: AtomicU64,
    write_errors: AtomicU64,
}

impl PtxCache {
    /// A cache that lives in memory only.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// A cache backed by `dir` (created on first write).
    pub fn with_dir(dir: impl Into<PathBuf>) -> Self {
        Self { dir: Some(dir.into()), ..Self::default() }
    }

    /// `SQUID_CACHE_DIR`, else the user's cache directory + `squid/ptx`.
    pub fn default_dir() -> Option<PathBuf> {
        match std::env::var_os(CACHE_DIR_ENV) {
            Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
            _ => dirs::cache_dir().map(|d| d.join("squid").join("ptx")),
        }
    }

    /// The process-wide cache, on [`PtxCache::default_dir`].
    pub fn global() -> &'static PtxCache {
        static GLOBAL: OnceLock<PtxCache> = OnceLock::new();
        GLOBAL.get_or_init(|| match Self::default_dir() {
            Some(dir) => Self::with_dir(dir),
            None => Self::in_memory(),
        })
    }

    /// The disk directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            memory_hits: self.memory_hits.load(Ordering::Relaxed),
            disk_hits: self.disk_hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            corrupt_entries: self.corrupt_entries.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }

    /// The PTX for `key`: from memory, else from a verified disk entry, else from `compile`
    /// (whose result is then stored in both tiers).
    pub fn get_or_compile(
        &self,
        key: CacheKey,
        compile: impl FnOnce() -> Result<String, Error>,
    ) -> Result<(Arc<str>, CacheHit), Error> {
        if let Some(ptx) = self.lock().get(&key) {
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((ptx.clone(), CacheHit::Memory));
        }
        if let Some(ptx) = self.read_disk(key) {
            self.disk_hits.fetch_add(1, Ordering::Relaxed);
            let ptx: Arc<str> = ptx.into();
            self.lock().insert(key, ptx.clone());
            return Ok((ptx, CacheHit::Disk));
        }
        let ptx = compile()?;
        self.misses.fetch_add(1, Ordering::Relaxed);
        if self.write_disk(key, &ptx).is_err() {
            self.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        let ptx: Arc<str> = ptx.into();
        self.lock().insert(key, ptx.clone());
        Ok((ptx, CacheHit::Miss))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<str>>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts).
        self.memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn entry_path(&self, key: CacheKey) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{}.ptx", key.to_hex())))
    }

    fn read_disk(&self, key: CacheKey) -> Option<String> {
        let path = self.entry_path(key)?;
        let bytes = fs::read(&path).ok()?;
        match decode_entry(key, &bytes) {
            Some(ptx) => Some(ptx),
            None => {
                self.corrupt_entries.fetch_add(1, Ordering::Relaxed);
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    fn write_disk(&self, key: CacheKey, ptx: &str) -> Result<(), Error> {
        let Some(path) = self.entry_path(key) else { return Ok(()) };
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
        tmp.write_all(&encode_entry(key, ptx)).map_err(|e| Error::io(tmp.path(), e))?;
        tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        Ok(())
    }
}

fn encode_entry(key: CacheKey, ptx: &str) -> Vec<u8> {
    let header = format!("{HEADER_MAGIC} {} {} {}\n", key.to_hex(), ptx.len(), blake3::hash(ptx.as_bytes()).to_hex());
    let mut out = header.into_bytes();
    out.extend_from_slice(ptx.as_bytes());
    out
}

fn decode_entry(key: CacheKey, bytes: &[u8]) -> Option<String> {
    let newline = bytes.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..newline]).ok()?;
    let body = &bytes[newline + 1..];
    let mut fields = header.strip_prefix(HEADER_MAGIC)?.split_whitespace();
    let (file_key, len, hash) = (fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some() || file_key != key.to_hex() || len.parse::<usize>().ok()? != body.len() {
        return None;
    }
    if blake3::hash(body).to_hex().as_str() != hash {
        return None;
    }
    String::from_utf8(body.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: &str) -> CacheKey {
        CacheKey::new(src, Arch::SM80, &["-std=c++17".into()], "nvrtc 12.8")
    }

    #[test]
    fn key_covers_every_input() {
        let base = key("a");
        assert_ne!(base, key("b"));
        assert_ne!(base, CacheKey::new("a", Arch::SM90, &["-std=c++17".into()], "nvrtc 12.8"));
        assert_ne!(base, CacheKey::new("a", Arch::SM80, &[], "nvrtc 12.8"));
        assert_ne!(base, CacheKey::new("a", Arch::SM80, &["-std=c++17".into()], "nvrtc 12.9"));
    }

    #[test]
    fn compiles_once_then_hits_memory_then_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::with_dir(dir.path());
        let k = key("kernel");
        let (ptx, hit) = cache.get_or_compile(k, || Ok("PTX BODY".into())).unwrap();
        assert_eq!((&*ptx, hit), ("PTX BODY", CacheHit::Miss));
        let (_, hit) = cache.get_or_compile(k, || panic!("must not recompile")).unwrap();
        assert_eq!(hit, CacheHit::Memory);
        // A fresh process (new cache object) on the same directory reads the file.
        let cache2 = PtxCache::with_dir(dir.path());
        let (ptx, hit) = cache2.get_or_compile(k, || panic!("must not recompile")).unwrap();
        assert_eq!((&*ptx, hit), ("PTX BODY", CacheHit::Disk));
        assert_eq!(cache.stats().misses, 1);
        assert_eq!(cache2.stats().disk_hits, 1);
    }

    #[test]
    fn a_corrupt_or_truncated_or_foreign_entry_is_a_miss_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let k = key("kernel");
        PtxCache::with_dir(dir.path()).get_or_compile(k, || Ok("GOOD PTX".into())).unwrap();
        let path = dir.path().join(format!("{}.ptx", k.to_hex()));
        let good = fs::read(&path).unwrap();

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let truncated = good[..good.len() - 2].to_vec();
        let foreign = encode_entry(key("other"), "GOOD PTX");
        for bad in [flipped, truncated, foreign, b"garbage".to_vec(), Vec::new()] {
            fs::write(&path, &bad).unwrap();
            let cache = PtxCache::with_dir(dir.path());
            let (ptx, hit) = cache.get_or_compile(k, || Ok("RECOMPILED".into())).unwrap();
            assert_eq!((&*ptx, hit), ("RECOMPILED", CacheHit::Miss));
            assert_eq!(cache.stats().corrupt_entries, 1);
            // The bad file was replaced by a good one.
            assert_eq!(decode_entry(k, &fs::read(&path).unwrap()).as_deref(), Some("RECOMPILED"));
        }
    }

    #[test]
    fn compile_errors_are_not_cached() {
        let cache = PtxCache::in_memory();
        let k = key("broken");
        let err = cache.get_or_compile(k, || Err(Error::NoDevice)).unwrap_err();
        assert!(matches!(err, Error::NoDevice));
        let (ptx, hit) = cache.get_or_compile(k, || Ok("fixed".into())).unwrap();
        assert_eq!((&*ptx, hit), ("fixed", CacheHit::Miss));
    }

    #[test]
    fn an_unwritable_directory_still_returns_the_ptx() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let cache = PtxCache::with_dir(&file);
        let (ptx, _) = cache.get_or_compile(key("k"), || Ok("ptx".into())).unwrap();
        assert_eq!(&*ptx, "ptx");
        assert_eq!(cache.stats().write_errors, 1);
    }
}
