//! NSA: the CPU path against the naive reference (indices compared tie-aware, then the branches
//! compared on the same indices), the naive gradients against finite differences, the overlap
//! mapping and the choice on their own, equality with dense attention, bad input.
//!
//! Tolerances as in the dense tests: f32 storage, forward max |cpu - naive| <= 2e-4 (1 + max
//! |naive|), backward <= 1e-3 (1 + max |naive|); two selection scores closer than 1e-4 count
//! as a tie when the f32 and f64 choices differ.

use proptest::prelude::*;
use squid_cuda::Element;

use super::*;
use crate::dense::tests::{back, offsets, rel_err, to, values};
use crate::dense::{self, DenseConfig};

struct Case {
    cfg: NsaConfig,
    h: Heads,
    cu: Vec<u32>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    kw: Option<Vec<f64>>,
    vw: Option<Vec<f64>>,
    k_cmp: Vec<f64>,
    v_cmp: Vec<f64>,
    gates: Vec<f64>,
    d_o: Vec<f64>,
}

impl Case {
    /// Random inputs; compressed K/V by mean pooling of k, v (as a model might), rounded to f32.
    fn new(cfg: NsaConfig, h: Heads, lens: &[usize], separate_win: bool, seed: u64) -> Self {
        let cu = offsets(lens);
        let total: usize = lens.iter().sum();
        let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
        let r = |x: Vec<f64>| back(&to::<f32>(&x));
        let k = r(values(total * hkv * dk, seed + 1));
        let v = r(values(total * hkv * dv, seed + 2));
        let k_cmp = r(naive::compress_mean(&cfg, hkv, dk, &k, &cu).unwrap());
        let v_cmp = r(naive::compress_mean(&cfg, hkv, dv, &v, &cu).unwrap());
        Self {
            q: r(values(total * hq * dk, seed)),
            kw: separate_win.then(|| r(values(total * hkv * dk, seed + 5))),
            vw: separate_win.then(|| r(values(total * hkv * dv, seed + 6))),
            gates: r(values(total * hq * 3, seed + 3).iter().map(|x| 0.5 + 0.25 * x).collect()),
            d_o: r(values(total * hq * dv, seed + 4)),
            k,
            v,
            k_cmp,
            v_cmp,
            cfg,
            h,
            cu,
        }
    }

    fn inputs(&self) -> NsaInputs<'_, f64> {
        NsaInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            k_win: self.kw.as_deref(),
            v_win: self.vw.as_deref(),
            k_cmp: &self.k_cmp,
            v_cmp: &self.v_cmp,
            gates: &self.gates,
            cu_seqlens: &self.cu,
        }
    }
}

/// Storage-type copies of a case's inputs.
struct Stored<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    kw: Option<Vec<T>>,
    vw: Option<Vec<T>>,
    k_cmp: Vec<T>,
    v_cmp: Vec<T>,
    gates: Vec<T>,
    d_o: Vec<T>,
}

impl<T: Element> Stored<T> {
    fn of(c: &Case) -> Self {
        Self {
            q: to(&c.q),
            k: to(&c.k),
            v: to(&c.v),
            kw: c.kw.as_ref().map(|x| to(x)),
            vw: c.vw.as_ref().map(|x| to(x)),
            k_cmp: to(&c.k_cmp),
            v_cmp: to(&c.v_cmp),
            gates: to(&c.gates),
            d_o: to(&c.d_o),
        }
    }
    fn inputs<'a>(&'a self, cu: &'a [u32]) -> NsaInputs<'a, T> {
        NsaInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            k_win: self.kw.as_deref(),
            v_win: self.vw.as_deref(),
            k_cmp: &self.k_cmp,
            v_cmp: &self.v_cmp,
            gates: &self.gates,
            cu_seqlens: cu,
        }
    }
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Where the CPU's choice differs from the reference's, it must differ only among blocks the
/// reference scores within `tol` of each other.
fn assert_choice_tie_aware(c: &Case, cpu: &[u32], reference: &naive::NaiveForward, tol: f64) {
    let n = c.cfg.num_selected;
    for (slot, (a, b)) in cpu.chunks(n).zip(reference.indices.chunks(n)).enumerate() {
        if a == b {
            continue;
        }
        let scores = &reference.scores[slot];
        let score = |j: u32| scores.get(j as usize).copied().unwrap_or(0.0);
        let only_cpu: Vec<u32> = a.iter().copied().filter(|j| *j != NO_BLOCK && !b.contains(j)).collect();
        let only_ref: Vec<u32> = b.iter().copied().filter(|j| *j != NO_BLOCK && !a.contains(j)).collect();
        assert_eq!(only_cpu.len(), only_ref.len(), "slot {slot}: {a:?} vs {b:?}");
        let worst_cpu = only_cpu.iter().map(|&j| score(j)).fold(f64::INFINITY, f64::min);
        let best_ref = only_ref.iter().map(|&j| score(j)).fold(f64::NEG_INFINITY, f64::max);
        assert!(worst_cpu >= best_ref - tol, "slot {slot}: cpu {a:?} vs reference {b:?}, scores {scores:?}");
    }
}

