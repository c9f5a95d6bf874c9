//! Small f32 building blocks for the CPU paths: a register-tiled matrix multiply-accumulate,
//! a vectorisable `exp`, and the run-time choice of instruction set.
//!
//! Everything here is `#[inline(always)]` and generic over [`Fma`] and the tile width, so that
//! each op can write its task body once and instantiate it inside functions compiled with
//! `#[target_feature(enable = "avx512f,...")]` or `"avx2,fma"`: the bodies then vectorise with
//! those instructions, chosen at run time, without `-C target-cpu=native`.

use std::sync::OnceLock;

/// How a multiply-add is spelled: fused where the target has FMA, plain otherwise (a fused
/// multiply-add without hardware support is a slow library call).
pub(crate) trait Fma {
    /// Whether [`Fma::fma`] is one hardware instruction.
    const FUSED: bool;
    /// `a * b + c`.
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// Hardware fused multiply-add.
pub(crate) struct Fused;
impl Fma for Fused {
    const FUSED: bool = true;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Separate multiply and add.
pub(crate) struct Unfused;
impl Fma for Unfused {
    const FUSED: bool = false;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The instruction sets the CPU paths are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F with FMA: 16-lane vectors, 32 registers.
    Avx512,
    /// AVX2 with FMA: 8-lane vectors.
    Avx2,
    /// Whatever the build target gives (SSE2 on x86-64, NEON on aarch64).
    Generic,
}

/// The best instruction set this machine has, detected once. The environment variable
/// `SQUID_ATTENTION_ISA=avx2|generic` caps it (read once), so the other code paths can be tested
/// on a machine that has AVX-512: `SQUID_ATTENTION_ISA=generic cargo test -p squid-attention`.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let detected = detect();
        match std::env::var("SQUID_ATTENTION_ISA").as_deref() {
            Ok("generic") => Isa::Generic,
            Ok("avx2") if detected != Isa::Generic => Isa::Avx2,
            _ => detected,
        }
    })
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("fma")
        {
            return Isa::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Generic
}

/// Rows per register tile of [`gemm_acc`]; `M` must be a multiple of it.
pub(crate) const TILE_ROWS: usize = 4;
/// Column granularity: `N` must be a multiple of it (every tile width is).
pub(crate) const COL_MULTIPLE: usize = 16;

/// Rounds up to a multiple of `m`.
#[inline(always)]
pub(crate) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// `C[M x N] += A[M x K] * B[K x N]`, all row-major f32 with leading dimensions `lda`, `ldb`,
/// `ldc`. `M % 4 == 0` and `N % 16 == 0`. Register tiles of 4 rows x `W` columns (6 x 16 on
/// AVX2, see [`WIDE_TILE_ROWS`]): each step loads one row piece of `B` and broadcasts one scalar
/// of `A` per row, so `W / lanes * rows` independent accumulators hide the FMA latency.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_acc<F: Fma, const W: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    gemm::<F, W, true>(m, n, k, a, lda, b, ldb, c, ldc)
}

/// `C[M x N] = A[M x K] * B[K x N]`, as [`gemm_acc`] but overwriting `C`: a buffer of scores
/// needs no zeroing (and no reading back) before each product.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_set<F: Fma, const W: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    gemm::<F, W, false>(m, n, k, a, lda, b, ldb, c, ldc)
}

/// Rows of the wide register tile that [`gemm`] uses where it pays: 6 rows x 16 columns on
/// AVX2 is 12 ymm accumulators, 2 for the row of `B` and 1 broadcast (15 of the 16 registers),
/// and each step does 12 FMAs for 8 loads instead of 4-row tiles' 8 FMAs for 6 loads. Zen 3's
/// two FMA pipes with a latency of 4 need at least 8 independent accumulators; 12 leave slack.
const WIDE_TILE_ROWS: usize = 6;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm<F: Fma, const W: usize, const ACC: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    debug_assert!(m % TILE_ROWS == 0 && n % COL_MULTIPLE == 0);
    // 8-lane fused vectors (AVX2) take the 6-row tile; AVX-512's 4 x 64 tile already holds 16
    // of its 32 registers in accumulators, and the generic path (SSE2: 4 lanes) has no room.
    let wide = F::FUSED && W == COL_MULTIPLE;
    let mut j = 0;
    while j + W <= n {
        if wide {
            tile_cols_wide::<F, W, ACC>(m, j, k, a, lda, b, ldb, c, ldc);
        } else {
            tile_cols::<F, W, TILE_ROWS, ACC>(0, m, j, k, a, lda, b, ldb, c, ldc);
        }
        j += W;
    }
    while j < n {
        tile_cols::<F, COL_MULTIPLE, TILE_ROWS, ACC>(0, m, j, k, a, lda, b, ldb, c, ldc);
        j += COL_MULTIPLE;
    }
}

