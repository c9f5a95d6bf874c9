//! Every property of the cache: prefill only on a miss, placement, LRU with pinning, the disk
//! tier's verification (corrupt, truncated, foreign files are misses and get replaced), sharing
//! between threads and between caches on one directory, prefetch, statistics.

use super::*;
use half::bf16;
use squid_cuda::DType;
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Barrier;

const LAYERS: usize = 2;
const HEADS: usize = 2;
const DIM: usize = 8;
const MODEL: &str = "tiny-test-model";

fn config() -> DocCacheConfig {
    DocCacheConfig::new(MODEL, LAYERS, HEADS, DIM)
}

fn key(doc: u32) -> DocKey {
    DocKey::new(MODEL, b"cfg", &[doc, doc * 7 + 1])
}

/// A stand-in for a model's prefill: deterministic K (rotated for positions 0..tokens) and V
/// from the document number; `calls` counts how often it ran.
fn prefill<T: Element>(doc: u32, tokens: usize, calls: &AtomicUsize) -> Result<DocKv<T>, Error> {
    calls.fetch_add(1, Relaxed);
    let shape = DocShape { layers: LAYERS, tokens, kv_heads: HEADS, head_dim: DIM };
    let value = |i: usize, salt: u32| {
        T::from_f32((((i as u32).wrapping_mul(2654435761) ^ (doc + salt)) % 1000) as f32 / 500.0 - 1.0)
    };
    let mut k: Vec<T> = (0..shape.len()).map(|i| value(i, 0)).collect();
    let v = (0..shape.len()).map(|i| value(i, 99)).collect();
    let rope = Rope::new(RopeConfig::new(DIM))?;
    for layer in k.chunks_mut(shape.layer_len()) {
        rope.forward_contiguous(layer, HEADS, 0)?;
    }
    DocKv::new(shape, k, v)
}

fn entry_bytes(tokens: usize) -> usize {
    2 * LAYERS * tokens * HEADS * DIM * 4
}

#[test]
fn prefill_runs_only_on_a_miss() {
    let cache = DocCache::<f32>::new(config()).unwrap();
    let calls = AtomicUsize::new(0);
    let first = cache.get_or_insert_with(key(1), || prefill(1, 5, &calls)).unwrap();
    let second = cache.get_or_insert_with(key(1), || prefill(1, 5, &calls)).unwrap();
    assert_eq!(calls.load(Relaxed), 1);
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(*first, prefill(1, 5, &AtomicUsize::new(0)).unwrap());
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.memory_hits, stats.disk_hits), (1, 1, 0));
    assert_eq!(stats.memory_bytes as usize, entry_bytes(5));
    assert!(cache.get(key(2)).unwrap().is_none());
    assert_eq!(cache.stats().misses, 2);
}

#[test]
fn place_rotates_keys_and_leaves_values() {
    let cache = DocCache::<bf16>::new(config()).unwrap();
    let calls = AtomicUsize::new(0);
    let entry = cache.get_or_insert_with(key(3), || prefill(3, 6, &calls)).unwrap();
    let placed = cache.place(&entry, 1234).unwrap();
    let mut want = entry.k().to_vec();
    cache.rope().reposition(&mut want, HEADS, 0, 1234).unwrap();
    assert_eq!(placed, want);
    assert_ne!(placed, entry.k());
    assert_eq!(cache.place(&entry, 0).unwrap(), entry.k(), "offset 0 is the cached keys");
    let mut layer1 = vec![bf16::ZERO; entry.shape().layer_len()];
    entry.place_layer_into(cache.rope(), 1, 1234, &mut layer1).unwrap();
    assert_eq!(layer1, placed[entry.shape().layer_len()..]);
    assert!(matches!(entry.place_layer_into(cache.rope(), 2, 0, &mut layer1), Err(Error::OutOfRange(_))));
    assert!(matches!(entry.place_layer_into(cache.rope(), 0, 0, &mut layer1[1..]), Err(Error::ShapeMismatch(_))));
}

