//! `optim`: the RL objective's memory-bound passes, ours (fused, one pass) against the same math
//! unfused, as an eager framework runs it (one rayon-parallel pass per elementwise op, every
//! intermediate materialised, then the backward from those intermediates). Both sides use the same
//! `exp` ([`squid_optim::math::exp_fast`]) and, where the CPU has them, AVX2 + FMA copies of their
//! inner loops, so the ratio measures fusion (memory traffic), not libm or instruction sets.
//!
//! - `policy_loss`: PPO clip (0.2/0.28) + k3 KL (beta 0.04), token-mean, forward + gradient with
//!   respect to the new log-probs. Bytes: 4 f32 inputs + 1 mask byte read, 1 f32 written per token.
//! - `logprob`: log-softmax + gather + entropy forward and the backward to the logits, f32 logits.
//!   Bytes: logits read twice (forward, backward), gradient written once. The baseline writes the
//!   full log-softmax `[tokens, vocab]`, reads it for the entropy and again in the backward.
//! - `adamw`: one step over f32 parameters in 8 tensors. Bytes: p, g, m, v read; p, m, v written.
//!   The baseline is torch's multi-tensor (foreach, not fused) AdamW: decay, m, v, denominator and
//!   update as five passes with a temporary denominator.
//!
//! Inputs are built on a case's first call and dropped with the case, so only one case's buffers
//! are alive at a time.

use std::cell::RefCell;
use std::rc::Rc;

use rayon::prelude::*;
use squid_optim::logprob::{logprobs_backward, logprobs_into, LogprobOutput};
use squid_optim::math::exp_fast;
use squid_optim::policy_loss::{
    policy_loss_into, Aggregation, KlEstimator, KlPenalty, PolicyLossConfig, PolicyLossInputs,
};
use squid_optim::{AdamW, AdamWConfig};

use crate::harness::{Case, Runner, Work};

fn filled(len: usize, seed: u32, lo: f32, hi: f32) -> Vec<f32> {
    (0..len)
        .into_par_iter()
        .map(|i| {
            let u = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 8) as f32
                / (1 << 24) as f32;
            lo + (hi - lo) * u
        })
        .collect()
}

/// Inputs shared by ours and the baseline, built lazily by whichever runs first.
type Shared<T> = Rc<RefCell<Option<T>>>;

fn lazy<T>(shared: &Shared<T>, build: impl FnOnce() -> T) {
    if shared.borrow().is_none() {
        *shared.borrow_mut() = Some(build());
    }
}

struct LossData {
    new: Vec<f32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<bool>,
    /// The mask as the f32 tensor eager code holds.
    mask_f32: Vec<f32>,
    cu: Vec<u32>,
    grad: Vec<f32>,
    /// The baseline's intermediate tensors.
    scratch: [Vec<f32>; 15],
}

fn loss_data(tokens: usize) -> LossData {
    let seq = 1000;
    let cu: Vec<u32> = (0..=tokens.div_ceil(seq)).map(|s| (s * seq).min(tokens) as u32).collect();
    let new = filled(tokens, 1, -4.0, 0.0);
    let old = new.par_iter().zip(filled(tokens, 2, -0.4, 0.4)).map(|(n, d)| n + d).collect();
    let reference = new.par_iter().zip(filled(tokens, 3, -0.4, 0.4)).map(|(n, d)| n + d).collect();
    let adv = filled(tokens, 4, -2.0, 2.0);
    // The first 200 tokens of every sequence are prompt / tool output.
    let mask: Vec<bool> = (0..tokens).map(|t| t % seq >= 200).collect();
    let mask_f32 = mask.iter().map(|&m| f32::from(u8::from(m))).collect();
    let scratch = std::array::from_fn(|_| vec![0.0f32; tokens]);
    LossData { new, old, reference, adv, mask, mask_f32, cu, grad: vec![0.0; tokens], scratch }
}

fn loss_config() -> PolicyLossConfig {
    PolicyLossConfig {
        clip_low: 0.2,
        clip_high: 0.28,
        kl: Some(KlPenalty { estimator: KlEstimator::K3, beta: 0.04, k3_clamp: None }),
        aggregation: Aggregation::TokenMean,
        ..Default::default()
    }
}