/// CPU forward and backward against the reference run on the CPU's own choice.
fn check_against_naive(c: &Case) -> (f64, f64) {
    let st = Stored::<f32>::of(c);
    let x = st.inputs(&c.cu);
    let fwd = forward(&c.cfg, &c.h, &x).unwrap();
    let free = naive::forward(&c.cfg, &c.h, &c.inputs(), None).unwrap();
    assert_choice_tie_aware(c, &fwd.indices, &free, 1e-4);
    let r = naive::forward(&c.cfg, &c.h, &c.inputs(), Some(&fwd.indices)).unwrap();
    let mut err_f = 0f64;
    for (a, b) in [(&fwd.o, &r.o), (&fwd.o_cmp, &r.o_cmp), (&fwd.o_slc, &r.o_slc), (&fwd.o_win, &r.o_win)] {
        err_f = err_f.max(rel_err(&back(a), b));
    }
    for (a, b) in [(&fwd.lse_cmp, &r.lse_cmp), (&fwd.lse_slc, &r.lse_slc), (&fwd.lse_win, &r.lse_win)] {
        err_f = err_f.max(rel_err(&f64s(a), b));
    }
    let g = backward(&c.cfg, &c.h, &x, &fwd, &st.d_o).unwrap();
    let gr = naive::backward(&c.cfg, &c.h, &c.inputs(), &fwd.indices, &c.d_o).unwrap();
    let mut err_b = 0f64;
    for (a, b) in [
        (&g.dq, &gr.dq),
        (&g.dk, &gr.dk),
        (&g.dv, &gr.dv),
        (&g.dk_cmp, &gr.dk_cmp),
        (&g.dv_cmp, &gr.dv_cmp),
        (&g.dgates, &gr.dgates),
    ] {
        err_b = err_b.max(rel_err(&back(a), b));
    }
    assert_eq!(g.dk_win.is_some(), gr.dk_win.is_some());
    if let (Some(a), Some(b), Some(c2), Some(d)) = (&g.dk_win, &gr.dk_win, &g.dv_win, &gr.dv_win) {
        err_b = err_b.max(rel_err(&back(a), b)).max(rel_err(&back(c2), d));
    }
    (err_f, err_b)
}

