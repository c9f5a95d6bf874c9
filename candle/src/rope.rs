//! RoPE and re-positioning of cached keys as candle ops, through squid-kvcache's rotation (angles
//! in f64, rounded to f32 once).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use squid_kvcache::rope::{Rope, RopeConfig};

use crate::host::{self, err, with_float};

/// A validated rotary embedding (frequencies computed once); cheap to clone.
#[derive(Debug, Clone)]
pub struct RopeTable {
    rope: Rope,
}

impl RopeTable {
    /// Validates `config` (even rotary dims within the head, positive base and scale).
    pub fn new(config: RopeConfig) -> Result<Self> {
        Ok(Self { rope: Rope::new(config).map_err(|e| err("rope", e))? })
    }

    /// The same table with cos/sin precomputed for positions `0..positions` (bit for bit the
    /// same results, fewer trigonometric calls).
    pub fn with_cached_positions(self, positions: usize) -> Result<Self> {
        Ok(Self { rope: self.rope.with_cached_positions(positions).map_err(|e| err("rope", e))? })
    }

    /// squid's rotation underneath.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }
}

/// Which rotation an op applies.
#[derive(Debug, Clone)]
pub(crate) enum Rotation {
    /// Token `t` to `positions[t]`.
    PerToken(Vec<u64>),
    /// Every token from `from + t` to `to + t`.
    Shift { from: u64, to: u64 },
}

pub(crate) struct RopeOp {
    pub(crate) table: RopeTable,
    pub(crate) rotation: Rotation,
    /// The backward rotates by the negative angles.
    pub(crate) inverse: bool,
}

impl RopeOp {
    const NAME: &'static str = "rope";

    fn rotate<T: squid_cuda::Element>(&self, x: &mut [T], heads: usize) -> Result<()> {
        let r = &self.table.rope;
        match (&self.rotation, self.inverse) {
            (Rotation::PerToken(p), false) => r.forward(x, heads, p),
            (Rotation::PerToken(p), true) => r.backward(x, heads, p),
            (&Rotation::Shift { from, to }, false) => r.reposition(x, heads, from, to),
            (&Rotation::Shift { from, to }, true) => r.reposition(x, heads, to, from),
        }
        .map_err(|e| err(Self::NAME, e))
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let [tokens, heads, _] = host::dims::<3>(Self::NAME, "x", l, "[tokens, heads, head_dim]")?;
        if let Rotation::PerToken(p) = &self.rotation {
            if p.len() != tokens {
                return Err(err(Self::NAME, format!("{} positions for {tokens} tokens", p.len())));
            }
        }
        let dtype = host::float_dtype(Self::NAME, &[("x", s.dtype())])?;
        with_float!(dtype, T => {
            let mut x = host::contiguous::<T>(Self::NAME, "x", s, l)?.to_vec();
            self.rotate(&mut x, heads)?;
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(x), l.shape().clone()))
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rope_fwd(self, s, l)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // A rotation's Jacobian transposed is the rotation by the negative angle.
        let inverse = RopeOp { table: self.table.clone(), rotation: self.rotation.clone(), inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1(inverse)?))
    }
}

impl RopeOp {
    pub(crate) fn heads_and_dtype(&self, l: &Layout) -> Result<usize> {
        let [_, heads, d] = host::dims::<3>(Self::NAME, "x", l, "[tokens, heads, head_dim]")?;
        if d != self.table.rope.config().head_dim {
            return Err(err(Self::NAME, format!("head_dim {d}, the table's is {}", self.table.rope.config().head_dim)));
        }
        Ok(heads)
    }
}

/// Rotates `x [tokens, heads, head_dim]` (f32, bf16 or f16): token `t` to `positions[t]`.
/// Differentiable (the backward is the inverse rotation).
pub fn rope(x: &Tensor, positions: &[u64], table: &RopeTable) -> Result<Tensor> {
    let op = RopeOp { table: table.clone(), rotation: Rotation::PerToken(positions.to_vec()), inverse: false };
    op.heads_and_dtype(x.layout())?;
    x.contiguous()?.apply_op1(op)
}

/// Moves keys `k [tokens, heads, head_dim]` rotated for positions `from, from + 1, ...` to
/// `to, to + 1, ...`: one rotation by the difference (squid-kvcache's `Rope::reposition`).
pub fn reposition(k: &Tensor, from: u64, to: u64, table: &RopeTable) -> Result<Tensor> {
    let op = RopeOp { table: table.clone(), rotation: Rotation::Shift { from, to }, inverse: false };
    op.heads_and_dtype(k.layout())?;
    k.contiguous()?.apply_op1(op)
}
