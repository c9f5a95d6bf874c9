//! The CPU path against the naive reference over generated shapes; the naive gradients against
//! central finite differences; bad input.
//!
//! Tolerances (inputs uniform in [-1, 1] x 2): f32 storage, forward max |cpu - naive| <=
//! 2e-4 (1 + max |naive|), backward <= 1e-3 (1 + max |naive|); bf16/f16 storage (the naive run
//! on the same rounded inputs in f64), <= 2 u (1 + max |naive|) + 1e-3 where u is the storage
//! unit roundoff, since the output store alone rounds by u.

use half::{bf16, f16};
use proptest::prelude::*;
use squid_cuda::{dtype::unit_roundoff, Element};

use super::*;

/// A deterministic stream of values in [-2, 2].
pub(crate) fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f64 / (1u64 << 24) as f64) * 4.0 - 2.0
        })
        .collect()
}

pub(crate) fn offsets(lens: &[usize]) -> Vec<u32> {
    let mut cu = vec![0u32];
    for l in lens {
        cu.push(cu.last().unwrap() + *l as u32);
    }
    cu
}

pub(crate) fn to<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v as f32)).collect()
}

pub(crate) fn back<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

/// max |a - b| / (1 + max |b|), treating equal infinities as equal.
pub(crate) fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = 1.0 + b.iter().filter(|x| x.is_finite()).fold(0f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() }).fold(0f64, f64::max) / scale
}

struct Case {
    cfg: DenseConfig,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    d_o: Vec<f64>,
    cu_q: Vec<u32>,
    cu_k: Vec<u32>,
}

fn make_case(cfg: DenseConfig, lens_q: &[usize], lens_k: &[usize], seed: u64) -> Case {
    let h = cfg.heads;
    let (tq, tk): (usize, usize) = (lens_q.iter().sum(), lens_k.iter().sum());
    Case {
        cfg,
        q: values(tq * h.num_q_heads * h.head_dim_k, seed),
        k: values(tk * h.num_kv_heads * h.head_dim_k, seed + 1),
        v: values(tk * h.num_kv_heads * h.head_dim_v, seed + 2),
        d_o: values(tq * h.num_q_heads * h.head_dim_v, seed + 3),
        cu_q: offsets(lens_q),
        cu_k: offsets(lens_k),
    }
}

/// Runs the CPU path in storage type `T` and the naive one on the same rounded inputs;
/// returns the forward and backward relative errors.
fn compare<T: Element>(c: &Case, backward_too: bool) -> (f64, f64) {
    let (q, k, v, d_o) = (to::<T>(&c.q), to::<T>(&c.k), to::<T>(&c.v), to::<T>(&c.d_o));
    let out = forward(&c.cfg, &q, &k, &v, &c.cu_q, &c.cu_k).unwrap();
    let (o_ref, lse_ref) = naive::forward(&c.cfg, &back(&q), &back(&k), &back(&v), &c.cu_q, &c.cu_k).unwrap();
    let lse: Vec<f64> = out.lse.iter().map(|&x| x as f64).collect();
    let fwd = rel_err(&back(&out.o), &o_ref).max(rel_err(&lse, &lse_ref));
    if !backward_too {
        return (fwd, 0.0);
    }
    let g = backward(&c.cfg, &q, &k, &v, &out.o, &out.lse, &d_o, &c.cu_q, &c.cu_k).unwrap();
    let (dq, dk, dv) = naive::backward(&c.cfg, &back(&q), &back(&k), &back(&v), &back(&d_o), &c.cu_q, &c.cu_k).unwrap();
    let bwd = rel_err(&back(&g.dq), &dq).max(rel_err(&back(&g.dk), &dk)).max(rel_err(&back(&g.dv), &dv));
    (fwd, bwd)
}

fn shape_strategy() -> impl Strategy<Value = (DenseConfig, Vec<usize>, Vec<usize>, u64)> {
    (
        1usize..=3,                                         // kv heads
        prop::sample::select(vec![1usize, 2, 3, 4, 8, 16]), // GQA ratio
        prop::sample::select(vec![1usize, 8, 16, 24, 64, 72]),
        prop::sample::select(vec![1usize, 8, 16, 40, 64]),
        any::<bool>(),
        prop::option::of(1usize..90),
        prop::collection::vec((1usize..150, 0usize..40, 0usize..8), 1..4),
        any::<u64>(),
    )
        .prop_map(|(hkv, ratio, dk, dv, causal, window, seqs, seed)| {
            let heads = Heads::new(hkv * ratio, hkv, dk, dv);
            let cfg = DenseConfig { heads, causal, window, scale: None, check_finite: false };
            // Mostly Tk >= Tq (prefill, chunked prefill); the third number sometimes shortens
            // the keys below the queries, which leaves early queries with no key under causal.
            let lens_q: Vec<usize> = seeds_q(&seqs);
            let lens_k: Vec<usize> =
                seqs.iter().map(|&(tq, extra, short)| if short == 0 { tq / 2 } else { tq + extra }).collect();
            (cfg, lens_q, lens_k, seed)
        })
}

