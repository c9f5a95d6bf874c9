//! Advantages on a device (a GPU, or squid-cuda's simulator), on the caller's stream: the same
//! estimators, edge-case policies, statistics and typed errors as [`super::sample_advantages_with_stats`]
//! and [`super::broadcast_to_tokens`].
//!
//! Rewards, advantages and masks live on the device (`DeviceView`/`DeviceViewMut`: the caller's
//! memory, no copies); the grouping and `cu_seqlens` stay on the host, where they are checked and
//! turned into the small index tables the kernels read. Each call downloads a few numbers per group
//! (or per sequence) to report statistics and errors, so it waits for the stream.

use squid_cuda::launch::{DeviceBuffer, DeviceView, DeviceViewMut, Gpu, LaunchDims};

use super::{
    validate_config, validate_whiten, AdvantageConfig, Estimator, GroupFilter, GroupStats, Groups, NonFinitePolicy,
    SingletonPolicy, StdScope, WhitenConfig,
};
use crate::device::{blocks, check_view_len, device_err, to_u32};
use crate::{seqs, Error};

/// Groups per block of `squid_adv_groups` (one warp each).
const GROUPS_PER_BLOCK: usize = 4;
/// Threads of the batch-statistics and broadcast blocks.
const BLOCK: u32 = 256;
/// f64 entries per group in the statistics the kernel writes.
const STATS: usize = 7;

/// The estimator, std scope, bias and singleton policy as the kernel's `mode` bits.
fn mode(config: &AdvantageConfig) -> (i32, f32) {
    let (kind, unbiased, eps) = match config.estimator {
        Estimator::Grpo(g) => {
            let kind = match g.scope {
                StdScope::None => 0,
                StdScope::Group => 1,
                StdScope::Batch => 2,
            };
            (kind, g.unbiased_std, g.eps)
        }
        Estimator::Rloo => (3, true, 0.0),
    };
    let singleton = match config.singleton {
        SingletonPolicy::Error => 0,
        SingletonPolicy::Zero => 1,
        SingletonPolicy::RawScore => 2,
    };
    (kind | (i32::from(unbiased) << 2) | (singleton << 3), eps)
}

