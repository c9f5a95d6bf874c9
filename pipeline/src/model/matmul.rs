//! Row-major f32 matrix products through the `gemm` crate, with either operand transposed by
//! strides (no copies), and the linear layer `y = x W^T` built on them.

/// `c[m, n] (+)= op(a)[m, k] @ op(b)[k, n]`, all row-major. `op(a) = a` reads `a` as `[m, k]`,
/// `op(a) = a^T` reads it as `[k, m]`; likewise `b` as `[k, n]` or `[n, k]`. With `accumulate`
/// the product is added to `c`, else `c` is overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    c: &mut [f32],
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n, "gemm shapes: {m}x{k} @ {k}x{n}");
    if m * n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // (column stride, row stride) of each operand as gemm reads it.
    let (a_cs, a_rs) = if a_t { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if b_t { (k as isize, 1) } else { (1, n as isize) };
    // Small products are not worth waking the thread pool.
    let par = if m * n * k >= 1 << 16 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above make every (row, col) the strides address lie inside its buffer;
    // `c` is a unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Linear layer forward: `y[rows, out] = x[rows, in] @ w[out, in]^T` (overwrites `y`).
pub(crate) fn linear(y: &mut [f32], x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) {
    gemm(y, x, false, w, true, rows, inp, out, false);
}

/// Linear layer backward: `dx (+)= dy @ w` and `dw += dy^T @ x`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    accumulate_dx: bool,
) {
    gemm(dx, dy, false, w, false, rows, out, inp, accumulate_dx);
    gemm(dw, dy, true, x, false, out, rows, inp, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], a_t: bool, b: &[f32], b_t: bool, m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let x = if a_t { a[p * m + i] } else { a[i * k + p] };
                    let y = if b_t { b[j * k + p] } else { b[p * n + j] };
                    s += f64::from(x) * f64::from(y);
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn every_transpose_matches_the_naive_product() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = naive(&a, a_t, &b, b_t, m, k, n);
            let mut c = vec![1f32; m * n];
            gemm(&mut c, &a, a_t, &b, b_t, m, k, n, false);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "{a_t} {b_t}: {x} vs {y}");
            }
            gemm(&mut c, &a, a_t, &b, b_t, m, k, n, true);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 2.0 * y).abs() < 1e-5, "accumulate {a_t} {b_t}: {x} vs {y}");
            }
        }
    }
}
