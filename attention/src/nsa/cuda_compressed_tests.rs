//! NSA's device compressed branch (attention over the compressed blocks and the selection
//! scores, one kernel) against the naive f64 reference, on `squid_cuda::testing::test_device()`
//! (the PTX simulator on a machine without a GPU).
//!
//! Inputs uniform in [-2, 2] rounded to the storage type; `k_cmp`, `v_cmp` are the reference's
//! mean pooling rounded likewise, and the reference runs on the rounded values. Tolerances:
//! - `o_cmp` within 3u (1 + max |ref|) and `lse_cmp` within 1e-5 (1 + |ref|), `-inf` exactly where
//!   the reference has it (tokens before the first complete block), as the dense device tests;
//! - each score within `SCORE_TOL` (ref + 2^-20 (l'/d + l/d) group): a probability carries
//!   the relative error of `exp(s - lse)` with `s`, `lse` summed in f32 (a few 1e-7 of `|s|`,
//!   at most ~30 here) and `ex2.approx`, and each score sums at most `group (l'/d + l/d)` of them
//!   in f32; entries past a token's last selection block exactly 0;
//! - the blocks `select_top_n` chooses on the device scores equal the reference's choice on its
//!   f64 scores, except where scores are near-tied: a row may differ only by swapping blocks whose
//!   reference scores are within twice that tolerance of each other (both could fall on either
//!   side); the test counts such rows and prints them.

use half::{bf16, f16};
use squid_cuda::dtype::unit_roundoff;
use squid_cuda::launch::DeviceCopy;
use squid_cuda::Element;

use super::cuda_compressed::{self as dev, cmp_schedule};
use super::{cuda, naive, NsaConfig, NsaExtra, NsaInputs, NO_BLOCK};
use crate::dense::cuda_tests::{assert_forward, device};
use crate::dense::tests::{back, offsets, to, values};
use crate::{Error, Heads};

/// Relative tolerance of a selection score (see the module doc).
const SCORE_TOL: f64 = 5e-6;

/// Score tolerance for reference score `r`.
fn score_tol(cfg: &NsaConfig, group: usize, r: f64) -> f64 {
    let taps = (cfg.block_slc / cfg.stride_cmp + cfg.block_cmp / cfg.stride_cmp) * group;
    SCORE_TOL * (r.abs() + taps as f64 * 2f64.powi(-20))
}

