//! Dense attention in the packed variable-length layout: forward, backward and decode.
//!
//! Shapes (row-major): `q [total_q, HQ, Dk]`, `k [total_k, HKV, Dk]`, `v [total_k, HKV, Dv]`,
//! `o [total_q, HQ, Dv]`, `lse [HQ, total_q]` (natural log, f32). Sequence `s` owns query rows
//! `cu_seqlens_q[s]..cu_seqlens_q[s+1]` and key rows `cu_seqlens_k[s]..cu_seqlens_k[s+1]`.
//!
//! Masks: query `i` of a sequence with `Tq` queries and `Tk` keys sits at position
//! `p = i + Tk - Tq` (bottom-right aligned, as FlashAttention 2.1+: the last query sees the
//! last key). It sees key `j` when `j <= p` (if causal) and `j > p - w` (with a window `w`: the
//! window holds `w` keys including the current one, flash-attn's `(w - 1, 0)`). A query that sees
//! no key (e.g. `Tq > Tk` under the causal mask) gets `o = 0` and `lse = -inf`, and zero
//! gradients.

use squid_cuda::Element;

use crate::layout::{check_finite, expect_len, numel, rows_of, validate_cu_seqlens};
use crate::{Error, Heads};

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_decode;
#[cfg(all(test, feature = "cuda"))]
mod cuda_decode_tests;
#[cfg(all(test, feature = "cuda"))]
mod cuda_stream_tests;
#[cfg(all(test, feature = "cuda"))]
pub(crate) mod cuda_tests;
pub mod flash;
pub mod naive;
#[cfg(test)]
pub(crate) mod tests;

/// The CUDA source of the device decode (launchers in `cuda_decode`, feature `cuda`): split-KV
/// over packed or paged K/V, bf16 and f16, and the split combine.
pub const DECODE_KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "decode",
    "src/dense/decode.cu",
    [
        "squid_decode_bf16",
        "squid_decode_f16",
        "squid_decode_paged_bf16",
        "squid_decode_paged_f16",
        "squid_decode_combine_bf16",
        "squid_decode_combine_f16",
        "squid_attn_fill_b16",
        "squid_attn_fill_f32",
        "squid_decode_gather_rows_b16"
    ],
    fast_math = false
);

/// What to compute: heads, masks, scale, and whether to check inputs for NaN/inf.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DenseConfig {
    /// Head counts and dimensions.
    pub heads: Heads,
    /// Causal mask (bottom-right aligned).
    pub causal: bool,
    /// Left sliding window: the number of keys a query sees, itself included.
    pub window: Option<usize>,
    /// Softmax scale; `None` means `1 / sqrt(Dk)`.
    pub scale: Option<f32>,
    /// Reject NaN and infinities in the inputs with [`Error::NonFinite`] (one pass over them).
    pub check_finite: bool,
}

impl DenseConfig {
    /// Causal attention with the default scale, no window, no finiteness check.
    pub fn causal(heads: Heads) -> Self {
        Self { heads, causal: true, window: None, scale: None, check_finite: false }
    }

    /// The softmax scale in use.
    pub fn softmax_scale(&self) -> f32 {
        self.scale.unwrap_or_else(|| self.heads.default_scale())
    }

    /// Checks heads, window and scale.
    pub fn validate(&self) -> Result<(), Error> {
        self.heads.validate()?;
        if self.window == Some(0) {
            return Err(Error::Config("window = 0: a window holds at least the current key".into()));
        }
        if let Some(s) = self.scale {
            if !s.is_finite() || s == 0.0 {
                return Err(Error::Config(format!("softmax scale {s} must be finite and non-zero")));
            }
        }
        Ok(())
    }

    /// The keys `lo..hi` (half-open, in sequence coordinates) that query `i` of a sequence with
    /// `tq` queries and `tk` keys sees; empty when `lo >= hi`.
    pub fn key_range(&self, i: usize, tq: usize, tk: usize) -> (usize, usize) {
        let p = i as i64 + tk as i64 - tq as i64;
        let hi = if self.causal { (p + 1).clamp(0, tk as i64) } else { tk as i64 };
        let lo = match self.window {
            Some(w) => (p.saturating_sub(window_i64(w)) + 1).clamp(0, tk as i64),
            None => 0,
        };
        (lo as usize, hi.max(lo) as usize)
    }
}