#[test]
fn least_recently_used_is_evicted_first_and_pins_hold() {
    // Room for two 4-token entries.
    let cache = DocCache::<f32>::new(config().with_memory_budget(2 * entry_bytes(4))).unwrap();
    let calls = AtomicUsize::new(0);
    let get = |d| drop(cache.get_or_insert_with(key(d), || prefill(d, 4, &calls)).unwrap());
    get(1);
    get(2);
    get(1); // 2 is now the least recently used
    get(3);
    assert!(cache.in_memory(&key(1)) && cache.in_memory(&key(3)) && !cache.in_memory(&key(2)));
    assert_eq!(cache.stats().evictions, 1);
    // Pinned (explicitly) and in use (an Arc held) entries stay, even over budget.
    assert!(cache.pin(&key(1)));
    let held = cache.get_or_insert_with(key(3), || prefill(3, 4, &calls)).unwrap();
    get(4);
    assert!(cache.in_memory(&key(1)) && cache.in_memory(&key(3)) && cache.in_memory(&key(4)));
    assert_eq!(cache.stats().memory_bytes as usize, 3 * entry_bytes(4));
    drop(held);
    assert_eq!(cache.trim(), 1, "3 is no longer in use and older than 4");
    assert!(!cache.in_memory(&key(3)));
    assert!(cache.unpin(&key(1)));
    assert!(!cache.unpin(&key(1)));
    get(5);
    assert!(!cache.in_memory(&key(1)) && cache.in_memory(&key(4)) && cache.in_memory(&key(5)));
    // Memory only: an evicted entry is prefilled again.
    let before = calls.load(Relaxed);
    get(2);
    assert_eq!(calls.load(Relaxed), before + 1);
    assert!(!cache.pin(&key(77)));
}

#[test]
fn disk_tier_survives_a_restart_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let calls = AtomicUsize::new(0);
    let want = {
        let cache = DocCache::<bf16>::new(config().with_disk(dir.path())).unwrap();
        let kv = cache.get_or_insert_with(key(1), || prefill(1, 7, &calls)).unwrap();
        let stats = cache.stats();
        assert_eq!((stats.disk_entries, stats.write_errors), (1, 0));
        assert!(stats.disk_bytes as usize > kv.bytes());
        (*kv).clone()
    };
    let cache = DocCache::<bf16>::new(config().with_disk(dir.path())).unwrap();
    let got = cache.get_or_insert_with(key(1), || prefill(1, 7, &calls)).unwrap();
    assert_eq!(*got, want);
    assert_eq!(calls.load(Relaxed), 1, "the second cache read the file");
    let stats = cache.stats();
    assert_eq!((stats.disk_hits, stats.misses, stats.memory_entries), (1, 0, 1));
    // After eviction from memory, the disk answers again.
    assert!(cache.forget(&key(1)));
    assert_eq!(*cache.get(key(1)).unwrap().unwrap(), want);
    assert_eq!(cache.stats().disk_hits, 2);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Writes entry 1 with a fresh cache, damages its file with `damage`, and checks that a new
/// cache treats it as a miss: prefill runs, the right data comes back, the file is replaced by a
/// good one, and the rejection reason is recorded.
fn damaged_file_is_a_miss(damage: impl FnOnce(&std::path::Path), reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let calls = AtomicUsize::new(0);
    let path = {
        let cache = DocCache::<f32>::new(config().with_disk(dir.path())).unwrap();
        cache.get_or_insert_with(key(1), || prefill(1, 9, &calls)).unwrap();
        cache.file_path(&key(1)).unwrap()
    };
    damage(&path);
    let cache = DocCache::<f32>::new(config().with_disk(dir.path())).unwrap();
    let got = cache.get_or_insert_with(key(1), || prefill(1, 9, &calls)).unwrap();
    assert_eq!(calls.load(Relaxed), 2, "{reason}: the damaged file must not be used");
    assert_eq!(*got, prefill(1, 9, &AtomicUsize::new(0)).unwrap());
    let stats = cache.stats();
    assert_eq!((stats.rejected_files, stats.misses, stats.disk_hits), (1, 1, 0), "{reason}");
    let why = stats.last_rejected.unwrap();
    assert!(why.contains(reason), "{why} should say {reason}");
    // The file was replaced: a third cache reads it without prefilling.
    let cache = DocCache::<f32>::new(config().with_disk(dir.path())).unwrap();
    assert_eq!(*cache.get(key(1)).unwrap().expect("replaced file"), *got);
    assert_eq!(cache.stats().rejected_files, 0);
}