fn seeds_q(seqs: &[(usize, usize, usize)]) -> Vec<usize> {
    seqs.iter().map(|s| s.0).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn cpu_matches_naive_f32((cfg, lens_q, lens_k, seed) in shape_strategy()) {
        let (fwd, bwd) = compare::<f32>(&make_case(cfg, &lens_q, &lens_k, seed), true);
        prop_assert!(fwd <= 2e-4, "forward error {fwd}");
        prop_assert!(bwd <= 1e-3, "backward error {bwd}");
    }

    #[test]
    fn decode_matches_naive(
        hkv in 1usize..=2,
        ratio in prop::sample::select(vec![1usize, 3, 4]),
        lens in prop::collection::vec((1usize..4, 0usize..700), 1..4),
        window in prop::option::of(1usize..300),
        seed in any::<u64>(),
    ) {
        let cfg = DenseConfig { heads: Heads::new(hkv * ratio, hkv, 32, 24), causal: true, window, scale: Some(0.3), check_finite: false };
        let lens_q: Vec<usize> = lens.iter().map(|l| l.0).collect();
        let lens_k: Vec<usize> = lens.iter().map(|l| l.0 + l.1).collect();
        let c = make_case(cfg, &lens_q, &lens_k, seed);
        let out = decode(&c.cfg, &to::<f32>(&c.q), &to::<f32>(&c.k), &to::<f32>(&c.v), &c.cu_q, &c.cu_k).unwrap();
        let (o_ref, lse_ref) = naive::forward(&c.cfg, &c.q_rounded(), &c.k_rounded(), &c.v_rounded(), &c.cu_q, &c.cu_k).unwrap();
        let lse: Vec<f64> = out.lse.iter().map(|&x| x as f64).collect();
        prop_assert!(rel_err(&back(&out.o), &o_ref) <= 2e-4);
        prop_assert!(rel_err(&lse, &lse_ref) <= 2e-4);
    }
}

impl Case {
    fn q_rounded(&self) -> Vec<f64> {
        back(&to::<f32>(&self.q))
    }
    fn k_rounded(&self) -> Vec<f64> {
        back(&to::<f32>(&self.k))
    }
    fn v_rounded(&self) -> Vec<f64> {
        back(&to::<f32>(&self.v))
    }
}

#[test]
fn half_precision_storage_matches_naive_on_rounded_inputs() {
    let cfg = DenseConfig::causal(Heads::new(4, 2, 48, 32));
    let c = make_case(cfg, &[70, 1, 130], &[70, 1, 130], 7);
    for (dtype, (fwd, bwd)) in [(bf16::DTYPE, compare::<bf16>(&c, true)), (f16::DTYPE, compare::<f16>(&c, true))] {
        let tol = 2.0 * unit_roundoff(dtype) as f64 + 1e-3;
        assert!(fwd <= tol, "{dtype:?} forward error {fwd} > {tol}");
        // Gradients are sums over many rounded terms: allow a few more roundings.
        assert!(bwd <= 4.0 * tol, "{dtype:?} backward error {bwd} > {}", 4.0 * tol);
    }
}

#[test]
fn many_short_sequences_and_length_one() {
    let lens: Vec<usize> = (0..50).map(|i| 1 + (i * 7) % 5).collect();
    for window in [None, Some(2)] {
        let cfg = DenseConfig { window, ..DenseConfig::causal(Heads::new(6, 2, 16, 8)) };
        let (fwd, bwd) = compare::<f32>(&make_case(cfg, &lens, &lens, 11), true);
        assert!(fwd <= 2e-4 && bwd <= 1e-3, "{fwd} {bwd}");
    }
    let cfg = DenseConfig::causal(Heads::new(1, 1, 4, 4));
    let c = make_case(cfg, &[1], &[1], 3);
    let out = forward(&c.cfg, &to::<f32>(&c.q), &to::<f32>(&c.k), &to::<f32>(&c.v), &c.cu_q, &c.cu_k).unwrap();
    // One key: the output is that key's value exactly.
    assert_eq!(back(&out.o), back(&to::<f32>(&c.v)));
}

