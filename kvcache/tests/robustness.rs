//! Bad input never panics, aborts or hangs: a regression test per fault once found by hand, then
//! a fuzz-style proptest over every public entry point with sizes near the integer limits.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use squid_kvcache::{
    DocCache, DocCacheConfig, DocKey, DocKv, DocShape, Error, PagedKv, PagedKvConfig, Rope, RopeConfig, RopeLayout,
};

/// Runs `f`, turning a panic into a test failure that names the input.
fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(e) => {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("panicked on {what}: {msg:?}")
        }
    }
}

/// Runs `f` on a thread and fails the test if it has not finished within `limit` (a hang).
fn within<R: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what}: no answer within {limit:?} (hangs or panicked)"))
}

fn small_pool() -> PagedKv<f32> {
    PagedKv::new(PagedKvConfig { layers: 2, kv_heads: 1, head_dim: 2, page_size: 4, num_pages: 8 }).unwrap()
}

#[test]
fn a_pool_the_allocator_refuses_is_out_of_memory_not_an_abort() {
    // Valid-looking dims: 64 KiB pages, as many as u32 page ids allow (256 TiB per layer).
    let config = PagedKvConfig { layers: 1, kv_heads: 8, head_dim: 128, page_size: 16, num_pages: u32::MAX as usize };
    let got = no_panic("256 TiB pool", || PagedKv::<f32>::new(config));
    assert!(matches!(got, Err(Error::OutOfMemory { .. })), "{:?}", got.err());
    let huge_layers = PagedKvConfig { layers: usize::MAX / 2 + 1, ..config };
    assert!(no_panic("huge layers", || PagedKv::<f32>::new(huge_layers)).is_err());
}

#[test]
fn writes_and_growth_past_usize_are_out_of_range() {
    let mut kv = small_pool();
    let id = kv.allocate();
    kv.grow(id, 3).unwrap();
    let rows = [0f32; 2];
    let got = no_panic("write at usize::MAX", || kv.write(id, 0, usize::MAX, &rows, &rows));
    assert!(matches!(got, Err(Error::OutOfRange(_))), "{got:?}");
    let got = no_panic("grow by usize::MAX", || kv.grow(id, usize::MAX));
    assert!(matches!(got, Err(Error::OutOfRange(_))), "{got:?}");
    assert_eq!(kv.len(id).unwrap(), 3, "nothing changed");
}

#[test]
fn a_document_shape_whose_count_wraps_is_refused() {
    // 2^32 x 2^32 x 1 x 1 wraps to 0 elements: empty buffers matched it.
    let shape = DocShape { layers: 1 << 32, tokens: 1 << 32, kv_heads: 1, head_dim: 1 };
    let got = no_panic("wrapping shape", || DocKv::<f32>::new(shape, Vec::new(), Vec::new()));
    assert!(matches!(got, Err(Error::ShapeMismatch(_))), "{got:?}");
}

#[test]
fn rope_tables_too_large_are_out_of_memory() {
    let rope = Rope::new(RopeConfig::new(64)).unwrap();
    for n in [1usize << 40, usize::MAX / 2 + 1, usize::MAX] {
        let got = no_panic("rope tables", || rope.clone().with_cached_positions(n));
        assert!(matches!(got, Err(Error::OutOfMemory { .. })), "{n}: {:?}", got.err());
    }
    let cached = rope.with_cached_positions(10).unwrap();
    assert_eq!(cached.cached_positions(), 10);
}

fn doc(cache_cfg: &DocCacheConfig, tokens: usize) -> DocKv<f32> {
    let shape =
        DocShape { layers: cache_cfg.layers, tokens, kv_heads: cache_cfg.kv_heads, head_dim: cache_cfg.head_dim };
    let k = (0..shape.len()).map(|i| i as f32 / 7.0).collect();
    let v = (0..shape.len()).map(|i| -(i as f32) / 3.0).collect();
    DocKv::new(shape, k, v).unwrap()
}

#[test]
fn a_fifo_at_an_entry_path_is_a_miss_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DocCacheConfig::new("m", 1, 1, 4).with_disk(dir.path());
    let key = DocKey::new("m", b"c", &[1, 2, 3]);
    let cache = DocCache::<f32>::new(cfg.clone()).unwrap();
    let path = cache.file_path(&key).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&path).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("skipped: mkfifo is not available");
        return;
    }
    let got = within("get of a FIFO", Duration::from_secs(20), move || {
        let got = cache.get(key).map(|e| e.is_none());
        let healed = cache.get_or_insert_with(key, || Ok::<_, Error>(doc(&cfg, 3))).map(|e| e.k().len());
        (got, healed)
    });
    assert!(matches!(got.0, Ok(true)), "{:?}", got.0);
    assert!(matches!(got.1, Ok(12)), "{:?}", got.1);
    assert!(std::fs::metadata(&path).unwrap().is_file(), "the put replaced the FIFO with an entry");
}

