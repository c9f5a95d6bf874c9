//! The optional NSA inputs ([`NsaExtra`]) and the configurable forced blocks: the CPU path
//! against the naive reference over generated shapes (chunked prefill, caller-chosen blocks,
//! per-token block counts, forced initial / local counts, GQA 1..16, lengths of 1 and
//! non-multiples of every block), chunked prefill against the whole prefill, and bad input.
//!
//! Tolerances as in `tests.rs`: f32 storage, forward max |cpu - naive| <= 2e-4 (1 + max |naive|),
//! backward <= 1e-3 (1 + max |naive|); selection scores closer than 1e-4 count as a tie when the
//! f32 and f64 choices differ.

use proptest::prelude::*;

use super::*;
use crate::dense::tests::{back, offsets, rel_err, to, values};

/// A generated call: queries are the last `tq[s]` of each sequence's `tk[s]` keys.
struct ExtCase {
    cfg: NsaConfig,
    h: Heads,
    cu_q: Vec<u32>,
    cu_k: Vec<u32>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    kw: Option<Vec<f64>>,
    vw: Option<Vec<f64>>,
    k_cmp: Vec<f64>,
    v_cmp: Vec<f64>,
    gates: Vec<f64>,
    d_o: Vec<f64>,
    counts: Option<Vec<u32>>,
    given: Option<Vec<u32>>,
}

impl ExtCase {
    /// `seqs` as `(Tk, Tq)`; `counts` / `given` draw per-token counts / a valid random choice.
    fn new(
        cfg: NsaConfig,
        h: Heads,
        seqs: &[(usize, usize)],
        separate_win: bool,
        counts: bool,
        given: bool,
        seed: u64,
    ) -> Self {
        let cu_k = offsets(&seqs.iter().map(|s| s.0).collect::<Vec<_>>());
        let cu_q = offsets(&seqs.iter().map(|s| s.1.min(s.0)).collect::<Vec<_>>());
        let (total_q, total_k) = (*cu_q.last().unwrap() as usize, *cu_k.last().unwrap() as usize);
        let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
        let r = |x: Vec<f64>| back(&to::<f32>(&x));
        let k = r(values(total_k * hkv * dk, seed + 1));
        let v = r(values(total_k * hkv * dv, seed + 2));
        let k_cmp = r(naive::compress_mean(&cfg, hkv, dk, &k, &cu_k).unwrap());
        let v_cmp = r(naive::compress_mean(&cfg, hkv, dv, &v, &cu_k).unwrap());
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut pick = std::iter::from_fn(move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            Some((state >> 33) as usize)
        });
        let counts = counts.then(|| {
            let (lo, hi) = (cfg.forced_blocks(), cfg.num_selected);
            (0..total_q).map(|_| (lo + pick.next().unwrap() % (hi - lo + 1)) as u32).collect::<Vec<u32>>()
        });
        let given = given.then(|| {
            let n = cfg.num_selected;
            let mut ix = vec![NO_BLOCK; total_q * hkv * n];
            for (s, &(tk, tq)) in seqs.iter().enumerate() {
                let tq = tq.min(tk);
                for i in 0..tq {
                    let row = cu_q[s] as usize + i;
                    let blocks = (i + tk - tq) / cfg.block_slc + 1;
                    let most = counts.as_ref().map_or(n, |c| c[row] as usize);
                    for g in 0..hkv {
                        // A random subset of the visible blocks, ascending, at most `most`.
                        let mut chosen: Vec<u32> =
                            (0..blocks as u32).filter(|_| pick.next().unwrap() % 2 == 0).collect();
                        chosen.truncate(most);
                        ix[(row * hkv + g) * n..][..chosen.len()].copy_from_slice(&chosen);
                    }
                }
            }
            ix
        });
        Self {
            q: r(values(total_q * hq * dk, seed)),
            kw: separate_win.then(|| r(values(total_k * hkv * dk, seed + 5))),
            vw: separate_win.then(|| r(values(total_k * hkv * dv, seed + 6))),
            gates: r(values(total_q * hq * 3, seed + 3).iter().map(|x| 0.5 + 0.25 * x).collect()),
            d_o: r(values(total_q * hq * dv, seed + 4)),
            k,
            v,
            k_cmp,
            v_cmp,
            cfg,
            h,
            cu_q,
            cu_k,
            counts,
            given,
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
            cu_seqlens: &self.cu_q,
        }
    }

    fn extra(&self) -> NsaExtra<'_> {
        NsaExtra {
            cu_seqlens_k: Some(&self.cu_k),
            indices: self.given.as_deref(),
            num_selected: self.counts.as_deref(),
        }
    }
}