#[test]
fn paper_head_dims_192_and_128() {
    let cfg = DenseConfig::causal(Heads::new(4, 1, 192, 128));
    let (fwd, bwd) = compare::<f32>(&make_case(cfg, &[100, 37], &[100, 37], 5), true);
    assert!(fwd <= 2e-4 && bwd <= 1e-3, "{fwd} {bwd}");
    let cfg = DenseConfig::causal(Heads::new(2, 2, 256, 256));
    let (fwd, bwd) = compare::<f32>(&make_case(cfg, &[65], &[65], 6), true);
    assert!(fwd <= 2e-4 && bwd <= 1e-3, "{fwd} {bwd}");
}

#[test]
fn queries_without_keys_get_zero_output_and_minus_infinity_lse() {
    // Tq = 5 > Tk = 2 under the causal mask: the first three queries see nothing.
    let cfg = DenseConfig::causal(Heads::new(1, 1, 4, 4));
    let c = make_case(cfg, &[5], &[2], 9);
    let out = forward(&c.cfg, &to::<f32>(&c.q), &to::<f32>(&c.k), &to::<f32>(&c.v), &c.cu_q, &c.cu_k).unwrap();
    assert!(out.o[..12].iter().all(|&x| x == 0.0));
    assert!(out.lse[..3].iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(out.lse[3].is_finite() && out.lse[4].is_finite());
    let (_, bwd) = compare::<f32>(&c, true);
    assert!(bwd <= 1e-3);
}

/// The naive backward against central differences of `L = sum(d_o * o)` in f64.
#[test]
fn naive_gradients_match_finite_differences() {
    for (causal, window, lens_q, lens_k) in [
        (true, None, vec![3, 4], vec![3, 6]),
        (false, Some(2), vec![4], vec![4]),
        (true, Some(3), vec![1, 5], vec![1, 5]),
    ] {
        let cfg = DenseConfig { heads: Heads::new(4, 2, 3, 2), causal, window, scale: Some(0.7), check_finite: false };
        let c = make_case(cfg, &lens_q, &lens_k, 21);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let (o, _) = naive::forward(&cfg, q, k, v, &c.cu_q, &c.cu_k).unwrap();
            o.iter().zip(&c.d_o).map(|(a, b)| a * b).sum()
        };
        let (dq, dk, dv) = naive::backward(&cfg, &c.q, &c.k, &c.v, &c.d_o, &c.cu_q, &c.cu_k).unwrap();
        let eps = 1e-6;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for i in 0..grad.len() {
                let (mut q, mut k, mut v) = (c.q.clone(), c.k.clone(), c.v.clone());
                let x = [&mut q, &mut k, &mut v][which].get_mut(i).map(|x| *x += eps);
                assert!(x.is_some());
                let plus = loss(&q, &k, &v);
                [&mut q, &mut k, &mut v][which][i] -= 2.0 * eps;
                let minus = loss(&q, &k, &v);
                let fd = (plus - minus) / (2.0 * eps);
                assert!(
                    (fd - grad[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "tensor {which} index {i}: fd {fd} vs {}",
                    grad[i]
                );
            }
        }
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let heads = Heads::new(4, 2, 8, 8);
    let cfg = DenseConfig::causal(heads);
    let c = make_case(cfg, &[3, 2], &[3, 2], 1);
    let (q, k, v) = (to::<f32>(&c.q), to::<f32>(&c.k), to::<f32>(&c.v));
    let run =
        |cfg: &DenseConfig, q: &[f32], k: &[f32], v: &[f32], cq: &[u32], ck: &[u32]| forward(cfg, q, k, v, cq, ck);
    assert!(matches!(run(&cfg, &q[..q.len() - 1], &k, &v, &c.cu_q, &c.cu_k), Err(Error::Shape(_))));
    assert!(matches!(run(&cfg, &q, &k, &v[..v.len() - 8], &c.cu_q, &c.cu_k), Err(Error::Shape(_))));
    assert!(matches!(run(&cfg, &q, &k, &v, &[0, 3, 2, 5], &c.cu_k), Err(Error::CuSeqlens(_))));
    assert!(matches!(run(&cfg, &q, &k, &v, &[0, 3, 4], &c.cu_k), Err(Error::CuSeqlens(_))));
    assert!(matches!(run(&cfg, &q, &k, &v, &[0, 5], &c.cu_k), Err(Error::CuSeqlens(_))));
    let bad_heads = DenseConfig::causal(Heads::new(3, 2, 8, 8));
    assert!(matches!(run(&bad_heads, &q, &k, &v, &c.cu_q, &c.cu_k), Err(Error::Heads(_))));
    let zero_dim = DenseConfig::causal(Heads::new(4, 2, 0, 8));
    assert!(matches!(run(&zero_dim, &q, &k, &v, &c.cu_q, &c.cu_k), Err(Error::Heads(_))));
    let big_dim = DenseConfig::causal(Heads::new(4, 2, 257, 8));
    assert!(matches!(run(&big_dim, &q, &k, &v, &c.cu_q, &c.cu_k), Err(Error::Heads(_))));
    let zero_window = DenseConfig { window: Some(0), ..cfg };
    assert!(matches!(run(&zero_window, &q, &k, &v, &c.cu_q, &c.cu_k), Err(Error::Config(_))));
    let bad_scale = DenseConfig { scale: Some(f32::NAN), ..cfg };
    assert!(matches!(run(&bad_scale, &q, &k, &v, &c.cu_q, &c.cu_k), Err(Error::Config(_))));
    let mut k_nan = k.clone();
    k_nan[5] = f32::NAN;
    let checked = DenseConfig { check_finite: true, ..cfg };
    assert_eq!(run(&checked, &q, &k_nan, &v, &c.cu_q, &c.cu_k), Err(Error::NonFinite { tensor: "k", index: 5 }));
    // Unchecked, the NaN is simply computed with.
    assert!(run(&cfg, &q, &k_nan, &v, &c.cu_q, &c.cu_k).is_ok());
    let out = run(&cfg, &q, &k, &v, &c.cu_q, &c.cu_k).unwrap();
    let d_o = to::<f32>(&c.d_o);
    assert!(matches!(backward(&cfg, &q, &k, &v, &out.o, &out.lse[1..], &d_o, &c.cu_q, &c.cu_k), Err(Error::Shape(_))));
    assert!(matches!(backward(&cfg, &q, &k, &v, &out.o, &out.lse, &d_o[1..], &c.cu_q, &c.cu_k), Err(Error::Shape(_))));
    assert!(matches!(decode(&cfg, &q, &k, &v, &c.cu_q, &[0, 5]), Err(Error::CuSeqlens(_))));
}

/// Scatters packed `[tokens, HKV, D]` rows of one sequence into pages of `page` tokens placed
/// in a shuffled order of a larger pool: `(pool, page_table)`.
fn paginate<T: Copy + Default>(
    rows: &[T],
    row_len: usize,
    page: usize,
    extra_pages: usize,
    seed: u64,
) -> (Vec<T>, Vec<u32>) {
    let tokens = rows.len() / row_len;
    let needed = tokens.div_ceil(page);
    let total = needed + extra_pages;
    // A fixed permutation of the pool's pages.
    let mut order: Vec<u32> = (0..total as u32).collect();
    let mut x = seed | 1;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let table: Vec<u32> = order[..needed].to_vec();
    let mut pool = vec![T::default(); total * page * row_len];
    for t in 0..tokens {
        let p = table[t / page] as usize;
        let dst = (p * page + t % page) * row_len;
        pool[dst..dst + row_len].copy_from_slice(&rows[t * row_len..(t + 1) * row_len]);
    }
    (pool, table)
}

#[test]
fn paged_decode_reads_pages_in_place_and_equals_contiguous_decode() {
    use crate::paged::PagedKvView;
    for (hq, hkv, d, page, lens_k, tq) in [
        (4usize, 2usize, 16usize, 16usize, vec![1usize, 40, 300], 1usize),
        (6, 3, 8, 7, vec![9, 64, 5], 2),
        (2, 2, 32, 64, vec![129], 3),
    ] {
        let cfg = DenseConfig::causal(Heads::new(hq, hkv, d, d));
        let lens_q: Vec<usize> = lens_k.iter().map(|&l| tq.min(l)).collect();
        let case = make_case(cfg, &lens_q, &lens_k, 17 + page as u64);
        let (q, k, v) = (to::<f32>(&case.q), to::<f32>(&case.k), to::<f32>(&case.v));
        let expect = decode(&cfg, &q, &k, &v, &case.cu_q, &case.cu_k).unwrap();
        let row = hkv * d;
        let pools: Vec<_> = (0..lens_k.len())
            .map(|s| {
                let (a, b) = (case.cu_k[s] as usize * row, case.cu_k[s + 1] as usize * row);
                let (kp, table) = paginate(&k[a..b], row, page, 2, s as u64 + 3);
                let (vp, _) = paginate(&v[a..b], row, page, 2, s as u64 + 3);
                (kp, vp, table)
            })
            .collect();
        let views: Vec<PagedKvView<'_, f32>> = pools
            .iter()
            .zip(&lens_k)
            .map(|((kp, vp, table), &len)| PagedKvView {
                page_size: page,
                kv_heads: hkv,
                head_dim: d,
                len,
                page_table: table,
                k_pages: kp,
                v_pages: vp,
            })
            .collect();
        let got = decode_paged(&cfg, &q, &views, &case.cu_q).unwrap();
        assert_eq!(got, expect, "same keys in the same order: identical results");
        // And against the f64 reference.
        let (o_ref, _) = naive::forward(&cfg, &back(&q), &back(&k), &back(&v), &case.cu_q, &case.cu_k).unwrap();
        assert!(rel_err(&back(&got.o), &o_ref) <= 2e-4);
    }
}

#[test]
fn paged_decode_rejects_bad_views() {
    use crate::paged::PagedKvView;
    let cfg = DenseConfig::causal(Heads::new(2, 1, 4, 4));
    let q = vec![0.5f32; 2 * 4];
    let pool = vec![0.0f32; 2 * 4 * 4]; // 2 pages of 4 tokens
    let good = PagedKvView {
        page_size: 4,
        kv_heads: 1,
        head_dim: 4,
        len: 6,
        page_table: &[1, 0],
        k_pages: &pool,
        v_pages: &pool,
    };
    assert!(decode_paged(&cfg, &q, &[good], &[0, 1]).is_ok());
    let short_table = PagedKvView { page_table: &[1], ..good };
    let outside = PagedKvView { page_table: &[0, 2], ..good };
    let wrong_heads = PagedKvView { kv_heads: 2, head_dim: 2, ..good };
    for bad in [short_table, outside, wrong_heads] {
        assert!(decode_paged(&cfg, &q, &[bad], &[0, 1]).is_err());
    }
    assert!(matches!(decode_paged(&cfg, &q, &[good, good], &[0, 1]), Err(Error::Shape(_))));
}

/// Decode's tile paths the proptest above leaves out: GQA group 16, `Dk != Dv` (192/128, values
/// padded to whole vectors), bf16/f16 storage, no causal mask, several key chunks with a last
/// partial tile and windows starting mid-tile; held to the naive forward on the rounded inputs.
#[test]
fn decode_covers_wide_heads_half_storage_and_partial_tiles() {
    fn check<T: Element>(cfg: DenseConfig, lens_q: &[usize], lens_k: &[usize], seed: u64) {
        let c = make_case(cfg, lens_q, lens_k, seed);
        let (q, k, v) = (to::<T>(&c.q), to::<T>(&c.k), to::<T>(&c.v));
        let out = decode(&c.cfg, &q, &k, &v, &c.cu_q, &c.cu_k).unwrap();
        let (o_ref, lse_ref) = naive::forward(&c.cfg, &back(&q), &back(&k), &back(&v), &c.cu_q, &c.cu_k).unwrap();
        let tol = 2.0 * unit_roundoff(T::DTYPE) as f64 + 1e-3;
        let lse: Vec<f64> = out.lse.iter().map(|&x| x as f64).collect();
        let (eo, el) = (rel_err(&back(&out.o), &o_ref), rel_err(&lse, &lse_ref));
        assert!(eo <= tol && el <= 2e-4, "{cfg:?} {lens_k:?}: o error {eo}, lse error {el}, tolerance {tol}");
    }
    let wide = |causal, window| DenseConfig {
        heads: Heads::new(16, 1, 192, 128),
        causal,
        window,
        scale: None,
        check_finite: false,
    };
    let gqa3 = |window| DenseConfig {
        heads: Heads::new(6, 2, 64, 40),
        causal: true,
        window,
        scale: Some(0.2),
        check_finite: false,
    };
    for (i, cfg) in [wide(true, None), wide(false, None), wide(true, Some(130))].into_iter().enumerate() {
        check::<bf16>(cfg, &[2, 1], &[1000, 77], i as u64);
        check::<f16>(cfg, &[1, 3], &[333, 1025], 10 + i as u64);
        check::<f32>(cfg, &[3], &[641], 20 + i as u64);
    }
    check::<f32>(gqa3(Some(71)), &[2, 1, 4], &[900, 1, 4], 30);
    check::<bf16>(gqa3(None), &[1], &[4096 + 63], 31);
}
