//! Advantages for GRPO-family trainers: from one scalar reward per sample (and, for REINFORCE++,
//! per-token rewards) to the per-token advantages the policy loss weighs.
//!
//! Samples are grouped (G samples per prompt), by a fixed group size or by a group id per sample.
//! Every estimator is written out below with the public trainer it reproduces:
//!
//! | estimator | formula for sample i of group g | reproduces |
//! |---|---|---|
//! | GRPO, group std | `(r_i - mean_g) / (std_g + eps)` | verl `grpo` (unbiased std, eps 1e-6; [`GrpoConfig::verl`]), TRL `scale_rewards="group"` (unbiased std, eps 1e-4; [`GrpoConfig::trl`]) |
//! | GRPO, batch std | `(r_i - mean_g) / (std_batch + eps)` | TRL `scale_rewards="batch"` |
//! | Dr. GRPO (no std) | `r_i - mean_g` | verl `norm_adv_by_std_in_grpo=False`, TRL `scale_rewards="none"` ([`GrpoConfig::dr_grpo`]) |
//! | RLOO | `r_i - mean_{j in g, j != i} r_j = n/(n-1) (r_i - mean_g)` | verl `rloo`, TRL `RLOOTrainer` |
//! | REINFORCE++ | discounted per-token returns, whitened over all loss tokens of the batch | verl `reinforce_plus_plus` ([`reinforce_pp`]) |
//! | REINFORCE++-baseline | `r_i - mean_g` on every loss token, whitened over the batch | verl `reinforce_plus_plus_baseline` ([`reinforce_pp_baseline`]) |
//!
//! Edge cases, chosen on purpose:
//! - A group whose (finite) rewards are all equal gets advantage exactly 0, whatever the
//!   estimator (no `0 / eps` noise from rounding of the mean).
//! - A group of one sample has no baseline: an error ([`Error::SingletonGroup`]) unless
//!   [`SingletonPolicy`] says otherwise. verl silently passes the raw score through (mean 0, std 1);
//!   that is available as [`SingletonPolicy::RawScore`] but never the default.
//! - NaN or infinite rewards are an error unless [`NonFinitePolicy::Ignore`]: then those samples are
//!   left out of every mean and std (TRL's NaN-aware statistics) and get advantage 0.
//!
//! Means and standard deviations are accumulated in f64.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
pub mod naive;
#[cfg(test)]
mod tests;

/// The CUDA source of the device path (module `cuda`, `cuda` feature): batch statistics, per-group
/// advantages (one warp per group), the broadcast to tokens, the zero-variance group filter, and
/// REINFORCE++'s discounted returns and batch whitening.
pub const KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "optim_advantage",
    "src/advantage/advantage.cu",
    [
        "squid_adv_batch_stats",
        "squid_adv_groups",
        "squid_adv_broadcast",
        "squid_adv_group_varies",
        "squid_adv_returns",
        "squid_adv_whiten_stats",
        "squid_adv_whiten_apply",
        "squid_adv_baseline_tokens",
        "squid_adv_zero_seqs",
    ],
    fast_math = false
);

use crate::{check_finite, check_len, seqs, Error};

/// How samples are grouped.
#[derive(Debug, Clone, Copy)]
pub enum Groups<'a> {
    /// Consecutive runs of this many samples (TRL's and verl's usual layout: G attempts per prompt).
    Size(usize),
    /// A group id per sample; ids need not be contiguous or sorted. Groups are numbered in order
    /// of first appearance.
    Ids(&'a [u64]),
}

impl Groups<'_> {
    /// The members of every group, in order of first appearance, for `n` samples.
    pub fn resolve(&self, n: usize) -> Result<Vec<Vec<usize>>, Error> {
        match *self {
            Groups::Size(0) => Err(Error::Config { what: "group size", why: "must be at least 1".into() }),
            Groups::Size(g) if n % g != 0 => {
                Err(Error::Config { what: "group size", why: format!("{n} samples do not split into groups of {g}") })
            }
            Groups::Size(g) => Ok((0..n / g).map(|k| (k * g..(k + 1) * g).collect()).collect()),
            Groups::Ids(ids) => {
                check_len("group ids", n, ids.len())?;
                let mut index = std::collections::HashMap::new();
                let mut members: Vec<Vec<usize>> = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    let g = *index.entry(*id).or_insert_with(|| {
                        members.push(Vec::new());
                        members.len() - 1
                    });
                    members[g].push(i);
                }
                Ok(members)
            }
        }
    }
}