/// The device compressed branch against the reference for queries `lens_q` that are the last
/// positions of sequences of `lens_k` keys; returns (o error in u, max score error / tolerance,
/// rows whose choice differs by a near-tie).
fn check_compressed<T: Element + DeviceCopy>(
    cfg: &NsaConfig,
    h: &Heads,
    lens_q: &[usize],
    lens_k: &[usize],
    seed: u64,
) -> Option<(f64, f64, usize)> {
    let gpu = device()?;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let (cu_q, cu_k) = (offsets(lens_q), offsets(lens_k));
    let (total_q, total_k): (usize, usize) = (lens_q.iter().sum(), lens_k.iter().sum());
    let r = |x: Vec<f64>| back(&to::<T>(&x));
    let q = r(values(total_q * hq * dk, seed));
    let k = r(values(total_k * hkv * dk, seed + 1));
    let v = r(values(total_k * hkv * dv, seed + 2));
    let k_cmp = r(naive::compress_mean(cfg, hkv, dk, &k, &cu_k).unwrap());
    let v_cmp = r(naive::compress_mean(cfg, hkv, dv, &v, &cu_k).unwrap());
    let gates = vec![0.5; total_q * hq * 3];
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
    let f = naive::forward_ext(cfg, h, &x, &NsaExtra { cu_seqlens_k: Some(&cu_k), ..Default::default() }).unwrap();
    let up = |x: &[f64]| gpu.upload(&to::<T>(x)).unwrap();
    let out = dev::compressed_forward(gpu, cfg, h, &up(&q), &up(&k_cmp), &up(&v_cmp), &cu_q, Some(&cu_k)).unwrap();
    let what = format!("{:?} {h:?} {cfg:?} lens_q {lens_q:?} lens_k {lens_k:?}", T::DTYPE);
    let (e_o, _) = assert_forward(
        &format!("{what} cmp"),
        &gpu.download(&out.o).unwrap(),
        &gpu.download(&out.lse).unwrap(),
        &f.o_cmp,
        &f.lse_cmp,
    );

    // Scores: within tolerance where defined, exactly 0 past each token's last block.
    let stride = out.stride;
    assert_eq!(stride, lens_k.iter().map(|&t| cfg.num_slc_blocks(t)).max().unwrap_or(0), "{what}: stride");
    let scores = gpu.download(&out.scores).unwrap();
    assert_eq!(scores.len(), total_q * hkv * stride, "{what}: scores length");
    let mut worst = 0f64;
    for (row_g, want) in f.scores.iter().enumerate() {
        let got = &scores[row_g * stride..][..stride];
        for (j, &s) in got.iter().enumerate() {
            match want.get(j) {
                Some(&w) => {
                    let err = (s as f64 - w).abs() / score_tol(cfg, h.group(), w);
                    assert!(err <= 1.0, "{what}: score of row {row_g} block {j}: {s} vs {w}");
                    worst = worst.max(err);
                }
                None => assert_eq!(s, 0.0, "{what}: score of row {row_g} block {j} past the token's blocks"),
            }
        }
    }

    // The device choice on the device scores against the reference's choice.
    let n = cfg.num_selected;
    let idx = cuda::select_top_n(gpu, cfg, hkv, &out.scores, stride, &cu_q, Some(&cu_k), None).unwrap();
    let idx = gpu.download(&idx).unwrap();
    let mut near_ties = 0;
    for (row_g, want) in f.scores.iter().enumerate() {
        let (got, exp) = (&idx[row_g * n..][..n], &f.indices[row_g * n..][..n]);
        if got == exp {
            continue;
        }
        let set = |x: &[u32]| x.iter().copied().filter(|&j| j != NO_BLOCK).collect::<Vec<_>>();
        let (gs, es) = (set(got), set(exp));
        assert_eq!(gs.len(), es.len(), "{what}: row {row_g} chose {got:?}, reference {exp:?}");
        for &a in gs.iter().filter(|j| !es.contains(j)) {
            for &b in es.iter().filter(|j| !gs.contains(j)) {
                let (sa, sb) = (want[a as usize], want[b as usize]);
                let tol = score_tol(cfg, h.group(), sa.max(sb));
                assert!(
                    (sa - sb).abs() <= 2.0 * tol,
                    "{what}: row {row_g} chose {got:?}, reference {exp:?}: block {a} ({sa}) for {b} ({sb}) is no near-tie"
                );
            }
        }
        near_ties += 1;
    }
    let u = unit_roundoff(T::DTYPE) as f64;
    println!("{what}: o_cmp {:.3}u, worst score error {worst:.3} of tolerance, {near_ties} near-tied rows", e_o / u);
    Some((e_o / u, worst, near_ties))
}

/// A small config whose blocks are off every tile: l = 4, d = 2, l' = 12, n = 4.
fn small() -> NsaConfig {
    NsaConfig { block_cmp: 4, stride_cmp: 2, block_slc: 12, num_selected: 4, window: 9, ..NsaConfig::default() }
}

#[test]
fn compressed_forward_every_gqa_ratio() {
    // GQA 1, 2, 3, 4, 8, 16; lengths 1, below l, not multiples of l, d, l' or the 64-row tile,
    // and one above 64 tokens (several CTAs per sequence at group 1); more compressed blocks
    // than one key tile (83 tokens: 40 blocks > 32).
    let cfg = small();
    for (n, (hq, hkv)) in [(1, 1), (4, 2), (3, 1), (8, 2), (8, 1), (16, 1)].into_iter().enumerate() {
        let h = Heads::new(hq, hkv, 64, 64);
        let lens = [1, 3, 37, 83];
        if n % 2 == 0 {
            check_compressed::<bf16>(&cfg, &h, &lens, &lens, n as u64);
        } else {
            check_compressed::<f16>(&cfg, &h, &lens, &lens, n as u64);
        }
    }
}