/// One column strip in 6-row tiles, then the rest (`m % 6` is 0, 2 or 4: `m` is a multiple of 4)
/// in a 4-row tile and/or a 2-row tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_cols_wide<F: Fma, const W: usize, const ACC: bool>(
    m: usize,
    j: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let six = m / WIDE_TILE_ROWS * WIDE_TILE_ROWS;
    tile_cols::<F, W, WIDE_TILE_ROWS, ACC>(0, six, j, k, a, lda, b, ldb, c, ldc);
    let four = six + (m - six) / TILE_ROWS * TILE_ROWS;
    tile_cols::<F, W, TILE_ROWS, ACC>(six, four, j, k, a, lda, b, ldb, c, ldc);
    tile_cols::<F, W, 2, ACC>(four, m, j, k, a, lda, b, ldb, c, ldc);
}

/// Rows `i0..i1` (a multiple of `R` apart) of column strip `j..j + W`, in register tiles of `R`
/// rows x `W` columns: each step loads one row piece of `B` and broadcasts `R` scalars of `A`.
/// The bounds of the whole strip are checked once up front; the inner loop then reads through
/// raw pointers (per-element slice checks and the index arithmetic they keep alive cost more
/// instructions than the FMAs in the 4-row version; a profile showed ~30 per 8 FMAs).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_cols<F: Fma, const W: usize, const R: usize, const ACC: bool>(
    i0: usize,
    i1: usize,
    j: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if i1 <= i0 {
        return;
    }
    assert!((i1 - i0) % R == 0, "rows {i0}..{i1} are not whole tiles of {R}");
    assert!(k == 0 || (i1 - 1) * lda + k <= a.len(), "A is shorter than its rows");
    assert!(k == 0 || (k - 1) * ldb + j + W <= b.len(), "B is shorter than its rows");
    assert!((i1 - 1) * ldc + j + W <= c.len(), "C is shorter than its rows");
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut i = i0;
    while i < i1 {
        let mut acc = [[0f32; W]; R];
        // SAFETY (every pointer access below): rows `i..i + R <= i1` of A hold `k` elements
        // from `row * lda`, rows `0..k` of B and rows `i..i + R` of C hold `W` from column `j`,
        // all within the lengths asserted above; `c` is exclusive and `a`, `b` are shared, so
        // the reads and writes do not alias.
        if ACC {
            for (r, row) in acc.iter_mut().enumerate() {
                *row = unsafe { cp.add((i + r) * ldc + j).cast::<[f32; W]>().read_unaligned() };
            }
        }
        let arows: [*const f32; R] = std::array::from_fn(|r| unsafe { ap.add((i + r) * lda) });
        let mut brow = unsafe { bp.add(j) };
        for p in 0..k {
            let bv = unsafe { brow.cast::<[f32; W]>().read_unaligned() };
            for (row, &ar) in acc.iter_mut().zip(&arows) {
                let x = unsafe { *ar.add(p) };
                for (o, &bx) in row.iter_mut().zip(&bv) {
                    *o = F::fma(x, bx, *o);
                }
            }
            brow = brow.wrapping_add(ldb);
        }
        for (r, row) in acc.iter().enumerate() {
            unsafe { cp.add((i + r) * ldc + j).cast::<[f32; W]>().write_unaligned(*row) };
        }
        i += R;
    }
}

/// `e^x` to about 2 ulp, branch-free so that loops over it vectorise: `x = n ln2 + r` with
/// `|r| <= ln2 / 2`, a degree-6 Taylor polynomial for `e^r`, and `2^n` built in the exponent
/// bits. Below -87 (and for -inf) it returns 0; above 88 it saturates near `f32::MAX`.
#[inline(always)]
pub(crate) fn exp<F: Fma>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits, so `n`
    // comes out of the bits without a float-to-int conversion (which blocks vectorising).
    let biased = F::fma(xc, LOG2E, ROUND);
    let n = biased - ROUND;
    let n_int = biased.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = F::fma(-n, LN2_LO, F::fma(-n, LN2_HI, xc));
    // Horner's rule in multiply-adds: one instruction a degree where the ISA has FMA.
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = F::fma(p, r, c);
    }
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// A raw pointer that parallel tasks share to write disjoint parts of one output.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
// SAFETY: the pointer is only dereferenced by tasks that each write a disjoint set of indices
// (every use states which), and the buffer outlives the parallel region.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    #[inline(always)]
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }

    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// `index` is in bounds and no other task touches it during the parallel region.
    #[inline(always)]
    pub(crate) unsafe fn write(self, index: usize, value: T) {
        // SAFETY: guaranteed by the caller.
        unsafe { self.0.add(index).write(value) }
    }
}