/// [`super::sample_advantages_with_stats`] on the device: one advantage per sample of `rewards`
/// into `out`, and each group's statistics (returned to the host). Errors are the CPU path's, in
/// its order: a non-finite reward (unless ignored), a singleton group (unless allowed), a computed
/// advantage that overflows f32. On an error `out` may hold partial results.
pub fn sample_advantages<'r, 'o>(
    gpu: &Gpu,
    rewards: impl Into<DeviceView<'r, f32>>,
    groups: Groups<'_>,
    config: &AdvantageConfig,
    out: impl Into<DeviceViewMut<'o, f32>>,
) -> Result<Vec<GroupStats>, Error> {
    let (rewards, out) = (rewards.into(), out.into());
    validate_config(config)?;
    let n = rewards.len();
    check_view_len("advantages out", n, out.len())?;
    let members = groups.resolve(n)?;
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let (offsets, flat) = group_tables(gpu, &members, n)?;
    let mut batch = gpu.zeros::<f64>(3).map_err(device_err)?;
    let mut stats = gpu.zeros::<f64>(members.len() * STATS).map_err(device_err)?;
    if matches!(config.estimator, Estimator::Grpo(g) if g.scope == StdScope::Batch) {
        // SAFETY: (const float* rewards, long long n, double* batch): one block reads rewards[0..n]
        // (n = its length) and writes batch[0..3].
        let k =
            unsafe { gpu.typed_kernel::<(DeviceView<'_, f32>, i64, &mut _)>(&super::KERNEL, "squid_adv_batch_stats") }
                .map_err(device_err)?;
        k.launch(gpu, LaunchDims::per_row(1, BLOCK), (rewards.slice(..).map_err(device_err)?, n as i64, &mut batch))
            .map_err(device_err)?;
    }
    let (mode, eps) = mode(config);
    let grid = blocks("advantage groups", members.len(), GROUPS_PER_BLOCK)?;
    // SAFETY: the entry is (const float* rewards, const u32* offsets, const u32* members, const
    // double* batch, float* out, double* stats, long long num_groups, int mode, float eps). Warp g
    // < num_groups reads offsets[g..=g+1] (num_groups + 1 entries), members[offsets[g]..offsets[g+1]]
    // (all < n, built above from Groups::resolve(n)), those rewards, batch[0..3], and writes out at
    // those members (len n) and stats[7g..7g+7].
    let k = unsafe {
        gpu.typed_kernel::<(DeviceView<'_, f32>, &_, &_, &_, DeviceViewMut<'_, f32>, &mut _, i64, i32, f32)>(
            &super::KERNEL,
            "squid_adv_groups",
        )
    }
    .map_err(device_err)?;
    k.launch(
        gpu,
        LaunchDims::per_row(grid, 32 * GROUPS_PER_BLOCK as u32),
        (rewards, &offsets, &flat, &batch, out, &mut stats, members.len() as i64, mode, eps),
    )
    .map_err(device_err)?;
    let stats = gpu.download(&stats).map_err(device_err)?;
    let rows: Vec<&[f64]> = stats.chunks(STATS).collect();
    if config.non_finite == NonFinitePolicy::Error {
        if let Some(r) = rows.iter().filter(|r| r[3] >= 0.0).min_by(|a, b| a[3].total_cmp(&b[3])) {
            return Err(Error::NonFinite { what: "rewards", index: r[3] as usize, value: r[4] as f32 });
        }
    }
    if config.singleton == SingletonPolicy::Error {
        if let Some(group) = rows.iter().position(|r| r[0] == 1.0) {
            return Err(Error::SingletonGroup { group });
        }
    }
    if let Some(r) = rows.iter().filter(|r| r[5] >= 0.0).min_by(|a, b| a[5].total_cmp(&b[5])) {
        return Err(Error::NonFinite { what: "computed advantage", index: r[5] as usize, value: r[6] as f32 });
    }
    Ok(rows.iter().map(|r| GroupStats { count: r[0] as usize, mean: r[1], std: r[2] }).collect())
}

/// [`super::broadcast_to_tokens`] on the device: token t of sequence s gets `advantages[s]` where
/// `loss_mask[t] != 0`, else 0. `cu_seqlens` is on the host; a non-finite advantage is an error
/// naming the sequence (`out` then holds the broadcast, that value included).
pub fn broadcast_to_tokens<'a, 'm, 'o>(
    gpu: &Gpu,
    advantages: impl Into<DeviceView<'a, f32>>,
    cu_seqlens: &[u32],
    loss_mask: impl Into<DeviceView<'m, u8>>,
    out: impl Into<DeviceViewMut<'o, f32>>,
) -> Result<(), Error> {
    let (advantages, mask, out) = (advantages.into(), loss_mask.into(), out.into());
    let num_seqs = seqs::validate(cu_seqlens, mask.len())?;
    check_view_len("advantages (one per sequence)", num_seqs, advantages.len())?;
    check_view_len("advantages out (one per token)", mask.len(), out.len())?;
    if num_seqs == 0 {
        return Ok(());
    }
    let grid = u32::try_from(num_seqs)
        .map_err(|_| Error::Size { what: "sequences", why: format!("{num_seqs} exceed one grid dimension") })?;
    let cu = gpu.upload(cu_seqlens).map_err(device_err)?;
    let mut bad = gpu.zeros::<f32>(num_seqs).map_err(device_err)?;
    // SAFETY: (const float* adv, const u32* cu_seqlens, const u8* mask, float* out, float* bad): block
    // s < num_seqs reads adv[s], cu[s..=s+1] (validated: non-decreasing, last = len(mask) = len(out)),
    // mask and out at tokens cu[s]..cu[s+1], and writes bad[s].
    let k = unsafe {
        gpu.typed_kernel::<(DeviceView<'_, f32>, &_, DeviceView<'_, u8>, DeviceViewMut<'_, f32>, &mut _)>(
            &super::KERNEL,
            "squid_adv_broadcast",
        )
    }
    .map_err(device_err)?;
    k.launch(gpu, LaunchDims::per_row(grid, BLOCK), (advantages, &cu, mask, out, &mut bad)).map_err(device_err)?;
    let bad = gpu.download(&bad).map_err(device_err)?;
    if let Some(s) = bad.iter().position(|b| !b.is_finite()) {
        return Err(Error::NonFinite { what: "advantages", index: s, value: bad[s] });
    }
    Ok(())
}

/// The groups of `n` samples as the CSR tables the group kernels read: offsets (groups + 1) and
/// the members of each group in turn.
fn group_tables(gpu: &Gpu, members: &[Vec<usize>], n: usize) -> Result<(DeviceBuffer<u32>, DeviceBuffer<u32>), Error> {
    let mut offsets = Vec::with_capacity(members.len() + 1);
    offsets.push(0u32);
    let mut flat = Vec::with_capacity(n);
    for m in members {
        for &i in m {
            flat.push(to_u32("samples", i)?);
        }
        offsets.push(to_u32("samples", flat.len())?);
    }
    Ok((gpu.upload(&offsets).map_err(device_err)?, gpu.upload(&flat).map_err(device_err)?))
}

/// One element of a device view, read back (to name a bad value in an error).
fn read_one(gpu: &Gpu, view: &DeviceView<'_, f32>, i: usize) -> Result<f32, Error> {
    let v = gpu.download_view(&view.slice(i..i + 1).map_err(device_err)?).map_err(device_err)?;
    Ok(v[0])
}

/// Per group of `members`: whether its finite rewards differ (the first of the pair), the first
/// non-finite reward (the second, -1 for none); `keep` gets the flag per sample.
fn group_varies(
    gpu: &Gpu,
    rewards: &DeviceView<'_, f32>,
    members: &[Vec<usize>],
    keep: DeviceViewMut<'_, u8>,
) -> Result<Vec<(bool, f64)>, Error> {
    let n = rewards.len();
    let (offsets, flat) = group_tables(gpu, members, n)?;
    let mut flags = gpu.zeros::<f64>(2 * members.len()).map_err(device_err)?;
    let grid = blocks("advantage groups", members.len(), GROUPS_PER_BLOCK)?;
    // SAFETY: (const float* rewards, const u32* offsets, const u32* members, double* flags, u8* keep,
    // long long num_groups): warp g < num_groups reads offsets[g..=g+1], members[offsets[g]..
    // offsets[g+1]] (all < n = len(rewards) = len(keep), from Groups::resolve(n)), those rewards,
    // writes keep at those members and flags[2g..2g+2] (len 2 num_groups).
    let k = unsafe {
        gpu.typed_kernel::<(DeviceView<'_, f32>, &_, &_, &mut _, DeviceViewMut<'_, u8>, i64)>(
            &super::KERNEL,
            "squid_adv_group_varies",
        )
    }
    .map_err(device_err)?;
    k.launch(
        gpu,
        LaunchDims::per_row(grid, 32 * GROUPS_PER_BLOCK as u32),
        (rewards.clone(), &offsets, &flat, &mut flags, keep, members.len() as i64),
    )
    .map_err(device_err)?;
    let flags = gpu.download(&flags).map_err(device_err)?;
    Ok(flags.chunks(2).map(|f| (f[0] != 0.0, f[1])).collect())
}

/// [`super::filter_zero_variance_groups`] on the device: which groups DAPO's dynamic sampling
/// keeps (returned to the host, as the CPU path's [`GroupFilter`]), and the per-sample mask of
/// kept samples in `keep_out` (1 kept, 0 dropped) for device code that masks rather than gathers.
/// Rewards must be finite (the first non-finite one is named); the grouping is checked first.
pub fn filter_zero_variance_groups<'r, 'k>(
    gpu: &Gpu,
    rewards: impl Into<DeviceView<'r, f32>>,
    groups: Groups<'_>,
    keep_out: impl Into<DeviceViewMut<'k, u8>>,
) -> Result<GroupFilter, Error> {
    let (rewards, keep_out) = (rewards.into(), keep_out.into());
    let n = rewards.len();
    check_view_len("keep mask out", n, keep_out.len())?;
    let members = groups.resolve(n)?;
    if members.is_empty() {
        return Ok(GroupFilter { kept_groups: Vec::new(), kept_samples: Vec::new() });
    }
    let flags = group_varies(gpu, &rewards, &members, keep_out)?;
    if let Some(&(_, i)) = flags.iter().filter(|f| f.1 >= 0.0).min_by(|a, b| a.1.total_cmp(&b.1)) {
        let index = i as usize;
        return Err(Error::NonFinite { what: "rewards", index, value: read_one(gpu, &rewards, index)? });
    }
    let kept_groups: Vec<bool> = flags.iter().map(|f| f.0).collect();
    let mut kept_samples: Vec<usize> =
        members.iter().zip(&kept_groups).filter(|(_, &k)| k).flat_map(|(m, _)| m.iter().copied()).collect();
    kept_samples.sort_unstable();
    Ok(GroupFilter { kept_groups, kept_samples })
}

/// Whitens `x` over the tokens where `mask` is set into `out` ([`super::reinforce_pp`]'s rule:
/// unbiased variance, `eps` under the root, all 0 when every masked value is equal), with the CPU
/// path's errors: fewer than two masked tokens, a non-finite result.
fn whiten_into(
    gpu: &Gpu,
    x: DeviceView<'_, f32>,
    mask: DeviceView<'_, u8>,
    whiten: WhitenConfig,
    mut out: DeviceViewMut<'_, f32>,
) -> Result<(), Error> {
    let n = x.len();
    if n < 2 {
        // Fewer than two tokens cannot hold two loss tokens; count them for the error.
        let count =
            if n == 0 { 0 } else { gpu.download_view(&mask).map_err(device_err)?.iter().filter(|&&m| m != 0).count() };
        return Err(Error::TooFewTokens(count));
    }
    let mut stats = gpu.zeros::<f64>(4).map_err(device_err)?;
    // SAFETY: (const float* x, const u8* mask, long long n, double* stats): one block reads x and
    // mask at i < n (both of length n) and writes stats[0..4].
    let k = unsafe {
        gpu.typed_kernel::<(DeviceView<'_, f32>, DeviceView<'_, u8>, i64, &mut _)>(
            &super::KERNEL,
            "squid_adv_whiten_stats",
        )
    }
    .map_err(device_err)?;
    k.launch(gpu, LaunchDims::per_row(1, BLOCK), (x.clone(), mask.clone(), n as i64, &mut stats))
        .map_err(device_err)?;
    let stats = gpu.download(&stats).map_err(device_err)?;
    let count = stats[0] as usize;
    if count < 2 {
        return Err(Error::TooFewTokens(count));
    }
    let (mean, all_equal) = (stats[1], stats[3] != 0.0);
    let inv = 1.0 / (stats[2] / (count - 1) as f64 + f64::from(whiten.eps)).sqrt();
    let grid = n.div_ceil(BLOCK as usize).clamp(1, WHITEN_MAX_BLOCKS) as u32;
    let mut bad = gpu.zeros::<f64>(2 * grid as usize).map_err(device_err)?;
    // SAFETY: (const float* x, const u8* mask, float* out, double* bad, long long n, double mean,
    // double inv, int all_equal): grid-stride over i < n = len(x) = len(mask) = len(out) (checked by
    // the callers); block b writes bad[2b..2b+2] (len 2 grid).
    let k = unsafe {
        gpu.typed_kernel::<(DeviceView<'_, f32>, DeviceView<'_, u8>, DeviceViewMut<'_, f32>, &mut _, i64, f64, f64, i32)>(
            &super::KERNEL,
            "squid_adv_whiten_apply",
        )
    }
    .map_err(device_err)?;
    k.launch(
        gpu,
        LaunchDims::per_row(grid, BLOCK),
        (x, mask, out.reborrow(), &mut bad, n as i64, mean, inv, i32::from(all_equal)),
    )
    .map_err(device_err)?;
    let bad = gpu.download(&bad).map_err(device_err)?;
    if let Some(b) = bad.chunks(2).filter(|b| b[0] >= 0.0).min_by(|a, b| a[0].total_cmp(&b[0])) {
        return Err(Error::NonFinite { what: "whitened advantage", index: b[0] as usize, value: b[1] as f32 });
    }
    Ok(())
}

/// Most blocks of the whitening pass (grid-stride beyond).
const WHITEN_MAX_BLOCKS: usize = 1024;

/// Checks REINFORCE++'s whitening and discount options (before any launch).
fn check_gamma(gamma: f32) -> Result<(), Error> {
    if gamma.is_finite() && (0.0..=1.0).contains(&gamma) {
        Ok(())
    } else {
        Err(Error::Config { what: "gamma", why: format!("{gamma} is not in [0, 1]") })
    }
}

/// [`super::reinforce_pp`] on the device: discounted per-token returns (one thread per sequence,
/// f64 running sums), whitened over all loss tokens of the batch, into `out` (one per token).
/// The options are checked before the data (the CPU path checks the token rewards' finiteness
/// before `gamma` and `whiten`); the errors are otherwise the CPU path's.
pub fn reinforce_pp<'r, 'm, 'o>(
    gpu: &Gpu,
    token_rewards: impl Into<DeviceView<'r, f32>>,
    cu_seqlens: &[u32],
    loss_mask: impl Into<DeviceView<'m, u8>>,
    gamma: f32,
    whiten: WhitenConfig,
    out: impl Into<DeviceViewMut<'o, f32>>,
) -> Result<(), Error> {
    let (rewards, mask, mut out) = (token_rewards.into(), loss_mask.into(), out.into());
    let num_seqs = seqs::validate(cu_seqlens, mask.len())?;
    check_view_len("token rewards", mask.len(), rewards.len())?;
    check_view_len("advantages out (one per token)", mask.len(), out.len())?;
    check_gamma(gamma)?;
    validate_whiten(&whiten)?;
    let n = mask.len();
    if n == 0 {
        return Err(Error::TooFewTokens(0));
    }
    let mut returns = gpu.zeros::<f32>(n).map_err(device_err)?;
    if num_seqs > 0 {
        let cu = gpu.upload(cu_seqlens).map_err(device_err)?;
        let mut bad = gpu.zeros::<f64>(num_seqs).map_err(device_err)?;
        // SAFETY: (const float* rewards, const u32* cu, const u8* mask, float* out, double* bad, long
        // long num_seqs, float gamma): thread s < num_seqs reads cu[s..=s+1] (validated: non-decreasing,
        // last = n), rewards and mask at tokens cu[s]..cu[s+1] (< n = their lengths), writes out
        // there (len n) and bad[s].
        let k = unsafe {
            gpu.typed_kernel::<(DeviceView<'_, f32>, &_, DeviceView<'_, u8>, &mut _, &mut _, i64, f32)>(
                &super::KERNEL,
                "squid_adv_returns",
            )
        }
        .map_err(device_err)?;
        let grid = blocks("sequences", num_seqs, RETURNS_BLOCK as usize)?;
        k.launch(
            gpu,
            LaunchDims::per_row(grid, RETURNS_BLOCK),
            (rewards.clone(), &cu, mask.clone(), &mut returns, &mut bad, num_seqs as i64, gamma),
        )
        .map_err(device_err)?;
        let bad = gpu.download(&bad).map_err(device_err)?;
        if let Some(&i) = bad.iter().find(|&&b| b >= 0.0) {
            let index = i as usize;
            return Err(Error::NonFinite { what: "token rewards", index, value: read_one(gpu, &rewards, index)? });
        }
    }
    whiten_into(gpu, returns.view(), mask, whiten, out.reborrow())
}

