//! `attention`: dense and NSA attention on the CPU (f32 storage, B = 1, HQ = 8, HKV = 2,
//! Dk = Dv = 64, causal).
//!
//! - `dense_fwd`, `dense_fwdbwd`: `squid_attention::dense` against a plain blocked
//!   implementation built on the `gemm` crate: per (head, block of 128 queries) it materialises
//!   that block's scores against every key up to the diagonal with one matmul, masks, takes a
//!   row softmax (the same fast `exp` as ours), and multiplies by V with a second matmul;
//!   backward recomputes the block's probabilities the same way and runs the four gradient
//!   matmuls, accumulating dK, dV per head. Rayon over heads and blocks. Rates use the causal
//!   FLOP count `4 T^2 D HQ / 2` forward and 2.5x that backward, so GFLOP/s compare directly
//!   with `squid-bench machine`'s matmul.
//! - `nsa_fwd`, `nsa_fwdbwd`, `nsa_decode`: NSA (paper config l=32, d=16, l'=64, n=16,
//!   w=512) against our own dense causal attention on the same q, k, v; decode is one new token
//!   against a cache of T tokens (NSA's cache against dense split-K decode). Ratio > 1: NSA is
//!   faster. Compressed K/V come from mean pooling, built outside the timed region.

use std::cell::RefCell;
use std::rc::Rc;

use gemm::Parallelism;
use rayon::prelude::*;
use squid_attention::dense::{self, DenseConfig};
use squid_attention::nsa::{self, NsaCache, NsaConfig, NsaInputs};
use squid_attention::Heads;
use squid_optim::math::exp_fast;

use crate::harness::{Case, Work};

const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 64;

fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .into_par_iter()
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 8) as f32
                / (1 << 24) as f32
                * 2.0
                - 1.0
        })
        .collect()
}

fn heads() -> Heads {
    Heads::new(HQ, HKV, D, D)
}

/// Inputs of one length, built by whichever side runs first.
struct Data {
    t: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    k_cmp: Vec<f32>,
    v_cmp: Vec<f32>,
    gates: Vec<f32>,
    cu: Vec<u32>,
}

type Shared = Rc<RefCell<Option<Data>>>;

fn data(shared: &Shared, t: usize, nsa_cfg: &NsaConfig) {
    if shared.borrow().is_some() {
        return;
    }
    let cu = vec![0, t as u32];
    let k = filled(t * HKV * D, 2);
    let v = filled(t * HKV * D, 3);
    let k_cmp = nsa::compress_mean(nsa_cfg, HKV, D, &k, &cu).expect("compress k");
    let v_cmp = nsa::compress_mean(nsa_cfg, HKV, D, &v, &cu).expect("compress v");
    *shared.borrow_mut() = Some(Data {
        t,
        q: filled(t * HQ * D, 1),
        d_o: filled(t * HQ * D, 4),
        gates: filled(t * HQ * 3, 5).iter().map(|x| 0.5 + 0.4 * x).collect(),
        k,
        v,
        k_cmp,
        v_cmp,
        cu,
    });
}

