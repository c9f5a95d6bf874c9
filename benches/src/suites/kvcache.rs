//! `kvcache`: RoPE and the document cache.
//!
//! - `rope_forward`: our forward with its position cache against applying a precomputed f32
//!   cos/sin cache (`[positions, rotary_dim / 2]`, built once outside the timing, as Hugging
//!   Face's rotary cache), both rayon over tokens; `rope_forward_uncached`: ours computing the
//!   angles (f64) on every call, against the same baseline: what the exact angles cost.
//! - `rope_reposition`: moving one document layer's cached keys to an offset, one composed
//!   rotation against un-rotating (backward at the old positions) then re-rotating (forward at
//!   the new ones) with the same fast kernel and every position's cos/sin precomputed.
//! - `doc_load_disk`: a document cache miss in memory answered from disk (read, checksum, shape
//!   checks) against `std::fs::read` of the same file (no verification): the cost of verifying.

use rayon::prelude::*;
use squid_cuda::Element;
use squid_kvcache::{DocCache, DocCacheConfig, DocKey, DocKv, DocShape, Rope, RopeConfig};

use crate::harness::{Case, Work};

fn filled<T: Element>(len: usize, seed: u32) -> Vec<T> {
    (0..len)
        .map(|i| {
            T::from_f32(
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5,
            )
        })
        .collect()
}

/// A directory removed when the case that owns it is dropped.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Applies a precomputed `[tokens, half]` cos/sin cache (rotate-half layout), rayon over tokens.
fn apply_cached_table(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, head_dim: usize) {
    let half = head_dim / 2;
    let row = heads * head_dim;
    x.par_chunks_mut(row * 64).enumerate().for_each(|(chunk, xs)| {
        for (t, r) in xs.chunks_exact_mut(row).enumerate() {
            let tok = chunk * 64 + t;
            let (c, s) = (&cos[tok * half..(tok + 1) * half], &sin[tok * half..(tok + 1) * half]);
            for head in r.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * c[i] - b * s[i];
                    hi[i] = a * s[i] + b * c[i];
                }
            }
        }
    });
}

/// The cases; `quick` shrinks the sizes.
pub fn cases(quick: bool) -> Vec<Case> {
    let (tokens, heads, head_dim) = if quick { (1024, 16, 128) } else { (4096, 32, 128) };
    let rope = Rope::new(RopeConfig::new(head_dim)).expect("valid rope");
    let positions: Vec<u64> = (0..tokens as u64).collect();
    let half = head_dim / 2;
    // The baseline's cache, built once (as a model builds its rotary cache at load time).
    let (mut cos, mut sin) = (vec![0f32; tokens * half], vec![0f32; tokens * half]);
    for t in 0..tokens {
        for i in 0..half {
            let theta = t as f32 * 10_000f32.powf(-((2 * i) as f32) / head_dim as f32);
            cos[t * half + i] = theta.cos();
            sin[t * half + i] = theta.sin();
        }
    }
    let mut x: Vec<f32> = filled(tokens * heads * head_dim, 1);
    let mut x2 = x.clone();
    let bytes = (tokens * heads * head_dim * 4) as f64;
    let (mut x3, mut x4) = (x.clone(), x.clone());
    let (cos2, sin2, positions2) = (cos.clone(), sin.clone(), positions.clone());
    let rope_cached = rope.clone().with_cached_positions(tokens).expect("rope tables");
    let forward = Case {
        suite: "kvcache",
        case: "rope_forward".into(),
        params: format!("tokens={tokens} heads={heads} head_dim={head_dim} f32 cached positions"),
        baseline: "precomputed f32 cos/sin cache, rayon",
        ours: Box::new(move || rope_cached.forward(&mut x, heads, &positions).expect("shapes")),
        base: Box::new(move || apply_cached_table(&mut x2, &cos, &sin, heads, head_dim)),
        work: Work::Bytes(2.0 * bytes),
    };
    let rope_plain = rope.clone();
    let forward_uncached = Case {
        suite: "kvcache",
        case: "rope_forward_uncached".into(),
        params: format!("tokens={tokens} heads={heads} head_dim={head_dim} f32 angles per call"),
        baseline: "precomputed f32 cos/sin cache, rayon",
        ours: Box::new(move || rope_plain.forward(&mut x3, heads, &positions2).expect("shapes")),
        base: Box::new(move || apply_cached_table(&mut x4, &cos2, &sin2, heads, head_dim)),
        work: Work::Bytes(2.0 * bytes),
    };

    // One layer of one 2048-token document, 8 KV heads.
    let (doc_tokens, kv_heads) = (2048, 8);
    let mut k: Vec<f32> = filled(doc_tokens * kv_heads * head_dim, 2);
    let mut k2 = k.clone();
    // The baseline gets every position it touches precomputed, so it pays for passes, not angles.
    let (rope_a, rope_b) = (rope.clone(), rope.with_cached_positions(doc_tokens + 10_000).expect("rope tables"));
    let from: Vec<u64> = (0..doc_tokens as u64).collect();
    let to: Vec<u64> = (0..doc_tokens as u64).map(|t| t + 10_000).collect();
    let reposition = Case {
        suite: "kvcache",
        case: "rope_reposition".into(),
        params: format!("tokens={doc_tokens} kv_heads={kv_heads} head_dim={head_dim} f32 shift=10000"),
        baseline: "un-rotate then re-rotate, cached cos/sin",
        ours: Box::new(move || rope_a.reposition(&mut k, kv_heads, 0, 10_000).expect("shapes")),
        base: Box::new(move || {
            rope_b.backward(&mut k2, kv_heads, &from).expect("shapes");
            rope_b.forward(&mut k2, kv_heads, &to).expect("shapes");
        }),
        work: Work::Bytes((2 * doc_tokens * kv_heads * head_dim * 2) as f64),
    };

    // A 4-layer, 2048-token, 8-head document in f32: 64 MiB of K and V (2 layers, 32 MiB, with --quick).
    let layers = if quick { 2 } else { 4 };
    let dir = std::env::temp_dir().join(format!("squid-bench-kvcache-{}", std::process::id()));
    let scratch = ScratchDir(dir.clone());
    let config = DocCacheConfig::new("bench-model", layers, kv_heads, head_dim).with_disk(&dir);
    let cache = DocCache::<f32>::new(config).expect("cache dir");
    let key = DocKey::new("bench-model", b"", &[1, 2, 3]);
    let shape = DocShape { layers, tokens: doc_tokens, kv_heads, head_dim };
    let entry = DocKv::new(shape, filled(shape.len(), 3), filled(shape.len(), 4)).expect("shape");
    let entry_bytes = entry.bytes();
    cache.get_or_insert_with(key, || Ok::<_, squid_kvcache::Error>(entry)).expect("write");
    let path = cache.file_path(&key).expect("disk tier");
    let load = Case {
        suite: "kvcache",
        case: "doc_load_disk".into(),
        params: format!(
            "layers={layers} tokens={doc_tokens} kv_heads={kv_heads} head_dim={head_dim} f32 (page cache warm)"
        ),
        baseline: "std::fs::read, no verification",
        ours: Box::new(move || {
            let _keep = &scratch;
            cache.forget(&key);
            assert!(cache.get(key).expect("read").is_some());
        }),
        base: Box::new(move || {
            std::hint::black_box(std::fs::read(&path).expect("read"));
        }),
        work: Work::Bytes(entry_bytes as f64),
    };
    vec![forward, forward_uncached, reposition, load]
}
