//! Native Sparse Attention (DeepSeek, arXiv 2502.11089): per query token and head, three
//! attentions over the keys before it - compressed blocks, selected blocks, a sliding window -
//! mixed by per-token gates: `o = g_cmp o_cmp + g_slc o_slc + g_win o_win`.
//!
//! Layout (packed, as [`crate::dense`]): `q [total, HQ, Dk]`; the selected branch's `k
//! [total, HKV, Dk]`, `v [total, HKV, Dv]` (also the window branch's unless it gets its own);
//! compressed `k_cmp [total_cmp, HKV, Dk]`, `v_cmp [total_cmp, HKV, Dv]` packed per sequence in
//! the order of [`cmp_offsets`]; `gates [total, HQ, 3]` (cmp, slc, win).
//!
//! Conventions, all positions counted inside a sequence from 0:
//! - Compressed block `i` covers keys `[i d, i d + l)` and exists once the sequence holds all of
//!   them; query `t` sees blocks with `i d + l - 1 <= t`. A token with no complete block yet
//!   (`t < l - 1`) gets `o_cmp = 0` and `lse_cmp = -inf`.
//! - Selection block `j` covers keys `[j l', (j + 1) l')`. Its importance for query `t` is the
//!   sum, over the query heads of the GQA group, of the compressed probabilities of the
//!   compressed blocks overlapping it, each weighted by its overlap length in units of `d`
//!   ([`overlap_weight`]; the paper's Eq. 9 with `+ m` where it prints `- m`).
//! - Forced blocks: the initial blocks `0 .. num_initial` and the local blocks
//!   `t / l' - num_local + 1 ..= t / l'` (by default block 0 and the local blocks `t / l'`, the
//!   current one, and `t / l' - 1`), counted in `n`. A block starting after `t` is never chosen. The rest of the `n` slots go
//!   to the highest importance, ties to the lower block index. Chosen blocks are listed in
//!   ascending order, the unused slots hold [`NO_BLOCK`]. The whole GQA group shares the choice.
//! - The selected branch attends to the chosen blocks' keys up to `t` (causal inside the current
//!   block); the window branch to the last `w` keys including `t` (flash-attn's `(w - 1, 0)`).
//! - Gradients flow through the three attentions and the gates, never through the choice:
//!   backward takes the forward's indices and holds them fixed.
//!
//! [`forward_ext`] / [`backward_ext`] take optional inputs ([`NsaExtra`]): chunked prefill
//! (queries that are only the last `Tq` of a sequence's `Tk` keys, bottom-right as
//! [`crate::dense`]: query `i` sits at position `t = i + Tk - Tq`), caller-supplied chosen blocks
//! (the selection is skipped), and a per-token number of selected blocks (at most `n`).

use squid_cuda::Element;

use crate::layout::{check_finite, expect_len, numel, rows_of, seq_lens, try_zeroed, validate_cu_seqlens};
use crate::{Error, Heads};

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_compressed;
#[cfg(all(test, feature = "cuda"))]
mod cuda_compressed_tests;
#[cfg(feature = "cuda")]
pub mod cuda_decode;
#[cfg(feature = "cuda")]
pub mod cuda_selected;
#[cfg(all(test, feature = "cuda"))]
mod cuda_selected_tests;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
mod decode;
#[cfg(test)]
mod ext_tests;
pub mod naive;
#[cfg(test)]
mod tests;

pub use decode::DECODE_KERNEL;
pub use decode::{NsaCache, NsaDecodeOutput};

/// The CUDA source of NSA's selected-block branch and gated combine (launchers in
/// `cuda_selected`, feature `cuda`): forward and backward per GQA group, bf16 and f16, the dense
/// kernels' head-dim pairs.
pub const SELECTED_KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "attention_nsa_selected",
    "src/nsa/selected.cu",
    [
        "squid_nsa_slc_fwd_dk64_dv64_bf16",
        "squid_nsa_slc_fwd_dk64_dv64_f16",
        "squid_nsa_slc_fwd_dk96_dv96_bf16",
        "squid_nsa_slc_fwd_dk96_dv96_f16",
        "squid_nsa_slc_fwd_dk128_dv128_bf16",
        "squid_nsa_slc_fwd_dk128_dv128_f16",
        "squid_nsa_slc_fwd_dk192_dv128_bf16",
        "squid_nsa_slc_fwd_dk192_dv128_f16",
        "squid_nsa_slc_fwd_dk256_dv256_bf16",
        "squid_nsa_slc_fwd_dk256_dv256_f16",
        "squid_nsa_combine_bf16",
        "squid_nsa_combine_f16",
        "squid_nsa_slc_bwd_dq_dk64_dv64_bf16",
        "squid_nsa_slc_bwd_dq_dk64_dv64_f16",
        "squid_nsa_slc_bwd_dq_dk96_dv96_bf16",
        "squid_nsa_slc_bwd_dq_dk96_dv96_f16",
        "squid_nsa_slc_bwd_dq_dk128_dv128_bf16",
        "squid_nsa_slc_bwd_dq_dk128_dv128_f16",
        "squid_nsa_slc_bwd_dq_dk192_dv128_bf16",
        "squid_nsa_slc_bwd_dq_dk192_dv128_f16",
        "squid_nsa_slc_bwd_dkdv_dk64_dv64_bf16",
        "squid_nsa_slc_bwd_dkdv_dk64_dv64_f16",
        "squid_nsa_slc_bwd_dkdv_dk96_dv96_bf16",
        "squid_nsa_slc_bwd_dkdv_dk96_dv96_f16",
        "squid_nsa_slc_bwd_dkdv_dk128_dv128_bf16",
        "squid_nsa_slc_bwd_dkdv_dk128_dv128_f16",
        "squid_nsa_slc_bwd_dkdv_dk192_dv128_bf16",
        "squid_nsa_slc_bwd_dkdv_dk192_dv128_f16",
        "squid_nsa_gate_bwd_bf16",
        "squid_nsa_gate_bwd_f16",
        "squid_nsa_add_bf16",
        "squid_nsa_add_f16",
    ],
    fast_math = false
);

