//! NSA's device selected/window branches and gated combine against the naive f64 reference, on
//! `squid_cuda::testing::test_device()` (the PTX simulator on a machine without a GPU).
//!
//! Inputs are uniform in [-2, 2] (gates in [0, 1]) rounded to the storage type; the reference runs
//! on the rounded values and chooses the blocks, and the device runs on the reference's choice.
//! Tolerances, with u the storage unit roundoff, as the dense device tests: each branch's `o`
//! within 3u (1 + max |ref|), its `lse` within 1e-5 (1 + |ref|) and `-inf` exactly where the
//! reference has it; the gated `o` within `u max|o| + 3u sum_b max|g_b| (1 + max|o_b|)` (each
//! branch's error scaled by its gate, plus the store's rounding; `o_cmp` enters as stored).

use half::{bf16, f16};
use squid_cuda::dtype::unit_roundoff;
use squid_cuda::launch::{DeviceBuffer, DeviceCopy};
use squid_cuda::Element;

use super::cuda_selected::{self as dev, row_layout, slc_schedule, DeviceNsaInputs};
use super::{naive, NsaConfig, NsaInputs, NO_BLOCK};
use crate::dense::cuda_tests::{assert_forward, device};
use crate::dense::tests::{back, offsets, rel_err, to, values};
use crate::{Error, Heads};

struct Case {
    cu: Vec<u32>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    kw: Option<Vec<f64>>,
    vw: Option<Vec<f64>>,
    k_cmp: Vec<f64>,
    v_cmp: Vec<f64>,
    gates: Vec<f64>,
}

