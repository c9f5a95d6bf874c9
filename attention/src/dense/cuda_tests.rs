//! The device kernels against the naive reference, on `squid_cuda::testing::test_device()` (the
//! simulator on a machine without a GPU).
//!
//! Inputs are uniform in [-2, 2], rounded to the storage type; the reference runs in f64 on the
//! rounded values. Tolerances, with u the storage unit roundoff: `o` within 3u (1 + max |ref|)
//! (the output store rounds by u, and P is rounded to the storage type before P V, which moves
//! each output by at most u max |v|); `lse` within 1e-5 (1 + |ref|) (f32 sums of exact products,
//! ex2/lg2 at their documented error); `-inf` exactly where the reference has it.
//!
//! These tests do not depend on the CPU instruction set, so the CI runs that repeat the crate's
//! tests with `SQUID_ATTENTION_ISA` set skip them.

use std::sync::OnceLock;

use half::{bf16, f16};
use proptest::prelude::*;
use squid_cuda::dtype::unit_roundoff;
use squid_cuda::launch::{DeviceCopy, Gpu};
use squid_cuda::Element;

use super::cuda::{self as dev, mask_matches_kernel, BackwardInputs, DqMode};
use super::flash::KernelMask;
use super::tests::{back, offsets, rel_err, to, values};
use super::{naive, DenseConfig};
use crate::{Error, Heads};

/// One device for every test of this binary (the module is compiled and loaded once).
pub(crate) fn device() -> Option<&'static Gpu> {
    static DEVICE: OnceLock<Option<Gpu>> = OnceLock::new();
    if std::env::var_os("SQUID_ATTENTION_ISA").is_some() {
        println!("skipped: device tests do not depend on SQUID_ATTENTION_ISA (they ran in the plain run)");
        return None;
    }
    DEVICE.get_or_init(squid_cuda::testing::test_device).as_ref()
}

pub(crate) struct Case {
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub d_o: Vec<f64>,
    pub cu_q: Vec<u32>,
    pub cu_k: Vec<u32>,
}

/// Random inputs for the lengths, already rounded to `T` (so the reference sees what the device does).
pub(crate) fn case<T: Element>(h: &Heads, lens_q: &[usize], lens_k: &[usize], seed: u64) -> Case {
    let (tq, tk): (usize, usize) = (lens_q.iter().sum(), lens_k.iter().sum());
    let round = |x: Vec<f64>| back(&to::<T>(&x));
    Case {
        q: round(values(tq * h.num_q_heads * h.head_dim_k, seed)),
        k: round(values(tk * h.num_kv_heads * h.head_dim_k, seed ^ 0x9e37)),
        v: round(values(tk * h.num_kv_heads * h.head_dim_v, seed ^ 0x7f4a)),
        d_o: round(values(tq * h.num_q_heads * h.head_dim_v, seed ^ 0x3c6e)),
        cu_q: offsets(lens_q),
        cu_k: offsets(lens_k),
    }
}

/// Asserts `o` and `lse` against the reference, returning the errors (o relative, lse).
pub(crate) fn assert_forward<T: Element>(
    what: &str,
    o: &[T],
    lse: &[f32],
    o_ref: &[f64],
    lse_ref: &[f64],
) -> (f64, f64) {
    let u = unit_roundoff(T::DTYPE) as f64;
    let e_o = rel_err(&back(o), o_ref);
    assert!(e_o <= 3.0 * u, "{what}: o error {e_o:e} > 3u");
    let mut e_l = 0f64;
    for (i, (&g, &r)) in lse.iter().zip(lse_ref).enumerate() {
        if r == f64::NEG_INFINITY || g == f32::NEG_INFINITY {
            assert_eq!(g as f64, r, "{what}: lse[{i}]");
            continue;
        }
        e_l = e_l.max((g as f64 - r).abs() / (1.0 + r.abs()));
    }
    assert!(e_l <= 1e-5, "{what}: lse error {e_l:e}");
    (e_o, e_l)
}