/// The CUDA source of NSA's compressed-branch forward with the selection scores (launcher in
/// `cuda_compressed`, feature `cuda`): per GQA group, bf16 and f16, the dense kernels' head-dim
/// pairs.
pub const COMPRESSED_KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "attention_nsa_compressed",
    "src/nsa/compressed.cu",
    [
        "squid_nsa_cmp_fwd_dk64_dv64_bf16",
        "squid_nsa_cmp_fwd_dk64_dv64_f16",
        "squid_nsa_cmp_fwd_dk96_dv96_bf16",
        "squid_nsa_cmp_fwd_dk96_dv96_f16",
        "squid_nsa_cmp_fwd_dk128_dv128_bf16",
        "squid_nsa_cmp_fwd_dk128_dv128_f16",
        "squid_nsa_cmp_fwd_dk192_dv128_bf16",
        "squid_nsa_cmp_fwd_dk192_dv128_f16",
        "squid_nsa_cmp_fwd_dk256_dv256_bf16",
        "squid_nsa_cmp_fwd_dk256_dv256_f16",
    ],
    fast_math = false
);

/// The CUDA source of NSA's compression (launchers in `cuda`, feature `cuda`): mean pooling
/// forward and backward, bf16 and f16.
pub const COMPRESS_KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "nsa_compress",
    "src/nsa/compress.cu",
    [
        "squid_nsa_compress_mean_fwd_bf16",
        "squid_nsa_compress_mean_fwd_f16",
        "squid_nsa_compress_mean_bwd_bf16",
        "squid_nsa_compress_mean_bwd_f16"
    ],
    fast_math = false
);

/// The CUDA source of NSA's top-n block selection (launcher in `cuda`, feature `cuda`).
pub const SELECT_KERNEL: squid_cuda::KernelSource =
    squid_cuda::kernel_source!("nsa_select", "src/nsa/select.cu", ["squid_nsa_select_topn"], fast_math = false);

/// Marks an unused slot of the chosen-block list.
pub const NO_BLOCK: u32 = u32::MAX;

/// NSA block sizes and counts. [`Default`] gives the paper's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NsaConfig {
    /// Compression block length `l`.
    pub block_cmp: usize,
    /// Compression stride `d`; divides `l` and `l'`.
    pub stride_cmp: usize,
    /// Selection block length `l'`; `l <= l'`.
    pub block_slc: usize,
    /// Selected blocks per query `n`, the forced initial and local blocks included
    /// (`>= num_initial + num_local`, and `>= 1`).
    pub num_selected: usize,
    /// Forced initial blocks: blocks `0 .. num_initial` are always chosen (the paper: 1).
    pub num_initial: usize,
    /// Forced local blocks: the current block and the `num_local - 1` before it are always
    /// chosen (the paper: 2).
    pub num_local: usize,
    /// Sliding window `w`: keys seen by the window branch, the current one included.
    pub window: usize,
    /// Softmax scale of all three branches; `None` means `1 / sqrt(Dk)`.
    pub scale: Option<f32>,
    /// Reject NaN and infinities in the inputs with [`Error::NonFinite`].
    pub check_finite: bool,
}

impl Default for NsaConfig {
    /// `l = 32, d = 16, l' = 64, n = 16, w = 512`, 1 initial and 2 local blocks (the paper's).
    fn default() -> Self {
        Self {
            block_cmp: 32,
            stride_cmp: 16,
            block_slc: 64,
            num_selected: 16,
            num_initial: 1,
            num_local: 2,
            window: 512,
            scale: None,
            check_finite: false,
        }
    }
}

/// Blocks forced into every selection by default: the first and the two local ones
/// ([`NsaConfig::num_initial`] + [`NsaConfig::num_local`] of [`NsaConfig::default`]).
pub const FORCED_BLOCKS: usize = 3;

/// The most selected blocks per query [`NsaConfig::validate`] accepts: every (token, kv head)
/// gets `n` index slots in the outputs, so a huge `n` would be a huge allocation from a small
/// input (the paper uses 16).
pub const MAX_SELECTED: usize = 1 << 16;

