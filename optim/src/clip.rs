//! Gradient clipping by global L2 norm (torch `clip_grad_norm_`): the norm over all gradient
//! buffers together, and a scale `max_norm / (norm + 1e-6)` applied to all when it is below 1.

use rayon::prelude::*;

use crate::Error;

/// Elements per parallel work item of the norm.
const CHUNK: usize = 64 * 1024;

/// The global L2 norm of a set of gradient buffers, accumulated in f64, as gradient clipping
/// needs it. A NaN or infinite gradient is an error naming where it is (index counted across the
/// buffers in order).
pub fn global_grad_norm(grads: &[&[f32]]) -> Result<f32, Error> {
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
    if !sum.is_finite() {
        // Find the culprit (rare path); an overflowing sum of finite values is not an error.
        let mut offset = 0;
        for g in grads {
            if let Some(i) = g.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite { what: "gradient", index: offset + i, value: g[i] });
            }
            offset += g.len();
        }
        return Ok(naive_global_grad_norm(grads) as f32);
    }
    Ok(sum.sqrt() as f32)
}

/// The norm in f64, one element at a time (the reference).
pub fn naive_global_grad_norm(grads: &[&[f32]]) -> f64 {
    grads.iter().flat_map(|g| g.iter()).map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// The factor torch's `clip_grad_norm_` multiplies gradients by: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    (f64::from(max_norm) / (f64::from(norm) + 1e-6)).min(1.0) as f32
}

/// Scales the gradients in place so their global norm is at most `max_norm`; returns the norm
/// before clipping. A non-finite gradient is an error and leaves the gradients untouched.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> Result<f32, Error> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Config { what: "max_norm", why: format!("{max_norm} must be > 0") });
    }
    let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let norm = global_grad_norm(&views)?;
    let scale = clip_scale(norm, max_norm);
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
        assert_eq!(clip_grad_norm(&mut [&mut c], 1.0).unwrap(), 0.5);
        assert_eq!(c, vec![0.3, 0.4]);
        // NaN: error, untouched.
        let mut d = vec![1.0f32, f32::INFINITY];
        assert!(clip_grad_norm(&mut [&mut d], 1.0).is_err());
        assert_eq!(d[0], 1.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Fast (f32 lanes, f64 chunks) vs f64 reference: relative 1e-6.
        #[test]
        fn norm_matches_naive(bufs in prop::collection::vec(prop::collection::vec(-10.0f32..10.0, 0..3000), 0..5)) {
            let views: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
            let fast = f64::from(global_grad_norm(&views).unwrap());
            let slow = naive_global_grad_norm(&views);
            prop_assert!((fast - slow).abs() <= 1e-6 * slow + 1e-12, "{} vs {}", fast, slow);
        }
    }
}
