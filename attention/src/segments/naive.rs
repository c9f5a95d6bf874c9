//! The semantics of segment attention, in f64: the mask is decided per (query, key) pair from
//! the segment list directly (which segment holds each position, and its kind), then the
//! plain dense reference runs with it.

use super::{Segment, SegmentConfig, SegmentKind};
use crate::dense::naive::{backward_masked, forward_masked};
use crate::Error;

/// Whether the token at position `p` of a context sees the token at `j`: a document token sees
/// earlier tokens of its own segment; a global token sees every earlier token.
pub fn visible(segments: &[Segment], p: usize, j: usize) -> bool {
    if j > p {
        return false;
    }
    let mut start = 0;
    for seg in segments {
        let end = start + seg.len;
        if p < end {
            return match seg.kind {
                SegmentKind::Global => true,
                SegmentKind::Document => j >= start,
            };
        }
        start = end;
    }
    false
}

fn mask<'a>(contexts: &'a [Vec<Segment>]) -> impl Fn(usize, usize, usize, usize, usize) -> bool + 'a {
    move |s, i, j, tq, tk| match (i + tk).checked_sub(tq) {
        Some(p) => contexts.get(s).is_some_and(|segs| visible(segs, p, j)),
        None => false,
    }
}

/// Forward: `(o [total_q, HQ, Dv], lse [HQ, total_q])`.
pub fn forward(
    cfg: &SegmentConfig,
    contexts: &[Vec<Segment>],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<(Vec<f64>, Vec<f64>), Error> {
    forward_masked(&cfg.dense(), q, k, v, cu_seqlens_q, cu_seqlens_k, mask(contexts))
}

/// Backward: `(dq, dk, dv)` from `d_o`.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn backward(
    cfg: &SegmentConfig,
    contexts: &[Vec<Segment>],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), Error> {
    backward_masked(&cfg.dense(), q, k, v, d_o, cu_seqlens_q, cu_seqlens_k, mask(contexts))
}
