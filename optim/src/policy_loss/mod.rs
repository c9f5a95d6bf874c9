//! The policy loss of PPO-style RL on packed token sequences: clipped surrogate, KL to a reference
//! policy, and the aggregation that turns per-token losses into one scalar; forward and the
//! gradient with respect to the new log-probs in one pass.
//!
//! Per loss token t (mask 1; prompt and tool-output tokens have mask 0 and contribute nothing),
//! with `A` its advantage:
//! ```text
//! log_ratio = clamp(new - old, -20, 20)                     (verl clamps; TRL does not)
//! ratio     = exp(log_ratio)
//! pg        = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))   PPO / DAPO clip-higher
//! pg        = min(pg, -A c)           if A < 0 and dual clip c is set       (verl clip_ratio_c)
//! l_t       = pg + beta * kl_t        (kl_t by the chosen estimator, see [`KlEstimator`])
//! loss      = sum_t w_t l_t           (w_t by the aggregation mode, see [`Aggregation`])
//! dloss/dnew_t = w_t (dpg/dnew_t + beta dkl/dnew_t)
//! ```
//! `dpg/dnew = -A ratio` where the unclipped term is the one taken, 0 where a clip is active (the
//! clamp of the ratio is flat there), as autograd gives for verl's and TRL's formulas.
//!
//! Presets: [`PolicyLossConfig::verl`] is verl 0.9.1's actor defaults (clip 0.2 both sides, dual
//! clip `clip_ratio_c = 3.0`, token-mean, no KL loss); [`PolicyLossConfig::trl`] is TRL 1.16.0's
//! `GRPOConfig` defaults (`epsilon = 0.2`, `epsilon_high = epsilon`, no dual clip, `beta = 0`,
//! `loss_type = "dapo"`: token-mean). `PolicyLossConfig::default()` equals `trl()`. DAPO
//! clip-higher is `clip_high = 0.28` (verl `clip_ratio_high`, TRL `epsilon_high`).
//!
//! ## Aggregation and data parallelism
//! | mode | loss | reproduces |
//! |---|---|---|
//! | token-mean | `sum_t l_t / N_tok` | verl `token-mean`, TRL `bnpo` (local N), TRL `dapo` (global N) |
//! | token-sum | `sum_t l_t` | verl 0.9.1 `token-sum` |
//! | seq-mean-token-sum | `sum_s (sum_{t in s} l_t) / N_seq` | verl `seq-mean-token-sum` |
//! | seq-mean-token-mean | `sum_s (sum_{t in s} l_t / n_s) / N_seq` | verl `seq-mean-token-mean`, TRL `grpo` (DeepSeekMath) |
//! | seq-mean-token-sum-norm | `sum_s sum_{t in s} l_t / (N_seq * budget)` | verl 0.9.1 `seq-mean-token-sum-norm` (budget = `loss_scale_factor`, by default the padded response length), TRL `dr_grpo` (budget = `max_completion_length`, `N_seq` = every row of the batch) |
//!
//! verl 0.9.1's `seq-mean-token-sum-norm` divides by the number of sequences with loss tokens and
//! by the budget, as this mode does with the default [`Denominators`]. verl before 0.9 (e.g. 0.8)
//! divided by the budget alone, with no mean over sequences; to reproduce that, and only that,
//! pass `Denominators { seqs: Some(1.0), .. }` (with 0.9.1 it gives `N_seq` times its loss).
//!
//! `N_tok` counts loss tokens, `n_s` the loss tokens of sequence s, `N_seq` the sequences with at
//! least one loss token (verl and TRL average over every row of their padded batch, including rows
//! without loss tokens: pass that number in [`Denominators`] to match them exactly).
//! With no loss tokens at all the loss and the gradient are 0.
//!
//! To make data-parallel ranks (or gradient-accumulation micro-batches) produce exactly the loss and
//! gradient of one big batch: all-reduce (sum) every rank's loss-token count and sequence count
//! ([`count_loss_tokens_and_seqs`]) first, pass the global totals as [`Denominators`], then
//! all-reduce the losses and gradients with a **sum**, not a mean (a framework that averages
//! gradients over ranks, as DDP does, needs them scaled by the world size). The per-sequence
//! factor `1 / n_s` is local to a sequence and needs nothing global.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
pub mod naive;
#[cfg(test)]
mod tests;