/// Threads per block of the returns pass (one per sequence).
const RETURNS_BLOCK: u32 = 128;

/// [`super::reinforce_pp_baseline`] on the device: the group-centred reward of each sequence
/// ([`sample_advantages`] with Dr. GRPO) on its loss tokens, whitened over the batch, with the
/// tokens of all-equal groups (finite rewards) left at 0. Errors as the CPU path (the whitening
/// options are checked before the rewards).
#[allow(clippy::too_many_arguments)]
pub fn reinforce_pp_baseline<'r, 'm, 'o>(
    gpu: &Gpu,
    rewards: impl Into<DeviceView<'r, f32>>,
    groups: Groups<'_>,
    cu_seqlens: &[u32],
    loss_mask: impl Into<DeviceView<'m, u8>>,
    singleton: SingletonPolicy,
    non_finite: NonFinitePolicy,
    whiten: WhitenConfig,
    out: impl Into<DeviceViewMut<'o, f32>>,
) -> Result<(), Error> {
    let (rewards, mask, mut out) = (rewards.into(), loss_mask.into(), out.into());
    let num_seqs = seqs::validate(cu_seqlens, mask.len())?;
    check_view_len("rewards (one per sequence)", num_seqs, rewards.len())?;
    check_view_len("advantages out (one per token)", mask.len(), out.len())?;
    validate_whiten(&whiten)?;
    let n = mask.len();
    let members = groups.resolve(num_seqs)?;
    if num_seqs == 0 {
        return Err(Error::TooFewTokens(0));
    }
    let config = AdvantageConfig { estimator: Estimator::Grpo(super::GrpoConfig::dr_grpo()), singleton, non_finite };
    let mut centred = gpu.zeros::<f32>(num_seqs).map_err(device_err)?;
    sample_advantages(gpu, rewards.clone(), groups, &config, &mut centred)?;
    if n == 0 {
        return Err(Error::TooFewTokens(0));
    }
    let cu = gpu.upload(cu_seqlens).map_err(device_err)?;
    let mut tokens = gpu.zeros::<f32>(n).map_err(device_err)?;
    let mut keep = gpu.zeros::<u8>(n).map_err(device_err)?;
    let grid = u32::try_from(num_seqs)
        .map_err(|_| Error::Size { what: "sequences", why: format!("{num_seqs} exceed one grid dimension") })?;
    // SAFETY: (const float* rewards, const float* centred, const u32* cu, const u8* mask, float* out,
    // u8* keep): block s < num_seqs reads rewards[s], centred[s] (both num_seqs long), cu[s..=s+1]
    // (validated, last = n), mask at tokens cu[s]..cu[s+1] and writes out and keep there (len n).
    let k = unsafe {
        gpu.typed_kernel::<(DeviceView<'_, f32>, &_, &_, DeviceView<'_, u8>, &mut _, &mut _)>(
            &super::KERNEL,
            "squid_adv_baseline_tokens",
        )
    }
    .map_err(device_err)?;
    k.launch(gpu, LaunchDims::per_row(grid, BLOCK), (rewards.clone(), &centred, &cu, mask, &mut tokens, &mut keep))
        .map_err(device_err)?;
    whiten_into(gpu, tokens.view(), keep.view(), whiten, out.reborrow())?;
    // Whitening shifts by the batch mean; the tokens of a group with no spread stay 0 (as the CPU).
    let mut scratch = gpu.zeros::<u8>(num_seqs).map_err(device_err)?;
    let flags = group_varies(gpu, &rewards, &members, scratch.view_mut())?;
    let mut zero = vec![0u32; num_seqs];
    for (m, f) in members.iter().zip(&flags) {
        if !f.0 {
            m.iter().for_each(|&s| zero[s] = 1);
        }
    }
    let zero = gpu.upload(&zero).map_err(device_err)?;
    // SAFETY: (float* out, const u32* cu, const u32* zero): block s < num_seqs reads zero[s] and
    // cu[s..=s+1] and writes out at tokens cu[s]..cu[s+1] (< n = len(out)).
    let k = unsafe { gpu.typed_kernel::<(DeviceViewMut<'_, f32>, &_, &_)>(&super::KERNEL, "squid_adv_zero_seqs") }
        .map_err(device_err)?;
    k.launch(gpu, LaunchDims::per_row(grid, BLOCK), (out, &cu, &zero)).map_err(device_err)
}