/// Whether the baselines may use their AVX2 + FMA copies (as ours does), so that the ratio
/// measures fusion, not instruction sets.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

const EW_CHUNK: usize = 16 * 1024;

#[inline(always)]
fn ew_chunk<F: Fn(f32, f32, f32) -> f32>(a: &[f32], b: &[f32], c: &[f32], out: &mut [f32], f: &F) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f(a[i], b[i], c[i]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn ew_chunk_avx2<F: Fn(f32, f32, f32) -> f32>(a: &[f32], b: &[f32], c: &[f32], out: &mut [f32], f: &F) {
    ew_chunk(a, b, c, out, f)
}

/// One eager elementwise op `out = f(a, b, c)` into a preallocated tensor (a caching allocator's
/// reuse), rayon over chunks, vectorised.
fn ew<F: Fn(f32, f32, f32) -> f32 + Sync>(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: F) {
    let wide = avx2();
    out.par_chunks_mut(EW_CHUNK).enumerate().for_each(|(k, o)| {
        let r = k * EW_CHUNK..k * EW_CHUNK + o.len();
        let (a, b, c) = (&a[r.clone()], &b[r.clone()], &c[r]);
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { ew_chunk_avx2(a, b, c, o, &f) };
            return;
        }
        let _ = wide;
        ew_chunk(a, b, c, o, &f);
    });
}

/// A parallel sum (eight lanes per chunk, f64 across chunks).
fn par_sum(x: &[f32]) -> f64 {
    x.par_chunks(EW_CHUNK).map(|c| f64::from(lane_sum(c))).sum()
}

/// The same loss and gradient, eager style: one parallel pass per op, every intermediate a
/// tensor (preallocated once, as a caching allocator would), then the backward from them.
fn unfused_policy_loss(d: &LossData, t: &mut [Vec<f32>; 15], beta: f32, lo: f32, hi: f32) -> f32 {
    let [log_ratio, ratio, clipped, pg1, pg2, pg, delta, e_delta, kl, per_token, masked, g_tok, g_ratio, g_kl, grad] =
        t;
    let (new, old, adv, rf, mask) = (&d.new[..], &d.old[..], &d.adv[..], &d.reference[..], &d.mask_f32[..]);
    ew(log_ratio, new, old, old, |n, o, _| (n - o).clamp(-20.0, 20.0));
    ew(ratio, log_ratio, log_ratio, log_ratio, |x, _, _| exp_fast(x));
    ew(clipped, ratio, ratio, ratio, |r, _, _| r.clamp(lo, hi));
    ew(pg1, adv, ratio, ratio, |a, r, _| -a * r);
    ew(pg2, adv, clipped, clipped, |a, r, _| -a * r);
    ew(pg, pg1, pg2, pg2, |x, y, _| x.max(y));
    ew(delta, rf, new, new, |r, n, _| (r - n).clamp(-20.0, 20.0));
    ew(e_delta, delta, delta, delta, |x, _, _| exp_fast(x));
    ew(kl, e_delta, delta, delta, |e, x, _| e - x - 1.0);
    ew(per_token, pg, kl, kl, |p, k, _| p + beta * k);
    ew(masked, per_token, mask, mask, |l, m, _| l * m);
    let n = par_sum(mask) as f32;
    let loss = (par_sum(masked) / f64::from(n)) as f32;
    // Backward.
    ew(g_tok, mask, mask, mask, |m, _, _| m / n);
    ew(g_ratio, pg1, pg2, g_tok, |p1, p2, g| if p1 >= p2 { g } else { 0.0 });
    let g_new_pg = clipped; // free again: reuse its buffer
    ew(g_new_pg, g_ratio, adv, ratio, |g, a, r| -a * g * r);
    ew(g_kl, g_tok, e_delta, e_delta, |g, e, _| g * beta * (1.0 - e));
    ew(grad, g_new_pg, g_kl, g_kl, |a, b, _| a + b);
    loss
}

struct LogitData {
    vocab: usize,
    logits: Vec<f32>,
    targets: Vec<u32>,
    g: Vec<f32>,
    h: Vec<f32>,
    fwd: LogprobOutput,
    grad: Vec<f32>,
}