/// The device forward against the reference for one configuration.
fn check_forward<T: Element + DeviceCopy>(cfg: &DenseConfig, lens_q: &[usize], lens_k: &[usize], seed: u64) {
    let Some(gpu) = device() else { return };
    let c = case::<T>(&cfg.heads, lens_q, lens_k, seed);
    let km = KernelMask { causal: cfg.causal, window: cfg.window, row_lo: false };
    assert!(mask_matches_kernel(cfg, km, &c.cu_q, &c.cu_k));
    let (o_ref, lse_ref) = naive::forward(cfg, &c.q, &c.k, &c.v, &c.cu_q, &c.cu_k).unwrap();
    let up = |x: &[f64]| gpu.upload(&to::<T>(x)).unwrap();
    let out = dev::forward(gpu, cfg, &up(&c.q), &up(&c.k), &up(&c.v), &c.cu_q, &c.cu_k).unwrap();
    let (o, lse) = (gpu.download(&out.o).unwrap(), gpu.download(&out.lse).unwrap());
    let what = format!("{:?} {cfg:?} q {lens_q:?} k {lens_k:?}", T::DTYPE);
    let (e_o, e_l) = assert_forward(&what, &o, &lse, &o_ref, &lse_ref);
    println!("{what}: o error {:.3}u, lse error {e_l:e}", e_o / unit_roundoff(T::DTYPE) as f64);
}

/// Asserts gradients against the reference: within `BWD_U` storage units of (1 + max |ref|).
pub(crate) fn assert_grads<T: Element>(what: &str, got: [&[T]; 3], want: [&[f64]; 3]) -> [f64; 3] {
    let u = unit_roundoff(T::DTYPE) as f64;
    let mut errs = [0.0; 3];
    for (n, name) in ["dq", "dk", "dv"].iter().enumerate() {
        errs[n] = rel_err(&back(got[n]), want[n]);
        assert!(errs[n] <= BWD_U * u, "{what}: {name} error {:e} > {BWD_U}u", errs[n]);
    }
    errs
}

/// Backward tolerance in storage units: P and dS are rounded to the storage type before their
/// products (as FlashAttention does), each moving a gradient by about u times its scale, and the
/// store rounds once more.
pub(crate) const BWD_U: f64 = 2.0;

/// The device backward (after the device forward) against the reference, in the given dQ mode.
fn check_backward<T: Element + DeviceCopy>(
    cfg: &DenseConfig,
    lens_q: &[usize],
    lens_k: &[usize],
    seed: u64,
    mode: DqMode,
) {
    let Some(gpu) = device() else { return };
    let c = case::<T>(&cfg.heads, lens_q, lens_k, seed);
    let (dq, dk, dv) = naive::backward(cfg, &c.q, &c.k, &c.v, &c.d_o, &c.cu_q, &c.cu_k).unwrap();
    let up = |x: &[f64]| gpu.upload(&to::<T>(x)).unwrap();
    let (q, k, v, d_o) = (up(&c.q), up(&c.k), up(&c.v), up(&c.d_o));
    let out = dev::forward(gpu, cfg, &q, &k, &v, &c.cu_q, &c.cu_k).unwrap();
    let x =
        BackwardInputs { q: q.view(), k: k.view(), v: v.view(), o: out.o.view(), lse: out.lse.view(), d_o: d_o.view() };
    let g = dev::backward(gpu, cfg, x, &c.cu_q, &c.cu_k, mode).unwrap();
    let got = [gpu.download(&g.dq).unwrap(), gpu.download(&g.dk).unwrap(), gpu.download(&g.dv).unwrap()];
    let what = format!("{:?} {mode:?} {cfg:?} q {lens_q:?} k {lens_k:?}", T::DTYPE);
    let e = assert_grads(&what, [&got[0], &got[1], &got[2]], [&dq, &dk, &dv]);
    println!("{what}: errors {e:?}");
}

fn cfg(hq: usize, hkv: usize, dk: usize, dv: usize, causal: bool, window: Option<usize>) -> DenseConfig {
    DenseConfig { heads: Heads::new(hq, hkv, dk, dv), causal, window, scale: None, check_finite: false }
}