/// `c = beta c + alpha a b` with explicit (row, column) strides, one thread.
#[allow(clippy::too_many_arguments)]
fn mm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    rsc: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    alpha: f32,
) {
    assert!(m == 0 || n == 0 || (m - 1) * rsc + n <= c.len(), "c too small");
    assert!(m == 0 || k == 0 || (m - 1) * rsa + (k - 1) * csa < a.len(), "a too small");
    assert!(k == 0 || n == 0 || (k - 1) * rsb + (n - 1) * csb < b.len(), "b too small");
    // SAFETY: the asserts above bound every element the strides address inside each slice,
    // and `c` is a unique borrow that aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            rsc as isize,
            beta != 0.0,
            a.as_ptr(),
            csa as isize,
            rsa as isize,
            b.as_ptr(),
            csb as isize,
            rsb as isize,
            beta,
            alpha,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

const BLOCK: usize = 128;

/// Baseline forward of one head: o rows and lse of that head, `[T][D]` and `[T]`.
fn blocked_forward_head(d: &Data, h: usize) -> (Vec<f32>, Vec<f32>) {
    let (t, g) = (d.t, h / (HQ / HKV));
    let scale = 1.0 / (D as f32).sqrt();
    let mut o = vec![0f32; t * D];
    let mut lse = vec![0f32; t];
    o.par_chunks_mut(BLOCK * D).zip(lse.par_chunks_mut(BLOCK)).enumerate().for_each(|(b, (ob, lb))| {
        let i0 = b * BLOCK;
        let rows = lb.len();
        let keys = i0 + rows;
        let mut s = vec![0f32; rows * keys];
        mm(
            rows,
            keys,
            D,
            &mut s,
            keys,
            &d.q[(i0 * HQ + h) * D..],
            (HQ * D, 1),
            &d.k[g * D..],
            (1, HKV * D),
            0.0,
            scale,
        );
        for r in 0..rows {
            let row = &mut s[r * keys..][..keys];
            let visible = i0 + r + 1;
            let m = row[..visible].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let mut sum = 0.0;
            for (j, x) in row.iter_mut().enumerate() {
                *x = if j < visible { exp_fast(*x - m) } else { 0.0 };
                sum += *x;
            }
            for x in row.iter_mut() {
                *x /= sum;
            }
            lb[r] = m + sum.ln();
        }
        mm(rows, D, keys, ob, D, &s, (keys, 1), &d.v[g * D..], (HKV * D, 1), 0.0, 1.0);
    });
    (o, lse)
}

fn blocked_forward(d: &Data) -> Vec<(Vec<f32>, Vec<f32>)> {
    (0..HQ).into_par_iter().map(|h| blocked_forward_head(d, h)).collect()
}

/// Baseline forward + backward: returns per-head (dq, dk, dv) (GQA sums left out: O(T D)).
fn blocked_forward_backward(d: &Data) -> Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let fwd = blocked_forward(d);
    let t = d.t;
    let scale = 1.0 / (D as f32).sqrt();
    fwd.par_iter()
        .enumerate()
        .map(|(h, (o, lse))| {
            let g = h / (HQ / HKV);
            let mut dq = vec![0f32; t * D];
            let mut dk = vec![0f32; t * D];
            let mut dv = vec![0f32; t * D];
            for i0 in (0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - i0);
                let keys = i0 + rows;
                let qb = &d.q[(i0 * HQ + h) * D..];
                let dob = &d.d_o[(i0 * HQ + h) * D..];
                let mut p = vec![0f32; rows * keys];
                mm(rows, keys, D, &mut p, keys, qb, (HQ * D, 1), &d.k[g * D..], (1, HKV * D), 0.0, scale);
                let mut dp = vec![0f32; rows * keys];
                mm(rows, keys, D, &mut dp, keys, dob, (HQ * D, 1), &d.v[g * D..], (1, HKV * D), 0.0, 1.0);
                for r in 0..rows {
                    let visible = i0 + r + 1;
                    let delta: f32 = (0..D).map(|x| o[(i0 + r) * D + x] * dob[r * HQ * D + x]).sum();
                    let (prow, dprow) = (&mut p[r * keys..][..keys], &mut dp[r * keys..][..keys]);
                    for j in 0..keys {
                        let pj = if j < visible { exp_fast(prow[j] - lse[i0 + r]) } else { 0.0 };
                        prow[j] = pj;
                        dprow[j] = pj * (dprow[j] - delta); // dS
                    }
                }
                // dV[0..keys] += P^T dO ; dK[0..keys] += scale dS^T Q ; dQ = scale dS K
                mm(keys, D, rows, &mut dv, D, &p, (1, keys), dob, (HQ * D, 1), 1.0, 1.0);
                mm(keys, D, rows, &mut dk, D, &dp, (1, keys), qb, (HQ * D, 1), 1.0, scale);
                mm(rows, D, keys, &mut dq[i0 * D..], D, &dp, (keys, 1), &d.k[g * D..], (HKV * D, 1), 0.0, scale);
            }
            (dq, dk, dv)
        })
        .collect()
}

fn dense_cfg() -> DenseConfig {
    DenseConfig::causal(heads())
}

fn ours_forward(d: &Data) -> dense::DenseOutput<f32> {
    dense::forward(&dense_cfg(), &d.q, &d.k, &d.v, &d.cu, &d.cu).expect("dense forward")
}

fn ours_forward_backward(d: &Data) -> dense::DenseGrads<f32> {
    let out = ours_forward(d);
    dense::backward(&dense_cfg(), &d.q, &d.k, &d.v, &out.o, &out.lse, &d.d_o, &d.cu, &d.cu).expect("dense backward")
}

fn nsa_inputs(d: &Data) -> NsaInputs<'_, f32> {
    NsaInputs {
        q: &d.q,
        k: &d.k,
        v: &d.v,
        k_win: None,
        v_win: None,
        k_cmp: &d.k_cmp,
        v_cmp: &d.v_cmp,
        gates: &d.gates,
        cu_seqlens: &d.cu,
    }
}

