//! Rows in parallel; each row in vocabulary chunks with eight accumulator lanes.

use rayon::prelude::*;
use squid_cuda::dtype::Element;

use super::{LogprobOutput, VOCAB_CHUNK};
use crate::math::exp_fast;

const LANES: usize = 8;
/// Rows per rayon task.
const ROWS_PER_TASK: usize = 4;

/// Adds `x` into eight lanes (vectorises; the order of the additions is fixed).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for k in 0..LANES {
            lanes[k] += c[k];
        }
    }
    it.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

/// (lse, entropy) of one row by the online chunked softmax.
#[inline(always)]
fn row_stats<T: Element>(row: &[T]) -> (f32, f32) {
    let mut m = f32::NEG_INFINITY;
    let (mut s, mut w) = (0.0f32, 0.0f32); // S = sum e^(x-m), W = sum e^(x-m) (x-m)
    let mut xs = [0.0f32; VOCAB_CHUNK];
    let mut es = [0.0f32; VOCAB_CHUNK];
    for chunk in row.chunks(VOCAB_CHUNK) {
        let n = chunk.len();
        let x = &mut xs[..n];
        for (d, v) in x.iter_mut().zip(chunk) {
            *d = v.to_f32();
        }
        let mut lane_max = [f32::NEG_INFINITY; LANES];
        let mut it = x.chunks_exact(LANES);
        for c in &mut it {
            for k in 0..LANES {
                lane_max[k] = lane_max[k].max(c[k]);
            }
        }
        let cm = it.remainder().iter().chain(&lane_max).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if cm == f32::NEG_INFINITY && x.iter().all(|v| *v == f32::NEG_INFINITY) {
            continue; // masked-out vocabulary entries: e^-inf = 0
        }
        // A NaN poisons the row: max ignores it, but it reaches S through d below.
        if cm > m {
            if s > 0.0 {
                // Move S and W from base m to base cm: e^(x-m) = e^(x-cm) e^(cm-m), (x-m) = (x-cm) + (cm-m).
                let scale = exp_fast(m - cm);
                w = scale * (w + s * (m - cm));
                s *= scale;
            }
            m = cm;
        }
        // Straight-line loop (vectorises): e = e^(x-m) into es, e (x-m) over x in place. d is
        // clamped so a -inf logit gives e ~ 1e-38 and e d ~ -1e-36, not -inf; NaN stays NaN.
        let e = &mut es[..n];
        for (xv, ev) in x.iter_mut().zip(e.iter_mut()) {
            let d = (*xv - m).clamp(-87.0, 0.0);
            let ex = exp_fast(d);
            *ev = ex;
            *xv = ex * d;
        }
        s += lane_sum(e);
        w += lane_sum(x);
    }
    let ln_s = s.ln();
    (m + ln_s, ln_s - w / s)
}

/// Forward of a few rows: log-prob of the target, entropy, log-sum-exp.
#[inline(always)]
fn forward_rows<T: Element>(
    rows: &[T],
    vocab: usize,
    targets: &[u32],
    logp: &mut [f32],
    entropy: &mut [f32],
    lse: &mut [f32],
) {
    for (r, row) in rows.chunks(vocab).enumerate() {
        let (l, h) = row_stats(row);
        lse[r] = if h.is_finite() { l } else { f32::NAN };
        entropy[r] = h;
        logp[r] = row[targets[r] as usize].to_f32() - l;
    }
}

/// [`forward_rows`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_rows_avx2<T: Element>(
    rows: &[T],
    vocab: usize,
    targets: &[u32],
    logp: &mut [f32],
    entropy: &mut [f32],
    lse: &mut [f32],
) {
    forward_rows(rows, vocab, targets, logp, entropy, lse)
}

pub(super) fn forward<T: Element>(logits: &[T], vocab: usize, targets: &[u32], out: &mut LogprobOutput) {
    // Saturating: with no tokens the vocabulary can be any number (nothing is read).
    let rows = logits.par_chunks(vocab.saturating_mul(ROWS_PER_TASK));
    let outs = out
        .logp
        .par_chunks_mut(ROWS_PER_TASK)
        .zip(out.entropy.par_chunks_mut(ROWS_PER_TASK))
        .zip(out.lse.par_chunks_mut(ROWS_PER_TASK))
        .zip(targets.par_chunks(ROWS_PER_TASK));
    let avx2 = crate::math::use_avx2();
    rows.zip(outs).for_each(|(rows, (((logp, entropy), lse), targets))| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            unsafe { forward_rows_avx2(rows, vocab, targets, logp, entropy, lse) };
            return;
        }
        let _ = avx2;
        forward_rows(rows, vocab, targets, logp, entropy, lse);
    });
}

/// d loss / d logits of one row: `-p (c + h log p)` with `c = g + h H`, plus `g` at the target.
#[inline(always)]
fn backward_row<T: Element, G: Element>(x: &[T], dx: &mut [G], y: usize, g: f32, h: f32, lse: f32, ent: f32) {
    // d_v = -p (g + h (log p + H)); log p clamped at -87 so a -inf logit gives ~0, not inf * 0.
    let c = g + h * ent;
    for (d, v) in dx.iter_mut().zip(x) {
        let logp = (v.to_f32() - lse).clamp(-87.0, 0.0);
        let p = exp_fast(logp);
        *d = G::from_f32(-p * (c + h * logp));
    }
    dx[y] = G::from_f32(dx[y].to_f32() + g);
}

/// [`backward_row`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_row_avx2<T: Element, G: Element>(
    x: &[T],
    dx: &mut [G],
    y: usize,
    g: f32,
    h: f32,
    lse: f32,
    ent: f32,
) {
    backward_row(x, dx, y, g, h, lse, ent)
}

pub(super) fn backward<T: Element, G: Element>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    fwd: &LogprobOutput,
    grad_logp: &[f32],
    grad_entropy: Option<&[f32]>,
    grad_logits: &mut [G],
) {
    let avx2 = crate::math::use_avx2();
    grad_logits.par_chunks_mut(vocab).zip(logits.par_chunks(vocab)).enumerate().for_each(|(t, (dx, x))| {
        let (g, h) = (grad_logp[t], grad_entropy.map_or(0.0, |e| e[t]));
        let (lse, ent, y) = (fwd.lse[t], fwd.entropy[t], targets[t] as usize);
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            unsafe { backward_row_avx2(x, dx, y, g, h, lse, ent) };
            return;
        }
        let _ = avx2;
        backward_row(x, dx, y, g, h, lse, ent);
    });
}
