//! Vocabulary-parallel cross-entropy (Megatron-LM `vocab_parallel_cross_entropy`): the logits
//! `[T, V]` stay split by columns as the column-parallel LM head left them (rank r holds ids
//! `r*V/p .. (r+1)*V/p`), so the `[T, V]` matrix is never gathered. Forward, per token t:
//!
//! 1. `m_t = max_j logits[t, j]`: local max, then an all-reduce (max);
//! 2. `z_t = logits[t, target_t]`: the rank holding the target writes it, the others 0, then an
//!    all-reduce (sum);
//! 3. `s_t = sum_j exp(logits[t, j] - m_t)`: local sum, then an all-reduce (sum);
//!
//! then `lse_t = m_t + ln s_t` and `logprob_t = z_t - lse_t`, identical on every rank. The loss
//! is the mean of `-logprob_t`. Backward needs no communication: with `g_t` the gradient of the
//! caller's objective with respect to `logprob_t`,
//! `dlogits[t, j] = g_t * (1[j == target_t] - exp(logits[t, j] - lse_t))`, each rank for its own
//! columns. For the plain mean loss `g_t = -1 / T` ([`VocabParallelCrossEntropy::mean_loss_grad`]);
//! an RL loss supplies its own per-token `g_t` (zero on masked tokens).

use super::{check_len, split_dim, Result, TpError, TpRank};
use crate::{Communicator, ReduceOp};

/// Cross-entropy over logits split by vocabulary columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabParallelCrossEntropy {
    /// Full vocabulary size.
    vocab: usize,
    /// Columns on this rank: `vocab / world`.
    local_vocab: usize,
    /// First id held by this rank.
    vocab_start: usize,
    /// This rank.
    tp: TpRank,
}

/// What the forward returns (the same on every rank).
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropyOutput {
    /// `log p(target_t)` per token, `[T]`: what a policy-gradient loss consumes.
    pub logprobs: Vec<f32>,
    /// `log sum_j exp(logits[t, j])` per token, `[T]`: kept so backward recomputes the softmax
    /// instead of storing it.
    pub lse: Vec<f32>,
    /// Mean over tokens of `-logprob_t` (0 for an empty batch).
    pub loss: f32,
}

impl VocabParallelCrossEntropy {
    /// Full vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Columns on this rank: `vocab / world`.
    pub fn local_vocab(&self) -> usize {
        self.local_vocab
    }

    /// First id held by this rank.
    pub fn vocab_start(&self) -> usize {
        self.vocab_start
    }

    /// This rank.
    pub fn tp(&self) -> TpRank {
        self.tp
    }

    /// Cross-entropy over a vocabulary of `vocab` on rank `tp`; `vocab` must divide by the world.
    pub fn new(vocab: usize, tp: TpRank) -> Result<Self> {
        let local_vocab = split_dim("vocab", vocab, tp.world)?;
        Ok(Self { vocab, local_vocab, vocab_start: tp.rank * local_vocab, tp })
    }

    fn check(&self, op: &'static str, logits: usize, targets: &[u32]) -> Result<()> {
        check_len(op, "logits", logits, targets.len().saturating_mul(self.local_vocab))?;
        match targets.iter().position(|&id| id as usize >= self.vocab) {
            Some(position) => Err(TpError::Token { op, position, token: targets[position], vocab: self.vocab }),
            None => Ok(()),
        }
    }

    /// This rank's column of `target`, if it holds it.
    fn local_col(&self, target: u32) -> Option<usize> {
        (target as usize).checked_sub(self.vocab_start).filter(|&col| col < self.local_vocab)
    }

    /// Per-token log-probabilities of `targets` and the mean loss, from this rank's
    /// `[T, vocab / p]` logits. Three all-reduces of `T` floats.
    pub fn forward<C: Communicator>(&self, comm: &C, logits: &[f32], targets: &[u32]) -> Result<CrossEntropyOutput> {
        const OP: &str = "VocabParallelCrossEntropy::forward";
        self.tp.check(comm)?;
        self.check(OP, logits.len(), targets)?;
        let tokens = targets.len();
        let rows = || logits.chunks_exact(self.local_vocab);

        let mut max: Vec<f32> = rows().map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect();
        comm.all_reduce_in_place(&mut max, ReduceOp::Max)?;

        let mut target_logit: Vec<f32> =
            rows().zip(targets).map(|(row, &t)| self.local_col(t).map_or(0.0, |c| row[c])).collect();
        comm.all_reduce_in_place(&mut target_logit, ReduceOp::Sum)?;

        let mut sum_exp: Vec<f32> =
            rows().zip(&max).map(|(row, &m)| row.iter().map(|&l| (l - m).exp()).sum()).collect();
        comm.all_reduce_in_place(&mut sum_exp, ReduceOp::Sum)?;

        let lse: Vec<f32> = max.iter().zip(&sum_exp).map(|(&m, &s)| m + s.ln()).collect();
        let logprobs: Vec<f32> = target_logit.iter().zip(&lse).map(|(&z, &l)| z - l).collect();
        let loss =
            if tokens == 0 { 0.0 } else { -logprobs.iter().map(|&x| x as f64).sum::<f64>() as f32 / tokens as f32 };
        Ok(CrossEntropyOutput { logprobs, lse, loss })
    }

    /// The per-token gradient of the mean loss with respect to the log-probabilities:
    /// `-1 / T` each.
    pub fn mean_loss_grad(tokens: usize) -> Vec<f32> {
        vec![-1.0 / tokens as f32; tokens]
    }

    /// `dlogits[t, j] = grad_logprobs[t] * (1[j == target_t] - exp(logits[t, j] - lse_t))` on
    /// this rank's columns; `dlogits` is overwritten. No communication.
    pub fn backward(
        &self,
        logits: &[f32],
        targets: &[u32],
        lse: &[f32],
        grad_logprobs: &[f32],
        dlogits: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "VocabParallelCrossEntropy::backward";
        self.check(OP, logits.len(), targets)?;
        check_len(OP, "lse", lse.len(), targets.len())?;
        check_len(OP, "grad_logprobs", grad_logprobs.len(), targets.len())?;
        check_len(OP, "dlogits", dlogits.len(), logits.len())?;
        let rows = logits.chunks_exact(self.local_vocab).zip(dlogits.chunks_exact_mut(self.local_vocab));
        for (t, (row, drow)) in rows.enumerate() {
            let g = grad_logprobs[t];
            for (d, &l) in drow.iter_mut().zip(row) {
                *d = -g * (l - lse[t]).exp();
            }
            if let Some(c) = self.local_col(targets[t]) {
                drow[c] += g;
            }
        }
        Ok(())
    }
}
