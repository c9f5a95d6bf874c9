//! A branch-free f32 exponential that the compiler vectorises (std's `exp` is a libm call per
//! element, which keeps the softmax loops scalar), and the run-time CPU feature check behind the
//! AVX2 + FMA copies of the hot loops.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by tests to force the portable (SSE2 on x86_64) loops.
static FORCE_PORTABLE: AtomicBool = AtomicBool::new(false);

/// Whether the hot loops may run their AVX2 + FMA copies: x86_64 with both features (detected
/// once by std and cached). The copies are the same Rust code compiled for wider vectors; Rust
/// never contracts `a * b + c` into an FMA on its own, so both give bit-identical results.
#[inline]
pub(crate) fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !FORCE_PORTABLE.load(Ordering::Relaxed)
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f` with the portable loops forced (one such test at a time), for tests that compare the
/// two copies; tests running meanwhile may take either copy, which give identical results.
#[cfg(test)]
pub(crate) fn with_portable<R>(f: impl FnOnce() -> R) -> R {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    FORCE_PORTABLE.store(true, Ordering::Relaxed);
    let out = f();
    FORCE_PORTABLE.store(false, Ordering::Relaxed);
    out
}

/// e^x, relative error below 3e-7 on [-87, 88]. Inputs are clamped to that range: below -87 it
/// returns e^-87 ~ 1.6e-38 instead of a smaller number or zero, which changes no sum of softmax
/// terms (the largest is 1) and no clamped log-ratio (|x| <= 20). NaN gives NaN.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split in two so k * LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    let x = x.clamp(-87.0, 88.0);
    // x = k ln2 + r with |r| <= ln2 / 2.
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    // e^r by its Taylor series to r^7 (truncation error < 6e-9 for |r| <= 0.347), Horner form.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^k from its exponent bits; k is in [-126, 127] so the result is a normal number.
    let k_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits(((k_int + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_matches_std_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let got = f64::from(exp_fast(x));
            let want = f64::from(x).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(-1000.0) > 0.0 && exp_fast(-1000.0) < 2e-38);
        assert!(exp_fast(f32::NEG_INFINITY) < 2e-38);
        assert!(exp_fast(f32::NAN).is_nan());
    }
}
