//! A small safe wrapper over the `gemm` crate: `C (+)= A * B` on row-major f32 matrices, where
//! `A` and `B` may be transposed views. The layers need three products per linear layer
//! (`Y = X W^T`, `dX = dY W`, `dW += dY^T X`); strides express the transposes without copies.

use gemm::{gemm, Parallelism};

/// A read-only view of a `rows x cols` matrix over a slice (row-major, or transposed).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows x cols` matrix; `data.len()` must be `rows * cols`.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix buffer does not match its shape");
        Self { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose (a view, no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `c = a * b` (or `c += a * b` when `accumulate`), `c` row-major `a.rows x b.cols`.
///
/// Panics if the shapes disagree: every caller validates user shapes first, so a mismatch here
/// is a bug in this crate, and the check keeps the unsafe call in bounds.
pub(crate) fn matmul(c: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert_eq!(c.len(), m * n, "output buffer does not match its shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // SAFETY: `a` addresses elements i * row_stride + p * col_stride for i < m, p < k, whose
    // maximum is (m - 1) * rs + (k - 1) * cs < data.len() because `Mat::new` checked
    // data.len() == rows * cols for the untransposed shape (transposing swaps both pairs).
    // The same holds for `b`, and `c` is checked above to be exactly m x n row-major. `c` is a
    // unique borrow, so it does not alias `a` or `b`.
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], at: bool, b: &[f32], bt: bool, m: usize, k: usize, n: usize) -> Vec<f64> {
        let get_a = |i: usize, p: usize| if at { a[p * m + i] } else { a[i * k + p] } as f64;
        let get_b = |p: usize, j: usize| if bt { b[j * k + p] } else { b[p * n + j] } as f64;
        (0..m * n).map(|ij| (0..k).map(|p| get_a(ij / n, p) * get_b(p, ij % n)).sum()).collect()
    }

    #[test]
    fn matmul_matches_a_triple_loop_for_every_transpose() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 9, 33), (4, 0, 3), (0, 3, 2)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
            for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = if at { Mat::new(&a, k, m).t() } else { Mat::new(&a, m, k) };
                let bv = if bt { Mat::new(&b, n, k).t() } else { Mat::new(&b, k, n) };
                let want = naive(&a, at, &b, bt, m, k, n);
                let mut c = vec![f32::NAN; m * n];
                matmul(&mut c, av, bv, false);
                let mut acc = vec![1.0f32; m * n];
                matmul(&mut acc, av, bv, true);
                for i in 0..m * n {
                    assert!((c[i] as f64 - want[i]).abs() < 1e-4, "{m}x{k}x{n} {at} {bt} [{i}]");
                    assert!((acc[i] as f64 - want[i] - 1.0).abs() < 1e-4);
                }
            }
        }
    }
}
