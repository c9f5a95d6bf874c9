//! The policy loss on a device (a GPU, or squid-cuda's simulator), on the caller's stream:
//! [`super::policy_loss_with_token_loss_into`] over device memory, with every clip, KL estimator,
//! aggregation mode and global denominator, the same metrics and the same typed errors.
//!
//! Per-token inputs, the gradient and the per-token losses live on the device; `cu_seqlens` stays
//! on the host (checked there, uploaded with the call). Two launches: loss tokens per sequence
//! (read back: the aggregation weights are computed on the host from them, as on the CPU), then
//! one block per sequence writing the gradient and per-token losses and partial sums of the loss
//! and every metric, which the host reads back and adds up in f64. A call therefore waits for the
//! stream twice.

use squid_cuda::launch::{DeviceView, DeviceViewMut, Gpu, LaunchDims};

use super::{Aggregation, KlEstimator, Metrics, PolicyLossConfig};
use crate::device::{check_view_len, device_err};
use crate::{seqs, Error};

/// Threads per sequence block.
const BLOCK: u32 = 128;
/// f64 partials per sequence the loss kernel writes.
const PARTIALS: usize = 24;

/// Per-token inputs on the device, packed as in [`super::PolicyLossInputs`].
#[derive(Debug)]
pub struct DevicePolicyLossInputs<'a> {
    /// Log-probs of the sampled tokens under the policy being trained.
    pub new_logp: DeviceView<'a, f32>,
    /// Log-probs under the policy that sampled them.
    pub old_logp: DeviceView<'a, f32>,
    /// Log-probs under the reference policy (needed when a KL term is set).
    pub ref_logp: Option<DeviceView<'a, f32>>,
    /// Per-token advantages.
    pub advantages: DeviceView<'a, f32>,
    /// Nonzero on tokens in the loss.
    pub loss_mask: DeviceView<'a, u8>,
    /// Sequence offsets on the host, `num_seqs + 1` of them.
    pub cu_seqlens: &'a [u32],
    /// Per-token entropy, only for the metrics; must be finite.
    pub entropy: Option<DeviceView<'a, f32>>,
}