#[test]
fn compressed_forward_head_dims_large_groups_and_chunked_prefill() {
    let cfg = small();
    check_compressed::<bf16>(&cfg, &Heads::new(2, 1, 192, 128), &[29, 5], &[29, 5], 11);
    check_compressed::<f16>(&cfg, &Heads::new(2, 1, 256, 256), &[29, 5], &[29, 5], 12);
    check_compressed::<bf16>(&cfg, &Heads::new(4, 2, 128, 128), &[40], &[40], 13);
    check_compressed::<bf16>(&cfg, &Heads::new(3, 3, 96, 96), &[26], &[26], 14);
    // A group above 64 heads: two CTAs per token add to the same scores.
    check_compressed::<bf16>(&cfg, &Heads::new(70, 1, 64, 64), &[3, 14], &[3, 14], 15);
    // Chunked prefill: the queries are the last 1, 7 and 30 of 1, 40 and 90 keys.
    check_compressed::<f16>(&cfg, &Heads::new(4, 1, 64, 64), &[1, 7, 30], &[1, 40, 90], 16);
    check_compressed::<bf16>(&cfg, &Heads::new(8, 2, 64, 64), &[5, 1], &[77, 33], 17);
}

#[test]
fn compressed_forward_short_sequences_and_paper_config() {
    // Many tiny sequences (most see no compressed block).
    let lens = [1, 2, 3, 1, 5, 1, 1, 7, 2, 3, 13];
    check_compressed::<bf16>(&small(), &Heads::new(4, 2, 64, 64), &lens, &lens, 21);
    // The paper's config (l = 32, d = 16, l' = 64, n = 16, weights 1, 2, 2, 2, 1) on sequences
    // that are not multiples of any block, and with n = 4 so that the top-n is a real choice.
    let paper = NsaConfig::default();
    check_compressed::<f16>(&paper, &Heads::new(4, 1, 64, 64), &[300, 70], &[300, 70], 22);
    let few = NsaConfig { num_selected: 4, ..NsaConfig::default() };
    check_compressed::<bf16>(&few, &Heads::new(16, 1, 64, 64), &[200], &[200], 23);
}

#[test]
fn schedule_covers_each_token_once_per_kv_head() {
    // Group 4: 16 tokens per CTA; 40 tokens of l = 4, d = 2 give CTAs of 16, 16 and 8 tokens,
    // the first seeing the blocks of its token 15 (i d + 3 <= 15: 7 blocks).
    let cfg = small();
    let h = Heads::new(8, 2, 64, 64);
    let s = cmp_schedule(&cfg, &h, &[0, 40], &[0, 40], 4, 32).unwrap();
    assert_eq!(s.items, 6);
    assert_eq!(&s.ints[..8], &[40, 8, 2, 4, 4, 12, 6, 2]);
    assert_eq!(&s.ints[8..16], &[0, 16, 0, 0, 0, 0, 7, 0]);
    assert_eq!(&s.ints[16..24], &[16, 16, 16, 0, 0, 0, 15, 0]);
    assert_eq!(&s.ints[24..32], &[32, 8, 32, 0, 0, 0, 19, 0]);
    // A sequence whose tokens see no block gets no item; chunked prefill shifts positions.
    let s = cmp_schedule(&cfg, &Heads::new(1, 1, 64, 64), &[0, 3, 5], &[0, 3, 25], 3, 32).unwrap();
    assert_eq!(s.items, 1);
    assert_eq!(&s.ints[8..16], &[3, 2, 20, 0, 0, 0, 10, 0]);
}

