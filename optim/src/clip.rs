//! Gradient clipping by global L2 norm (torch `clip_grad_norm_`): the norm over all gradient
//! buffers together, and a scale `max_norm / (norm + 1e-6)` applied to all when it is below 1.

use rayon::prelude::*;
use squid_cuda::dtype::Element;

use crate::Error;

/// Elements per parallel work item of the norm.
const CHUNK: usize = 64 * 1024;

/// The global L2 norm of a set of gradient buffers, accumulated in f64, as gradient clipping
/// needs it. A NaN or infinite gradient is an error naming where it is (index counted across the
/// buffers in order). The norm is an f64: finite f32 gradients can have a norm above `f32::MAX`
/// (squares that overflow f32 are summed in f64 on a second, exact pass), and that norm is a number,
/// not infinity.
pub fn global_grad_norm(grads: &[&[f32]]) -> Result<f64, Error> {
    let sum: f64 = grads
        .par_iter()
        .map(|g| {
            g.par_chunks(CHUNK)
                .map(|c| {
                    // Eight f32 lanes per chunk, so the inner loop vectorises; chunks are summed in f64.
                    let mut lanes = [0.0f32; 8];
                    let mut it = c.chunks_exact(8);
                    for b in &mut it {
                        for j in 0..8 {
                            lanes[j] += b[j] * b[j];
                        }
                    }
                    let tail: f64 = it.remainder().iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                    lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + tail
                })
                .sum::<f64>()
        })
        .sum();
    if sum.is_finite() {
        return Ok(sum.sqrt());
    }
    exact_norm_or_culprit(grads)
}

/// The rare path of a norm whose f32 lanes overflowed: the first non-finite element as an error, or
/// (all finite) the norm summed in f64 throughout, where the square of any finite f32 fits.
pub(crate) fn exact_norm_or_culprit<G: Element>(grads: &[&[G]]) -> Result<f64, Error> {
    let mut offset = 0;
    for g in grads {
        if let Some(i) = g.iter().position(|x| !x.to_f32().is_finite()) {
            return Err(Error::NonFinite { what: "gradient", index: offset + i, value: g[i].to_f32() });
        }
        offset += g.len();
    }
    let norm =
        grads.par_iter().map(|g| g.par_iter().map(|x| f64::from(x.to_f32()).powi(2)).sum::<f64>()).sum::<f64>().sqrt();
    if norm.is_finite() {
        Ok(norm)
    } else {
        // More than ~1e231 elements near f32::MAX: not a buffer that exists, but not a panic either.
        Err(Error::NonFinite { what: "gradient norm", index: 0, value: f32::INFINITY })
    }
}

/// The norm in f64, one element at a time (the reference).
pub fn naive_global_grad_norm(grads: &[&[f32]]) -> f64 {
    grads.iter().flat_map(|g| g.iter()).map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// The factor torch's `clip_grad_norm_` multiplies gradients by: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    clip_scale_f64(f64::from(norm), max_norm)
}

/// [`clip_scale`] of a norm held in f64 (one above `f32::MAX` gives a tiny positive factor, not 0).
pub fn clip_scale_f64(norm: f64, max_norm: f32) -> f32 {
    (f64::from(max_norm) / (norm + 1e-6)).min(1.0) as f32
}

/// Scales the gradients in place so their global norm is at most `max_norm`; returns the norm
/// before clipping (in f64, see [`global_grad_norm`]). A non-finite gradient or a `max_norm` that
/// is not a finite positive number is an error and leaves the gradients untouched.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> Result<f64, Error> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Config { what: "max_norm", why: format!("{max_norm} must be > 0") });
    }
    let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let norm = global_grad_norm(&views)?;
    let scale = clip_scale_f64(norm, max_norm);
    if scale < 1.0 {
        grads.par_iter_mut().for_each(|g| g.par_iter_mut().for_each(|x| *x *= scale));
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn norm_spans_all_buffers_and_rejects_nan() {
        assert_eq!(global_grad_norm(&[&[3.0], &[0.0, 4.0]]), Ok(5.0));
        assert_eq!(global_grad_norm(&[]), Ok(0.0));
        let err = global_grad_norm(&[&[1.0], &[2.0, f32::NAN]]).unwrap_err();
        assert!(matches!(err, Error::NonFinite { index: 2, .. }));
    }

    #[test]
    fn clip_by_hand() {
        // Norm 5 > 1: scale 1 / (5 + 1e-6) = 0.19999996; [3, 0, 4] -> [0.6, 0, 0.8] (to 1e-6).
        let (mut a, mut b) = (vec![3.0f32], vec![0.0f32, 4.0]);
        let norm = clip_grad_norm(&mut [&mut a, &mut b], 1.0).unwrap();
        assert_eq!(norm, 5.0);
        assert!((a[0] - 0.6).abs() < 1e-6 && (b[1] - 0.8).abs() < 1e-6);
        // Below the limit: untouched.
        let mut c = vec![0.3f32, 0.4];
        assert!((clip_grad_norm(&mut [&mut c], 1.0).unwrap() - 0.5).abs() < 1e-7);
        assert_eq!(c, vec![0.3, 0.4]);
        // NaN: error, untouched.
        let mut d = vec![1.0f32, f32::INFINITY];
        assert!(clip_grad_norm(&mut [&mut d], 1.0).is_err());
        assert_eq!(d[0], 1.0);
    }

    #[test]
    fn finite_gradients_whose_norm_overflows_f32_are_clipped_not_zeroed() {
        // Four elements of 3e38: the norm is 6e38 > f32::MAX (it was returned as inf, and the scale
        // 1 / inf zeroed every gradient). Now the norm is 6e38 and the gradients become 0.5 each.
        let mut g = vec![3.0e38f32; 4];
        let norm = clip_grad_norm(&mut [&mut g], 1.0).unwrap();
        assert!((norm - 6.0e38).abs() <= 1e-7 * 6.0e38, "{norm}");
        for x in &g {
            assert!((x - 0.5).abs() < 1e-6, "{x}");
        }
        // Squares that overflow f32 lanes but whose norm fits: the norm is exact, not an error.
        let big = vec![1.0e20f32, -1.0e20];
        let n = global_grad_norm(&[&big]).unwrap();
        assert!((n - 2.0f64.sqrt() * 1e20).abs() <= 1e-6 * n, "{n}");
        // A truly non-finite gradient is a typed error and changes nothing.
        let mut h = vec![1.0f32, f32::NEG_INFINITY, 2.0];
        assert!(matches!(clip_grad_norm(&mut [&mut h], 1.0), Err(Error::NonFinite { index: 1, .. })));
        assert_eq!(h[0], 1.0);
        assert_eq!(h[2], 2.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Fast (f32 lanes, f64 chunks) vs f64 reference: relative 1e-6.
        #[test]
        fn norm_matches_naive(bufs in prop::collection::vec(prop::collection::vec(-10.0f32..10.0, 0..3000), 0..5)) {
            let views: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
            let fast = global_grad_norm(&views).unwrap();
            let slow = naive_global_grad_norm(&views);
            prop_assert!((fast - slow).abs() <= 1e-6 * slow + 1e-12, "{} vs {}", fast, slow);
        }
    }
}
