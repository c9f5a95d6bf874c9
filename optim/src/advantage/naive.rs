//! The estimators written literally from their definitions, in f64, one sample at a time (RLOO
//! sums the other samples explicitly). Slow; the reference the fast path is tested against.

use super::{AdvantageConfig, Estimator, SingletonPolicy, StdScope};
use crate::Error;

fn finite_members(rewards: &[f32], group: &[usize]) -> Vec<f64> {
    group.iter().map(|&i| rewards[i]).filter(|r| r.is_finite()).map(f64::from).collect()
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn std(x: &[f64], unbiased: bool) -> f64 {
    let m = mean(x);
    let dof = if unbiased { x.len() - 1 } else { x.len() };
    (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / dof as f64).sqrt()
}

/// Per-sample advantages, by definition. `members` lists each group's samples.
pub fn sample_advantages(rewards: &[f32], members: &[Vec<usize>], config: &AdvantageConfig) -> Result<Vec<f64>, Error> {
    let mut out = vec![0.0f64; rewards.len()];
    for (group, idx) in members.iter().enumerate() {
        let vals = finite_members(rewards, idx);
        if vals.is_empty() {
            continue;
        }
        if vals.len() == 1 {
            match config.singleton {
                SingletonPolicy::Error => return Err(Error::SingletonGroup { group }),
                SingletonPolicy::Zero => {}
                SingletonPolicy::RawScore => idx.iter().filter(|&&i| rewards[i].is_finite()).for_each(|&i| {
                    out[i] = f64::from(rewards[i]);
                }),
            }
            continue;
        }
        if vals.iter().all(|&v| v == vals[0]) {
            continue;
        }
        for &i in idx {
            if !rewards[i].is_finite() {
                continue;
            }
            let r = f64::from(rewards[i]);
            out[i] = match config.estimator {
                Estimator::Grpo(g) => {
                    let centred = r - mean(&vals);
                    match g.scope {
                        StdScope::None => centred,
                        StdScope::Group => centred / (std(&vals, g.unbiased_std) + f64::from(g.eps)),
                        StdScope::Batch => {
                            let all: Vec<f64> =
                                rewards.iter().filter(|r| r.is_finite()).map(|&r| f64::from(r)).collect();
                            centred / (std(&all, g.unbiased_std) + f64::from(g.eps))
                        }
                    }
                }
                Estimator::Rloo => {
                    // Leave-one-out: the mean of every *other* finite sample of the group.
                    let others: Vec<f64> = idx
                        .iter()
                        .filter(|&&j| j != i && rewards[j].is_finite())
                        .map(|&j| f64::from(rewards[j]))
                        .collect();
                    r - mean(&others)
                }
            };
        }
    }
    Ok(out)
}

/// REINFORCE++ returns and whitening, token by token, by definition: the return of loss token t
/// is its reward plus gamma times the return of the next loss token of the sequence plus the
/// rewards of the masked tokens in between.
pub fn reinforce_pp(token_rewards: &[f32], cu_seqlens: &[u32], mask: &[bool], gamma: f32, eps: f32) -> Vec<f64> {
    let mut returns = vec![0.0f64; token_rewards.len()];
    for w in cu_seqlens.windows(2) {
        let (start, end) = (w[0] as usize, w[1] as usize);
        for t in start..end {
            if !mask[t] {
                continue;
            }
            // Sum over later tokens u: r_u * gamma^(number of loss tokens in (t, u], excluding u if masked).
            let mut g = f64::from(token_rewards[t]);
            let mut steps = 0i32;
            for u in t + 1..end {
                if mask[u] {
                    steps += 1;
                    g += f64::from(gamma).powi(steps) * f64::from(token_rewards[u]);
                } else {
                    g += f64::from(gamma).powi(steps + 1) * f64::from(token_rewards[u]);
                }
            }
            returns[t] = g;
        }
    }
    whiten(&returns, mask, eps)
}

/// `(x - mean) / sqrt(var_unbiased + eps)` over masked entries; all 0 when they are all equal.
pub fn whiten(x: &[f64], mask: &[bool], eps: f32) -> Vec<f64> {
    let vals: Vec<f64> = x.iter().zip(mask).filter(|(_, &m)| m).map(|(&v, _)| v).collect();
    if vals.iter().all(|&v| v == vals[0]) {
        return vec![0.0; x.len()];
    }
    let m = mean(&vals);
    let var = vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (vals.len() - 1) as f64;
    x.iter().zip(mask).map(|(&v, &k)| if k { (v - m) / (var + f64::from(eps)).sqrt() } else { 0.0 }).collect()
}
