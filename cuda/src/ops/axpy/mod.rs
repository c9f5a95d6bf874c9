//! `y <- a * x + y` over f32 or bf16 storage, computed in f32 (one fused multiply-add, one
//! rounding to the storage type).

use crate::{Element, Error, KernelSource};

/// The CUDA source: `squid_axpy_f32`, `squid_axpy_bf16`.
pub const KERNEL: KernelSource =
    crate::kernel_source!("axpy", "src/ops/axpy/axpy.cu", ["squid_axpy_f32", "squid_axpy_bf16"], fast_math = false);

fn check_lengths(x: usize, y: usize) -> Result<(), Error> {
    if x == y {
        Ok(())
    } else {
        Err(Error::Launch { kernel: "axpy".into(), message: format!("x has {x} elements but y has {y}") })
    }
}

/// The reference: one element at a time.
pub fn naive<T: Element>(a: f32, x: &[T], y: &mut [T]) -> Result<(), Error> {
    check_lengths(x.len(), y.len())?;
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = T::from_f32(a.mul_add(xi.to_f32(), yi.to_f32()));
    }
    Ok(())
}

/// Rayon over chunks big enough to amortise the fork; the inner loop vectorises.
pub fn cpu<T: Element>(a: f32, x: &[T], y: &mut [T]) -> Result<(), Error> {
    use rayon::prelude::*;
    check_lengths(x.len(), y.len())?;
    const CHUNK: usize = 1 << 14;
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| {
        for (yi, xi) in yc.iter_mut().zip(xc) {
            *yi = T::from_f32(a.mul_add(xi.to_f32(), yi.to_f32()));
        }
    });
    Ok(())
}

/// The GPU path.
#[cfg(feature = "cuda")]
pub mod cuda {
    use half::bf16;

    use super::*;
    use crate::launch::{DeviceView, DeviceViewMut, Gpu, LaunchDims};

    macro_rules! axpy_launcher {
        ($fn:ident, $t:ty, $entry:literal) => {
            /// `y <- a * x + y` on the device, queued on `gpu`'s stream. `x` and `y` are any
            /// device memory of that stream's context: `&DeviceBuffer`s, or a caller's
            /// `CudaSlice` / `CudaView(Mut)` / raw pointer views (`SimSlice`s on the simulator).
            pub fn $fn<'x, 'y>(
                gpu: &Gpu,
                a: f32,
                x: impl Into<DeviceView<'x, $t>>,
                y: impl Into<DeviceViewMut<'y, $t>>,
            ) -> Result<(), Error> {
                let (x, y) = (x.into(), y.into());
                check_lengths(x.len(), y.len())?;
                // SAFETY: the entry is (long long n, float a, const T* x, T* y), and the kernel
                // touches indices < n = len(x) = len(y) only.
                let kernel = unsafe {
                    gpu.typed_kernel::<(i64, f32, DeviceView<'_, $t>, DeviceViewMut<'_, $t>)>(&KERNEL, $entry)
                }?;
                let n = y.len();
                kernel.launch(gpu, LaunchDims::linear(n, 256, 65_535), (n as i64, a, x, y))
            }
        };
    }
    axpy_launcher!(axpy_f32, f32, "squid_axpy_f32");
    axpy_launcher!(axpy_bf16, bf16, "squid_axpy_bf16");
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn mismatched_lengths_are_an_error() {
        assert!(naive(1.0, &[1.0f32], &mut [0.0, 0.0]).is_err());
        assert!(cpu(1.0, &[1.0f32], &mut []).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Both paths do one fma and one rounding per element, so they agree bit for bit.
        #[test]
        fn cpu_equals_naive_exactly(a in -4.0f32..4.0, xs in proptest::collection::vec(-1e3f32..1e3, 0..40_000)) {
            let x16: Vec<bf16> = xs.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut y_ref: Vec<f32> = xs.iter().map(|v| v * 0.5 - 1.0).collect();
            let mut y_cpu = y_ref.clone();
            let mut b_ref: Vec<bf16> = y_ref.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut b_cpu = b_ref.clone();
            naive(a, &xs, &mut y_ref).unwrap();
            cpu(a, &xs, &mut y_cpu).unwrap();
            naive(a, &x16, &mut b_ref).unwrap();
            cpu(a, &x16, &mut b_cpu).unwrap();
            prop_assert_eq!(y_ref, y_cpu);
            prop_assert_eq!(b_ref, b_cpu);
        }
    }
}