#[test]
fn caches_of_two_dtypes_share_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let calls = AtomicUsize::new(0);
    let narrow = DocCache::<bf16>::new(config().with_disk(dir.path())).unwrap();
    let wide = DocCache::<f32>::new(config().with_disk(dir.path())).unwrap();
    narrow.get_or_insert_with(key(1), || prefill(1, 3, &calls)).unwrap();
    wide.get_or_insert_with(key(1), || prefill(1, 3, &calls)).unwrap();
    assert_ne!(narrow.file_path(&key(1)), wide.file_path(&key(1)));
    for cache_stats in [narrow.stats(), wide.stats()] {
        assert_eq!((cache_stats.disk_entries, cache_stats.rejected_files), (2, 0));
    }
    assert!(DocCache::<bf16>::new(config().with_disk(dir.path())).unwrap().get(key(1)).unwrap().is_some());
    assert!(DocCache::<f32>::new(config().with_disk(dir.path())).unwrap().get(key(1)).unwrap().is_some());
    assert_eq!(calls.load(Relaxed), 2);
}

fn rewrite(path: &std::path::Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    edit(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn flipped_payload_bit_is_detected() {
    damaged_file_is_a_miss(|p| rewrite(p, |b| *b.last_mut().unwrap() ^= 0x10), "checksum");
}

#[test]
fn flipped_header_bit_is_detected() {
    // Byte 61 is inside `tokens`: the header then disagrees with the file's length.
    damaged_file_is_a_miss(|p| rewrite(p, |b| b[61] ^= 0x01), "foreign");
    // A byte of the model id (the checksum covers the header too).
    damaged_file_is_a_miss(|p| rewrite(p, |b| b[82] ^= 0x01), "foreign: another model id");
    // A padding byte nothing else reads: only the checksum covers it.
    damaged_file_is_a_miss(|p| rewrite(p, |b| b[13] ^= 0x01), "checksum");
}

#[test]
fn truncated_file_is_detected() {
    damaged_file_is_a_miss(|p| rewrite(p, |b| b.truncate(b.len() - 3)), "truncated");
    damaged_file_is_a_miss(|p| rewrite(p, |b| b.truncate(40)), "truncated");
    damaged_file_is_a_miss(|p| rewrite(p, |b| b.clear()), "truncated");
}

#[test]
fn foreign_files_are_detected() {
    damaged_file_is_a_miss(|p| rewrite(p, |b| b[0] = b'X'), "magic");
    damaged_file_is_a_miss(|p| rewrite(p, |b| b[8] = 2), "format version 2");
    damaged_file_is_a_miss(|p| rewrite(p, |b| b.push(0)), "bytes after the payload");
    damaged_file_is_a_miss(
        |p| {
            std::fs::write(p, b"hello, not a cache file at all, but long enough to pass 80 bytes of header ........")
                .unwrap()
        },
        "magic",
    );
    // Another entry's file under this key's name.
    damaged_file_is_a_miss(
        |p| {
            let other = tempfile::tempdir().unwrap();
            let cache = DocCache::<f32>::new(config().with_disk(other.path())).unwrap();
            cache.get_or_insert_with(key(2), || prefill(2, 9, &AtomicUsize::new(0))).unwrap();
            std::fs::copy(cache.file_path(&key(2)).unwrap(), p).unwrap();
        },
        "another key",
    );
    // Same key, written by a cache of another model id, dtype or shape.
    let foreign_writer = |cfg: DocCacheConfig, bf: bool, reason: &str| {
        damaged_file_is_a_miss(
            |p| {
                let other = tempfile::tempdir().unwrap();
                let cfg = cfg.with_disk(other.path());
                let (layers, heads, dim) = (cfg.layers, cfg.kv_heads, cfg.head_dim);
                let shape = DocShape { layers, tokens: 9, kv_heads: heads, head_dim: dim };
                let written = if bf {
                    let cache = DocCache::<bf16>::new(cfg).unwrap();
                    let kv = DocKv::new(shape, vec![bf16::ONE; shape.len()], vec![bf16::ONE; shape.len()]).unwrap();
                    cache.get_or_insert_with(key(1), || Ok::<_, Error>(kv)).unwrap();
                    cache.file_path(&key(1)).unwrap()
                } else {
                    let cache = DocCache::<f32>::new(cfg).unwrap();
                    let kv = DocKv::new(shape, vec![1.0; shape.len()], vec![1.0; shape.len()]).unwrap();
                    cache.get_or_insert_with(key(1), || Ok::<_, Error>(kv)).unwrap();
                    cache.file_path(&key(1)).unwrap()
                };
                std::fs::copy(written, p).unwrap();
            },
            reason,
        )
    };
    foreign_writer(DocCacheConfig::new("other-model!", LAYERS, HEADS, DIM), false, "another model id");
    foreign_writer(DocCacheConfig::new(MODEL, LAYERS, HEADS, DIM), true, "dtype");
    foreign_writer(DocCacheConfig::new(MODEL, LAYERS + 1, HEADS, DIM), false, "shape");
    foreign_writer(DocCacheConfig::new(MODEL, LAYERS, HEADS, DIM * 2), false, "shape");
}

#[test]
fn threads_share_one_prefill_per_key() {
    let cache = DocCache::<f32>::new(config().with_memory_budget(64 * entry_bytes(3))).unwrap();
    let calls: Vec<AtomicUsize> = (0..6).map(|_| AtomicUsize::new(0)).collect();
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let (cache, calls, barrier) = (&cache, &calls, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..30u32 {
                    let d = (i * 7 + t) % 6;
                    let kv =
                        cache.get_or_insert_with(key(d), || prefill(d, 3 + d as usize, &calls[d as usize])).unwrap();
                    assert_eq!(*kv, prefill(d, 3 + d as usize, &AtomicUsize::new(0)).unwrap());
                }
            });
        }
    });
    for (d, c) in calls.iter().enumerate() {
        assert_eq!(c.load(Relaxed), 1, "doc {d} prefilled more than once");
    }
    let stats = cache.stats();
    assert_eq!(stats.misses, 6);
    assert_eq!(stats.memory_hits, 8 * 30 - 6);
}

