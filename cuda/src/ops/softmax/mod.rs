//! Row-wise softmax over a row-major `[rows, cols]` matrix, f32 or bf16 storage, f32 math.
//! A row that is entirely `-inf` (fully masked) becomes all zeros, not NaN.

use crate::{Element, Error, KernelSource};

/// The CUDA source: `squid_softmax_f32`, `squid_softmax_bf16` (one block per row).
pub const KERNEL: KernelSource = crate::kernel_source!(
    "softmax",
    "src/ops/softmax/softmax.cu",
    ["squid_softmax_f32", "squid_softmax_bf16"],
    fast_math = true
);

fn check_shape(len_x: usize, len_y: usize, cols: usize) -> Result<usize, Error> {
    let bad = |message: String| Err(Error::Launch { kernel: "softmax".into(), message });
    if cols == 0 {
        return bad("cols must be at least 1".into());
    }
    if len_x % cols != 0 {
        return bad(format!("input has {len_x} elements, not a multiple of cols = {cols}"));
    }
    if len_x != len_y {
        return bad(format!("input has {len_x} elements but output has {len_y}"));
    }
    Ok(len_x / cols)
}

/// The reference: max, then sum of exponentials in f64, then divide.
pub fn naive<T: Element>(x: &[T], y: &mut [T], cols: usize) -> Result<(), Error> {
    check_shape(x.len(), y.len(), cols)?;
    for (xr, yr) in x.chunks(cols).zip(y.chunks_mut(cols)) {
        let max = xr.iter().map(|v| v.to_f32()).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            yr.fill(T::from_f32(0.0));
            continue;
        }
        let sum: f64 = xr.iter().map(|v| f64::from(v.to_f32() - max).exp()).sum();
        for (yi, xi) in yr.iter_mut().zip(xr) {
            *yi = T::from_f32((f64::from(xi.to_f32() - max).exp() / sum) as f32);
        }
    }
    Ok(())
}

/// Rows in parallel; each row in two passes over f32 values (max, then exp and sum in place).
pub fn cpu<T: Element>(x: &[T], y: &mut [T], cols: usize) -> Result<(), Error> {
    use rayon::prelude::*;
    check_shape(x.len(), y.len(), cols)?;
    x.par_chunks(cols).zip(y.par_chunks_mut(cols)).for_each_init(
        || vec![0.0f32; cols],
        |row, (xr, yr)| {
            let mut max = f32::NEG_INFINITY;
            for (r, v) in row.iter_mut().zip(xr) {
                *r = v.to_f32();
                max = max.max(*r);
            }
            if max == f32::NEG_INFINITY {
                yr.fill(T::from_f32(0.0));
                return;
            }
            let mut sum = 0.0f32;
            for r in row.iter_mut() {
                *r = (*r - max).exp();
                sum += *r;
            }
            let inv = 1.0 / sum;
            for (yi, r) in yr.iter_mut().zip(row.iter()) {
                *yi = T::from_f32(r * inv);
            }
        },
    );
    Ok(())
}

/// The GPU path.
#[cfg(feature = "cuda")]
pub mod cuda {
    use half::bf16;

    use super::*;
    use crate::launch::{DeviceView, DeviceViewMut, Gpu, LaunchDims};

    macro_rules! softmax_launcher {
        ($fn:ident, $t:ty, $entry:literal) => {
            /// Row-wise softmax of `x` (`[rows, cols]`) into `y` on the device (any memory of
            /// `gpu`'s context: `&DeviceBuffer`s or a caller's views).
            pub fn $fn<'x, 'y>(
                gpu: &Gpu,
                x: impl Into<DeviceView<'x, $t>>,
                y: impl Into<DeviceViewMut<'y, $t>>,
                cols: usize,
            ) -> Result<(), Error> {
                let (x, y) = (x.into(), y.into());
                let rows = check_shape(x.len(), y.len(), cols)?;
                if rows == 0 {
                    return Ok(());
                }
                let rows = u32::try_from(rows).map_err(|_| Error::Launch {
                    kernel: "softmax".into(),
                    message: format!("{rows} rows exceed one grid dimension"),
                })?;
                // SAFETY: the entry is (const T* x, T* y, long long cols); block b reads and
                // writes row b only, and rows * cols = len(x) = len(y).
                let kernel =
                    unsafe { gpu.typed_kernel::<(DeviceView<'_, $t>, DeviceViewMut<'_, $t>, i64)>(&KERNEL, $entry) }?;
                let block = if cols >= 1024 { 256 } else { 128 };
                kernel.launch(gpu, LaunchDims::per_row(rows, block), (x, y, cols as i64))
            }
        };
    }
    softmax_launcher!(softmax_f32, f32, "squid_softmax_f32");
    softmax_launcher!(softmax_bf16, bf16, "squid_softmax_bf16");
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn masked_rows_are_zero_and_bad_shapes_are_errors() {
        let x = [f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        let mut y = [9.0f32; 4];
        cpu(&x, &mut y, 2).unwrap();
        assert_eq!(y, [0.0, 0.0, 1.0, 0.0]);
        naive(&x, &mut y, 2).unwrap();
        assert_eq!(y, [0.0, 0.0, 1.0, 0.0]);
        assert!(cpu(&[1.0f32; 5], &mut [0.0; 5], 2).is_err());
        assert!(cpu(&[1.0f32; 4], &mut [0.0; 2], 2).is_err());
        assert!(naive(&[1.0f32; 4], &mut [0.0; 4], 0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// f32: within 4 ulp-scale relative error of the f64-summed reference; bf16: within one
        /// bf16 rounding step (both round the same f32 value, which may straddle a tie).
        #[test]
        fn cpu_matches_naive(rows in 1usize..6, cols in 1usize..300, scale in 0.1f32..30.0, seed in any::<u64>()) {
            let mut state = seed | 1;
            let x: Vec<f32> = (0..rows * cols).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            }).collect();
            let (mut y_ref, mut y_cpu) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
            naive(&x, &mut y_ref, cols).unwrap();
            cpu(&x, &mut y_cpu, cols).unwrap();
            for (r, c) in y_ref.iter().zip(&y_cpu) {
                prop_assert!((r - c).abs() <= 1e-6 + 4.0 * f32::EPSILON * cols as f32 * r.abs(), "{} vs {}", r, c);
            }
            for row in y_cpu.chunks(cols) {
                prop_assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            }
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let (mut b_ref, mut b_cpu) = (vec![bf16::ZERO; x.len()], vec![bf16::ZERO; x.len()]);
            naive(&xb, &mut b_ref, cols).unwrap();
            cpu(&xb, &mut b_cpu, cols).unwrap();
            for (r, c) in b_ref.iter().zip(&b_cpu) {
                prop_assert!((r.to_f32() - c.to_f32()).abs() <= 1e-6 + r.to_f32().abs() / 128.0, "{} vs {}", r, c);
            }
        }
    }
}
