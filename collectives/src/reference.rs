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
