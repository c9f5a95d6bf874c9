//! Rotary position embedding (RoPE), its backward, and re-positioning of cached keys.
//!
//! Layout: `x: [tokens, heads, head_dim]`, row-major, stored as f32, bf16 or f16; the rotation is
//! computed in f32. The first `rotary_dim` dims of each head are rotated in pairs, the rest pass
//! through. Pair `i` (of `rotary_dim / 2`) turns by the angle
//! `position * position_scale * base^(-2i / rotary_dim)`.
//!
//! Angles and their sine/cosine are computed in f64 and rounded to f32 once: at position 10^6 an
//! f32 angle would already be off by up to 0.03 rad, which no later step could undo.
//!
//! Because RoPE is a rotation by an angle proportional to the position, moving keys from offset
//! `from` to offset `to` is one rotation by `(to - from) * theta` ([`Rope::reposition`]): the
//! cached key is read once, rotated once and rounded to its storage type once. The result is
//! within one rotation's rounding of the key rotated at its new position directly, and bit for bit
//! equal to it for a token cached at position 0 (rotating by 0 is exact).

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod naive;
#[cfg(test)]
mod tests;

use crate::Error;
use squid_cuda::Element;

/// The CUDA source (its launchers: the `cuda` module, feature `cuda`): per-token rotation
/// (`squid_rope_*`) and uniform shift (`squid_rope_shift_*`)
/// for f32, bf16 and f16 storage.
pub const KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "rope",
    "src/rope/rope.cu",
    [
        "squid_rope_f32",
        "squid_rope_shift_f32",
        "squid_rope_bf16",
        "squid_rope_shift_bf16",
        "squid_rope_f16",
        "squid_rope_shift_f16"
    ],
    fast_math = false
);

/// Which dims of a head form a rotated pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// Pair `i` is `(i, i + rotary_dim / 2)`: GPT-NeoX, Llama in Hugging Face transformers.
    RotateHalf,
    /// Pair `i` is `(2i, 2i + 1)`: the original RoFormer, GPT-J, Meta's Llama checkpoints.
    Interleaved,
}

/// The largest head dimension a [`RopeConfig`] accepts (the tables scale with it; models use at
/// most a few hundred).
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// Shape and frequencies of a rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Dims per head.
    pub head_dim: usize,
    /// How many leading dims of each head are rotated (even, at most `head_dim`); the rest pass
    /// through unchanged ("partial rotary", as in GPT-NeoX and Phi).
    pub rotary_dim: usize,
    /// The frequency base (10 000 in most models, 500 000 in Llama 3).
    pub base: f64,
    /// Positions are multiplied by this factor before the angle is taken. Linear position
    /// interpolation by a factor `F` is `position_scale = 1 / F`.
    pub position_scale: f64,
    /// Which dims are paired.
    pub layout: RopeLayout,
}

impl RopeConfig {
    /// Full rotary dims, base 10 000, no position scaling, rotate-half layout.
    pub fn new(head_dim: usize) -> Self {
        Self { head_dim, rotary_dim: head_dim, base: 10_000.0, position_scale: 1.0, layout: RopeLayout::RotateHalf }
    }

    /// Checks that the dims and numbers make a rotation.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |why: String| Err(Error::InvalidConfig(format!("rope: {why}")));
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            return bad(format!("head_dim {} must be in 1..={MAX_HEAD_DIM}", self.head_dim));
        }
        if self.rotary_dim == 0 || self.rotary_dim % 2 != 0 || self.rotary_dim > self.head_dim {
            return bad(format!(
                "rotary_dim {} must be even, positive and at most head_dim {}",
                self.rotary_dim, self.head_dim
            ));
        }
        if !(self.base.is_finite() && self.base > 0.0) {
            return bad(format!("base {} must be finite and positive", self.base));
        }
        if !(self.position_scale.is_finite() && self.position_scale > 0.0) {
            return bad(format!("position_scale {} must be finite and positive", self.position_scale));
        }
        Ok(())
    }

    /// The two dims (within a head) rotated by frequency `i`.
    pub fn pair(&self, i: usize) -> (usize, usize) {
        match self.layout {
            RopeLayout::RotateHalf => (i, i + self.rotary_dim / 2),
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
        }
    }
}

/// A validated [`RopeConfig`] with its inverse frequencies computed once (f64).
///
/// Optionally holds cos/sin tables for positions `0..n` ([`Rope::with_cached_positions`]), as a
/// model's rotary cache does: the same f64-computed values rounded to f32, so results are bit for
/// bit those without the tables, only faster.
#[derive(Debug, Clone)]
pub struct Rope {
    config: RopeConfig,
    inv_freq: Vec<f64>,
    /// `[cached positions, rotary_dim / 2]` each; empty when there is no cache.
    cos_table: std::sync::Arc<[f32]>,
    sin_table: std::sync::Arc<[f32]>,
}

impl Rope {
    /// Validates the config and computes `base^(-2i / rotary_dim)` for every pair.
    pub fn new(config: RopeConfig) -> Result<Self, Error> {
        config.validate()?;
        let rd = config.rotary_dim as f64;
        let inv_freq = (0..config.rotary_dim / 2).map(|i| config.base.powf(-((2 * i) as f64) / rd)).collect();
        Ok(Self { config, inv_freq, cos_table: Vec::new().into(), sin_table: Vec::new().into() })
    }