/// The CUDA source of the device path (module `cuda`, `cuda` feature): loss tokens per sequence, then
/// the per-token loss and gradient with per-sequence partial sums of the loss and metrics.
pub const KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "optim_policy_loss",
    "src/policy_loss/policy_loss.cu",
    ["squid_pl_counts", "squid_pl_loss"],
    fast_math = false
);

use crate::{check_finite, check_len, seqs, Error};

pub use cpu::{policy_loss_into, policy_loss_with_token_loss_into};

/// KL(new || ref) estimators, with `delta = ref - new` (log-probs of the sampled token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    /// `k1 = new - ref` (gradient 1). verl `kl` / `k1`.
    K1,
    /// `k2 = (new - ref)^2 / 2` (gradient `new - ref`). verl `mse` / `k2`.
    K2,
    /// `k3 = exp(delta) - delta - 1`, delta clamped to [-20, 20] (gradient `1 - exp(delta)` inside
    /// the clamp). verl `low_var_kl` / `k3`; TRL's `beta` term (TRL clamps nothing).
    K3,
    /// The k3 value with the k2 gradient (straight-through), verl `k3+`: an unbiased KL gradient with
    /// k3's low-variance value in the logs.
    K3Plus,
}

/// The KL-to-reference loss term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlPenalty {
    /// Which estimator.
    pub estimator: KlEstimator,
    /// Its coefficient, finite and >= 0 (verl `kl_loss_coef`, TRL `beta`).
    pub beta: f32,
    /// Upper clamp of the k3 value, gradient 0 above it (verl clamps k3 to 10); `None` for TRL.
    pub k3_clamp: Option<f32>,
}

impl KlPenalty {
    /// verl 0.9.1's KL loss (`use_kl_loss: true`): `kl_loss_type: low_var_kl` (k3, clamped at 10)
    /// with `beta = kl_loss_coef` (verl's default 0.001).
    pub fn verl(beta: f32) -> Self {
        Self { estimator: KlEstimator::K3, beta, k3_clamp: Some(10.0) }
    }
    /// TRL 1.16.0 `GRPOTrainer`'s KL term for `beta != 0`: k3, not clamped.
    pub fn trl(beta: f32) -> Self {
        Self { estimator: KlEstimator::K3, beta, k3_clamp: None }
    }
}

/// How per-token losses become one scalar; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregation {
    /// Mean over all loss tokens.
    TokenMean,
    /// Sum over each sequence's tokens, mean over sequences.
    SeqMeanTokenSum,
    /// Mean over each sequence's tokens, mean over sequences.
    SeqMeanTokenMean,
    /// Sum over all loss tokens, no division (verl `token-sum`). With data parallelism the ranks'
    /// losses and gradients are summed as usual; [`Denominators`] do not apply.
    TokenSum,
    /// Sum over each sequence's tokens divided by a constant length budget, mean over sequences (Dr. GRPO).
    SeqMeanTokenSumNorm {
        /// The constant length (e.g. the maximum number of generated tokens).
        budget: f32,
    },
}

/// Global denominators for data parallelism; `None` uses this call's own count.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Denominators {
    /// Number of loss tokens over all ranks (token-mean).
    pub tokens: Option<f64>,
    /// Number of sequences over all ranks (the seq-mean modes).
    pub seqs: Option<f64>,
}

/// Policy loss options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossConfig {
    /// Lower clip: the ratio is clamped at `1 - clip_low`.
    pub clip_low: f32,
    /// Upper clip: the ratio is clamped at `1 + clip_high`.
    pub clip_high: f32,
    /// Dual-clip constant c > 1 for negative advantages.
    pub dual_clip: Option<f32>,
    /// KL to the reference policy (needs reference log-probs).
    pub kl: Option<KlPenalty>,
    /// The aggregation mode.
    pub aggregation: Aggregation,
    /// Global denominators (data parallelism).
    pub denominators: Denominators,
}

impl Default for PolicyLossConfig {
    /// PPO clip 0.2 on both sides, no dual clip, no KL, token-mean: the same as
    /// [`PolicyLossConfig::trl`]. It is not verl's default, which adds the dual clip
    /// ([`PolicyLossConfig::verl`]).
    fn default() -> Self {
        Self::trl()
    }
}

