//! Column- and row-parallel linear layers (Megatron-LM `ColumnParallelLinear`,
//! `RowParallelLinear`). `Y = X W^T + b` with `W: [out, in]`.
//!
//! Column-parallel splits W by rows (output features): rank r computes `Y_r = X W_r^T + b_r`,
//! its `out / p` columns of Y, from the full input X (the `f` operator: identity forward,
//! all-reduce of dX backward). Row-parallel splits W by columns (input features): rank r takes
//! its `in / p` columns of X (typically a column-parallel layer's output, never gathered) and
//! computes a partial `X_r W_r^T`; the `g` operator sums the partials, then the full bias is
//! added; its backward needs no communication. A column-parallel layer followed by a
//! row-parallel one (an MLP, attention's QKV and output projections) costs one all-reduce
//! forward and one backward.

use super::matmul::{matmul, Mat};
use super::{check_len, copy_to_tp_region_backward, reduce_from_tp_region, shard, split_dim, Result, TpRank};
use crate::Communicator;

/// `Y_r = X W_r^T + b_r` on `out / p` output features per rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnParallelLinear {
    /// Input features (every rank sees all of them).
    in_features: usize,
    /// Output features of the full layer.
    out_features: usize,
    /// Output features on this rank: `out_features / world`.
    local_out: usize,
    /// Whether the layer has a bias.
    has_bias: bool,
    /// This rank.
    tp: TpRank,
}

impl ColumnParallelLinear {
    /// Input features (every rank sees all of them).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features of the full layer.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Output features on this rank: `out_features / world`.
    pub fn local_out(&self) -> usize {
        self.local_out
    }

    /// Whether the layer has a bias.
    pub fn has_bias(&self) -> bool {
        self.has_bias
    }

    /// This rank.
    pub fn tp(&self) -> TpRank {
        self.tp
    }

    /// A layer of `in_features -> out_features` on rank `tp`; `out_features` must divide by the
    /// world size.
    pub fn new(in_features: usize, out_features: usize, bias: bool, tp: TpRank) -> Result<Self> {
        super::nonzero("in_features", in_features)?;
        let local_out = split_dim("out_features", out_features, tp.world)?;
        Ok(Self { in_features, out_features, local_out, has_bias: bias, tp })
    }

    /// This rank's rows of the full `[out, in]` weight: `[out / p, in]`.
    pub fn shard_weight(&self, full: &[f32]) -> Result<Vec<f32>> {
        shard::split_rows(full, self.out_features, self.in_features, self.tp)
    }

    /// This rank's part of the full `[out]` bias: `[out / p]`.
    pub fn shard_bias(&self, full: &[f32]) -> Result<Vec<f32>> {
        shard::split_rows(full, self.out_features, 1, self.tp)
    }

    /// The full `[out, in]` weight (or its gradient) from every rank's shard.
    pub fn gather_weight<C: Communicator>(&self, comm: &C, shard: &[f32]) -> Result<Vec<f32>> {
        shard::gather_rows(comm, shard, self.local_out, self.in_features)
    }

    /// The full `[out]` bias (or its gradient) from every rank's shard.
    pub fn gather_bias<C: Communicator>(&self, comm: &C, shard: &[f32]) -> Result<Vec<f32>> {
        shard::gather_rows(comm, shard, self.local_out, 1)
    }

    fn check_params(&self, op: &'static str, weight: usize, bias: Option<usize>) -> Result<()> {
        check_len(op, "weight", weight, self.local_out.saturating_mul(self.in_features))?;
        match (self.has_bias, bias) {
            (true, Some(b)) => check_len(op, "bias", b, self.local_out)?,
            (false, None) => {}
            (true, None) => check_len(op, "bias", 0, self.local_out)?,
            (false, Some(b)) => check_len(op, "bias (layer has none)", b, 0)?,
        }
        Ok(())
    }

    /// `y[T, out/p] = x[T, in] W_r^T + b_r`. No communication: `f` is the identity forward.
    pub fn forward(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>, y: &mut [f32]) -> Result<()> {
        const OP: &str = "ColumnParallelLinear::forward";
        let tokens = x.len() / self.in_features;
        check_len(OP, "x", x.len(), tokens.saturating_mul(self.in_features))?;
        check_len(OP, "y", y.len(), tokens.saturating_mul(self.local_out))?;
        self.check_params(OP, weight.len(), bias.map(<[f32]>::len))?;
        linear_forward(x, tokens, self.in_features, weight, self.local_out, bias, y);
        Ok(())
    }

    /// Backward: `dx = all_reduce_sum(dy W_r)` (f's backward), `dW_r += dy^T x`,
    /// `db_r += sum_t dy`. `dx` is overwritten; weight and bias gradients accumulate.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<C: Communicator>(
        &self,
        comm: &C,
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
    ) -> Result<()> {
        const OP: &str = "ColumnParallelLinear::backward";
        self.tp.check(comm)?;
        let tokens = x.len() / self.in_features;
        check_len(OP, "x", x.len(), tokens.saturating_mul(self.in_features))?;
        check_len(OP, "dy", dy.len(), tokens.saturating_mul(self.local_out))?;
        check_len(OP, "dx", dx.len(), x.len())?;
        check_len(OP, "dweight", dweight.len(), weight.len())?;
        self.check_params(OP, weight.len(), dbias.as_ref().map(|b| b.len()))?;
        linear_backward(x, tokens, self.in_features, weight, self.local_out, dy, Some(&mut *dx), dweight, dbias);
        copy_to_tp_region_backward(comm, dx)
    }
}

