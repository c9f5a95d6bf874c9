//! Every layer sharded over 1, 2 and 4 ranks (local backend) against the unsharded computation,
//! and a 2-layer transformer sharded the same ways.
//!
//! The unsharded reference is written plainly in f64 in this file (its own loops, no code
//! shared with the layers), and its gradients come from central finite differences of the f64
//! loss, so they are an independent check of every backward here. Tolerances (f32 layers vs the
//! f64 reference): `|got - want| <= ATOL + RTOL * |want|` with ATOL = 1e-4, RTOL = 1e-3 for
//! single layers, and ATOL = 2e-4, RTOL = 2e-3 for the transformer (deeper f32 chains). The
//! finite differences use h = 1e-5 in f64 (error about 1e-9, far below the tolerances).
//! Sharded runs are also compared with the 1-rank run of the same layer: they differ only in
//! the order of f32 sums, within 1e-5 + 1e-4 * |value|.

use proptest::prelude::*;

use super::*;
use crate::{LocalComm, LocalGroup};

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-3;
const WORLDS: [usize; 3] = [1, 2, 4];

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` values in [-scale, scale), exactly representable in f32 (so the f32 and f64 runs start
/// from the same numbers).
fn values(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut state = seed;
    (0..n).map(|_| ((splitmix(&mut state) >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) * scale).collect()
}

fn ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut state = seed;
    (0..n).map(|_| (splitmix(&mut state) % vocab as u64) as u32).collect()
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, want {w}");
    }
}

#[track_caller]
fn assert_same(got: &[f32], want: &[f32], what: &str) {
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert_close(got, &want, 1e-5, 1e-4, what);
}

/// Central finite differences of `loss` at `params`.
fn fd_grad(params: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-5;
    let mut p = params.to_vec();
    (0..p.len())
        .map(|i| {
            let x = p[i];
            p[i] = x + h;
            let up = loss(&p);
            p[i] = x - h;
            let down = loss(&p);
            p[i] = x;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Runs `f` on every rank of a local group of `world` and returns each rank's result.
fn on_ranks<R: Send>(world: usize, f: impl Fn(&LocalComm) -> Result<R> + Sync) -> Vec<R> {
    LocalGroup::new(world)
        .unwrap()
        .run(|comm| f(&comm))
        .into_iter()
        .map(|r| r.expect("rank panicked").unwrap())
        .collect()
}

include!("two_layer_model.rs");

// ---------------------------------------------------------------------------------------------
// The unsharded reference, f64.

/// `y[T, n] = x[T, k] w[n, k]^T + b`.
fn ref_linear(x: &[f64], k: usize, w: &[f64], n: usize, b: Option<&[f64]>) -> Vec<f64> {
    let tokens = x.len() / k;
    let mut y = vec![0.0; tokens * n];
    for t in 0..tokens {
        for j in 0..n {
            let mut acc = b.map_or(0.0, |b| b[j]);
            for p in 0..k {
                acc += x[t * k + p] * w[j * k + p];
            }
            y[t * n + j] = acc;
        }
    }
    y
}

/// Causal GQA attention over packed sequences, full weights.
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    x: &[f64],
    d: usize,
    cu: &[u32],
    (hq, hkv, hd): (usize, usize, usize),
    wq: &[f64],
    wk: &[f64],
    wv: &[f64],
    wo: &[f64],
) -> Vec<f64> {
    let q = ref_linear(x, d, wq, hq * hd, None);
    let k = ref_linear(x, d, wk, hkv * hd, None);
    let v = ref_linear(x, d, wv, hkv * hd, None);
    let mut o = vec![0.0; q.len()];
    let scale = 1.0 / (hd as f64).sqrt();
    for seq in cu.windows(2) {
        let (s0, s1) = (seq[0] as usize, seq[1] as usize);
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            for i in s0..s1 {
                let scores: Vec<f64> = (s0..=i)
                    .map(|j| {
                        (0..hd).map(|e| q[i * hq * hd + h * hd + e] * k[j * hkv * hd + kvh * hd + e]).sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (jj, s) in scores.iter().enumerate() {
                    let p = (s - max).exp() / sum;
                    for e in 0..hd {
                        o[i * hq * hd + h * hd + e] += p * v[(s0 + jj) * hkv * hd + kvh * hd + e];
                    }
                }
            }
        }
    }
    ref_linear(&o, hq * hd, wo, d, None)
}

/// Log-probabilities of `targets` under `logits[T, V]`.
fn ref_logprobs(logits: &[f64], vocab: usize, targets: &[u32]) -> Vec<f64> {
    logits
        .chunks_exact(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            row[t as usize] - lse
        })
        .collect()
}

fn gelu64(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------------------------
// Single layers.

/// Column-parallel linear over `world` ranks against the reference: output, dx, dW, db.
fn check_column(world: usize, tokens: usize, inf: usize, outf: usize, seed: u64) {
    let p = Params::new(&[("x", tokens * inf), ("w", outf * inf), ("b", outf)]);
    let all = values(seed, p.len, 1.0);
    let dy = values(seed ^ 1, tokens * outf, 1.0);
    let (x, w, b) = (p.get(&all, "x"), p.get(&all, "w"), p.get(&all, "b"));
    let want_y = ref_linear(x, inf, w, outf, Some(b));
    let want_grad =
        fd_grad(&all, |a| dot64(&ref_linear(p.get(a, "x"), inf, p.get(a, "w"), outf, Some(p.get(a, "b"))), &dy));
    let (x32, w32, b32, dy32) = (f32s(x), f32s(w), f32s(b), f32s(&dy));
    let results = on_ranks(world, |comm| {
        let layer = ColumnParallelLinear::new(inf, outf, true, TpRank::of(comm))?;
        let (w_r, b_r) = (layer.shard_weight(&w32)?, layer.shard_bias(&b32)?);
        let mut y_r = vec![f32::NAN; tokens * layer.local_out()];
        layer.forward(&x32, &w_r, Some(&b_r), &mut y_r)?;
        let dy_r = shard::split_cols(&dy32, tokens, outf, layer.tp())?;
        let (mut dx, mut dw_r, mut db_r) = (vec![f32::NAN; x32.len()], vec![0.0; w_r.len()], vec![0.0; b_r.len()]);
        layer.backward(comm, &x32, &w_r, &dy_r, &mut dx, &mut dw_r, Some(&mut db_r))?;
        let y = shard::gather_cols(comm, &y_r, tokens, layer.local_out())?;
        Ok((y, dx, layer.gather_weight(comm, &dw_r)?, layer.gather_bias(comm, &db_r)?))
    });
    for (y, dx, dw, db) in &results {
        assert_close(y, &want_y, ATOL, RTOL, "column y");
        assert_close(dx, p.get(&want_grad, "x"), ATOL, RTOL, "column dx");
        assert_close(dw, p.get(&want_grad, "w"), ATOL, RTOL, "column dW");
        assert_close(db, p.get(&want_grad, "b"), ATOL, RTOL, "column db");
    }
}

/// Row-parallel linear over `world` ranks against the reference: output, dx, dW, db.
fn check_row(world: usize, tokens: usize, inf: usize, outf: usize, seed: u64) {
    let p = Params::new(&[("x", tokens * inf), ("w", outf * inf), ("b", outf)]);
    let all = values(seed, p.len, 1.0);
    let dy = values(seed ^ 1, tokens * outf, 1.0);
    let (x, w, b) = (p.get(&all, "x"), p.get(&all, "w"), p.get(&all, "b"));
    let want_y = ref_linear(x, inf, w, outf, Some(b));
    let want_grad =
        fd_grad(&all, |a| dot64(&ref_linear(p.get(a, "x"), inf, p.get(a, "w"), outf, Some(p.get(a, "b"))), &dy));
    let (x32, w32, b32, dy32) = (f32s(x), f32s(w), f32s(b), f32s(&dy));
    let results = on_ranks(world, |comm| {
        let layer = RowParallelLinear::new(inf, outf, true, TpRank::of(comm))?;
        let w_r = layer.shard_weight(&w32)?;
        let x_r = shard::split_cols(&x32, tokens, inf, layer.tp())?;
        let mut y = vec![f32::NAN; tokens * outf];
        layer.forward(comm, &x_r, &w_r, Some(&b32), &mut y)?;
        let (mut dx_r, mut dw_r, mut db) = (vec![f32::NAN; x_r.len()], vec![0.0; w_r.len()], vec![0.0; outf]);
        layer.backward(&x_r, &w_r, &dy32, &mut dx_r, &mut dw_r, Some(&mut db))?;
        let dx = shard::gather_cols(comm, &dx_r, tokens, layer.local_in())?;
        Ok((y, dx, layer.gather_weight(comm, &dw_r)?, db))
    });
    for (y, dx, dw, db) in &results {
        assert_close(y, &want_y, ATOL, RTOL, "row y");
        assert_close(dx, p.get(&want_grad, "x"), ATOL, RTOL, "row dx");
        assert_close(dw, p.get(&want_grad, "w"), ATOL, RTOL, "row dW");
        assert_close(db, p.get(&want_grad, "b"), ATOL, RTOL, "row db");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn column_parallel_matches_unsharded(tokens in 1usize..7, inf in 1usize..6, out_blocks in 1usize..4, seed in any::<u64>()) {
        for world in WORLDS {
            check_column(world, tokens, inf, 4 * out_blocks, seed);
        }
    }

    #[test]
    fn row_parallel_matches_unsharded(tokens in 1usize..7, in_blocks in 1usize..4, outf in 1usize..6, seed in any::<u64>()) {
        for world in WORLDS {
            check_row(world, tokens, 4 * in_blocks, outf, seed);
        }
    }

    #[test]
    fn vocab_parallel_cross_entropy_matches_unsharded(tokens in 1usize..9, vocab_blocks in 1usize..5, seed in any::<u64>()) {
        for world in WORLDS {
            check_cross_entropy(world, tokens, 4 * vocab_blocks, seed);
        }
    }
}

#[test]
fn f_and_g_are_conjugate() {
    for world in WORLDS {
        let results = on_ranks(world, |comm| {
            let r = comm.rank() as f32;
            // f: identity forward, sum of the ranks' gradients backward.
            let x = [1.0f32, 2.0];
            assert_eq!(copy_to_tp_region(&x), &x);
            let mut dx = [r, 1.0];
            copy_to_tp_region_backward(comm, &mut dx)?;
            // g: sum of the ranks' partials forward, identity backward.
            let mut y = [r + 1.0];
            reduce_from_tp_region(comm, &mut y)?;
            assert_eq!(reduce_from_tp_region_backward(&y), &y);
            Ok((dx, y))
        });
        let n = world as f32;
        for (dx, y) in results {
            assert_eq!(dx, [n * (n - 1.0) / 2.0, n]);
            assert_eq!(y, [n * (n + 1.0) / 2.0]);
        }
    }
}

#[test]
fn gather_and_scatter_are_conjugate() {
    let (rows, cols) = (3, 8);
    let full: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    for world in WORLDS {
        let results = on_ranks(world, |comm| {
            let tp = TpRank::of(comm);
            let local = scatter_to_tp_region(&full, rows, cols, tp)?;
            let gathered = gather_from_tp_region(comm, &local, rows, cols / world)?;
            let grad_local = gather_from_tp_region_backward(&gathered, rows, cols, tp)?;
            let grad_full = scatter_to_tp_region_backward(comm, &grad_local, rows, cols / world)?;
            Ok((local == grad_local, gathered, grad_full))
        });
        for (same, gathered, grad_full) in results {
            assert!(same);
            assert_eq!(gathered, full);
            assert_eq!(grad_full, full);
        }
    }
}

#[test]
fn vocab_parallel_embedding_matches_unsharded() {
    let (vocab, dim) = (8, 3);
    let tokens = [0u32, 7, 3, 3, 4, 1, 7];
    let table = values(11, vocab * dim, 1.0);
    let dy = values(12, tokens.len() * dim, 1.0);
    let embed = |table: &[f64]| -> Vec<f64> {
        tokens.iter().flat_map(|&id| table[id as usize * dim..(id as usize + 1) * dim].to_vec()).collect()
    };
    let want_y = embed(&table);
    let want_dtable = fd_grad(&table, |t| dot64(&embed(t), &dy));
    let (table32, dy32) = (f32s(&table), f32s(&dy));
    for world in WORLDS {
        let results = on_ranks(world, |comm| {
            let layer = VocabParallelEmbedding::new(vocab, dim, TpRank::of(comm))?;
            let table_r = layer.shard_table(&table32)?;
            let mut y = vec![f32::NAN; tokens.len() * dim];
            layer.forward(comm, &tokens, &table_r, &mut y)?;
            let mut dtable_r = vec![0.0; table_r.len()];
            layer.backward(&tokens, &dy32, &mut dtable_r)?;
            Ok((y, layer.gather_table(comm, &dtable_r)?))
        });
        for (y, dtable) in &results {
            assert_close(y, &want_y, 0.0, 0.0, "embedding y");
            assert_close(dtable, &want_dtable, ATOL, RTOL, "embedding dtable");
        }
    }
}

/// Vocab-parallel cross-entropy over `world` ranks: log-probs, loss, and the logits gradient
/// for both the mean loss and an arbitrary per-token weighting (as an RL loss gives).
fn check_cross_entropy(world: usize, tokens: usize, vocab: usize, seed: u64) {
    let logits = values(seed, tokens * vocab, 4.0);
    let targets = ids(seed ^ 2, tokens, vocab);
    let weights = values(seed ^ 3, tokens, 1.0);
    let want_logprobs = ref_logprobs(&logits, vocab, &targets);
    let want_loss = -want_logprobs.iter().sum::<f64>() / tokens as f64;
    let want_mean_grad = fd_grad(&logits, |l| -ref_logprobs(l, vocab, &targets).iter().sum::<f64>() / tokens as f64);
    let want_weighted_grad = fd_grad(&logits, |l| dot64(&ref_logprobs(l, vocab, &targets), &weights));
    let (logits32, weights32) = (f32s(&logits), f32s(&weights));
    let results = on_ranks(world, |comm| {
        let ce = VocabParallelCrossEntropy::new(vocab, TpRank::of(comm))?;
        let logits_r = shard::split_cols(&logits32, tokens, vocab, ce.tp())?;
        let out = ce.forward(comm, &logits_r, &targets)?;
        let mut d_r = vec![f32::NAN; logits_r.len()];
        ce.backward(&logits_r, &targets, &out.lse, &VocabParallelCrossEntropy::mean_loss_grad(tokens), &mut d_r)?;
        let d_mean = shard::gather_cols(comm, &d_r, tokens, ce.local_vocab())?;
        ce.backward(&logits_r, &targets, &out.lse, &weights32, &mut d_r)?;
        let d_weighted = shard::gather_cols(comm, &d_r, tokens, ce.local_vocab())?;
        Ok((out, d_mean, d_weighted))
    });
    for (out, d_mean, d_weighted) in &results {
        assert_close(&out.logprobs, &want_logprobs, ATOL, RTOL, "logprobs");
        assert_close(&[out.loss], &[want_loss], ATOL, RTOL, "loss");
        assert_close(d_mean, &want_mean_grad, ATOL, RTOL, "dlogits (mean loss)");
        assert_close(d_weighted, &want_weighted_grad, ATOL, RTOL, "dlogits (weighted)");
    }
}

#[test]
fn cross_entropy_is_stable_for_large_logits() {
    // Logits of 1e4 overflow a naive exp; the max subtraction keeps them finite.
    let (tokens, vocab) = (2, 8);
    let mut logits = vec![0.0f32; tokens * vocab];
    logits[3] = 1e4;
    logits[vocab + 6] = -1e4;
    let targets = [3u32, 0];
    for world in WORLDS {
        let results = on_ranks(world, |comm| {
            let ce = VocabParallelCrossEntropy::new(vocab, TpRank::of(comm))?;
            let logits_r = shard::split_cols(&logits, tokens, vocab, ce.tp())?;
            ce.forward(comm, &logits_r, &targets)
        });
        for out in results {
            assert!(out.logprobs[0].abs() < 1e-6, "{:?}", out.logprobs);
            // Seven logits of 0 and one of -1e4: log(1/7).
            assert!((out.logprobs[1] + 7.0f32.ln()).abs() < 1e-5, "{:?}", out.logprobs);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention with split and replicated kv heads.

const SEQS: [u32; 4] = [0, 3, 4, 9];

fn attention_params(d: usize, (hq, hkv, hd): (usize, usize, usize), tokens: usize) -> Params {
    Params::new(&[
        ("x", tokens * d),
        ("wq", hq * hd * d),
        ("wk", hkv * hd * d),
        ("wv", hkv * hd * d),
        ("wo", d * hq * hd),
    ])
}

fn check_attention(world: usize, heads: (usize, usize, usize), seqs: &[u32], seed: u64) {
    let d = 6;
    let tokens = *seqs.last().unwrap() as usize;
    let p = attention_params(d, heads, tokens);
    let all = values(seed, p.len, 0.7);
    let dy = values(seed ^ 1, tokens * d, 1.0);
    let run_ref = |a: &[f64]| {
        ref_attention(p.get(a, "x"), d, seqs, heads, p.get(a, "wq"), p.get(a, "wk"), p.get(a, "wv"), p.get(a, "wo"))
    };
    let want_y = run_ref(&all);
    let want = fd_grad(&all, |a| dot64(&run_ref(a), &dy));
    let full = |name| f32s(p.get(&all, name));
    let (x32, wq, wk, wv, wo, dy32) = (full("x"), full("wq"), full("wk"), full("wv"), full("wo"), f32s(&dy));
    let results = on_ranks(world, |comm| {
        let layer = ParallelAttention::new(d, heads.0, heads.1, heads.2, TpRank::of(comm))?;
        let w = layer.shard(&wq, &wk, &wv, &wo)?;
        let mut y = vec![f32::NAN; x32.len()];
        let cache = layer.forward(comm, &x32, seqs, &w, &mut y)?;
        let mut dx = vec![f32::NAN; x32.len()];
        let mut grads = layer.zeros().unwrap();
        layer.backward(comm, &x32, seqs, &w, &cache, &dy32, &mut dx, &mut grads)?;
        Ok((layer.layout(), y, dx, layer.gather(comm, &grads)?))
    });
    let what = format!("heads {heads:?} world {world}");
    for (layout, y, dx, g) in &results {
        if heads.1 < world {
            assert_eq!((layout.local_kv_heads(), layout.kv_replicas()), (1, world / heads.1), "{what}");
        } else {
            assert_eq!((layout.local_kv_heads(), layout.kv_replicas()), (heads.1 / world, 1), "{what}");
        }
        assert_close(y, &want_y, ATOL, RTOL, &format!("{what}: y"));
        assert_close(dx, p.get(&want, "x"), ATOL, RTOL, &format!("{what}: dx"));
        assert_close(&g.wq, p.get(&want, "wq"), ATOL, RTOL, &format!("{what}: dwq"));
        assert_close(&g.wk, p.get(&want, "wk"), ATOL, RTOL, &format!("{what}: dwk"));
        assert_close(&g.wv, p.get(&want, "wv"), ATOL, RTOL, &format!("{what}: dwv"));
        assert_close(&g.wo, p.get(&want, "wo"), ATOL, RTOL, &format!("{what}: dwo"));
    }
}

#[test]
fn parallel_attention_matches_unsharded_with_split_and_replicated_kv_heads() {
    // (q heads, kv heads, head dim): MHA, GQA with kv split on 2 ranks and replicated on 4,
    // MQA (one kv head, replicated on every rank), and a group of 4 with kv split everywhere.
    for (i, heads) in [(4, 4, 2), (4, 2, 3), (4, 1, 2), (8, 4, 2)].into_iter().enumerate() {
        for world in WORLDS {
            check_attention(world, heads, &SEQS, 100 + i as u64);
        }
    }
}

/// Head configurations that every world of [`WORLDS`] can hold: (q heads, kv heads, head dim).
const HEAD_CONFIGS: [(usize, usize, usize); 6] = [(4, 4, 1), (4, 2, 2), (4, 1, 3), (8, 2, 2), (8, 8, 1), (12, 4, 1)];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Random packed batches (sequences of length 1 to 5, up to 4 of them) and GQA ratios.
    #[test]
    fn parallel_attention_matches_unsharded_on_random_batches(
        config in 0usize..HEAD_CONFIGS.len(),
        lengths in proptest::collection::vec(1u32..6, 1..5),
        seed in any::<u64>(),
    ) {
        let seqs: Vec<u32> = std::iter::once(0).chain(lengths.iter().scan(0, |end, &l| { *end += l; Some(*end) })).collect();
        for world in WORLDS {
            check_attention(world, HEAD_CONFIGS[config], &seqs, seed);
        }
    }
}

#[test]
fn head_layout_places_heads_by_the_rule() {
    // 8 query heads, 2 kv heads, 4 ranks: kv head 0 on ranks 0-1, kv head 1 on ranks 2-3.
    for rank in 0..4 {
        let l = HeadLayout::new(8, 2, 16, TpRank::new(rank, 4).unwrap()).unwrap();
        assert_eq!((l.local_q_heads(), l.q_head_start()), (2, 2 * rank));
        assert_eq!((l.local_kv_heads(), l.kv_head_start(), l.kv_replicas()), (1, rank / 2, 2));
        // Every local query head reads the kv head its global index maps to.
        for h in 0..l.local_q_heads() {
            assert_eq!(l.kv_head_start() + l.kv_of(h), (l.q_head_start() + h) / l.group());
        }
    }
    // 8 query heads, 4 kv heads, 2 ranks: kv heads split 2 and 2.
    let l = HeadLayout::new(8, 4, 16, TpRank::new(1, 2).unwrap()).unwrap();
    assert_eq!(
        (l.local_q_heads(), l.q_head_start(), l.local_kv_heads(), l.kv_head_start(), l.kv_replicas()),
        (4, 4, 2, 2, 1)
    );
}

// ---------------------------------------------------------------------------------------------
// A 2-layer transformer (the sharded model and its parameters are in `two_layer_model.rs`,
// included above).

/// The unsharded model in f64: per-token log-probs of `targets`.
fn ref_model(p: &Params, all: &[f64], ids: &[u32], targets: &[u32]) -> Vec<f64> {
    let emb = p.get(all, "emb");
    let mut x: Vec<f64> = ids.iter().flat_map(|&id| emb[id as usize * D_MODEL..][..D_MODEL].to_vec()).collect();
    for [wq, wk, wv, wo, w1, b1, w2, b2] in NAMES {
        let g = |n| p.get(all, n);
        let a = ref_attention(&x, D_MODEL, &MODEL_SEQS, HEADS, g(wq), g(wk), g(wv), g(wo));
        let h: Vec<f64> = x.iter().zip(&a).map(|(x, a)| x + a).collect();
        let u: Vec<f64> = ref_linear(&h, D_MODEL, g(w1), FFN, Some(g(b1))).into_iter().map(gelu64).collect();
        let m = ref_linear(&u, FFN, g(w2), D_MODEL, Some(g(b2)));
        x = h.iter().zip(&m).map(|(h, m)| h + m).collect();
    }
    let logits = ref_linear(&x, D_MODEL, p.get(all, "head"), VOCAB, None);
    ref_logprobs(&logits, VOCAB, targets)
}

#[test]
fn two_layer_transformer_sharded_matches_unsharded() {
    let p = model_params();
    let all = values(7, p.len, 0.5);
    let tokens = *MODEL_SEQS.last().unwrap() as usize;
    let ids = ids(8, tokens, VOCAB);
    let targets = ids_shifted(&ids);
    let want_logprobs = ref_model(&p, &all, &ids, &targets);
    let mean_loss = |a: &[f64]| -ref_model(&p, a, &ids, &targets).iter().sum::<f64>() / tokens as f64;
    let want_loss = mean_loss(&all);
    let want_grads = fd_grad(&all, mean_loss);
    let full = f32s(&all);
    let (atol, rtol) = (2e-4, 2e-3);
    let mut one_rank = None;
    for world in WORLDS {
        let results = on_ranks(world, |comm| sharded_model(comm, &p, &full, &ids, &targets));
        for (logprobs, loss, grads) in &results {
            assert_close(logprobs, &want_logprobs, atol, rtol, &format!("world {world}: logprobs"));
            assert_close(&[*loss], &[want_loss], atol, rtol, &format!("world {world}: loss"));
            for &(name, start, n) in &p.ranges {
                let what = format!("world {world}: d{name}");
                assert_close(&grads[start..start + n], &want_grads[start..start + n], atol, rtol, &what);
            }
            match &one_rank {
                None => one_rank = Some((logprobs.clone(), grads.clone())),
                Some((lp1, g1)) => {
                    assert_same(logprobs, lp1, &format!("world {world} vs 1: logprobs"));
                    assert_same(grads, g1, &format!("world {world} vs 1: gradients"));
                }
            }
        }
    }
    // The gradients are not trivially small: the check above would be empty otherwise.
    assert!(want_grads.iter().map(|g| g.abs()).fold(0.0, f64::max) > 1e-2);
}

/// Next-token targets: each id's successor in the batch (the last one wraps around).
fn ids_shifted(ids: &[u32]) -> Vec<u32> {
    (0..ids.len()).map(|i| ids[(i + 1) % ids.len()]).collect()
}

// ---------------------------------------------------------------------------------------------
// Bad shapes.

#[test]
fn bad_shapes_are_typed_errors() {
    let tp4 = TpRank::new(0, 4).unwrap();
    let heads = |q, kv| matches!(HeadLayout::new(q, kv, 8, tp4), Err(TpError::Heads { .. }));
    assert!(heads(6, 2), "q heads not divisible by the world");
    assert!(heads(8, 3), "q heads not a multiple of kv heads");
    assert!(heads(12, 6), "kv heads >= world but not divisible");
    assert!(heads(12, 3), "kv heads < world that do not divide it");
    assert!(heads(0, 1));
    assert!(matches!(
        ColumnParallelLinear::new(8, 6, true, tp4),
        Err(TpError::NotDivisible { what: "out_features", dim: 6, world: 4 })
    ));
    assert!(matches!(RowParallelLinear::new(10, 4, true, tp4), Err(TpError::NotDivisible { what: "in_features", .. })));
    assert!(matches!(VocabParallelEmbedding::new(10, 4, tp4), Err(TpError::NotDivisible { what: "vocab", .. })));
    assert!(matches!(VocabParallelCrossEntropy::new(6, tp4), Err(TpError::NotDivisible { what: "vocab", .. })));
    assert!(matches!(ColumnParallelLinear::new(0, 4, true, tp4), Err(TpError::Zero { .. })));
    assert!(matches!(TpRank::new(0, 0), Err(TpError::Zero { .. })));

    let errors = on_ranks(2, |comm| {
        let tp = TpRank::of(comm);
        let col = ColumnParallelLinear::new(3, 4, true, tp)?;
        let (w, b) = (vec![0.0; 2 * 3], vec![0.0; 2]);
        let mut y = vec![0.0; 2 * 2];
        let mut e = vec![col.forward(&[0.0; 5], &w, Some(&b), &mut y).unwrap_err()]; // x not [T, 3]
        e.push(col.forward(&[0.0; 6], &w[..5], Some(&b), &mut y).unwrap_err()); // weight
        e.push(col.forward(&[0.0; 6], &w, None, &mut y).unwrap_err()); // missing bias
        e.push(col.forward(&[0.0; 6], &w, Some(&b), &mut y[..3]).unwrap_err()); // y
        let emb = VocabParallelEmbedding::new(4, 2, tp)?;
        let mut out = vec![0.0; 2 * 2];
        e.push(emb.forward(comm, &[1, 4], &[0.0; 4], &mut out).unwrap_err()); // id 4 of vocab 4
        let ce = VocabParallelCrossEntropy::new(4, tp)?;
        e.push(ce.forward(comm, &[0.0; 4], &[0, 9]).unwrap_err()); // target 9
        e.push(ce.forward(comm, &[0.0; 3], &[0, 1]).unwrap_err()); // logits not [T, 2]
        let attn = ParallelAttention::new(4, 2, 2, 2, tp)?;
        let w = attn.zeros().unwrap();
        let mut y = vec![0.0; 3 * 4];
        e.push(attn.forward(comm, &[0.0; 12], &[0, 2], &w, &mut y).unwrap_err()); // ends at 2 of 3
        e.push(attn.forward(comm, &[0.0; 12], &[0, 2, 1, 3], &w, &mut y).unwrap_err()); // decreasing
                                                                                        // A communicator of another world than the layer's.
        let wrong = RowParallelLinear::new(4, 2, false, TpRank::new(0, 4)?)?;
        e.push(wrong.forward(comm, &[0.0; 1], &[0.0; 2], None, &mut [0.0; 2]).unwrap_err());
        Ok(e)
    });
    for e in errors {
        assert!(matches!(e[0], TpError::Shape { what: "x", .. }), "{:?}", e[0]);
        assert!(matches!(e[1], TpError::Shape { what: "weight", .. }), "{:?}", e[1]);
        assert!(matches!(e[2], TpError::Shape { what: "bias", .. }), "{:?}", e[2]);
        assert!(matches!(e[3], TpError::Shape { what: "y", .. }), "{:?}", e[3]);
        assert!(matches!(e[4], TpError::Token { position: 1, token: 4, vocab: 4, .. }), "{:?}", e[4]);
        assert!(matches!(e[5], TpError::Token { position: 1, token: 9, .. }), "{:?}", e[5]);
        assert!(matches!(e[6], TpError::Shape { what: "logits", .. }), "{:?}", e[6]);
        assert!(matches!(e[7], TpError::SeqLens { .. }), "{:?}", e[7]);
        assert!(matches!(e[8], TpError::SeqLens { .. }), "{:?}", e[8]);
        assert!(matches!(e[9], TpError::Rank { rank: _, world: 2 }), "{:?}", e[9]);
    }
}

#[test]
fn attention_backward_rejects_a_cache_of_another_batch() {
    let errors = on_ranks(2, |comm| {
        let attn = ParallelAttention::new(4, 2, 2, 2, TpRank::of(comm))?;
        let w = attn.zeros().unwrap();
        let x = vec![0.5; 3 * 4];
        let mut y = vec![0.0; 3 * 4];
        let cache = attn.forward(comm, &x, &[0, 3], &w, &mut y)?;
        let (mut dx, mut g) = (vec![0.0; 12], attn.zeros().unwrap());
        Ok(attn.backward(comm, &x, &[0, 1, 3], &w, &cache, &y, &mut dx, &mut g).unwrap_err())
    });
    for e in errors {
        assert!(matches!(e, TpError::SeqLens { .. }), "{e:?}");
    }
}