fn logit_data(tokens: usize, vocab: usize) -> LogitData {
    LogitData {
        vocab,
        logits: filled(tokens * vocab, 5, -8.0, 8.0),
        targets: (0..tokens).map(|t| ((t * 7919) % vocab) as u32).collect(),
        g: filled(tokens, 6, -1.0, 1.0),
        h: filled(tokens, 7, -0.1, 0.1),
        fwd: LogprobOutput::default(),
        grad: vec![0.0; tokens * vocab],
    }
}

/// Eight-lane sum (vectorises, like any real softmax kernel's reductions).
fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            lanes[k] += c[k];
        }
    }
    it.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

/// Eight-lane max.
fn lane_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            lanes[k] = lanes[k].max(c[k]);
        }
    }
    it.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Forward of one row, eager style: `logp = log_softmax(x)` written out, entropy from it.
#[inline(always)]
fn unfused_row(row: &[f32], out: &mut [f32], scratch: &mut [f32], y: usize) -> (f32, f32) {
    let m = lane_max(row);
    for (o, &x) in out.iter_mut().zip(row) {
        *o = exp_fast(x - m);
    }
    let lse = m + lane_sum(out).ln();
    for (o, &x) in out.iter_mut().zip(row) {
        *o = x - lse;
    }
    for (s, &l) in scratch.iter_mut().zip(out.iter()) {
        *s = exp_fast(l) * l;
    }
    (out[y], -lane_sum(scratch))
}

/// Backward of one row from the stored `logp`.
#[inline(always)]
fn unfused_row_bwd(lp: &[f32], dx: &mut [f32], y: usize, g: f32, h: f32, ent: f32) {
    for (o, &l) in dx.iter_mut().zip(lp) {
        let p = exp_fast(l);
        *o = -g * p - h * p * (l + ent);
    }
    dx[y] += g;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unfused_row_avx2(row: &[f32], out: &mut [f32], scratch: &mut [f32], y: usize) -> (f32, f32) {
    unfused_row(row, out, scratch, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unfused_row_bwd_avx2(lp: &[f32], dx: &mut [f32], y: usize, g: f32, h: f32, ent: f32) {
    unfused_row_bwd(lp, dx, y, g, h, ent)
}

/// Unfused, as eager code runs it: `logp = log_softmax(x)` materialised `[T, V]` (max, exp-sum,
/// subtract), `logp.gather(y)`, `entropy = -(exp(logp) * logp).sum(-1)`, and the backward from
/// the stored `logp`. Rows in parallel, vectorised inner loops (AVX2 where ours uses it).
fn unfused_logprob(d: &LogitData, logp_full: &mut [f32], grad: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    let v = d.vocab;
    let wide = avx2();
    let (logp, entropy): (Vec<f32>, Vec<f32>) = logp_full
        .par_chunks_mut(v)
        .zip(d.logits.par_chunks(v))
        .zip(&d.targets)
        .map_init(
            || vec![0.0f32; v],
            |scratch, ((out, row), &y)| {
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: AVX2 and FMA were detected at run time.
                    return unsafe { unfused_row_avx2(row, out, scratch, y as usize) };
                }
                unfused_row(row, out, scratch, y as usize)
            },
        )
        .unzip();
    grad.par_chunks_mut(v).zip(logp_full.par_chunks(v)).enumerate().for_each(|(t, (dx, lp))| {
        let (g, h, ent, y) = (d.g[t], d.h[t], entropy[t], d.targets[t] as usize);
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { unfused_row_bwd_avx2(lp, dx, y, g, h, ent) };
            return;
        }
        unfused_row_bwd(lp, dx, y, g, h, ent);
    });
    (logp, entropy)
}

struct AdamData {
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    opt: AdamW,
    // Baseline state.
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    denom: Vec<Vec<f32>>,
    step: i32,
}

fn adam_data(total: usize, tensors: usize) -> AdamData {
    let sizes: Vec<usize> = (0..tensors).map(|i| total / tensors + if i == 0 { total % tensors } else { 0 }).collect();
    let params: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| filled(n, 10 + i as u32, -0.1, 0.1)).collect();
    let grads = sizes.iter().enumerate().map(|(i, &n)| filled(n, 30 + i as u32, -0.01, 0.01)).collect();
    let views: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
    let opt = AdamW::new(AdamWConfig::default(), &views).expect("valid config");
    let zeros = || sizes.iter().map(|&n| vec![0.0f32; n]).collect::<Vec<_>>();
    AdamData { m: zeros(), v: zeros(), denom: zeros(), params, grads, opt, step: 0 }
}

