//! Throughput of the policy model on this machine (release build recommended):
//! `cargo run --release -p squid-pipeline --example model_speed`.
//!
//! Prints forward+backward training tokens/s of `ModelConfig::small()` for each attention kind,
//! tensor-parallel steps for 1 and 2 ranks, and batched decode tokens/s of a session.

use std::time::Instant;

use squid_pipeline::model::{
    AttentionKind, Batch, Model, ModelConfig, NsaParams, Segment, SegmentKind, SessionConfig, TpTrainer,
};
use squid_pipeline::policy::Policy;

fn batch(vocab: u32, seqs: usize, len: usize) -> Batch {
    let data: Vec<(Vec<u32>, Vec<Segment>)> = (0..seqs)
        .map(|s| {
            let toks = (0..len).map(|i| ((i * 31 + s * 7) as u32) % vocab).collect();
            // prompt | tool output (document) | the rest
            let segs = vec![Segment::global(len / 4), Segment::document(len / 4), Segment::global(len - len / 2)];
            (toks, segs)
        })
        .collect();
    Batch::from_sequences(&data)
}

fn main() -> Result<(), squid_pipeline::Error> {
    let (seqs, len) = (8, 256);
    for kind in [AttentionKind::Dense, AttentionKind::Segments, AttentionKind::Nsa(NsaParams::default())] {
        let cfg = ModelConfig { attention: kind, ..ModelConfig::small() };
        let model = Model::init(cfg, 0)?;
        let b = batch(cfg.vocab as u32, seqs, len);
        let dl = vec![1e-3f32; b.tokens.len() * cfg.vocab];
        let _ = model.backward(&model.forward(&b)?, &dl)?; // warm-up
        let iters = 5;
        let t0 = Instant::now();
        for _ in 0..iters {
            let fwd = model.forward(&b)?;
            let _ = model.backward(&fwd, &dl)?;
        }
        let s = t0.elapsed().as_secs_f64();
        println!(
            "fwd+bwd {:<9} {seqs} x {len} tokens: {:.1} ms/step, {:.0} tokens/s",
            format!("{kind:?}").split('(').next().unwrap_or(""),
            1e3 * s / iters as f64,
            (iters * b.tokens.len()) as f64 / s
        );
    }
    let model = Model::init(ModelConfig::small(), 0)?;
    let b = batch(512, seqs, len);
    for world in [1, 2] {
        let mut tp = TpTrainer::new(&model, world, squid_optim::AdamWConfig::default())?;
        let n = b.tokens.len();
        let loss = |logits: &[f32]| Ok((0.0, vec![1e-3f32; logits.len()]));
        tp.step(&b, 1e-3, loss)?;
        let t0 = Instant::now();
        for _ in 0..3 {
            tp.step(&b, 1e-3, loss)?;
        }
        let s = t0.elapsed().as_secs_f64();
        println!(
            "tp={world} train step {seqs} x {len}: {:.1} ms/step, {:.0} tokens/s",
            1e3 * s / 3.0,
            3.0 * n as f64 / s
        );
    }
    // Rollout-style decode: 16 samples forked from one 64-token prompt, 128 steps.
    let mut s = model.session(SessionConfig::default())?;
    let prompt: Vec<u32> = (0..64).map(|i| (i * 13 % 512) as u32).collect();
    let p = s.open()?;
    s.append(p, &prompt, SegmentKind::Global)?;
    let ctxs: Vec<_> = (0..16).map(|_| s.fork(p)).collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let steps = 128;
    for i in 0..steps {
        let toks: Vec<u32> = (0..16).map(|c| ((i * 16 + c) % 512) as u32).collect();
        s.step(&ctxs, &toks)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let st = s.kv_stats();
    println!(
        "decode 16 contexts x {steps} steps: {:.0} tokens/s; KV held {} KiB of {} KiB unshared",
        (16 * steps) as f64 / secs,
        st.bytes_held / 1024,
        st.bytes_unshared / 1024
    );
    Ok(())
}
