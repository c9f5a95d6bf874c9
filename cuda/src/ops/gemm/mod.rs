//! `C = A * B` with `A` bf16 `[m, k]`, `B` bf16 `[k, n]`, both row-major, and `C` f32 `[m, n]`
//! row-major: the dense matmul of attention and of every projection, bf16 in, f32 out.
//!
//! The kernel is the proof of the tensor-core path: a 64 x 64 x 32 tiled GEMM that stages tiles
//! with `cp.async` (double-buffered), reads fragments with `ldmatrix` and multiplies with
//! `mma.sync.aligned.m16n8k16` (bf16, f32 accumulation), for any `m`, `n`, `k` (edge tiles are
//! zero-filled, stores predicated).

use half::bf16;

use crate::{Error, KernelSource};

/// The CUDA source: `squid_gemm_bf16_f32`.
pub const KERNEL: KernelSource =
    crate::kernel_source!("gemm", "src/ops/gemm/gemm.cu", ["squid_gemm_bf16_f32"], fast_math = false);

/// Rows of C per block tile.
pub const TILE_M: usize = 64;
/// Columns of C per block tile.
pub const TILE_N: usize = 64;
/// Threads per block (four warps).
pub const THREADS: u32 = 128;

/// The problem size, checked against the buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of A and C.
    pub m: usize,
    /// Columns of B and C.
    pub n: usize,
    /// Columns of A, rows of B.
    pub k: usize,
}

impl GemmShape {
    /// Checks the three lengths (`a`: m * k, `b`: k * n, `c`: m * n).
    pub fn check(&self, len_a: usize, len_b: usize, len_c: usize) -> Result<(), Error> {
        let bad = |message: String| Err(Error::Launch { kernel: "gemm".into(), message });
        let GemmShape { m, n, k } = *self;
        for (name, len, rows, cols) in [("A", len_a, m, k), ("B", len_b, k, n), ("C", len_c, m, n)] {
            match rows.checked_mul(cols) {
                Some(want) if want == len => {}
                Some(want) => return bad(format!("{name} has {len} elements, [{rows}, {cols}] needs {want}")),
                None => return bad(format!("{name} of [{rows}, {cols}] overflows")),
            }
        }
        Ok(())
    }
}

/// The reference: each element a dot product summed in f64, rounded once to f32.
pub fn naive(shape: GemmShape, a: &[bf16], b: &[bf16], c: &mut [f32]) -> Result<(), Error> {
    shape.check(a.len(), b.len(), c.len())?;
    let GemmShape { n, k, .. } = shape;
    for (i, row) in c.chunks_mut(n.max(1)).enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            let dot: f64 = (0..k).map(|p| f64::from(a[i * k + p].to_f32()) * f64::from(b[p * n + j].to_f32())).sum();
            *out = dot as f32;
        }
    }
    Ok(())
}

/// Rows of C in parallel; B converted to f32 once; each row accumulates `a[i, p] * B[p, :]` in
/// f32 (a contiguous inner loop over n that vectorises), blocked over k so a block of B rows
/// stays in cache across the rows a thread handles.
pub fn cpu(shape: GemmShape, a: &[bf16], b: &[bf16], c: &mut [f32]) -> Result<(), Error> {
    use rayon::prelude::*;
    shape.check(a.len(), b.len(), c.len())?;
    let GemmShape { m, n, k } = shape;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    const ROWS: usize = 16;
    const KB: usize = 256;
    c.par_chunks_mut(ROWS * n).enumerate().for_each(|(blk, cb)| {
        cb.fill(0.0);
        for p0 in (0..k).step_by(KB) {
            let p1 = (p0 + KB).min(k);
            for (r, crow) in cb.chunks_mut(n).enumerate() {
                let arow = &a[(blk * ROWS + r) * k..][..k];
                for p in p0..p1 {
                    let av = arow[p].to_f32();
                    for (cv, bv) in crow.iter_mut().zip(&bf[p * n..(p + 1) * n]) {
                        *cv += av * bv;
                    }
                }
            }
        }
    });
    Ok(())
}

