//! The fused log-softmax + gather + entropy on a device (a GPU, or squid-cuda's simulator), on
//! the caller's stream: [`super::logprobs`] and [`super::logprobs_backward`] over device memory.
//!
//! Logits `[tokens, vocab]` are f32, bf16 or f16; the forward is one block per token row with an
//! online (max, sum, weighted sum) per thread (no `[tokens, vocab]` probabilities, O(1) state per
//! thread whatever the vocabulary); the backward recomputes the probabilities chunk by chunk of
//! [`CHUNK`] vocabulary entries. Gradients come out in the logits' type or in f32. Targets, outputs
//! and gradients stay on the device; each call downloads two words per row (a status the kernels
//! write) to report the CPU path's typed errors, so it waits for the stream.

use squid_cuda::launch::{DeviceCopy, DeviceView, DeviceViewMut, Gpu, LaunchDims};
use squid_cuda::{DType, Element};

use crate::device::{check_view_len, device_err};
use crate::{check_len, checked_product, Error};

/// Threads per block (both kernels).
const BLOCK: u32 = 256;
/// Vocabulary entries per block of the backward.
pub const CHUNK: usize = 2048;

/// The forward's outputs on the device, one entry per token.
#[derive(Debug)]
pub struct LogprobViews<'a> {
    /// `log softmax(x)[y]`.
    pub logp: DeviceViewMut<'a, f32>,
    /// Entropy of `softmax(x)` (nats).
    pub entropy: DeviceViewMut<'a, f32>,
    /// `logsumexp(x)`, kept for the backward.
    pub lse: DeviceViewMut<'a, f32>,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    }
}

fn entry(name: String) -> Result<&'static str, Error> {
    super::KERNEL.entries.iter().copied().find(|e| *e == name).ok_or_else(|| Error::Config {
        what: "gradient storage type",
        why: format!("no kernel {name}: gradients are in the logits' type or f32"),
    })
}

fn validate(tokens: usize, logits: usize, vocab: usize) -> Result<u32, Error> {
    if vocab == 0 {
        return Err(Error::Config { what: "vocab", why: "must be at least 1".into() });
    }
    check_len("logits (tokens * vocab)", checked_product("logits (tokens * vocab)", tokens, vocab)?, logits)?;
    u32::try_from(tokens)
        .map_err(|_| Error::Size { what: "tokens", why: format!("{tokens} exceed one grid dimension") })
}

/// Turns the kernels' per-row status words into the CPU path's first error.
fn status_error(status: &[u32], vocab: usize, names: &[&'static str]) -> Result<(), Error> {
    for (code, what) in names.iter().enumerate().map(|(c, w)| (c as u32 + 1, *w)) {
        if let Some(index) = status.chunks(2).position(|s| s[0] == code) {
            let payload = status[2 * index + 1];
            return Err(if code == 1 {
                Error::TargetOutOfRange { index, id: payload, vocab }
            } else {
                Error::NonFinite { what, index, value: f32::from_bits(payload) }
            });
        }
    }
    Ok(())
}

/// [`super::logprobs_into`] on the device: per token row of `logits` its log-prob of `targets[t]`,
/// entropy and log-sum-exp into `out`. A target outside the vocabulary and a row whose
/// log-sum-exp (or entropy) is not finite are the CPU path's errors.
pub fn logprobs<'x, 'y, T: Element + DeviceCopy>(
    gpu: &Gpu,
    logits: impl Into<DeviceView<'x, T>>,
    vocab: usize,
    targets: impl Into<DeviceView<'y, u32>>,
    out: LogprobViews<'_>,
) -> Result<(), Error> {
    let (logits, targets) = (logits.into(), targets.into());
    let n = targets.len();
    let rows = validate(n, logits.len(), vocab)?;
    check_view_len("logp", n, out.logp.len())?;
    check_view_len("entropy", n, out.entropy.len())?;
    check_view_len("lse", n, out.lse.len())?;
    if n == 0 {
        return Ok(());
    }
    let mut status = gpu.zeros::<u32>(2 * n).map_err(device_err)?;
    let name = entry(format!("squid_logprob_fwd_{}", dtype_name(T::DTYPE)))?;
    // SAFETY: (const T* logits, const u32* targets, float* logp, float* entropy, float* lse, u32*
    // status, long long vocab): block r < rows = len(targets) reads logits[r * vocab ..][..vocab]
    // (len = rows * vocab, checked), targets[r], the target's logit only when it is < vocab, and
    // writes entry r of logp, entropy, lse (len rows each) and status[2r..2r+2].
    let k = unsafe {
        gpu.typed_kernel::<(
            DeviceView<'_, T>,
            DeviceView<'_, u32>,
            DeviceViewMut<'_, f32>,
            DeviceViewMut<'_, f32>,
            DeviceViewMut<'_, f32>,
            &mut _,
            i64,
        )>(&super::KERNEL, name)
    }
    .map_err(device_err)?;
    let args = (logits, targets, out.logp, out.entropy, out.lse, &mut status, vocab as i64);
    k.launch(gpu, LaunchDims::per_row(rows, BLOCK), args).map_err(device_err)?;
    let status = gpu.download(&status).map_err(device_err)?;
    status_error(&status, vocab, &["", "logits row log-sum-exp"])
}

/// The forward's results the backward reads, on the device.
#[derive(Debug)]
pub struct ForwardViews<'a> {
    /// `logsumexp(x)` per token.
    pub lse: DeviceView<'a, f32>,
    /// Entropy per token.
    pub entropy: DeviceView<'a, f32>,
}