/// Where the standard deviation that divides GRPO advantages comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdScope {
    /// No division (Dr. GRPO; TRL `scale_rewards="none"`, verl `norm_adv_by_std_in_grpo=False`).
    None,
    /// The std of the sample's own group (DeepSeekMath GRPO; verl; TRL `scale_rewards="group"`).
    Group,
    /// The std of all rewards in the batch (TRL `scale_rewards="batch"`); the mean stays per group.
    Batch,
}

/// GRPO's options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoConfig {
    /// Which std divides the centred reward.
    pub scope: StdScope,
    /// Unbiased (n - 1, torch's default, used by verl and TRL) or biased (n) standard deviation.
    pub unbiased_std: bool,
    /// Added to the std before dividing.
    pub eps: f32,
}

impl GrpoConfig {
    /// verl `compute_grpo_outcome_advantage`: group std, unbiased, eps 1e-6.
    pub fn verl() -> Self {
        Self { scope: StdScope::Group, unbiased_std: true, eps: 1e-6 }
    }
    /// TRL `GRPOTrainer` with `scale_rewards="group"`: group std, unbiased, eps 1e-4.
    pub fn trl() -> Self {
        Self { scope: StdScope::Group, unbiased_std: true, eps: 1e-4 }
    }
    /// Dr. GRPO: centre by the group mean, no std division.
    pub fn dr_grpo() -> Self {
        Self { scope: StdScope::None, unbiased_std: true, eps: 0.0 }
    }
}

/// The per-sample estimators.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Estimator {
    /// Group-relative: centre by the group mean, optionally divide by a std ([`GrpoConfig`]).
    Grpo(GrpoConfig),
    /// Leave-one-out: subtract the mean of the other samples of the group.
    Rloo,
}

/// What a group of one sample gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SingletonPolicy {
    /// [`Error::SingletonGroup`] (the default: a one-sample group is usually a batching bug).
    #[default]
    Error,
    /// Advantage 0: no baseline, no signal.
    Zero,
    /// The raw reward as the advantage, as verl does (its mean 0 / std 1 fallback).
    RawScore,
}

/// What a NaN or infinite reward does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// [`Error::NonFinite`] naming the sample (the default).
    #[default]
    Error,
    /// Leave the sample out of all statistics and give it advantage 0 (TRL's nan-aware mean/std).
    Ignore,
}

/// An estimator with its edge-case policies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdvantageConfig {
    /// The estimator.
    pub estimator: Estimator,
    /// One-sample groups.
    pub singleton: SingletonPolicy,
    /// NaN / infinite rewards.
    pub non_finite: NonFinitePolicy,
}

impl AdvantageConfig {
    /// `estimator` with the strict defaults (singleton groups and non-finite rewards are errors).
    pub fn new(estimator: Estimator) -> Self {
        Self { estimator, singleton: SingletonPolicy::Error, non_finite: NonFinitePolicy::Error }
    }
}

fn validate_config(config: &AdvantageConfig) -> Result<(), Error> {
    if let Estimator::Grpo(g) = config.estimator {
        if !(g.eps.is_finite() && g.eps >= 0.0) {
            return Err(Error::Config { what: "eps", why: format!("{} is not a finite value >= 0", g.eps) });
        }
    }
    Ok(())
}

fn validate_rewards(rewards: &[f32], policy: NonFinitePolicy) -> Result<(), Error> {
    match policy {
        NonFinitePolicy::Error => check_finite("rewards", rewards),
        NonFinitePolicy::Ignore => Ok(()),
    }
}

/// One advantage per sample from one reward per sample (GRPO, Dr. GRPO, RLOO). An advantage that
/// would not be finite (rewards near `f32::MAX`) is an error.
pub fn sample_advantages(rewards: &[f32], groups: Groups<'_>, config: &AdvantageConfig) -> Result<Vec<f32>, Error> {
    sample_advantages_with_stats(rewards, groups, config).map(|a| a.advantages)
}