impl PolicyLossConfig {
    /// verl 0.9.1's actor defaults (`actor_rollout_ref.actor.*` in `trainer/config/actor/actor.yaml`):
    /// `clip_ratio_low = clip_ratio_high = clip_ratio = 0.2`, `clip_ratio_c = 3.0` (dual clip),
    /// `loss_agg_mode: token-mean`, `use_kl_loss: false`. For verl's KL loss set
    /// `kl: Some(KlPenalty::verl(kl_loss_coef))`; with data parallelism pass verl's global counts in
    /// [`Denominators`].
    pub fn verl() -> Self {
        Self {
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: Some(3.0),
            kl: None,
            aggregation: Aggregation::TokenMean,
            denominators: Denominators::default(),
        }
    }

    /// TRL 1.16.0's `GRPOConfig` defaults: `epsilon = 0.2`, `epsilon_high = None` (= epsilon), no
    /// dual clip, `beta = 0.0` (no KL; otherwise `kl: Some(KlPenalty::trl(beta))`),
    /// `loss_type = "dapo"`: token-mean over the loss tokens of the whole accumulated batch (pass
    /// that count as `denominators.tokens` when a batch is split). TRL does not clamp the log-ratio;
    /// squid clamps it at +-20 ([`LOG_RATIO_CLAMP`]), which changes only ratios beyond e^20.
    pub fn trl() -> Self {
        Self {
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: None,
            kl: None,
            aggregation: Aggregation::TokenMean,
            denominators: Denominators::default(),
        }
    }

    /// Checks every option (the loss functions do on each call; a trainer can call this once when it
    /// reads its configuration): clips, dual clip > 1, KL beta finite and >= 0, k3 clamp > 0,
    /// budget > 0, denominators > 0, all finite.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &'static str, why: String| Err(Error::Config { what, why });
        if !(self.clip_low.is_finite() && (0.0..1.0).contains(&self.clip_low)) {
            return bad("clip_low", format!("{} is not in [0, 1)", self.clip_low));
        }
        if !(self.clip_high.is_finite() && self.clip_high >= 0.0) {
            return bad("clip_high", format!("{} is not a finite value >= 0", self.clip_high));
        }
        if let Some(c) = self.dual_clip {
            if !(c.is_finite() && c > 1.0) {
                return bad("dual_clip", format!("{c} must be > 1"));
            }
        }
        if let Some(kl) = self.kl {
            if !(kl.beta.is_finite() && kl.beta >= 0.0) {
                return bad("kl.beta", format!("{} is not a finite value >= 0", kl.beta));
            }
            if let Some(c) = kl.k3_clamp {
                if !(c.is_finite() && c > 0.0) {
                    return bad("kl.k3_clamp", format!("{c} must be > 0"));
                }
            }
        }
        if let Aggregation::SeqMeanTokenSumNorm { budget } = self.aggregation {
            if !(budget.is_finite() && budget > 0.0) {
                return bad("budget", format!("{budget} must be > 0"));
            }
        }
        for (what, d) in
            [("denominators.tokens", self.denominators.tokens), ("denominators.seqs", self.denominators.seqs)]
        {
            if let Some(d) = d {
                if !(d.is_finite() && d > 0.0) {
                    return bad(what, format!("{d} must be > 0"));
                }
            }
        }
        Ok(())
    }
}

/// The log-ratio clamp (verl): keeps `exp` finite for wild log-probs.
pub const LOG_RATIO_CLAMP: f32 = 20.0;

/// Per-token inputs, packed: sequence s holds tokens `cu_seqlens[s]..cu_seqlens[s + 1]`.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossInputs<'a> {
    /// Log-probs of the sampled tokens under the policy being trained.
    pub new_logp: &'a [f32],
    /// Log-probs under the policy that sampled them.
    pub old_logp: &'a [f32],
    /// Log-probs under the reference policy (needed when a KL term is set).
    pub ref_logp: Option<&'a [f32]>,
    /// Per-token advantages (see [`crate::advantage::broadcast_to_tokens`]).
    pub advantages: &'a [f32],
    /// True on tokens in the loss.
    pub loss_mask: &'a [bool],
    /// Sequence offsets, `num_seqs + 1` of them.
    pub cu_seqlens: &'a [u32],
    /// Per-token entropy (from [`crate::logprob`]), only for the metrics; must be finite.
    pub entropy: Option<&'a [f32]>,
}