impl NsaConfig {
    /// Checks the sizes: all non-zero, `d | l`, `d | l'`, `l <= l'`,
    /// `num_initial + num_local <= n <= MAX_SELECTED`, a finite scale.
    pub fn validate(&self) -> Result<(), Error> {
        let named = [
            ("block_cmp (l)", self.block_cmp),
            ("stride_cmp (d)", self.stride_cmp),
            ("block_slc (l')", self.block_slc),
            ("num_selected (n)", self.num_selected),
            ("window (w)", self.window),
        ];
        if let Some((name, _)) = named.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("{name} is 0")));
        }
        let (l, d, ls) = (self.block_cmp, self.stride_cmp, self.block_slc);
        if l % d != 0 {
            return Err(Error::Config(format!("stride d = {d} does not divide l = {l}")));
        }
        if ls % d != 0 {
            return Err(Error::Config(format!("stride d = {d} does not divide l' = {ls}")));
        }
        if l > ls {
            return Err(Error::Config(format!("l = {l} exceeds l' = {ls}")));
        }
        if self.num_selected > MAX_SELECTED {
            return Err(Error::Config(format!("n = {} exceeds {MAX_SELECTED} selected blocks", self.num_selected)));
        }
        let forced = self.forced_blocks();
        if self.num_selected < forced {
            return Err(Error::Config(format!(
                "n = {} cannot hold the {forced} forced blocks ({} initial + {} local)",
                self.num_selected, self.num_initial, self.num_local
            )));
        }
        if let Some(s) = self.scale {
            if !s.is_finite() || s == 0.0 {
                return Err(Error::Config(format!("softmax scale {s} must be finite and non-zero")));
            }
        }
        Ok(())
    }

    /// Compressed blocks of a sequence of `len` tokens (complete blocks only).
    /// (0 for a zero stride, which [`NsaConfig::validate`] refuses.)
    pub fn num_cmp_blocks(&self, len: usize) -> usize {
        match len.checked_sub(self.block_cmp).and_then(|rest| rest.checked_div(self.stride_cmp)) {
            Some(blocks) => blocks + 1,
            None => 0,
        }
    }

    /// Selection blocks of a sequence of `len` tokens (the last one may be partial).
    /// (0 for a zero block length, which [`NsaConfig::validate`] refuses.)
    pub fn num_slc_blocks(&self, len: usize) -> usize {
        if self.block_slc == 0 {
            0
        } else {
            len.div_ceil(self.block_slc)
        }
    }

    /// Forced blocks per token at most: `num_initial + num_local` (saturating).
    pub fn forced_blocks(&self) -> usize {
        self.num_initial.saturating_add(self.num_local)
    }

    /// The softmax scale in use for heads `h`.
    pub fn softmax_scale(&self, h: &Heads) -> f32 {
        self.scale.unwrap_or_else(|| h.default_scale())
    }
}

/// Offsets of each sequence's compressed blocks in `k_cmp`/`v_cmp` (`[num_seqs + 1]`), after
/// checking the config (a zero stride has no blocks to count) and the offsets.
pub fn cmp_offsets(cfg: &NsaConfig, cu_seqlens: &[u32]) -> Result<Vec<u32>, Error> {
    cfg.validate()?;
    validate_cu_seqlens(cu_seqlens, *cu_seqlens.last().unwrap_or(&0) as usize)?;
    Ok(offsets(cfg, cu_seqlens))
}

/// [`cmp_offsets`] of a validated config and offsets: `d >= 1` gives at most one block per
/// token, so the sums stay below the last offset and cannot overflow.
pub(crate) fn offsets(cfg: &NsaConfig, cu_seqlens: &[u32]) -> Vec<u32> {
    let mut out = vec![0u32];
    for len in seq_lens(cu_seqlens) {
        out.push(out.last().copied().unwrap_or(0) + cfg.num_cmp_blocks(len) as u32);
    }
    out
}

/// How much compressed block `i` counts toward selection block `j`: the number of pairs
/// `(m, n)`, `m < l'/d`, `n < l/d`, with `i = (l'/d) j + m - n` (the corrected Eq. 9). It equals
/// the length of the overlap of `[i d, i d + l)` and `[j l', (j + 1) l')` divided by `d`: the
/// paper's settings give weights 1, 2, 2, 2, 1 to blocks `4j - 1 ..= 4j + 3`.
///
/// Counted in closed form (for each `m` one `n` at most), in `i128` so no index overflows; 0 for
/// a zero stride, which [`NsaConfig::validate`] refuses.
pub fn overlap_weight(cfg: &NsaConfig, j: usize, i: usize) -> usize {
    let (Some(a), Some(b)) = (cfg.block_slc.checked_div(cfg.stride_cmp), cfg.block_cmp.checked_div(cfg.stride_cmp))
    else {
        return 0;
    };
    // m in [0, a) with n = a j + m - i in [0, b).
    let shift = i as i128 - a as i128 * j as i128;
    let lo = shift.max(0);
    let hi = (shift + b as i128).min(a as i128);
    (hi - lo).max(0) as usize
}

/// The CPU path's choice of blocks for one query, with scratch reused from token to token (no
/// allocation per token: at 32k tokens this runs 64k times per forward).
#[derive(Debug, Default)]
pub(crate) struct Chooser {
    /// The group-summed probabilities behind `l/d - 1` zeros, then zeros to the last tap.
    padded: Vec<f32>,
    scores: Vec<f32>,
    /// Candidates of [`select_blocks_fast`], as [`rank_key`]s.
    candidates: Vec<u64>,
}

impl Chooser {
    /// Writes the blocks query `t` attends to (ascending) into `out`, from its group-summed
    /// compressed probabilities `p_cmp`.
    /// `n` is the number of blocks to choose (the config's, or the token's own).
    pub(crate) fn choose(&mut self, cfg: &NsaConfig, t: usize, n: usize, p_cmp: &[f32], out: &mut Vec<u32>) {
        self.slc_scores(cfg, p_cmp, t / cfg.block_slc + 1);
        select_blocks_fast(cfg, t, n, &self.scores, &mut self.candidates, out);
    }

