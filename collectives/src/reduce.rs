//! The element-wise reduction every backend on the host runs: blocked so the partial results
//! stay in L1 while each rank's slice streams past once.

use crate::dtype::Scalar;
use crate::ReduceOp;

/// Elements per block: the accumulator (at most 8 bytes an element) stays in L1.
const BLOCK: usize = 512;

/// `out[i] = op(srcs[0][i], srcs[1][i], ...)` written to every slice of `outs`: combined in the
/// order of `srcs` in `T::Acc` and rounded once; `Avg` divides the sum by `srcs.len()`. Each block
/// is reduced once and then stored to every output while it is still in L1.
///
/// `srcs` must not be empty and every slice in `srcs` and `outs` must have the same length
/// (callers check both).
pub(crate) fn reduce_into<T: Scalar>(srcs: &[&[T]], outs: &mut [&mut [T]], op: ReduceOp) {
    debug_assert!(!srcs.is_empty());
    let len = srcs[0].len();
    debug_assert!(srcs.iter().all(|s| s.len() == len) && outs.iter().all(|o| o.len() == len));
    let count = srcs.len();
    match op {
        ReduceOp::Sum => reduce_with(srcs, outs, len, T::add, |a| a),
        ReduceOp::Avg => reduce_with(srcs, outs, len, T::add, |a| T::div_count(a, count)),
        ReduceOp::Max => reduce_with(srcs, outs, len, T::max, |a| a),
        ReduceOp::Min => reduce_with(srcs, outs, len, T::min, |a| a),
        ReduceOp::Prod => reduce_with(srcs, outs, len, T::mul, |a| a),
    }
}

#[inline(always)]
fn reduce_with<T: Scalar>(
    srcs: &[&[T]],
    outs: &mut [&mut [T]],
    len: usize,
    combine: impl Fn(T::Acc, T::Acc) -> T::Acc,
    finish: impl Fn(T::Acc) -> T::Acc,
) {
    let mut acc = [T::Acc::default(); BLOCK];
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        let acc = &mut acc[..end - start];
        for (a, &x) in acc.iter_mut().zip(&srcs[0][start..end]) {
            *a = x.to_acc();
        }
        for src in &srcs[1..] {
            for (a, &x) in acc.iter_mut().zip(&src[start..end]) {
                *a = combine(*a, x.to_acc());
            }
        }
        let Some((first, rest)) = outs.split_first_mut() else { return };
        let first = &mut first[start..end];
        for (o, &a) in first.iter_mut().zip(acc.iter()) {
            *o = T::from_acc(finish(a));
        }
        for out in rest {
            out[start..end].copy_from_slice(first);
        }
        start = end;
    }
}
