//! The fast path: one pass over the tokens, chunks of tokens in parallel, eight accumulator lanes
//! per chunk so the per-token arithmetic (branch-free selects, [`exp_fast`]) vectorises.

use rayon::iter::Either;
use rayon::prelude::*;

use super::LOG_RATIO_CLAMP;
use super::{find_non_finite, validate, Aggregation, KlEstimator, Metrics, PolicyLossConfig, PolicyLossInputs};
use crate::math::exp_fast;
use crate::seqs::{seq_of_token, TOKEN_CHUNK};
use crate::{check_finite, check_len, Error};

const LANES: usize = 8;

// The KL estimator as a const generic of the token loop.
const KL_NONE: u8 = 0;
const KL_K1: u8 = 1;
const KL_K2: u8 = 2;
const KL_K3: u8 = 3;
const KL_K3_PLUS: u8 = 4;

/// Loss tokens per sequence.
pub(crate) fn seq_counts(mask: &[bool], cu_seqlens: &[u32]) -> Vec<u32> {
    cu_seqlens.par_windows(2).map(|w| mask[w[0] as usize..w[1] as usize].iter().map(|&m| u32::from(m)).sum()).collect()
}

/// Constants of one call, hoisted out of the token loop.
#[derive(Clone, Copy)]
struct Params {
    lo: f32,
    hi: f32,
    dual: f32, // unused when `dual_on` is false
    dual_on: bool,
    beta: f32,
    k3_clamp: f32,
}

/// Per-lane partial sums of a chunk.
#[derive(Clone, Copy)]
struct Lanes {
    loss: [f32; LANES],
    clip_low: [f32; LANES],
    clip_high: [f32; LANES],
    dual: [f32; LANES],
    ratio_sum: [f32; LANES],
    ratio_min: [f32; LANES],
    ratio_max: [f32; LANES],
    approx_kl: [f32; LANES],
    kl: [f32; LANES],
    entropy: [f32; LANES],
    poison: [f32; LANES],
}

impl Lanes {
    fn new() -> Self {
        let z = [0.0; LANES];
        Self {
            loss: z,
            clip_low: z,
            clip_high: z,
            dual: z,
            ratio_sum: z,
            ratio_min: [f32::INFINITY; LANES],
            ratio_max: [f32::NEG_INFINITY; LANES],
            approx_kl: z,
            kl: z,
            entropy: z,
            poison: z,
        }
    }
}

/// Chunk totals in f64.
#[derive(Clone, Copy, Default)]
struct Totals {
    loss: f64,
    clip_low: f64,
    clip_high: f64,
    dual: f64,
    ratio_sum: f64,
    ratio_min: f32,
    ratio_max: f32,
    approx_kl: f64,
    kl: f64,
    entropy: f64,
    poisoned: bool,
}

impl Totals {
    fn empty() -> Self {
        Self { ratio_min: f32::INFINITY, ratio_max: f32::NEG_INFINITY, ..Default::default() }
    }
    fn add_lanes(&mut self, l: &Lanes) {
        let s = |x: &[f32; LANES]| x.iter().map(|&v| f64::from(v)).sum::<f64>();
        self.loss += s(&l.loss);
        self.clip_low += s(&l.clip_low);
        self.clip_high += s(&l.clip_high);
        self.dual += s(&l.dual);
        self.ratio_sum += s(&l.ratio_sum);
        self.ratio_min = l.ratio_min.iter().fold(self.ratio_min, |a, &b| a.min(b));
        self.ratio_max = l.ratio_max.iter().fold(self.ratio_max, |a, &b| a.max(b));
        self.approx_kl += s(&l.approx_kl);
        self.kl += s(&l.kl);
        self.entropy += s(&l.entropy);
        self.poisoned |= l.poison.iter().any(|p| !p.is_finite() || *p != 0.0);
    }
    fn merge(mut self, o: Self) -> Self {
        self.loss += o.loss;
        self.clip_low += o.clip_low;
        self.clip_high += o.clip_high;
        self.dual += o.dual;
        self.ratio_sum += o.ratio_sum;
        self.ratio_min = self.ratio_min.min(o.ratio_min);
        self.ratio_max = self.ratio_max.max(o.ratio_max);
        self.approx_kl += o.approx_kl;
        self.kl += o.kl;
        self.entropy += o.entropy;
        self.poisoned |= o.poisoned;
        self
    }
}

