//! The semantics of dense attention, written plainly in f64: one query row at a time, the
//! whole score row materialised, an explicit softmax. Slow and obviously right; the CPU path
//! and the finite-difference tests are held to it.

use super::{validate_lens, DenseConfig};
use crate::layout::seq_lens;
use crate::Error;

/// Fails on the first NaN or infinity (the f64 twin of the storage-type check).
pub(crate) fn check_finite_f64(name: &'static str, x: &[f64]) -> Result<(), Error> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite { tensor: name, index }),
        None => Ok(()),
    }
}

/// Whether query `i` (of `tq`) sees key `j` (of `tk`): the mask, stated once.
pub fn visible(cfg: &DenseConfig, i: usize, j: usize, tq: usize, tk: usize) -> bool {
    let p = i as i64 + tk as i64 - tq as i64;
    let j = j as i64;
    let causal_ok = !cfg.causal || j <= p;
    let window_ok = match cfg.window {
        Some(w) => j > p.saturating_sub(super::window_i64(w)),
        None => true,
    };
    causal_ok && window_ok
}

/// Forward: returns `o [total_q, HQ, Dv]` and `lse [HQ, total_q]`.
pub fn forward(
    cfg: &DenseConfig,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<(Vec<f64>, Vec<f64>), Error> {
    forward_masked(cfg, q, k, v, cu_seqlens_q, cu_seqlens_k, |_, i, j, tq, tk| visible(cfg, i, j, tq, tk))
}

/// [`forward`] with any mask: `visible(s, i, j, tq, tk)` says whether query `i` of sequence
/// `s` (of `tq` queries, `tk` keys) sees key `j`. `cfg`'s own mask fields are not used.
pub fn forward_masked(
    cfg: &DenseConfig,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    visible: impl Fn(usize, usize, usize, usize, usize) -> bool,
) -> Result<(Vec<f64>, Vec<f64>), Error> {
    let dims = validate_lens(cfg, q.len(), k.len(), v.len(), cu_seqlens_q, cu_seqlens_k)?;
    if cfg.check_finite {
        check_finite_f64("q", q)?;
        check_finite_f64("k", k)?;
        check_finite_f64("v", v)?;
    }
    let h = cfg.heads;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let group = hq / hkv;
    let scale = cfg.softmax_scale() as f64;
    let mut o = vec![0.0; dims.total_q * hq * dv];
    let mut lse = vec![f64::NEG_INFINITY; hq * dims.total_q];
    for (s, (tq, tk)) in seq_lens(cu_seqlens_q).zip(seq_lens(cu_seqlens_k)).enumerate() {
        let (q0, k0) = (cu_seqlens_q[s] as usize, cu_seqlens_k[s] as usize);
        for head in 0..hq {
            let g = head / group;
            for i in 0..tq {
                let qi = &q[((q0 + i) * hq + head) * dk..][..dk];
                let keys: Vec<usize> = (0..tk).filter(|&j| visible(s, i, j, tq, tk)).collect();
                if keys.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let kj = &k[((k0 + j) * hkv + g) * dk..][..dk];
                        scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let oi = &mut o[((q0 + i) * hq + head) * dv..][..dv];
                for (&j, sc) in keys.iter().zip(&scores) {
                    let p = (sc - max).exp() / sum;
                    let vj = &v[((k0 + j) * hkv + g) * dv..][..dv];
                    for (od, vd) in oi.iter_mut().zip(vj) {
                        *od += p * vd;
                    }
                }
                lse[head * dims.total_q + q0 + i] = max + sum.ln();
            }
        }
    }
    Ok((o, lse))
}

/// Backward: from the output gradient `d_o [total_q, HQ, Dv]`, returns `(dq, dk, dv)`. The
/// probabilities are recomputed from scratch (no saved state), so this also checks the CPU
/// backward's use of `o` and `lse`.
#[allow(clippy::type_complexity)]
pub fn backward(
    cfg: &DenseConfig,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), Error> {
    backward_masked(cfg, q, k, v, d_o, cu_seqlens_q, cu_seqlens_k, |_, i, j, tq, tk| visible(cfg, i, j, tq, tk))
}

/// [`backward`] with any mask, as [`forward_masked`].
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn backward_masked(
    cfg: &DenseConfig,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    visible: impl Fn(usize, usize, usize, usize, usize) -> bool,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), Error> {
    let dims = validate_lens(cfg, q.len(), k.len(), v.len(), cu_seqlens_q, cu_seqlens_k)?;
    let h = cfg.heads;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    crate::layout::expect_len("d_o", d_o.len(), dims.total_q * hq * dv, "[total_q, HQ, Dv]")?;
    let group = hq / hkv;
    let scale = cfg.softmax_scale() as f64;
    let mut dq = vec![0.0; q.len()];
    let mut dkk = vec![0.0; k.len()];
    let mut dvv = vec![0.0; v.len()];
    for (s, (tq, tk)) in seq_lens(cu_seqlens_q).zip(seq_lens(cu_seqlens_k)).enumerate() {
        let (q0, k0) = (cu_seqlens_q[s] as usize, cu_seqlens_k[s] as usize);
        for head in 0..hq {
            let g = head / group;
            for i in 0..tq {
                let qrow = ((q0 + i) * hq + head) * dk;
                let orow = ((q0 + i) * hq + head) * dv;
                let keys: Vec<usize> = (0..tk).filter(|&j| visible(s, i, j, tq, tk)).collect();
                if keys.is_empty() {
                    continue;
                }
                let krow = |j: usize| ((k0 + j) * hkv + g) * dk;
                let vrow = |j: usize| ((k0 + j) * hkv + g) * dv;
                let scores: Vec<f64> =
                    keys.iter().map(|&j| scale * (0..dk).map(|d| q[qrow + d] * k[krow(j) + d]).sum::<f64>()).collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let p: Vec<f64> = scores.iter().map(|s| (s - max).exp() / sum).collect();
                // dP_j = dO . v_j ; dS_j = P_j (dP_j - sum_l P_l dP_l)
                let dp: Vec<f64> =
                    keys.iter().map(|&j| (0..dv).map(|d| d_o[orow + d] * v[vrow(j) + d]).sum::<f64>()).collect();
                let mean: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (idx, &j) in keys.iter().enumerate() {
                    let ds = p[idx] * (dp[idx] - mean);
                    for d in 0..dv {
                        dvv[vrow(j) + d] += p[idx] * d_o[orow + d];
                    }
                    for d in 0..dk {
                        dq[qrow + d] += scale * ds * k[krow(j) + d];
                        dkk[krow(j) + d] += scale * ds * q[qrow + d];
                    }
                }
            }
        }
    }
    Ok((dq, dkk, dvv))
}