#[test]
fn device_errors_are_typed() {
    let Some(gpu) = device() else { return };
    let cfg = small();
    let h = Heads::new(2, 1, 64, 64);
    let q = gpu.upload(&vec![bf16::ONE; 8 * 2 * 64]).unwrap();
    // 8 tokens, l = 4, d = 2: 3 compressed blocks.
    let kc = gpu.upload(&vec![bf16::ONE; 3 * 64]).unwrap();
    assert!(dev::compressed_forward(gpu, &cfg, &h, &q, &kc, &kc, &[0, 8], None).is_ok());
    let short = gpu.upload(&vec![bf16::ONE; 2 * 64]).unwrap();
    assert!(matches!(dev::compressed_forward(gpu, &cfg, &h, &q, &short, &kc, &[0, 8], None), Err(Error::Shape(_))));
    assert!(matches!(dev::compressed_forward(gpu, &cfg, &h, &q, &kc, &kc, &[0, 9], None), Err(Error::CuSeqlens(_))));
    // More queries than keys.
    assert!(matches!(
        dev::compressed_forward(gpu, &cfg, &h, &q, &kc, &kc, &[0, 8], Some(&[0, 7])),
        Err(Error::CuSeqlens(_))
    ));
    let qf = gpu.upload(&vec![1.0f32; 8 * 2 * 64]).unwrap();
    let kf = gpu.upload(&vec![1.0f32; 3 * 64]).unwrap();
    assert!(matches!(dev::compressed_forward(gpu, &cfg, &h, &qf, &kf, &kf, &[0, 8], None), Err(Error::Unsupported(_))));
    let h80 = Heads::new(2, 1, 80, 80);
    assert!(matches!(
        dev::compressed_forward(gpu, &cfg, &h80, &q, &kc, &kc, &[0, 8], None),
        Err(Error::Unsupported(_) | Error::Shape(_))
    ));
    let bad = NsaConfig { stride_cmp: 3, ..cfg };
    assert!(matches!(dev::compressed_forward(gpu, &bad, &h, &q, &kc, &kc, &[0, 8], None), Err(Error::Config(_))));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3))]

    /// Generated shapes: 1 to 3 sequences of 1..60 queries at the end of up to 30 more keys,
    /// every GQA ratio of the CPU tests, l / d / l' drawn so blocks fall off every tile.
    #[test]
    fn compressed_forward_matches_reference(
        lens in proptest::collection::vec((1usize..60, 0usize..30), 1..4),
        group in proptest::sample::select(vec![1usize, 2, 3, 4, 8, 16]),
        hkv in 1usize..3,
        (d, b, a) in (1usize..4, 1usize..4, 1usize..5),
        seed in 0u64..1000,
    ) {
        let a = a.max(b);
        let cfg = NsaConfig { block_cmp: b * d, stride_cmp: d, block_slc: a * d, num_selected: 5, ..NsaConfig::default() };
        let lens_q: Vec<usize> = lens.iter().map(|l| l.0).collect();
        let lens_k: Vec<usize> = lens.iter().map(|l| l.0 + l.1).collect();
        check_compressed::<bf16>(&cfg, &Heads::new(group * hkv, hkv, 64, 64), &lens_q, &lens_k, seed);
    }
}