/// f32 copies of a case's inputs.
struct Stored32 {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    kw: Option<Vec<f32>>,
    vw: Option<Vec<f32>>,
    k_cmp: Vec<f32>,
    v_cmp: Vec<f32>,
    gates: Vec<f32>,
    d_o: Vec<f32>,
}

impl Stored32 {
    fn of(c: &ExtCase) -> Self {
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

    fn inputs<'a>(&'a self, cu_q: &'a [u32]) -> NsaInputs<'a, f32> {
        NsaInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            k_win: self.kw.as_deref(),
            v_win: self.vw.as_deref(),
            k_cmp: &self.k_cmp,
            v_cmp: &self.v_cmp,
            gates: &self.gates,
            cu_seqlens: cu_q,
        }
    }
}

/// Where the CPU's choice differs from the reference's, it differs only among blocks the
/// reference scores within `tol` of each other (and chooses as many).
fn assert_choice_tie_aware(n: usize, cpu: &[u32], reference: &naive::NaiveForward, tol: f64) {
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

/// CPU `forward_ext` / `backward_ext` against the reference run on the CPU's own choice;
/// returns (forward error, backward error).
fn check(c: &ExtCase) -> (f64, f64) {
    let st = Stored32::of(c);
    let x = st.inputs(&c.cu_q);
    let extra = c.extra();
    let fwd = forward_ext(&c.cfg, &c.h, &x, &extra).unwrap();
    let free = naive::forward_ext(&c.cfg, &c.h, &c.inputs(), &extra).unwrap();
    match &c.given {
        Some(given) => assert_eq!(&fwd.indices, given, "caller-chosen blocks are used as given"),
        None => assert_choice_tie_aware(c.cfg.num_selected, &fwd.indices, &free, 1e-4),
    }
    if let Some(counts) = &c.counts {
        let n = c.cfg.num_selected;
        for (slot, chosen) in fwd.indices.chunks(n).enumerate() {
            let used = chosen.iter().filter(|&&j| j != NO_BLOCK).count();
            assert!(used <= counts[slot / c.h.num_kv_heads] as usize, "slot {slot}: {chosen:?}");
        }
    }
    let on_cpu = NsaExtra { indices: Some(&fwd.indices), ..extra };
    let r = naive::forward_ext(&c.cfg, &c.h, &c.inputs(), &on_cpu).unwrap();
    let mut err_f = 0f64;
    for (a, b) in [(&fwd.o, &r.o), (&fwd.o_cmp, &r.o_cmp), (&fwd.o_slc, &r.o_slc), (&fwd.o_win, &r.o_win)] {
        err_f = err_f.max(rel_err(&back(a), b));
    }
    for (a, b) in [(&fwd.lse_cmp, &r.lse_cmp), (&fwd.lse_slc, &r.lse_slc), (&fwd.lse_win, &r.lse_win)] {
        err_f = err_f.max(rel_err(&a.iter().map(|&v| v as f64).collect::<Vec<_>>(), b));
    }
    let g = backward_ext(&c.cfg, &c.h, &x, &extra, &fwd, &st.d_o).unwrap();
    let gr = naive::backward_ext(&c.cfg, &c.h, &c.inputs(), Some(&c.cu_k), &fwd.indices, &c.d_o).unwrap();
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

/// Configs with forced counts 0..=2 initial, 0..=3 local, `n` from the forced count up, and
/// `l' = 64` often enough (with `w >= 128`) to reach the CPU path's shared local tiles.
fn ext_config() -> impl Strategy<Value = NsaConfig> {
    (
        prop::sample::select(vec![(4usize, 2usize, 8usize), (8, 4, 16), (6, 2, 12), (16, 8, 64), (8, 4, 64)]),
        0usize..=2,
        0usize..=3,
        0usize..4,
        prop::sample::select(vec![1usize, 5, 37, 130]),
    )
        .prop_map(|((l, d, ls), ni, nl, more, w)| NsaConfig {
            block_cmp: l,
            stride_cmp: d,
            block_slc: ls,
            num_selected: (ni + nl).max(1) + more,
            num_initial: ni,
            num_local: nl,
            window: w,
            ..Default::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn ext_cpu_matches_naive(
        cfg in ext_config(),
        hkv in 1usize..=2,
        ratio in prop::sample::select(vec![1usize, 2, 3, 4, 8, 16]),
        (dk, dv) in prop::sample::select(vec![(8usize, 8usize), (12, 4), (4, 12)]),
        seqs in prop::collection::vec((1usize..150, 1usize..150), 1..4),
        separate_win in any::<bool>(),
        counts in any::<bool>(),
        given in prop::bool::weighted(0.3),
        seed in any::<u64>(),
    ) {
        // Tq = min(drawn, Tk): whole prefills (Tq = Tk) come up often.
        let c = ExtCase::new(cfg, Heads::new(hkv * ratio, hkv, dk, dv), &seqs, separate_win, counts, given, seed);
        let (f, b) = check(&c);
        prop_assert!(f <= 2e-4, "forward error {f}");
        prop_assert!(b <= 1e-3, "backward error {b}");
    }

    /// The CPU path's shared local tiles (l' = 64, w >= 128, shared K/V) score blocks t/l' - 1
    /// and t/l' for both branches: with fewer than 2 forced local blocks or caller-chosen
    /// blocks they need not be chosen, and the path must not count them.
    #[test]
    fn ext_cpu_matches_naive_near_shared_local_tiles(
        (l, d) in prop::sample::select(vec![(8usize, 4usize), (16, 8)]),
        ni in 0usize..=1,
        nl in 0usize..=3,
        more in 0usize..3,
        w in prop::sample::select(vec![128usize, 200]),
        ratio in prop::sample::select(vec![1usize, 4]),
        seqs in prop::collection::vec((60usize..300, 1usize..300), 1..3),
        counts in any::<bool>(),
        given in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let cfg = NsaConfig {
            block_cmp: l,
            stride_cmp: d,
            block_slc: 64,
            num_selected: (ni + nl).max(1) + more,
            num_initial: ni,
            num_local: nl,
            window: w,
            ..Default::default()
        };
        let c = ExtCase::new(cfg, Heads::new(ratio, 1, 8, 8), &seqs, false, counts, given, seed);
        let (f, b) = check(&c);
        prop_assert!(f <= 2e-4, "forward error {f}");
        prop_assert!(b <= 1e-3, "backward error {b}");
    }

    /// The fast choice equals the sorting reference for any forced counts and per-token `n`.
    #[test]
    fn fast_choice_equals_reference_any_forced(
        ni in 0usize..4,
        nl in 0usize..4,
        more in 0usize..20,
        less in 0usize..20,
        t in 0usize..20_000,
        scores in prop::collection::vec(prop::sample::select(vec![0.0f32, 0.25, 0.5, -0.0, 1.0, 0.125]), 0..400),
    ) {
        let n = (ni + nl).max(1) + more;
        let cfg = NsaConfig { num_selected: n, num_initial: ni, num_local: nl, block_slc: 32, ..NsaConfig::default() };
        let n_t = n.saturating_sub(less).max(cfg.forced_blocks());
        let (mut a, mut b, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        select_blocks_n(&cfg, t, n_t, &scores, &mut a);
        select_blocks_fast(&cfg, t, n_t, &scores, &mut scratch, &mut b);
        prop_assert_eq!(&a, &b);
        // The forced blocks are in, nothing after the token, at most n_t, no duplicates.
        let cur = t / 32;
        let want = (cur + 1).min(n_t);
        prop_assert_eq!(a.len(), want);
        for j in (0..ni.min(cur + 1)).chain((cur + 1).saturating_sub(nl)..=cur) {
            prop_assert!(a.contains(&(j as u32)), "forced block {} missing from {:?}", j, a);
        }
        prop_assert!(a.windows(2).all(|p| p[0] < p[1]) && a.iter().all(|&j| j as usize <= cur));
    }
}

/// Prefilling in chunks gives each query row what the whole prefill gives it: every chunk's
/// forward against the keys so far equals the whole forward's rows, indices exactly, outputs and
/// `lse` within 1e-5 (f32 rounding: the products run over other tile shapes).
#[test]
fn chunked_prefill_equals_whole_prefill() {
    for (cfg, hq, hkv, lens, chunk) in [
        (
            NsaConfig { block_cmp: 8, stride_cmp: 4, block_slc: 16, num_selected: 4, window: 20, ..Default::default() },
            4,
            2,
            vec![77usize, 30],
            13usize,
        ),
        (
            NsaConfig { block_cmp: 16, stride_cmp: 8, block_slc: 64, window: 130, ..Default::default() },
            3,
            1,
            vec![300],
            64,
        ),
    ] {
        let h = Heads::new(hq, hkv, 8, 8);
        let whole = ExtCase::new(cfg, h, &lens.iter().map(|&l| (l, l)).collect::<Vec<_>>(), false, false, false, 5);
        let st = Stored32::of(&whole);
        let full = forward(&cfg, &h, &st.inputs(&whole.cu_q)).unwrap();
        let cu_full = whole.cu_q.clone();
        // Chunk c of every sequence: keys 0..end, queries end - tq..end.
        let longest = *lens.iter().max().unwrap();
        for end in (chunk..longest + chunk).step_by(chunk) {
            let seqs: Vec<(usize, usize)> = lens.iter().map(|&l| (end.min(l), chunk.min(end.min(l)))).collect();
            let cu_k = offsets(&seqs.iter().map(|s| s.0).collect::<Vec<_>>());
            let cu_q = offsets(&seqs.iter().map(|s| s.1).collect::<Vec<_>>());
            let take_rows = |src: &[f32], cu: &[u32], width: usize, first: &dyn Fn(usize) -> usize| -> Vec<f32> {
                let mut out = Vec::new();
                for s in 0..lens.len() {
                    let rows = (cu[s + 1] - cu[s]) as usize;
                    let a = cu_full[s] as usize + first(s);
                    out.extend_from_slice(&src[a * width..(a + rows) * width]);
                }
                out
            };
            let q_first = |s: usize| seqs[s].0 - seqs[s].1;
            let k_first = |_: usize| 0;
            let k = take_rows(&st.k, &cu_k, hkv * 8, &k_first);
            let v = take_rows(&st.v, &cu_k, hkv * 8, &k_first);
            let q = take_rows(&st.q, &cu_q, hq * 8, &q_first);
            let gates = take_rows(&st.gates, &cu_q, hq * 3, &q_first);
            let k_cmp = compress_mean(&cfg, hkv, 8, &k, &cu_k).unwrap();
            let v_cmp = compress_mean(&cfg, hkv, 8, &v, &cu_k).unwrap();
            let x = NsaInputs {
                q: &q,
                k: &k,
                v: &v,
                k_win: None,
                v_win: None,
                k_cmp: &k_cmp,
                v_cmp: &v_cmp,
                gates: &gates,
                cu_seqlens: &cu_q,
            };
            let extra = NsaExtra { cu_seqlens_k: Some(&cu_k), ..Default::default() };
            let part = forward_ext(&cfg, &h, &x, &extra).unwrap();
            assert_eq!(part.indices, take_rows_u32(&full.indices, &cu_q, &cu_full, hkv * cfg.num_selected, &q_first));
            let err = rel_err(&back(&part.o), &back(&take_rows(&full.o, &cu_q, hq * 8, &q_first)));
            assert!(err <= 1e-5, "end {end}: o differs by {err}");
            // lse [HQ, total]: row by row.
            for head in 0..hq {
                for s in 0..lens.len() {
                    for i in 0..seqs[s].1 {
                        let (pr, fr) = (cu_q[s] as usize + i, cu_full[s] as usize + q_first(s) + i);
                        let (a, b) = (
                            part.lse_cmp[head * q.len() / (hq * 8) + pr],
                            full.lse_cmp[head * st.q.len() / (hq * 8) + fr],
                        );
                        assert!(
                            a == b || (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "lse_cmp head {head} seq {s} row {i}"
                        );
                    }
                }
            }
        }
    }
}

fn take_rows_u32(src: &[u32], cu: &[u32], cu_full: &[u32], width: usize, first: &dyn Fn(usize) -> usize) -> Vec<u32> {
    let mut out = Vec::new();
    for s in 0..cu.len() - 1 {
        let rows = (cu[s + 1] - cu[s]) as usize;
        let a = cu_full[s] as usize + first(s);
        out.extend_from_slice(&src[a * width..(a + rows) * width]);
    }
    out
}

/// Bad optional inputs are typed errors naming what is wrong; none panics.
#[test]
fn bad_extra_inputs_are_errors() {
    let cfg = NsaConfig { block_cmp: 4, stride_cmp: 2, block_slc: 8, num_selected: 4, window: 5, ..Default::default() };
    let h = Heads::new(2, 1, 4, 4);
    let c = ExtCase::new(cfg, h, &[(20, 6)], false, false, false, 1);
    let st = Stored32::of(&c);
    let x = st.inputs(&c.cu_q);
    let good = c.extra();
    assert!(forward_ext(&cfg, &h, &x, &good).is_ok());
    let n = cfg.num_selected;
    // Query 0 sits at position 14: blocks 0 and 1 are visible.
    let mut ix = vec![NO_BLOCK; 6 * n];
    for (bad, why) in [
        (vec![1, 1, NO_BLOCK, NO_BLOCK], "twice"),
        (vec![0, 2, NO_BLOCK, NO_BLOCK], "after the token"),
        (vec![1, 0, NO_BLOCK, NO_BLOCK], "ascending"),
        (vec![NO_BLOCK, 0, NO_BLOCK, NO_BLOCK], "padding"),
    ] {
        ix[..n].copy_from_slice(&bad);
        let e = forward_ext(&cfg, &h, &x, &NsaExtra { indices: Some(&ix), ..good }).unwrap_err();
        assert!(matches!(&e, Error::Shape(m) if m.contains(why)), "{bad:?}: {e}");
    }
    ix[..n].copy_from_slice(&[0, 1, NO_BLOCK, NO_BLOCK]);
    assert!(forward_ext(&cfg, &h, &x, &NsaExtra { indices: Some(&ix), ..good }).is_ok());
    assert!(matches!(forward_ext(&cfg, &h, &x, &NsaExtra { indices: Some(&ix[1..]), ..good }), Err(Error::Shape(_))));
    // More chosen than the token's own count.
    let counts = [3u32; 6];
    ix[..n].copy_from_slice(&[0, 1, NO_BLOCK, NO_BLOCK]);
    ix[n..2 * n].copy_from_slice(&[0, 1, NO_BLOCK, NO_BLOCK]);
    let three = NsaExtra { indices: Some(&ix), num_selected: Some(&counts), ..good };
    assert!(forward_ext(&cfg, &h, &x, &three).is_ok());
    let two = [2u32; 6];
    let e = forward_ext(&cfg, &h, &x, &NsaExtra { num_selected: Some(&two), ..three }).unwrap_err();
    assert!(matches!(&e, Error::Config(m) if m.contains("num_selected")), "{e}");
    let five = [5u32; 6];
    assert!(matches!(
        forward_ext(&cfg, &h, &x, &NsaExtra { num_selected: Some(&five), ..good }),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        forward_ext(&cfg, &h, &x, &NsaExtra { num_selected: Some(&[3; 5]), ..good }),
        Err(Error::Shape(_))
    ));
    let one_block = NsaExtra { indices: Some(&ix), num_selected: Some(&[3, 1, 3, 3, 3, 3]), ..good };
    assert!(matches!(forward_ext(&cfg, &h, &x, &one_block), Err(Error::Config(_))));
    // More queries than keys; key offsets of another sequence count.
    let e = forward_ext(&cfg, &h, &x, &NsaExtra { cu_seqlens_k: Some(&[0, 5]), ..good }).unwrap_err();
    assert!(matches!(e, Error::CuSeqlens(_) | Error::Shape(_)), "{e}");
    assert!(matches!(
        forward_ext(&cfg, &h, &x, &NsaExtra { cu_seqlens_k: Some(&[0, 10, 20]), ..good }),
        Err(Error::CuSeqlens(_))
    ));
    // Forced blocks the config cannot hold.
    for bad in [
        NsaConfig { num_initial: 3, num_local: 2, ..cfg },
        NsaConfig { num_initial: 0, num_local: 0, num_selected: 0, ..cfg },
        NsaConfig { num_initial: usize::MAX, ..cfg },
    ] {
        assert!(matches!(forward_ext(&bad, &h, &x, &good), Err(Error::Config(_))), "{bad:?}");
    }
    // No forced block at all is a valid config.
    let none = NsaConfig { num_initial: 0, num_local: 0, num_selected: 1, ..cfg };
    assert!(forward_ext(&none, &h, &x, &good).is_ok());
}