fn causal_flops(t: usize) -> f64 {
    4.0 * (t as f64).powi(2) * D as f64 * HQ as f64 / 2.0
}

/// A case whose two sides share lazily built inputs of length `t`.
fn case(name: &str, t: usize, baseline: &'static str, work: Work, ours: fn(&Data), base: fn(&Data)) -> Case {
    let shared: Shared = Rc::new(RefCell::new(None));
    let (s1, s2) = (shared.clone(), shared);
    let cfg = NsaConfig::default();
    Case {
        suite: "attention",
        case: name.into(),
        params: format!("T={t} HQ={HQ} HKV={HKV} D={D} f32"),
        baseline,
        ours: Box::new(move || {
            data(&s1, t, &cfg);
            ours(s1.borrow().as_ref().expect("built"))
        }),
        base: Box::new(move || {
            data(&s2, t, &cfg);
            base(s2.borrow().as_ref().expect("built"))
        }),
        work,
    }
}

/// A decode case: NSA's cache and the dense cache both hold `t` tokens before timing.
fn decode_case(t: usize) -> Case {
    let cfg = NsaConfig::default();
    let k = filled(t * HKV * D, 2);
    let v = filled(t * HKV * D, 3);
    let q = filled(HQ * D, 1);
    let gates: Vec<f32> = filled(HQ * 3, 5).iter().map(|x| 0.5 + 0.4 * x).collect();
    let mut cache = NsaCache::<f32>::new(cfg, heads(), 1, false).expect("cache");
    cache.append(0, &k, &v, None).expect("append");
    let (cu_q, cu_k) = (vec![0u32, 1], vec![0u32, t as u32]);
    let q2 = q.clone();
    Case {
        suite: "attention",
        case: "nsa_decode".into(),
        params: format!("T={t} HQ={HQ} HKV={HKV} D={D} f32"),
        baseline: "our dense split-K decode, one token against T cached",
        ours: Box::new(move || {
            std::hint::black_box(cache.decode(&q, &gates).expect("nsa decode"));
        }),
        base: Box::new(move || {
            std::hint::black_box(dense::decode(&dense_cfg(), &q2, &k, &v, &cu_q, &cu_k).expect("dense decode"));
        }),
        work: Work::None,
    }
}

/// The cases (see the module doc).
pub fn cases(quick: bool) -> Vec<Case> {
    let mut out = Vec::new();
    let dense_lengths: &[usize] =
        if quick { &[1024, 2048, 4096, 8192] } else { &[1024, 2048, 4096, 8192, 16384, 32768] };
    const BLOCKED: &str = "blocked gemm-crate attention: one query block's scores materialised";
    for &t in dense_lengths {
        out.push(case(
            "dense_fwd",
            t,
            BLOCKED,
            Work::Flops(causal_flops(t)),
            |d| {
                std::hint::black_box(ours_forward(d));
            },
            |d| {
                std::hint::black_box(blocked_forward(d));
            },
        ));
    }
    for &t in dense_lengths {
        out.push(case(
            "dense_fwdbwd",
            t,
            BLOCKED,
            Work::Flops(3.5 * causal_flops(t)),
            |d| {
                std::hint::black_box(ours_forward_backward(d));
            },
            |d| {
                std::hint::black_box(blocked_forward_backward(d));
            },
        ));
    }
    let nsa_lengths: &[usize] = if quick { &[8192, 16384, 32768] } else { &[8192, 16384, 32768, 65536] };
    const DENSE: &str = "our dense causal attention";
    for &t in nsa_lengths {
        out.push(case(
            "nsa_fwd",
            t,
            DENSE,
            Work::None,
            |d| {
                std::hint::black_box(
                    nsa::forward(&NsaConfig::default(), &heads(), &nsa_inputs(d)).expect("nsa forward"),
                );
            },
            |d| {
                std::hint::black_box(ours_forward(d));
            },
        ));
    }
    for &t in nsa_lengths {
        out.push(case(
            "nsa_fwdbwd",
            t,
            DENSE,
            Work::None,
            |d| {
                let cfg = NsaConfig::default();
                let x = nsa_inputs(d);
                let f = nsa::forward(&cfg, &heads(), &x).expect("nsa forward");
                std::hint::black_box(nsa::backward(&cfg, &heads(), &x, &f, &d.d_o).expect("nsa backward"));
            },
            |d| {
                std::hint::black_box(ours_forward_backward(d));
            },
        ));
    }
    for &t in nsa_lengths {
        out.push(decode_case(t));
    }
    out
}