/// Diagnostics, all over loss tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Metrics {
    /// Fraction with A < 0 and ratio < 1 - clip_low (TRL `clip_ratio/low_mean`).
    pub clip_frac_low: f32,
    /// Fraction with A > 0 and ratio > 1 + clip_high (TRL `clip_ratio/high_mean`). verl's
    /// `pg_clipfrac` is the sum of the two.
    pub clip_frac_high: f32,
    /// Fraction where the dual clip is active (verl `pg_clipfrac_lower`).
    pub dual_clip_frac: f32,
    /// Mean of `old - new` (verl `ppo_kl`).
    pub approx_kl: f32,
    /// Mean KL-estimator value when a KL term is set.
    pub kl: Option<f32>,
    /// Mean entropy when given.
    pub entropy: Option<f32>,
    /// Smallest ratio.
    pub ratio_min: f32,
    /// Mean ratio.
    pub ratio_mean: f32,
    /// Largest ratio.
    pub ratio_max: f32,
    /// Loss tokens in this call.
    pub loss_tokens: usize,
    /// Sequences with at least one loss token in this call.
    pub loss_seqs: usize,
}

/// Loss, gradient, per-token losses and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyLossOutput {
    /// The scalar loss.
    pub loss: f32,
    /// d loss / d new_logp, one per token (0 on masked tokens).
    pub grad_new_logp: Vec<f32>,
    /// The per-token loss `l_t = pg_t + beta kl_t` before aggregation, one per token (0 on masked
    /// tokens): verl's `pg_losses` (plus the KL term when set), TRL's `per_token_loss`. The loss is
    /// `sum_t w_t l_t` with the aggregation weights.
    pub token_loss: Vec<f32>,
    /// Diagnostics.
    pub metrics: Metrics,
}

/// Counts of loss tokens and of sequences with at least one, the numbers to all-reduce for
/// [`Denominators`].
pub fn count_loss_tokens_and_seqs(loss_mask: &[bool], cu_seqlens: &[u32]) -> Result<(usize, usize), Error> {
    seqs::validate(cu_seqlens, loss_mask.len())?;
    let per_seq = cpu::seq_counts(loss_mask, cu_seqlens);
    Ok((per_seq.iter().map(|&n| n as usize).sum(), per_seq.iter().filter(|&&n| n > 0).count()))
}

/// Checks inputs and config; returns the number of sequences.
pub(crate) fn validate(inputs: &PolicyLossInputs<'_>, config: &PolicyLossConfig) -> Result<usize, Error> {
    let t = inputs.new_logp.len();
    let num_seqs = seqs::validate(inputs.cu_seqlens, t)?;
    check_len("old_logp", t, inputs.old_logp.len())?;
    check_len("advantages", t, inputs.advantages.len())?;
    check_len("loss_mask", t, inputs.loss_mask.len())?;
    if let Some(r) = inputs.ref_logp {
        check_len("ref_logp", t, r.len())?;
    }
    if let Some(e) = inputs.entropy {
        check_len("entropy", t, e.len())?;
    }
    config.validate()?;
    if config.kl.is_some() && inputs.ref_logp.is_none() {
        return Err(Error::Config { what: "kl", why: "a KL term needs ref_logp".into() });
    }
    Ok(num_seqs)
}

/// Names the first non-finite input; the fast path calls it only after its pass saw one, so
/// finite inputs are read once.
pub(crate) fn find_non_finite(inputs: &PolicyLossInputs<'_>) -> Result<(), Error> {
    check_finite("new_logp", inputs.new_logp)?;
    check_finite("old_logp", inputs.old_logp)?;
    check_finite("advantages", inputs.advantages)?;
    if let Some(r) = inputs.ref_logp {
        check_finite("ref_logp", r)?;
    }
    if let Some(e) = inputs.entropy {
        check_finite("entropy", e)?;
    }
    Ok(())
}

/// The policy loss, its gradient with respect to `new_logp`, and metrics (fast path).
pub fn policy_loss(inputs: &PolicyLossInputs<'_>, config: &PolicyLossConfig) -> Result<PolicyLossOutput, Error> {
    let n = inputs.new_logp.len();
    let mut grad = crate::try_filled("grad_new_logp", n, 0.0f32)?;
    let mut token_loss = crate::try_filled("token_loss", n, 0.0f32)?;
    let (loss, metrics) = policy_loss_with_token_loss_into(inputs, config, &mut grad, &mut token_loss)?;
    Ok(PolicyLossOutput { loss, grad_new_logp: grad, token_loss, metrics })
}