#[test]
fn forward_every_head_dim_both_types() {
    // Lengths off every tile (1, 17, 70), Tq < Tk, causal bottom-right.
    for (dk, dv) in super::flash::HEAD_DIMS {
        let c = cfg(2, 1, dk, dv, true, None);
        check_forward::<bf16>(&c, &[1, 70], &[17, 90], dk as u64);
        check_forward::<f16>(&c, &[1, 70], &[17, 90], dk as u64 + 1);
    }
}

#[test]
fn forward_gqa_windows_and_tiny_sequences() {
    // GQA 1/3/8; a window inside a tile and one wider than the sequence; many tiny sequences;
    // a sequence with no keys and one with fewer keys than queries (causal: its first rows see nothing).
    check_forward::<bf16>(&cfg(3, 1, 64, 64, true, Some(5)), &[150], &[150], 1);
    check_forward::<f16>(&cfg(8, 1, 64, 64, false, Some(300)), &[20, 33], &[40, 33], 2);
    check_forward::<bf16>(
        &cfg(2, 2, 64, 64, false, None),
        &[1, 2, 3, 1, 5, 1, 1, 7, 2, 3],
        &[2, 1, 3, 4, 5, 1, 9, 7, 1, 3],
        3,
    );
    check_forward::<bf16>(&cfg(4, 2, 128, 128, true, None), &[3, 80, 2], &[0, 70, 2], 4);
    // A negative scale (the max is taken after scaling).
    let mut neg = cfg(2, 1, 64, 64, true, Some(40));
    neg.scale = Some(-0.2);
    check_forward::<bf16>(&neg, &[100], &[130], 5);
}

#[test]
fn forward_and_deterministic_backward_are_batch_invariant() {
    // A sequence's outputs are bit-identical alone and packed between others (Dk = Dv here).
    let Some(gpu) = device() else { return };
    let c = cfg(4, 2, 64, 64, true, None);
    let packed = case::<bf16>(&c.heads, &[9, 77, 30], &[9, 100, 30], 11);
    let h = c.heads;
    let (q0, q1) = (9 * h.num_q_heads * h.head_dim_k, 86 * h.num_q_heads * h.head_dim_k);
    let (k0, k1) = (9 * h.num_kv_heads * h.head_dim_k, 109 * h.num_kv_heads * h.head_dim_k);
    let up = |x: &[f64]| gpu.upload(&to::<bf16>(x)).unwrap();
    let all =
        dev::forward(gpu, &c, &up(&packed.q), &up(&packed.k), &up(&packed.v), &packed.cu_q, &packed.cu_k).unwrap();
    let alone = dev::forward(
        gpu,
        &c,
        &up(&packed.q[q0..q1]),
        &up(&packed.k[k0..k1]),
        &up(&packed.v[k0..k1]),
        &[0, 77],
        &[0, 100],
    )
    .unwrap();
    let o_all = gpu.download(&all.o).unwrap();
    let o_alone = gpu.download(&alone.o).unwrap();
    let row = h.num_q_heads * h.head_dim_v;
    assert_eq!(&o_all[9 * row..86 * row], &o_alone[..]);
    let (l_all, l_alone) = (gpu.download(&all.lse).unwrap(), gpu.download(&alone.lse).unwrap());
    for head in 0..h.num_q_heads {
        assert_eq!(&l_all[head * 116 + 9..head * 116 + 86], &l_alone[head * 77..(head + 1) * 77]);
    }
    // The deterministic backward too: its gradients for the middle sequence, packed or alone.
    let d_o_all = up(&packed.d_o);
    let d_o_alone = up(&packed.d_o[9 * row..86 * row]);
    let (q_all, k_all, v_all) = (up(&packed.q), up(&packed.k), up(&packed.v));
    let (q_one, k_one, v_one) = (up(&packed.q[q0..q1]), up(&packed.k[k0..k1]), up(&packed.v[k0..k1]));
    let x_all = BackwardInputs {
        q: q_all.view(),
        k: k_all.view(),
        v: v_all.view(),
        o: all.o.view(),
        lse: all.lse.view(),
        d_o: d_o_all.view(),
    };
    let x_one = BackwardInputs {
        q: q_one.view(),
        k: k_one.view(),
        v: v_one.view(),
        o: alone.o.view(),
        lse: alone.lse.view(),
        d_o: d_o_alone.view(),
    };
    let g_all = dev::backward(gpu, &c, x_all, &packed.cu_q, &packed.cu_k, DqMode::Deterministic).unwrap();
    let g_one = dev::backward(gpu, &c, x_one, &[0, 77], &[0, 100], DqMode::Deterministic).unwrap();
    let krow = h.num_kv_heads * h.head_dim_k;
    assert_eq!(&gpu.download(&g_all.dq).unwrap()[q0..q1], &gpu.download(&g_one.dq).unwrap()[..]);
    assert_eq!(&gpu.download(&g_all.dk).unwrap()[9 * krow..109 * krow], &gpu.download(&g_one.dk).unwrap()[..]);
    assert_eq!(&gpu.download(&g_all.dv).unwrap()[9 * krow..109 * krow], &gpu.download(&g_one.dv).unwrap()[..]);
}