/// Two caches on one directory stand in for two processes: `flock` locks belong to open file
/// descriptions, so two caches in one process exclude each other exactly as two processes do.
#[test]
fn caches_sharing_a_directory_prefill_each_document_once() {
    let dir = tempfile::tempdir().unwrap();
    // Tiny memory budgets so that entries go back and forth through the disk.
    let caches: Vec<DocCache<f32>> = (0..3)
        .map(|_| DocCache::new(config().with_disk(dir.path()).with_memory_budget(entry_bytes(4))).unwrap())
        .collect();
    let calls: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
    let barrier = Barrier::new(6);
    std::thread::scope(|s| {
        for t in 0..6u32 {
            let (cache, calls, barrier) = (&caches[t as usize % 3], &calls, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..12u32 {
                    let d = (i * 3 + t) % 5;
                    let kv = cache.get_or_insert_with(key(d), || prefill(d, 4, &calls[d as usize])).unwrap();
                    assert_eq!(*kv, prefill(d, 4, &AtomicUsize::new(0)).unwrap());
                }
            });
        }
    });
    for (d, c) in calls.iter().enumerate() {
        assert_eq!(c.load(Relaxed), 1, "doc {d} prefilled more than once across caches");
    }
    let total_rejected: u64 = caches.iter().map(|c| c.stats().rejected_files).sum();
    assert_eq!(total_rejected, 0, "a reader saw a partial file");
    assert_eq!(caches[0].stats().disk_entries, 5);
}