/// The simulator's profile of the compressed forward for GQA groups of 1, 4 and 16 (one kv
/// head, 512 tokens, Dk = Dv = 128, l = 16, d = 8, l' = 32; bf16): the compressed K/V tiles the
/// schedule loads (each twice: the lse sweep reads K, the output sweep K and V), what the
/// profile counts, and the (row, tile) pairs each loaded tile serves (at least the group: a
/// tile is loaded once for all the heads of the group and all the CTA's tokens). Counts of the
/// simulator, not timings.
#[test]
fn profile_cmp_bytes_per_group() {
    use squid_cuda::launch::Gpu;
    use squid_cuda::ptxsim::Options;
    if device().is_none() {
        return;
    }
    let gpu = Gpu::simulator_with(Options { profile: true, ..Options::default() }).unwrap();
    let cfg = NsaConfig { block_cmp: 16, stride_cmp: 8, block_slc: 32, num_selected: 4, ..NsaConfig::default() };
    let (len, dk) = (512usize, 128usize);
    let bn = dev::key_tile(dk);
    let cu = [0, len as u32];
    let nc = cfg.num_cmp_blocks(len);
    for group in [1usize, 4, 16] {
        let h = Heads::new(group, 1, dk, dk);
        let q = gpu.upload(&to::<bf16>(&values(len * group * dk, 1))).unwrap();
        let kc = gpu.upload(&to::<bf16>(&values(nc * dk, 2))).unwrap();
        let out = dev::compressed_forward(&gpu, &cfg, &h, &q, &kc, &kc, &cu, None).unwrap();
        let p = gpu.last_profile().expect("profiling simulator");
        let sched = cmp_schedule(&cfg, &h, &cu, &cu, out.stride, bn).unwrap();
        // K in the lse sweep, K and V in the output sweep.
        let kv_bytes = sched.tiles * bn * 3 * dk * 2;
        let row_tiles: usize = (0..len).map(|t| cfg.num_cmp_blocks(t + 1).div_ceil(bn) * group).sum();
        let reuse = row_tiles as f64 / sched.tiles as f64;
        let warp_instr = p.warp_instructions.iter().sum::<u64>();
        println!(
            "group {group:2}: {} CTAs, {} K/V tiles = {kv_bytes} B scheduled ({:.0} B per query row), {row_tiles} \
             (row, tile) pairs = {reuse:.1} per tile loaded; profile: {} warp instr., {} tensor FLOPs, {} B requested, \
             {} B unique read, {} B unique written, {:.2} shared wavefronts per request",
            sched.items,
            sched.tiles,
            kv_bytes as f64 / (len * group) as f64,
            warp_instr,
            p.tensor_flops,
            p.global_bytes_requested,
            p.unique_bytes_read,
            p.unique_bytes_written,
            p.shared_wavefronts as f64 / p.shared_requests.max(1) as f64,
        );
        assert!(reuse >= group as f64, "group {group}: a K/V tile serves {reuse} row pairs < the group's heads");
        assert!(p.global_bytes_requested as usize >= kv_bytes + len * group * dk * 2);
        assert!(p.unique_bytes_read as usize <= len * group * dk * 2 + nc * dk * 2 + sched.ints.len() * 4);
    }
}