fn config_strategy() -> impl Strategy<Value = NsaConfig> {
    (
        prop::sample::select(vec![(4usize, 2usize), (4, 4), (8, 4), (6, 2), (16, 8)]),
        prop::sample::select(vec![1usize, 2, 4, 8]),
        3usize..7,
        1usize..90,
    )
        .prop_map(|((l, d), mult, n, w)| {
            // l' a multiple of d and at least l: the smallest such times `mult` (8..128 keys).
            let base = l.div_ceil(d) * d;
            NsaConfig {
                block_cmp: l,
                stride_cmp: d,
                block_slc: base * mult,
                num_selected: n,
                window: w,
                scale: None,
                check_finite: false,
                ..Default::default()
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn cpu_matches_naive(
        cfg in config_strategy(),
        hkv in 1usize..=2,
        ratio in prop::sample::select(vec![1usize, 2, 3, 4, 8, 16]),
        dk in prop::sample::select(vec![8usize, 16, 20]),
        dv in prop::sample::select(vec![8usize, 12, 32]),
        lens in prop::collection::vec(1usize..160, 1..4),
        separate_win in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let c = Case::new(cfg, Heads::new(hkv * ratio, hkv, dk, dv), &lens, separate_win, seed);
        let (f, b) = check_against_naive(&c);
        prop_assert!(f <= 2e-4, "forward error {f}");
        prop_assert!(b <= 1e-3, "backward error {b}");
    }

    /// The shape where the CPU path scores the two local blocks once for both the selected and
    /// the window branch (l' = 64, w >= 128, shared K/V), and its edges (w just 128, sequences
    /// shorter than a block, many blocks).
    #[test]
    fn cpu_matches_naive_with_shared_local_blocks(
        (l, d) in prop::sample::select(vec![(8usize, 4usize), (16, 8), (32, 16), (64, 32)]),
        n in 3usize..9,
        w in prop::sample::select(vec![128usize, 129, 200, 512]),
        hkv in 1usize..=2,
        ratio in prop::sample::select(vec![1usize, 3, 4, 8]),
        lens in prop::collection::vec(1usize..420, 1..3),
        seed in any::<u64>(),
    ) {
        let cfg = NsaConfig { block_cmp: l, stride_cmp: d, block_slc: 64, num_selected: n, window: w, ..Default::default() };
        let c = Case::new(cfg, Heads::new(hkv * ratio, hkv, 16, 8), &lens, false, seed);
        let (f, b) = check_against_naive(&c);
        prop_assert!(f <= 2e-4, "forward error {f}");
        prop_assert!(b <= 1e-3, "backward error {b}");
    }

    /// The fast choice equals the full sort, ties included: scores drawn from a few values
    /// (many ties), or spread (the threshold pass prunes), with signed zeros, negatives and NaN
    /// (ordered as `total_cmp` orders them), fewer scores than blocks, up to 1700 blocks.
    #[test]
    fn fast_choice_equals_reference(
        n in 3usize..40,
        t in 0usize..110_000,
        few in prop::collection::vec(0u8..4, 0..60),
        spread in prop::collection::vec(-0.1f32..1.0, 0..1700),
        odd in prop::collection::vec((0usize..1700, prop::sample::select(vec![-0.0f32, 0.0, -1.0, f32::NAN, -f32::NAN, f32::INFINITY])), 0..6),
        use_spread in any::<bool>(),
    ) {
        let cfg = NsaConfig { num_selected: n, ..NsaConfig::default() };
        let mut scores: Vec<f32> = if use_spread { spread } else { few.iter().map(|&x| x as f32 * 0.25).collect() };
        for (at, v) in odd {
            if let Some(s) = scores.get_mut(at) {
                *s = v;
            }
        }
        let (mut a, mut b, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        select_blocks(&cfg, t, &scores, &mut a);
        select_blocks_fast(&cfg, t, n, &scores, &mut scratch, &mut b);
        prop_assert_eq!(a, b);
    }
}

/// Tasks of any size give the same forward, bit for bit (each row's blocks are visited in the
/// same order), and a backward within tolerance of the reference: tasks that span several
/// compressed-branch chunks, that end mid-sequence, and that hold a whole short sequence; with
/// the local blocks scored apart from the window and (l' = 64, w >= 128) together with it.
#[test]
fn task_size_does_not_change_the_result() {
    let small =
        NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 16, num_selected: 5, window: 24, ..Default::default() };
    let shared =
        NsaConfig { block_cmp: 16, stride_cmp: 8, block_slc: 64, num_selected: 4, window: 130, ..Default::default() };
    for (cfg, group, lens) in [
        (small, 4usize, vec![300usize, 7, 129]),
        (small, 3, vec![200, 1, 65]),
        (shared, 4, vec![330, 7, 129]),
        (shared, 3, vec![260, 1, 65]),
    ] {
        let h = Heads::new(group * 2, 2, 16, 8);
        let c = Case::new(cfg, h, &lens, false, 11);
        let st = Stored::<f32>::of(&c);
        let x = st.inputs(&c.cu);
        let mut first: Option<NsaOutput<f32>> = None;
        // Tasks are whole groups of 16 tokens (the window branch's row groups).
        for per in [16usize, 48, 128, 1024] {
            cpu::TASK_TOKENS.with(|t| t.set(Some(per)));
            let (err_f, err_b) = check_against_naive(&c);
            let fwd = forward(&c.cfg, &c.h, &x).unwrap();
            cpu::TASK_TOKENS.with(|t| t.set(None));
            assert!(err_f <= 2e-4 && err_b <= 1e-3, "group {group}, {per} tokens per task: {err_f:e} {err_b:e}");
            match &first {
                None => first = Some(fwd),
                Some(f) => assert!(f == &fwd, "group {group}: {per} tokens per task changed the forward"),
            }
        }
    }
}

#[test]
fn paper_defaults_and_config_errors() {
    let d = NsaConfig::default();
    assert_eq!((d.block_cmp, d.stride_cmp, d.block_slc, d.num_selected, d.window), (32, 16, 64, 16, 512));
    assert!(d.validate().is_ok());
    let bad = [
        NsaConfig { block_cmp: 0, ..d },
        NsaConfig { stride_cmp: 0, ..d },
        NsaConfig { block_slc: 0, ..d },
        NsaConfig { num_selected: 0, ..d },
        NsaConfig { window: 0, ..d },
        NsaConfig { stride_cmp: 12, ..d },                 // d does not divide l
        NsaConfig { block_cmp: 32, block_slc: 40, ..d },   // d does not divide l'
        NsaConfig { block_cmp: 128, stride_cmp: 16, ..d }, // l > l'
        NsaConfig { num_selected: 2, ..d },                // n below the forced blocks
        NsaConfig { scale: Some(f32::INFINITY), ..d },
    ];
    for b in bad {
        assert!(matches!(b.validate(), Err(Error::Config(_))), "{b:?}");
    }
}

#[test]
fn overlap_mapping_weights_blocks_by_shared_length() {
    let paper = NsaConfig::default();
    let j = 3;
    let w: Vec<usize> = (0..20).map(|i| overlap_weight(&paper, j, i)).collect();
    // Blocks 4j-1 ..= 4j+3 overlap selection block j with weights 1, 2, 2, 2, 1.
    assert_eq!(&w[11..16], &[1, 2, 2, 2, 1]);
    assert_eq!(w.iter().sum::<usize>(), 8);
    for (l, d, ls) in [(32, 16, 64), (8, 4, 8), (16, 4, 32), (12, 4, 12), (6, 2, 18), (16, 16, 64)] {
        let cfg = NsaConfig { block_cmp: l, stride_cmp: d, block_slc: ls, ..paper };
        for j in 0..6 {
            for i in 0..40 {
                let (a, b) = (i * d, i * d + l);
                let (c, e) = (j * ls, (j + 1) * ls);
                let overlap = b.min(e).saturating_sub(a.max(c));
                assert_eq!(overlap_weight(&cfg, j, i) * d, overlap, "l={l} d={d} l'={ls} j={j} i={i}");
            }
        }
        // The scatter used by the CPU path equals the literal sum of the reference.
        let p: Vec<f64> = values(37, l as u64).iter().map(|x| x.abs()).collect();
        let want = naive::slc_scores(&cfg, &p, 9);
        let mut chooser = Chooser::default();
        let got = chooser.slc_scores(&cfg, &p.iter().map(|&x| x as f32).collect::<Vec<_>>(), 9).to_vec();
        for (a, b) in got.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let weighted: Vec<f64> =
            (0..9).map(|j| (0..37).map(|i| overlap_weight(&cfg, j, i) as f64 * p[i]).sum()).collect();
        for (a, b) in weighted.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}

#[test]
fn choice_forces_first_and_local_blocks_is_causal_and_breaks_ties_low() {
    let cfg = NsaConfig { block_slc: 10, num_selected: 5, ..NsaConfig::default() };
    let mut out = Vec::new();
    // t = 75: current block 7; eligible 0..=7; forced 0, 6, 7; free slots 2.
    let mut scores = vec![0.0f64; 12];
    scores[3] = 0.5;
    scores[10] = 9.0; // after t: never chosen
    scores[2] = 0.2;
    scores[4] = 0.2;
    select_blocks(&cfg, 75, &scores, &mut out);
    assert_eq!(out, vec![0, 2, 3, 6, 7]); // 2 and 4 tie: the lower index wins
                                          // Early tokens: fewer blocks exist than n.
    select_blocks(&cfg, 3, &scores, &mut out);
    assert_eq!(out, vec![0]);
    select_blocks(&cfg, 15, &scores, &mut out);
    assert_eq!(out, vec![0, 1]);
    // All zero scores: forced, then the lowest indices.
    select_blocks(&cfg, 75, &[0.0f64; 8], &mut out);
    assert_eq!(out, vec![0, 1, 2, 6, 7]);
}

#[test]
fn tokens_without_a_complete_block_get_zero_compressed_output() {
    let cfg =
        NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 16, num_selected: 3, window: 4, ..NsaConfig::default() };
    let c = Case::new(cfg, Heads::new(2, 1, 8, 8), &[20], false, 4);
    let st = Stored::<f32>::of(&c);
    let fwd = forward(&c.cfg, &c.h, &st.inputs(&c.cu)).unwrap();
    // Tokens 0..=6 have no complete block of 8.
    assert!(fwd.o_cmp[..7 * 2 * 8].iter().all(|&x| x == 0.0));
    assert!(fwd.o_cmp[7 * 2 * 8..8 * 2 * 8].iter().any(|&x| x != 0.0));
    assert!(fwd.lse_cmp[..7].iter().all(|&x| x == f32::NEG_INFINITY));
}

/// Selecting every block with a window as long as the sequence: gates (0,1,0) give dense
/// causal attention, (0,0,1) dense sliding-window attention (window w), forward and backward.
#[test]
fn nsa_reduces_to_dense_attention() {
    let lens = [130usize, 1, 77];
    let h = Heads::new(6, 2, 16, 24);
    for (gates, window) in [([0.0, 1.0, 0.0], 1000), ([0.0, 0.0, 1.0], 1000), ([0.0, 0.0, 1.0], 19)] {
        let cfg =
            NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 16, num_selected: 16, window, ..NsaConfig::default() };
        let mut c = Case::new(cfg, h, &lens, false, 8);
        c.gates = (0..c.gates.len()).map(|i| gates[i % 3]).collect();
        let st = Stored::<f32>::of(&c);
        let fwd = forward(&c.cfg, &c.h, &st.inputs(&c.cu)).unwrap();
        let g = backward(&c.cfg, &c.h, &st.inputs(&c.cu), &fwd, &st.d_o).unwrap();
        let dcfg = DenseConfig { window: (gates[2] == 1.0).then_some(window), ..DenseConfig::causal(h) };
        let dense_out = dense::forward(&dcfg, &st.q, &st.k, &st.v, &c.cu, &c.cu).unwrap();
        let dg =
            dense::backward(&dcfg, &st.q, &st.k, &st.v, &dense_out.o, &dense_out.lse, &st.d_o, &c.cu, &c.cu).unwrap();
        assert!(rel_err(&back(&fwd.o), &back(&dense_out.o)) < 1e-5);
        assert!(rel_err(&back(&g.dq), &back(&dg.dq)) < 1e-4);
        assert!(rel_err(&back(&g.dk), &back(&dg.dk)) < 1e-4);
        assert!(rel_err(&back(&g.dv), &back(&dg.dv)) < 1e-4);
        // And in the reference, exactly the same statement in f64.
        let r = naive::forward(&c.cfg, &c.h, &c.inputs(), None).unwrap();
        let (o_dense, _) = dense::naive::forward(&dcfg, &c.q, &c.k, &c.v, &c.cu, &c.cu).unwrap();
        assert!(rel_err(&r.o, &o_dense) < 1e-12);
    }
}

/// Central differences of `L = sum(d_o * o)` in f64, indices held fixed.
#[test]
fn naive_gradients_match_finite_differences() {
    let cfg = NsaConfig {
        block_cmp: 4,
        stride_cmp: 2,
        block_slc: 4,
        num_selected: 3,
        window: 3,
        scale: Some(0.6),
        check_finite: false,
        ..Default::default()
    };
    let h = Heads::new(4, 2, 3, 2);
    for separate_win in [false, true] {
        let c = Case::new(cfg, h, &[11, 6], separate_win, 31);
        let fixed = naive::forward(&cfg, &h, &c.inputs(), None).unwrap().indices;
        let gr = naive::backward(&cfg, &h, &c.inputs(), &fixed, &c.d_o).unwrap();
        let names = ["q", "k", "v", "k_win", "v_win", "k_cmp", "v_cmp", "gates"];
        let grads: [Option<&Vec<f64>>; 8] = [
            Some(&gr.dq),
            Some(&gr.dk),
            Some(&gr.dv),
            gr.dk_win.as_ref(),
            gr.dv_win.as_ref(),
            Some(&gr.dk_cmp),
            Some(&gr.dv_cmp),
            Some(&gr.dgates),
        ];
        for (which, grad) in grads.iter().enumerate() {
            let Some(grad) = grad else { continue };
            for i in 0..grad.len() {
                let loss = |delta: f64| -> f64 {
                    let mut c2 =
                        Case { kw: c.kw.clone(), vw: c.vw.clone(), ..Case::new(cfg, h, &[11, 6], separate_win, 31) };
                    let t: &mut Vec<f64> = match which {
                        0 => &mut c2.q,
                        1 => &mut c2.k,
                        2 => &mut c2.v,
                        3 => c2.kw.as_mut().unwrap(),
                        4 => c2.vw.as_mut().unwrap(),
                        5 => &mut c2.k_cmp,
                        6 => &mut c2.v_cmp,
                        _ => &mut c2.gates,
                    };
                    t[i] += delta;
                    let f = naive::forward(&cfg, &h, &c2.inputs(), Some(&fixed)).unwrap();
                    f.o.iter().zip(&c.d_o).map(|(a, b)| a * b).sum()
                };
                let eps = 1e-6;
                let fd = (loss(eps) - loss(-eps)) / (2.0 * eps);
                assert!(
                    (fd - grad[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "{} [{i}]: fd {fd} vs {}",
                    names[which],
                    grad[i]
                );
            }
        }
    }
}

#[test]
fn compress_mean_matches_reference_and_its_backward_is_the_adjoint() {
    let cfg = NsaConfig { block_cmp: 8, stride_cmp: 4, ..NsaConfig::default() };
    let cu = offsets(&[30, 7, 8, 3, 41]);
    let (heads, dim) = (3, 5);
    let x = values(89 * heads * dim, 2);
    let got = compress_mean(&cfg, heads, dim, &to::<f32>(&x), &cu).unwrap();
    let want = naive::compress_mean(&cfg, heads, dim, &x, &cu).unwrap();
    // Blocks per sequence: 6, 0, 1, 0, 9.
    assert_eq!(got.len(), 16 * heads * dim);
    assert!(rel_err(&back(&got), &want) < 1e-6);
    // <compress(x), y> == <x, compress_backward(y)>
    let y = values(want.len(), 3);
    let dx = compress_mean_backward(&cfg, heads, dim, &to::<f32>(&y), &cu).unwrap();
    let lhs: f64 = want.iter().zip(&y).map(|(a, b)| a * b).sum();
    let rhs: f64 = x.iter().zip(back(&dx)).map(|(a, b)| a * b).sum();
    assert!((lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
    assert!(matches!(compress_mean(&cfg, heads, dim, &to::<f32>(&x[1..]), &cu), Err(Error::Shape(_))));
    assert!(matches!(compress_mean_backward(&cfg, heads, dim, &to::<f32>(&y[1..]), &cu), Err(Error::Shape(_))));
}

#[test]
fn half_precision_storage_runs_close_to_the_reference() {
    let cfg =
        NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 16, num_selected: 4, window: 20, ..NsaConfig::default() };
    let c = Case::new(cfg, Heads::new(4, 2, 16, 16), &[90, 33], false, 12);
    let st = Stored::<half::bf16>::of(&c);
    let fwd = forward(&c.cfg, &c.h, &st.inputs(&c.cu)).unwrap();
    let xr = Case {
        q: back(&st.q),
        k: back(&st.k),
        v: back(&st.v),
        k_cmp: back(&st.k_cmp),
        v_cmp: back(&st.v_cmp),
        gates: back(&st.gates),
        ..Case::new(cfg, c.h, &[90, 33], false, 12)
    };
    let r = naive::forward(&c.cfg, &c.h, &xr.inputs(), Some(&fwd.indices)).unwrap();
    let tol = 4.0 * squid_cuda::dtype::unit_roundoff(squid_cuda::DType::BF16) as f64 + 1e-3;
    assert!(rel_err(&back(&fwd.o), &r.o) <= tol);
}

#[test]
fn bad_input_is_a_typed_error() {
    let cfg =
        NsaConfig { block_cmp: 4, stride_cmp: 2, block_slc: 8, num_selected: 3, window: 5, ..NsaConfig::default() };
    let h = Heads::new(4, 2, 8, 8);
    let c = Case::new(cfg, h, &[10, 9], false, 1);
    let st = Stored::<f32>::of(&c);
    let ok = st.inputs(&c.cu);
    assert!(forward(&cfg, &h, &ok).is_ok());
    let run = |x: NsaInputs<'_, f32>| forward(&cfg, &h, &x);
    assert!(matches!(run(NsaInputs { q: &st.q[1..], ..ok }), Err(Error::Shape(_))));
    assert!(matches!(run(NsaInputs { v: &st.v[8..], ..ok }), Err(Error::Shape(_))));
    assert!(matches!(run(NsaInputs { k_cmp: &st.k_cmp[8..], ..ok }), Err(Error::Shape(_))));
    assert!(matches!(run(NsaInputs { gates: &st.gates[1..], ..ok }), Err(Error::Shape(_))));
    assert!(matches!(run(NsaInputs { k_win: Some(&st.k), ..ok }), Err(Error::Shape(_))));
    assert!(matches!(run(NsaInputs { cu_seqlens: &[0, 11, 10, 19], ..ok }), Err(Error::CuSeqlens(_))));
    assert!(matches!(run(NsaInputs { cu_seqlens: &[0, 10, 18], ..ok }), Err(Error::CuSeqlens(_))));
    assert!(matches!(forward(&cfg, &Heads::new(3, 2, 8, 8), &ok), Err(Error::Heads(_))));
    assert!(matches!(forward(&NsaConfig { window: 0, ..cfg }, &h, &ok), Err(Error::Config(_))));
    let mut q_nan = st.q.clone();
    q_nan[17] = f32::NAN;
    let checked = NsaConfig { check_finite: true, ..cfg };
    assert_eq!(
        forward(&checked, &h, &NsaInputs { q: &q_nan, ..ok }).unwrap_err(),
        Error::NonFinite { tensor: "q", index: 17 }
    );
    let fwd = forward(&cfg, &h, &ok).unwrap();
    assert!(matches!(backward(&cfg, &h, &ok, &fwd, &st.d_o[1..]), Err(Error::Shape(_))));
    let short = NsaOutput { indices: fwd.indices[1..].to_vec(), ..fwd.clone() };
    assert!(matches!(backward(&cfg, &h, &ok, &short, &st.d_o), Err(Error::Shape(_))));
}

/// Decode, token chunk after token chunk, against the reference's row for the same token (NSA
/// is causal, so one full forward holds every prefix's last row); the cache's compressed keys
/// against `compress_mean`.
#[test]
fn decode_matches_the_reference_row_of_the_newest_token() {
    let cfg =
        NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 16, num_selected: 4, window: 10, ..NsaConfig::default() };
    let h = Heads::new(6, 2, 16, 8);
    let (hkv, dk) = (2, 16);
    let lens = [1usize, 37, 70];
    for separate_win in [false, true] {
        let c = Case::new(cfg, h, &lens, separate_win, 17);
        let cache = check_decode::<f32>(&c, false, 2e-4);
        let st = Stored::<f32>::of(&c);
        for (s, &seq_len) in lens.iter().enumerate() {
            let (k_cmp, _) = cache.compressed(s).unwrap();
            let cu1 = [0u32, seq_len as u32];
            let seq_k = &st.k[c.cu[s] as usize * hkv * dk..c.cu[s + 1] as usize * hkv * dk];
            assert_eq!(k_cmp, &compress_mean(&cfg, hkv, dk, seq_k, &cu1).unwrap()[..]);
        }
    }
    // Misuse is a typed error.
    let mut cache = NsaCache::<f32>::new(cfg, h, 2, false).unwrap();
    assert!(matches!(cache.decode(&[0.0; 2 * 6 * 16], &[0.0; 2 * 6 * 3]), Err(Error::Cache(_))));
    assert!(matches!(cache.append(5, &[0.0; 32], &[0.0; 16], None), Err(Error::Cache(_))));
    assert!(matches!(cache.append(0, &[0.0; 31], &[0.0; 16], None), Err(Error::Shape(_))));
    assert!(matches!(cache.append(0, &[0.0; 32], &[0.0; 16], Some((&[0.0; 32], &[0.0; 16]))), Err(Error::Cache(_))));
}

/// Appends every sequence in uneven chunks (1, 7, 16, 3, 33, ... tokens) and decodes after each
/// round, with the dispatched (`portable = false`) or the build-target path; each output row and
/// choice against the reference's row for the same token, run on the storage-rounded inputs
/// and the cache's own compressed blocks. Output tolerance: `tol` of `rel_err`. Returns the
/// filled cache.
fn check_decode<T: Element>(c: &Case, portable: bool, tol: f64) -> NsaCache<T> {
    let (cfg, h) = (c.cfg, c.h);
    let (hq, hkv, dk, dv, n) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v, cfg.num_selected);
    let lens: Vec<usize> = c.cu.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    let st = Stored::<T>::of(c);
    let mut cache = NsaCache::<T>::new(cfg, h, lens.len(), c.kw.is_some()).unwrap();
    let mut decoded: Vec<(usize, Vec<f64>, Vec<u32>)> = Vec::new(); // (row, o, indices)
    let mut len = vec![0usize; lens.len()];
    for chunk in [1usize, 7, 16, 3, 33].into_iter().cycle() {
        if len == lens {
            break;
        }
        for s in 0..lens.len() {
            let add = chunk.min(lens[s] - len[s]);
            if add == 0 {
                continue;
            }
            let (a, b) = (c.cu[s] as usize + len[s], c.cu[s] as usize + len[s] + add);
            let win = st
                .kw
                .as_ref()
                .zip(st.vw.as_ref())
                .map(|(kw, vw)| (&kw[a * hkv * dk..b * hkv * dk], &vw[a * hkv * dv..b * hkv * dv]));
            cache.append(s, &st.k[a * hkv * dk..b * hkv * dk], &st.v[a * hkv * dv..b * hkv * dv], win).unwrap();
            len[s] += add;
        }
        let rows: Vec<usize> = (0..lens.len()).map(|s| c.cu[s] as usize + len[s] - 1).collect();
        let q: Vec<T> = rows.iter().flat_map(|&r| st.q[r * hq * dk..(r + 1) * hq * dk].to_vec()).collect();
        let gates: Vec<T> = rows.iter().flat_map(|&r| st.gates[r * hq * 3..(r + 1) * hq * 3].to_vec()).collect();
        let out = if portable { cache.decode_portable(&q, &gates) } else { cache.decode(&q, &gates) }.unwrap();
        if !portable {
            // Small steps run on the calling thread; spread over the pool they give the same.
            assert_eq!(cache.decode_in_parallel(&q, &gates).unwrap(), out);
        }
        for (s, &r) in rows.iter().enumerate() {
            let ix = out.indices[s * hkv * n..(s + 1) * hkv * n].to_vec();
            decoded.push((r, back(&out.o[s * hq * dv..(s + 1) * hq * dv]), ix));
        }
    }
    let (mut k_cmp, mut v_cmp) = (Vec::new(), Vec::new());
    for s in 0..lens.len() {
        let (kc, vc) = cache.compressed(s).unwrap();
        k_cmp.extend(back(kc));
        v_cmp.extend(back(vc));
    }
    let xr = Case {
        q: back(&st.q),
        k: back(&st.k),
        v: back(&st.v),
        kw: st.kw.as_ref().map(|x| back(x)),
        vw: st.vw.as_ref().map(|x| back(x)),
        k_cmp,
        v_cmp,
        gates: back(&st.gates),
        d_o: c.d_o.clone(),
        cfg,
        h,
        cu: c.cu.clone(),
    };
    let reference = naive::forward(&cfg, &h, &xr.inputs(), None).unwrap();
    let mut patched = reference.indices.clone();
    for (row, _, ix) in &decoded {
        patched[row * hkv * n..(row + 1) * hkv * n].copy_from_slice(ix);
    }
    assert_choice_tie_aware(&xr, &patched, &reference, 1e-4);
    let r = naive::forward(&cfg, &h, &xr.inputs(), Some(&patched)).unwrap();
    for (row, o, _) in &decoded {
        let err = rel_err(o, &r.o[row * hq * dv..(row + 1) * hq * dv]);
        assert!(err <= tol, "row {row}: error {err} > {tol}");
    }
    cache
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Decode over configs, GQA groups (1, 3, 16, ...), Dk != Dv (not multiples of the 16-key
    /// tiles), lengths that are not multiples of any block, separate window K/V, several
    /// sequences; f32 storage, both instruction-set paths.
    #[test]
    fn decode_matches_the_reference_over_shapes(
        cfg in config_strategy(),
        hkv in 1usize..=2,
        ratio in prop::sample::select(vec![1usize, 3, 4, 16]),
        dk in prop::sample::select(vec![8usize, 20, 64]),
        dv in prop::sample::select(vec![8usize, 24, 40]),
        lens in prop::collection::vec(1usize..150, 1..5),
        separate_win in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let c = Case::new(cfg, Heads::new(hkv * ratio, hkv, dk, dv), &lens, separate_win, seed);
        check_decode::<f32>(&c, false, 2e-4);
        check_decode::<f32>(&c, true, 2e-4);
    }
}

/// Half-precision caches: the cache's f32 copies of bf16 / f16 keys and values, outputs rounded
/// to the storage type (tolerance 4 unit roundoffs + 1e-3 of `rel_err`).
#[test]
fn decode_with_half_precision_storage_matches_the_reference() {
    let cfg =
        NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 12, num_selected: 4, window: 19, ..NsaConfig::default() };
    let c = Case::new(cfg, Heads::new(6, 2, 24, 16), &[45, 1, 90], true, 23);
    let tol = |d| 4.0 * squid_cuda::dtype::unit_roundoff(d) as f64 + 1e-3;
    check_decode::<half::bf16>(&c, false, tol(squid_cuda::DType::BF16));
    check_decode::<half::f16>(&c, false, tol(squid_cuda::DType::F16));
    check_decode::<half::bf16>(&c, true, tol(squid_cuda::DType::BF16));
}

/// Many short sequences in one step (more tasks than threads), group 16, the paper's config at
/// a length past a few selection blocks and the window.
#[test]
fn decode_many_sequences_and_paper_config() {
    let lens: Vec<usize> = (0..23).map(|i| 1 + (i * 37) % 70).collect();
    let small =
        NsaConfig { block_cmp: 4, stride_cmp: 2, block_slc: 8, num_selected: 3, window: 6, ..NsaConfig::default() };
    check_decode::<f32>(&Case::new(small, Heads::new(16, 1, 16, 8), &lens, false, 31), false, 2e-4);
    let c = Case::new(NsaConfig::default(), Heads::new(8, 2, 64, 64), &[1100, 530], false, 37);
    check_decode::<f32>(&c, false, 2e-4);
}
