//! Trajectories -> one packed training batch (llm.c style: the layout is the whole story).
//!
//! A trajectory of `n` tokens gives `n - 1` positions: inputs `tokens[..n-1]`, targets
//! `tokens[1..]`, loss mask `loss_mask[1..]` (a target counts iff the policy sampled it), its
//! segments cut to the `n - 1` inputs. Sequences are packed back to back with `cu_seqlens`.

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

/// Packs `trajectories` (each at least 2 tokens, checked by [`Trajectory::validate`]) into one
/// batch, each laid out by [`Trajectory::training_example`].
pub fn pack(trajectories: &[&Trajectory]) -> Result<TrainingBatch, Error> {
    let mut tokens = Vec::new();
    let mut targets = Vec::new();
    let mut mask = Vec::new();
    let mut cu_seqlens = vec![0u32];
    let mut segments = Vec::with_capacity(trajectories.len());
    for (i, t) in trajectories.iter().enumerate() {
        t.validate()?;
        if t.tokens.len() < 2 {
            return Err(Error::Shape(format!("trajectory {i} has {} tokens, training needs 2", t.tokens.len())));
        }
        let example = t.training_example();
        tokens.extend_from_slice(&example.inputs);
        targets.extend_from_slice(&example.targets);
        mask.extend_from_slice(&example.mask);
        cu_seqlens.push(u32::try_from(tokens.len()).map_err(|_| Error::Shape("batch over 2^32 tokens".into()))?);
        segments.push(example.segments);
    }
    Ok(TrainingBatch { batch: Batch { tokens, cu_seqlens, segments }, targets, mask })
}
