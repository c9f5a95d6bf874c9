//! Megatron-LM's tensor-parallel layers on CPU buffers, over any [`Communicator`].
//!
//! Every layer is a small config struct (validated against the world size when it is made) with
//! a `forward` and a `backward` written out plainly, llm.c style, on flat row-major f32 buffers.
//! Weights use PyTorch's `[out_features, in_features]` layout. Backward *adds* into weight and
//! bias gradients (so gradients accumulate over micro-batches, as in llm.c) and *overwrites*
//! input gradients.
//!
//! | layer | rank r holds | forward comm | backward comm |
//! |---|---|---|---|
//! | [`copy_to_tp_region`] (f) | - | none (identity) | all-reduce of the input gradient |
//! | [`reduce_from_tp_region`] (g) | - | all-reduce | none (identity) |
//! | [`gather_from_tp_region`] | - | all-gather (last dim) | none (keep own columns) |
//! | [`scatter_to_tp_region`] | - | none (keep own columns) | all-gather (last dim) |
//! | [`ColumnParallelLinear`] | rows `r*out/p..` of W and b | f | f's all-reduce |
//! | [`RowParallelLinear`] | columns `r*in/p..` of W, all of b | g | none |
//! | [`ParallelAttention`] | its q heads, its kv heads (split or replicated, see [`HeadLayout`]) | f, g | f's all-reduce (+ one for replicated kv weights) |
//! | [`VocabParallelEmbedding`] | rows `r*V/p..` of the table | g | none |
//! | [`VocabParallelCrossEntropy`] | columns `r*V/p..` of the logits | 3 all-reduces (max, target logit, sum-exp) | none |
//!
//! [`shard`] splits full weights into a rank's shard and gathers shards back.
//!
//! Every rank must call the same layers in the same order with the same shapes, as with any
//! collective. Shapes are checked before any data moves; a rank whose call is rejected returns
//! its error without communicating, so if only some ranks are given bad shapes, the others wait
//! in the next collective until the communicator's deadline (`Error::Timeout` on the local
//! backend).

mod attention;
mod cross_entropy;
mod embedding;
mod linear;
mod matmul;
pub mod shard;
#[cfg(test)]
mod tests;

use thiserror::Error;

use crate::{Communicator, ReduceOp};

pub use attention::{AttentionCache, AttentionWeights, HeadLayout, ParallelAttention};
pub use cross_entropy::{CrossEntropyOutput, VocabParallelCrossEntropy};
pub use embedding::VocabParallelEmbedding;
pub use linear::{ColumnParallelLinear, RowParallelLinear};

