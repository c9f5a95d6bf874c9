//! Where the warm time-to-first-token goes: times each step of the squid suite's warm path
//! once (after a warm-up), to see what to optimise. `cargo run --release -p squid-benches
//! --example ttft_breakdown`.

use std::sync::Arc;
use std::time::Instant;

use squid_attention::segments::{self, Segment, SegmentConfig, SegmentLayout};
use squid_attention::Heads;
use squid_kvcache::DocKv;
use squid_tests::tiny_model::{TinyConfig, TinyModel};

fn main() {
    let cfg = TinyConfig { vocab: 512, d_model: 512, layers: 4, q_heads: 8, kv_heads: 2, head_dim: 64, ff: 1408 };
    let model = TinyModel::random(cfg, 7).expect("model");
    let docs: Vec<Vec<u32>> = (0..8).map(|i| (0..2048).map(|t| ((t * 31 + i * 7) % 512) as u32).collect()).collect();
    let tail: Vec<u32> = (0..128).map(|t| (t * 13 % 512) as u32).collect();
    let start = Instant::now();
    let entries: Vec<Arc<DocKv<f32>>> =
        docs.iter().map(|d| Arc::new(model.prefill_document(d).expect("prefill"))).collect();
    println!("prefill 8 documents: {:.3} s", start.elapsed().as_secs_f64());
    for round in 0..3 {
        let t = Instant::now();
        let placed: Vec<Vec<f32>> =
            entries.iter().enumerate().map(|(i, e)| e.place(model.rope(), (i * 2048) as u64).expect("place")).collect();
        let place_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        model.forward_tail(&entries, &tail).expect("tail");
        let tail_s = t.elapsed().as_secs_f64();
        // The attention op alone at one layer's shape.
        let heads = Heads::new(8, 2, 64, 64);
        let total = 8 * 2048 + 128;
        let mut segs: Vec<Segment> = (0..8).map(|_| Segment::document(2048)).collect();
        segs.push(Segment::global(128));
        let cu_k = [0u32, total as u32];
        let layout = SegmentLayout::new(&[segs], &cu_k).expect("layout");
        let q = vec![0.01f32; 128 * 8 * 64];
        let k = vec![0.02f32; total * 2 * 64];
        let v = vec![0.03f32; total * 2 * 64];
        let t = Instant::now();
        segments::forward(&SegmentConfig::new(heads), &layout, &q, &k, &v, &[0, 128], &cu_k).expect("attn");
        let attn_s = t.elapsed().as_secs_f64();
        drop(placed);
        println!("round {round}: place all docs {place_s:.4} s, forward_tail {tail_s:.4} s, one layer's tail attention {attn_s:.4} s");
    }
}