/// `y = g(x_r W_r^T) + b` on `in / p` input features per rank; every rank ends with the full
/// output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowParallelLinear {
    /// Input features of the full layer.
    in_features: usize,
    /// Input features on this rank: `in_features / world`.
    local_in: usize,
    /// Output features (every rank gets all of them).
    out_features: usize,
    /// Whether the layer has a bias (replicated on every rank, added after the reduction).
    has_bias: bool,
    /// This rank.
    tp: TpRank,
}

impl RowParallelLinear {
    /// Input features of the full layer.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Input features on this rank: `in_features / world`.
    pub fn local_in(&self) -> usize {
        self.local_in
    }

    /// Output features (every rank gets all of them).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Whether the layer has a bias (replicated on every rank, added after the reduction).
    pub fn has_bias(&self) -> bool {
        self.has_bias
    }

    /// This rank.
    pub fn tp(&self) -> TpRank {
        self.tp
    }

    /// A layer of `in_features -> out_features` on rank `tp`; `in_features` must divide by the
    /// world size.
    pub fn new(in_features: usize, out_features: usize, bias: bool, tp: TpRank) -> Result<Self> {
        super::nonzero("out_features", out_features)?;
        let local_in = split_dim("in_features", in_features, tp.world)?;
        Ok(Self { in_features, local_in, out_features, has_bias: bias, tp })
    }

    /// This rank's columns of the full `[out, in]` weight: `[out, in / p]`.
    pub fn shard_weight(&self, full: &[f32]) -> Result<Vec<f32>> {
        shard::split_cols(full, self.out_features, self.in_features, self.tp)
    }

    /// The full `[out, in]` weight (or its gradient) from every rank's shard.
    pub fn gather_weight<C: Communicator>(&self, comm: &C, shard: &[f32]) -> Result<Vec<f32>> {
        shard::gather_cols(comm, shard, self.out_features, self.local_in)
    }

    fn check_params(&self, op: &'static str, weight: usize, bias: Option<usize>) -> Result<()> {
        check_len(op, "weight", weight, self.out_features.saturating_mul(self.local_in))?;
        match (self.has_bias, bias) {
            (true, Some(b)) => check_len(op, "bias", b, self.out_features),
            (false, None) => Ok(()),
            (true, None) => check_len(op, "bias", 0, self.out_features),
            (false, Some(b)) => check_len(op, "bias (layer has none)", b, 0),
        }
    }

    /// `y[T, out] = all_reduce_sum(x_r[T, in/p] W_r^T) + b` (g forward, then the bias once).
    pub fn forward<C: Communicator>(
        &self,
        comm: &C,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "RowParallelLinear::forward";
        self.tp.check(comm)?;
        let tokens = x.len() / self.local_in;
        check_len(OP, "x", x.len(), tokens.saturating_mul(self.local_in))?;
        check_len(OP, "y", y.len(), tokens.saturating_mul(self.out_features))?;
        self.check_params(OP, weight.len(), bias.map(<[f32]>::len))?;
        linear_forward(x, tokens, self.local_in, weight, self.out_features, None, y);
        reduce_from_tp_region(comm, y)?;
        if let Some(b) = bias {
            add_bias(y, b);
        }
        Ok(())
    }

    /// Backward, no communication (g's backward is the identity): `dx_r = dy W_r`,
    /// `dW_r += dy^T x_r`, `db += sum_t dy` (the full bias gradient, the same on every rank).
    /// `dx` is overwritten; weight and bias gradients accumulate.
    pub fn backward(
        &self,
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
    ) -> Result<()> {
        const OP: &str = "RowParallelLinear::backward";
        let tokens = x.len() / self.local_in;
        check_len(OP, "x", x.len(), tokens.saturating_mul(self.local_in))?;
        check_len(OP, "dy", dy.len(), tokens.saturating_mul(self.out_features))?;
        check_len(OP, "dx", dx.len(), x.len())?;
        check_len(OP, "dweight", dweight.len(), weight.len())?;
        self.check_params(OP, weight.len(), dbias.as_ref().map(|b| b.len()))?;
        linear_backward(x, tokens, self.local_in, weight, self.out_features, dy, Some(dx), dweight, dbias);
        Ok(())
    }
}

/// Adds `bias[n]` to every row of `y[T, n]`.
fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `y[T, n] = x[T, k] w[n, k]^T (+ b)`.
pub(crate) fn linear_forward(
    x: &[f32],
    tokens: usize,
    k: usize,
    weight: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    matmul(y, Mat::new(x, tokens, k), Mat::new(weight, n, k).t(), false);
    if let Some(b) = bias {
        add_bias(y, b);
    }
}

/// Backward of [`linear_forward`]: `dx = dy w` (if wanted), `dw += dy^T x`, `db += sum_t dy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    x: &[f32],
    tokens: usize,
    k: usize,
    weight: &[f32],
    n: usize,
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    let dy_mat = Mat::new(dy, tokens, n);
    if let Some(dx) = dx {
        matmul(dx, dy_mat, Mat::new(weight, n, k), false);
    }
    matmul(dweight, dy_mat.t(), Mat::new(x, tokens, k), true);
    if let Some(db) = dbias {
        for row in dy.chunks_exact(n) {
            for (g, d) in db.iter_mut().zip(row) {
                *g += d;
            }
        }
    }
}