/// What a tensor-parallel layer can fail with.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TpError {
    /// A dimension that must split evenly over the ranks does not.
    #[error("{what} = {dim} is not divisible by the tensor-parallel world size {world}")]
    NotDivisible {
        /// Which dimension.
        what: &'static str,
        /// Its size.
        dim: usize,
        /// The world size.
        world: usize,
    },
    /// A buffer has the wrong number of elements for the layer's shape.
    #[error("{op}: {what} has {got} elements, expected {expected}")]
    Shape {
        /// The layer call.
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length the shape asks for.
        expected: usize,
    },
    /// Buffers of the layer's shapes could not be allocated (dims from the caller).
    #[error("out of memory: {what} needs {elements} elements")]
    OutOfMemory {
        /// Which buffer.
        what: &'static str,
        /// Its size in elements (saturated at `usize::MAX`).
        elements: usize,
    },
    /// A size that must be at least one is zero.
    #[error("{what} must be at least 1")]
    Zero {
        /// Which size.
        what: &'static str,
    },
    /// The attention heads cannot be placed on the ranks (see [`HeadLayout`] for the rule).
    #[error("cannot split {q_heads} query / {kv_heads} kv heads over {world} ranks: {reason}")]
    Heads {
        /// Query heads.
        q_heads: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// The world size.
        world: usize,
        /// Which rule is broken.
        reason: &'static str,
    },
    /// A token id (embedding input or cross-entropy target) is not below the vocabulary size.
    #[error("{op}: token {token} at position {position} is outside the vocabulary of {vocab}")]
    Token {
        /// The layer call.
        op: &'static str,
        /// Where in the batch.
        position: usize,
        /// The id.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// Packed-sequence offsets that do not start at 0, go backwards, or do not end at the token
    /// count.
    #[error("{op}: bad cu_seqlens: {reason}")]
    SeqLens {
        /// The layer call.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A rank outside the world, or a communicator whose rank or world size is not the one the
    /// layer was made for.
    #[error("rank {rank} of world {world} does not match the layer (or is not a rank of it)")]
    Rank {
        /// The rank given.
        rank: usize,
        /// The world size given.
        world: usize,
    },
    /// The communicator failed.
    #[error(transparent)]
    Comm(#[from] crate::Error),
}

/// Result of a tensor-parallel call.
pub type Result<T> = std::result::Result<T, TpError>;

/// Checks that `dim` splits evenly over `world` ranks and returns the per-rank part.
pub(crate) fn split_dim(what: &'static str, dim: usize, world: usize) -> Result<usize> {
    if dim == 0 {
        return Err(TpError::Zero { what });
    }
    if dim % world != 0 {
        return Err(TpError::NotDivisible { what, dim, world });
    }
    Ok(dim / world)
}

/// Checks that a size is at least 1.
pub(crate) fn nonzero(what: &'static str, n: usize) -> Result<()> {
    if n == 0 {
        Err(TpError::Zero { what })
    } else {
        Ok(())
    }
}

/// Checks a buffer length. Expected lengths are products of the caller's dims, taken
/// saturating: an overflowing product becomes `usize::MAX`, which no buffer has, so it fails
/// here as a shape error instead of wrapping to a length that passes.
pub(crate) fn check_len(op: &'static str, what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(TpError::Shape { op, what, got, expected })
    }
}

/// Megatron's `f` (`copy_to_tensor_model_parallel_region`), backward half: the forward is the
/// identity (every rank already holds the full input), so the backward sums the input gradient
/// over the ranks. Call it on the gradient of a replicated activation that fed rank-local
/// computations (the input of a column-parallel layer).
pub fn copy_to_tp_region_backward<C: Communicator>(comm: &C, grad: &mut [f32]) -> Result<()> {
    if comm.world_size() > 1 {
        comm.all_reduce_in_place(grad, ReduceOp::Sum)?;
    }
    Ok(())
}

/// Megatron's `f` forward: the identity. Here for symmetry with [`reduce_from_tp_region`]; the
/// layers call [`copy_to_tp_region_backward`] in their backward.
pub fn copy_to_tp_region(x: &[f32]) -> &[f32] {
    x
}

/// Megatron's `g` (`reduce_from_tensor_model_parallel_region`), forward half: sums the ranks'
/// partial results in place, so every rank holds the full activation. Its backward is the
/// identity (the gradient of a sum with respect to each term is the gradient of the sum).
pub fn reduce_from_tp_region<C: Communicator>(comm: &C, partial: &mut [f32]) -> Result<()> {
    if comm.world_size() > 1 {
        comm.all_reduce_in_place(partial, ReduceOp::Sum)?;
    }
    Ok(())
}

/// Megatron's `g` backward: the identity.
pub fn reduce_from_tp_region_backward(grad: &[f32]) -> &[f32] {
    grad
}

/// Megatron's `gather_from_tensor_model_parallel_region`: every rank's `[rows, local_cols]`
/// block of an activation split along its last dimension becomes the full `[rows, p *
/// local_cols]` activation on every rank (an all-gather; a column-parallel layer's
/// `gather_output`). Backward: [`gather_from_tp_region_backward`].
pub fn gather_from_tp_region<C: Communicator>(comm: &C, x: &[f32], rows: usize, local_cols: usize) -> Result<Vec<f32>> {
    shard::gather_cols(comm, x, rows, local_cols)
}

/// Backward of [`gather_from_tp_region`]: this rank's columns of the full gradient, no
/// communication.
pub fn gather_from_tp_region_backward(grad: &[f32], rows: usize, cols: usize, tp: TpRank) -> Result<Vec<f32>> {
    shard::split_cols(grad, rows, cols, tp)
}

/// Megatron's `scatter_to_tensor_model_parallel_region`: this rank's columns of a replicated
/// `[rows, cols]` activation (the input of a row-parallel layer that was not produced split).
/// No communication; backward: [`scatter_to_tp_region_backward`].
pub fn scatter_to_tp_region(x: &[f32], rows: usize, cols: usize, tp: TpRank) -> Result<Vec<f32>> {
    shard::split_cols(x, rows, cols, tp)
}

/// Backward of [`scatter_to_tp_region`]: the ranks' column gradients gathered back to the full
/// `[rows, p * local_cols]` gradient (an all-gather).
pub fn scatter_to_tp_region_backward<C: Communicator>(
    comm: &C,
    grad: &[f32],
    rows: usize,
    local_cols: usize,
) -> Result<Vec<f32>> {
    shard::gather_cols(comm, grad, rows, local_cols)
}

/// Which part of a world of `world` ranks rank `rank` is, checked once when a layer is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpRank {
    /// This rank.
    rank: usize,
    /// The world size.
    world: usize,
}

impl TpRank {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The world size.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The rank and world size of `comm`.
    pub fn of<C: Communicator>(comm: &C) -> Self {
        Self { rank: comm.rank(), world: comm.world_size() }
    }

    /// A rank given by hand (for sharding weights outside a group).
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 {
            return Err(TpError::Zero { what: "world size" });
        }
        if rank >= world {
            return Err(TpError::Rank { rank, world });
        }
        Ok(Self { rank, world })
    }

    /// Checks that `comm` is this rank of this world.
    pub(crate) fn check<C: Communicator>(&self, comm: &C) -> Result<()> {
        if comm.rank() == self.rank && comm.world_size() == self.world {
            Ok(())
        } else {
            Err(TpError::Rank { rank: comm.rank(), world: comm.world_size() })
        }
    }
}
