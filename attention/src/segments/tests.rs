//! Segment attention: equal to dense causal attention for one Global segment, to block-diagonal
//! varlen attention for documents only; the CPU path against the naive reference over random
//! segment lists (forward and backward); the naive gradients against finite differences; bad
//! layouts are typed errors.
//!
//! Tolerances as the dense tests (inputs in [-2, 2]): f32 forward <= 2e-4 (1 + max |ref|),
//! backward <= 1e-3 (1 + max |ref|); comparisons of two CPU runs over the same tiles are exact
//! or within 1e-6 relative (different tile boundaries change summation order).

use proptest::prelude::*;

use super::*;
use crate::dense::tests::{back, offsets, rel_err, to, values};

fn heads(hq: usize, hkv: usize, dk: usize, dv: usize) -> Heads {
    Heads::new(hq, hkv, dk, dv)
}

struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    d_o: Vec<f64>,
}

fn inputs(h: &Heads, tq: usize, tk: usize, seed: u64) -> Inputs {
    Inputs {
        q: values(tq * h.num_q_heads * h.head_dim_k, seed),
        k: values(tk * h.num_kv_heads * h.head_dim_k, seed + 1),
        v: values(tk * h.num_kv_heads * h.head_dim_v, seed + 2),
        d_o: values(tq * h.num_q_heads * h.head_dim_v, seed + 3),
    }
}

#[test]
fn one_global_segment_is_dense_causal_attention() {
    let h = heads(4, 2, 16, 8);
    let lens = [1usize, 70, 129];
    let cu = offsets(&lens);
    let total: usize = lens.iter().sum();
    let x = inputs(&h, total, total, 7);
    let (q, k, v, d_o) = (to::<f32>(&x.q), to::<f32>(&x.k), to::<f32>(&x.v), to::<f32>(&x.d_o));
    let contexts: Vec<Vec<Segment>> = lens.iter().map(|&l| vec![Segment::global(l)]).collect();
    let layout = SegmentLayout::new(&contexts, &cu).unwrap();
    let cfg = SegmentConfig::new(h);
    let seg = forward(&cfg, &layout, &q, &k, &v, &cu, &cu).unwrap();
    let dense_cfg = DenseConfig::causal(h);
    let den = dense::forward(&dense_cfg, &q, &k, &v, &cu, &cu).unwrap();
    assert_eq!(seg, den, "same mask, same tiles: identical results");
    let gs = backward(&cfg, &layout, &q, &k, &v, &seg.o, &seg.lse, &d_o, &cu, &cu).unwrap();
    let gd = dense::backward(&dense_cfg, &q, &k, &v, &den.o, &den.lse, &d_o, &cu, &cu).unwrap();
    assert_eq!(gs, gd);
}

#[test]
fn documents_only_is_block_diagonal_varlen_attention() {
    let h = heads(6, 3, 8, 12);
    let docs = [5usize, 64, 1, 90];
    let ctx_len: usize = docs.iter().sum();
    let cu_ctx = offsets(&[ctx_len]);
    let cu_docs = offsets(&docs);
    let x = inputs(&h, ctx_len, ctx_len, 11);
    let (q, k, v, d_o) = (to::<f32>(&x.q), to::<f32>(&x.k), to::<f32>(&x.v), to::<f32>(&x.d_o));
    let layout = SegmentLayout::new(&[docs.iter().map(|&l| Segment::document(l)).collect()], &cu_ctx).unwrap();
    let cfg = SegmentConfig::new(h);
    let seg = forward(&cfg, &layout, &q, &k, &v, &cu_ctx, &cu_ctx).unwrap();
    // FlashAttention-style varlen: each document its own sequence.
    let den = dense::forward(&DenseConfig::causal(h), &q, &k, &v, &cu_docs, &cu_docs).unwrap();
    assert!(rel_err(&back(&seg.o), &back(&den.o)) < 1e-6);
    let gs = backward(&cfg, &layout, &q, &k, &v, &seg.o, &seg.lse, &d_o, &cu_ctx, &cu_ctx).unwrap();
    let gd = dense::backward(&DenseConfig::causal(h), &q, &k, &v, &den.o, &den.lse, &d_o, &cu_docs, &cu_docs).unwrap();
    for (a, b) in [(&gs.dq, &gd.dq), (&gs.dk, &gd.dk), (&gs.dv, &gd.dv)] {
        assert!(rel_err(&back(a), &back(b)) < 1e-5);
    }
}

