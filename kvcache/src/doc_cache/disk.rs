//! The disk tier: one file per entry, written atomically, verified on every load.
//!
//! File `<dir>/<key hex>-<dtype>.kv`, all integers little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `SQUIDKV\0` |
//! | 4 | format version (u32, [`FORMAT_VERSION`]) |
//! | 4 | dtype (u8: 0 f32, 1 bf16, 2 f16) and 3 zero bytes |
//! | 32 | the document key |
//! | 4 + 4 + 4 | layers, kv heads, head dim (u32) |
//! | 8 | tokens (u64) |
//! | 8 | payload length in bytes (u64) |
//! | 4 + n | model id length (u32) and its UTF-8 bytes |
//! | 32 | blake3 of every byte above (without this field) followed by the payload |
//! | payload | K of every layer (`[layers, tokens, kv_heads, head_dim]`, at position 0), then V |
//!
//! A file is written to a unique temporary name in the same directory, fsynced, renamed over
//! the final name and the directory fsynced, so a reader sees either no file or a whole one.
//! Misses that must prefill take an exclusive `flock` on one of 256 lock files (by the key's
//! first byte) so that processes sharing the directory prefill each document once; two misses
//! whose keys share a first byte wait for each other. Readers take no lock: a rename replaces a
//! file as a whole. Temporary files older than an hour (a writer died before its rename) are
//! removed when a cache opens the directory.

use super::{DocKv, DocShape};
use crate::{DocKey, Error};
use squid_cuda::{DType, Element};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The file magic.
pub const MAGIC: &[u8; 8] = b"SQUIDKV\0";
/// The version of the layout above; a file of another version is foreign (a miss).
pub const FORMAT_VERSION: u32 = 1;
/// Extension of entry files.
pub const EXTENSION: &str = "kv";

/// Why a file on disk was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rejected {
    /// Shorter than its header says (a crash of a writer without atomic rename, a copy cut short).
    Truncated,
    /// Wrong magic, another format version, dtype, model, key or shape.
    Foreign(String),
    /// The checksum does not match the bytes.
    Corrupt,
    /// Something other than a regular file at the entry's path (a directory, a FIFO, a device).
    NotAFile,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => write!(f, "truncated"),
            Self::Foreign(why) => write!(f, "foreign: {why}"),
            Self::Corrupt => write!(f, "checksum mismatch"),
            Self::NotAFile => write!(f, "not a regular file"),
        }
    }
}

/// The outcome of reading one entry's file.
pub(super) enum Loaded<T: Element> {
    /// No file under that key.
    Absent,
    /// A verified entry.
    Entry(DocKv<T>),
    /// A file that must not be used.
    Rejected(Rejected),
}

/// What a file must contain to belong to this cache.
pub(super) struct Expect<'a> {
    pub model_id: &'a str,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// The directory of one cache and its lock files.
#[derive(Debug)]
pub(super) struct DiskTier {
    dir: PathBuf,
    /// Part of every file name, so caches of one model in different dtypes can share a directory.
    dtype: DType,
}

/// Distinguishes temporary files of threads of one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An exclusive advisory lock on one lock file, released when dropped (closing the file).
pub(super) struct StripeLock {
    file: File,
}

impl Drop for StripeLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the flock as well; unlocking first makes it prompt.
        let _ = fs4::FileExt::unlock(&self.file);
    }
}

impl DiskTier {
    /// Creates the directory (and its `locks/` folder) if needed.
    pub(super) fn open(dir: &Path, dtype: DType) -> Result<Self, Error> {
        let locks = dir.join("locks");
        fs::create_dir_all(&locks).map_err(|e| Error::io(&locks, e))?;
        remove_stale_temp_files(dir);
        Ok(Self { dir: dir.to_path_buf(), dtype })
    }

    pub(super) fn path_of(&self, key: &DocKey) -> PathBuf {
        self.dir.join(format!("{}-{}.{EXTENSION}", key.to_hex(), self.dtype.name()))
    }

    /// Blocks until this process holds the lock for `key`'s stripe.
    pub(super) fn lock(&self, key: &DocKey) -> Result<StripeLock, Error> {
        let path = self.dir.join("locks").join(format!("{:02x}.lock", key.as_bytes()[0]));
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        fs4::FileExt::lock(&file).map_err(|e| Error::io(&path, e))?;
        Ok(StripeLock { file })
    }

