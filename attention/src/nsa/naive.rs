//! The semantics of NSA, written plainly in f64: for each token and head, list the keys of each
//! branch, run a textbook softmax attention over them, mix by the gates. Slow and obviously
//! right; the CPU path, decode and the finite-difference tests are held to it.

use super::{offsets, select_blocks_n, validate_lens_ext, NsaConfig, NsaExtra, NsaGrads, NsaInputs, NO_BLOCK};
use crate::dense::naive::check_finite_f64;
use crate::{Error, Heads};

/// Forward result of the reference (f64 throughout).
#[derive(Debug, Clone, PartialEq)]
pub struct NaiveForward {
    /// Gated output `[total, HQ, Dv]`.
    pub o: Vec<f64>,
    /// Compressed branch output.
    pub o_cmp: Vec<f64>,
    /// Selected branch output.
    pub o_slc: Vec<f64>,
    /// Window branch output.
    pub o_win: Vec<f64>,
    /// `[HQ, total]`.
    pub lse_cmp: Vec<f64>,
    /// `[HQ, total]`.
    pub lse_slc: Vec<f64>,
    /// `[HQ, total]`.
    pub lse_win: Vec<f64>,
    /// Group-summed compressed probabilities mapped to selection blocks, per token and kv
    /// head: `scores[(token * HKV + g)]` holds one entry per selection block `0..=t / l'`.
    pub scores: Vec<Vec<f64>>,
    /// `[total, HKV, n]`, ascending, [`NO_BLOCK`]-padded.
    pub indices: Vec<u32>,
}

/// Importance of selection blocks `0..num_slc` from the (group-summed) probabilities of the
/// visible compressed blocks, by the corrected Eq. 9 written out literally:
/// `score_j = sum_{m < l'/d} sum_{n < l/d} p[(l'/d) j + m - n]` over valid indices.
pub fn slc_scores(cfg: &NsaConfig, p_cmp: &[f64], num_slc: usize) -> Vec<f64> {
    let (a, b) = (cfg.block_slc / cfg.stride_cmp, cfg.block_cmp / cfg.stride_cmp);
    (0..num_slc)
        .map(|j| {
            let mut s = 0.0;
            for m in 0..a {
                for n in 0..b {
                    let i = (a * j + m) as i64 - n as i64;
                    if i >= 0 && (i as usize) < p_cmp.len() {
                        s += p_cmp[i as usize];
                    }
                }
            }
            s
        })
        .collect()
}

/// One softmax attention over an explicit key list.
struct Attn {
    o: Vec<f64>,
    lse: f64,
    p: Vec<f64>,
}

fn attend(q: &[f64], keys: &[&[f64]], vals: &[&[f64]], scale: f64, dv: usize) -> Attn {
    if keys.is_empty() {
        return Attn { o: vec![0.0; dv], lse: f64::NEG_INFINITY, p: Vec::new() };
    }
    let s: Vec<f64> = keys.iter().map(|k| scale * q.iter().zip(*k).map(|(a, b)| a * b).sum::<f64>()).collect();
    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
    let p: Vec<f64> = s.iter().map(|x| (x - max).exp() / sum).collect();
    let mut o = vec![0.0; dv];
    for (pj, v) in p.iter().zip(vals) {
        for (od, vd) in o.iter_mut().zip(*v) {
            *od += pj * vd;
        }
    }
    Attn { o, lse: max + sum.ln(), p }
}

/// Gradients of one attention for output gradient `g`: `(dq, dk rows, dv rows)`.
#[allow(clippy::type_complexity)]
fn attend_backward(
    q: &[f64],
    keys: &[&[f64]],
    vals: &[&[f64]],
    scale: f64,
    a: &Attn,
    g: &[f64],
) -> (Vec<f64>, Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let dp: Vec<f64> = vals.iter().map(|v| v.iter().zip(g).map(|(x, y)| x * y).sum::<f64>()).collect();
    let mean: f64 = a.p.iter().zip(&dp).map(|(x, y)| x * y).sum();
    let mut dq = vec![0.0; q.len()];
    let mut dks = Vec::with_capacity(keys.len());
    let mut dvs = Vec::with_capacity(keys.len());
    for (j, k) in keys.iter().enumerate() {
        let ds = a.p[j] * (dp[j] - mean);
        for (d, kd) in dq.iter_mut().zip(*k) {
            *d += scale * ds * kd;
        }
        dks.push(q.iter().map(|x| scale * ds * x).collect());
        dvs.push(g.iter().map(|x| a.p[j] * x).collect());
    }
    (dq, dks, dvs)
}

