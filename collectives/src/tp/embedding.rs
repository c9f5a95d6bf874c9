//! Vocabulary-parallel embedding (Megatron-LM `VocabParallelEmbedding`): the `[V, d]` table is
//! split by rows, rank r holding ids `r*V/p .. (r+1)*V/p`. Forward: each rank writes the rows of
//! the ids it holds and zeros for the others, then `g` sums over the ranks (exactly one rank
//! contributes each token's row). Backward: each rank adds the output gradient into the rows it
//! holds; no communication (g's backward is the identity).

use super::{check_len, reduce_from_tp_region, shard, split_dim, Result, TpError, TpRank};
use crate::Communicator;

/// A `[vocab, dim]` embedding table split by rows over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabParallelEmbedding {
    /// Full vocabulary size.
    vocab: usize,
    /// Embedding width.
    dim: usize,
    /// Rows on this rank: `vocab / world`.
    local_vocab: usize,
    /// First id held by this rank: `rank * local_vocab`.
    vocab_start: usize,
    /// This rank.
    tp: TpRank,
}

impl VocabParallelEmbedding {
    /// Full vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows on this rank: `vocab / world`.
    pub fn local_vocab(&self) -> usize {
        self.local_vocab
    }

    /// First id held by this rank: `rank * local_vocab`.
    pub fn vocab_start(&self) -> usize {
        self.vocab_start
    }

    /// This rank.
    pub fn tp(&self) -> TpRank {
        self.tp
    }

    /// A `[vocab, dim]` table on rank `tp`; `vocab` must divide by the world size (pad the
    /// vocabulary, as Megatron does, when it does not).
    pub fn new(vocab: usize, dim: usize, tp: TpRank) -> Result<Self> {
        super::nonzero("dim", dim)?;
        let local_vocab = split_dim("vocab", vocab, tp.world)?;
        Ok(Self { vocab, dim, local_vocab, vocab_start: tp.rank * local_vocab, tp })
    }

    /// This rank's rows of the full `[vocab, dim]` table.
    pub fn shard_table(&self, full: &[f32]) -> Result<Vec<f32>> {
        shard::split_rows(full, self.vocab, self.dim, self.tp)
    }

    /// The full table (or its gradient) from every rank's rows.
    pub fn gather_table<C: Communicator>(&self, comm: &C, shard: &[f32]) -> Result<Vec<f32>> {
        shard::gather_rows(comm, shard, self.local_vocab, self.dim)
    }

    fn check_ids(&self, op: &'static str, ids: &[u32]) -> Result<()> {
        match ids.iter().position(|&id| id as usize >= self.vocab) {
            Some(position) => Err(TpError::Token { op, position, token: ids[position], vocab: self.vocab }),
            None => Ok(()),
        }
    }

    /// This rank's row of `id`, if it holds it.
    fn local_row(&self, id: u32) -> Option<usize> {
        (id as usize).checked_sub(self.vocab_start).filter(|&row| row < self.local_vocab)
    }

    /// `y[t] = table[ids[t]]`, `y: [T, dim]`, the same on every rank (one all-reduce).
    pub fn forward<C: Communicator>(&self, comm: &C, ids: &[u32], table: &[f32], y: &mut [f32]) -> Result<()> {
        const OP: &str = "VocabParallelEmbedding::forward";
        self.tp.check(comm)?;
        check_len(OP, "table", table.len(), self.local_vocab.saturating_mul(self.dim))?;
        check_len(OP, "y", y.len(), ids.len().saturating_mul(self.dim))?;
        self.check_ids(OP, ids)?;
        for (&id, out) in ids.iter().zip(y.chunks_exact_mut(self.dim)) {
            match self.local_row(id) {
                Some(row) => out.copy_from_slice(&table[row * self.dim..(row + 1) * self.dim]),
                None => out.fill(0.0),
            }
        }
        reduce_from_tp_region(comm, y)
    }

    /// `dtable[ids[t]] += dy[t]` for the ids this rank holds; no communication.
    pub fn backward(&self, ids: &[u32], dy: &[f32], dtable: &mut [f32]) -> Result<()> {
        const OP: &str = "VocabParallelEmbedding::backward";
        check_len(OP, "dtable", dtable.len(), self.local_vocab.saturating_mul(self.dim))?;
        check_len(OP, "dy", dy.len(), ids.len().saturating_mul(self.dim))?;
        self.check_ids(OP, ids)?;
        for (&id, grad) in ids.iter().zip(dy.chunks_exact(self.dim)) {
            if let Some(row) = self.local_row(id) {
                for (d, g) in dtable[row * self.dim..(row + 1) * self.dim].iter_mut().zip(grad) {
                    *d += g;
                }
            }
        }
        Ok(())
    }
}