#[test]
fn device_errors_are_typed() {
    let Some(gpu) = device() else { return };
    let c = cfg(2, 1, 64, 64, true, None);
    let q = gpu.upload(&vec![0.5f32; 4 * 2 * 64]).unwrap();
    let k = gpu.upload(&vec![0.5f32; 4 * 64]).unwrap();
    assert!(matches!(dev::forward(gpu, &c, &q, &k, &k, &[0, 4], &[0, 4]), Err(Error::Unsupported(_))));
    let qb = gpu.upload(&vec![bf16::ONE; 4 * 2 * 64]).unwrap();
    let kb = gpu.upload(&vec![bf16::ONE; 4 * 64]).unwrap();
    assert!(matches!(dev::forward(gpu, &c, &qb, &kb, &kb, &[0, 5], &[0, 4]), Err(Error::CuSeqlens(_))));
    let odd = cfg(2, 1, 32, 32, true, None);
    let k32 = gpu.upload(&vec![bf16::ONE; 4 * 32]).unwrap();
    let q32 = gpu.upload(&vec![bf16::ONE; 4 * 2 * 32]).unwrap();
    assert!(matches!(dev::forward(gpu, &odd, &q32, &k32, &k32, &[0, 4], &[0, 4]), Err(Error::Unsupported(_))));
    let mut nan = vec![bf16::ONE; 4 * 64];
    nan[7] = bf16::NAN;
    let kn = gpu.upload(&nan).unwrap();
    let checked = DenseConfig { check_finite: true, ..c };
    assert_eq!(
        dev::forward(gpu, &checked, &qb, &kb, &kn, &[0, 4], &[0, 4]).unwrap_err(),
        Error::NonFinite { tensor: "v", index: 7 }
    );
}

#[test]
fn backward_every_head_dim_both_modes() {
    for (dk, dv, _) in super::flash::BACKWARD_HEAD_DIMS {
        let c = cfg(2, 1, dk, dv, true, None);
        // Dk = 256 has its own test (one-warp CTAs, slow on the simulator): shorter here.
        let (lq, lk): (&[usize], &[usize]) = if dk == 256 { (&[1, 21], &[17, 35]) } else { (&[1, 70], &[17, 90]) };
        check_backward::<bf16>(&c, lq, lk, dk as u64, DqMode::Atomic);
        check_backward::<f16>(&c, lq, lk, dk as u64 + 1, DqMode::Deterministic);
    }
}

#[test]
fn backward_head_dim_256_gqa_windows_both_modes() {
    // Dk = 256 splits dK/dV (four CTAs per 16-key tile: column halves) and the deterministic dQ
    // (two CTAs per 16-row tile); lengths off the 16-row and 16-key tiles, GQA 3, a window, Tq < Tk,
    // a sequence with no keys, both storage types.
    for mode in [DqMode::Atomic, DqMode::Deterministic] {
        check_backward::<bf16>(&cfg(3, 1, 256, 256, true, Some(7)), &[19, 1], &[23, 4], 21, mode);
        check_backward::<f16>(&cfg(2, 2, 256, 256, false, None), &[3, 17, 2], &[0, 33, 5], 22, mode);
    }
}

