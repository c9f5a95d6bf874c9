//! The fast path: one pass per group with f64 sums; token loops split over rayon.

use rayon::prelude::*;

use super::{AdvantageConfig, Estimator, GroupStats, SingletonPolicy, StdScope, WhitenConfig};
use crate::seqs::{seq_of_token, TOKEN_CHUNK};
use crate::Error;

/// Mean and sum of squared deviations of the finite rewards among `idx`, with their count.
fn stats(rewards: &[f32], idx: &[usize]) -> (usize, f64, f64) {
    let (mut n, mut sum) = (0usize, 0.0f64);
    for &i in idx {
        if rewards[i].is_finite() {
            n += 1;
            sum += f64::from(rewards[i]);
        }
    }
    if n == 0 {
        return (0, 0.0, 0.0);
    }
    let mean = sum / n as f64;
    let ss = idx.iter().filter(|&&i| rewards[i].is_finite()).map(|&i| (f64::from(rewards[i]) - mean).powi(2)).sum();
    (n, mean, ss)
}

fn std_from(n: usize, ss: f64, unbiased: bool) -> f64 {
    let dof = if unbiased { n.saturating_sub(1) } else { n };
    if dof == 0 {
        0.0
    } else {
        (ss / dof as f64).sqrt()
    }
}

pub(super) fn sample_advantages(
    rewards: &[f32],
    members: &[Vec<usize>],
    config: &AdvantageConfig,
) -> Result<(Vec<f32>, Vec<GroupStats>), Error> {
    let mut out = vec![0.0f32; rewards.len()];
    let mut group_stats = Vec::with_capacity(members.len());
    let unbiased = match config.estimator {
        Estimator::Grpo(g) => g.unbiased_std,
        Estimator::Rloo => true,
    };
    let batch_std = match config.estimator {
        Estimator::Grpo(g) if g.scope == StdScope::Batch => {
            let all: Vec<usize> = (0..rewards.len()).collect();
            let (n, _, ss) = stats(rewards, &all);
            Some(std_from(n, ss, g.unbiased_std))
        }
        _ => None,
    };
    for (group, idx) in members.iter().enumerate() {
        let (n, mean, ss) = stats(rewards, idx);
        let std = match (config.estimator, batch_std) {
            (Estimator::Grpo(_), Some(b)) => b,
            _ => std_from(n, ss, unbiased),
        };
        group_stats.push(GroupStats { count: n, mean, std });
        if n == 0 {
            continue; // every reward ignored: nothing to learn from
        }
        if n == 1 {
            match config.singleton {
                SingletonPolicy::Error => return Err(Error::SingletonGroup { group }),
                SingletonPolicy::Zero => {}
                SingletonPolicy::RawScore => {
                    for &i in idx.iter().filter(|&&i| rewards[i].is_finite()) {
                        out[i] = rewards[i];
                    }
                }
            }
            continue;
        }
        let first = idx.iter().map(|&i| rewards[i]).find(|r| r.is_finite());
        if idx.iter().map(|&i| rewards[i]).filter(|r| r.is_finite()).all(|r| Some(r) == first) {
            continue; // all equal: exactly 0 (ss may be a rounding residue, not 0)
        }
        let (shift, scale) = match config.estimator {
            Estimator::Grpo(g) => {
                let std = match g.scope {
                    StdScope::None => None,
                    StdScope::Group => Some(std_from(n, ss, g.unbiased_std)),
                    StdScope::Batch => batch_std,
                };
                (mean, std.map_or(1.0, |s| 1.0 / (s + f64::from(g.eps))))
            }
            // r_i - (sum - r_i) / (n - 1) = n / (n - 1) * (r_i - mean)
            Estimator::Rloo => (mean, n as f64 / (n - 1) as f64),
        };
        for &i in idx.iter().filter(|&&i| rewards[i].is_finite()) {
            out[i] = ((f64::from(rewards[i]) - shift) * scale) as f32;
        }
    }
    // Rewards near f32::MAX can give advantages beyond it (RLOO scales by n / (n - 1)).
    crate::check_finite("computed advantage", &out)?;
    Ok((out, group_stats))
}

