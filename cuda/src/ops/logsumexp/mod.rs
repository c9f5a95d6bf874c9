//! Per-row logsumexp, `out[r] = log(sum_j exp(scale * x[r, j]))`, over a row-major
//! `[rows, cols]` matrix of f32 or bf16, computed in f32: the row reduction of flash attention
//! (its softmax statistics). A row that is entirely `-inf` (fully masked) gives `-inf`.
//!
//! The kernel is the proof of the warp-level online softmax: one warp per row, a running
//! (max, sum of exponentials) per lane, the lanes merged with `__shfl_xor_sync`, `expf`/`logf`
//! compiled with fast math (`ex2.approx`/`lg2.approx`).

use crate::{Element, Error, KernelSource};

/// The CUDA source: `squid_logsumexp_f32`, `squid_logsumexp_bf16` (one warp per row).
pub const KERNEL: KernelSource = crate::kernel_source!(
    "logsumexp",
    "src/ops/logsumexp/logsumexp.cu",
    ["squid_logsumexp_f32", "squid_logsumexp_bf16"],
    fast_math = true
);

/// Rows handled by one block of the kernel (one warp each).
pub const ROWS_PER_BLOCK: u32 = 4;

fn check_shape(len_x: usize, len_out: usize, cols: usize) -> Result<usize, Error> {
    let bad = |message: String| Err(Error::Launch { kernel: "logsumexp".into(), message });
    if cols == 0 {
        return bad("cols must be at least 1".into());
    }
    if len_x % cols != 0 {
        return bad(format!("input has {len_x} elements, not a multiple of cols = {cols}"));
    }
    if len_x / cols != len_out {
        return bad(format!("input has {} rows but the output has {len_out} entries", len_x / cols));
    }
    Ok(len_out)
}

/// The reference: max, then the sum of exponentials and the log in f64.
pub fn naive<T: Element>(x: &[T], out: &mut [f32], cols: usize, scale: f32) -> Result<(), Error> {
    check_shape(x.len(), out.len(), cols)?;
    for (xr, o) in x.chunks(cols).zip(out.iter_mut()) {
        let v: Vec<f64> = xr.iter().map(|e| f64::from(scale) * f64::from(e.to_f32())).collect();
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        *o = if max.is_infinite() {
            max as f32
        } else {
            (max + v.iter().map(|&e| (e - max).exp()).sum::<f64>().ln()) as f32
        };
    }
    Ok(())
}

/// Rows in parallel; each row in two f32 passes (max, then the sum of exponentials).
pub fn cpu<T: Element>(x: &[T], out: &mut [f32], cols: usize, scale: f32) -> Result<(), Error> {
    use rayon::prelude::*;
    check_shape(x.len(), out.len(), cols)?;
    x.par_chunks(cols).zip(out.par_iter_mut()).for_each(|(xr, o)| {
        let max = xr.iter().map(|e| scale * e.to_f32()).fold(f32::NEG_INFINITY, f32::max);
        *o = if max.is_infinite() {
            max
        } else {
            max + xr.iter().map(|e| (scale * e.to_f32() - max).exp()).sum::<f32>().ln()
        };
    });
    Ok(())
}

/// The device path (a GPU, or the simulator).
#[cfg(feature = "cuda")]
pub mod cuda {
    use half::bf16;

    use super::*;
    use crate::launch::{DeviceView, DeviceViewMut, Gpu, LaunchDims};

    macro_rules! logsumexp_launcher {
        ($fn:ident, $t:ty, $entry:literal) => {
            /// Per-row logsumexp of `scale * x` (`[rows, cols]`) into `out` (`rows` entries), on
            /// any memory of `gpu`'s context (`&DeviceBuffer`s or a caller's views).
            pub fn $fn<'x, 'o>(
                gpu: &Gpu,
                x: impl Into<DeviceView<'x, $t>>,
                out: impl Into<DeviceViewMut<'o, f32>>,
                cols: usize,
                scale: f32,
            ) -> Result<(), Error> {
                let (x, out) = (x.into(), out.into());
                let rows = check_shape(x.len(), out.len(), cols)?;
                if rows == 0 {
                    return Ok(());
                }
                let blocks = u32::try_from(rows.div_ceil(ROWS_PER_BLOCK as usize)).map_err(|_| Error::Launch {
                    kernel: "logsumexp".into(),
                    message: format!("{rows} rows exceed one grid dimension"),
                })?;
                // SAFETY: the entry is (const T* x, float* out, long long rows, long long cols,
                // float scale); warp w of block b reads row b * 4 + w < rows of x and writes that
                // entry of out, and rows * cols = len(x), rows = len(out).
                let kernel = unsafe {
                    gpu.typed_kernel::<(DeviceView<'_, $t>, DeviceViewMut<'_, f32>, i64, i64, f32)>(&KERNEL, $entry)
                }?;
                let dims = LaunchDims::per_row(blocks, 32 * ROWS_PER_BLOCK);
                kernel.launch(gpu, dims, (x, out, rows as i64, cols as i64, scale))
            }
        };
    }
    logsumexp_launcher!(logsumexp_f32, f32, "squid_logsumexp_f32");
    logsumexp_launcher!(logsumexp_bf16, bf16, "squid_logsumexp_bf16");
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn masked_rows_are_minus_infinity_and_bad_shapes_are_errors() {
        let x = [f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0, 0.0];
        let (mut a, mut b) = ([9.0f32; 3], [9.0f32; 3]);
        cpu(&x, &mut a, 2, 1.0).unwrap();
        naive(&x, &mut b, 2, 1.0).unwrap();
        assert_eq!(a[..2], [f32::NEG_INFINITY, 0.0]);
        assert_eq!(a, b);
        assert!((a[2] - std::f32::consts::LN_2).abs() < 1e-7);
        assert!(cpu(&[1.0f32; 5], &mut [0.0; 2], 2, 1.0).is_err());
        assert!(cpu(&[1.0f32; 4], &mut [0.0; 3], 2, 1.0).is_err());
        assert!(naive(&[1.0f32; 4], &mut [0.0; 4], 0, 1.0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The f32 two-pass sum against the f64 reference: the relative error of the sum is at
        /// most about cols * eps, which the log turns into that much absolute error.
        #[test]
        fn cpu_matches_naive(rows in 1usize..6, cols in 1usize..300, scale in -2.0f32..2.0, seed in any::<u64>()) {
            let mut state = seed | 1;
            let x: Vec<f32> = (0..rows * cols).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 40.0
            }).collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let (mut r, mut c, mut rb, mut cb) = (vec![0.0f32; rows], vec![0.0f32; rows], vec![0.0f32; rows], vec![0.0f32; rows]);
            naive(&x, &mut r, cols, scale).unwrap();
            cpu(&x, &mut c, cols, scale).unwrap();
            naive(&xb, &mut rb, cols, scale).unwrap();
            cpu(&xb, &mut cb, cols, scale).unwrap();
            for (a, b) in r.iter().zip(&c).chain(rb.iter().zip(&cb)) {
                prop_assert!((a - b).abs() <= 2.0 * f32::EPSILON * (cols as f32 + a.abs()), "{} vs {}", a, b);
            }
        }
    }
}