    /// Total bytes and count of entry files (a directory scan).
    pub(super) fn usage(&self) -> (u64, usize) {
        let Ok(read) = fs::read_dir(&self.dir) else { return (0, 0) };
        let mut bytes = 0;
        let mut count = 0;
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == EXTENSION) {
                if let Ok(meta) = entry.metadata() {
                    bytes += meta.len();
                    count += 1;
                }
            }
        }
        (bytes, count)
    }

    /// Reads and verifies the entry of `key`.
    pub(super) fn load<T: Element>(&self, key: &DocKey, expect: &Expect<'_>) -> Result<Loaded<T>, Error> {
        let path = self.path_of(key);
        let file = match open_entry(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Absent),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
        // Only a regular file is an entry: reading a directory fails for ever, a FIFO or a
        // device may never end. Anything else is a miss, replaced by the next store.
        if !meta.is_file() {
            return Ok(Loaded::Rejected(Rejected::NotAFile));
        }
        let file_len = meta.len();
        match read_entry(io::BufReader::with_capacity(1 << 20, file), file_len, key, expect) {
            Ok(result) => Ok(result),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Loaded::Rejected(Rejected::Truncated)),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Writes the entry of `key` atomically (temp file, fsync, rename, fsync of the directory).
    pub(super) fn store<T: Element>(&self, key: &DocKey, model_id: &str, kv: &DocKv<T>) -> Result<(), Error> {
        let final_path = self.path_of(key);
        let temp_path = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            key.to_hex(),
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written =
            write_file(&temp_path, key, model_id, kv).and_then(|()| self.rename_into_place(&temp_path, &final_path));
        if let Err(e) = written {
            let _ = fs::remove_file(&temp_path);
            return Err(Error::io(&final_path, e));
        }
        // Make the rename itself durable.
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl DiskTier {
    /// Renames a finished temporary file over the entry's path. A directory there (which a rename
    /// cannot replace) is first moved aside under a unique name and removed, so the entry heals
    /// instead of failing for ever; readers meanwhile see no entry (a miss).
    fn rename_into_place(&self, temp_path: &Path, final_path: &Path) -> io::Result<()> {
        let first = fs::rename(temp_path, final_path);
        if first.is_ok() || !fs::symlink_metadata(final_path).is_ok_and(|m| m.is_dir()) {
            return first;
        }
        let aside = self.dir.join(format!(
            ".{}.{}.{}.not-an-entry",
            final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::rename(final_path, &aside) {
            Ok(()) => {
                let _ = fs::remove_dir_all(&aside);
            }
            // Another writer moved it first: fine, as long as it is gone.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::rename(temp_path, final_path)
    }
}

/// Opens an entry's path for reading without blocking on a FIFO (`O_NONBLOCK`; it has no effect
/// on a regular file's reads).
fn open_entry(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

/// Temporary files older than this were left by a writer that died before its rename.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Best effort: removes `.*.tmp` files of dead writers (live writers' files are younger).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(read) = fs::read_dir(dir) else { return };
    for entry in read.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if old.is_some_and(|age| age > STALE_TEMP_AGE) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn header_bytes<T: Element>(key: &DocKey, model_id: &str, shape: &DocShape) -> Vec<u8> {
    let mut h = Vec::with_capacity(80 + model_id.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&[dtype_code(T::DTYPE), 0, 0, 0]);
    h.extend_from_slice(key.as_bytes());
    for d in [shape.layers, shape.kv_heads, shape.head_dim] {
        h.extend_from_slice(&(d as u32).to_le_bytes());
    }
    h.extend_from_slice(&(shape.tokens as u64).to_le_bytes());
    h.extend_from_slice(&((2 * shape.len() * T::DTYPE.size_bytes()) as u64).to_le_bytes());
    h.extend_from_slice(&(model_id.len() as u32).to_le_bytes());
    h.extend_from_slice(model_id.as_bytes());
    h
}

/// The bytes of `x` in little-endian order (a copy only on big-endian hosts).
fn le_bytes<T: Element>(x: &[T]) -> std::borrow::Cow<'_, [u8]> {
    let bytes: &[u8] = bytemuck::cast_slice(x);
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytes)
    } else {
        let mut owned = bytes.to_vec();
        swap_elements::<T>(&mut owned);
        std::borrow::Cow::Owned(owned)
    }
}

/// Reverses the bytes of each element (little-endian file <-> big-endian host).
fn swap_elements<T: Element>(bytes: &mut [u8]) {
    for e in bytes.chunks_exact_mut(std::mem::size_of::<T>()) {
        e.reverse();
    }
}

fn write_file<T: Element>(path: &Path, key: &DocKey, model_id: &str, kv: &DocKv<T>) -> io::Result<()> {
    let header = header_bytes::<T>(key, model_id, kv.shape());
    let (k, v) = (le_bytes(kv.k()), le_bytes(kv.v()));
    let mut hasher = blake3::Hasher::new();
    hasher.update(&header);
    hash_bytes(&mut hasher, &k);
    hash_bytes(&mut hasher, &v);
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&header)?;
    w.write_all(hasher.finalize().as_bytes())?;
    w.write_all(&k)?;
    w.write_all(&v)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Hashes large buffers on all cores (blake3's tree mode); same digest as `update`.
fn hash_bytes(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    if bytes.len() >= 1 << 20 {
        hasher.update_rayon(bytes);
    } else {
        hasher.update(bytes);
    }
}

fn read_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn read_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Parses and verifies one file of `file_len` bytes. `UnexpectedEof` means truncated.
fn read_entry<T: Element, R: Read>(
    mut r: R,
    file_len: u64,
    key: &DocKey,
    expect: &Expect<'_>,
) -> io::Result<Loaded<T>> {
    let foreign = |why: String| Ok(Loaded::Rejected(Rejected::Foreign(why)));
    let mut fixed = [0u8; 80];
    r.read_exact(&mut fixed)?;
    if &fixed[0..8] != MAGIC {
        return foreign("not a squid KV file (magic)".into());
    }
    let version = read_u32(&fixed[8..12]);
    if version != FORMAT_VERSION {
        return foreign(format!("format version {version}, expected {FORMAT_VERSION}"));
    }
    if fixed[12] != dtype_code(T::DTYPE) {
        return foreign(format!("dtype code {}, expected {}", fixed[12], T::DTYPE.name()));
    }
    if &fixed[16..48] != key.as_bytes() {
        return foreign("the header names another key".into());
    }
    let (layers, kv_heads, head_dim) =
        (read_u32(&fixed[48..52]) as usize, read_u32(&fixed[52..56]) as usize, read_u32(&fixed[56..60]) as usize);
    if (layers, kv_heads, head_dim) != (expect.layers, expect.kv_heads, expect.head_dim) {
        return foreign(format!("shape [{layers} layers, {kv_heads} heads, {head_dim} dims] of another model"));
    }
    let tokens = read_u64(&fixed[60..68]);
    let payload = read_u64(&fixed[68..76]);
    let model_len = read_u32(&fixed[76..80]) as usize;
    if model_len != expect.model_id.len() {
        return foreign("another model id".into());
    }
    let row_bytes = (2 * layers * kv_heads * head_dim * T::DTYPE.size_bytes()) as u64;
    if tokens.checked_mul(row_bytes) != Some(payload) {
        return foreign("payload length does not match the shape".into());
    }
    // Checked against the file's size before anything of that size is allocated.
    let expected_len = 80 + model_len as u64 + 32 + payload;
    if file_len < expected_len {
        return Ok(Loaded::Rejected(Rejected::Truncated));
    }
    if file_len > expected_len {
        return foreign("bytes after the payload".into());
    }
    let mut model = vec![0u8; model_len];
    r.read_exact(&mut model)?;
    if model != expect.model_id.as_bytes() {
        return foreign("another model id".into());
    }
    let mut checksum = [0u8; 32];
    r.read_exact(&mut checksum)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&fixed);
    hasher.update(&model);
    let shape = DocShape { layers, tokens: tokens as usize, kv_heads, head_dim };
    let n = shape.len();
    let mut k = vec![T::default(); n];
    let mut v = vec![T::default(); n];
    for x in [&mut k, &mut v] {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(x.as_mut_slice());
        r.read_exact(bytes)?;
        hash_bytes(&mut hasher, bytes);
        if cfg!(target_endian = "big") {
            swap_elements::<T>(bytes);
        }
    }
    if hasher.finalize().as_bytes() != &checksum {
        return Ok(Loaded::Rejected(Rejected::Corrupt));
    }
    let kv = DocKv::new(shape, k, v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(Loaded::Entry(kv))
}
