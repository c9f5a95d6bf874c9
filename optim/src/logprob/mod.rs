//! Fused log-softmax + gather: from logits `[tokens, vocab]` (row-major, f32/bf16/f16 storage) and
//! the sampled token ids, each token's log-prob `x[y] - logsumexp(x)` and the entropy of its
//! distribution, in one pass over the logits; and the backward to the logits in one more pass.
//!
//! Neither pass materialises the probabilities: the forward keeps three running numbers per row
//! (max `m`, `S = sum e^(x-m)`, `W = sum e^(x-m) (x-m)`) over vocabulary chunks of
//! [`VOCAB_CHUNK`] (rescaled when a chunk raises the max), so memory stays O(1) per row whatever the
//! vocabulary; it saves `lse = m + ln S` and the entropy `H = ln S - W / S` for the backward, which
//! recomputes `p = e^(x - lse)`:
//! ```text
//! d logp / d x_v = [v = y] - p_v
//! d H    / d x_v = -p_v (log p_v + H)
//! d loss / d x_v = g ([v = y] - p_v) - h p_v (x_v - lse + H)      g = dloss/dlogp, h = dloss/dH
//! ```
//! Logits are taken as given (divide by the sampling temperature first if the rollout used one, as
//! verl does).

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
pub mod naive;
#[cfg(test)]
mod tests;

/// The CUDA source of the device path (module `cuda`, `cuda` feature): the forward (one block per
/// row, online max / sum / weighted sum) and the backward (vocabulary chunks) per storage type.
pub const KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "optim_logprob",
    "src/logprob/logprob.cu",
    [
        "squid_logprob_fwd_f32",
        "squid_logprob_fwd_bf16",
        "squid_logprob_fwd_f16",
        "squid_logprob_bwd_f32_f32",
        "squid_logprob_bwd_bf16_bf16",
        "squid_logprob_bwd_bf16_f32",
        "squid_logprob_bwd_f16_f16",
        "squid_logprob_bwd_f16_f32",
    ],
    fast_math = true
);

use squid_cuda::dtype::Element;

use crate::{check_len, checked_product, try_filled, Error};

/// Vocabulary entries per chunk of the online softmax (8 KiB of f32: stays in L1).
pub const VOCAB_CHUNK: usize = 2048;

/// Per-token results of the forward.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogprobOutput {
    /// `log softmax(x)[y]` per token.
    pub logp: Vec<f32>,
    /// Entropy of `softmax(x)` per token (nats).
    pub entropy: Vec<f32>,
    /// `logsumexp(x)` per token, kept for the backward.
    pub lse: Vec<f32>,
}

fn validate<T>(logits: &[T], vocab: usize, targets: &[u32]) -> Result<(), Error> {
    if vocab == 0 {
        return Err(Error::Config { what: "vocab", why: "must be at least 1".into() });
    }
    check_len(
        "logits (tokens * vocab)",
        checked_product("logits (tokens * vocab)", targets.len(), vocab)?,
        logits.len(),
    )?;
    if let Some(index) = targets.iter().position(|&y| y as usize >= vocab) {
        return Err(Error::TargetOutOfRange { index, id: targets[index], vocab });
    }
    Ok(())
}

/// Log-probs of `targets`, entropies and log-sum-exps of every row of `logits` (fast path).
/// A row whose log-sum-exp is not finite (NaN logits, all -inf, overflow) is an error.
pub fn logprobs<T: Element>(logits: &[T], vocab: usize, targets: &[u32]) -> Result<LogprobOutput, Error> {
    validate(logits, vocab, targets)?;
    let n = targets.len();
    let mut out = LogprobOutput {
        logp: try_filled("logp", n, 0.0)?,
        entropy: try_filled("entropy", n, 0.0)?,
        lse: try_filled("lse", n, 0.0)?,
    };
    logprobs_into(logits, vocab, targets, &mut out)?;
    Ok(out)
}

/// [`logprobs`] into existing buffers (resized to the number of tokens).
pub fn logprobs_into<T: Element>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    out: &mut LogprobOutput,
) -> Result<(), Error> {
    validate(logits, vocab, targets)?;
    let n = targets.len();
    for (what, v) in [("logp", &mut out.logp), ("entropy", &mut out.entropy), ("lse", &mut out.lse)] {
        v.try_reserve(n.saturating_sub(v.len())).map_err(|e| Error::Size { what, why: format!("{n} tokens: {e}") })?;
        v.resize(n, 0.0);
    }
    cpu::forward(logits, vocab, targets, out);
    if let Some(index) = out.lse.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "logits row log-sum-exp", index, value: out.lse[index] });
    }
    Ok(())
}

/// The backward to the logits: `grad_logits[t, v] = g_t ([v = y_t] - p_tv) - h_t p_tv (log p_tv + H_t)`
/// from the forward's `lse` and `entropy`, with `g = grad_logp` and `h = grad_entropy` (0 when
/// `None`). Gradients are written (not accumulated) in `G`'s storage type.
#[allow(clippy::too_many_arguments)]
pub fn logprobs_backward<T: Element, G: Element>(
    logits: &[T],
    vocab: usize,
    targets: &[u32],
    forward: &LogprobOutput,
    grad_logp: &[f32],
    grad_entropy: Option<&[f32]>,
    grad_logits: &mut [G],
) -> Result<(), Error> {
    validate(logits, vocab, targets)?;
    let n = targets.len();
    check_len("forward.lse", n, forward.lse.len())?;
    check_len("forward.entropy", n, forward.entropy.len())?;
    // The forward's outputs are public fields: edited ones must not poison the gradient silently.
    crate::check_finite("forward.lse", &forward.lse)?;
    crate::check_finite("forward.entropy", &forward.entropy)?;
    check_len("grad_logp", n, grad_logp.len())?;
    if let Some(h) = grad_entropy {
        check_len("grad_entropy", n, h.len())?;
    }
    check_len("grad_logits", logits.len(), grad_logits.len())?;
    crate::check_finite("grad_logp", grad_logp)?;
    if let Some(h) = grad_entropy {
        crate::check_finite("grad_entropy", h)?;
    }
    cpu::backward(logits, vocab, targets, forward, grad_logp, grad_entropy, grad_logits);
    Ok(())
}