/// The statistics of one group that its advantages were computed from (for logging: verl and TRL
/// users log the reward mean and std per group).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupStats {
    /// Samples that entered the statistics (finite rewards; ignored non-finite ones are not counted).
    pub count: usize,
    /// Mean of those rewards (f64): the baseline GRPO, Dr. GRPO and RLOO subtract (RLOO's
    /// leave-one-out mean is `(n mean - r_i) / (n - 1)`). 0 when `count` is 0.
    pub mean: f64,
    /// The standard deviation GRPO divides by, before `eps` is added: the group's own (biased or
    /// unbiased as configured) for `StdScope::Group`, the whole batch's for `StdScope::Batch`; for
    /// `StdScope::None` and RLOO, which divide by none, the group's std with the configured bias
    /// (RLOO: unbiased). 0 for groups of fewer than two (unbiased) samples.
    pub std: f64,
}

/// Advantages with the per-group statistics behind them.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleAdvantages {
    /// One advantage per sample, as [`sample_advantages`] returns them.
    pub advantages: Vec<f32>,
    /// One entry per group, in order of first appearance (as [`Groups::resolve`] numbers them).
    pub groups: Vec<GroupStats>,
}

/// [`sample_advantages`] that also returns each group's mean and std.
pub fn sample_advantages_with_stats(
    rewards: &[f32],
    groups: Groups<'_>,
    config: &AdvantageConfig,
) -> Result<SampleAdvantages, Error> {
    validate_config(config)?;
    validate_rewards(rewards, config.non_finite)?;
    let members = groups.resolve(rewards.len())?;
    let (advantages, groups) = cpu::sample_advantages(rewards, &members, config)?;
    Ok(SampleAdvantages { advantages, groups })
}

/// Which groups DAPO's dynamic sampling keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFilter {
    /// Per group (order of first appearance): true when kept.
    pub kept_groups: Vec<bool>,
    /// The samples of the kept groups, ascending.
    pub kept_samples: Vec<usize>,
}

/// DAPO dynamic sampling: drop every group whose rewards have zero variance (all equal, which
/// includes groups of one sample), since its GRPO advantages are all 0. Rewards must be finite.
pub fn filter_zero_variance_groups(rewards: &[f32], groups: Groups<'_>) -> Result<GroupFilter, Error> {
    check_finite("rewards", rewards)?;
    let members = groups.resolve(rewards.len())?;
    let kept_groups: Vec<bool> = members.iter().map(|m| m.iter().any(|&i| rewards[i] != rewards[m[0]])).collect();
    let mut kept_samples: Vec<usize> =
        members.iter().zip(&kept_groups).filter(|(_, &k)| k).flat_map(|(m, _)| m.iter().copied()).collect();
    kept_samples.sort_unstable();
    Ok(GroupFilter { kept_groups, kept_samples })
}

/// Broadcasts one advantage per sequence to its tokens: token t of sequence s gets
/// `advantages[s]` where `loss_mask[t]`, else 0 (prompt and tool-output tokens). A NaN or infinite
/// advantage is an error (it would otherwise reach the loss).
pub fn broadcast_to_tokens(advantages: &[f32], cu_seqlens: &[u32], loss_mask: &[bool]) -> Result<Vec<f32>, Error> {
    let num_seqs = seqs::validate(cu_seqlens, loss_mask.len())?;
    check_len("advantages (one per sequence)", num_seqs, advantages.len())?;
    check_finite("advantages", advantages)?;
    Ok(cpu::broadcast(advantages, cu_seqlens, loss_mask))
}

/// Whitening for the REINFORCE++ estimators: `(x - mean) / sqrt(var + eps)` over all loss tokens
/// of the batch, var unbiased (verl `masked_whiten`: `rsqrt(var + 1e-8)`, Bessel-corrected var).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WhitenConfig {
    /// Added to the variance under the square root (verl 1e-8).
    pub eps: f32,
}

impl Default for WhitenConfig {
    fn default() -> Self {
        Self { eps: 1e-8 }
    }
}

