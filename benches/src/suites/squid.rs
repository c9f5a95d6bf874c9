//! `squid`: time to first token for a context of 8 documents x 2048 tokens and a 128-token
//! question, through the tiny test model sized up (4 layers, d_model 512). Cold prefills the
//! whole context (the baseline); warm takes every document's KV from the memory tier, and
//! warm-from-disk from the disk tier, and computes only the question. The FLOP ratio the layout
//! allows is printed beside the measured ratio. Also the segment attention op alone against
//! dense causal attention over the same tokens.

use std::sync::Arc;

use squid_attention::dense::{self, DenseConfig};
use squid_attention::segments::{self, Segment, SegmentConfig, SegmentLayout};
use squid_attention::Heads;
use squid_kvcache::{DocCache, DocCacheConfig, DocKey, DocKv};
use squid_tests::tiny_model::{TinyConfig, TinyModel};

use crate::harness::{Case, Work};

fn tokens(len: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// The model's forward FLOPs over `t` query tokens that attend to `pairs` (query, key) pairs.
fn model_flops(cfg: &TinyConfig, t: f64, pairs: f64) -> f64 {
    let (d, hq, hkv, hd, ff) =
        (cfg.d_model as f64, cfg.q_heads as f64, cfg.kv_heads as f64, cfg.head_dim as f64, cfg.ff as f64);
    let per_token = 2.0 * (d * hq * hd * 2.0 + d * hkv * hd * 2.0 + 2.0 * d * ff);
    cfg.layers as f64 * (t * per_token + pairs * hq * 4.0 * hd) + 2.0 * t * d * cfg.vocab as f64
}

/// The cases; `--quick` uses 4 documents x 1024 tokens and a 2-layer model.
pub fn cases(quick: bool) -> Vec<Case> {
    let (num_docs, doc_len, question) = if quick { (4, 1024, 64) } else { (8, 2048, 128) };
    let cfg = TinyConfig {
        vocab: 512,
        d_model: 512,
        layers: if quick { 2 } else { 4 },
        q_heads: 8,
        kv_heads: 2,
        head_dim: 64,
        ff: 1408,
    };
    let model = Arc::new(TinyModel::random(cfg, 7).expect("valid config"));
    let docs: Vec<Vec<u32>> = (0..num_docs).map(|i| tokens(doc_len, i as u64 + 1, cfg.vocab)).collect();
    let tail = tokens(question, 999, cfg.vocab);
    let mut segs: Vec<Segment> = docs.iter().map(|d| Segment::document(d.len())).collect();
    segs.push(Segment::global(tail.len()));
    let all: Vec<u32> = docs.iter().flatten().chain(&tail).copied().collect();
    let total = all.len();

    let dir = tempfile::tempdir().expect("temp dir");
    let cache_cfg = DocCacheConfig::new(model.model_id(), cfg.layers, cfg.kv_heads, cfg.head_dim)
        .with_disk(dir.path())
        .with_memory_budget(8 << 30);
    let warm_cache: Arc<DocCache<f32>> = Arc::new(DocCache::new(cache_cfg.clone()).expect("cache"));
    let keys: Vec<DocKey> = docs.iter().map(|d| DocKey::new(model.model_id(), &cfg.to_bytes(), d)).collect();
    for (key, doc) in keys.iter().zip(&docs) {
        warm_cache.get_or_insert_with(*key, || model.prefill_document(doc)).expect("prefill");
    }

    let cold_pairs: f64 = (num_docs * doc_len * (doc_len + 1) / 2) as f64
        + (question * (total - question) + question * (question + 1) / 2) as f64;
    let warm_pairs: f64 = (question * (total - question) + question * (question + 1) / 2) as f64;
    let cold_flops = model_flops(&cfg, total as f64, cold_pairs);
    let warm_flops = model_flops(&cfg, question as f64, warm_pairs);
    let params = |what: &str| {
        format!(
            "{what} docs={num_docs}x{doc_len} q={question} L={} d={} flop_ratio={:.1}",
            cfg.layers,
            cfg.d_model,
            cold_flops / warm_flops
        )
    };

    let cold = {
        let (model, all, segs) = (model.clone(), all.clone(), segs.clone());
        move || {
            std::hint::black_box(model.forward_full(&all, std::slice::from_ref(&segs)).expect("forward"));
        }
    };
    let warm_memory = {
        let (model, cache, keys, tail) = (model.clone(), warm_cache.clone(), keys.clone(), tail.clone());
        Box::new(move || {
            let entries: Vec<Arc<DocKv<f32>>> =
                keys.iter().map(|k| cache.get(*k).expect("lookup").expect("cached")).collect();
            std::hint::black_box(model.forward_tail(&entries, &tail).expect("tail"));
        })
    };
    let warm_disk = {
        let (model, keys, tail) = (model.clone(), keys.clone(), tail.clone());
        let dir = dir.path().to_path_buf();
        let cache_cfg = cache_cfg.clone();
        Box::new(move || {
            // A new process's view: empty memory tier, every document read and verified from disk.
            let cache: DocCache<f32> = DocCache::new(cache_cfg.clone().with_disk(&dir)).expect("cache");
            let entries: Vec<Arc<DocKv<f32>>> =
                keys.iter().map(|k| cache.get(*k).expect("lookup").expect("on disk")).collect();
            std::hint::black_box(model.forward_tail(&entries, &tail).expect("tail"));
        })
    };
    // Keep the directory alive as long as the cases.
    let dir = Arc::new(dir);
    let cold2 = cold.clone();
    let keep = dir.clone();
    let mut out = vec![
        Case {
            suite: "squid",
            case: "ttft_warm_memory".into(),
            params: params("warm(memory) vs cold"),
            baseline: "cold: prefill the whole context",
            ours: warm_memory,
            base: Box::new(cold),
            work: Work::None,
        },
        Case {
            suite: "squid",
            case: "ttft_warm_disk".into(),
            params: params("warm(disk) vs cold"),
            baseline: "cold: prefill the whole context",
            ours: warm_disk,
            base: Box::new(move || {
                let _ = &keep;
                cold2()
            }),
            work: Work::None,
        },
    ];

    // The op alone: segment attention over the packed context against dense causal attention.
    let heads = Heads::new(cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.head_dim);
    let cu = vec![0u32, total as u32];
    let layout = SegmentLayout::new(std::slice::from_ref(&segs), &cu).expect("layout");
    let q =
        tokens(total * cfg.q_heads * cfg.head_dim, 5, 1000).iter().map(|&x| x as f32 / 500.0 - 1.0).collect::<Vec<_>>();
    let k = tokens(total * cfg.kv_heads * cfg.head_dim, 6, 1000)
        .iter()
        .map(|&x| x as f32 / 500.0 - 1.0)
        .collect::<Vec<_>>();
    let v = tokens(total * cfg.kv_heads * cfg.head_dim, 7, 1000)
        .iter()
        .map(|&x| x as f32 / 500.0 - 1.0)
        .collect::<Vec<_>>();
    let seg_flops = layout.forward_flops(&heads, &cu, &cu);
    let dense_cfg = DenseConfig::causal(heads);
    let dense_flops = dense::forward_flops(&dense_cfg, &cu, &cu);
    let (q2, k2, v2, cu2) = (q.clone(), k.clone(), v.clone(), cu.clone());
    let seg_cfg = SegmentConfig::new(heads);
    out.push(Case {
        suite: "squid",
        case: "segment_attn_fwd".into(),
        params: format!(
            "T={total} docs={num_docs}x{doc_len} HQ={} HKV={} D={} flop_ratio={:.1}",
            cfg.q_heads,
            cfg.kv_heads,
            cfg.head_dim,
            dense_flops / seg_flops
        ),
        baseline: "our dense causal attention over the same tokens",
        ours: Box::new(move || {
            std::hint::black_box(segments::forward(&seg_cfg, &layout, &q, &k, &v, &cu, &cu).expect("segments"));
        }),
        base: Box::new(move || {
            std::hint::black_box(dense::forward(&dense_cfg, &q2, &k2, &v2, &cu2, &cu2).expect("dense"));
        }),
        work: Work::None,
    });
    out
}