#[test]
fn backward_gqa_windows_and_tiny_sequences() {
    for mode in [DqMode::Atomic, DqMode::Deterministic] {
        check_backward::<bf16>(&cfg(3, 1, 64, 64, true, Some(5)), &[100], &[100], 1, mode);
        check_backward::<f16>(&cfg(8, 1, 64, 64, false, Some(40)), &[20, 33], &[40, 33], 2, mode);
        check_backward::<bf16>(
            &cfg(2, 2, 64, 64, false, None),
            &[1, 2, 3, 1, 5, 1, 7],
            &[2, 1, 3, 4, 5, 1, 9],
            3,
            mode,
        );
        check_backward::<bf16>(&cfg(4, 2, 128, 128, true, None), &[3, 80, 2], &[0, 70, 2], 4, mode);
    }
}

#[test]
fn deterministic_backward_is_reproducible() {
    let Some(gpu) = device() else { return };
    let c = cfg(4, 2, 64, 64, true, None);
    let x = case::<bf16>(&c.heads, &[70], &[70], 9);
    let up = |v: &[f64]| gpu.upload(&to::<bf16>(v)).unwrap();
    let (q, k, v, d_o) = (up(&x.q), up(&x.k), up(&x.v), up(&x.d_o));
    let out = dev::forward(gpu, &c, &q, &k, &v, &x.cu_q, &x.cu_k).unwrap();
    let inputs =
        BackwardInputs { q: q.view(), k: k.view(), v: v.view(), o: out.o.view(), lse: out.lse.view(), d_o: d_o.view() };
    let a = dev::backward(gpu, &c, inputs.clone(), &x.cu_q, &x.cu_k, DqMode::Deterministic).unwrap();
    let b = dev::backward(gpu, &c, inputs, &x.cu_q, &x.cu_k, DqMode::Deterministic).unwrap();
    assert_eq!(gpu.download(&a.dq).unwrap(), gpu.download(&b.dq).unwrap());
    assert_eq!(gpu.download(&a.dk).unwrap(), gpu.download(&b.dk).unwrap());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Generated shapes: sequence counts and lengths, GQA ratio, mask, head dims, storage type.
    #[test]
    fn forward_generated_shapes(
        lens in proptest::collection::vec((1usize..90, 0usize..40), 1..4),
        group in prop::sample::select(vec![1usize, 2, 3]),
        mask in 0usize..4,
        dims in prop::sample::select(super::flash::HEAD_DIMS.to_vec()),
        half in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // Keys = queries + extra, so Tq <= Tk (and equal when extra = 0).
        let lens_q: Vec<usize> = lens.iter().map(|l| l.0).collect();
        let lens_k: Vec<usize> = lens.iter().map(|l| l.0 + l.1).collect();
        let (causal, window) = [(true, None), (false, None), (true, Some(1 + seed as usize % 50)), (false, Some(17))][mask];
        let c = cfg(group, 1, dims.0, dims.1, causal, window);
        if half {
            check_forward::<f16>(&c, &lens_q, &lens_k, seed);
        } else {
            check_forward::<bf16>(&c, &lens_q, &lens_k, seed);
        }
    }

    /// Generated shapes for the backward, both dQ modes.
    #[test]
    fn backward_generated_shapes(
        lens in proptest::collection::vec((1usize..80, 0usize..30), 1..3),
        group in prop::sample::select(vec![1usize, 2, 3]),
        mask in 0usize..4,
        dims in prop::sample::select(super::flash::BACKWARD_HEAD_DIMS.to_vec()),
        atomic in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let lens_q: Vec<usize> = lens.iter().map(|l| l.0).collect();
        let lens_k: Vec<usize> = lens.iter().map(|l| l.0 + l.1).collect();
        let (causal, window) = [(true, None), (false, None), (true, Some(1 + seed as usize % 50)), (false, Some(17))][mask];
        let c = cfg(group, 1, dims.0, dims.1, causal, window);
        let mode = if atomic { DqMode::Atomic } else { DqMode::Deterministic };
        check_backward::<bf16>(&c, &lens_q, &lens_k, seed, mode);
    }
}