/// Mean pooling over compression blocks, f64.
pub fn compress_mean(
    cfg: &NsaConfig,
    heads: usize,
    dim: usize,
    x: &[f64],
    cu_seqlens: &[u32],
) -> Result<Vec<f64>, Error> {
    cfg.validate()?;
    let total = crate::layout::rows_of("x", x.len(), heads, dim)?;
    crate::validate_cu_seqlens(cu_seqlens, total)?;
    let offs = offsets(cfg, cu_seqlens);
    let row = heads * dim;
    let mut out = vec![0.0; *offs.last().unwrap_or(&0) as usize * row];
    for s in 0..cu_seqlens.len().saturating_sub(1) {
        let start = cu_seqlens[s] as usize;
        for i in 0..(offs[s + 1] - offs[s]) as usize {
            for c in 0..row {
                let sum: f64 =
                    (i * cfg.stride_cmp..i * cfg.stride_cmp + cfg.block_cmp).map(|t| x[(start + t) * row + c]).sum();
                out[(offs[s] as usize + i) * row + c] = sum / cfg.block_cmp as f64;
            }
        }
    }
    Ok(out)
}

/// One branch's keys, values, their row indices, and its gate index.
type Branch<'a, 'b> = (&'b [&'a [f64]], &'b [&'a [f64]], &'b [usize], usize);

/// Where the keys of each branch of one (token, kv head) live.
struct Lists<'a> {
    cmp_k: Vec<&'a [f64]>,
    cmp_v: Vec<&'a [f64]>,
    cmp_rows: Vec<usize>,
    slc_k: Vec<&'a [f64]>,
    slc_v: Vec<&'a [f64]>,
    slc_rows: Vec<usize>,
    win_k: Vec<&'a [f64]>,
    win_v: Vec<&'a [f64]>,
    win_rows: Vec<usize>,
}

/// Forward. With `indices = None` the blocks are chosen as the module documents; with
/// `Some(indices)` those are used instead (how backward holds them fixed, and how tests run the
/// reference on another implementation's choice).
pub fn forward(
    cfg: &NsaConfig,
    h: &Heads,
    x: &NsaInputs<'_, f64>,
    indices: Option<&[u32]>,
) -> Result<NaiveForward, Error> {
    forward_ext(cfg, h, x, &NsaExtra { indices, ..Default::default() })
}