/// One token: (loss, dloss/dnew, clipped low, clipped high, dual active, ratio, kl value).
#[inline(always)]
fn token<const KL: u8>(p: &Params, new: f32, old: f32, reference: f32, a: f32) -> [f32; 7] {
    let diff = new - old;
    let inside = diff.abs() < LOG_RATIO_CLAMP;
    let ratio = exp_fast(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP));
    let l1 = -a * ratio;
    let l2 = -a * ratio.clamp(p.lo, p.hi);
    let clipped = l2 > l1;
    let mut pg = if clipped { l2 } else { l1 };
    // `&` and `|` rather than `&&` and `||`: no branches, so the lanes vectorise.
    let mut dpg = if clipped | !inside { 0.0 } else { l1 };
    let l3 = -a * p.dual;
    let dual = p.dual_on & (a < 0.0) & (pg > l3);
    if dual {
        pg = l3;
        dpg = 0.0;
    }
    let d = reference - new;
    let (kv, kg) = match KL {
        KL_K1 => (-d, 1.0),
        KL_K2 => (0.5 * d * d, -d),
        KL_K3 | KL_K3_PLUS => {
            let dc = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
            let e = exp_fast(dc);
            let v = e - dc - 1.0;
            let g3 = if (d.abs() < LOG_RATIO_CLAMP) & (v <= p.k3_clamp) { 1.0 - e } else { 0.0 };
            (v.min(p.k3_clamp), if KL == KL_K3_PLUS { -d } else { g3 })
        }
        _ => (0.0, 0.0),
    };
    let low = f32::from(u8::from(clipped & (a < 0.0)));
    let high = f32::from(u8::from(clipped & (a > 0.0)));
    [pg + p.beta * kv, dpg + p.beta * kg, low, high, f32::from(u8::from(dual)), ratio, kv]
}

/// The slices of one sequence segment (constant weight `w`).
struct Segment<'a> {
    w: f32,
    new: &'a [f32],
    old: &'a [f32],
    reference: &'a [f32],
    adv: &'a [f32],
    mask: &'a [bool],
}

/// Tokens per block: per-token results go to stack arrays of this size, then into the lanes.
const BLOCK: usize = 64;

/// Per-token results of one block, each summed into its lane accumulator afterwards.
struct Block {
    loss: [f32; BLOCK],
    token_loss: [f32; BLOCK],
    clip_low: [f32; BLOCK],
    clip_high: [f32; BLOCK],
    dual: [f32; BLOCK],
    ratio: [f32; BLOCK],
    ratio_min: [f32; BLOCK],
    ratio_max: [f32; BLOCK],
    approx_kl: [f32; BLOCK],
    kl: [f32; BLOCK],
    poison: [f32; BLOCK],
}

/// Adds `x[..len]` into the eight lanes.
#[inline(always)]
fn reduce_sum(lanes: &mut [f32; LANES], x: &[f32]) {
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for k in 0..LANES {
            lanes[k] += c[k];
        }
    }
    for (k, &v) in it.remainder().iter().enumerate() {
        lanes[k] += v;
    }
}

#[inline(always)]
fn reduce_with(lanes: &mut [f32; LANES], x: &[f32], f: impl Fn(f32, f32) -> f32) {
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for k in 0..LANES {
            lanes[k] = f(lanes[k], c[k]);
        }
    }
    for (k, &v) in it.remainder().iter().enumerate() {
        lanes[k] = f(lanes[k], v);
    }
}

