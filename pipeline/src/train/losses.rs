//! The two training objectives as `logits -> (loss, dlogits)` functions, the shape the model's
//! trainer steps take. Log-probs, entropies and their backward come from squid-optim's fused
//! pass; the GRPO loss from squid-optim's policy loss.

use squid_optim::logprob::{logprobs, logprobs_backward, LogprobOutput};
use squid_optim::policy_loss::{policy_loss, PolicyLossConfig, PolicyLossInputs, PolicyLossOutput};

use super::batch::TrainingBatch;
use crate::Error;

/// Supervised next-token loss: the negative log-likelihood of the masked targets divided by `n`
/// (the step's loss tokens over every data-parallel rank; this batch's own count in one process).
/// Returns `(loss, dlogits)`.
pub fn sft_loss(batch: &TrainingBatch, logits: &[f32], vocab: usize, n: f32) -> Result<(f32, Vec<f32>), Error> {
    let fwd = logprobs(logits, vocab, &batch.targets)?;
    let mut loss = 0.0f64;
    let mut grad_logp = vec![0.0f32; batch.len()];
    for (t, &m) in batch.mask.iter().enumerate() {
        if m {
            loss -= f64::from(fwd.logp[t]);
            grad_logp[t] = -1.0 / n;
        }
    }
    let mut dlogits = vec![0.0f32; logits.len()];
    logprobs_backward(logits, vocab, &batch.targets, &fwd, &grad_logp, None, &mut dlogits)?;
    Ok(((loss / f64::from(n)) as f32, dlogits))
}

/// Per-position log-probs of the targets (no gradient): the "old" and reference policies.
pub fn target_logprobs(batch: &TrainingBatch, logits: &[f32], vocab: usize) -> Result<LogprobOutput, Error> {
    Ok(logprobs(logits, vocab, &batch.targets)?)
}

/// Largest `|a - b|` over the positions in the loss (0 when bitwise equal there; infinite when
/// the lengths differ, which is a bug worth seeing in the metrics).
pub fn max_masked_gap(a: &[f32], b: &[f32], mask: &[bool]) -> f32 {
    if a.len() != b.len() || a.len() != mask.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|((x, y), _)| if x.to_bits() == y.to_bits() { 0.0 } else { (x - y).abs() })
        .fold(0.0, f32::max)
}

/// What the GRPO loss needs besides the current logits.
#[derive(Debug, Clone, Copy)]
pub struct GrpoTargets<'a> {
    /// Log-probs of the policy that sampled (before this step's updates).
    pub old_logp: &'a [f32],
    /// Log-probs of the warm-up policy, when a KL term or metric is wanted.
    pub ref_logp: Option<&'a [f32]>,
    /// Advantage per position (the sample's advantage on its loss tokens, 0 elsewhere).
    pub advantages: &'a [f32],
}

/// The clipped policy loss over `batch`: returns `(loss, dlogits, metrics)`.
pub fn grpo_loss(
    batch: &TrainingBatch,
    logits: &[f32],
    vocab: usize,
    targets: GrpoTargets<'_>,
    config: &PolicyLossConfig,
) -> Result<(f32, Vec<f32>, PolicyLossOutput), Error> {
    let fwd = logprobs(logits, vocab, &batch.targets)?;
    let inputs = PolicyLossInputs {
        new_logp: &fwd.logp,
        old_logp: targets.old_logp,
        ref_logp: targets.ref_logp,
        advantages: targets.advantages,
        loss_mask: &batch.mask,
        cu_seqlens: batch.cu_seqlens(),
        entropy: Some(&fwd.entropy),
    };
    let out = policy_loss(&inputs, config)?;
    let mut dlogits = vec![0.0f32; logits.len()];
    logprobs_backward(logits, vocab, &batch.targets, &fwd, &out.grad_new_logp, None, &mut dlogits)?;
    Ok((out.loss, dlogits, out))
}
