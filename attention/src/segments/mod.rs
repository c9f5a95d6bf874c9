//! Squid attention: a context is a list of segments, each a `Document` or `Global`.
//!
//! - a `Document` token attends causally within its own segment only;
//! - a `Global` token attends to every token of all earlier segments and causally within its
//!   own, which is plain causal attention over the context so far.
//!
//! Because a document never looks outside itself, its keys and values at every layer depend
//! only on its own tokens and relative positions: they can be computed once at position 0,
//! cached, and placed at any offset by re-rotating the keys (`squid-kvcache`), never prefilled
//! again. Every query therefore sees one contiguous run of keys, `[segment start or 0, itself]`,
//! and the CPU path runs the dense flash-style kernel with that per-query range: key tiles
//! wholly outside a query tile's ranges are never visited, so the cost is the sum of each
//! document's causal cost plus the global segments' cost, not `T^2`.
//!
//! Layout as [`crate::dense`]: `q [total_q, HQ, Dk]`, `k [total_k, HKV, Dk]`,
//! `v [total_k, HKV, Dv]`, packed contexts described by `cu_seqlens_q` / `cu_seqlens_k`. The
//! segments of context `s` cover its `Tk` key positions; its `Tq` queries are the last `Tq`
//! positions (bottom-right aligned, so a tail computed against cached document KV is one call).

use squid_cuda::Element;

use crate::dense::cpu::{self as dense_cpu, Mask, Packed};
use crate::dense::{self, DenseConfig, DenseGrads, DenseOutput, Dims};
use crate::{Error, Heads};

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_decode;
pub mod naive;
#[cfg(test)]
mod tests;

/// What a segment's tokens may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    /// Attends causally within itself only: its KV can be cached and moved.
    Document,
    /// Attends to everything before it and causally within itself.
    Global,
}

/// One segment of a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Document or global.
    pub kind: SegmentKind,
    /// Tokens in it (a zero-length segment is allowed and sees nothing).
    pub len: usize,
}

impl Segment {
    /// A document of `len` tokens.
    pub fn document(len: usize) -> Self {
        Self { kind: SegmentKind::Document, len }
    }

    /// A global segment of `len` tokens.
    pub fn global(len: usize) -> Self {
        Self { kind: SegmentKind::Global, len }
    }
}

/// The segments of every context in a packed batch, validated against `cu_seqlens_k`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentLayout {
    /// Per context, `(start, end, kind)` of each segment in context key positions.
    spans: Vec<Vec<(usize, usize, SegmentKind)>>,
    /// The `cu_seqlens_k` it was validated against: a call with other offsets is refused (its
    /// tokens would get the ranges of other segments, some of them none at all).
    cu_seqlens_k: Vec<u32>,
}

impl SegmentLayout {
    /// Checks that the segments of context `s` add up to its key count `Tk`.
    pub fn new(contexts: &[Vec<Segment>], cu_seqlens_k: &[u32]) -> Result<Self, Error> {
        let num = crate::validate_cu_seqlens(cu_seqlens_k, *cu_seqlens_k.last().unwrap_or(&0) as usize)?;
        if contexts.len() != num {
            return Err(Error::Shape(format!("{} segment lists for {num} contexts in cu_seqlens_k", contexts.len())));
        }
        let mut spans = Vec::with_capacity(num);
        for (s, segs) in contexts.iter().enumerate() {
            let tk = (cu_seqlens_k[s + 1] - cu_seqlens_k[s]) as usize;
            let total = segs.iter().try_fold(0usize, |acc, g| acc.checked_add(g.len));
            let Some(total) = total else {
                return Err(Error::Shape(format!("context {s}: segment lengths overflow usize")));
            };
            if total != tk {
                return Err(Error::Shape(format!("context {s}: segments hold {total} tokens but it has {tk} keys")));
            }
            let mut start = 0;
            spans.push(
                segs.iter()
                    .map(|g| {
                        let span = (start, start + g.len, g.kind);
                        start += g.len;
                        span
                    })
                    .collect(),
            );
        }
        Ok(Self { spans, cu_seqlens_k: cu_seqlens_k.to_vec() })
    }

