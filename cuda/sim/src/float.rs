//! IEEE arithmetic with the rounding modes PTX names, built from round-to-nearest results and
//! the sign of their exact error.

use std::cmp::Ordering;

use crate::ir::Rnd;

/// Flushes an f32 subnormal to a zero of the same sign.
pub fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// Flushes an f64 subnormal to a zero of the same sign.
pub fn ftz64(x: f64) -> f64 {
    if x.is_subnormal() {
        f64::from_bits(x.to_bits() & (1 << 63))
    } else {
        x
    }
}

fn next_up32(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

fn next_down32(x: f32) -> f32 {
    -next_up32(-x)
}

fn next_up64(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let b = x.to_bits();
    f64::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

fn next_down64(x: f64) -> f64 {
    -next_up64(-x)
}

/// Corrects a round-to-nearest result `r` to `mode`, given how `r` compares with the exact
/// value (`Greater`: r is above it). One step suffices: `r` is within half an ulp.
pub fn adjust32(r: f32, r_vs_exact: Ordering, mode: Rnd) -> f32 {
    match (mode, r_vs_exact) {
        (_, Ordering::Equal) | (Rnd::Rn | Rnd::Rni, _) => r,
        (Rnd::Rz | Rnd::Rzi, Ordering::Greater) if r > 0.0 || (r == 0.0 && r.is_sign_positive()) => next_down32(r),
        (Rnd::Rz | Rnd::Rzi, Ordering::Less) if r < 0.0 || (r == 0.0 && r.is_sign_negative()) => next_up32(r),
        (Rnd::Rm | Rnd::Rmi, Ordering::Greater) => next_down32(r),
        (Rnd::Rp | Rnd::Rpi, Ordering::Less) => next_up32(r),
        _ => r,
    }
}

/// [`adjust32`] for f64.
pub fn adjust64(r: f64, r_vs_exact: Ordering, mode: Rnd) -> f64 {
    match (mode, r_vs_exact) {
        (_, Ordering::Equal) | (Rnd::Rn | Rnd::Rni, _) => r,
        (Rnd::Rz | Rnd::Rzi, Ordering::Greater) if r > 0.0 => next_down64(r),
        (Rnd::Rz | Rnd::Rzi, Ordering::Less) if r < 0.0 => next_up64(r),
        (Rnd::Rm | Rnd::Rmi, Ordering::Greater) => next_down64(r),
        (Rnd::Rp | Rnd::Rpi, Ordering::Less) => next_up64(r),
        _ => r,
    }
}

/// Sign of `e` as "how r compares with r + e" (r is above the exact value when e < 0).
fn from_err(e: f64) -> Ordering {
    if e > 0.0 {
        Ordering::Less
    } else if e < 0.0 {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

/// Exact error of an f64 sum: `a + b = s + err` (Knuth's TwoSum).
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    (s, err)
}

/// How an f32 `r` compares with the exact value `s + t` (an unevaluated f64 pair).
fn cmp32_pair(r: f32, s: f64, t: f64) -> Ordering {
    if !r.is_finite() || !s.is_finite() {
        return Ordering::Equal;
    }
    let d = f64::from(r) - s; // exact: r and s are within an f32 ulp of each other
    d.partial_cmp(&t).unwrap_or(Ordering::Equal)
}

fn fixup_inf32(r: f32, a_finite: bool, mode: Rnd) -> f32 {
    // Overflow: nearest gives inf; directed modes may give the largest finite value.
    if r.is_infinite() && a_finite {
        let max = f32::MAX.copysign(r);
        return match mode {
            Rnd::Rz => max,
            Rnd::Rm if r > 0.0 => max,
            Rnd::Rp if r < 0.0 => max,
            _ => r,
        };
    }
    r
}

/// `a + b` in f32 under `mode`.
pub fn add32(a: f32, b: f32, mode: Rnd) -> f32 {
    let r = a + b;
    if mode == Rnd::Rn {
        return r;
    }
    if !r.is_finite() {
        return fixup_inf32(r, a.is_finite() && b.is_finite(), mode);
    }
    let (s, t) = two_sum(f64::from(a), f64::from(b));
    adjust32(r, cmp32_pair(r, s, t), mode)
}

/// `a * b` in f32 under `mode`.
pub fn mul32(a: f32, b: f32, mode: Rnd) -> f32 {
    let r = a * b;
    if mode == Rnd::Rn {
        return r;
    }
    if !r.is_finite() {
        return fixup_inf32(r, a.is_finite() && b.is_finite(), mode);
    }
    let p = f64::from(a) * f64::from(b); // exact
    adjust32(r, cmp32_pair(r, p, 0.0), mode)
}

/// `a * b + c` in f32 with one rounding under `mode`.
pub fn fma32(a: f32, b: f32, c: f32, mode: Rnd) -> f32 {
    let r = a.mul_add(b, c);
    if mode == Rnd::Rn {
        return r;
    }
    if !r.is_finite() {
        return fixup_inf32(r, a.is_finite() && b.is_finite() && c.is_finite(), mode);
    }
    let p = f64::from(a) * f64::from(b);
    let (s, t) = two_sum(p, f64::from(c));
    adjust32(r, cmp32_pair(r, s, t), mode)
}

/// Where a rounded quotient `r` lies against the exact one, from the exact remainder
/// `a - r*b`: below it when the remainder has the divisor's sign.
fn quotient_order(rem: f64, divisor_positive: bool) -> Ordering {
    if rem == 0.0 {
        Ordering::Equal
    } else if (rem > 0.0) == divisor_positive {
        Ordering::Less
    } else {
        Ordering::Greater
    }
}

/// `a / b` in f32 under `mode`.
pub fn div32(a: f32, b: f32, mode: Rnd) -> f32 {
    let r = a / b;
    if mode == Rnd::Rn || !r.is_finite() || r == 0.0 || b == 0.0 {
        return r;
    }
    // rem = a - r*b, exact in f64.
    let rem = f64::from(r).mul_add(-f64::from(b), f64::from(a));
    adjust32(r, quotient_order(rem, b > 0.0), mode)
}

/// `sqrt(a)` in f32 under `mode`.
pub fn sqrt32(a: f32, mode: Rnd) -> f32 {
    let r = a.sqrt();
    if mode == Rnd::Rn || !r.is_finite() || r == 0.0 {
        return r;
    }
    let sq = f64::from(r) * f64::from(r);
    adjust32(r, sq.partial_cmp(&f64::from(a)).unwrap_or(Ordering::Equal), mode)
}

/// `a + b` in f64 under `mode`.
pub fn add64(a: f64, b: f64, mode: Rnd) -> f64 {
    let (s, e) = two_sum(a, b);
    if mode == Rnd::Rn || !s.is_finite() {
        return s;
    }
    adjust64(s, from_err(e), mode)
}

/// `a * b` in f64 under `mode`.
pub fn mul64(a: f64, b: f64, mode: Rnd) -> f64 {
    let r = a * b;
    if mode == Rnd::Rn || !r.is_finite() {
        return r;
    }
    adjust64(r, from_err(a.mul_add(b, -r)), mode)
}

/// `a / b` in f64 under `mode`.
pub fn div64(a: f64, b: f64, mode: Rnd) -> f64 {
    let r = a / b;
    if mode == Rnd::Rn || !r.is_finite() || r == 0.0 || b == 0.0 {
        return r;
    }
    let rem = (-r).mul_add(b, a);
    adjust64(r, quotient_order(rem, b > 0.0), mode)
}

/// `sqrt(a)` in f64 under `mode`.
pub fn sqrt64(a: f64, mode: Rnd) -> f64 {
    let r = a.sqrt();
    if mode == Rnd::Rn || !r.is_finite() || r == 0.0 {
        return r;
    }
    adjust64(r, from_err(-r.mul_add(r, -a)), mode)
}

/// f64 -> f32 under `mode`.
pub fn f64_to_f32(x: f64, mode: Rnd) -> f32 {
    let r = x as f32;
    if mode == Rnd::Rn || x.is_nan() {
        return r;
    }
    if r.is_infinite() && x.is_finite() {
        return fixup_inf32(r, true, mode);
    }
    adjust32(r, f64::from(r).partial_cmp(&x).unwrap_or(Ordering::Equal), mode)
}

/// Rounds to an integral value under an integer rounding mode (`.rni` etc.).
pub fn round_int64(x: f64, mode: Rnd) -> f64 {
    match mode {
        Rnd::Rni | Rnd::Rn => x.round_ties_even(),
        Rnd::Rzi | Rnd::Rz => x.trunc(),
        Rnd::Rmi | Rnd::Rm => x.floor(),
        Rnd::Rpi | Rnd::Rp => x.ceil(),
    }
}

/// f32 -> bf16 bits under `mode` (NaN stays NaN).
#[cfg(test)]
pub fn f32_to_bf16(x: f32, mode: Rnd) -> u16 {
    f64_to_bf16(f64::from(x), mode)
}

/// f64 -> f32 rounded to odd: exact, or the truncation with its last bit set. A further
/// round-to-nearest to f16 or bf16 (far fewer bits) is then the correctly rounded result,
/// with no double-rounding error.
fn f64_to_f32_odd(x: f64) -> f32 {
    let r = f64_to_f32(x, Rnd::Rz);
    if !x.is_finite() || f64::from(r) == x {
        r
    } else {
        f32::from_bits(r.to_bits() | 1)
    }
}

/// f64 -> f16 bits under `mode`, one rounding.
pub fn f64_to_f16(x: f64, mode: Rnd) -> u16 {
    let r = half::f16::from_f32(f64_to_f32_odd(x));
    if mode == Rnd::Rn || x.is_nan() {
        return r.to_bits();
    }
    step16(r.to_bits(), f64::from(r.to_f32()), x, mode, 0x7c00)
}

/// f64 -> bf16 bits under `mode`, one rounding.
pub fn f64_to_bf16(x: f64, mode: Rnd) -> u16 {
    let r = half::bf16::from_f32(f64_to_f32_odd(x));
    if mode == Rnd::Rn || x.is_nan() {
        return r.to_bits();
    }
    step16(r.to_bits(), f64::from(r.to_f32()), x, mode, 0x7f80)
}

/// An integer as f64, rounded to odd when inexact, so that one further rounding to a format
/// of at most 51 bits of precision (f32, f16, bf16) is the correctly rounded result.
pub fn int_to_f64_odd(x: i128) -> f64 {
    let r = int_to_f64(x, Rnd::Rz);
    if r as i128 == x || r == 0.0 {
        r
    } else {
        f64::from_bits(r.to_bits() | 1)
    }
}

/// Steps a 16-bit float (sign-magnitude bits) one ulp toward the direction `mode` asks.
fn step16(bits: u16, r: f64, exact: f64, mode: Rnd, inf: u16) -> u16 {
    let ord = r.partial_cmp(&exact).unwrap_or(Ordering::Equal);
    let neg = bits & 0x8000 != 0;
    let mag = bits & 0x7fff;
    let away = |b: u16| if mag == inf { b } else { b + 1 };
    let toward = |b: u16| if mag == 0 { b } else { b - 1 };
    // On magnitudes: moving up on a positive value is away from zero, on a negative toward.
    let up = |b: u16| {
        if neg {
            if mag == 0 {
                0x0001
            } else {
                toward(b)
            }
        } else {
            away(b)
        }
    };
    let down = |b: u16| {
        if neg {
            away(b)
        } else if mag == 0 {
            0x8001
        } else {
            toward(b)
        }
    };
    match (mode, ord) {
        (_, Ordering::Equal) => bits,
        (Rnd::Rz | Rnd::Rzi, Ordering::Greater) if !neg => down(bits),
        (Rnd::Rz | Rnd::Rzi, Ordering::Less) if neg => up(bits),
        (Rnd::Rm | Rnd::Rmi, Ordering::Greater) => down(bits),
        (Rnd::Rp | Rnd::Rpi, Ordering::Less) => up(bits),
        _ => bits,
    }
}

/// i128 (any PTX integer) -> f32 under `mode`.
pub fn int_to_f32(x: i128, mode: Rnd) -> f32 {
    let r = x as f32;
    if mode == Rnd::Rn {
        return r;
    }
    // |x| < 2^64, so r is an integer that fits i128 exactly.
    adjust32(r, (r as i128).cmp(&x), mode)
}

/// i128 (any PTX integer) -> f64 under `mode`.
pub fn int_to_f64(x: i128, mode: Rnd) -> f64 {
    let r = x as f64;
    if mode == Rnd::Rn {
        return r;
    }
    adjust64(r, (r as i128).cmp(&x), mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directed_rounding_brackets_the_nearest_result() {
        let (a, b) = (1.0f32, 1e-8f32);
        assert_eq!(add32(a, b, Rnd::Rn), 1.0);
        assert_eq!(add32(a, b, Rnd::Rz), 1.0);
        assert_eq!(add32(a, b, Rnd::Rp), next_up32(1.0));
        assert_eq!(add32(-a, -b, Rnd::Rm), -next_up32(1.0));
        assert_eq!(add32(-a, -b, Rnd::Rz), -1.0);
        assert_eq!(div32(1.0, 3.0, Rnd::Rz), div32(1.0, 3.0, Rnd::Rm));
        assert!(div32(1.0, 3.0, Rnd::Rp) > div32(1.0, 3.0, Rnd::Rz));
        assert_eq!(mul32(f32::MAX, 2.0, Rnd::Rz), f32::MAX);
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0 + 1e-6, Rnd::Rz), half::bf16::from_f32(1.0).to_bits());
        assert_eq!(f32_to_bf16(-1.0 - 1.0 / 256.0 - 1e-6, Rnd::Rm), half::bf16::from_f32(-1.0078125).to_bits());
        assert_eq!(int_to_f32((1 << 24) + 1, Rnd::Rp), 16_777_218.0);
        assert_eq!(int_to_f32((1 << 24) + 1, Rnd::Rz), 16_777_216.0);
        assert_eq!(sqrt32(2.0, Rnd::Rz), sqrt32(2.0, Rnd::Rm));
    }

    /// Division under every mode and every sign of dividend and divisor: Rm and Rp bracket the
    /// quotient one ulp apart (or meet on it), Rz is the one nearer zero, exact quotients stay.
    #[test]
    fn directed_division_brackets_the_quotient_for_every_sign() {
        for (a, b) in [(1.0, 3.0), (-1.0, 3.0), (1.0, -3.0), (-1.0, -3.0), (2.0, 7.0), (-5.0, 0.3), (6.0, -2.0)] {
            let (lo, hi) = (div32(a as f32, b as f32, Rnd::Rm), div32(a as f32, b as f32, Rnd::Rp));
            // The f32 operands' quotient (0.3 is not an f32), to f64's far finer precision.
            let q = f64::from(a as f32) / f64::from(b as f32);
            assert!(f64::from(lo) <= q && q <= f64::from(hi), "{a}/{b}: {lo} {hi}");
            assert!(hi == lo || hi == next_up32(lo), "{a}/{b}: {lo} {hi}");
            let rz = div32(a as f32, b as f32, Rnd::Rz);
            assert_eq!(rz, if q > 0.0 { lo } else { hi }, "{a}/{b}");
            let (lo, hi) = (div64(a, b, Rnd::Rm), div64(a, b, Rnd::Rp));
            assert!(lo <= hi && (hi == lo || hi == next_up64(lo)), "{a}/{b}: {lo} {hi}");
            assert_eq!(div64(a, b, Rnd::Rz), if q > 0.0 { lo } else { hi }, "{a}/{b}");
        }
    }
}
