//! Next-token sampling: temperature (0 = greedy argmax), top-p nucleus, a seedable generator.

use crate::env::Rng;
use crate::Error;

/// Finite and `>= 0` (NaN is not).
pub(crate) fn valid_temperature(temperature: f32) -> bool {
    temperature.is_finite() && temperature >= 0.0
}

/// In `(0, 1]` (NaN is not).
pub(crate) fn valid_top_p(top_p: f32) -> bool {
    top_p > 0.0 && top_p <= 1.0
}

/// Checks a logits row: no NaN, no `+inf`, at least one finite entry (`-inf` masks a token).
fn check_row(logits: &[f32]) -> Result<f32, Error> {
    if logits.is_empty() {
        return Err(Error::BadLogits("empty logits row".into()));
    }
    let mut max = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() || v == f32::INFINITY {
            return Err(Error::BadLogits(format!("entry {i} is {v}")));
        }
        max = max.max(v);
    }
    if max == f32::NEG_INFINITY {
        return Err(Error::BadLogits("every entry is -inf".into()));
    }
    Ok(max)
}

/// `log softmax(logits)[token]` at temperature 1: the log-probability the training forward pass
/// assigns to `token`, computed by the trainer's own function (`squid_optim::logprob`, one row),
/// so that the same logits give bitwise the trainer's log-prob.
pub fn log_prob(logits: &[f32], token: u32) -> Result<f32, Error> {
    check_row(logits)?;
    if token as usize >= logits.len() {
        return Err(Error::BadLogits(format!("token {token} outside a row of {}", logits.len())));
    }
    let out = squid_optim::logprob::logprobs(logits, logits.len(), &[token])
        .map_err(|e| Error::BadLogits(format!("log-prob of token {token}: {e}")))?;
    Ok(out.logp[0])
}

/// The index of the largest entry (the first one on ties).
pub fn argmax(logits: &[f32]) -> Result<u32, Error> {
    check_row(logits)?;
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// Draws a token from `logits`: greedy when `temperature == 0`, else from
/// `softmax(logits / temperature)` restricted to its top-p nucleus (the most probable tokens
/// whose probabilities sum to at least `top_p`, ties broken by lower id; always at least one).
/// Returns the token and its log-probability at temperature 1 (see [`log_prob`]).
pub fn sample_token(logits: &[f32], temperature: f32, top_p: f32, rng: &mut Rng) -> Result<(u32, f32), Error> {
    let max = check_row(logits)?;
    if !valid_temperature(temperature) || !valid_top_p(top_p) {
        return Err(Error::Config(format!("temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")));
    }
    let token = if temperature == 0.0 {
        argmax(logits)?
    } else {
        let inv_t = 1.0 / f64::from(temperature);
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &v)| (i as u32, (f64::from(v - max) * inv_t).exp())).collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let target = f64::from(top_p) * total;
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p.1;
                if cumulative >= target {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let kept: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = rng.unit() * kept;
        let mut chosen = probs[probs.len() - 1].0;
        for &(id, p) in &probs {
            if p > 0.0 && u < p {
                chosen = id;
                break;
            }
            u -= p;
        }
        // A zero-probability tail entry can be the fallback only through rounding: take the
        // most probable kept token instead.
        if probs.iter().any(|&(id, p)| id == chosen && p == 0.0) {
            chosen = probs.iter().max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0))).map_or(chosen, |p| p.0);
        }
        chosen
    };
    Ok((token, log_prob(logits, token)?))
}

/// The top-p nucleus of `logits` at `temperature` (as [`sample_token`] keeps it), as a mask.
fn nucleus(logits: &[f32], temperature: f32, top_p: f32) -> Result<Vec<bool>, Error> {
    let max = check_row(logits)?;
    let inv_t = 1.0 / f64::from(temperature);
    let mut probs: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &v)| (i as u32, (f64::from(v - max) * inv_t).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let target = f64::from(top_p) * total;
    let mut keep = vec![false; logits.len()];
    let mut cumulative = 0.0;
    for (id, p) in probs {
        keep[id as usize] = true;
        cumulative += p;
        if cumulative >= target {
            break;
        }
    }
    Ok(keep)
}

/// Draws a token from `masked` (`logits` with the tokens that may not be drawn set to -inf),
/// keeping to the top-p nucleus of the unmasked `logits`: masking removes tokens from the
/// policy's nucleus and never lets in tokens outside it (unless every nucleus token is masked,
/// when the masked row's own nucleus is used).
pub(crate) fn sample_masked(
    logits: &[f32],
    masked: &[f32],
    temperature: f32,
    top_p: f32,
    rng: &mut Rng,
) -> Result<u32, Error> {
    if !valid_temperature(temperature) || !valid_top_p(top_p) {
        return Err(Error::Config(format!("temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")));
    }
    if temperature == 0.0 || top_p >= 1.0 {
        return Ok(sample_token(masked, temperature, top_p, rng)?.0);
    }
    let keep = nucleus(logits, temperature, top_p)?;
    let row: Vec<f32> = masked.iter().zip(&keep).map(|(&v, &k)| if k { v } else { f32::NEG_INFINITY }).collect();
    if row.iter().all(|&v| v == f32::NEG_INFINITY) {
        return Ok(sample_token(masked, temperature, top_p, rng)?.0);
    }
    Ok(sample_token(&row, temperature, 1.0, rng)?.0)
}