    /// The key offsets it was validated against (and only works with).
    pub fn cu_seqlens_k(&self) -> &[u32] {
        &self.cu_seqlens_k
    }

    /// The contexts' count.
    pub fn num_contexts(&self) -> usize {
        self.spans.len()
    }

    /// The keys `lo..hi` that key position `p` of context `s` sees (its own segment's start, or
    /// 0 for a global token, up to itself).
    pub fn visible_range(&self, s: usize, p: usize) -> (usize, usize) {
        let Some(spans) = self.spans.get(s) else { return (0, 0) };
        // Segments are sorted and contiguous: binary search for the one holding p.
        let idx = spans.partition_point(|&(_, end, _)| end <= p);
        match spans.get(idx) {
            // p lies inside a segment, so p + 1 <= its end does not overflow.
            Some(&(start, _, SegmentKind::Document)) => (start, p + 1),
            Some(&(_, _, SegmentKind::Global)) => (0, p + 1),
            None => (0, 0),
        }
    }

    /// Multiply-adds of a forward pass x 2: the work the layout allows, for benchmarks.
    pub fn forward_flops(&self, heads: &Heads, cu_seqlens_q: &[u32], cu_seqlens_k: &[u32]) -> f64 {
        let mut pairs = 0f64;
        let lens = |cu: &[u32], s: usize| match (cu.get(s), cu.get(s + 1)) {
            (Some(&a), Some(&b)) => b.saturating_sub(a) as usize,
            _ => 0,
        };
        // Closed form per segment (a loop over positions would take seconds for 2^32 of them):
        // positions p in a..b of a segment whose keys start at `base` see p + 1 - base keys.
        let tri = |n: usize| n as f64 * (n as f64 + 1.0) / 2.0;
        for (s, spans) in self.spans.iter().enumerate() {
            let (tq, tk) = (lens(cu_seqlens_q, s), lens(cu_seqlens_k, s));
            let first = tk - tq.min(tk); // the first key position with a query
            for &(start, end, kind) in spans {
                let a = start.max(first);
                if a >= end {
                    continue;
                }
                let base = if kind == SegmentKind::Document { start } else { 0 };
                pairs += tri(end - base) - tri(a - base);
            }
        }
        2.0 * pairs * heads.num_q_heads as f64 * (heads.head_dim_k as f64 + heads.head_dim_v as f64)
    }
}

/// The per-query key ranges as the dense kernel's mask.
struct SegmentMask<'a>(&'a SegmentLayout);

impl Mask for SegmentMask<'_> {
    #[inline]
    fn range(&self, s: usize, i: usize, tq: usize, tk: usize) -> (usize, usize) {
        // Query i sits at key position i + tk - tq; one before the keys sees nothing.
        match (i + tk).checked_sub(tq) {
            Some(p) if p < tk => self.0.visible_range(s, p),
            _ => (0, 0),
        }
    }
}

/// Heads, scale and the finiteness check of a segment-attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentConfig {
    /// Head counts and dimensions.
    pub heads: Heads,
    /// Softmax scale; `None` means `1 / sqrt(Dk)`.
    pub scale: Option<f32>,
    /// Reject NaN and infinities in the inputs.
    pub check_finite: bool,
}

impl SegmentConfig {
    /// Default scale, no finiteness check.
    pub fn new(heads: Heads) -> Self {
        Self { heads, scale: None, check_finite: false }
    }

    /// The dense configuration the kernel runs with (causal; the segments narrow it further).
    pub(crate) fn dense(&self) -> DenseConfig {
        DenseConfig {
            heads: self.heads,
            causal: true,
            window: None,
            scale: self.scale,
            check_finite: self.check_finite,
        }
    }
}