/// The tokens of one segment, in blocks: a straight-line per-token loop writing arrays (which the
/// compiler vectorises), then lane-wise sums of those arrays.
#[allow(clippy::eq_op)]
#[inline(always)]
fn segment<const KL: u8>(
    p: &Params,
    s: &Segment<'_>,
    entropy: Option<&[f32]>,
    grad: &mut [f32],
    mut token_loss: Option<&mut [f32]>,
    lanes: &mut Lanes,
) {
    let n = s.new.len();
    let z = [0.0f32; BLOCK];
    let mut b = Block {
        loss: z,
        token_loss: z,
        clip_low: z,
        clip_high: z,
        dual: z,
        ratio: z,
        ratio_min: z,
        ratio_max: z,
        approx_kl: z,
        kl: z,
        poison: z,
    };
    let mut start = 0;
    while start < n {
        let len = (n - start).min(BLOCK);
        let new = &s.new[start..start + len];
        let old = &s.old[start..start + len];
        let reference = &s.reference[start..start + len];
        let adv = &s.adv[start..start + len];
        let mask = &s.mask[start..start + len];
        let grad = &mut grad[start..start + len];
        for j in 0..len {
            let (nw, od, a) = (new[j], old[j], adv[j]);
            let r = if KL != KL_NONE { reference[j] } else { 0.0 };
            let out = token::<KL>(p, nw, od, r, a);
            let keep = mask[j];
            let m = f32::from(u8::from(keep));
            let mw = m * s.w;
            grad[j] = mw * out[1];
            b.loss[j] = mw * out[0];
            b.token_loss[j] = m * out[0];
            b.clip_low[j] = m * out[2];
            b.clip_high[j] = m * out[3];
            b.dual[j] = m * out[4];
            b.ratio[j] = m * out[5];
            b.ratio_min[j] = if keep { out[5] } else { f32::INFINITY };
            b.ratio_max[j] = if keep { out[5] } else { f32::NEG_INFINITY };
            b.approx_kl[j] = m * (od - nw);
            b.kl[j] = m * out[6];
            // x - x is 0 for finite x and NaN for NaN or infinity (IEEE: the compiler may not fold it).
            b.poison[j] = (nw - nw) + (od - od) + (a - a) + (r - r);
        }
        if let Some(tl) = token_loss.as_deref_mut() {
            tl[start..start + len].copy_from_slice(&b.token_loss[..len]);
        }
        reduce_sum(&mut lanes.loss, &b.loss[..len]);
        reduce_sum(&mut lanes.clip_low, &b.clip_low[..len]);
        reduce_sum(&mut lanes.clip_high, &b.clip_high[..len]);
        reduce_sum(&mut lanes.dual, &b.dual[..len]);
        reduce_sum(&mut lanes.ratio_sum, &b.ratio[..len]);
        reduce_with(&mut lanes.ratio_min, &b.ratio_min[..len], f32::min);
        reduce_with(&mut lanes.ratio_max, &b.ratio_max[..len], f32::max);
        reduce_sum(&mut lanes.approx_kl, &b.approx_kl[..len]);
        reduce_sum(&mut lanes.kl, &b.kl[..len]);
        reduce_sum(&mut lanes.poison, &b.poison[..len]);
        start += len;
    }
    if let Some(e) = entropy {
        for (j, (&e, &m)) in e.iter().zip(s.mask).enumerate() {
            lanes.entropy[j % LANES] += f32::from(u8::from(m)) * e;
            // A NaN entropy (on any token, as for the other inputs) is an error, not a metric.
            lanes.poison[j % LANES] += e - e;
        }
    }
}

