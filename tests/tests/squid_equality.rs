//! The equality that proves squid attention and the document cache: a context of documents and
//! a global tail, encoded (a) in one pass with the segment mask at true positions, and (b) with
//! each document prefilled alone at position 0, cached, loaded back from disk, re-positioned to
//! its offset, and only the tail computed, gives the same tail logits.
//!
//! Tolerance: max |a - b| <= 1e-4 (1 + max |a|). The two paths differ only in f32 rounding:
//! RoPE at position s versus RoPE at 0 then a rotation by s, and different tilings of the
//! attention (whole context versus tail only).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use squid_attention::segments::Segment;
use squid_kvcache::{DocCache, DocCacheConfig, DocKey, DocKv};
use squid_tests::tiny_model::{TinyConfig, TinyModel};

fn close(a: &[f32], b: &[f32]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("lengths {} vs {}", a.len(), b.len()));
    }
    let scale = 1.0 + a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    if worst <= 1e-4 * scale {
        Ok(())
    } else {
        Err(format!("max |a - b| = {worst} > {}", 1e-4 * scale))
    }
}

fn tokens(len: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 64) as u32
        })
        .collect()
}

/// Tail logits of one full pass over `docs` then `tail`.
fn full_pass_tail(model: &TinyModel, docs: &[Vec<u32>], tail: &[u32]) -> Vec<f32> {
    let mut segs: Vec<Segment> = docs.iter().map(|d| Segment::document(d.len())).collect();
    segs.push(Segment::global(tail.len()));
    let all: Vec<u32> = docs.iter().flatten().chain(tail).copied().collect();
    let logits = model.forward_full(&all, &[segs]).unwrap();
    let vocab = model.cfg.vocab;
    logits[(all.len() - tail.len()) * vocab..].to_vec()
}

struct Harness {
    model: TinyModel,
    dir: tempfile::TempDir,
    prefills: AtomicUsize,
}

impl Harness {
    fn new() -> Self {
        Self {
            model: TinyModel::random(TinyConfig::test(), 42).unwrap(),
            dir: tempfile::tempdir().unwrap(),
            prefills: AtomicUsize::new(0),
        }
    }

    /// A fresh cache object on the shared directory: an empty memory tier, as a new process.
    fn cache(&self) -> DocCache<f32> {
        let c = self.model.cfg;
        DocCache::new(
            DocCacheConfig::new(self.model.model_id(), c.layers, c.kv_heads, c.head_dim).with_disk(self.dir.path()),
        )
        .unwrap()
    }

    fn key(&self, doc: &[u32]) -> DocKey {
        DocKey::new(self.model.model_id(), &self.model.cfg.to_bytes(), doc)
    }