/// A piece of work whose body is generic over the multiply-add and the tile width, so that
/// [`dispatch`] can compile it once per instruction set. `run` must be `#[inline(always)]` (and
/// so must everything heavy it calls): it is inlined into a `#[target_feature]` function, which
/// is what makes the body use those instructions. (A closure would not do: it stays a separate
/// function compiled for the baseline target unless the optimiser happens to inline it.)
pub(crate) trait Kernel {
    /// What the work returns.
    type Out;
    /// The work, with `F` the multiply-add and `W` the widest register tile.
    fn run<F: Fma, const W: usize>(self) -> Self::Out;
}

/// Runs `k` compiled for the best instruction set this machine has.
#[inline]
pub(crate) fn dispatch<K: Kernel>(k: K) -> K::Out {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` found these features on this CPU.
        Isa::Avx512 => unsafe { run_avx512(k) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { run_avx2(k) },
        _ => k.run::<Unfused, 16>(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn run_avx512<K: Kernel>(k: K) -> K::Out {
    k.run::<Fused, 64>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(k: K) -> K::Out {
    k.run::<Fused, 16>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_std_and_zero_far_below() {
        fn check<F: Fma>() {
            let mut worst = 0f32;
            let mut x = -80.0f32;
            while x < 80.0 {
                let rel = ((exp::<F>(x) - x.exp()) / x.exp()).abs();
                worst = worst.max(rel);
                x += 0.0137;
            }
            assert!(worst < 5e-7, "worst relative error {worst}");
            assert_eq!(exp::<F>(f32::NEG_INFINITY), 0.0);
            assert_eq!(exp::<F>(-100.0), 0.0);
            assert_eq!(exp::<F>(0.0), 1.0);
        }
        // With separate multiplies and adds, and with fused multiply-adds (the AVX paths).
        check::<Unfused>();
        check::<Fused>();
    }

    #[test]
    fn gemm_acc_and_gemm_set_match_a_triple_loop_for_every_isa_tile() {
        // Every row count a caller may pass (multiples of 4), so that AVX2's 6-row tiles end in
        // each remainder (0, 2 and 4 rows), and column strips of every width plus a 16 tail.
        for (m, n, k) in [(4, 16, 1), (8, 48, 13), (12, 80, 7), (16, 64, 64), (20, 144, 5), (64, 64, 64)] {
            check_gemm(m, n, k);
        }
    }

    fn check_gemm(m: usize, n: usize, k: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let c0: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
        let mut want = c0.clone();
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    want[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        struct Mm<'a>(&'a [f32], &'a [f32], &'a mut [f32], usize, usize, usize, bool);
        impl Kernel for Mm<'_> {
            type Out = ();
            #[inline(always)]
            fn run<F: Fma, const W: usize>(self) {
                let Mm(a, b, c, m, n, k, acc) = self;
                if acc {
                    gemm_acc::<F, W>(m, n, k, a, k, b, n, c, n)
                } else {
                    gemm_set::<F, W>(m, n, k, a, k, b, n, c, n)
                }
            }
        }
        let mut c = c0.clone();
        dispatch(Mm(&a, &b, &mut c, m, n, k, true));
        // Overwriting: whatever C held (NaN here) is gone.
        let mut set = vec![f32::NAN; m * n];
        dispatch(Mm(&a, &b, &mut set, m, n, k, false));
        if std::env::var("SQUID_ATTENTION_ISA").as_deref() == Ok("generic") {
            assert_eq!(isa(), Isa::Generic);
        }
        // Both tile shapes on whatever ISA the test runs: the 4-row tiles (unfused) and the
        // 6-row ones (fused, 16 wide: the AVX2 shape, compiled here for the build target).
        let mut c4 = c0.clone();
        gemm_acc::<Unfused, 16>(m, n, k, &a, k, &b, n, &mut c4, n);
        let mut c6 = c0.clone();
        gemm_acc::<Fused, 16>(m, n, k, &a, k, &b, n, &mut c6, n);
        let tol = |w: f32| 1e-5 * (k as f32 + w.abs()) + 1e-4;
        for i in 0..m * n {
            assert!((c[i] - want[i]).abs() < tol(want[i]), "{m}x{n}x{k} {i}: {} vs {}", c[i], want[i]);
            assert!((c4[i] - want[i]).abs() < tol(want[i]), "{m}x{n}x{k} {i}: {} vs {}", c4[i], want[i]);
            assert!((c6[i] - want[i]).abs() < tol(want[i]), "{m}x{n}x{k} {i}: {} vs {}", c6[i], want[i]);
            let w = want[i] - c0[i];
            assert!((set[i] - w).abs() < tol(w), "{m}x{n}x{k} {i}: {} vs {w}", set[i]);
        }
    }
}