/// REINFORCE++ (verl `compute_reinforce_plus_plus_outcome_advantage`): per-token discounted
/// returns, whitened over every loss token of the batch. Returns are computed per sequence from its
/// last token backwards: at a loss token `G_t = r_t + gamma * G_next`; a masked token (tool output)
/// adds its reward without a discount step and gets advantage 0. verl instead zeroes the running
/// return at masked positions (meant for padding after EOS); with packed sequences there is no
/// padding, and zeroing at tool outputs would hide a final reward from earlier turns. With an outcome
/// reward on the last token and gamma 1, every loss token of a sequence gets the same return.
/// If all returns are equal the advantages are 0. Token rewards must be finite.
pub fn reinforce_pp(
    token_rewards: &[f32],
    cu_seqlens: &[u32],
    loss_mask: &[bool],
    gamma: f32,
    whiten: WhitenConfig,
) -> Result<Vec<f32>, Error> {
    seqs::validate(cu_seqlens, loss_mask.len())?;
    check_len("token rewards", loss_mask.len(), token_rewards.len())?;
    check_finite("token rewards", token_rewards)?;
    if !(gamma.is_finite() && (0.0..=1.0).contains(&gamma)) {
        return Err(Error::Config { what: "gamma", why: format!("{gamma} is not in [0, 1]") });
    }
    validate_whiten(&whiten)?;
    let returns = cpu::discounted_returns(token_rewards, cu_seqlens, loss_mask, gamma);
    cpu::whiten(&returns, loss_mask, whiten)
}

/// REINFORCE++-baseline (verl `compute_reinforce_plus_plus_baseline_outcome_advantage`): the
/// sample's reward minus its group mean, put on each of its loss tokens, then whitened over all
/// loss tokens of the batch. The tokens of a group whose rewards are all equal stay 0 (verl gives
/// them minus the batch mean over the std). Sequences are samples (one reward per sequence). Singleton groups and
/// non-finite rewards follow `singleton` and `non_finite` as in [`sample_advantages`] (ignored samples
/// are left out of the whitening statistics and get 0).
pub fn reinforce_pp_baseline(
    rewards: &[f32],
    groups: Groups<'_>,
    cu_seqlens: &[u32],
    loss_mask: &[bool],
    singleton: SingletonPolicy,
    non_finite: NonFinitePolicy,
    whiten: WhitenConfig,
) -> Result<Vec<f32>, Error> {
    let num_seqs = seqs::validate(cu_seqlens, loss_mask.len())?;
    check_len("rewards (one per sequence)", num_seqs, rewards.len())?;
    validate_rewards(rewards, non_finite)?;
    validate_whiten(&whiten)?;
    let members = groups.resolve(rewards.len())?;
    let config = AdvantageConfig { estimator: Estimator::Grpo(GrpoConfig::dr_grpo()), singleton, non_finite };
    let (centred, _) = cpu::sample_advantages(rewards, &members, &config)?;
    // Tokens of ignored (non-finite) samples leave the whitening statistics.
    let mut mask = loss_mask.to_vec();
    for (s, r) in rewards.iter().enumerate() {
        if !r.is_finite() {
            mask[cu_seqlens[s] as usize..cu_seqlens[s + 1] as usize].fill(false);
        }
    }
    let per_token = cpu::broadcast(&centred, cu_seqlens, &mask);
    let mut out = cpu::whiten(&per_token, &mask, whiten)?;
    // Whitening shifts by the batch mean, which would give the tokens of an all-equal group a
    // nonzero advantage (verl does); such a group carries no signal, so its tokens stay 0.
    for m in &members {
        let finite: Vec<f32> = m.iter().map(|&i| rewards[i]).filter(|r| r.is_finite()).collect();
        if finite.iter().all(|&r| r == finite[0]) {
            for &s in m {
                out[cu_seqlens[s] as usize..cu_seqlens[s + 1] as usize].fill(0.0);
            }
        }
    }
    Ok(out)
}

fn validate_whiten(whiten: &WhitenConfig) -> Result<(), Error> {
    if whiten.eps.is_finite() && whiten.eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::Config { what: "whiten eps", why: format!("{} is not a finite value >= 0", whiten.eps) })
    }
}