    /// Maps group-summed compressed probabilities `p_cmp` (blocks `0..p_cmp.len()`) to the
    /// importance of selection blocks `0..len`: block `i` spans stride pieces `i .. i + l/d`
    /// and adds its probability once per piece it shares with selection block `j`, so
    /// `score_j = sum_k w_k p[(l'/d) j + k - (l/d - 1)]` with `w_k` the shared pieces
    /// ([`overlap_weight`]; 1, 2, 2, 2, 1 for the paper's settings).
    pub(crate) fn slc_scores(&mut self, cfg: &NsaConfig, p_cmp: &[f32], len: usize) -> &[f32] {
        let per_slc = cfg.block_slc / cfg.stride_cmp;
        let per_cmp = cfg.block_cmp / cfg.stride_cmp;
        let taps = per_slc + per_cmp - 1;
        let pieces = per_slc * len;
        let used = p_cmp.len().min(pieces);
        self.padded.clear();
        self.padded.resize(pieces + taps, 0.0);
        self.padded[per_cmp - 1..][..used].copy_from_slice(&p_cmp[..used]);
        self.scores.clear();
        self.scores.resize(len, 0.0);
        if (per_slc, per_cmp) == (4, 2) {
            // The paper's settings as constants: the taps unroll and the loop over blocks vectorises.
            block_sums(&self.padded, 4, 2, &mut self.scores);
        } else {
            block_sums(&self.padded, per_slc, per_cmp, &mut self.scores);
        }
        &self.scores
    }
}

/// A score type with a total order (`f32` on the CPU path, `f64` in [`naive`]).
pub trait Score: Copy + Default {
    /// `total_cmp`.
    fn total(&self, other: &Self) -> std::cmp::Ordering;
}
impl Score for f32 {
    fn total(&self, other: &Self) -> std::cmp::Ordering {
        self.total_cmp(other)
    }
}
impl Score for f64 {
    fn total(&self, other: &Self) -> std::cmp::Ordering {
        self.total_cmp(other)
    }
}

/// The forced blocks of query `t`, ascending: the initial blocks `0 .. num_initial` and the
/// local ones `t / l' - num_local + 1 ..= t / l'`, where they exist (each once).
fn push_forced(cfg: &NsaConfig, t: usize, out: &mut Vec<u32>) {
    let (first_free, end_free) = free_range(cfg, t);
    out.extend((0..first_free).map(|j| j as u32));
    out.extend((end_free.max(first_free)..=t / cfg.block_slc).map(|j| j as u32));
}

/// The blocks of query `t` that are not forced: `first .. end` (empty when `end <= first`).
/// `first` is at most `t / l' + 1`.
fn free_range(cfg: &NsaConfig, t: usize) -> (usize, usize) {
    let blocks = t / cfg.block_slc + 1;
    (cfg.num_initial.min(blocks), blocks.saturating_sub(cfg.num_local))
}

/// Chooses the selection blocks of query `t` from the importance `scores` of blocks
/// `0..=t / l'` (missing scores count as 0; later ones are ignored): the forced blocks, then the
/// highest scores, ties to the lower index. Writes them ascending into `out` (cleared first).
/// A full sort: this is the reference; the CPU path's faster choice must agree exactly.
///
/// Leaves `out` empty for `l' = 0` or `n` below the forced blocks, which
/// [`NsaConfig::validate`] refuses. Blocks past `scores.len() + n` are never ranked: at least
/// `n - forced` unforced blocks of score 0 and lower index come before them, so none of them can
/// be chosen.
pub fn select_blocks<S: Score>(cfg: &NsaConfig, t: usize, scores: &[S], out: &mut Vec<u32>) {
    select_blocks_n(cfg, t, cfg.num_selected, scores, out)
}

/// [`select_blocks`] choosing `n` blocks (a token's own number, at most the config's) instead of
/// [`NsaConfig::num_selected`].
pub fn select_blocks_n<S: Score>(cfg: &NsaConfig, t: usize, n: usize, scores: &[S], out: &mut Vec<u32>) {
    out.clear();
    if cfg.block_slc == 0 || n < cfg.forced_blocks() {
        return;
    }
    let cur = t / cfg.block_slc;
    push_forced(cfg, t, out);
    let score = |j: usize| scores.get(j).copied().unwrap_or_default();
    let last = cur.min(scores.len().saturating_add(n));
    let mut rest: Vec<usize> = (0..=last).filter(|j| !out.contains(&(*j as u32))).collect();
    rest.sort_by(|&x, &y| score(y).total(&score(x)).then(x.cmp(&y)));
    let free = n - out.len();
    out.extend(rest.iter().take(free).map(|&j| j as u32));
    out.sort_unstable();
}

/// `scores[j] = sum_k w_k padded[per_slc * j + k]` over the `per_slc + per_cmp - 1` taps, `w_k`
/// the stride pieces that compressed block and selection block `j` share.
#[inline(always)]
fn block_sums(padded: &[f32], per_slc: usize, per_cmp: usize, scores: &mut [f32]) {
    let taps = per_slc + per_cmp - 1;
    for (j, s) in scores.iter_mut().enumerate() {
        let x = &padded[per_slc * j..][..taps];
        // Pieces `k + 1 - l/d ..= k` of a block, counted from the selection block's start.
        *s = x
            .iter()
            .enumerate()
            .map(|(k, &p)| ((k + 1).min(per_slc) - (k + 1).saturating_sub(per_cmp)) as f32 * p)
            .sum();
    }
}

/// `s` as a `u32` whose unsigned order is `f32::total_cmp`'s.
#[inline(always)]
fn total_key(s: f32) -> u32 {
    let b = s.to_bits();
    b ^ (((b as i32 >> 31) as u32) | 0x8000_0000)
}

/// Block `j` with score `s` as one `u64`: higher score first, then lower index, so the ranking
/// of [`select_blocks`] is the plain order of these keys (all distinct).
#[inline(always)]
fn rank_key(s: f32, j: usize) -> u64 {
    ((total_key(s) as u64) << 32) | (!(j as u32)) as u64
}