/// The whole NSA forward on the device - compression, compressed branch with scores, top-n
/// selection, selected and window branches, gated combine - against the naive reference. The
/// reference runs on the same compressed K/V (the CPU path's `compress_mean`, which the device's
/// equals bit for bit) and chooses its own blocks; the device's choice must equal it except for
/// near-tied rows (as [`check_compressed`] treats them), and the gated output is compared with the
/// reference on the device's choice, within the selected tests' tolerance.
#[test]
fn device_nsa_forward_end_to_end() {
    let Some(gpu) = device() else { return };
    let cfg = small();
    // One odd group (3) on lengths 1 and off every block; the kernels' GQA ratios are covered
    // above, this checks that the pieces fit together (kept small: it runs five kernels).
    let lens = [1, 29, 45];
    for (n, (hq, hkv)) in [(3, 1)].into_iter().enumerate() {
        let h = Heads::new(hq, hkv, 64, 64);
        let (dk, dv) = (h.head_dim_k, h.head_dim_v);
        let cu = offsets(&lens);
        let total: usize = lens.iter().sum();
        let seed = 40 + n as u64;
        let q: Vec<bf16> = to(&values(total * hq * dk, seed));
        let k: Vec<bf16> = to(&values(total * hkv * dk, seed + 1));
        let v: Vec<bf16> = to(&values(total * hkv * dv, seed + 2));
        let gates: Vec<bf16> = to(&values(total * hq * 3, seed + 3).iter().map(|x| 0.5 + 0.25 * x).collect::<Vec<_>>());
        let (dq_, dk_, dv_, dg_) =
            (gpu.upload(&q).unwrap(), gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap(), gpu.upload(&gates).unwrap());
        // Device pipeline.
        let k_cmp = cuda::compress_mean(gpu, &cfg, hkv, dk, &dk_, &cu).unwrap();
        let v_cmp = cuda::compress_mean(gpu, &cfg, hkv, dv, &dv_, &cu).unwrap();
        let cmp = dev::compressed_forward(gpu, &cfg, &h, &dq_, &k_cmp, &v_cmp, &cu, None).unwrap();
        let idx = cuda::select_top_n(gpu, &cfg, hkv, &cmp.scores, cmp.stride, &cu, None, None).unwrap();
        let idx = gpu.download(&idx).unwrap();
        let x = super::cuda_selected::DeviceNsaInputs {
            q: &dq_,
            k: &dk_,
            v: &dv_,
            k_win: None,
            v_win: None,
            o_cmp: &cmp.o,
            gates: &dg_,
            cu_seqlens: &cu,
        };
        let out = super::cuda_selected::forward(gpu, &cfg, &h, &x, &idx).unwrap();
        // Reference on the same compressed K/V.
        let kc_cpu = super::compress_mean(&cfg, hkv, dk, &k, &cu).unwrap();
        let vc_cpu = super::compress_mean(&cfg, hkv, dv, &v, &cu).unwrap();
        assert_eq!(gpu.download(&k_cmp).unwrap(), kc_cpu);
        let (qf, kf, vf, gf, kcf, vcf) = (back(&q), back(&k), back(&v), back(&gates), back(&kc_cpu), back(&vc_cpu));
        let xi = NsaInputs {
            q: &qf,
            k: &kf,
            v: &vf,
            k_win: None,
            v_win: None,
            k_cmp: &kcf,
            v_cmp: &vcf,
            gates: &gf,
            cu_seqlens: &cu,
        };
        let own = naive::forward(&cfg, &h, &xi, None).unwrap();
        let nsel = cfg.num_selected;
        let mut near_ties = 0;
        for (row_g, want) in own.scores.iter().enumerate() {
            let (got, exp) = (&idx[row_g * nsel..][..nsel], &own.indices[row_g * nsel..][..nsel]);
            if got != exp {
                near_ties += 1;
                for &a in got.iter().filter(|j| **j != NO_BLOCK && !exp.contains(j)) {
                    for &b in exp.iter().filter(|j| **j != NO_BLOCK && !got.contains(j)) {
                        let (sa, sb) = (want[a as usize], want[b as usize]);
                        assert!(
                            (sa - sb).abs() <= 2.0 * score_tol(&cfg, h.group(), sa.max(sb)),
                            "{h:?} row {row_g}: {got:?} vs {exp:?}"
                        );
                    }
                }
            }
        }
        let f = naive::forward(&cfg, &h, &xi, Some(&idx)).unwrap();
        let o = back(&gpu.download(&out.o).unwrap());
        let u = unit_roundoff(bf16::DTYPE) as f64;
        let max_abs = |x: &[f64]| x.iter().fold(0f64, |m, v| m.max(v.abs()));
        let gmax = |b: usize| gf.iter().skip(b).step_by(3).fold(0f64, |m, g| m.max(g.abs()));
        // Each branch within 3u (1 + max |o_b|) (o_cmp now computed on the device too), scaled by
        // its gate, plus the store's rounding.
        let tol = u * max_abs(&f.o)
            + 3.0
                * u
                * (gmax(0) * (1.0 + max_abs(&f.o_cmp))
                    + gmax(1) * (1.0 + max_abs(&f.o_slc))
                    + gmax(2) * (1.0 + max_abs(&f.o_win)));
        let err = o.iter().zip(&f.o).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= tol, "{h:?}: gated o error {err:e} > {tol:e}");
        println!(
            "{h:?}: end-to-end gated o error {:.3}u (tolerance {:.3}u), {near_ties} near-tied rows",
            err / u,
            tol / u
        );
    }
}