fn segment_strategy() -> impl Strategy<Value = Vec<Vec<Segment>>> {
    let seg = (any::<bool>(), 0usize..70)
        .prop_map(|(doc, len)| if doc { Segment::document(len) } else { Segment::global(len) });
    proptest::collection::vec(proptest::collection::vec(seg, 1..5), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random segment lists, GQA ratios and head dims; queries either the whole context or its
    /// tail (as when the tail is computed against cached documents).
    #[test]
    fn cpu_matches_naive(
        contexts in segment_strategy(),
        (hkv, group) in (1usize..3, prop::sample::select(vec![1usize, 2, 3])),
        (dk, dv) in (prop::sample::select(vec![4usize, 16, 33]), prop::sample::select(vec![4usize, 8, 20])),
        tail in prop::option::of(0usize..40),
        seed in any::<u64>(),
    ) {
        let h = heads(hkv * group, hkv, dk, dv);
        let lens_k: Vec<usize> = contexts.iter().map(|c| c.iter().map(|s| s.len).sum()).collect();
        let lens_q: Vec<usize> = lens_k.iter().map(|&l| tail.map_or(l, |t| t.min(l))).collect();
        let (cu_q, cu_k) = (offsets(&lens_q), offsets(&lens_k));
        let x = inputs(&h, lens_q.iter().sum(), lens_k.iter().sum(), seed);
        let cfg = SegmentConfig::new(h);
        let (q, k, v, d_o) = (to::<f32>(&x.q), to::<f32>(&x.k), to::<f32>(&x.v), to::<f32>(&x.d_o));
        let (qf, kf, vf, dof) = (back(&q), back(&k), back(&v), back(&d_o));
        let layout = SegmentLayout::new(&contexts, &cu_k).unwrap();
        let out = forward(&cfg, &layout, &q, &k, &v, &cu_q, &cu_k).unwrap();
        let (o_ref, lse_ref) = naive::forward(&cfg, &contexts, &qf, &kf, &vf, &cu_q, &cu_k).unwrap();
        prop_assert!(rel_err(&back(&out.o), &o_ref) <= 2e-4, "o");
        let lse: Vec<f64> = out.lse.iter().map(|&x| x as f64).collect();
        prop_assert!(rel_err(&lse, &lse_ref) <= 2e-4, "lse");
        let g = backward(&cfg, &layout, &q, &k, &v, &out.o, &out.lse, &d_o, &cu_q, &cu_k).unwrap();
        let (dq, dk_ref, dv_ref) = naive::backward(&cfg, &contexts, &qf, &kf, &vf, &dof, &cu_q, &cu_k).unwrap();
        prop_assert!(rel_err(&back(&g.dq), &dq) <= 1e-3, "dq");
        prop_assert!(rel_err(&back(&g.dk), &dk_ref) <= 1e-3, "dk");
        prop_assert!(rel_err(&back(&g.dv), &dv_ref) <= 1e-3, "dv");
    }
}

#[test]
fn naive_gradients_match_finite_differences() {
    let h = heads(2, 1, 3, 2);
    let contexts = vec![vec![Segment::document(3), Segment::global(2), Segment::document(2), Segment::global(2)]];
    let cu = offsets(&[9]);
    let x = inputs(&h, 9, 9, 3);
    let cfg = SegmentConfig::new(h);
    let loss = |q: &[f64], k: &[f64], v: &[f64]| {
        let (o, _) = naive::forward(&cfg, &contexts, q, k, v, &cu, &cu).unwrap();
        o.iter().zip(&x.d_o).map(|(a, b)| a * b).sum::<f64>()
    };
    let (dq, dk, dv) = naive::backward(&cfg, &contexts, &x.q, &x.k, &x.v, &x.d_o, &cu, &cu).unwrap();
    let eps = 1e-6;
    for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
        for idx in 0..grad.len() {
            let mut t = [x.q.clone(), x.k.clone(), x.v.clone()];
            t[which][idx] += eps;
            let up = loss(&t[0], &t[1], &t[2]);
            t[which][idx] -= 2.0 * eps;
            let down = loss(&t[0], &t[1], &t[2]);
            let fd = (up - down) / (2.0 * eps);
            assert!(
                (fd - grad[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
                "tensor {which} idx {idx}: fd {fd} vs {}",
                grad[idx]
            );
        }
    }
}

#[test]
fn a_document_ignores_everything_outside_itself() {
    // Changing tokens before a document must not change the document's outputs.
    let h = heads(2, 2, 8, 8);
    let contexts = vec![vec![Segment::global(10), Segment::document(20), Segment::global(5)]];
    let cu = offsets(&[35]);
    let cfg = SegmentConfig::new(h);
    let layout = SegmentLayout::new(&contexts, &cu).unwrap();
    let x = inputs(&h, 35, 35, 5);
    let mut k2 = x.k.clone();
    let mut v2 = x.v.clone();
    for t in 0..10 * 2 * 8 {
        k2[t] += 1.0;
        v2[t] -= 1.0;
    }
    let a = forward(&cfg, &layout, &to::<f32>(&x.q), &to::<f32>(&x.k), &to::<f32>(&x.v), &cu, &cu).unwrap();
    let b = forward(&cfg, &layout, &to::<f32>(&x.q), &to::<f32>(&k2), &to::<f32>(&v2), &cu, &cu).unwrap();
    let row = 2 * 8; // HQ * Dv per token
    assert_eq!(a.o[10 * row..30 * row], b.o[10 * row..30 * row], "document outputs changed");
    assert_ne!(a.o[30 * row..], b.o[30 * row..], "the global tail must see the change");
}

#[test]
fn decode_of_a_global_tail_equals_the_forward_rows() {
    let h = heads(4, 2, 8, 8);
    let contexts = vec![vec![Segment::document(30), Segment::document(17), Segment::global(4)]];
    let cu = offsets(&[51]);
    let cfg = SegmentConfig::new(h);
    let layout = SegmentLayout::new(&contexts, &cu).unwrap();
    let x = inputs(&h, 51, 51, 9);
    let (q, k, v) = (to::<f32>(&x.q), to::<f32>(&x.k), to::<f32>(&x.v));
    let full = forward(&cfg, &layout, &q, &k, &v, &cu, &cu).unwrap();
    let row_q = 4 * 8;
    let last = &q[50 * row_q..];
    let dec = decode_global(&cfg, &layout, last, &k, &v, &offsets(&[1]), &cu).unwrap();
    assert!(rel_err(&back(&dec.o), &back(&full.o[50 * row_q..])) < 1e-5);
    // Decoding into a document is refused.
    let doc_ctx = vec![vec![Segment::global(50), Segment::document(1)]];
    let layout = SegmentLayout::new(&doc_ctx, &cu).unwrap();
    assert!(matches!(decode_global(&cfg, &layout, last, &k, &v, &offsets(&[1]), &cu), Err(Error::Config(_))));
}

#[test]
fn bad_layouts_are_typed_errors() {
    let cu = offsets(&[5, 3]);
    assert!(matches!(SegmentLayout::new(&[vec![Segment::document(5)]], &cu), Err(Error::Shape(_))));
    assert!(matches!(
        SegmentLayout::new(&[vec![Segment::document(4)], vec![Segment::global(3)]], &cu),
        Err(Error::Shape(_))
    ));
    assert!(SegmentLayout::new(&[vec![Segment::document(5)], vec![Segment::global(3)]], &cu).is_ok());
}

#[test]
fn the_flop_count_is_the_sum_of_per_document_costs() {
    let h = heads(1, 1, 1, 1);
    let contexts = vec![vec![Segment::document(4), Segment::document(4), Segment::global(2)]];
    let cu = offsets(&[10]);
    let layout = SegmentLayout::new(&contexts, &cu).unwrap();
    // Each document: 1+2+3+4 = 10 pairs; the tail: 9 + 10 pairs. 2 FLOPs x (Dk + Dv = 2).
    assert_eq!(layout.forward_flops(&h, &cu, &cu), 2.0 * 2.0 * (10.0 + 10.0 + 19.0));
}

/// The closed-form count equals the sum over query positions of each one's visible keys, for
/// mixed layouts and fewer queries than keys.
#[test]
fn the_flop_count_equals_the_per_position_sum() {
    let h = heads(3, 1, 2, 5);
    for (lens, tq) in [(vec![3usize, 1, 4, 2], 10usize), (vec![5, 5], 3), (vec![1], 1), (vec![2, 7, 1], 0)] {
        let tk: usize = lens.iter().sum();
        let segs: Vec<Segment> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| if i % 3 == 2 { Segment::global(n) } else { Segment::document(n) })
            .collect();
        let cu_k = offsets(&[tk]);
        let cu_q = offsets(&[tq]);
        let layout = SegmentLayout::new(&[segs], &cu_k).unwrap();
        let first = tk - tq.min(tk);
        let pairs: usize = (first..tk).map(|p| layout.visible_range(0, p)).map(|(lo, hi)| hi - lo).sum();
        let want = 2.0 * pairs as f64 * 3.0 * (2.0 + 5.0);
        assert_eq!(layout.forward_flops(&h, &cu_q, &cu_k), want, "lens {lens:?}, tq {tq}");
    }
}