/// Lanes of the threshold pass in [`select_blocks_fast`].
const LANES: usize = 64;

/// [`select_blocks`] in time linear in the blocks with no sort of them: the free blocks
/// (`num_initial ..= t/l' - num_local`; the forced ones sit at both ends) are dealt into
/// [`LANES`] lanes and each lane's best score is taken (vectorised). Chooses `n` blocks (the
/// forced ones included). The `free`-th best of those maxima is a score at
/// least `free` blocks reach, so no block below it can be chosen: only the few blocks at or
/// above it become candidates, ranked exactly. Same order as [`select_blocks`] (score
/// descending by `total_cmp`, then index ascending); `candidates` is scratch.
pub(crate) fn select_blocks_fast(
    cfg: &NsaConfig,
    t: usize,
    n: usize,
    scores: &[f32],
    candidates: &mut Vec<u64>,
    out: &mut Vec<u32>,
) {
    out.clear();
    push_forced(cfg, t, out);
    let free = n.saturating_sub(out.len());
    // Blocks first .. end are the free ones; those without a score count as 0.
    let (first, end) = free_range(cfg, t);
    candidates.clear();
    if free > 0 && end > first {
        let scored = &scores[first.min(scores.len())..end.min(scores.len())];
        let mut threshold = 0u32;
        if scored.len() >= free * 2 {
            let mut lane_max = [0u32; LANES];
            let mut rows = scored.chunks_exact(LANES);
            for row in rows.by_ref() {
                for (m, &s) in lane_max.iter_mut().zip(row) {
                    *m = (*m).max(total_key(s));
                }
            }
            for (m, &s) in lane_max.iter_mut().zip(rows.remainder()) {
                *m = (*m).max(total_key(s));
            }
            let lanes = scored.len().min(LANES);
            if lanes >= free {
                // Descending: the free-th largest lane maximum.
                let (_, kth, _) = lane_max[..lanes].select_nth_unstable_by(free - 1, |a, b| b.cmp(a));
                threshold = *kth;
            }
        }
        for (c, chunk) in scored.chunks(16).enumerate() {
            let hits =
                chunk.iter().enumerate().fold(0u32, |m, (l, &s)| m | (((total_key(s) >= threshold) as u32) << l));
            let mut bits = hits;
            while bits != 0 {
                let l = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                candidates.push(rank_key(chunk[l], first + c * 16 + l));
            }
        }
        // Free blocks past the scores: score 0.
        let zero_from = first.max(scores.len());
        if total_key(0.0) >= threshold {
            candidates.extend((zero_from..end).map(|j| rank_key(0.0, j)));
        }
        if candidates.len() > free {
            candidates.select_nth_unstable_by(free - 1, |a, b| b.cmp(a));
            candidates.truncate(free);
        }
        out.extend(candidates.iter().map(|&k| !(k as u32)));
    }
    out.sort_unstable();
}

/// The inputs of one NSA call, in storage type `E` (`f64` for [`naive`]).
#[derive(Debug, Clone, Copy)]
pub struct NsaInputs<'a, E> {
    /// `[total, HQ, Dk]`.
    pub q: &'a [E],
    /// Keys of the selected branch (and of the window branch when `k_win` is `None`).
    pub k: &'a [E],
    /// Values of the selected branch (and of the window branch when `v_win` is `None`).
    pub v: &'a [E],
    /// The window branch's own keys, if it has them (the paper gives each branch its own).
    pub k_win: Option<&'a [E]>,
    /// The window branch's own values (given together with `k_win`).
    pub v_win: Option<&'a [E]>,
    /// Compressed keys `[total_cmp, HKV, Dk]` (e.g. from [`compress_mean`]).
    pub k_cmp: &'a [E],
    /// Compressed values `[total_cmp, HKV, Dv]`.
    pub v_cmp: &'a [E],
    /// Branch gates `[total, HQ, 3]`: cmp, slc, win.
    pub gates: &'a [E],
    /// Sequence offsets `[num_seqs + 1]`.
    pub cu_seqlens: &'a [u32],
}

/// Forward result of the CPU path.
#[derive(Debug, Clone, PartialEq)]
pub struct NsaOutput<T> {
    /// The gated output `[total, HQ, Dv]`.
    pub o: Vec<T>,
    /// Compressed branch output `[total, HQ, Dv]` (kept for the gate gradients).
    pub o_cmp: Vec<T>,
    /// Selected branch output.
    pub o_slc: Vec<T>,
    /// Window branch output.
    pub o_win: Vec<T>,
    /// Per-branch log-sum-exp `[HQ, total]`.
    pub lse_cmp: Vec<f32>,
    /// Selected branch log-sum-exp.
    pub lse_slc: Vec<f32>,
    /// Window branch log-sum-exp.
    pub lse_win: Vec<f32>,
    /// Chosen selection blocks `[total, HKV, n]`, ascending, [`NO_BLOCK`]-padded.
    pub indices: Vec<u32>,
}

/// Backward result.
#[derive(Debug, Clone, PartialEq)]
pub struct NsaGrads<E> {
    /// `[total, HQ, Dk]`.
    pub dq: Vec<E>,
    /// Selected branch keys (plus the window branch's when it shares them).
    pub dk: Vec<E>,
    /// Selected branch values (plus the window branch's when it shares them).
    pub dv: Vec<E>,
    /// The window branch's own keys, when given separately.
    pub dk_win: Option<Vec<E>>,
    /// The window branch's own values, when given separately.
    pub dv_win: Option<Vec<E>>,
    /// `[total_cmp, HKV, Dk]`.
    pub dk_cmp: Vec<E>,
    /// `[total_cmp, HKV, Dv]`.
    pub dv_cmp: Vec<E>,
    /// `[total, HQ, 3]`.
    pub dgates: Vec<E>,
}