impl Case {
    fn new<T: Element>(cfg: &NsaConfig, h: &Heads, lens: &[usize], separate_win: bool, seed: u64) -> Self {
        let cu = offsets(lens);
        let total: usize = lens.iter().sum();
        let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
        let r = |x: Vec<f64>| back(&to::<T>(&x));
        let k = r(values(total * hkv * dk, seed + 1));
        let v = r(values(total * hkv * dv, seed + 2));
        Self {
            q: r(values(total * hq * dk, seed)),
            kw: separate_win.then(|| r(values(total * hkv * dk, seed + 5))),
            vw: separate_win.then(|| r(values(total * hkv * dv, seed + 6))),
            gates: r(values(total * hq * 3, seed + 3).iter().map(|x| 0.5 + 0.25 * x).collect()),
            k_cmp: r(naive::compress_mean(cfg, hkv, dk, &k, &cu).unwrap()),
            v_cmp: r(naive::compress_mean(cfg, hkv, dv, &v, &cu).unwrap()),
            k,
            v,
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

fn max_abs(x: &[f64]) -> f64 {
    x.iter().filter(|v| v.is_finite()).fold(0f64, |m, v| m.max(v.abs()))
}

/// The device forward against the reference; returns the errors in units of u (o_slc, o_win, o).
fn check_forward<T: Element + DeviceCopy>(
    cfg: &NsaConfig,
    h: &Heads,
    lens: &[usize],
    separate_win: bool,
    seed: u64,
) -> Option<[f64; 3]> {
    let gpu = device()?;
    let c = Case::new::<T>(cfg, h, lens, separate_win, seed);
    let f = naive::forward(cfg, h, &c.inputs(), None).unwrap();
    let up = |x: &[f64]| gpu.upload(&to::<T>(x)).unwrap();
    let (q, k, v, gates) = (up(&c.q), up(&c.k), up(&c.v), up(&c.gates));
    let (kw, vw) = (c.kw.as_deref().map(up), c.vw.as_deref().map(up));
    let o_cmp_stored = back(&to::<T>(&f.o_cmp));
    let o_cmp = up(&o_cmp_stored);
    let x = DeviceNsaInputs {
        q: &q,
        k: &k,
        v: &v,
        k_win: kw.as_ref(),
        v_win: vw.as_ref(),
        o_cmp: &o_cmp,
        gates: &gates,
        cu_seqlens: &c.cu,
    };
    let out = dev::forward(gpu, cfg, h, &x, &f.indices).unwrap();
    let what = format!("{:?} {h:?} {cfg:?} lens {lens:?} separate window {separate_win}", T::DTYPE);
    let dl = |b: &DeviceBuffer<f32>| gpu.download(b).unwrap();
    let dt = |b: &DeviceBuffer<T>| gpu.download(b).unwrap();
    let u = unit_roundoff(T::DTYPE) as f64;
    let (e_slc, _) = assert_forward(&format!("{what} slc"), &dt(&out.o_slc), &dl(&out.lse_slc), &f.o_slc, &f.lse_slc);
    let (e_win, _) = assert_forward(&format!("{what} win"), &dt(&out.o_win), &dl(&out.lse_win), &f.o_win, &f.lse_win);
    // The gated output, against the reference mixing the stored o_cmp.
    let (hq, dv) = (h.num_q_heads, h.head_dim_v);
    let o_ref: Vec<f64> = (0..f.o.len())
        .map(|i| {
            let g = &c.gates[i / dv * 3..][..3];
            g[0] * o_cmp_stored[i] + g[1] * f.o_slc[i] + g[2] * f.o_win[i]
        })
        .collect();
    let gmax = |b: usize| c.gates.iter().skip(b).step_by(3).fold(0f64, |m, g| m.max(g.abs()));
    let tol = u * max_abs(&o_ref)
        + 3.0
            * u
            * (gmax(0) * (1.0 + max_abs(&o_cmp_stored))
                + gmax(1) * (1.0 + max_abs(&f.o_slc))
                + gmax(2) * (1.0 + max_abs(&f.o_win)));
    let o = back(&dt(&out.o));
    let e_o = o.iter().zip(&o_ref).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(e_o <= tol, "{what}: gated o error {e_o:e} > {tol:e}");
    assert_eq!(o.len(), c.q.len() / h.head_dim_k * dv);
    assert_eq!(o.len() % hq, 0);
    let errs = [e_slc / u, e_win / u, e_o / u];
    println!(
        "{what}: o_slc {:.3}u, o_win {:.3}u, gated o {:.3}u (tolerance {:.3}u)",
        errs[0],
        errs[1],
        errs[2],
        tol / u
    );
    Some(errs)
}

/// A small config whose blocks are off every tile: l = 4, d = 2, l' = 12, n = 4, w = 9.
fn small() -> NsaConfig {
    NsaConfig { block_cmp: 4, stride_cmp: 2, block_slc: 12, num_selected: 4, window: 9, ..NsaConfig::default() }
}

#[test]
fn selected_forward_every_gqa_ratio() {
    // GQA 1, 2, 3, 4, 8, 16 (one and two kv heads); lengths 1, not multiples of l, d, l' or
    // the 64-row tile, and one longer than 64 tokens (several CTAs per sequence at group 1).
    let cfg = small();
    for (n, (hq, hkv)) in [(1, 1), (4, 2), (3, 1), (8, 2), (8, 1), (16, 1)].into_iter().enumerate() {
        let h = Heads::new(hq, hkv, 64, 64);
        if n % 2 == 0 {
            check_forward::<bf16>(&cfg, &h, &[1, 37, 83], false, n as u64);
        } else {
            check_forward::<f16>(&cfg, &h, &[1, 37, 83], false, n as u64);
        }
    }
}

#[test]
fn selected_forward_head_dims_and_large_groups() {
    // Dk != Dv (192/128), head dim 256 and 96/128; a group above 64 heads (two CTAs per token).
    let cfg = small();
    check_forward::<bf16>(&cfg, &Heads::new(2, 1, 192, 128), &[29, 5], false, 11);
    check_forward::<f16>(&cfg, &Heads::new(2, 1, 256, 256), &[29, 5], true, 12);
    check_forward::<bf16>(&cfg, &Heads::new(4, 2, 128, 128), &[40], false, 13);
    check_forward::<bf16>(&cfg, &Heads::new(3, 3, 96, 96), &[26], false, 14);
    check_forward::<bf16>(&cfg, &Heads::new(70, 1, 64, 64), &[3, 14], false, 15);
}

#[test]
fn selected_forward_short_sequences_separate_window_and_paper_config() {
    // Many tiny sequences, separate window K/V.
    let cfg = small();
    check_forward::<bf16>(&cfg, &Heads::new(4, 2, 64, 64), &[1, 2, 3, 1, 5, 1, 1, 7, 2, 3, 13], true, 21);
    // The paper's config (l = 32, d = 16, l' = 64, n = 16, w = 512) on a sequence of 300 (not a
    // multiple of any block) with fewer chosen than available blocks late in the sequence.
    let paper = NsaConfig { num_selected: 4, ..NsaConfig::default() };
    check_forward::<f16>(&paper, &Heads::new(4, 1, 64, 64), &[300, 70], true, 22);
    // n covering every block.
    check_forward::<bf16>(&NsaConfig::default(), &Heads::new(2, 1, 128, 128), &[200], false, 23);
}

/// Gates (0, 1, 0) with n covering every block is dense causal attention; (0, 0, 1) is
/// windowed dense attention: the device's gated output against dense's naive reference.
#[test]
fn gated_output_equals_dense_for_one_hot_gates() {
    let Some(gpu) = device() else { return };
    let cfg = NsaConfig { num_selected: 64, ..small() };
    let h = Heads::new(4, 2, 64, 64);
    let lens = [1, 50, 90];
    let c = Case::new::<bf16>(&cfg, &h, &lens, false, 31);
    let total: usize = lens.iter().sum();
    let f = naive::forward(&cfg, &h, &c.inputs(), None).unwrap();
    let up = |x: &[f64]| gpu.upload(&to::<bf16>(x)).unwrap();
    let (q, k, v, o_cmp) = (up(&c.q), up(&c.k), up(&c.v), up(&f.o_cmp));
    for (gate, window) in [([0.0, 1.0, 0.0], None), ([0.0, 0.0, 1.0], Some(cfg.window))] {
        let gates = up(&gate.repeat(total * h.num_q_heads));
        let x = DeviceNsaInputs {
            q: &q,
            k: &k,
            v: &v,
            k_win: None,
            v_win: None,
            o_cmp: &o_cmp,
            gates: &gates,
            cu_seqlens: &c.cu,
        };
        let out = dev::forward(gpu, &cfg, &h, &x, &f.indices).unwrap();
        let dcfg = crate::dense::DenseConfig {
            heads: h,
            causal: true,
            window,
            scale: Some(cfg.softmax_scale(&h)),
            check_finite: false,
        };
        let (o_ref, lse_ref) = crate::dense::naive::forward(&dcfg, &c.q, &c.k, &c.v, &c.cu, &c.cu).unwrap();
        let o = gpu.download(&out.o).unwrap();
        let lse = gpu.download(if window.is_some() { &out.lse_win } else { &out.lse_slc }).unwrap();
        let (e_o, e_l) = assert_forward(&format!("gates {gate:?}"), &o, &lse, &o_ref, &lse_ref);
        println!("gates {gate:?}: o error {:.3}u, lse error {e_l:e}", e_o / unit_roundoff(bf16::DTYPE) as f64);
    }
}

#[test]
fn schedule_buckets_tokens_by_block_and_loads_each_tile_once_per_group() {
    // Three tokens of a sequence of 3, l' = 2: token 0 chose {0}, 1 chose {0}, 2 chose {0, 1}.
    let cfg = NsaConfig { block_cmp: 2, stride_cmp: 1, block_slc: 2, num_selected: 3, ..NsaConfig::default() };
    let h = Heads::new(4, 1, 64, 64);
    let n = NO_BLOCK;
    let idx = [0, n, n, 0, n, n, 0, 1, n];
    let s = slc_schedule(&cfg, &h, &[0, 3], &idx, 64).unwrap();
    // One CTA (16 tokens x 4 heads fit), two tiles: block 0 for tokens {0, 1, 2}, block 1 (key 2)
    // for token 2 only.
    assert_eq!(s.items, 1);
    assert_eq!(&s.ints[8..16], &[0, 3, 0, 0, 0, 0, 2, 0]);
    assert_eq!(&s.ints[16..], &[0, 2, 0b111, 0, 2, 1, 0b100, 0]);
    assert_eq!(row_layout(1), (1, 64, 1));
    assert_eq!(row_layout(3), (3, 21, 1));
    assert_eq!(row_layout(16), (16, 4, 1));
    assert_eq!(row_layout(70), (64, 1, 2));
}

#[test]
fn device_errors_are_typed() {
    let Some(gpu) = device() else { return };
    let cfg = small();
    let h = Heads::new(2, 1, 64, 64);
    let q = gpu.upload(&vec![bf16::ONE; 4 * 2 * 64]).unwrap();
    let k = gpu.upload(&vec![bf16::ONE; 4 * 64]).unwrap();
    let ok = [0, NO_BLOCK, NO_BLOCK, NO_BLOCK];
    let idx: Vec<u32> = ok.repeat(4);
    assert!(dev::selected_forward(gpu, &cfg, &h, &q, &k, &k, &idx, &[0, 4]).is_ok());
    // A block after the token, wrong lengths, f32 storage, an uncompiled head dim.
    let mut bad = idx.clone();
    bad[0] = 1;
    assert!(matches!(dev::selected_forward(gpu, &cfg, &h, &q, &k, &k, &bad, &[0, 4]), Err(Error::Shape(_))));
    assert!(matches!(dev::selected_forward(gpu, &cfg, &h, &q, &k, &k, &idx[1..], &[0, 4]), Err(Error::Shape(_))));
    assert!(matches!(dev::selected_forward(gpu, &cfg, &h, &q, &k, &k, &idx, &[0, 5]), Err(Error::CuSeqlens(_))));
    let qf = gpu.upload(&vec![1.0f32; 4 * 2 * 64]).unwrap();
    let kf = gpu.upload(&vec![1.0f32; 4 * 64]).unwrap();
    assert!(matches!(dev::selected_forward(gpu, &cfg, &h, &qf, &kf, &kf, &idx, &[0, 4]), Err(Error::Unsupported(_))));
    let h32 = Heads::new(2, 1, 32, 32);
    let q32 = gpu.upload(&vec![bf16::ONE; 4 * 2 * 32]).unwrap();
    let k32 = gpu.upload(&vec![bf16::ONE; 4 * 32]).unwrap();
    assert!(matches!(
        dev::selected_forward(gpu, &cfg, &h32, &q32, &k32, &k32, &idx, &[0, 4]),
        Err(Error::Unsupported(_))
    ));
}

/// Backward tolerance in storage units of (1 + max |ref|): the dense device backward's 2u, plus
/// the rounding of each branch's output gradient `g_b dO` to the storage type and of the final
/// sum of the branches' f32 and stored parts.
const BWD_U: f64 = 4.0;

/// The device backward (after the device forward) against the naive backward on the same
/// chosen blocks. With `zero_cmp_gate` the compressed branch's gate is 0, so the reference's
/// `dq` holds the selected and window branches' alone and is compared too.
fn check_backward<T: Element + DeviceCopy>(
    cfg: &NsaConfig,
    h: &Heads,
    lens: &[usize],
    separate_win: bool,
    zero_cmp_gate: bool,
    seed: u64,
) {
    let Some(gpu) = device() else { return };
    let mut c = Case::new::<T>(cfg, h, lens, separate_win, seed);
    if zero_cmp_gate {
        c.gates.iter_mut().step_by(3).for_each(|g| *g = 0.0);
    }
    let (hq, dv) = (h.num_q_heads, h.head_dim_v);
    let total: usize = lens.iter().sum();
    let d_o = back(&to::<T>(&values(total * hq * dv, seed + 4)));
    let f = naive::forward(cfg, h, &c.inputs(), None).unwrap();
    let r = naive::backward(cfg, h, &c.inputs(), &f.indices, &d_o).unwrap();
    let up = |x: &[f64]| gpu.upload(&to::<T>(x)).unwrap();
    let (q, k, v, gates, d_o_dev) = (up(&c.q), up(&c.k), up(&c.v), up(&c.gates), up(&d_o));
    let (kw, vw) = (c.kw.as_deref().map(up), c.vw.as_deref().map(up));
    let o_cmp_stored = back(&to::<T>(&f.o_cmp));
    let o_cmp = up(&o_cmp_stored);
    let x = DeviceNsaInputs {
        q: &q,
        k: &k,
        v: &v,
        k_win: kw.as_ref(),
        v_win: vw.as_ref(),
        o_cmp: &o_cmp,
        gates: &gates,
        cu_seqlens: &c.cu,
    };
    let out = dev::forward(gpu, cfg, h, &x, &f.indices).unwrap();
    let g = dev::backward(gpu, cfg, h, &x, &out, &f.indices, &d_o_dev).unwrap();
    let dt = |b: &DeviceBuffer<T>| back(&gpu.download(b).unwrap());
    let u = unit_roundoff(T::DTYPE) as f64;
    let what = format!("{:?} {h:?} {cfg:?} lens {lens:?} separate window {separate_win}", T::DTYPE);
    let mut checks: Vec<(&str, Vec<f64>, &[f64])> = vec![("dk", dt(&g.dk), &r.dk), ("dv", dt(&g.dv), &r.dv)];
    if separate_win {
        checks.push(("dk_win", dt(g.dk_win.as_ref().unwrap()), r.dk_win.as_deref().unwrap()));
        checks.push(("dv_win", dt(g.dv_win.as_ref().unwrap()), r.dv_win.as_deref().unwrap()));
    } else {
        assert!(g.dk_win.is_none() && g.dv_win.is_none());
    }
    if zero_cmp_gate {
        checks.push(("dq", dt(&g.dq), &r.dq));
    }
    let mut report = String::new();
    for (name, got, want) in &checks {
        let e = rel_err(got, want);
        assert!(e <= BWD_U * u, "{what}: {name} error {:.3}u > {BWD_U}u", e / u);
        report += &format!(" {name} {:.3}u", e / u);
    }
    // dgates[b] = o_b . dO from stored branch outputs: per element within
    // 2u (sum_d |o_b,d dO_d| + |ref|) (the branch output's rounding, the store's).
    let dgates = dt(&g.dgates);
    let branches = [&o_cmp_stored, &f.o_slc, &f.o_win];
    let mut worst = 0f64;
    for (i, (&got, &want)) in dgates.iter().zip(&r.dgates).enumerate() {
        let (row, b) = (i / 3, i % 3);
        let mag: f64 = (0..dv).map(|d| (branches[b][row * dv + d] * d_o[row * dv + d]).abs()).sum();
        worst = worst.max((got - want).abs() / (u * (mag + want.abs()) + f64::MIN_POSITIVE));
    }
    assert!(worst <= 2.0, "{what}: dgates error {worst:.3} x u (sum |o dO| + |ref|) > 2");
    // The compressed branch's output gradient g_cmp dO, rounded once (to within half the f16
    // subnormal step, 2^-25, near 0).
    let d_o_cmp = dt(&g.d_o_cmp);
    for (i, &got) in d_o_cmp.iter().enumerate() {
        let want = c.gates[i / dv * 3] * d_o[i];
        assert!((got - want).abs() <= u * want.abs() + 2f64.powi(-25), "{what}: d_o_cmp[{i}] {got} vs {want}");
    }
    println!("{what}:{report}, dgates {worst:.3}");
}

#[test]
fn backward_every_gqa_ratio() {
    let cfg = small();
    for (n, (hq, hkv)) in [(1, 1), (4, 2), (3, 1), (8, 2), (16, 1)].into_iter().enumerate() {
        let h = Heads::new(hq, hkv, 64, 64);
        if n % 2 == 0 {
            check_backward::<bf16>(&cfg, &h, &[1, 30, 70], false, true, n as u64);
        } else {
            check_backward::<f16>(&cfg, &h, &[1, 30, 70], false, true, n as u64);
        }
    }
}

#[test]
fn backward_head_dims_separate_window_short_sequences() {
    let cfg = small();
    check_backward::<bf16>(&cfg, &Heads::new(2, 1, 192, 128), &[29, 5], false, true, 41);
    check_backward::<bf16>(&cfg, &Heads::new(4, 2, 128, 128), &[40], true, false, 42);
    check_backward::<f16>(&cfg, &Heads::new(3, 3, 96, 96), &[26], false, true, 43);
    check_backward::<bf16>(&cfg, &Heads::new(4, 2, 64, 64), &[1, 2, 3, 1, 5, 1, 7, 2, 13], true, true, 44);
    let paper = NsaConfig { num_selected: 4, ..NsaConfig::default() };
    check_backward::<bf16>(&paper, &Heads::new(4, 1, 64, 64), &[200], true, true, 45);
}

/// The simulator's profile of the selected forward for GQA groups of 1, 4 and 16 (one kv head,
/// the same 512 tokens and chosen blocks, Dk = Dv = 128, l' = 32, n = 4: the forced blocks and
/// one that varies from token to token): the K/V bytes the
/// schedule loads, what the profile counts, and how many row-block loads each tile serves. Each
/// K/V tile is loaded once for the group's heads of every token of the CTA that chose it, so a
/// tile serves at least `group` (row, tile) pairs, where loading per query row would load it
/// once per pair.
#[test]
fn profile_kv_bytes_per_group() {
    use squid_cuda::launch::Gpu;
    use squid_cuda::ptxsim::Options;
    if device().is_none() {
        return;
    }
    let gpu = Gpu::simulator_with(Options { profile: true, ..Options::default() }).unwrap();
    let cfg = NsaConfig { block_cmp: 16, stride_cmp: 8, block_slc: 32, num_selected: 4, ..NsaConfig::default() };
    let (len, dk) = (512usize, 128usize);
    let bn = dev::key_tile(dk);
    // Forced blocks plus one more, spread deterministically over the earlier blocks.
    let mut idx = Vec::new();
    for t in 0..len {
        let cur = t / cfg.block_slc;
        let mut chosen: Vec<u32> = vec![0];
        if cur >= 2 {
            chosen.push(cur as u32 - 1);
        }
        if cur >= 1 {
            chosen.push(cur as u32);
        }
        if cur >= 3 {
            chosen.push(1 + (t * 7 % (cur - 2)) as u32);
        }
        chosen.sort_unstable();
        chosen.dedup();
        chosen.resize(cfg.num_selected, NO_BLOCK);
        idx.extend(chosen);
    }
    for group in [1usize, 4, 16] {
        let h = Heads::new(group, 1, dk, dk);
        let cu = [0, len as u32];
        super::validate_indices(&cfg, &h, &cu, &idx).unwrap();
        let q = gpu.upload(&to::<bf16>(&values(len * group * dk, 1))).unwrap();
        let k = gpu.upload(&to::<bf16>(&values(len * dk, 2))).unwrap();
        dev::selected_forward(&gpu, &cfg, &h, &q, &k, &k, &idx, &cu).unwrap();
        let p = gpu.last_profile().expect("profiling simulator");
        let sched = slc_schedule(&cfg, &h, &cu, &idx, bn).unwrap();
        let kv_bytes = sched.tiles * bn * 2 * dk * 2;
        // (row, tile) pairs: each row's own tiles (its chosen blocks up to its token).
        let row_tiles: usize = (0..len)
            .map(|t| {
                idx[t * 4..][..4]
                    .iter()
                    .filter(|&&j| j != NO_BLOCK)
                    .map(|&j| (t + 1 - j as usize * cfg.block_slc).min(cfg.block_slc).div_ceil(bn))
                    .sum::<usize>()
                    * group
            })
            .sum();
        let reuse = row_tiles as f64 / sched.tiles as f64;
        println!(
            "group {group:2}: {} CTAs, {} K/V tiles = {kv_bytes} B scheduled ({:.0} B per token), {row_tiles} (row, tile) \
             pairs = {reuse:.1} per tile loaded; profile: {} B requested, {} B unique read",
            sched.items,
            sched.tiles,
            kv_bytes as f64 / len as f64,
            p.global_bytes_requested,
            p.unique_bytes_read
        );
        assert!(reuse >= group as f64, "group {group}: a K/V tile serves {reuse} row pairs < the group's heads");
        assert!(p.global_bytes_requested as usize >= kv_bytes + len * group * dk * 2);
        assert!(p.unique_bytes_read as usize <= len * group * dk * 2 + len * dk * 2 + sched.ints.len() * 4);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3))]

    /// Generated shapes: sequence lengths, GQA ratio, head dims, block sizes, n, window, storage type.
    #[test]
    fn forward_and_backward_generated_shapes(
        lens in proptest::collection::vec(1usize..60, 1..4),
        group in proptest::sample::select(vec![1usize, 2, 3, 4, 8, 16]),
        dims in proptest::sample::select(vec![(64usize, 64usize), (96, 96), (128, 128), (192, 128)]),
        block_slc in proptest::sample::select(vec![4usize, 8, 12, 20]),
        num_selected in 3usize..7,
        window in 1usize..20,
        separate in proptest::prelude::any::<bool>(),
        half in proptest::prelude::any::<bool>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let cfg = NsaConfig { block_cmp: 4, stride_cmp: 2, block_slc, num_selected, window, ..NsaConfig::default() };
        let h = Heads::new(group, 1, dims.0, dims.1);
        if half {
            check_forward::<f16>(&cfg, &h, &lens, separate, seed);
            check_backward::<f16>(&cfg, &h, &lens, separate, !separate, seed);
        } else {
            check_forward::<bf16>(&cfg, &h, &lens, separate, seed);
            check_backward::<bf16>(&cfg, &h, &lens, separate, !separate, seed);
        }
    }
}
