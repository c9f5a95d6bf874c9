//! Trajectories -> one packed training batch (llm.c style: the layout is the whole story).
//!
//! A trajectory of `n` tokens gives `n - 1` positions: inputs `tokens[..n-1]`, targets
//! `tokens[1..]`, loss mask `loss_mask[1..]` (a target counts iff the policy sampled it). Its
//! segments are cut to the `n - 1` inputs. Sequences are packed back to back with `cu_seqlens`.

use squid_attention::segments::Segment;

use crate::model::Batch;
use crate::rollout::Trajectory;
use crate::Error;

/// A packed batch with its next-token targets and loss mask.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingBatch {
    /// Model inputs.
    pub batch: Batch,
    /// Next token per position `[total]`.
    pub targets: Vec<u32>,
    /// Whether a position's target is in the loss `[total]`.
    pub mask: Vec<bool>,
}

impl TrainingBatch {
    /// Positions in the batch.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// No positions at all.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Positions whose target is in the loss.
    pub fn loss_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }

    /// `cu_seqlens` of the packed sequences.
    pub fn cu_seqlens(&self) -> &[u32] {
        &self.batch.cu_seqlens
    }
}

/// Packs `trajectories` (each at least 2 tokens) into one batch.
pub fn pack(trajectories: &[&Trajectory]) -> Result<TrainingBatch, Error> {
    let mut tokens = Vec::new();
    let mut targets = Vec::new();
    let mut mask = Vec::new();
    let mut cu_seqlens = vec![0u32];
    let mut segments = Vec::with_capacity(trajectories.len());
    for (i, t) in trajectories.iter().enumerate() {
        let n = t.tokens.len();
        if n < 2 || t.loss_mask.len() != n {
            return Err(Error::Shape(format!(
                "trajectory {i}: {n} tokens and {} mask entries (need equal counts, at least 2)",
                t.loss_mask.len()
            )));
        }
        let covered: usize = t.segments.iter().map(|s| s.len).sum();
        if covered != n {
            return Err(Error::Shape(format!("trajectory {i}: segments cover {covered} of {n} tokens")));
        }
        tokens.extend_from_slice(&t.tokens[..n - 1]);
        targets.extend_from_slice(&t.tokens[1..]);
        mask.extend_from_slice(&t.loss_mask[1..]);
        cu_seqlens.push(u32::try_from(tokens.len()).map_err(|_| Error::Shape("batch over 2^32 tokens".into()))?);
        segments.push(cut_segments(&t.segments, n - 1));
    }
    Ok(TrainingBatch { batch: Batch { tokens, cu_seqlens, segments }, targets, mask })
}

/// The segments covering the first `len` tokens.
fn cut_segments(segments: &[Segment], len: usize) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segments.len());
    let mut left = len;
    for s in segments {
        if left == 0 {
            break;
        }
        let take = s.len.min(left);
        out.push(Segment { kind: s.kind, len: take });
        left -= take;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutting_keeps_kinds_and_drops_the_last_token() {
        let segs = [Segment::global(3), Segment::document(2), Segment::global(2)];
        assert_eq!(cut_segments(&segs, 6), vec![Segment::global(3), Segment::document(2), Segment::global(1)]);
        assert_eq!(cut_segments(&segs, 4), vec![Segment::global(3), Segment::document(1)]);
        assert_eq!(cut_segments(&segs, 3), vec![Segment::global(3)]);
    }
}