    /// Precomputes cos/sin for positions `0..positions` (`positions * rotary_dim * 4` bytes), so
    /// [`Rope::forward`] and [`Rope::backward`] look angles up instead of computing them there.
    /// A table the allocator refuses is [`Error::OutOfMemory`] (the count is the caller's).
    pub fn with_cached_positions(mut self, positions: usize) -> Result<Self, Error> {
        let half = self.config.rotary_dim / 2;
        let len = positions.checked_mul(half).ok_or(Error::OutOfMemory { what: "rope tables", bytes: usize::MAX })?;
        let mut cos = crate::try_zeroed::<f32>("rope cos table", len)?;
        let mut sin = crate::try_zeroed::<f32>("rope sin table", len)?;
        for (p, (c, s)) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)).enumerate() {
            cpu::fill_table(&self, p as f64, 1.0, c, s);
        }
        self.cos_table = cos.into();
        self.sin_table = sin.into();
        Ok(self)
    }

    /// How many positions have precomputed tables.
    pub fn cached_positions(&self) -> usize {
        self.cos_table.len() / (self.config.rotary_dim / 2)
    }

    /// The precomputed cos and sin of position `p`, if cached.
    fn cached(&self, p: u64) -> Option<(&[f32], &[f32])> {
        let half = self.config.rotary_dim / 2;
        let p = usize::try_from(p).ok().filter(|&p| p < self.cached_positions())?;
        Some((&self.cos_table[p * half..(p + 1) * half], &self.sin_table[p * half..(p + 1) * half]))
    }

    /// The config it was built from.
    pub fn config(&self) -> &RopeConfig {
        &self.config
    }

    /// Rotates `x: [positions.len(), heads, head_dim]` in place: token `t` to `positions[t]`.
    pub fn forward<T: Element>(&self, x: &mut [T], heads: usize, positions: &[u64]) -> Result<(), Error> {
        self.check(x.len(), heads, positions.len())?;
        cpu::rotate_per_token(self, x, heads, positions, 1.0);
        Ok(())
    }

    /// Rotates `x: [tokens, heads, head_dim]` in place at positions `start, start + 1, ...`.
    pub fn forward_contiguous<T: Element>(&self, x: &mut [T], heads: usize, start: u64) -> Result<(), Error> {
        let tokens = self.tokens_of(x.len(), heads)?;
        if tokens > 0 && start.checked_add(tokens as u64 - 1).is_none() {
            return Err(Error::OutOfRange(format!("rope: {tokens} positions from {start} pass u64::MAX")));
        }
        let positions: Vec<u64> = (0..tokens as u64).map(|t| start + t).collect();
        self.forward(x, heads, &positions)
    }

    /// Backward of [`Rope::forward`], in place: turns `dL/dy` into `dL/dx`.
    ///
    /// A rotation's Jacobian is the rotation itself, so its transpose is the rotation by the
    /// negative angle.
    pub fn backward<T: Element>(&self, grad: &mut [T], heads: usize, positions: &[u64]) -> Result<(), Error> {
        self.check(grad.len(), heads, positions.len())?;
        cpu::rotate_per_token(self, grad, heads, positions, -1.0);
        Ok(())
    }

    /// Moves keys `k: [tokens, heads, head_dim]` that were rotated for positions
    /// `from, from + 1, ...` to positions `to, to + 1, ...`, in place.
    ///
    /// Every token shifts by the same `to - from`, so this is one rotation by
    /// `(to - from) * theta_i` per pair, computed directly (not un-rotated and re-rotated): one
    /// f32 rotation and one rounding to the storage type per element.
    pub fn reposition<T: Element>(&self, k: &mut [T], heads: usize, from: u64, to: u64) -> Result<(), Error> {
        self.tokens_of(k.len(), heads)?;
        // Exact in f64 for any |to - from| < 2^53.
        let delta = (to as i128 - from as i128) as f64;
        cpu::rotate_uniform(self, k, heads, delta);
        Ok(())
    }

    /// The angle of pair `i` for a position (or position difference) `delta`, in f64.
    ///
    /// The one formula every path uses, so the same position always gives the same bits.
    #[inline]
    pub fn angle(&self, delta: f64, i: usize) -> f64 {
        delta * self.config.position_scale * self.inv_freq[i]
    }

    fn tokens_of(&self, len: usize, heads: usize) -> Result<usize, Error> {
        if heads == 0 {
            return Err(Error::InvalidConfig("rope: heads must be positive".into()));
        }
        let row = heads.checked_mul(self.config.head_dim).ok_or_else(|| {
            Error::ShapeMismatch(format!("rope: heads {heads} x head_dim {} overflows usize", self.config.head_dim))
        })?;
        if len % row != 0 {
            return Err(Error::ShapeMismatch(format!(
                "rope: {len} elements is not a whole number of [heads {heads}, head_dim {}] rows",
                self.config.head_dim
            )));
        }
        Ok(len / row)
    }

    fn check(&self, len: usize, heads: usize, tokens: usize) -> Result<(), Error> {
        let got = self.tokens_of(len, heads)?;
        if got != tokens {
            return Err(Error::ShapeMismatch(format!("rope: {got} tokens of data but {tokens} positions")));
        }
        Ok(())
    }
}
