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
///
/// Batch-invariant: every `y[r, o]` is one multiply-add chain over `p = 0..in` in order, starting
/// from zero, whatever `rows` is and however the rows are tiled or split over threads. A row's
/// outputs are therefore bitwise the same in the trainer's forward over thousands of tokens and
/// in a rollout step over a handful (the `gemm` crate's blocking depends on the matrix sizes,
/// which made the two differ in the last bits). See [`linear_t`].
pub(crate) fn linear(y: &mut [f32], x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) {
    assert!(w.len() == out * inp, "linear weight: {} elements for {out}x{inp}", w.len());
    let wt = transpose(w, out, inp);
    linear_t(y, x, &wt, rows, inp, out);
}

/// `w [rows, cols]` row-major, transposed to `[cols, rows]`.
pub(crate) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for (r, row) in w.chunks_exact(cols.max(1)).enumerate().take(rows) {
        for (c, &x) in row.iter().enumerate() {
            t[c * rows + r] = x;
        }
    }
    t
}

/// [`linear`] with the weight already transposed: `wt [in, out]` (a session keeps its weights
/// transposed once instead of at every step). Register tiles of 4 rows x 16 outputs (remainders
/// 1 row / 1 output) give every element the same chain, so the tiling cannot change a bit; the
/// multiply-add is fused where the CPU has FMA (chosen once per process, so the trainer and the
/// rollouts use the same one).
pub(crate) fn linear_t(y: &mut [f32], x: &[f32], wt: &[f32], rows: usize, inp: usize, out: usize) {
    use rayon::prelude::*;
    assert!(
        x.len() == rows * inp && wt.len() == inp * out && y.len() == rows * out,
        "linear shapes: {rows}x{inp} @ {inp}x{out}"
    );
    if rows * out == 0 {
        return;
    }
    // Tasks of ROW_BLOCK rows x COL_BLOCK outputs; small products stay on this thread.
    const ROW_BLOCK: usize = 32;
    const COL_BLOCK: usize = 256;
    let fma = has_fma();
    let run = |y_rows: &mut [f32], r0: usize, nr: usize, c0: usize, nc: usize| {
        let x_rows = &x[r0 * inp..(r0 + nr) * inp];
        if fma {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `has_fma` found AVX2 and FMA on this CPU.
            unsafe {
                block_avx2(y_rows, x_rows, wt, nr, inp, out, c0, nc)
            }
        } else {
            block::<Unfused>(y_rows, x_rows, wt, nr, inp, out, c0, nc)
        }
    };
    if rows * out * inp < 1 << 16 {
        run(y, 0, rows, 0, out);
        return;
    }
    let col_blocks = out.div_ceil(COL_BLOCK);
    y.par_chunks_mut(ROW_BLOCK * out).enumerate().for_each(|(rb, y_rows)| {
        let nr = y_rows.len() / out;
        if col_blocks == 1 {
            run(y_rows, rb * ROW_BLOCK, nr, 0, out);
            return;
        }
        // Column blocks of one row block run in parallel too (a decode step has few rows).
        let ptr = SyncMut(y_rows.as_mut_ptr(), y_rows.len());
        (0..col_blocks).into_par_iter().for_each(|cb| {
            let c0 = cb * COL_BLOCK;
            let nc = COL_BLOCK.min(out - c0);
            // SAFETY: each task writes only columns c0..c0 + nc of these rows, disjoint from the
            // other tasks' columns; the rows outlive the parallel loop.
            let y_rows = unsafe { std::slice::from_raw_parts_mut(ptr.get(), ptr.1) };
            run(y_rows, rb * ROW_BLOCK, nr, c0, nc);
        });
    });
}

/// A row block's output, shared by the column tasks that each write their own columns.
#[derive(Clone, Copy)]
struct SyncMut(*mut f32, usize);
// SAFETY: used only as stated in `linear_t`: tasks write disjoint columns.
unsafe impl Send for SyncMut {}
unsafe impl Sync for SyncMut {}
impl SyncMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Whether this CPU has AVX2 and FMA (detected once).
fn has_fma() -> bool {
    static FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FMA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

struct Unfused;
impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2(y: &mut [f32], x: &[f32], wt: &[f32], nr: usize, inp: usize, out: usize, c0: usize, nc: usize) {
    block::<Fused>(y, x, wt, nr, inp, out, c0, nc)
}

/// Outputs `c0..c0 + nc` of rows `x [nr, inp]` into `y [nr, out]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<F: MulAdd>(y: &mut [f32], x: &[f32], wt: &[f32], nr: usize, inp: usize, out: usize, c0: usize, nc: usize) {
    let mut r = 0;
    while r + 4 <= nr {
        cols::<F, 4>(y, x, wt, r, inp, out, c0, nc);
        r += 4;
    }
    while r < nr {
        cols::<F, 1>(y, x, wt, r, inp, out, c0, nc);
        r += 1;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cols<F: MulAdd, const R: usize>(
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    r: usize,
    inp: usize,
    out: usize,
    c0: usize,
    nc: usize,
) {
    let end = c0 + nc;
    let mut c = c0;
    while c + 16 <= end {
        tile::<F, R, 16>(y, x, wt, r, inp, out, c);
        c += 16;
    }
    while c < end {
        tile::<F, R, 1>(y, x, wt, r, inp, out, c);
        c += 1;
    }
}

/// `y[r..r + R, c..c + W]`: each element `sum_p x[row, p] * wt[p, col]`, `p` in order from zero.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<F: MulAdd, const R: usize, const W: usize>(
    y: &mut [f32],
    x: &[f32],
    wt: &[f32],
    r: usize,
    inp: usize,
    out: usize,
    c: usize,
) {
    let mut acc = [[0f32; W]; R];
    for p in 0..inp {
        let wp: &[f32; W] = wt[p * out + c..][..W].try_into().expect("tile width");
        for (i, row) in acc.iter_mut().enumerate() {
            let xv = x[(r + i) * inp + p];
            for (a, &wv) in row.iter_mut().zip(wp) {
                *a = F::mul_add(xv, wv, *a);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        y[(r + i) * out + c..][..W].copy_from_slice(row);
    }
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

    #[test]
    fn linear_matches_the_naive_product_and_each_row_is_independent_of_the_others() {
        // Awkward sizes: rows not a multiple of 4 or of the 32-row blocks, outputs not a
        // multiple of 16 or of the 256-column blocks, big enough to take the parallel path.
        for (rows, inp, out) in [(1, 3, 1), (5, 17, 33), (37, 24, 300), (70, 65, 257)] {
            let x: Vec<f32> = (0..rows * inp).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.71).cos()).collect();
            let want = naive(&x, false, &w, true, rows, inp, out);
            let mut y = vec![f32::NAN; rows * out];
            linear(&mut y, &x, &w, rows, inp, out);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{rows}x{inp}x{out}: {a} vs {b}");
            }
            // Every row alone, and every suffix of rows, gives bitwise the same outputs.
            for r in 0..rows {
                let mut one = vec![0f32; out];
                linear(&mut one, &x[r * inp..(r + 1) * inp], &w, 1, inp, out);
                assert_eq!(
                    one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    y[r * out..(r + 1) * out].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{rows}x{inp}x{out}: row {r} alone"
                );
            }
            let skip = rows / 3;
            let mut tail = vec![0f32; (rows - skip) * out];
            linear(&mut tail, &x[skip * inp..], &w, rows - skip, inp, out);
            assert!(tail.iter().zip(&y[skip * out..]).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
