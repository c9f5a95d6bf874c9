//! Advantages on a device (a GPU, or squid-cuda's simulator), on the caller's stream: the same
//! estimators, edge-case policies, statistics and typed errors as [`super::sample_advantages_with_stats`]
//! and [`super::broadcast_to_tokens`].
//!
//! Rewards, advantages and masks live on the device (`DeviceView`/`DeviceViewMut`: the caller's
//! memory, no copies); the grouping and `cu_seqlens` stay on the host, where they are checked and
//! turned into the small index tables the kernels read. Each call downloads a few numbers per group
//! (or per sequence) to report statistics and errors, so it waits for the stream.

use squid_cuda::launch::{DeviceView, DeviceViewMut, Gpu, LaunchDims};

use super::{
    validate_config, AdvantageConfig, Estimator, GroupStats, Groups, NonFinitePolicy, SingletonPolicy, StdScope,
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
    let mut offsets = Vec::with_capacity(members.len() + 1);
    offsets.push(0u32);
    let mut flat = Vec::with_capacity(n);
    for m in &members {
        for &i in m {
            flat.push(to_u32("samples", i)?);
        }
        offsets.push(to_u32("samples", flat.len())?);
    }
    let offsets = gpu.upload(&offsets).map_err(device_err)?;
    let flat = gpu.upload(&flat).map_err(device_err)?;
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
