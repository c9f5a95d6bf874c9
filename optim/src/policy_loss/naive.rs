//! The policy loss written literally in f64: per sequence, per token, with plain branches; the
//! reference for the fast path and for finite differences.

use super::{Aggregation, KlEstimator, PolicyLossConfig, PolicyLossInputs, LOG_RATIO_CLAMP};

/// The per-token loss `l_t` (clipped surrogate plus beta * KL), in f64, without the aggregation weight.
pub fn token_loss(config: &PolicyLossConfig, new: f64, old: f64, reference: f64, advantage: f64) -> f64 {
    let c = f64::from(LOG_RATIO_CLAMP);
    let ratio = (new - old).clamp(-c, c).exp();
    let unclipped = -advantage * ratio;
    let clipped = -advantage * ratio.clamp(1.0 - f64::from(config.clip_low), 1.0 + f64::from(config.clip_high));
    let mut pg = unclipped.max(clipped);
    if let Some(dual) = config.dual_clip {
        if advantage < 0.0 {
            pg = pg.min(-advantage * f64::from(dual));
        }
    }
    let kl = match config.kl {
        None => 0.0,
        Some(k) => {
            let value = match k.estimator {
                KlEstimator::K1 => new - reference,
                KlEstimator::K2 => 0.5 * (new - reference).powi(2),
                KlEstimator::K3 | KlEstimator::K3Plus => {
                    let d = (reference - new).clamp(-c, c);
                    let v = d.exp() - d - 1.0;
                    k.k3_clamp.map_or(v, |m| v.min(f64::from(m)))
                }
            };
            f64::from(k.beta) * value
        }
    };
    pg + kl
}

/// d token_loss / d new, by cases (the analytic gradient the fast path must reproduce).
pub fn token_grad(config: &PolicyLossConfig, new: f64, old: f64, reference: f64, advantage: f64) -> f64 {
    let c = f64::from(LOG_RATIO_CLAMP);
    let ratio = (new - old).clamp(-c, c).exp();
    let unclipped = -advantage * ratio;
    let clipped = -advantage * ratio.clamp(1.0 - f64::from(config.clip_low), 1.0 + f64::from(config.clip_high));
    let pg = unclipped.max(clipped);
    let mut grad = if clipped > unclipped || (new - old).abs() >= c { 0.0 } else { unclipped };
    if let Some(dual) = config.dual_clip {
        if advantage < 0.0 && pg > -advantage * f64::from(dual) {
            grad = 0.0; // the constant -A c is taken
        }
    }
    if let Some(k) = config.kl {
        let d = reference - new;
        let g = match k.estimator {
            KlEstimator::K1 => 1.0,
            KlEstimator::K2 | KlEstimator::K3Plus => -d,
            KlEstimator::K3 => {
                let v = d.clamp(-c, c).exp() - d.clamp(-c, c) - 1.0;
                let clamped = k.k3_clamp.is_some_and(|m| v > f64::from(m));
                if d.abs() >= c || clamped {
                    0.0
                } else {
                    1.0 - d.exp()
                }
            }
        };
        grad += f64::from(k.beta) * g;
    }
    grad
}

/// Aggregation weight of every token (0 on masked tokens), by the mode's definition.
pub fn weights(inputs: &PolicyLossInputs<'_>, config: &PolicyLossConfig) -> Vec<f64> {
    let cu = inputs.cu_seqlens;
    let mask = inputs.loss_mask;
    let n_tok = mask.iter().filter(|&&m| m).count() as f64;
    let lens: Vec<f64> =
        cu.windows(2).map(|w| mask[w[0] as usize..w[1] as usize].iter().filter(|&&m| m).count() as f64).collect();
    let n_seq = lens.iter().filter(|&&n| n > 0.0).count() as f64;
    let tok_den = config.denominators.tokens.unwrap_or(n_tok);
    let seq_den = config.denominators.seqs.unwrap_or(n_seq);
    let mut w = vec![0.0; mask.len()];
    for (s, win) in cu.windows(2).enumerate() {
        for t in win[0] as usize..win[1] as usize {
            if !mask[t] {
                continue;
            }
            w[t] = match config.aggregation {
                Aggregation::TokenMean => 1.0 / tok_den,
                Aggregation::TokenSum => 1.0,
                Aggregation::SeqMeanTokenSum => 1.0 / seq_den,
                Aggregation::SeqMeanTokenMean => 1.0 / lens[s] / seq_den,
                Aggregation::SeqMeanTokenSumNorm { budget } => 1.0 / f64::from(budget) / seq_den,
            };
        }
    }
    w
}

/// The loss in f64, for arbitrary `new` (used for finite differences).
pub fn loss_at(inputs: &PolicyLossInputs<'_>, config: &PolicyLossConfig, new: &[f64]) -> f64 {
    let w = weights(inputs, config);
    (0..new.len())
        .filter(|&t| inputs.loss_mask[t])
        .map(|t| {
            let r = inputs.ref_logp.map_or(new[t], |r| f64::from(r[t]));
            w[t] * token_loss(config, new[t], f64::from(inputs.old_logp[t]), r, f64::from(inputs.advantages[t]))
        })
        .sum()
}

/// Loss and gradient in f64.
pub fn policy_loss(inputs: &PolicyLossInputs<'_>, config: &PolicyLossConfig) -> (f64, Vec<f64>) {
    let new: Vec<f64> = inputs.new_logp.iter().map(|&x| f64::from(x)).collect();
    let w = weights(inputs, config);
    let grad = (0..new.len())
        .map(|t| {
            if !inputs.loss_mask[t] {
                return 0.0;
            }
            let r = inputs.ref_logp.map_or(new[t], |r| f64::from(r[t]));
            w[t] * token_grad(config, new[t], f64::from(inputs.old_logp[t]), r, f64::from(inputs.advantages[t]))
        })
        .collect();
    (loss_at(inputs, config, &new), grad)
}