#[test]
fn a_directory_at_an_entry_path_is_a_miss_that_heals() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DocCacheConfig::new("m", 1, 1, 4).with_disk(dir.path());
    let key = DocKey::new("m", b"c", &[4, 5]);
    let cache = DocCache::<f32>::new(cfg.clone()).unwrap();
    let path = cache.file_path(&key).unwrap();
    std::fs::create_dir_all(path.join("inside")).unwrap();
    assert!(matches!(cache.get(key), Ok(None)), "a directory is a miss");
    let entry = cache.get_or_insert_with(key, || Ok::<_, Error>(doc(&cfg, 2))).unwrap();
    assert!(std::fs::metadata(&path).unwrap().is_file(), "the put replaced the directory with an entry");
    // A fresh cache (no memory tier) finds the entry on disk.
    let fresh = DocCache::<f32>::new(cfg).unwrap();
    let again = fresh.get(key).unwrap().expect("the healed entry");
    assert_eq!(again.k(), entry.k());
}

/// Sizes near the integer limits, and small ones that make valid calls.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..6,
        1 => prop::sample::select(vec![
            usize::MAX,
            usize::MAX - 1,
            usize::MAX / 2 + 1,
            1 << 32,
            (1 << 32) + 1,
            1 << 40,
            u32::MAX as usize,
        ]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The paged pool and RoPE with sizes near the limits: a typed error or a checked result,
    /// never a panic.
    #[test]
    fn paged_and_rope_entry_points_give_a_result_or_a_typed_error(
        dims in (size(), size(), size(), size(), size()),
        ops in prop::collection::vec((0u8..8, size(), size(), 0usize..40), 1..12),
        rope_dims in (size(), size(), any::<bool>()),
    ) {
        let (layers, kv_heads, head_dim, page_size, num_pages) = dims;
        let config = PagedKvConfig { layers, kv_heads, head_dim, page_size, num_pages };
        let input = format!("{config:?} {ops:?}");
        no_panic(&input, || {
            let _ = (config.row_len(), config.page_len());
            // Only pools of a few MiB are built: a valid larger one really allocates.
            let small = [layers, kv_heads, head_dim, page_size, num_pages].iter().all(|&d| d <= 64);
            // Larger ones only where they cannot be allocated (more bytes than an address space).
            let bytes = [2, layers, kv_heads, head_dim, page_size, num_pages, 4].iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let mut kv = if small {
                PagedKv::<f32>::new(config).ok()
            } else {
                if bytes.is_none_or(|b| b == 0 || b >= 1 << 50) {
                    let _ = PagedKv::<f32>::new(config);
                }
                None
            };
            if let Some(kv) = kv.as_mut() {
                let mut ids = vec![kv.allocate()];
                for &(op, a, b, n) in &ops {
                    let id = ids[a % ids.len()];
                    let data = vec![0.25f32; n];
                    match op {
                        0 => { let _ = kv.grow(id, b); }
                        1 => { let _ = kv.write(id, a % 3, b, &data, &data); }
                        2 => { let _ = kv.append(id, &data, &data); }
                        3 => { if let Ok(f) = kv.fork(id) { ids.push(f); } }
                        4 => { let _ = kv.truncate(id, b); }
                        5 => { let _ = kv.free(id); }
                        6 => {
                            if let Ok(view) = kv.view(id, a) {
                                view.validate().expect("a pool's own view is valid");
                                let (k, _) = kv.gather(id, a).unwrap();
                                assert_eq!(k.len(), view.len * config.row_len());
                            }
                        }
                        _ => { let _ = (kv.len(id), kv.page_table(id), kv.page_refcount(b as u32), kv.free_pages()); }
                    }
                }
                prop_assert!(kv.free_pages() <= num_pages);
            }

            let (hd, rd, interleaved) = rope_dims;
            let layout = if interleaved { RopeLayout::Interleaved } else { RopeLayout::RotateHalf };
            let rc = RopeConfig { head_dim: hd, rotary_dim: rd, layout, ..RopeConfig::new(hd.max(2)) };
            if let Ok(rope) = Rope::new(rc) {
                let rope = rope.with_cached_positions(ops.len()).expect("a small table");
                for &(_, a, b, n) in &ops {
                    let mut x = vec![0.5f32; n];
                    let positions = vec![b as u64; n / hd.max(1) / a.max(1)];
                    let _ = rope.forward(&mut x, a, &positions);
                    let _ = rope.backward(&mut x, a, &positions);
                    let _ = rope.forward_contiguous(&mut x, a, u64::MAX - b as u64);
                    let _ = rope.reposition(&mut x, a, b as u64, u64::MAX);
                }
            }
            let shape = DocShape { layers, tokens: page_size, kv_heads, head_dim };
            let _ = (shape.layer_len(), shape.len(), shape.is_empty(), shape.checked_len());
            let n = shape.checked_len().filter(|&n| n <= 4096).unwrap_or(3);
            if let Ok(d) = DocKv::new(shape, vec![1f32; n], vec![2f32; n]) {
                assert_eq!(d.k().len(), n);
                if let Ok(rope) = Rope::new(RopeConfig::new(head_dim.max(2))) {
                    let _ = d.place(&rope, num_pages as u64);
                    let mut out = vec![0f32; shape.layer_len().min(4096)];
                    let _ = d.place_layer_into(&rope, layers.saturating_sub(1), 7, &mut out);
                    let _ = d.place_layer_into(&rope, layers, 7, &mut out);
                }
            }
            Ok(())
        })?;
    }
}