/// Forward with the optional inputs of [`NsaExtra`]: the query rows are the last `Tq` positions
/// of each sequence's keys, a token's `num_selected` replaces `n` in its choice, and given
/// `indices` replace the choice.
pub fn forward_ext(
    cfg: &NsaConfig,
    h: &Heads,
    x: &NsaInputs<'_, f64>,
    extra: &NsaExtra<'_>,
) -> Result<NaiveForward, Error> {
    let indices = extra.indices;
    let dims = validate_lens_ext(cfg, h, x, extra)?;
    let cu_k = extra.cu_seqlens_k.unwrap_or(x.cu_seqlens);
    if cfg.check_finite {
        for (name, t) in
            [("q", x.q), ("k", x.k), ("v", x.v), ("k_cmp", x.k_cmp), ("v_cmp", x.v_cmp), ("gates", x.gates)]
        {
            check_finite_f64(name, t)?;
        }
    }
    let (hq, hkv, dk, dv, n) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v, cfg.num_selected);
    let total = dims.total;
    let group = hq / hkv;
    let scale = cfg.softmax_scale(h) as f64;
    let mut f = NaiveForward {
        o: vec![0.0; total * hq * dv],
        o_cmp: vec![0.0; total * hq * dv],
        o_slc: vec![0.0; total * hq * dv],
        o_win: vec![0.0; total * hq * dv],
        lse_cmp: vec![f64::NEG_INFINITY; hq * total],
        lse_slc: vec![f64::NEG_INFINITY; hq * total],
        lse_win: vec![f64::NEG_INFINITY; hq * total],
        scores: vec![Vec::new(); total * hkv],
        indices: vec![NO_BLOCK; total * hkv * n],
    };
    let offs = offsets(cfg, cu_k);
    let mut chosen = Vec::new();
    for s in 0..dims.num_seqs {
        let (q0, tq) = (x.cu_seqlens[s] as usize, (x.cu_seqlens[s + 1] - x.cu_seqlens[s]) as usize);
        let tk = (cu_k[s + 1] - cu_k[s]) as usize;
        for t in tk - tq..tk {
            let row = q0 + t - (tk - tq);
            for g in 0..hkv {
                // Compressed branch of every head of the group, then the group's choice.
                let nc = cfg.num_cmp_blocks(t + 1);
                let cmp_rows: Vec<usize> = (0..nc).map(|i| offs[s] as usize + i).collect();
                let ck: Vec<&[f64]> = cmp_rows.iter().map(|&r| &x.k_cmp[(r * hkv + g) * dk..][..dk]).collect();
                let cv: Vec<&[f64]> = cmp_rows.iter().map(|&r| &x.v_cmp[(r * hkv + g) * dv..][..dv]).collect();
                let mut p_sum = vec![0.0; nc];
                let mut cmp_out = Vec::new();
                for head in g * group..(g + 1) * group {
                    let a = attend(&x.q[(row * hq + head) * dk..][..dk], &ck, &cv, scale, dv);
                    for (ps, p) in p_sum.iter_mut().zip(&a.p) {
                        *ps += p;
                    }
                    cmp_out.push(a);
                }
                let scores = slc_scores(cfg, &p_sum, t / cfg.block_slc + 1);
                match indices {
                    Some(ix) => {
                        chosen.clear();
                        chosen.extend(ix[(row * hkv + g) * n..][..n].iter().filter(|&&j| j != NO_BLOCK));
                    }
                    None => {
                        let n_t = extra.num_selected.map_or(n, |c| c[row] as usize);
                        select_blocks_n(cfg, t, n_t, &scores, &mut chosen)
                    }
                }
                f.scores[row * hkv + g] = scores;
                for (slot, &j) in chosen.iter().enumerate() {
                    f.indices[(row * hkv + g) * n + slot] = j;
                }
                let lists = key_lists(cfg, h, x, cu_k, &offs, s, t, g, &chosen);
                for (hh, a_cmp) in cmp_out.into_iter().enumerate() {
                    let head = g * group + hh;
                    let qr = &x.q[(row * hq + head) * dk..][..dk];
                    let a_slc = attend(qr, &lists.slc_k, &lists.slc_v, scale, dv);
                    let a_win = attend(qr, &lists.win_k, &lists.win_v, scale, dv);
                    let gates = &x.gates[(row * hq + head) * 3..][..3];
                    let base = (row * hq + head) * dv;
                    for d in 0..dv {
                        f.o_cmp[base + d] = a_cmp.o[d];
                        f.o_slc[base + d] = a_slc.o[d];
                        f.o_win[base + d] = a_win.o[d];
                        f.o[base + d] = gates[0] * a_cmp.o[d] + gates[1] * a_slc.o[d] + gates[2] * a_win.o[d];
                    }
                    f.lse_cmp[head * total + row] = a_cmp.lse;
                    f.lse_slc[head * total + row] = a_slc.lse;
                    f.lse_win[head * total + row] = a_win.lse;
                }
            }
        }
    }
    Ok(f)
}

#[allow(clippy::too_many_arguments)]
fn key_lists<'a>(
    cfg: &NsaConfig,
    h: &Heads,
    x: &NsaInputs<'a, f64>,
    cu_k: &[u32],
    offs: &[u32],
    s: usize,
    t: usize,
    g: usize,
    chosen: &[u32],
) -> Lists<'a> {
    let (hkv, dk, dv) = (h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let start = cu_k[s] as usize;
    let cmp_rows: Vec<usize> = (0..cfg.num_cmp_blocks(t + 1)).map(|i| offs[s] as usize + i).collect();
    let slc_rows: Vec<usize> = chosen
        .iter()
        .flat_map(|&j| {
            let b = j as usize * cfg.block_slc;
            (b..(b + cfg.block_slc).min(t + 1)).map(move |tok| start + tok)
        })
        .collect();
    let win_rows: Vec<usize> = ((t + 1).saturating_sub(cfg.window)..=t).map(|tok| start + tok).collect();
    let (kw, vw) = (x.k_win.unwrap_or(x.k), x.v_win.unwrap_or(x.v));
    let take = |m: &'a [f64], rows: &[usize], d: usize| -> Vec<&'a [f64]> {
        rows.iter().map(|&r| &m[(r * hkv + g) * d..][..d]).collect()
    };
    Lists {
        cmp_k: take(x.k_cmp, &cmp_rows, dk),
        cmp_v: take(x.v_cmp, &cmp_rows, dv),
        slc_k: take(x.k, &slc_rows, dk),
        slc_v: take(x.v, &slc_rows, dv),
        win_k: take(kw, &win_rows, dk),
        win_v: take(vw, &win_rows, dv),
        cmp_rows,
        slc_rows,
        win_rows,
    }
}