/// The device path (a GPU, or the simulator).
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::*;
    use crate::launch::{DeviceView, DeviceViewMut, Gpu, LaunchDims};

    /// `C = A * B` on the device, over any memory of `gpu`'s context (`&DeviceBuffer`s or a
    /// caller's views; sub-views at any element offset work, the kernel takes its 16-byte
    /// path only where the addresses allow).
    pub fn gemm_bf16<'a, 'b, 'c>(
        gpu: &Gpu,
        shape: GemmShape,
        a: impl Into<DeviceView<'a, bf16>>,
        b: impl Into<DeviceView<'b, bf16>>,
        c: impl Into<DeviceViewMut<'c, f32>>,
    ) -> Result<(), Error> {
        let (a, b, c) = (a.into(), b.into(), c.into());
        shape.check(a.len(), b.len(), c.len())?;
        let GemmShape { m, n, k } = shape;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let bad = |message: String| Error::Launch { kernel: "gemm".into(), message };
        let dim = |v: usize, what: &str| i32::try_from(v).map_err(|_| bad(format!("{what} = {v} exceeds i32")));
        let (mi, ni, ki) = (dim(m, "m")?, dim(n, "n")?, dim(k, "k")?);
        let grid = (n.div_ceil(TILE_N) as u32, u32::try_from(m.div_ceil(TILE_M)).unwrap_or(u32::MAX), 1);
        let dims = LaunchDims { grid, block: (THREADS, 1, 1), shared_bytes: 0 };
        // SAFETY: the entry is (const bf16* a, const bf16* b, float* c, int m, int n, int k);
        // it reads A and B only at (row, col) inside [m, k] and [k, n] and writes C only
        // inside [m, n], and the lengths were checked above.
        let kernel = unsafe {
            gpu.typed_kernel::<(DeviceView<'_, bf16>, DeviceView<'_, bf16>, DeviceViewMut<'_, f32>, i32, i32, i32)>(
                &KERNEL,
                "squid_gemm_bf16_f32",
            )
        }?;
        kernel.launch(gpu, dims, (a, b, c, mi, ni, ki))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn bf(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    #[test]
    fn known_product_and_bad_shapes() {
        // [[1, 2], [3, 4]] * [[5, 6], [7, 8]] = [[19, 22], [43, 50]]
        let (a, b) = (bf(&[1.0, 2.0, 3.0, 4.0]), bf(&[5.0, 6.0, 7.0, 8.0]));
        let shape = GemmShape { m: 2, n: 2, k: 2 };
        let (mut c1, mut c2) = ([0.0f32; 4], [0.0f32; 4]);
        naive(shape, &a, &b, &mut c1).unwrap();
        cpu(shape, &a, &b, &mut c2).unwrap();
        assert_eq!(c1, [19.0, 22.0, 43.0, 50.0]);
        assert_eq!(c2, c1);
        // k = 0: C is all zeros.
        let mut c0 = [7.0f32; 6];
        cpu(GemmShape { m: 2, n: 3, k: 0 }, &[], &[], &mut c0).unwrap();
        assert_eq!(c0, [0.0; 6]);
        assert!(cpu(shape, &a[..3], &b, &mut c2).is_err());
        assert!(naive(shape, &a, &b, &mut [0.0; 3]).is_err());
        assert!(GemmShape { m: usize::MAX, n: 2, k: 2 }.check(0, 4, 0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// f32 accumulation against the f64 reference: within k ulps of the sum of |products|.
        #[test]
        fn cpu_matches_naive(m in 1usize..40, n in 1usize..40, k in 0usize..300, seed in any::<u64>()) {
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0 };
            let a: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(next())).collect();
            let b: Vec<bf16> = (0..k * n).map(|_| bf16::from_f32(next())).collect();
            let shape = GemmShape { m, n, k };
            let (mut r, mut c) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
            naive(shape, &a, &b, &mut r).unwrap();
            cpu(shape, &a, &b, &mut c).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let abs: f32 = (0..k).map(|p| (a[i * k + p].to_f32() * b[p * n + j].to_f32()).abs()).sum();
                    let (x, y) = (r[i * n + j], c[i * n + j]);
                    prop_assert!((x - y).abs() <= (k as f32 + 1.0) * f32::EPSILON * abs, "[{},{}] {} vs {}", i, j, x, y);
                }
            }
        }
    }
}