#[test]
fn prefetch_loads_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let calls = AtomicUsize::new(0);
    {
        let writer = DocCache::<f32>::new(config().with_disk(dir.path())).unwrap();
        for d in 0..4 {
            writer.get_or_insert_with(key(d), || prefill(d, 5, &calls)).unwrap();
        }
    }
    let cache = DocCache::<f32>::new(config().with_disk(dir.path())).unwrap();
    cache.get(key(0)).unwrap().unwrap();
    let ticket = cache.prefetch(&[key(0), key(1), key(2), key(3), key(9)]);
    let report = ticket.wait();
    assert_eq!(report, PrefetchReport { loaded: 3, already_present: 1, not_found: 1, errors: 0 });
    for d in 1..4 {
        assert!(cache.in_memory(&key(d)));
        cache.get_or_insert_with(key(d), || prefill(d, 5, &calls)).unwrap();
    }
    assert_eq!(calls.load(Relaxed), 4, "no prefill after the writer's");
    let stats = cache.stats();
    assert_eq!((stats.prefetched, stats.disk_hits, stats.memory_hits), (3, 1, 3));
    // A lookup racing a prefetch gets the same entry and no second read or prefill.
    assert!(cache.forget(&key(2)));
    let ticket = cache.prefetch(&[key(2)]);
    let kv = cache.get_or_insert_with(key(2), || prefill(2, 5, &calls)).unwrap();
    ticket.wait();
    assert_eq!(*kv, prefill(2, 5, &AtomicUsize::new(0)).unwrap());
    let stats = cache.stats();
    assert_eq!(stats.prefetched + stats.disk_hits, 5, "{stats:?}");
    assert_eq!(calls.load(Relaxed), 4);
}

#[test]
fn failed_or_misshapen_prefill_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DocCache::<f32>::new(config().with_disk(dir.path())).unwrap();
    let err = cache.get_or_insert_with(key(1), || Err::<DocKv<f32>, _>("model crashed")).unwrap_err();
    assert!(matches!(err, Error::Prefill(_)), "{err}");
    let wrong = DocShape { layers: LAYERS, tokens: 2, kv_heads: HEADS + 1, head_dim: DIM };
    let err = cache
        .get_or_insert_with(key(1), || DocKv::<f32>::new(wrong, vec![0.0; wrong.len()], vec![0.0; wrong.len()]))
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch(_)), "{err}");
    assert!(!cache.in_memory(&key(1)));
    assert_eq!(cache.stats().disk_entries, 0);
    // The key is free again for a good prefill.
    let calls = AtomicUsize::new(0);
    cache.get_or_insert_with(key(1), || prefill(1, 2, &calls)).unwrap();
    assert!(cache.in_memory(&key(1)));
    // A panicking prefill releases the key as well.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache.get_or_insert_with(key(5), || -> Result<DocKv<f32>, Error> { panic!("boom") })
    }));
    assert!(panicked.is_err());
    cache.get_or_insert_with(key(5), || prefill(5, 2, &calls)).unwrap();
}

#[test]
fn bad_config_and_shapes_are_typed_errors() {
    assert!(matches!(DocCache::<f32>::new(DocCacheConfig::new(MODEL, 0, 1, 8)), Err(Error::InvalidConfig(_))));
    let mismatched_rope = config().with_rope(RopeConfig::new(DIM * 2));
    assert!(matches!(DocCache::<f32>::new(mismatched_rope), Err(Error::InvalidConfig(_))));
    let shape = DocShape { layers: 1, tokens: 2, kv_heads: 1, head_dim: 4 };
    assert!(matches!(DocKv::new(shape, vec![0f32; 8], vec![0f32; 7]), Err(Error::ShapeMismatch(_))));
    let kv = DocKv::new(shape, vec![0f32; 8], vec![0f32; 8]).unwrap();
    assert!(matches!(kv.place(&Rope::new(RopeConfig::new(8)).unwrap(), 1), Err(Error::ShapeMismatch(_))));
}

#[test]
fn statistics_add_up_over_a_random_workload() {
    // A fixed pseudo-random sequence of lookups, checked against a model of LRU by hand.
    let cache = DocCache::<f32>::new(config().with_memory_budget(3 * entry_bytes(2))).unwrap();
    let calls = AtomicUsize::new(0);
    let mut lru: Vec<u32> = Vec::new(); // most recent last
    let (mut hits, mut misses, mut evictions) = (0, 0, 0);
    let mut x = 12345u32;
    let mut prefills = HashMap::new();
    for _ in 0..200 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let d = (x >> 16) % 6;
        if let Some(i) = lru.iter().position(|&e| e == d) {
            lru.remove(i);
            hits += 1;
        } else {
            misses += 1;
            *prefills.entry(d).or_insert(0) += 1;
            if lru.len() == 3 {
                lru.remove(0);
                evictions += 1;
            }
        }
        lru.push(d);
        drop(cache.get_or_insert_with(key(d), || prefill(d, 2, &calls)).unwrap());
    }
    let stats = cache.stats();
    assert_eq!((stats.memory_hits, stats.misses, stats.evictions), (hits, misses, evictions));
    assert_eq!(stats.memory_entries, 3);
    for &d in &lru {
        assert!(cache.in_memory(&key(d)));
    }
}