/// Optional inputs of [`forward_ext`] / [`backward_ext`]; [`Default`] (all `None`) is
/// [`forward`] / [`backward`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NsaExtra<'a> {
    /// Chunked prefill: the key offsets `[num_seqs + 1]` when the queries (offsets
    /// [`NsaInputs::cu_seqlens`]) are only the last `Tq <= Tk` tokens of each sequence's keys.
    /// `k`, `v` (and `k_win`, `v_win`) then hold `[total_k, HKV, D]`, the compressed keys are
    /// those of the keys' sequences ([`cmp_offsets`] of these offsets), and query `i` of a
    /// sequence sits at position `i + Tk - Tq` (bottom-right, as [`crate::dense`]).
    pub cu_seqlens_k: Option<&'a [u32]>,
    /// Caller-chosen selection blocks `[total_q, HKV, n]` (skips the selection): per (token,
    /// kv head) strictly ascending (no duplicates), none starting after the token, [`NO_BLOCK`]
    /// padding after them, at most the token's number of blocks. Forward only (backward holds
    /// the forward's `indices`, which then equal these).
    pub indices: Option<&'a [u32]>,
    /// Per-token number of selected blocks `[total_q]`, each in
    /// `num_initial + num_local ..= n` (forced blocks included). Forward only.
    pub num_selected: Option<&'a [u32]>,
}

/// Sizes of a validated call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NsaDims {
    /// Query tokens.
    pub total: usize,
    /// Key tokens (`total` without chunked prefill).
    pub total_k: usize,
    pub total_cmp: usize,
    pub num_seqs: usize,
}

/// (Without optional inputs: the call the launchers in the other branches make.)
#[allow(dead_code)]
pub(crate) fn validate_lens<E>(cfg: &NsaConfig, h: &Heads, x: &NsaInputs<'_, E>) -> Result<NsaDims, Error> {
    validate_lens_ext(cfg, h, x, &NsaExtra::default())
}

/// [`validate_lens`] with the optional inputs: key offsets, chosen blocks, per-token counts.
pub(crate) fn validate_lens_ext<E>(
    cfg: &NsaConfig,
    h: &Heads,
    x: &NsaInputs<'_, E>,
    extra: &NsaExtra<'_>,
) -> Result<NsaDims, Error> {
    cfg.validate()?;
    h.validate()?;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let total = rows_of("q", x.q.len(), hq, dk)?;
    let num_seqs = validate_cu_seqlens(x.cu_seqlens, total)?;
    let cu_k = extra.cu_seqlens_k.unwrap_or(x.cu_seqlens);
    let total_k = *cu_k.last().unwrap_or(&0) as usize;
    if extra.cu_seqlens_k.is_some() {
        let num_k = validate_cu_seqlens(cu_k, total_k)?;
        if num_k != num_seqs {
            return Err(Error::CuSeqlens(format!(
                "cu_seqlens describes {num_seqs} sequences but cu_seqlens_k {num_k}"
            )));
        }
        for (s, (wq, wk)) in x.cu_seqlens.windows(2).zip(cu_k.windows(2)).enumerate() {
            let (tq, tk) = (wq[1] - wq[0], wk[1] - wk[0]);
            if tq > tk {
                return Err(Error::CuSeqlens(format!(
                    "sequence {s} has {tq} queries but only {tk} keys (chunked prefill needs Tq <= Tk)"
                )));
            }
        }
    }
    let k_len = numel("k", &[total_k, hkv, dk])?;
    let v_len = numel("v", &[total_k, hkv, dv])?;
    expect_len("k", x.k.len(), k_len, "[total_k, HKV, Dk]")?;
    expect_len("v", x.v.len(), v_len, "[total_k, HKV, Dv]")?;
    match (x.k_win, x.v_win) {
        (Some(kw), Some(vw)) => {
            expect_len("k_win", kw.len(), k_len, "[total_k, HKV, Dk]")?;
            expect_len("v_win", vw.len(), v_len, "[total_k, HKV, Dv]")?;
        }
        (None, None) => {}
        _ => return Err(Error::Shape("k_win and v_win must be given together".into())),
    }
    let total_cmp = *offsets(cfg, cu_k).last().unwrap_or(&0) as usize;
    expect_len("k_cmp", x.k_cmp.len(), numel("k_cmp", &[total_cmp, hkv, dk])?, "[total_cmp, HKV, Dk]")?;
    expect_len("v_cmp", x.v_cmp.len(), numel("v_cmp", &[total_cmp, hkv, dv])?, "[total_cmp, HKV, Dv]")?;
    expect_len("gates", x.gates.len(), numel("gates", &[total, hq, 3])?, "[total, HQ, 3]")?;
    if let Some(counts) = extra.num_selected {
        expect_len("num_selected", counts.len(), total, "[total_q]")?;
        let (lo, hi) = (cfg.forced_blocks(), cfg.num_selected);
        if let Some((row, &c)) = counts.iter().enumerate().find(|(_, &c)| (c as usize) < lo || c as usize > hi) {
            return Err(Error::Config(format!(
                "num_selected of query row {row} is {c}, outside {lo} (forced blocks) ..= {hi} (n)"
            )));
        }
    }
    if let Some(ix) = extra.indices {
        validate_indices_ext(cfg, h, x.cu_seqlens, cu_k, ix, extra.num_selected)?;
    }
    Ok(NsaDims { total, total_k, total_cmp, num_seqs })
}