#[test]
fn forward_stacks_each_gqa_group_in_one_cta() {
    // Every GQA ratio asked for (16 and 8 leave 4 and 8 positions per tile; 3 leaves 21, so the
    // 64-row tile has a padding row), lengths off every tile, windows and Tq < Tk.
    for (n, group) in [1usize, 2, 3, 4, 8, 16].into_iter().enumerate() {
        let window = if n % 2 == 0 { Some(9) } else { None };
        check_forward::<bf16>(&cfg(group, 1, 64, 64, true, window), &[1, 27], &[5, 40], 30 + n as u64);
    }
    check_forward::<f16>(&cfg(6, 2, 96, 96, false, None), &[13, 2], &[13, 9], 37);
    check_forward::<bf16>(&cfg(16, 2, 192, 128, true, None), &[9], &[20], 38);
}

/// Global bytes the forward requests with one head per CTA and with the group stacked, from the
/// simulator's profile (counts of the simulated launch, not a measurement), for a short query
/// block over many keys (chunked prefill; decode-like): one head per CTA fills 4 of a CTA's 64
/// rows and loads the K/V tiles once per head; stacking fills 4 x group rows and loads them once
/// per group, dividing the K/V bytes by the group. (With 64 or more positions per sequence both
/// fill their 64 rows and load the same bytes.) The figures are in docs/KERNELS.md.
#[test]
fn stacking_loads_each_kv_tile_once_per_group() {
    if std::env::var_os("SQUID_ATTENTION_ISA").is_some() || device().is_none() {
        return;
    }
    let options = squid_cuda::ptxsim::Options { profile: true, ..Default::default() };
    let gpu = Gpu::simulator_with(options).unwrap();
    let (tq, tk) = (4usize, 512usize);
    for group in [1usize, 3, 8, 16] {
        let c = cfg(group, 1, 64, 64, true, None);
        let x = case::<bf16>(&c.heads, &[tq], &[tk], 40 + group as u64);
        let up = |v: &[f64]| gpu.upload(&to::<bf16>(v)).unwrap();
        let (q, k, v) = (up(&x.q), up(&x.k), up(&x.v));
        let dims = super::validate_lens(&c, q.len(), k.len(), v.len(), &x.cu_q, &x.cu_k).unwrap();
        let (o_ref, lse_ref) = naive::forward(&c, &x.q, &x.k, &x.v, &x.cu_q, &x.cu_k).unwrap();
        let mut requested = Vec::new();
        for hpc in [1, group] {
            let sched = dev::dense_schedule(&c, &x.cu_q, &x.cu_k, super::flash::TILE_M / hpc).unwrap();
            let (mut o, mut lse) = dev::alloc_outputs::<bf16>(&gpu, &c, dims.total_q).unwrap();
            dev::forward_scheduled_stacking(
                &gpu,
                &c,
                dims,
                &sched,
                q.view(),
                k.view(),
                v.view(),
                o.view_mut(),
                lse.view_mut(),
                hpc,
            )
            .unwrap();
            let p = gpu.last_profile().expect("a profile of the launch");
            println!(
                "GQA {group}, Tq {tq}, Tk {tk}, causal, Dk = Dv = 64, {hpc} heads per CTA: grid {:?}, global bytes \
                 requested {}, global load requests {}",
                p.grid, p.global_bytes_requested, p.global_load_requests
            );
            requested.push(p.global_bytes_requested as f64);
            let (o, lse) = (gpu.download(&o).unwrap(), gpu.download(&lse).unwrap());
            assert_forward(&format!("GQA {group}, {hpc} heads per CTA"), &o, &lse, &o_ref, &lse_ref);
        }
        // K/V are 128 KiB of each CTA's ~136 KiB of requests (Q 8 KiB at most, o and lse ~1 KiB
        // per head), so the total falls by nearly the group factor.
        let ratio = requested[0] / requested[1];
        assert!(ratio >= 0.9 * group as f64, "GQA {group}: requested bytes fell only {ratio:.2}x");
    }
}
