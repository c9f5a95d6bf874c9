//! What each collective computes, written plainly over every rank's input at once: the
//! semantics the backends are tested against (and a reference for tests of layers built on
//! them).
//!
//! Each function takes `inputs[r]`, rank r's send buffer, and returns what every rank (or
//! rank r, for reduce-scatter) receives. Reductions combine the ranks in rank order in
//! [`Scalar::Acc`] and round once, the order the backends document.

use crate::dtype::Scalar;
use crate::ReduceOp;

/// One element reduced over the ranks: `op(values[0], values[1], ...)`.
pub fn reduce_one<T: Scalar>(values: &[T], op: ReduceOp) -> T {
    let mut acc = values[0].to_acc();
    for &v in &values[1..] {
        let v = v.to_acc();
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => T::add(acc, v),
            ReduceOp::Max => T::max(acc, v),
            ReduceOp::Min => T::min(acc, v),
            ReduceOp::Prod => T::mul(acc, v),
        };
    }
    if op == ReduceOp::Avg {
        acc = T::div_count(acc, values.len());
    }
    T::from_acc(acc)
}

/// All-reduce: element i of the result reduces element i of every rank's input.
pub fn all_reduce<T: Scalar>(inputs: &[Vec<T>], op: ReduceOp) -> Vec<T> {
    let len = inputs[0].len();
    (0..len)
        .map(|i| {
            let column: Vec<T> = inputs.iter().map(|x| x[i]).collect();
            reduce_one(&column, op)
        })
        .collect()
}

/// All-gather: every rank's input, concatenated in rank order.
pub fn all_gather<T: Scalar>(inputs: &[Vec<T>]) -> Vec<T> {
    inputs.concat()
}

/// Reduce-scatter: rank r receives block r (of `len / world` elements) of the all-reduce.
pub fn reduce_scatter<T: Scalar>(inputs: &[Vec<T>], op: ReduceOp) -> Vec<Vec<T>> {
    let world = inputs.len();
    let full = all_reduce(inputs, op);
    let block = full.len() / world;
    (0..world).map(|r| full[r * block..(r + 1) * block].to_vec()).collect()
}

/// Test inputs made from a seed, the same on every rank and every backend: floats in [-4, 4)
/// (rounded to the type), integers over their whole range (so sums and products wrap).
pub trait SeededValue: Scalar {
    /// The value for 64 random bits.
    fn from_seed(bits: u64) -> Self;
}

impl SeededValue for f32 {
    fn from_seed(bits: u64) -> Self {
        (bits >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0
    }
}
impl SeededValue for half::bf16 {
    fn from_seed(bits: u64) -> Self {
        half::bf16::from_f32(<f32 as SeededValue>::from_seed(bits))
    }
}
impl SeededValue for half::f16 {
    fn from_seed(bits: u64) -> Self {
        half::f16::from_f32(<f32 as SeededValue>::from_seed(bits))
    }
}
impl SeededValue for i32 {
    fn from_seed(bits: u64) -> Self {
        (bits >> 32) as i32
    }
}
impl SeededValue for i64 {
    fn from_seed(bits: u64) -> Self {
        bits as i64
    }
}

/// SplitMix64: the next 64 random bits of `state`.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `world` inputs of `len` values each, from `seed` (every rank can make all of them, so it
/// knows the answer).
pub fn seeded_inputs<T: SeededValue>(world: usize, len: usize, seed: u64) -> Vec<Vec<T>> {
    let mut state = seed;
    (0..world).map(|_| (0..len).map(|_| T::from_seed(splitmix(&mut state))).collect()).collect()
}