/// torch `_multi_tensor_adamw` (foreach, unfused): five passes per tensor.
fn foreach_adamw(d: &mut AdamData, lr: f32) {
    let c = AdamWConfig::default();
    d.step += 1;
    let bc1 = 1.0 - c.beta1.powi(d.step);
    let inv_bc2 = 1.0 / (1.0 - c.beta2.powi(d.step)).sqrt();
    let step_size = lr / bc1;
    let decay = 1.0 - lr * c.weight_decay;
    for i in 0..d.params.len() {
        let (p, g, m, v, den) = (&mut d.params[i], &d.grads[i], &mut d.m[i], &mut d.v[i], &mut d.denom[i]);
        p.par_iter_mut().for_each(|x| *x *= decay);
        m.par_iter_mut().zip(g).for_each(|(m, &g)| *m = c.beta1 * *m + (1.0 - c.beta1) * g);
        v.par_iter_mut().zip(g).for_each(|(v, &g)| *v = c.beta2 * *v + (1.0 - c.beta2) * g * g);
        den.par_iter_mut().zip(&*v).for_each(|(d, &v)| *d = v.sqrt() * inv_bc2 + c.eps);
        p.par_iter_mut().zip(&*m).zip(&*den).for_each(|((p, &m), &d)| *p -= step_size * m / d);
    }
}