/// A window as `i64` for the mask arithmetic: any window past `i64::MAX` keys (`usize::MAX`
/// among them) holds every key, as no window does (a plain `as` cast would turn it negative and
/// hide every key).
pub(crate) fn window_i64(w: usize) -> i64 {
    i64::try_from(w).unwrap_or(i64::MAX)
}

/// Forward result.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseOutput<T> {
    /// `[total_q, HQ, Dv]`.
    pub o: Vec<T>,
    /// `[HQ, total_q]`, natural-log sum of exp of the scaled scores; `-inf` for a query that sees
    /// no key.
    pub lse: Vec<f32>,
}

/// Backward result.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseGrads<T> {
    /// `[total_q, HQ, Dk]`.
    pub dq: Vec<T>,
    /// `[total_k, HKV, Dk]`, summed over the query heads of each group.
    pub dk: Vec<T>,
    /// `[total_k, HKV, Dv]`, summed over the query heads of each group.
    pub dv: Vec<T>,
}

/// Token counts and sequence count of a validated call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub total_q: usize,
    pub total_k: usize,
    pub num_seqs: usize,
}

/// Validates the shapes shared by forward, backward and decode (lengths only).
pub(crate) fn validate_lens(
    cfg: &DenseConfig,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<Dims, Error> {
    cfg.validate()?;
    let h = cfg.heads;
    let total_q = rows_of("q", q_len, h.num_q_heads, h.head_dim_k)?;
    let total_k = rows_of("k", k_len, h.num_kv_heads, h.head_dim_k)?;
    expect_len("v", v_len, numel("v", &[total_k, h.num_kv_heads, h.head_dim_v])?, "[total_k, HKV, Dv]")?;
    let num_seqs = validate_cu_seqlens(cu_seqlens_q, total_q)?;
    let num_k = validate_cu_seqlens(cu_seqlens_k, total_k)?;
    if num_seqs != num_k {
        return Err(Error::CuSeqlens(format!("cu_seqlens_q describes {num_seqs} sequences but cu_seqlens_k {num_k}")));
    }
    Ok(Dims { total_q, total_k, num_seqs })
}

pub(crate) fn validate<T: Element>(
    cfg: &DenseConfig,
    q: &[T],
    k: &[T],
    v: &[T],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<Dims, Error> {
    let dims = validate_lens(cfg, q.len(), k.len(), v.len(), cu_seqlens_q, cu_seqlens_k)?;
    if cfg.check_finite {
        check_finite("q", q)?;
        check_finite("k", k)?;
        check_finite("v", v)?;
    }
    Ok(dims)
}

/// Checks the forward's outputs and the output gradient that a backward takes.
pub(crate) fn validate_backward_inputs<T: Element>(
    cfg: &DenseConfig,
    dims: Dims,
    o: &[T],
    lse: &[f32],
    d_o: &[T],
) -> Result<(), Error> {
    let h = cfg.heads;
    let o_len = numel("o", &[dims.total_q, h.num_q_heads, h.head_dim_v])?;
    expect_len("o", o.len(), o_len, "[total_q, HQ, Dv]")?;
    expect_len("d_o", d_o.len(), o_len, "[total_q, HQ, Dv]")?;
    expect_len("lse", lse.len(), numel("lse", &[dims.total_q, h.num_q_heads])?, "[HQ, total_q]")?;
    if cfg.check_finite {
        check_finite("d_o", d_o)?;
        check_finite("o", o)?;
    }
    Ok(())
}

/// Attention forward on the CPU (flash-style tiles, rayon over sequence x head x query block).
pub fn forward<T: Element>(
    cfg: &DenseConfig,
    q: &[T],
    k: &[T],
    v: &[T],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DenseOutput<T>, Error> {
    let dims = validate(cfg, q, k, v, cu_seqlens_q, cu_seqlens_k)?;
    cpu::forward(cfg, dims, q, k, v, cu_seqlens_q, cu_seqlens_k)
}

/// Attention backward on the CPU: takes the forward's `o` and `lse` and the output gradient
/// `d_o [total_q, HQ, Dv]`, recomputes the probabilities, and returns `dq, dk, dv`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    cfg: &DenseConfig,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[f32],
    d_o: &[T],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DenseGrads<T>, Error> {
    let dims = validate(cfg, q, k, v, cu_seqlens_q, cu_seqlens_k)?;
    validate_backward_inputs(cfg, dims, o, lse, d_o)?;
    cpu::backward(cfg, dims, q, k, v, o, lse, d_o, cu_seqlens_q, cu_seqlens_k)
}

/// Decode: a few new queries per sequence (`cu_seqlens_q`) against a KV cache holding every
/// sequence's keys so far (`cu_seqlens_k`, the new tokens' keys included), with the same
/// semantics as [`forward`] (bottom-right aligned masks). Parallel over sequence x kv head x
/// key chunk (split-K, combined by log-sum-exp), reading the cache in place, so one query
/// per sequence still uses every core.
pub fn decode<T: Element>(
    cfg: &DenseConfig,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DenseOutput<T>, Error> {
    let dims = validate(cfg, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k)?;
    Ok(cpu::decode(cfg, dims, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k))
}

/// Decode against paged KV: `views[s]` is sequence `s`'s cache (one layer), read page by page
/// in place, with no gather into a contiguous buffer. `q [total_q, HQ, Dk]` holds each
/// sequence's new queries (`cu_seqlens_q`), the last `Tq` of its `view.len` cached positions
/// (bottom-right aligned, as [`decode`]). Paged KV stores one head dim for K and V, so this
/// needs `Dk == Dv == view.head_dim` and `HKV == view.kv_heads`.
pub fn decode_paged<T: Element>(
    cfg: &DenseConfig,
    q: &[T],
    views: &[crate::paged::PagedKvView<'_, T>],
    cu_seqlens_q: &[u32],
) -> Result<DenseOutput<T>, Error> {
    cfg.validate()?;
    let h = cfg.heads;
    let total_q = rows_of("q", q.len(), h.num_q_heads, h.head_dim_k)?;
    let num_seqs = validate_cu_seqlens(cu_seqlens_q, total_q)?;
    if views.len() != num_seqs {
        return Err(Error::Shape(format!("{} paged views for {num_seqs} sequences in cu_seqlens_q", views.len())));
    }
    for (s, view) in views.iter().enumerate() {
        view.validate()?;
        if view.kv_heads != h.num_kv_heads || view.head_dim != h.head_dim_k || view.head_dim != h.head_dim_v {
            return Err(Error::Shape(format!(
                "sequence {s}: paged view has {} kv heads of dim {}, the call expects {} of Dk {} / Dv {}",
                view.kv_heads, view.head_dim, h.num_kv_heads, h.head_dim_k, h.head_dim_v
            )));
        }
    }
    if cfg.check_finite {
        check_finite("q", q)?;
    }
    Ok(cpu::decode_rows(cfg, num_seqs, total_q, q, &cpu::PagedRows(views), cu_seqlens_q))
}

/// Multiply-adds of a forward pass (count each as 2 FLOPs): `sum over queries and heads of
/// visible keys x (Dk + Dv)`. For benchmarks and planning.
pub fn forward_flops(cfg: &DenseConfig, cu_seqlens_q: &[u32], cu_seqlens_k: &[u32]) -> f64 {
    let h = cfg.heads;
    let mut pairs = 0f64;
    // Not validated (a planning helper): a decreasing pair counts as an empty sequence.
    let lens = |cu: &'_ [u32]| cu.windows(2).map(|w| w[1].saturating_sub(w[0]) as usize).collect::<Vec<_>>();
    for (tq, tk) in lens(cu_seqlens_q).into_iter().zip(lens(cu_seqlens_k)) {
        for i in 0..tq {
            let (lo, hi) = cfg.key_range(i, tq, tk);
            pairs += (hi - lo) as f64;
        }
    }
    2.0 * pairs * h.num_q_heads as f64 * (h.head_dim_k as f64 + h.head_dim_v as f64)
}