/// `out[t] = per_seq[seq of t]` where the mask is set, else 0; chunks of tokens in parallel.
pub(super) fn broadcast(per_seq: &[f32], cu_seqlens: &[u32], mask: &[bool]) -> Vec<f32> {
    let mut out = vec![0.0f32; mask.len()];
    out.par_chunks_mut(TOKEN_CHUNK).zip(mask.par_chunks(TOKEN_CHUNK)).enumerate().for_each(|(c, (out, mask))| {
        let start = c * TOKEN_CHUNK;
        let mut s = seq_of_token(cu_seqlens, start);
        for (j, (o, &m)) in out.iter_mut().zip(mask).enumerate() {
            while cu_seqlens[s + 1] as usize <= start + j {
                s += 1;
            }
            *o = if m { per_seq[s] } else { 0.0 };
        }
    });
    out
}

/// Discounted returns per sequence, backwards; see [`super::reinforce_pp`] for the masked-token rule.
pub(super) fn discounted_returns(rewards: &[f32], cu_seqlens: &[u32], mask: &[bool], gamma: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; rewards.len()];
    // Split the output at sequence boundaries so sequences run in parallel.
    let mut pieces = Vec::with_capacity(cu_seqlens.len());
    let mut rest = out.as_mut_slice();
    for w in cu_seqlens.windows(2) {
        let (head, tail) = rest.split_at_mut((w[1] - w[0]) as usize);
        pieces.push((w[0] as usize, head));
        rest = tail;
    }
    pieces.into_par_iter().for_each(|(start, out)| {
        let mut running = 0.0f64;
        for j in (0..out.len()).rev() {
            let t = start + j;
            if mask[t] {
                running = f64::from(rewards[t]) + f64::from(gamma) * running;
                out[j] = running as f32;
            } else {
                running += f64::from(rewards[t]);
            }
        }
    });
    out
}

/// `(x - mean) / sqrt(var + eps)` over masked tokens (var unbiased), 0 elsewhere; 0 everywhere when
/// every masked value is equal.
pub(super) fn whiten(x: &[f32], mask: &[bool], config: WhitenConfig) -> Result<Vec<f32>, Error> {
    let (n, sum, _first, all_equal) = x
        .par_chunks(TOKEN_CHUNK)
        .zip(mask.par_chunks(TOKEN_CHUNK))
        .map(|(x, m)| {
            let mut acc = (0usize, 0.0f64, f32::NAN, true);
            for (&v, &keep) in x.iter().zip(m) {
                if keep {
                    if acc.0 == 0 {
                        acc.2 = v;
                    }
                    acc.3 &= v == acc.2;
                    acc.0 += 1;
                    acc.1 += f64::from(v);
                }
            }
            acc
        })
        .reduce(
            || (0, 0.0, f32::NAN, true),
            |a, b| {
                let first = if a.0 > 0 { a.2 } else { b.2 };
                let equal = a.3 && b.3 && (a.0 == 0 || b.0 == 0 || a.2 == b.2);
                (a.0 + b.0, a.1 + b.1, first, equal)
            },
        );
    if n < 2 {
        return Err(Error::TooFewTokens(n));
    }
    if all_equal {
        return Ok(vec![0.0; x.len()]);
    }
    let mean = sum / n as f64;
    let ss: f64 = x
        .par_chunks(TOKEN_CHUNK)
        .zip(mask.par_chunks(TOKEN_CHUNK))
        .map(|(x, m)| x.iter().zip(m).filter(|(_, &k)| k).map(|(&v, _)| (f64::from(v) - mean).powi(2)).sum::<f64>())
        .sum();
    let inv = 1.0 / (ss / (n - 1) as f64 + f64::from(config.eps)).sqrt();
    let out: Vec<f32> = x
        .par_iter()
        .zip(mask.par_iter())
        .map(|(&v, &k)| if k { ((f64::from(v) - mean) * inv) as f32 } else { 0.0 })
        .collect();
    crate::check_finite("whitened advantage", &out)?;
    Ok(out)
}
