//! The device decode (on `test_device()`: the simulator here) against the f64 reference on the
//! same rounded inputs, packed and paged (pages of one pool shuffled across sequences), and its
//! batch invariance bit for bit.
//!
//! Tolerance: max |device - naive| <= 2 u (1 + max |naive|) + 1e-3 for `o` (u the storage's unit
//! roundoff: the output store alone rounds by u), and 1e-3 (1 + |lse|) for `lse` (f32 sums of at
//! most a few hundred terms).

use half::{bf16, f16};
use proptest::prelude::*;
use squid_cuda::dtype::unit_roundoff;
use squid_cuda::launch::Gpu;

use super::cuda_decode::*;
use super::tests::{back, offsets, to, values};
use super::*;

struct Case {
    cfg: DenseConfig,
    cu_q: Vec<u32>,
    cu_k: Vec<u32>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

fn case(cfg: DenseConfig, lens_q: &[usize], lens_k: &[usize], seed: u64) -> Case {
    let h = cfg.heads;
    let (tq, tk): (usize, usize) = (lens_q.iter().sum(), lens_k.iter().sum());
    Case {
        cfg,
        cu_q: offsets(lens_q),
        cu_k: offsets(lens_k),
        q: values(tq * h.num_q_heads * h.head_dim_k, seed),
        k: values(tk * h.num_kv_heads * h.head_dim_k, seed ^ 0x55),
        v: values(tk * h.num_kv_heads * h.head_dim_v, seed ^ 0xaa),
    }
}

/// The reference on the inputs as stored in `T`.
fn reference<T: Element>(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let r = |x: &[f64]| back(&to::<T>(x));
    naive::forward(&c.cfg, &r(&c.q), &r(&c.k), &r(&c.v), &c.cu_q, &c.cu_k).unwrap()
}

fn assert_close<T: DecodeElement>(what: &str, got: &DeviceDenseOutput<T>, gpu: &Gpu, want: &(Vec<f64>, Vec<f64>)) {
    let o = back(&gpu.download(&got.o).unwrap());
    let lse = gpu.download(&got.lse).unwrap();
    let max_ref = want.0.iter().fold(0f64, |m, x| m.max(x.abs()));
    let tol = 2.0 * unit_roundoff(T::DTYPE) as f64 * (1.0 + max_ref) + 1e-3;
    for (i, (a, b)) in o.iter().zip(&want.0).enumerate() {
        assert!((a - b).abs() <= tol, "{what} {:?}: o[{i}] = {a}, want {b} (tol {tol})", T::DTYPE);
    }
    for (i, (&a, &b)) in lse.iter().zip(&want.1).enumerate() {
        if b == f64::NEG_INFINITY {
            assert_eq!(a, f32::NEG_INFINITY, "{what}: lse[{i}] of a row without keys");
        } else {
            assert!((a as f64 - b).abs() <= 1e-3 * (1.0 + b.abs()), "{what}: lse[{i}] = {a}, want {b}");
        }
    }
}

fn run_packed<T: DecodeElement>(gpu: &Gpu, c: &Case, opts: &DecodeOptions) -> DeviceDenseOutput<T> {
    let (q, k, v) =
        (gpu.upload(&to::<T>(&c.q)).unwrap(), gpu.upload(&to::<T>(&c.k)).unwrap(), gpu.upload(&to::<T>(&c.v)).unwrap());
    cuda_decode::decode(gpu, &c.cfg, opts, &q, &k, &v, &c.cu_q, &c.cu_k).unwrap()
}

/// Every sequence's keys in pages of `page` tokens, the pages of all sequences shuffled through one
/// pool with `spare` unused pages: `(k pool, v pool, page tables)`.
fn paginate<T: Element>(c: &Case, page: usize, spare: usize, seed: u64) -> (Vec<T>, Vec<T>, Vec<Vec<u32>>) {
    let h = c.cfg.heads;
    let row = h.num_kv_heads * h.head_dim_k;
    let lens: Vec<usize> = c.cu_k.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    let total: usize = lens.iter().map(|l| l.div_ceil(page)).sum::<usize>() + spare;
    let mut order: Vec<u32> = (0..total as u32).collect();
    let mut x = seed | 1;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let (k, v) = (to::<T>(&c.k), to::<T>(&c.v));
    let (mut kp, mut vp) = (vec![T::default(); total * page * row], vec![T::default(); total * page * row]);
    let mut next = 0;
    let mut tables = Vec::new();
    for (s, &len) in lens.iter().enumerate() {
        let table: Vec<u32> = order[next..next + len.div_ceil(page)].to_vec();
        next += table.len();
        for t in 0..len {
            let src = (c.cu_k[s] as usize + t) * row;
            let dst = (table[t / page] as usize * page + t % page) * row;
            kp[dst..dst + row].copy_from_slice(&k[src..src + row]);
            vp[dst..dst + row].copy_from_slice(&v[src..src + row]);
        }
        tables.push(table);
    }
    (kp, vp, tables)
}

fn run_paged<T: DecodeElement>(
    gpu: &Gpu,
    c: &Case,
    page: usize,
    opts: &DecodeOptions,
    seed: u64,
) -> DeviceDenseOutput<T> {
    let (kp, vp, tables) = paginate::<T>(c, page, 3, seed);
    let (kp, vp) = (gpu.upload(&kp).unwrap(), gpu.upload(&vp).unwrap());
    let h = c.cfg.heads;
    let kv = DevicePagedKv {
        page_size: page,
        kv_heads: h.num_kv_heads,
        head_dim: h.head_dim_k,
        k_pages: kp.view(),
        v_pages: vp.view(),
    };
    let seqs: Vec<PagedSeq<'_>> = tables
        .iter()
        .zip(c.cu_k.windows(2))
        .map(|(t, w)| PagedSeq { len: (w[1] - w[0]) as usize, page_table: t })
        .collect();
    let q = gpu.upload(&to::<T>(&c.q)).unwrap();
    cuda_decode::decode_paged(gpu, &c.cfg, opts, &q, &kv, &seqs, &c.cu_q).unwrap()
}

fn heads(group: usize, hkv: usize, dk: usize, dv: usize) -> Heads {
    Heads::new(group * hkv, hkv, dk, dv)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    /// Packed and paged decode over generated shapes: 1-3 new tokens, caches of 1-150 keys (not
    /// multiples of the 32-key tile or of the page), GQA 1/2/3/8, head dims 64/128 (and Dk != Dv
    /// packed), windows, forced and automatic split counts, bf16 and f16.
    #[test]
    fn device_decode_matches_naive(lens_k in prop::collection::vec(1usize..150, 1..4), tq in 1usize..4,
                                   group in prop::sample::select(vec![1usize, 2, 3, 8]), hkv in 1usize..3,
                                   dk in prop::sample::select(vec![64usize, 128]), dv_other in any::<bool>(),
                                   window in prop::option::of(1usize..80), splits in prop::option::of(1usize..5),
                                   page in prop::sample::select(vec![5usize, 16, 32]), half in any::<bool>(), seed in any::<u64>()) {
        let Some(gpu) = squid_cuda::testing::test_device() else { return Ok(()) };
        let dv = if dv_other { 192 - dk } else { dk };
        let mut cfg = DenseConfig::causal(heads(group, hkv, dk, dv));
        cfg.window = window;
        let lens_q: Vec<usize> = lens_k.iter().map(|&k| tq.min(k)).collect();
        let c = case(cfg, &lens_q, &lens_k, seed);
        let opts = DecodeOptions { num_splits: splits, batch_invariant: false };
        let what = format!("{cfg:?} q {lens_q:?} k {lens_k:?} {opts:?}");
        if half {
            assert_close(&what, &run_packed::<f16>(&gpu, &c, &opts), &gpu, &reference::<f16>(&c));
        } else {
            assert_close(&what, &run_packed::<bf16>(&gpu, &c, &opts), &gpu, &reference::<bf16>(&c));
        }
        if dv == dk {
            let c = case(DenseConfig { heads: heads(group, hkv, dk, dk), ..cfg }, &lens_q, &lens_k, seed);
            let what = format!("paged (page {page}) {what}");
            assert_close(&what, &run_paged::<bf16>(&gpu, &c, page, &opts, seed), &gpu, &reference::<bf16>(&c));
        }
    }
}

/// Length 1, more new tokens than keys (rows that see nothing), many short sequences in one
/// batch, a non-causal call, odd head dims and the widest heads.
#[test]
fn awkward_shapes() {
    let Some(gpu) = squid_cuda::testing::test_device() else { return };
    let opts = DecodeOptions::default();
    let c = case(DenseConfig::causal(heads(1, 1, 64, 64)), &[1], &[1], 1);
    assert_close("length 1", &run_packed::<bf16>(&gpu, &c, &opts), &gpu, &reference::<bf16>(&c));
    let c = case(DenseConfig::causal(heads(2, 2, 64, 64)), &[3, 1], &[2, 5], 2);
    assert_close("tq > tk", &run_packed::<bf16>(&gpu, &c, &opts), &gpu, &reference::<bf16>(&c));
    let lens_k: Vec<usize> = (0..40).map(|i| 1 + i % 7).collect();
    let lens_q: Vec<usize> = lens_k.iter().map(|&k| 1 + k % 2).collect();
    let c = case(DenseConfig::causal(heads(3, 1, 64, 64)), &lens_q, &lens_k, 3);
    assert_close("40 short sequences", &run_packed::<f16>(&gpu, &c, &opts), &gpu, &reference::<f16>(&c));
    assert_close("40 short sequences, paged", &run_paged::<f16>(&gpu, &c, 3, &opts, 3), &gpu, &reference::<f16>(&c));
    let cfg = DenseConfig { causal: false, ..DenseConfig::causal(heads(2, 1, 37, 21)) };
    let c = case(cfg, &[2, 1], &[45, 70], 4);
    assert_close(
        "odd dims, non-causal",
        &run_packed::<bf16>(&gpu, &c, &DecodeOptions { num_splits: Some(2), ..opts }),
        &gpu,
        &reference::<bf16>(&c),
    );
    let c = case(DenseConfig::causal(heads(8, 1, 256, 256)), &[2], &[70], 5);
    assert_close("head dim 256, 16 rows", &run_packed::<bf16>(&gpu, &c, &opts), &gpu, &reference::<bf16>(&c));
}

/// With `batch_invariant`, a sequence's rows are the same bits whatever else is in the batch, the
/// split count asked for, and how many tokens are decoded at once; without it, other split counts
/// give the same values within rounding (and the test checks they are not all identical, so the
/// splits did run).
#[test]
fn batch_invariant_decode_is_bit_for_bit() {
    let Some(gpu) = squid_cuda::testing::test_device() else { return };
    let h = heads(4, 2, 64, 64);
    let mut cfg = DenseConfig::causal(h);
    cfg.window = Some(90);
    let inv = DecodeOptions { num_splits: None, batch_invariant: true };
    // The sequence under test: 130 keys, its last 3 tokens decoded together.
    let (tk, tq) = (130usize, 3usize);
    let alone = case(cfg, &[tq], &[tk], 11);
    let got_alone = run_packed::<bf16>(&gpu, &alone, &inv);
    let (o_alone, lse_alone) = (gpu.download(&got_alone.o).unwrap(), gpu.download(&got_alone.lse).unwrap());
    assert_close("alone", &got_alone, &gpu, &reference::<bf16>(&alone));
    let row = h.num_q_heads * h.head_dim_v;

    // Packed second between two other sequences, with a split count that would split it.
    let mut batch = case(cfg, &[2, tq, 1], &[50, tk, 7], 12);
    let (q0, k0) = (2 * h.num_q_heads * h.head_dim_k, 50 * h.num_kv_heads * h.head_dim_k);
    batch.q[q0..q0 + alone.q.len()].copy_from_slice(&alone.q);
    batch.k[k0..k0 + alone.k.len()].copy_from_slice(&alone.k);
    batch.v[k0..k0 + alone.v.len()].copy_from_slice(&alone.v);
    for opts in [inv, DecodeOptions { num_splits: Some(4), batch_invariant: true }] {
        let got = run_packed::<bf16>(&gpu, &batch, &opts);
        let (o, lse) = (gpu.download(&got.o).unwrap(), gpu.download(&got.lse).unwrap());
        assert_eq!(o[2 * row..(2 + tq) * row], o_alone[..], "o in a batch, {opts:?}");
        for head in 0..h.num_q_heads {
            assert_eq!(lse[head * 6 + 2..head * 6 + 2 + tq], lse_alone[head * tq..(head + 1) * tq], "lse, {opts:?}");
        }
    }

    // One token at a time: token t decoded against the first tk - tq + t + 1 keys.
    for t in 0..tq {
        let keys = tk - tq + t + 1;
        let mut one = case(cfg, &[1], &[keys], 13);
        one.q.copy_from_slice(&alone.q[t * h.num_q_heads * h.head_dim_k..][..h.num_q_heads * h.head_dim_k]);
        let (nk, nv) = (one.k.len(), one.v.len());
        one.k.copy_from_slice(&alone.k[..nk]);
        one.v.copy_from_slice(&alone.v[..nv]);
        let got = run_packed::<bf16>(&gpu, &one, &inv);
        assert_eq!(gpu.download(&got.o).unwrap()[..], o_alone[t * row..(t + 1) * row], "token {t} alone");
        let lse = gpu.download(&got.lse).unwrap();
        for head in 0..h.num_q_heads {
            assert_eq!(lse[head], lse_alone[head * tq + t], "lse of token {t}, head {head}");
        }
    }

    // The split path: close, and really split (some bits differ from the one-split result).
    let one_split = run_packed::<bf16>(&gpu, &alone, &DecodeOptions { num_splits: Some(1), batch_invariant: false });
    let lse_one = gpu.download(&one_split.lse).unwrap();
    let mut differs = false;
    for splits in [2, 3, 5] {
        let got = run_packed::<bf16>(&gpu, &alone, &DecodeOptions { num_splits: Some(splits), batch_invariant: false });
        assert_close(&format!("{splits} splits"), &got, &gpu, &reference::<bf16>(&alone));
        differs |= gpu.download(&got.lse).unwrap() != lse_one;
    }
    assert!(differs, "every split count gave the one-split bits: the splits did not run");
}

/// One configuration of [`batch_invariant_decode_equals_the_prefill_forward`]: the last `tq`
/// tokens of every sequence decoded together (packed, and paged when Dk == Dv), and the longest
/// sequence's tokens one at a time against the keys up to each, all equal to the prefill
/// forward's rows bit for bit.
fn check_decode_is_prefill<T: DecodeElement>(gpu: &Gpu, cfg: DenseConfig, lens: &[usize], tq: usize, seed: u64) {
    let h = cfg.heads;
    let full = case(cfg, lens, lens, seed);
    let up = |x: &[f64]| gpu.upload(&to::<T>(x)).unwrap();
    let prefill =
        super::cuda::forward(gpu, &cfg, &up(&full.q), &up(&full.k), &up(&full.v), &full.cu_q, &full.cu_k).unwrap();
    let (o_pre, lse_pre) = (gpu.download(&prefill.o).unwrap(), gpu.download(&prefill.lse).unwrap());
    let total: usize = lens.iter().sum();
    let (row_q, row_o) = (h.num_q_heads * h.head_dim_k, h.num_q_heads * h.head_dim_v);
    // The decoded tokens' packed rows in the prefill.
    let cu_k = &full.cu_k;
    let rows: Vec<usize> =
        lens.iter().enumerate().flat_map(|(s, &l)| (l - tq.min(l)..l).map(move |t| cu_k[s] as usize + t)).collect();
    let lens_q: Vec<usize> = lens.iter().map(|&l| tq.min(l)).collect();
    let mut dec = case(cfg, &lens_q, lens, seed);
    dec.q = rows.iter().flat_map(|&r| full.q[r * row_q..(r + 1) * row_q].to_vec()).collect();
    dec.k.clone_from(&full.k);
    dec.v.clone_from(&full.v);
    let inv = DecodeOptions { num_splits: Some(3), batch_invariant: true };
    let what = format!("{:?} {cfg:?} lens {lens:?} tq {tq}", T::DTYPE);
    let check = |got: &DeviceDenseOutput<T>, how: &str| {
        let (o, lse) = (gpu.download(&got.o).unwrap(), gpu.download(&got.lse).unwrap());
        for (i, &r) in rows.iter().enumerate() {
            assert_eq!(o[i * row_o..(i + 1) * row_o], o_pre[r * row_o..(r + 1) * row_o], "{how} {what}: o of row {r}");
            for head in 0..h.num_q_heads {
                assert_eq!(lse[head * rows.len() + i], lse_pre[head * total + r], "{how} {what}: lse of row {r}");
            }
        }
    };
    check(&run_packed::<T>(gpu, &dec, &inv), "packed");
    if h.head_dim_k == h.head_dim_v {
        check(&run_paged::<T>(gpu, &dec, 8, &inv, seed), "paged");
    }
    // One token at a time: the longest sequence's last tq tokens, each against its keys so far
    // (a causal row sees no later key, so these are its prefill keys).
    if !cfg.causal {
        return;
    }
    let s = (0..lens.len()).max_by_key(|&s| lens[s]).unwrap();
    let row_k = |d: usize| h.num_kv_heads * d;
    for t in lens[s] - tq.min(lens[s])..lens[s] {
        let r = full.cu_k[s] as usize + t;
        let mut one = case(cfg, &[1], &[t + 1], seed);
        one.q = full.q[r * row_q..(r + 1) * row_q].to_vec();
        let k0 = full.cu_k[s] as usize;
        one.k = full.k[k0 * row_k(h.head_dim_k)..(r + 1) * row_k(h.head_dim_k)].to_vec();
        one.v = full.v[k0 * row_k(h.head_dim_v)..(r + 1) * row_k(h.head_dim_v)].to_vec();
        let got = run_packed::<T>(gpu, &one, &inv);
        let (o, lse) = (gpu.download(&got.o).unwrap(), gpu.download(&got.lse).unwrap());
        assert_eq!(o[..], o_pre[r * row_o..(r + 1) * row_o], "token {t} alone, {what}");
        for head in 0..h.num_q_heads {
            assert_eq!(lse[head], lse_pre[head * total + r], "token {t} alone, {what}: lse");
        }
    }
}

/// Issue 17's batch invariance: with `batch_invariant`, decoding a token gives the prefill
/// forward's row for it bit for bit (o and lse), packed and paged, decoded together or one at a
/// time, for every head-dim pair the forward is compiled for, bf16 and f16, GQA, windows whose
/// first key is not a tile multiple, non-causal, and a sequence of length 1.
#[test]
fn batch_invariant_decode_equals_the_prefill_forward() {
    let Some(gpu) = squid_cuda::testing::test_device() else { return };
    let lens = [1usize, 40, 101];
    let win = |w: usize, h: Heads| DenseConfig { window: Some(w), ..DenseConfig::causal(h) };
    check_decode_is_prefill::<bf16>(&gpu, DenseConfig::causal(heads(2, 2, 64, 64)), &lens, 3, 1);
    check_decode_is_prefill::<f16>(&gpu, win(45, heads(4, 1, 128, 128)), &lens, 2, 2);
    check_decode_is_prefill::<bf16>(&gpu, win(70, heads(1, 2, 96, 96)), &lens, 2, 3);
    let non_causal = DenseConfig { causal: false, ..DenseConfig::causal(heads(3, 1, 192, 128)) };
    check_decode_is_prefill::<bf16>(&gpu, non_causal, &lens, 2, 4);
    check_decode_is_prefill::<f16>(&gpu, win(33, heads(2, 1, 256, 256)), &[1, 70], 2, 5);
}

#[test]
fn bad_input_is_a_typed_error() {
    let Some(gpu) = squid_cuda::testing::test_device() else { return };
    let cfg = DenseConfig::causal(heads(2, 1, 8, 8));
    let opts = DecodeOptions::default();
    let q = gpu.upload(&[bf16::ONE; 2 * 8]).unwrap();
    let kv = gpu.upload(&[bf16::ONE; 4 * 8]).unwrap();
    let e = cuda_decode::decode(&gpu, &cfg, &opts, &q, &kv, &kv, &[0, 1], &[0, 3]).unwrap_err();
    assert!(matches!(e, Error::CuSeqlens(_)), "{e}");
    let e = cuda_decode::decode(&gpu, &cfg, &opts, &q, &kv, &kv, &[0, 1], &[0, 4, 4]).unwrap_err();
    assert!(matches!(e, Error::CuSeqlens(_)), "{e}");
    let zero_splits = DecodeOptions { num_splits: Some(0), batch_invariant: false };
    let e = cuda_decode::decode(&gpu, &cfg, &zero_splits, &q, &kv, &kv, &[0, 1], &[0, 4]).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let bad = gpu.upload(&[bf16::ONE; 3 * 8]).unwrap();
    let e = cuda_decode::decode(&gpu, &cfg, &opts, &bad, &kv, &kv, &[0, 1], &[0, 4]).unwrap_err();
    assert!(matches!(e, Error::Shape(_)), "{e}");
    let nan = gpu.upload(&[vec![bf16::ONE; 15], vec![bf16::NAN]].concat()).unwrap();
    let finite = DenseConfig { check_finite: true, ..cfg };
    let e = cuda_decode::decode(&gpu, &finite, &opts, &nan, &kv, &kv, &[0, 1], &[0, 4]).unwrap_err();
    assert_eq!(e, Error::NonFinite { tensor: "q", index: 15 });
    // Paged: a page outside the pools, a table too short, a head-dim mismatch.
    let pool = DevicePagedKv { page_size: 2, kv_heads: 1, head_dim: 8, k_pages: kv.view(), v_pages: kv.view() };
    let e =
        cuda_decode::decode_paged(&gpu, &cfg, &opts, &q, &pool, &[PagedSeq { len: 3, page_table: &[0, 2] }], &[0, 1])
            .unwrap_err();
    assert!(matches!(e, Error::Cache(_)), "{e}");
    let e = cuda_decode::decode_paged(&gpu, &cfg, &opts, &q, &pool, &[PagedSeq { len: 3, page_table: &[1] }], &[0, 1])
        .unwrap_err();
    assert!(matches!(e, Error::Cache(_)), "{e}");
    let wide = DevicePagedKv { head_dim: 4, ..pool.clone() };
    let e =
        cuda_decode::decode_paged(&gpu, &cfg, &opts, &q, &wide, &[PagedSeq { len: 3, page_table: &[1, 0] }], &[0, 1])
            .unwrap_err();
    assert!(matches!(e, Error::Shape(_)), "{e}");
    let ok =
        cuda_decode::decode_paged(&gpu, &cfg, &opts, &q, &pool, &[PagedSeq { len: 3, page_table: &[1, 0] }], &[0, 1]);
    assert!(ok.is_ok());
}
