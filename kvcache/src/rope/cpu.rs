//! The fast CPU path: sine/cosine tables in f64 rounded once to f32, shared by every head of a
//! token (or by every token when they all shift alike), rayon over blocks of tokens, and a
//! branch-free inner loop over the pairs of one head.

use super::{Rope, RopeLayout};
use rayon::prelude::*;
use squid_cuda::Element;

/// Tokens per rayon task: enough work per task to pay for scheduling at small head counts.
const TOKENS_PER_TASK: usize = 64;

/// Fills `cos[i], sin[i]` for the angle `sign * angle(delta, i)` of every pair.
pub(super) fn fill_table(rope: &Rope, delta: f64, sign: f64, cos: &mut [f32], sin: &mut [f32]) {
    for (i, (c, s)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        let (sn, cs) = rope.angle(delta, i).sin_cos();
        *c = cs as f32;
        *s = (sign * sn) as f32;
    }
}

/// Rotates every head of one token row `[heads * head_dim]` by the angles in the table.
#[inline]
fn rotate_row<T: Element>(rope: &Rope, row: &mut [T], cos: &[f32], sin: &[f32]) {
    let cfg = rope.config();
    let half = cfg.rotary_dim / 2;
    for head in row.chunks_exact_mut(cfg.head_dim) {
        match cfg.layout {
            RopeLayout::RotateHalf => {
                let (lo, hi) = head[..cfg.rotary_dim].split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i].to_f32(), hi[i].to_f32());
                    lo[i] = T::from_f32(a * cos[i] - b * sin[i]);
                    hi[i] = T::from_f32(a * sin[i] + b * cos[i]);
                }
            }
            RopeLayout::Interleaved => {
                for (i, p) in head[..cfg.rotary_dim].chunks_exact_mut(2).enumerate() {
                    let (a, b) = (p[0].to_f32(), p[1].to_f32());
                    p[0] = T::from_f32(a * cos[i] - b * sin[i]);
                    p[1] = T::from_f32(a * sin[i] + b * cos[i]);
                }
            }
        }
    }
}

/// Token `t` of `x` turns by `sign * angle(positions[t])` (shapes already checked).
pub(super) fn rotate_per_token<T: Element>(rope: &Rope, x: &mut [T], heads: usize, positions: &[u64], sign: f64) {
    let row = heads * rope.config().head_dim;
    if x.is_empty() {
        return;
    }
    let half = rope.config().rotary_dim / 2;
    x.par_chunks_mut(row * TOKENS_PER_TASK).zip(positions.par_chunks(TOKENS_PER_TASK)).for_each(|(xs, ps)| {
        let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
        for (r, &p) in xs.chunks_exact_mut(row).zip(ps) {
            match rope.cached(p) {
                Some((c, s)) if sign > 0.0 => rotate_row(rope, r, c, s),
                Some((c, s)) => {
                    // Backward turns the other way: sin(-x) = -sin(x), exactly.
                    sin.iter_mut().zip(s).for_each(|(d, s)| *d = -s);
                    rotate_row(rope, r, c, &sin);
                }
                None => {
                    fill_table(rope, p as f64, sign, &mut cos, &mut sin);
                    rotate_row(rope, r, &cos, &sin);
                }
            }
        }
    });
}

/// Every token of `x` turns by the same `angle(delta)`: one table for the whole buffer.
pub(super) fn rotate_uniform<T: Element>(rope: &Rope, x: &mut [T], heads: usize, delta: f64) {
    let row = heads * rope.config().head_dim;
    if x.is_empty() || delta == 0.0 {
        return;
    }
    let half = rope.config().rotary_dim / 2;
    let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
    fill_table(rope, delta, 1.0, &mut cos, &mut sin);
    x.par_chunks_mut(row * TOKENS_PER_TASK).for_each(|xs| {
        for r in xs.chunks_exact_mut(row) {
            rotate_row(rope, r, &cos, &sin);
        }
    });
}
