#![doc = include_str!("../README.md")]

use thiserror::Error;

/// What can be wrong with an optimizer or loss call's inputs.
#[derive(Debug, Error, PartialEq)]
pub enum Error {
    /// A value that must be finite is NaN or infinite.
    #[error("non-finite value in {what} at index {index}: {value}")]
    NonFinite {
        /// Which input holds it.
        what: &'static str,
        /// Where.
        index: usize,
        /// The value.
        value: f32,
    },
}

/// The global L2 norm of a set of gradient buffers, accumulated in f64, as gradient clipping
/// needs it. A NaN or infinite gradient is an error naming where it is.
pub fn global_grad_norm(grads: &[&[f32]]) -> Result<f32, Error> {
    let mut sum = 0.0f64;
    let mut offset = 0;
    for g in grads {
        for (i, &x) in g.iter().enumerate() {
            if !x.is_finite() {
                return Err(Error::NonFinite { what: "gradient", index: offset + i, value: x });
            }
            sum += f64::from(x) * f64::from(x);
        }
        offset += g.len();
    }
    Ok(sum.sqrt() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_spans_all_buffers_and_rejects_nan() {
        assert_eq!(global_grad_norm(&[&[3.0], &[0.0, 4.0]]), Ok(5.0));
        assert_eq!(global_grad_norm(&[]), Ok(0.0));
        let err = global_grad_norm(&[&[1.0], &[2.0, f32::NAN]]).unwrap_err();
        assert!(matches!(err, Error::NonFinite { index: 2, .. }));
    }
}
