//! The device kernels against the naive reference, on `squid_cuda::testing::test_device()` (the
//! simulator on a machine without a GPU).
//!
//! Inputs are uniform in [-2, 2], rounded to the storage type; the reference runs in f64 on the
//! rounded values. Tolerances, with u the storage unit roundoff: `o` within 3u (1 + max |ref|)
//! (the output store rounds by u, and P is rounded to the storage type before P V, which moves
//! each output by at most u max |v|); `lse` within 1e-4 (1 + |ref|) (f32 sums of exact products,
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

use super::cuda::{self as dev, mask_matches_kernel};
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
    #[allow(dead_code)] // read by the backward tests
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
    assert!(e_l <= 1e-4, "{what}: lse error {e_l:e}");
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
    assert_forward(&what, &o, &lse, &o_ref, &lse_ref);
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
fn forward_is_batch_invariant() {
    // A sequence's outputs are bit-identical alone and packed between others.
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
}