/// [`super::logprobs_backward`] on the device: `grad_logits[t, v] = g_t ([v = y_t] - p_tv) - h_t p_tv
/// (log p_tv + H_t)`, written (not accumulated) in `G` (the logits' type or f32). Non-finite
/// `lse`, `entropy`, `grad_logp` or `grad_entropy` and targets outside the vocabulary are the CPU
/// path's errors, and the rows they name are not written.
#[allow(clippy::too_many_arguments)]
pub fn logprobs_backward<'x, 'y, 'g, 'h, 'd, T: Element + DeviceCopy, G: Element + DeviceCopy>(
    gpu: &Gpu,
    logits: impl Into<DeviceView<'x, T>>,
    vocab: usize,
    targets: impl Into<DeviceView<'y, u32>>,
    forward: ForwardViews<'_>,
    grad_logp: impl Into<DeviceView<'g, f32>>,
    grad_entropy: Option<DeviceView<'h, f32>>,
    grad_logits: impl Into<DeviceViewMut<'d, G>>,
) -> Result<(), Error> {
    let (logits, targets, grad_logp, grad_logits) =
        (logits.into(), targets.into(), grad_logp.into(), grad_logits.into());
    let n = targets.len();
    let rows = validate(n, logits.len(), vocab)?;
    check_view_len("forward.lse", n, forward.lse.len())?;
    check_view_len("forward.entropy", n, forward.entropy.len())?;
    check_view_len("grad_logp", n, grad_logp.len())?;
    if let Some(h) = &grad_entropy {
        check_view_len("grad_entropy", n, h.len())?;
    }
    check_view_len("grad_logits", logits.len(), grad_logits.len())?;
    if n == 0 {
        return Ok(());
    }
    let chunks = u32::try_from(vocab.div_ceil(CHUNK))
        .map_err(|_| Error::Size { what: "vocab", why: format!("{vocab} entries need too many chunks") })?;
    let name = entry(format!("squid_logprob_bwd_{}_{}", dtype_name(T::DTYPE), dtype_name(G::DTYPE)))?;
    let mut status = gpu.zeros::<u32>(2 * n).map_err(device_err)?;
    let has_h = i32::from(grad_entropy.is_some());
    // Without grad_entropy the kernel never reads its pointer (has_grad_entropy = 0): pass grad_logp.
    let h = match grad_entropy {
        Some(h) => h,
        None => grad_logp.slice(..).map_err(device_err)?,
    };
    // SAFETY: (const T* logits, const u32* targets, const float* lse, const float* entropy, const
    // float* grad_logp, const float* grad_entropy, G* grad_logits, u32* status, long long vocab, int
    // has_grad_entropy): block (r, c), r < rows = len(targets), reads entry r of targets, lse,
    // entropy, grad_logp, grad_entropy (len rows each, checked), and, only when the target is <
    // vocab, logits and grad_logits at r * vocab + [c * CHUNK, min((c + 1) * CHUNK, vocab)) (both of
    // len rows * vocab, checked); block (r, 0) writes status[2r..2r+2].
    let k = unsafe {
        gpu.typed_kernel::<(
            DeviceView<'_, T>,
            DeviceView<'_, u32>,
            DeviceView<'_, f32>,
            DeviceView<'_, f32>,
            DeviceView<'_, f32>,
            DeviceView<'_, f32>,
            DeviceViewMut<'_, G>,
            &mut _,
            i64,
            i32,
        )>(&super::KERNEL, name)
    }
    .map_err(device_err)?;
    let dims = LaunchDims { grid: (rows, chunks, 1), block: (BLOCK, 1, 1), shared_bytes: 0 };
    let args =
        (logits, targets, forward.lse, forward.entropy, grad_logp, h, grad_logits, &mut status, vocab as i64, has_h);
    k.launch(gpu, dims, args).map_err(device_err)?;
    let status = gpu.download(&status).map_err(device_err)?;
    status_error(&status, vocab, &["", "forward.lse", "forward.entropy", "grad_logp", "grad_entropy"])
}