fn validate<T: Element>(
    cfg: &NsaConfig,
    h: &Heads,
    x: &NsaInputs<'_, T>,
    extra: &NsaExtra<'_>,
) -> Result<NsaDims, Error> {
    let dims = validate_lens_ext(cfg, h, x, extra)?;
    if cfg.check_finite {
        for (name, t) in
            [("q", x.q), ("k", x.k), ("v", x.v), ("k_cmp", x.k_cmp), ("v_cmp", x.v_cmp), ("gates", x.gates)]
        {
            check_finite(name, t)?;
        }
        for (name, t) in [("k_win", x.k_win), ("v_win", x.v_win)] {
            if let Some(t) = t {
                check_finite(name, t)?;
            }
        }
    }
    Ok(dims)
}

/// NSA forward on the CPU.
pub fn forward<T: Element>(cfg: &NsaConfig, heads: &Heads, x: &NsaInputs<'_, T>) -> Result<NsaOutput<T>, Error> {
    forward_ext(cfg, heads, x, &NsaExtra::default())
}

/// NSA forward on the CPU with the optional inputs of [`NsaExtra`] (chunked prefill,
/// caller-chosen blocks, per-token block counts). The outputs are per query row (`[total_q,
/// ..]`, `lse [HQ, total_q]`).
pub fn forward_ext<T: Element>(
    cfg: &NsaConfig,
    heads: &Heads,
    x: &NsaInputs<'_, T>,
    extra: &NsaExtra<'_>,
) -> Result<NsaOutput<T>, Error> {
    let dims = validate(cfg, heads, x, extra)?;
    cpu::forward(cfg, heads, dims, x, extra)
}

/// NSA backward on the CPU, with the forward's chosen blocks held fixed. `d_o [total, HQ, Dv]`.
pub fn backward<T: Element>(
    cfg: &NsaConfig,
    heads: &Heads,
    x: &NsaInputs<'_, T>,
    fwd: &NsaOutput<T>,
    d_o: &[T],
) -> Result<NsaGrads<T>, Error> {
    backward_ext(cfg, heads, x, &NsaExtra::default(), fwd, d_o)
}

/// [`backward`] of [`forward_ext`]: of the optional inputs only `cu_seqlens_k` matters (the
/// chosen blocks are the forward's `indices`, held fixed; the others are ignored). Key
/// gradients are `[total_k, ..]`.
pub fn backward_ext<T: Element>(
    cfg: &NsaConfig,
    heads: &Heads,
    x: &NsaInputs<'_, T>,
    extra: &NsaExtra<'_>,
    fwd: &NsaOutput<T>,
    d_o: &[T],
) -> Result<NsaGrads<T>, Error> {
    let extra = NsaExtra { cu_seqlens_k: extra.cu_seqlens_k, ..Default::default() };
    let dims = validate(cfg, heads, x, &extra)?;
    let h = heads;
    let o_len = numel("o", &[dims.total, h.num_q_heads, h.head_dim_v])?;
    let lse_len = numel("lse", &[dims.total, h.num_q_heads])?;
    expect_len("d_o", d_o.len(), o_len, "[total, HQ, Dv]")?;
    for (name, t) in [("o_cmp", &fwd.o_cmp), ("o_slc", &fwd.o_slc), ("o_win", &fwd.o_win)] {
        expect_len(name, t.len(), o_len, "[total, HQ, Dv]")?;
    }
    for (name, t) in [("lse_cmp", &fwd.lse_cmp), ("lse_slc", &fwd.lse_slc), ("lse_win", &fwd.lse_win)] {
        expect_len(name, t.len(), lse_len, "[HQ, total]")?;
    }
    let cu_k = extra.cu_seqlens_k.unwrap_or(x.cu_seqlens);
    validate_indices_ext(cfg, h, x.cu_seqlens, cu_k, &fwd.indices, None)?;
    if cfg.check_finite {
        check_finite("d_o", d_o)?;
    }
    cpu::backward(cfg, heads, dims, x, cu_k, fwd, d_o)
}

/// Checks chosen blocks that come back in (a forward's public `indices`, perhaps edited): the
/// shape `[total, HKV, n]`, and per (token `t`, kv head) blocks strictly ascending, each at most
/// `t / l'` (no block starting after the token), [`NO_BLOCK`] only after the chosen ones. What
/// the forward writes always passes; anything else would index outside the sequence.
#[allow(dead_code)]
pub(crate) fn validate_indices(cfg: &NsaConfig, h: &Heads, cu_seqlens: &[u32], indices: &[u32]) -> Result<(), Error> {
    validate_indices_ext(cfg, h, cu_seqlens, cu_seqlens, indices, None)
}