/// [`segment`] in its AVX2 + FMA copy where the CPU has those, else the portable one.
#[inline]
fn run_segment<const KL: u8>(
    p: &Params,
    s: &Segment<'_>,
    entropy: Option<&[f32]>,
    grad: &mut [f32],
    token_loss: Option<&mut [f32]>,
    lanes: &mut Lanes,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::math::use_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        unsafe { segment_avx2::<KL>(p, s, entropy, grad, token_loss, lanes) };
        return;
    }
    segment::<KL>(p, s, entropy, grad, token_loss, lanes)
}

/// [`segment`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn segment_avx2<const KL: u8>(
    p: &Params,
    s: &Segment<'_>,
    entropy: Option<&[f32]>,
    grad: &mut [f32],
    token_loss: Option<&mut [f32]>,
    lanes: &mut Lanes,
) {
    segment::<KL>(p, s, entropy, grad, token_loss, lanes)
}

/// The fast policy loss, writing d loss / d new_logp into `grad` (one per token). Returns the loss
/// and the metrics. On error `grad` may hold partial results.
pub fn policy_loss_into(
    inputs: &PolicyLossInputs<'_>,
    config: &PolicyLossConfig,
    grad: &mut [f32],
) -> Result<(f32, Metrics), Error> {
    run(inputs, config, grad, None)
}

/// [`policy_loss_into`] that also writes each token's loss `l_t` before aggregation into
/// `token_loss` (0 on masked tokens; see [`super::PolicyLossOutput::token_loss`]).
pub fn policy_loss_with_token_loss_into(
    inputs: &PolicyLossInputs<'_>,
    config: &PolicyLossConfig,
    grad: &mut [f32],
    token_loss: &mut [f32],
) -> Result<(f32, Metrics), Error> {
    check_len("token_loss", inputs.new_logp.len(), token_loss.len())?;
    run(inputs, config, grad, Some(token_loss))
}