/// Readers racing a writer that keeps replacing the same file always see a whole, verified
/// entry (the old or the new one), never a torn one: the writer renames complete files into place.
#[test]
fn readers_never_see_a_torn_file() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskTier::open(dir.path(), DType::F32).unwrap();
    let expect = Expect { model_id: MODEL, layers: LAYERS, kv_heads: HEADS, head_dim: DIM };
    let versions: Vec<DocKv<f32>> = (0..2).map(|d| prefill(d, 64, &AtomicUsize::new(0)).unwrap()).collect();
    disk.store(&key(1), MODEL, &versions[0]).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..150 {
                disk.store(&key(1), MODEL, &versions[i % 2]).unwrap();
            }
            done.store(true, Relaxed);
        });
        for _ in 0..2 {
            s.spawn(|| {
                let mut reads = 0;
                while !done.load(Relaxed) || reads == 0 {
                    match disk.load::<f32>(&key(1), &expect).unwrap() {
                        Loaded::Entry(kv) => assert!(kv == versions[0] || kv == versions[1]),
                        Loaded::Absent => panic!("the file vanished during a replace"),
                        Loaded::Rejected(why) => panic!("torn read: {why}"),
                    }
                    reads += 1;
                }
            });
        }
    });
}

/// Set for the child processes of `processes_sharing_a_directory_prefill_each_document_once`.
const CHILD_DIR_ENV: &str = "SQUID_KVCACHE_TEST_CHILD_DIR";

/// The body of one child process (does nothing unless started by the test below).
#[test]
#[ignore = "started as a child process by processes_sharing_a_directory_prefill_each_document_once"]
fn child_process_worker() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else { return };
    let dir = std::path::PathBuf::from(dir);
    // Budget 0: nothing stays in memory, so later rounds read the other processes' files.
    let cache = DocCache::<f32>::new(config().with_disk(&dir).with_memory_budget(0)).unwrap();
    for _round in 0..3 {
        for d in 0..5 {
            let kv = cache
                .get_or_insert_with(key(d), || {
                    let mut log =
                        std::fs::OpenOptions::new().create(true).append(true).open(dir.join("prefills.log")).unwrap();
                    std::io::Write::write_all(&mut log, format!("{d}\n").as_bytes()).unwrap();
                    // Long enough that the other processes arrive while this one holds the lock.
                    std::thread::sleep(Duration::from_millis(20));
                    prefill(d, 16, &AtomicUsize::new(0))
                })
                .unwrap();
            assert_eq!(*kv, prefill(d, 16, &AtomicUsize::new(0)).unwrap());
        }
    }
    assert_eq!(cache.stats().rejected_files, 0);
}

/// Three real processes share one directory: each document is prefilled exactly once overall,
/// and every process reads correct entries.
#[test]
fn processes_sharing_a_directory_prefill_each_document_once() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--exact", "doc_cache::tests::child_process_worker", "--ignored", "--test-threads=1"])
                .env(CHILD_DIR_ENV, dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("1 passed"), "the child did not run the worker: {text}");
    }
    let log = std::fs::read_to_string(dir.path().join("prefills.log")).unwrap();
    let mut prefilled: Vec<&str> = log.lines().collect();
    prefilled.sort();
    assert_eq!(prefilled, ["0", "1", "2", "3", "4"]);
}

#[test]
fn stale_temp_files_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join(".dead-writer.1.0.tmp");
    let fresh = dir.path().join(".live-writer.2.0.tmp");
    for p in [&old, &fresh] {
        std::fs::write(p, b"partial").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_hours_ago).unwrap();
    let _cache = DocCache::<f32>::new(config().with_disk(dir.path())).unwrap();
    assert!(!old.exists());
    assert!(fresh.exists());
}