/// [`validate_indices`] with separate key offsets (query `i` of a sequence at position
/// `i + Tk - Tq`; the offsets already validated) and, if given, each token's number of blocks
/// as the most it may list.
pub(crate) fn validate_indices_ext(
    cfg: &NsaConfig,
    h: &Heads,
    cu_q: &[u32],
    cu_k: &[u32],
    indices: &[u32],
    counts: Option<&[u32]>,
) -> Result<(), Error> {
    let (hkv, n) = (h.num_kv_heads, cfg.num_selected);
    let total = *cu_q.last().unwrap_or(&0) as usize;
    expect_len("indices", indices.len(), numel("indices", &[total, hkv, n])?, "[total, HKV, n]")?;
    for (s, (wq, wk)) in cu_q.windows(2).zip(cu_k.windows(2)).enumerate() {
        let (tq, tk) = ((wq[1] - wq[0]) as usize, (wk[1] - wk[0]) as usize);
        for i in 0..tq {
            let row = wq[0] as usize + i;
            let t = i + tk - tq;
            let most = counts.map_or(n, |c| c[row] as usize);
            for g in 0..hkv {
                let chosen = &indices[(row * hkv + g) * n..][..n];
                let used = chosen.iter().position(|&j| j == NO_BLOCK).unwrap_or(n);
                let bad = if chosen[used..].iter().any(|&j| j != NO_BLOCK) {
                    Some("a block after NO_BLOCK padding")
                } else if chosen[..used].iter().any(|&j| j as usize > t / cfg.block_slc) {
                    Some("a block that starts after the token")
                } else if chosen[..used].windows(2).any(|p| p[1] <= p[0]) {
                    let mut sorted = chosen[..used].to_vec();
                    sorted.sort_unstable();
                    if sorted.windows(2).any(|p| p[1] == p[0]) {
                        Some("a block listed twice")
                    } else {
                        Some("blocks not strictly ascending")
                    }
                } else if used > most {
                    Some("more blocks than the token's num_selected")
                } else {
                    None
                };
                if let Some(why) = bad {
                    return Err(Error::Shape(format!(
                        "indices of sequence {s}, token {t}, kv head {g}: {why}: {chosen:?}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Mean pooling over compression blocks: `x [total, H, D] -> [total_cmp, H, D]`, block `i` of
/// a sequence the mean of its rows `i d .. i d + l`. Accumulates in f32.
pub fn compress_mean<T: Element>(
    cfg: &NsaConfig,
    heads: usize,
    dim: usize,
    x: &[T],
    cu_seqlens: &[u32],
) -> Result<Vec<T>, Error> {
    cfg.validate()?;
    let total = rows_of("x", x.len(), heads, dim)?;
    validate_cu_seqlens(cu_seqlens, total)?;
    let offs = offsets(cfg, cu_seqlens);
    let row = heads * dim;
    let len = (*offs.last().unwrap_or(&0) as usize)
        .checked_mul(row)
        .ok_or_else(|| Error::Shape(format!("compress_mean: {offs:?} blocks of {row} elements overflow usize")))?;
    // Sized from the caller's offsets: a refused allocation is an error, never an abort.
    let mut out: Vec<T> = try_zeroed("compress_mean output", len)?;
    let inv = 1.0 / cfg.block_cmp as f32;
    // `row` comes from the caller too (it may be huge when there are no rows at all).
    let mut acc: Vec<f32> = if len == 0 { Vec::new() } else { try_zeroed("compress_mean accumulator", row)? };
    for (s, w) in cu_seqlens.windows(2).enumerate() {
        let start = w[0] as usize;
        for i in 0..(offs[s + 1] - offs[s]) as usize {
            acc.fill(0.0);
            for t in i * cfg.stride_cmp..i * cfg.stride_cmp + cfg.block_cmp {
                for (a, v) in acc.iter_mut().zip(&x[(start + t) * row..][..row]) {
                    *a += v.to_f32();
                }
            }
            let dst = &mut out[(offs[s] as usize + i) * row..][..row];
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = T::from_f32(a * inv);
            }
        }
    }
    Ok(out)
}

/// Backward of [`compress_mean`]: `dx[t] = sum over blocks i containing t of dx_cmp[i] / l`.
pub fn compress_mean_backward<T: Element>(
    cfg: &NsaConfig,
    heads: usize,
    dim: usize,
    dx_cmp: &[T],
    cu_seqlens: &[u32],
) -> Result<Vec<T>, Error> {
    cfg.validate()?;
    let total = *cu_seqlens.last().ok_or_else(|| Error::CuSeqlens("empty".into()))? as usize;
    validate_cu_seqlens(cu_seqlens, total)?;
    let offs = offsets(cfg, cu_seqlens);
    let row = numel("dx", &[heads, dim])?;
    if row == 0 {
        return Err(Error::Shape(format!("heads x dim = {heads} x {dim} is empty")));
    }
    let total_cmp = *offs.last().unwrap_or(&0) as usize;
    expect_len("dx_cmp", dx_cmp.len(), numel("dx_cmp", &[total_cmp, row])?, "[total_cmp, H, D]")?;
    // The output's size comes from `cu_seqlens` alone (the rows no block covers get zeros), so
    // it may be far larger than the gradient: allocate it fallibly.
    let out_len = numel("dx", &[total, row])?;
    let mut acc: Vec<f32> = try_zeroed("compress_mean_backward output (f32 accumulator)", out_len)?;
    let mut out: Vec<T> = try_zeroed("compress_mean_backward output", out_len)?;
    let inv = 1.0 / cfg.block_cmp as f32;
    for (s, w) in cu_seqlens.windows(2).enumerate() {
        let start = w[0] as usize;
        for i in 0..(offs[s + 1] - offs[s]) as usize {
            let src = &dx_cmp[(offs[s] as usize + i) * row..][..row];
            for t in i * cfg.stride_cmp..i * cfg.stride_cmp + cfg.block_cmp {
                for (a, g) in acc[(start + t) * row..][..row].iter_mut().zip(src) {
                    *a += g.to_f32() * inv;
                }
            }
        }
    }
    // Rows no block covers stay as the allocator zeroed them (untouched, they cost no memory).
    for (o, a) in out.iter_mut().zip(&acc) {
        if a.to_bits() != 0 {
            *o = T::from_f32(*a);
        }
    }
    Ok(out)
}