/// The policy loss on the device: writes d loss / d new_logp into `grad` and each token's loss
/// `l_t` before aggregation into `token_loss` (0 on masked tokens), returns the loss and the
/// metrics. Errors are the CPU path's: lengths, `cu_seqlens`, the config, a KL term without
/// `ref_logp`, the first non-finite input (new, old, advantages, ref, entropy in that order), and a
/// loss, metric, gradient or token loss that overflows f32. On an error the outputs may hold
/// partial results.
pub fn policy_loss<'g, 't>(
    gpu: &Gpu,
    inputs: DevicePolicyLossInputs<'_>,
    config: &PolicyLossConfig,
    grad: impl Into<DeviceViewMut<'g, f32>>,
    token_loss: impl Into<DeviceViewMut<'t, f32>>,
) -> Result<(f32, Metrics), Error> {
    let (grad, token_loss) = (grad.into(), token_loss.into());
    let t = inputs.new_logp.len();
    let num_seqs = seqs::validate(inputs.cu_seqlens, t)?;
    check_view_len("old_logp", t, inputs.old_logp.len())?;
    check_view_len("advantages", t, inputs.advantages.len())?;
    check_view_len("loss_mask", t, inputs.loss_mask.len())?;
    if let Some(r) = &inputs.ref_logp {
        check_view_len("ref_logp", t, r.len())?;
    }
    if let Some(e) = &inputs.entropy {
        check_view_len("entropy", t, e.len())?;
    }
    config.validate()?;
    if config.kl.is_some() && inputs.ref_logp.is_none() {
        return Err(Error::Config { what: "kl", why: "a KL term needs ref_logp".into() });
    }
    check_view_len("grad", t, grad.len())?;
    check_view_len("token_loss", t, token_loss.len())?;
    let empty =
        Metrics { kl: config.kl.map(|_| 0.0), entropy: inputs.entropy.as_ref().map(|_| 0.0), ..Metrics::default() };
    if num_seqs == 0 {
        return Ok((0.0, empty));
    }
    let grid = u32::try_from(num_seqs)
        .map_err(|_| Error::Size { what: "sequences", why: format!("{num_seqs} exceed one grid dimension") })?;
    let dims = LaunchDims::per_row(grid, BLOCK);
    let cu = gpu.upload(inputs.cu_seqlens).map_err(device_err)?;
    let mut counts = gpu.zeros::<u32>(num_seqs).map_err(device_err)?;
    // SAFETY: (const u8* mask, const u32* cu_seqlens, u32* counts): block s < num_seqs reads
    // cu[s..=s+1] (validated: non-decreasing, last = len(mask)), mask at cu[s]..cu[s+1], writes counts[s].
    let k = unsafe { gpu.typed_kernel::<(DeviceView<'_, u8>, &_, &mut _)>(&super::KERNEL, "squid_pl_counts") }
        .map_err(device_err)?;
    k.launch(gpu, dims, (inputs.loss_mask.slice(..).map_err(device_err)?, &cu, &mut counts)).map_err(device_err)?;
    let counts = gpu.download(&counts).map_err(device_err)?;
    let loss_tokens: usize = counts.iter().map(|&n| n as usize).sum();
    let loss_seqs = counts.iter().filter(|&&n| n > 0).count();
    let tok_den = config.denominators.tokens.unwrap_or(loss_tokens as f64);
    let seq_den = config.denominators.seqs.unwrap_or(loss_seqs as f64);
    // The CPU path's weights, to the bit.
    let weights: Vec<f32> = counts
        .iter()
        .map(|&n| {
            let n_s = f64::from(n);
            if n_s == 0.0 {
                return 0.0;
            }
            let w = match config.aggregation {
                Aggregation::TokenMean => 1.0 / tok_den,
                Aggregation::TokenSum => 1.0,
                Aggregation::SeqMeanTokenSum => 1.0 / seq_den,
                Aggregation::SeqMeanTokenMean => 1.0 / (n_s * seq_den),
                Aggregation::SeqMeanTokenSumNorm { budget } => 1.0 / (f64::from(budget) * seq_den),
            };
            w as f32
        })
        .collect();
    let kl = config.kl;
    let kl_mode = match kl.map(|k| k.estimator) {
        None => 0.0,
        Some(KlEstimator::K1) => 1.0,
        Some(KlEstimator::K2) => 2.0,
        Some(KlEstimator::K3) => 3.0,
        Some(KlEstimator::K3Plus) => 4.0,
    };
    let params = [
        1.0 - config.clip_low,
        1.0 + config.clip_high,
        config.dual_clip.unwrap_or(0.0),
        f32::from(u8::from(config.dual_clip.is_some())),
        kl.map_or(0.0, |k| k.beta),
        kl.and_then(|k| k.k3_clamp).unwrap_or(f32::INFINITY),
        kl_mode,
        f32::from(u8::from(inputs.entropy.is_some())),
        f32::from(u8::from(inputs.ref_logp.is_some())),
    ];
    let weights = gpu.upload(&weights).map_err(device_err)?;
    let params = gpu.upload(&params).map_err(device_err)?;
    let mut partials = gpu.zeros::<f64>(PARTIALS * num_seqs).map_err(device_err)?;
    let reference = match inputs.ref_logp {
        Some(r) => r,
        None => inputs.new_logp.slice(..).map_err(device_err)?, // never read (has_ref = 0)
    };
    let entropy = match inputs.entropy {
        Some(e) => e,
        None => inputs.new_logp.slice(..).map_err(device_err)?, // never read (has_entropy = 0)
    };
    // SAFETY: (const float* new, old, ref, adv, const u8* mask, const float* entropy, const u32* cu,
    // const float* weights, const float* params, float* grad, float* token_loss, double* partials):
    // block s < num_seqs reads cu[s..=s+1] (validated, last = t), weights[s] (num_seqs entries),
    // params[0..9], the inputs at tokens cu[s]..cu[s+1] (every per-token view has length t,
    // checked), writes grad and token_loss there (length t) and partials[24 s..24 s + 24].
    let k = unsafe {
        gpu.typed_kernel::<(
            DeviceView<'_, f32>,
            DeviceView<'_, f32>,
            DeviceView<'_, f32>,
            DeviceView<'_, f32>,
            DeviceView<'_, u8>,
            DeviceView<'_, f32>,
            &_,
            &_,
            &_,
            DeviceViewMut<'_, f32>,
            DeviceViewMut<'_, f32>,
            &mut _,
        )>(&super::KERNEL, "squid_pl_loss")
    }
    .map_err(device_err)?;
    let args = (
        inputs.new_logp,
        inputs.old_logp,
        reference,
        inputs.advantages,
        inputs.loss_mask,
        entropy,
        &cu,
        &weights,
        &params,
        grad,
        token_loss,
        &mut partials,
    );
    k.launch(gpu, dims, args).map_err(device_err)?;
    let rows = gpu.download(&partials).map_err(device_err)?;
    let rows: Vec<&[f64]> = rows.chunks(PARTIALS).collect();
    let first_bad = |k: usize| -> Option<(usize, f32)> {
        rows.iter()
            .filter(|r| r[10 + 2 * k] >= 0.0)
            .min_by(|a, b| a[10 + 2 * k].total_cmp(&b[10 + 2 * k]))
            .map(|r| (r[10 + 2 * k] as usize, r[11 + 2 * k] as f32))
    };
    for (k, what) in ["new_logp", "old_logp", "advantages", "ref_logp", "entropy"].into_iter().enumerate() {
        if let Some((index, value)) = first_bad(k) {
            return Err(Error::NonFinite { what, index, value });
        }
    }
    let sum = |i: usize| rows.iter().map(|r| r[i]).sum::<f64>();
    let n = loss_tokens.max(1) as f64;
    let metrics = Metrics {
        clip_frac_low: (sum(1) / n) as f32,
        clip_frac_high: (sum(2) / n) as f32,
        dual_clip_frac: (sum(3) / n) as f32,
        approx_kl: (sum(7) / n) as f32,
        kl: kl.map(|_| (sum(8) / n) as f32),
        entropy: empty.entropy.map(|_| (sum(9) / n) as f32),
        ratio_min: if loss_tokens > 0 { rows.iter().map(|r| r[5]).fold(f64::INFINITY, f64::min) as f32 } else { 0.0 },
        ratio_mean: (sum(4) / n) as f32,
        ratio_max: if loss_tokens > 0 {
            rows.iter().map(|r| r[6]).fold(f64::NEG_INFINITY, f64::max) as f32
        } else {
            0.0
        },
        loss_tokens,
        loss_seqs,
    };
    let loss = sum(0) as f32;
    let m = &metrics;
    let scalars = [loss, m.approx_kl, m.kl.unwrap_or(0.0), m.entropy.unwrap_or(0.0), m.ratio_mean];
    if let Some(i) = scalars.iter().position(|v| !v.is_finite()) {
        const NAMES: [&str; 5] = ["loss", "approx_kl metric", "kl metric", "entropy metric", "ratio_mean metric"];
        return Err(Error::NonFinite { what: NAMES[i], index: 0, value: scalars[i] });
    }
    for (k, what) in [(5, "grad_new_logp (overflowed)"), (6, "token_loss (overflowed)")] {
        if let Some((index, value)) = first_bad(k) {
            return Err(Error::NonFinite { what, index, value });
        }
    }
    Ok((loss, metrics))
}
