//! The semantics of RoPE, written plainly in f64: one 2x2 rotation per pair, angles from the
//! formula, nothing shared with the fast path.

use super::{RopeConfig, RopeLayout};

/// Returns `x: [positions.len(), heads, head_dim]` with token `t` rotated to `positions[t]`.
///
/// Positions are f64 so that tests can also rotate by negative or fractional amounts.
pub fn forward(cfg: &RopeConfig, x: &[f64], heads: usize, positions: &[f64]) -> Vec<f64> {
    assert_eq!(x.len(), positions.len() * heads * cfg.head_dim, "naive rope: shape");
    let mut y = x.to_vec();
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * cfg.head_dim;
            for i in 0..cfg.rotary_dim / 2 {
                let theta = pos * cfg.position_scale * cfg.base.powf(-((2 * i) as f64) / cfg.rotary_dim as f64);
                let (a_dim, b_dim) = match cfg.layout {
                    RopeLayout::RotateHalf => (i, i + cfg.rotary_dim / 2),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let (a, b) = (x[base + a_dim], x[base + b_dim]);
                y[base + a_dim] = a * theta.cos() - b * theta.sin();
                y[base + b_dim] = a * theta.sin() + b * theta.cos();
            }
        }
    }
    y
}