/// The cases; `quick` shrinks the sizes.
pub fn cases(quick: bool) -> Vec<Case> {
    let tokens = if quick { 1 << 18 } else { 1 << 20 };
    let (lp_tokens, vocab) = if quick { (1024, 32_000) } else { (8192, 32_000) };
    let adam_params = if quick { 10_000_000 } else { 100_000_000 };

    let loss: Shared<LossData> = Rc::new(RefCell::new(None));
    let (a, b) = (loss.clone(), loss);
    let cfg = loss_config();
    let ours: Runner = Box::new(move || {
        lazy(&a, || loss_data(tokens));
        let mut guard = a.borrow_mut();
        let d = guard.as_mut().expect("built");
        let x = PolicyLossInputs {
            new_logp: &d.new,
            old_logp: &d.old,
            ref_logp: Some(&d.reference),
            advantages: &d.adv,
            loss_mask: &d.mask,
            cu_seqlens: &d.cu,
            entropy: None,
        };
        let out = policy_loss_into(&x, &cfg, &mut d.grad).expect("valid inputs");
        std::hint::black_box(out);
    });
    let base: Runner = Box::new(move || {
        lazy(&b, || loss_data(tokens));
        let mut guard = b.borrow_mut();
        let d = guard.as_mut().expect("built");
        let mut scratch = std::mem::take(&mut d.scratch);
        std::hint::black_box(unfused_policy_loss(d, &mut scratch, 0.04, 0.8, 1.28));
        d.scratch = scratch;
    });
    let policy = Case {
        suite: "optim",
        case: "policy_loss".into(),
        params: format!("tokens={tokens} clip+k3 token-mean"),
        baseline: "same math unfused: one rayon pass per op, intermediates materialised",
        ours,
        base,
        work: Work::Bytes(tokens as f64 * 21.0),
    };

    let logits: Shared<(LogitData, Vec<f32>, Vec<f32>)> = Rc::new(RefCell::new(None));
    let (a, b) = (logits.clone(), logits);
    let build = move || {
        let d = logit_data(lp_tokens, vocab);
        let n = d.logits.len();
        (d, vec![0.0f32; n], vec![0.0f32; n])
    };
    let build2 = build;
    let ours: Runner = Box::new(move || {
        lazy(&a, build);
        let mut guard = a.borrow_mut();
        let (d, _, _) = guard.as_mut().expect("built");
        let mut fwd = std::mem::take(&mut d.fwd);
        logprobs_into(&d.logits, d.vocab, &d.targets, &mut fwd).expect("valid logits");
        logprobs_backward(&d.logits, d.vocab, &d.targets, &fwd, &d.g, Some(&d.h), &mut d.grad).expect("valid");
        d.fwd = fwd;
    });
    let base: Runner = Box::new(move || {
        lazy(&b, build2);
        let mut guard = b.borrow_mut();
        let (d, logp_full, grad) = guard.as_mut().expect("built");
        std::hint::black_box(unfused_logprob(d, logp_full, grad));
    });
    let logprob = Case {
        suite: "optim",
        case: "logprob_fwd_bwd".into(),
        params: format!("tokens={lp_tokens} vocab={vocab} f32"),
        baseline: "unfused: log-softmax [T,V] materialised, entropy and backward read it",
        ours,
        base,
        work: Work::Bytes((lp_tokens * vocab) as f64 * 12.0),
    };

    let adam: Shared<AdamData> = Rc::new(RefCell::new(None));
    let (a, b) = (adam.clone(), adam);
    let ours: Runner = Box::new(move || {
        lazy(&a, || adam_data(adam_params, 8));
        let mut guard = a.borrow_mut();
        let d = guard.as_mut().expect("built");
        let grads: Vec<&[f32]> = d.grads.iter().map(|g| g.as_slice()).collect();
        let mut params: Vec<&mut [f32]> = d.params.iter_mut().map(|p| p.as_mut_slice()).collect();
        std::hint::black_box(d.opt.step(&mut params, &grads, 1e-5).expect("finite"));
    });
    let base: Runner = Box::new(move || {
        lazy(&b, || adam_data(adam_params, 8));
        let mut guard = b.borrow_mut();
        foreach_adamw(guard.as_mut().expect("built"), 1e-5);
    });
    let adamw = Case {
        suite: "optim",
        case: "adamw".into(),
        params: format!("params={adam_params} tensors=8 f32"),
        baseline: "torch foreach AdamW: 5 rayon passes per tensor, temp denominator",
        ours,
        base,
        work: Work::Bytes(adam_params as f64 * 28.0),
    };
    vec![policy, logprob, adamw]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The baselines compute what ours computes (so the ratios compare equal work).
    #[test]
    fn baselines_agree_with_ours() {
        let mut d = loss_data(5_000);
        let x = PolicyLossInputs {
            new_logp: &d.new,
            old_logp: &d.old,
            ref_logp: Some(&d.reference),
            advantages: &d.adv,
            loss_mask: &d.mask,
            cu_seqlens: &d.cu,
            entropy: None,
        };
        let mut grad = vec![0.0f32; 5_000];
        let (loss, _) = policy_loss_into(&x, &loss_config(), &mut grad).unwrap();
        let mut scratch = std::mem::take(&mut d.scratch);
        let base_loss = unfused_policy_loss(&d, &mut scratch, 0.04, 0.8, 1.28);
        assert!((loss - base_loss).abs() < 1e-5 * (1.0 + loss.abs()), "{loss} vs {base_loss}");
        for (a, b) in grad.iter().zip(&scratch[14]) {
            assert!((a - b).abs() < 1e-9 + 1e-5 * a.abs(), "{a} vs {b}");
        }

        let mut l = logit_data(3, 1000);
        let mut fwd = LogprobOutput::default();
        logprobs_into(&l.logits, l.vocab, &l.targets, &mut fwd).unwrap();
        logprobs_backward(&l.logits, l.vocab, &l.targets, &fwd, &l.g, Some(&l.h), &mut l.grad).unwrap();
        let (mut full, mut grad) = (vec![0.0f32; 3000], vec![0.0f32; 3000]);
        let (logp, ent) = unfused_logprob(&l, &mut full, &mut grad);
        for t in 0..3 {
            assert!((logp[t] - fwd.logp[t]).abs() < 1e-5 && (ent[t] - fwd.entropy[t]).abs() < 1e-5);
        }
        for (a, b) in grad.iter().zip(&l.grad) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }

        let mut a = adam_data(1_000, 3);
        for _ in 0..3 {
            let grads: Vec<&[f32]> = a.grads.iter().map(|g| g.as_slice()).collect();
            let mut params: Vec<Vec<f32>> = a.params.clone();
            let mut views: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
            a.opt.step(&mut views, &grads, 1e-3).unwrap();
            let ours = params;
            foreach_adamw(&mut a, 1e-3);
            for (o, b) in ours.iter().zip(&a.params) {
                for (x, y) in o.iter().zip(b) {
                    assert!((x - y).abs() < 1e-6, "{x} vs {y}");
                }
            }
        }
    }
}
