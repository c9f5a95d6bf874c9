//! Bad input never panics, aborts or hangs: each fault once found by hand (a regression test
//! per fault), then a fuzz-style proptest that calls every public entry point with shapes, sizes
//! near the integer limits and configs, and accepts only a typed error or a result that is
//! checked against a plain computation.

use std::panic::{catch_unwind, AssertUnwindSafe};

use proptest::prelude::*;
use squid_attention::dense::{self, DenseConfig};
use squid_attention::nsa::{self, NsaCache, NsaConfig, NsaInputs, NO_BLOCK};
use squid_attention::paged::PagedKvView;
use squid_attention::segments::{self, Segment, SegmentConfig, SegmentLayout};
use squid_attention::{validate_cu_seqlens, Error, Heads};

/// Deterministic values in [-1, 1].
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

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

#[test]
fn huge_query_head_count_is_a_shape_error_not_a_wrapped_length() {
    // HQ x Dk = (2^62 + 1) x 4 wraps to 4: the old check took 4 elements for one row.
    let heads = Heads::new((1 << 62) + 1, 1, 4, 4);
    let cfg = DenseConfig::causal(heads);
    let x = vec![0.5f32; 4];
    let got = no_panic("huge HQ", || dense::forward(&cfg, &x, &x, &x, &[0, 1], &[0, 1]));
    assert!(matches!(got, Err(Error::Shape(_))), "{got:?}");
    let got = no_panic("huge HQ decode", || dense::decode(&cfg, &x, &x, &x, &[0, 1], &[0, 1]));
    assert!(matches!(got, Err(Error::Shape(_))), "{got:?}");
}