/// Backward with the chosen blocks `indices` held fixed; `d_o [total, HQ, Dv]`.
pub fn backward(
    cfg: &NsaConfig,
    h: &Heads,
    x: &NsaInputs<'_, f64>,
    indices: &[u32],
    d_o: &[f64],
) -> Result<NsaGrads<f64>, Error> {
    backward_ext(cfg, h, x, None, indices, d_o)
}

/// [`backward`] with chunked prefill: `cu_seqlens_k` as [`NsaExtra::cu_seqlens_k`].
pub fn backward_ext(
    cfg: &NsaConfig,
    h: &Heads,
    x: &NsaInputs<'_, f64>,
    cu_seqlens_k: Option<&[u32]>,
    indices: &[u32],
    d_o: &[f64],
) -> Result<NsaGrads<f64>, Error> {
    let extra = NsaExtra { cu_seqlens_k, indices: Some(indices), num_selected: None };
    let dims = validate_lens_ext(cfg, h, x, &extra)?;
    let cu_k = cu_seqlens_k.unwrap_or(x.cu_seqlens);
    let (hq, hkv, dk, dv, n) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v, cfg.num_selected);
    let total = dims.total;
    crate::layout::expect_len("d_o", d_o.len(), total * hq * dv, "[total, HQ, Dv]")?;
    let group = hq / hkv;
    let scale = cfg.softmax_scale(h) as f64;
    let separate_win = x.k_win.is_some();
    let mut gr = NsaGrads {
        dq: vec![0.0; x.q.len()],
        dk: vec![0.0; x.k.len()],
        dv: vec![0.0; x.v.len()],
        dk_win: separate_win.then(|| vec![0.0; x.k.len()]),
        dv_win: separate_win.then(|| vec![0.0; x.v.len()]),
        dk_cmp: vec![0.0; x.k_cmp.len()],
        dv_cmp: vec![0.0; x.v_cmp.len()],
        dgates: vec![0.0; x.gates.len()],
    };
    let offs = offsets(cfg, cu_k);
    for s in 0..dims.num_seqs {
        let (q0, tq) = (x.cu_seqlens[s] as usize, (x.cu_seqlens[s + 1] - x.cu_seqlens[s]) as usize);
        let tk = (cu_k[s + 1] - cu_k[s]) as usize;
        for t in tk - tq..tk {
            let row = q0 + t - (tk - tq);
            for g in 0..hkv {
                let chosen: Vec<u32> =
                    indices[(row * hkv + g) * n..][..n].iter().copied().filter(|&j| j != NO_BLOCK).collect();
                let l = key_lists(cfg, h, x, cu_k, &offs, s, t, g, &chosen);
                for head in g * group..(g + 1) * group {
                    let qr = &x.q[(row * hq + head) * dk..][..dk];
                    let dor = &d_o[(row * hq + head) * dv..][..dv];
                    let gates = &x.gates[(row * hq + head) * 3..][..3];
                    let branches: [Branch<'_, '_>; 3] = [
                        (&l.cmp_k, &l.cmp_v, &l.cmp_rows, 0),
                        (&l.slc_k, &l.slc_v, &l.slc_rows, 1),
                        (&l.win_k, &l.win_v, &l.win_rows, 2),
                    ];
                    for (keys, vals, rows, b) in branches {
                        let a = attend(qr, keys, vals, scale, dv);
                        gr.dgates[(row * hq + head) * 3 + b] = a.o.iter().zip(dor).map(|(x, y)| x * y).sum();
                        let gdo: Vec<f64> = dor.iter().map(|x| gates[b] * x).collect();
                        if keys.is_empty() {
                            continue;
                        }
                        let (dq, dks, dvs) = attend_backward(qr, keys, vals, scale, &a, &gdo);
                        for (acc, v) in gr.dq[(row * hq + head) * dk..][..dk].iter_mut().zip(&dq) {
                            *acc += v;
                        }
                        let (dkm, dvm) = match b {
                            0 => (&mut gr.dk_cmp, &mut gr.dv_cmp),
                            2 if separate_win => {
                                (gr.dk_win.as_mut().expect("separate"), gr.dv_win.as_mut().expect("separate"))
                            }
                            _ => (&mut gr.dk, &mut gr.dv),
                        };
                        for ((&r, dkr), dvr) in rows.iter().zip(&dks).zip(&dvs) {
                            for (acc, v) in dkm[(r * hkv + g) * dk..][..dk].iter_mut().zip(dkr) {
                                *acc += v;
                            }
                            for (acc, v) in dvm[(r * hkv + g) * dv..][..dv].iter_mut().zip(dvr) {
                                *acc += v;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(gr)
}