fn run(
    inputs: &PolicyLossInputs<'_>,
    config: &PolicyLossConfig,
    grad: &mut [f32],
    mut token_loss: Option<&mut [f32]>,
) -> Result<(f32, Metrics), Error> {
    validate(inputs, config)?;
    check_len("grad", inputs.new_logp.len(), grad.len())?;
    let cu = inputs.cu_seqlens;
    let counts = seq_counts(inputs.loss_mask, cu);
    let loss_tokens: usize = counts.iter().map(|&n| n as usize).sum();
    let loss_seqs = counts.iter().filter(|&&n| n > 0).count();
    let tok_den = config.denominators.tokens.unwrap_or(loss_tokens as f64);
    let seq_den = config.denominators.seqs.unwrap_or(loss_seqs as f64);
    let weight = |s: usize| -> f32 {
        let n_s = f64::from(counts[s]);
        if n_s == 0.0 {
            return 0.0;
        }
        let w = match config.aggregation {
            Aggregation::TokenMean => 1.0 / tok_den,
            Aggregation::TokenSum => 1.0,
            Aggregation::SeqMeanTokenSum => 1.0 / seq_den,
            Aggregation::SeqMeanTokenMean => 1.0 / (n_s * seq_den),
            Aggregation::SeqMeanTokenSumNorm { budget } => 1.0 / (f64::from(budget) * seq_den),
        };
        w as f32
    };
    let kl = config.kl;
    let params = Params {
        lo: 1.0 - config.clip_low,
        hi: 1.0 + config.clip_high,
        dual: config.dual_clip.unwrap_or(f32::INFINITY),
        dual_on: config.dual_clip.is_some(),
        beta: kl.map_or(0.0, |k| k.beta),
        k3_clamp: kl.and_then(|k| k.k3_clamp).unwrap_or(f32::INFINITY),
    };
    let reference = inputs.ref_logp.unwrap_or(inputs.new_logp);
    // Token-loss chunks beside the gradient chunks (None for every chunk when not asked for).
    let n_chunks = grad.len().div_ceil(TOKEN_CHUNK);
    let tl_chunks = match token_loss.as_deref_mut() {
        Some(tl) => Either::Left(tl.par_chunks_mut(TOKEN_CHUNK).map(Some)),
        None => Either::Right((0..n_chunks).into_par_iter().map(|_| None)),
    };
    let totals = grad
        .par_chunks_mut(TOKEN_CHUNK)
        .zip(tl_chunks)
        .enumerate()
        .map(|(c, (grad, mut tl))| {
            let start = c * TOKEN_CHUNK;
            let end = start + grad.len();
            let mut totals = Totals::empty();
            let mut s = seq_of_token(cu, start);
            let mut t = start;
            while t < end {
                while cu[s + 1] as usize <= t {
                    s += 1;
                }
                let seg_end = (cu[s + 1] as usize).min(end);
                let r = t..seg_end;
                let mut lanes = Lanes::new();
                let ent = inputs.entropy.map(|e| &e[r.clone()]);
                let g = &mut grad[t - start..seg_end - start];
                let tl = tl.as_deref_mut().map(|tl| &mut tl[t - start..seg_end - start]);
                let seg = Segment {
                    w: weight(s),
                    new: &inputs.new_logp[r.clone()],
                    old: &inputs.old_logp[r.clone()],
                    reference: &reference[r.clone()],
                    adv: &inputs.advantages[r.clone()],
                    mask: &inputs.loss_mask[r],
                };
                // One instantiation per estimator: no branch on it inside the token loop.
                match kl.map(|k| k.estimator) {
                    None => run_segment::<KL_NONE>(&params, &seg, ent, g, tl, &mut lanes),
                    Some(KlEstimator::K1) => run_segment::<KL_K1>(&params, &seg, ent, g, tl, &mut lanes),
                    Some(KlEstimator::K2) => run_segment::<KL_K2>(&params, &seg, ent, g, tl, &mut lanes),
                    Some(KlEstimator::K3) => run_segment::<KL_K3>(&params, &seg, ent, g, tl, &mut lanes),
                    Some(KlEstimator::K3Plus) => run_segment::<KL_K3_PLUS>(&params, &seg, ent, g, tl, &mut lanes),
                }
                totals.add_lanes(&lanes);
                t = seg_end;
            }
            totals
        })
        .reduce(Totals::empty, Totals::merge);
    if totals.poisoned {
        find_non_finite(inputs)?;
    }
    let n = loss_tokens.max(1) as f64;
    let metrics = Metrics {
        clip_frac_low: (totals.clip_low / n) as f32,
        clip_frac_high: (totals.clip_high / n) as f32,
        dual_clip_frac: (totals.dual / n) as f32,
        approx_kl: (totals.approx_kl / n) as f32,
        kl: kl.map(|_| (totals.kl / n) as f32),
        entropy: inputs.entropy.map(|_| (totals.entropy / n) as f32),
        ratio_min: if loss_tokens > 0 { totals.ratio_min } else { 0.0 },
        ratio_mean: (totals.ratio_sum / n) as f32,
        ratio_max: if loss_tokens > 0 { totals.ratio_max } else { 0.0 },
        loss_tokens,
        loss_seqs,
    };
    // Finite inputs can still overflow f32 (advantages near f32::MAX, a denominator near 0): a
    // typed error rather than an infinite or NaN loss, gradient or metric.
    let loss = totals.loss as f32;
    let m = &metrics;
    let scalars = [loss, m.approx_kl, m.kl.unwrap_or(0.0), m.entropy.unwrap_or(0.0), m.ratio_mean];
    if let Some(i) = scalars.iter().position(|v| !v.is_finite()) {
        const NAMES: [&str; 5] = ["loss", "approx_kl metric", "kl metric", "entropy metric", "ratio_mean metric"];
        return Err(Error::NonFinite { what: NAMES[i], index: 0, value: scalars[i] });
    }
    check_finite("grad_new_logp (overflowed)", grad)?;
    if let Some(tl) = token_loss {
        check_finite("token_loss (overflowed)", tl)?;
    }
    Ok((loss, metrics))
}