fn validate<T: Element>(
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    q: &[T],
    k: &[T],
    v: &[T],
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<Dims, Error> {
    let dims = dense::validate(&cfg.dense(), q, k, v, cu_q, cu_k)?;
    if layout.num_contexts() != dims.num_seqs {
        return Err(Error::Shape(format!(
            "the segment layout has {} contexts but cu_seqlens {}",
            layout.num_contexts(),
            dims.num_seqs
        )));
    }
    if let Some(i) = (0..cu_k.len()).find(|&i| layout.cu_seqlens_k.get(i) != Some(&cu_k[i])) {
        return Err(Error::CuSeqlens(format!(
            "the segment layout was validated for other cu_seqlens_k: entry {i} is {} in the call, {:?} in the layout",
            cu_k[i],
            layout.cu_seqlens_k.get(i)
        )));
    }
    Ok(dims)
}

/// Segment attention forward on the CPU: `o [total_q, HQ, Dv]` and `lse [HQ, total_q]`.
pub fn forward<T: Element>(
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    q: &[T],
    k: &[T],
    v: &[T],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DenseOutput<T>, Error> {
    let dims = validate(cfg, layout, q, k, v, cu_seqlens_q, cu_seqlens_k)?;
    let packed = Packed::new(&cfg.heads, k, v, cu_seqlens_k, false)?;
    let (o, lse) =
        dense_cpu::forward_with(&cfg.dense(), &SegmentMask(layout), dims, q, &packed, cu_seqlens_q, cu_seqlens_k)?;
    Ok(DenseOutput { o, lse })
}

/// Segment attention backward on the CPU: `dq, dk, dv` from the forward's `o`, `lse` and `d_o`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[f32],
    d_o: &[T],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DenseGrads<T>, Error> {
    let dims = validate(cfg, layout, q, k, v, cu_seqlens_q, cu_seqlens_k)?;
    dense::validate_backward_inputs(&cfg.dense(), dims, o, lse, d_o)?;
    let packed = Packed::new(&cfg.heads, k, v, cu_seqlens_k, true)?;
    dense_cpu::backward_with(
        &cfg.dense(),
        &SegmentMask(layout),
        dims,
        q,
        &packed,
        o,
        lse,
        d_o,
        cu_seqlens_q,
        cu_seqlens_k,
    )
}

/// Checks that every context's new tokens (the last `Tq` of its `key_lens[s]` positions) lie in a
/// final `Global` segment, which is what lets decode read the whole context before them.
pub(crate) fn check_global_tail(layout: &SegmentLayout, cu_seqlens_q: &[u32], key_lens: &[usize]) -> Result<(), Error> {
    for (s, &tk) in key_lens.iter().enumerate() {
        let tq = (cu_seqlens_q[s + 1] - cu_seqlens_q[s]) as usize;
        if tq == 0 {
            continue;
        }
        let first_new = tk
            .checked_sub(tq)
            .ok_or_else(|| Error::Shape(format!("context {s}: {tq} new queries but only {tk} cached keys")))?;
        match layout.spans[s].last() {
            Some(&(start, _, SegmentKind::Global)) if start <= first_new => {}
            _ => {
                return Err(Error::Config(format!(
                    "context {s}: the decoded tokens must all lie in a final Global segment"
                )))
            }
        }
    }
    Ok(())
}

/// Decode of new tokens in a `Global` segment at the end of each context: a global token sees
/// the whole context before it, so this is dense causal decode against the cache (documents'
/// cached KV included, wherever they were placed). Errors if a context's last segment is a
/// document, since a document token must not see what precedes it.
pub fn decode_global<T: Element>(
    cfg: &SegmentConfig,
    layout: &SegmentLayout,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DenseOutput<T>, Error> {
    let dims = validate(cfg, layout, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k)?;
    let key_lens: Vec<usize> = cu_seqlens_k.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    check_global_tail(layout, cu_seqlens_q, &key_lens[..dims.num_seqs])?;
    dense::decode(&cfg.dense(), q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k)
}