#[test]
fn a_window_larger_than_anything_is_no_window() {
    let heads = Heads::new(2, 1, 8, 8);
    let lens = [5u32, 1, 9];
    let mut cu = vec![0u32];
    for l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let total = *cu.last().unwrap() as usize;
    let (q, k, v) = (values(total * 16, 1), values(total * 8, 2), values(total * 8, 3));
    let d_o = values(total * 16, 4);
    for causal in [true, false] {
        let plain = DenseConfig { causal, ..DenseConfig::causal(heads) };
        let want = dense::forward(&plain, &q, &k, &v, &cu, &cu).unwrap();
        let want_dec = dense::decode(&plain, &q, &k, &v, &cu, &cu).unwrap();
        let want_bwd = dense::backward(&plain, &q, &k, &v, &want.o, &want.lse, &d_o, &cu, &cu).unwrap();
        for w in [usize::MAX, usize::MAX / 2 + 1, 1 << 63, (1 << 63) - 1, 1 << 40, 100] {
            let cfg = DenseConfig { window: Some(w), ..plain };
            let got = dense::forward(&cfg, &q, &k, &v, &cu, &cu).unwrap();
            assert_eq!(got, want, "window {w}, causal {causal}");
            assert_eq!(dense::decode(&cfg, &q, &k, &v, &cu, &cu).unwrap(), want_dec, "decode, window {w}");
            let bwd = dense::backward(&cfg, &q, &k, &v, &got.o, &got.lse, &d_o, &cu, &cu).unwrap();
            assert_eq!(bwd, want_bwd, "backward, window {w}");
            for i in 0..9 {
                assert_eq!(cfg.key_range(i, 9, 9), plain.key_range(i, 9, 9), "key_range, window {w}");
                for j in 0..9 {
                    assert_eq!(
                        dense::naive::visible(&cfg, i, j, 9, 9),
                        dense::naive::visible(&plain, i, j, 9, 9),
                        "naive mask, window {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn nsa_window_larger_than_anything_sees_the_whole_prefix() {
    let heads = Heads::new(2, 1, 16, 16);
    let wide =
        NsaConfig { block_cmp: 16, stride_cmp: 16, block_slc: 16, num_selected: 3, window: 1000, ..Default::default() };
    let huge = NsaConfig { window: usize::MAX, ..wide };
    let cu = [0u32, 70];
    let total = 70;
    let q = values(total * 32, 5);
    let (k, v) = (values(total * 16, 6), values(total * 16, 7));
    let k_cmp = nsa::compress_mean(&wide, 1, 16, &k, &cu).unwrap();
    let v_cmp = nsa::compress_mean(&wide, 1, 16, &v, &cu).unwrap();
    let gates = values(total * 6, 8);
    let x = NsaInputs {
        q: &q,
        k: &k,
        v: &v,
        k_win: None,
        v_win: None,
        k_cmp: &k_cmp,
        v_cmp: &v_cmp,
        gates: &gates,
        cu_seqlens: &cu,
    };
    let want = nsa::forward(&wide, &heads, &x).unwrap();
    let got = no_panic("NSA window usize::MAX", || nsa::forward(&huge, &heads, &x)).unwrap();
    assert_eq!(got.o_win, want.o_win);
    assert_eq!(got.o, want.o);
    let d_o = values(total * 32, 9);
    let want_bwd = nsa::backward(&wide, &heads, &x, &want, &d_o).unwrap();
    let got_bwd = no_panic("NSA backward window usize::MAX", || nsa::backward(&huge, &heads, &x, &got, &d_o)).unwrap();
    assert_eq!(got_bwd, want_bwd);
    // Decode of the last token through the cache.
    let mut caches = [wide, huge].map(|c| NsaCache::<f32>::new(c, heads, 1, false).unwrap());
    for cache in &mut caches {
        cache.append(0, &k, &v, None).unwrap();
    }
    let (q_last, g_last) = (&q[(total - 1) * 32..], &gates[(total - 1) * 6..]);
    assert_eq!(caches[1].decode(q_last, g_last).unwrap(), caches[0].decode(q_last, g_last).unwrap());
}

#[test]
fn segment_layout_of_overflowing_lengths_is_an_error() {
    let segs = vec![vec![Segment::document(usize::MAX), Segment::global(5)]];
    let got = no_panic("overflowing segments", || SegmentLayout::new(&segs, &[0, 4]));
    assert!(matches!(got, Err(Error::Shape(_))), "{got:?}");
}

#[test]
fn segment_layout_is_bound_to_its_offsets() {
    let heads = Heads::new(1, 1, 4, 4);
    // Validated for two contexts of 3 and 5 keys; called with 5 and 3.
    let layout = SegmentLayout::new(&[vec![Segment::document(3)], vec![Segment::document(5)]], &[0, 3, 8]).unwrap();
    let (q, k, v) = (values(32, 1), values(32, 2), values(32, 3));
    let cfg = SegmentConfig::new(heads);
    let other = [0u32, 5, 8];
    let got = segments::forward(&cfg, &layout, &q, &k, &v, &other, &other);
    assert!(matches!(got, Err(Error::CuSeqlens(_))), "{got:?}");
    let ok = [0u32, 3, 8];
    assert!(segments::forward(&cfg, &layout, &q, &k, &v, &ok, &ok).is_ok());
}

#[test]
fn paged_view_with_a_page_size_that_wraps_is_an_error() {
    let pool = vec![0f32; 64];
    let view = PagedKvView {
        page_size: 1 << 62,
        kv_heads: 4,
        head_dim: 1,
        len: 1,
        page_table: &[0],
        k_pages: &pool,
        v_pages: &pool,
    };
    let got = no_panic("page_size 2^62", || view.validate());
    assert!(matches!(got, Err(Error::Cache(_))), "{got:?}");
    let view = PagedKvView { page_size: usize::MAX, kv_heads: 1, head_dim: 1, len: usize::MAX, ..view };
    assert!(no_panic("page_size usize::MAX", || view.validate()).is_err());
}

/// A small NSA call whose forward output can be edited.
fn nsa_case() -> (NsaConfig, Heads, Vec<u32>, [Vec<f32>; 6]) {
    let cfg =
        NsaConfig { block_cmp: 16, stride_cmp: 16, block_slc: 16, num_selected: 3, window: 16, ..Default::default() };
    let heads = Heads::new(2, 1, 16, 16);
    let cu = vec![0u32, 40, 70];
    let q = values(70 * 32, 11);
    let (k, v) = (values(70 * 16, 12), values(70 * 16, 13));
    let k_cmp = nsa::compress_mean(&cfg, 1, 16, &k, &cu).unwrap();
    let v_cmp = nsa::compress_mean(&cfg, 1, 16, &v, &cu).unwrap();
    let gates = values(70 * 6, 14);
    (cfg, heads, cu, [q, k, v, k_cmp, v_cmp, gates])
}

#[test]
fn nsa_backward_refuses_edited_indices() {
    let (cfg, heads, cu, [q, k, v, k_cmp, v_cmp, gates]) = nsa_case();
    let x = NsaInputs {
        q: &q,
        k: &k,
        v: &v,
        k_win: None,
        v_win: None,
        k_cmp: &k_cmp,
        v_cmp: &v_cmp,
        gates: &gates,
        cu_seqlens: &cu,
    };
    let fwd = nsa::forward(&cfg, &heads, &x).unwrap();
    let d_o = values(70 * 32, 15);
    assert!(nsa::backward(&cfg, &heads, &x, &fwd, &d_o).is_ok());
    let n = cfg.num_selected;
    // Token 39 (the last of sequence 0): a block of sequence 1, a far block, unsorted, padding
    // in the middle, a duplicate.
    let edits: [(usize, [u32; 3]); 6] = [
        (39, [0, 1, 3]),
        (39, [0, 1, u32::MAX - 1]),
        (39, [1, 0, NO_BLOCK]),
        (39, [0, NO_BLOCK, 1]),
        (39, [1, 1, NO_BLOCK]),
        (0, [0, 1, NO_BLOCK]),
    ];
    for (token, edit) in edits {
        let mut bad = fwd.clone();
        bad.indices[token * n..][..n].copy_from_slice(&edit);
        let got =
            no_panic(&format!("indices {edit:?} at token {token}"), || nsa::backward(&cfg, &heads, &x, &bad, &d_o));
        assert!(matches!(got, Err(Error::Shape(_))), "{edit:?}: {got:?}");
        let naive = no_panic("naive backward", || {
            let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let (q, k, v, kc, vc, g) = (f64s(&q), f64s(&k), f64s(&v), f64s(&k_cmp), f64s(&v_cmp), f64s(&gates));
            let xd = NsaInputs {
                q: &q,
                k: &k,
                v: &v,
                k_win: None,
                v_win: None,
                k_cmp: &kc,
                v_cmp: &vc,
                gates: &g,
                cu_seqlens: &cu,
            };
            nsa::naive::backward(&cfg, &heads, &xd, &bad.indices, &f64s(&d_o))
        });
        assert!(matches!(naive, Err(Error::Shape(_))), "naive {edit:?}");
    }
}

#[test]
fn cmp_offsets_with_a_zero_stride_is_a_config_error() {
    let cfg = NsaConfig { stride_cmp: 0, ..Default::default() };
    let got = no_panic("stride 0", || nsa::cmp_offsets(&cfg, &[0, 100]));
    assert!(matches!(got, Err(Error::Config(_))), "{got:?}");
    assert!(matches!(nsa::cmp_offsets(&NsaConfig::default(), &[0, 50, 10]), Err(Error::CuSeqlens(_))));
    assert_eq!(nsa::cmp_offsets(&NsaConfig::default(), &[0, 31, 31 + 64]), Ok(vec![0, 0, 3]));
}

#[test]
fn compress_mean_backward_of_a_huge_output_is_out_of_memory_not_an_abort() {
    // One compressed block (l = l' = d = 2^31) of 2^16 channels: a 256 KiB gradient whose
    // output, [2^32 - 1 tokens, 2^16], would be a petabyte.
    let cfg = NsaConfig { block_cmp: 1 << 31, stride_cmp: 1 << 31, block_slc: 1 << 31, ..Default::default() };
    let dx_cmp = vec![1f32; 1 << 16];
    let got = no_panic("huge compress_mean_backward", || {
        nsa::compress_mean_backward(&cfg, 1 << 8, 1 << 8, &dx_cmp, &[0, u32::MAX])
    });
    assert!(matches!(got, Err(Error::OutOfMemory { .. })), "{got:?}");
}

#[test]
fn nsa_cache_for_2_pow_40_sequences_is_out_of_memory() {
    let heads = Heads::new(2, 1, 16, 16);
    for n in [1usize << 40, usize::MAX / 2 + 1, usize::MAX] {
        let got = no_panic("NsaCache 2^40", || NsaCache::<f32>::new(NsaConfig::default(), heads, n, false));
        assert!(matches!(got, Err(Error::OutOfMemory { .. })), "{n}: {:?}", got.err());
    }
}

/// Sizes near the integer limits, and small ones that make valid calls.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..5,
        1 => Just(16usize),
        1 => prop::sample::select(vec![
            usize::MAX,
            usize::MAX - 1,
            usize::MAX / 2 + 1,
            1 << 32,
            (1 << 32) + 1,
            1 << 40,
            (1 << 62) + 1,
            u32::MAX as usize,
        ]),
    ]
}

/// Offsets: mostly valid over small lengths, sometimes broken or near `u32::MAX`.
fn offsets() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        4 => prop::collection::vec(0u32..6, 0..4).prop_map(|lens| {
            let mut cu = vec![0u32];
            for l in lens {
                cu.push(cu.last().unwrap() + l);
            }
            cu
        }),
        1 => prop::collection::vec(prop::sample::select(vec![0u32, 1, 5, u32::MAX, u32::MAX - 1, 1 << 31]), 0..4),
    ]
}

#[derive(Debug, Clone)]
struct Fuzz {
    heads: Heads,
    window: Option<usize>,
    nsa: NsaConfig,
    cu_q: Vec<u32>,
    cu_k: Vec<u32>,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    extra: usize,
    seed: u64,
}

fn fuzz_case() -> impl Strategy<Value = Fuzz> {
    (
        (size(), size(), size(), size()),
        prop::option::of(size()),
        (size(), size(), size(), size(), size()),
        (offsets(), offsets()),
        (0usize..200, 0usize..200, 0usize..200),
        any::<u64>(),
    )
        .prop_map(|((hq, hkv, dk, dv), window, (l, d, ls, n, w), (cu_q, cu_k), (q_len, k_len, extra), seed)| {
            // Half the cases get the lengths their shapes imply (where small), so calls get past
            // validation into the kernels.
            let fit = |tokens: Option<&u32>, heads: usize, dim: usize, random: usize| {
                let n =
                    tokens.and_then(|&t| [t as usize, heads, dim].iter().try_fold(1usize, |a, &d| a.checked_mul(d)));
                match n {
                    Some(n) if seed % 4 < 2 && n <= 4096 => n,
                    _ => random,
                }
            };
            let (q_len, k_len, v_len) =
                (fit(cu_q.last(), hq, dk, q_len), fit(cu_k.last(), hkv, dk, k_len), fit(cu_k.last(), hkv, dv, k_len));
            Fuzz {
                heads: Heads::new(hq, hkv, dk, dv),
                window,
                nsa: NsaConfig {
                    block_cmp: l,
                    stride_cmp: d,
                    block_slc: ls,
                    num_selected: n,
                    window: w,
                    scale: None,
                    check_finite: seed % 2 == 0,
                    ..Default::default()
                },
                cu_q,
                cu_k,
                q_len,
                k_len,
                v_len,
                extra,
                seed,
            }
        })
}

/// Accepts a typed error or an output of the length its shape implies.
fn check_len<T>(what: &str, got: &Result<Vec<T>, Error>, rows: usize, per_row: usize) {
    if let Ok(x) = got {
        assert_eq!(x.len(), rows * per_row, "{what}: output length");
    }
}

proptest! {
    // Random seeds: every allocation sized from the caller is fallible (a typed OutOfMemory),
    // so no case can abort the process.
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Every public entry point with shapes, sizes near the integer limits and configs: a typed
    /// error or a result of the right shape, never a panic (an abort or a hang would end the run).
    #[test]
    fn every_entry_point_gives_a_result_or_a_typed_error(f in fuzz_case()) {
        let h = f.heads;
        let q = values(f.q_len, f.seed);
        let k = values(f.k_len, f.seed + 1);
        let v = values(f.v_len, f.seed + 2);
        let extra = values(f.extra, f.seed + 3);
        let input = format!("{f:?}");
        let dcfg = DenseConfig { heads: h, causal: f.seed % 3 != 0, window: f.window, scale: None, check_finite: f.seed % 2 == 0 };
        no_panic(&input, || {
            let _ = validate_cu_seqlens(&f.cu_q, f.q_len);
            let _ = h.validate();
            let _ = dcfg.validate();
            let _ = dcfg.key_range(f.q_len, f.extra, f.k_len);
            let fwd = dense::forward(&dcfg, &q, &k, &v, &f.cu_q, &f.cu_k);
            if let Ok(out) = &fwd {
                assert_eq!(out.o.len(), q.len() / h.head_dim_k * h.head_dim_v, "{input}");
                assert_eq!(out.lse.len(), q.len() / h.head_dim_k, "{input}");
                let g = dense::backward(&dcfg, &q, &k, &v, &out.o, &out.lse, &out.o, &f.cu_q, &f.cu_k);
                let g = g.expect("backward of a forward's own output");
                assert_eq!((g.dq.len(), g.dk.len(), g.dv.len()), (q.len(), k.len(), v.len()));
            }
            let _ = dense::backward(&dcfg, &q, &k, &v, &extra, &extra, &extra, &f.cu_q, &f.cu_k);
            let dec = dense::decode(&dcfg, &q, &k, &v, &f.cu_q, &f.cu_k);
            assert_eq!(dec.is_ok(), fwd.is_ok(), "decode and forward validate alike: {input}");
            // Paged decode: one view per sequence over the whole k / v as pages of `extra` tokens.
            let views: Vec<PagedKvView<'_, f32>> = f.cu_k.windows(2).map(|w| PagedKvView {
                page_size: f.extra,
                kv_heads: h.num_kv_heads,
                head_dim: h.head_dim_k,
                len: w[1].saturating_sub(w[0]) as usize,
                page_table: &[0, 1, 2],
                k_pages: &k,
                v_pages: &v,
            }).collect();
            for view in &views {
                if view.validate().is_ok() {
                    for pos in 0..view.len.min(8) {
                        assert_eq!(view.key(pos).len(), view.kv_heads * view.head_dim);
                    }
                }
            }
            let _ = dense::decode_paged(&dcfg, &q, &views, &f.cu_q);

            // Segments: one document then one global segment per context.
            let segs: Vec<Vec<Segment>> = f.cu_k.windows(2).map(|w| {
                let len = w[1].saturating_sub(w[0]) as usize;
                vec![Segment::document(len.min(f.extra)), Segment::global(len.saturating_sub(f.extra))]
            }).collect();
            let scfg = SegmentConfig { heads: h, scale: None, check_finite: dcfg.check_finite };
            if let Ok(layout) = SegmentLayout::new(&segs, &f.cu_k) {
                let _ = layout.visible_range(f.extra, f.q_len);
                let _ = layout.forward_flops(&h, &f.cu_q, &f.cu_k);
                if let Ok(out) = segments::forward(&scfg, &layout, &q, &k, &v, &f.cu_q, &f.cu_k) {
                    segments::backward(&scfg, &layout, &q, &k, &v, &out.o, &out.lse, &out.o, &f.cu_q, &f.cu_k)
                        .expect("segment backward of its forward's output");
                }
                let _ = segments::decode_global(&scfg, &layout, &q, &k, &v, &f.cu_q, &f.cu_k);
            }

            // NSA.
            let c = f.nsa;
            let _ = c.validate();
            let _ = (c.num_cmp_blocks(f.q_len), c.num_slc_blocks(f.k_len));
            let _ = nsa::overlap_weight(&c, f.extra, f.q_len);
            let mut out = Vec::new();
            nsa::select_blocks(&c, f.q_len.wrapping_mul(f.extra), &extra, &mut out);
            let offs = nsa::cmp_offsets(&c, &f.cu_q);
            let kc = nsa::compress_mean(&c, h.num_kv_heads, h.head_dim_k, &k, &f.cu_q);
            if let Ok(offs) = &offs {
                check_len("compress_mean", &kc, *offs.last().unwrap() as usize, h.num_kv_heads.saturating_mul(h.head_dim_k));
            }
            // Only over few tokens: a valid call over 2^32 tokens really allocates its output.
            if f.cu_q.last().is_some_and(|&t| t < 1000) {
                let _ = nsa::compress_mean_backward(&c, h.num_kv_heads, h.head_dim_k, &extra, &f.cu_q);
            }
            let gates = values(q.len() / h.head_dim_k.max(1) * 3, f.seed + 4);
            let (kc, vc) = match (&kc, nsa::compress_mean(&c, h.num_kv_heads, h.head_dim_v, &v, &f.cu_q)) {
                (Ok(kc), Ok(vc)) => (kc.clone(), vc),
                _ => (extra.clone(), extra.clone()),
            };
            let x = NsaInputs { q: &q, k: &k, v: &v, k_win: None, v_win: None, k_cmp: &kc, v_cmp: &vc, gates: &gates, cu_seqlens: &f.cu_q };
            if let Ok(fwd) = nsa::forward(&c, &h, &x) {
                let d_o = fwd.o.clone();
                nsa::backward(&c, &h, &x, &fwd, &d_o).expect("NSA backward of its forward's output");
                let mut edited = fwd.clone();
                if let Some(first) = edited.indices.first_mut() {
                    *first = (f.extra as u32).wrapping_mul(977);
                }
                let _ = nsa::backward(&c, &h, &x, &edited, &d_o);
            }
            if let Ok(mut cache) = NsaCache::<f32>::new(c, h, f.extra % 4, false) {
                let _ = cache.append(f.extra % 5, &k, &v, None);
                let _ = cache.append(0, &k, &v, Some((&k, &v)));
                let _ = cache.decode(&q, &extra);
                let _ = (cache.len(f.extra), cache.compressed(f.extra), cache.is_empty());
            }
        });
    }
}