    fn load(&self, cache: &DocCache<f32>, doc: &[u32]) -> Arc<DocKv<f32>> {
        cache
            .get_or_insert_with(self.key(doc), || {
                self.prefills.fetch_add(1, Ordering::SeqCst);
                self.model.prefill_document(doc)
            })
            .unwrap()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn cached_repositioned_documents_give_the_full_pass_logits(
        doc_lens in proptest::collection::vec(1usize..40, 1..5),
        tail_len in 1usize..12,
        seed in any::<u64>(),
    ) {
        let h = Harness::new();
        let docs: Vec<Vec<u32>> = doc_lens.iter().enumerate().map(|(i, &l)| tokens(l, seed ^ (i as u64 + 1))).collect();
        let tail = tokens(tail_len, seed ^ 0xFFFF);

        // Prefill every document once, into memory and through to disk.
        let writer = h.cache();
        for d in &docs {
            h.load(&writer, d);
        }
        prop_assert_eq!(h.prefills.load(Ordering::SeqCst), docs.len());

        // A new process: every document comes from disk, none is prefilled again.
        let reader = h.cache();
        let cached: Vec<_> = docs.iter().map(|d| h.load(&reader, d)).collect();
        prop_assert_eq!(h.prefills.load(Ordering::SeqCst), docs.len());
        prop_assert_eq!(reader.stats().disk_hits, docs.len() as u64);

        let expect = full_pass_tail(&h.model, &docs, &tail);
        let got = h.model.forward_tail(&cached, &tail).unwrap();
        prop_assert!(close(&expect, &got).is_ok(), "{:?}", close(&expect, &got));

        // The same entries placed in another context, in reverse order: still no prefill.
        let rev_docs: Vec<Vec<u32>> = docs.iter().rev().cloned().collect();
        let rev_cached: Vec<_> = rev_docs.iter().map(|d| h.load(&reader, d)).collect();
        prop_assert_eq!(h.prefills.load(Ordering::SeqCst), docs.len());
        let expect = full_pass_tail(&h.model, &rev_docs, &tail);
        let got = h.model.forward_tail(&rev_cached, &tail).unwrap();
        prop_assert!(close(&expect, &got).is_ok(), "{:?}", close(&expect, &got));
    }
}

#[test]
fn documents_swapped_between_two_packed_contexts() {
    // Two contexts in one packed batch share documents A and B in opposite orders.
    let h = Harness::new();
    let (a, b, c) = (tokens(23, 1), tokens(9, 2), tokens(31, 3));
    let (tail1, tail2) = (tokens(5, 4), tokens(3, 5));
    let ctx1 = [a.clone(), b.clone()];
    let ctx2 = [b.clone(), c.clone(), a.clone()];
    let seg = |docs: &[Vec<u32>], tail: &[u32]| {
        let mut s: Vec<Segment> = docs.iter().map(|d| Segment::document(d.len())).collect();
        s.push(Segment::global(tail.len()));
        s
    };
    let all: Vec<u32> =
        ctx1.iter().flatten().chain(&tail1).chain(ctx2.iter().flatten()).chain(&tail2).copied().collect();
    let logits = h.model.forward_full(&all, &[seg(&ctx1, &tail1), seg(&ctx2, &tail2)]).unwrap();
    let vocab = h.model.cfg.vocab;
    let len1 = a.len() + b.len() + tail1.len();
    let tail1_logits = &logits[(len1 - tail1.len()) * vocab..len1 * vocab];
    let tail2_logits = &logits[(all.len() - tail2.len()) * vocab..];

    let cache = h.cache();
    let kv = |d: &Vec<u32>| h.load(&cache, d);
    let got1 = h.model.forward_tail(&[kv(&a), kv(&b)], &tail1).unwrap();
    let got2 = h.model.forward_tail(&[kv(&b), kv(&c), kv(&a)], &tail2).unwrap();
    assert_eq!(h.prefills.load(Ordering::SeqCst), 3, "each document prefilled once");
    close(tail1_logits, &got1).unwrap();
    close(tail2_logits, &got2).unwrap();
}

#[test]
fn a_corrupted_cache_file_is_detected_and_recomputed() {
    let h = Harness::new();
    let doc = tokens(17, 9);
    let tail = tokens(4, 10);
    let first = h.load(&h.cache(), &doc);
    let path = h.cache().file_path(&h.key(&doc)).expect("a disk tier names its files");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5A;
    std::fs::write(&path, &bytes).unwrap();

    let cache = h.cache();
    let again = h.load(&cache, &doc);
    assert_eq!(h.prefills.load(Ordering::SeqCst), 2, "the corrupt file was not used");
    assert_eq!(again.k(), first.k());
    assert_eq!(again.v(), first.v());
    let expect = full_pass_tail(&h.model, std::slice::from_ref(&doc), &tail);
    close(&expect, &h.model.forward_tail(&[again], &tail).unwrap()).unwrap();
    // The file was replaced by a good one: a third process reads it without prefilling.
    h.load(&h.cache(), &doc);
    assert_eq!(h.prefills.load(Ordering::SeqCst), 2);
}
