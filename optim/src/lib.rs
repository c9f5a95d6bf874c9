#![doc = include_str!("../README.md")]

use thiserror::Error;

pub mod adamw;
pub mod advantage;
pub mod clip;
pub mod logprob;
pub mod math;
pub mod policy_loss;
pub mod schedule;
mod seqs;

#[cfg(feature = "cuda")]
pub(crate) mod device;

pub use adamw::{AdamW, AdamWConfig, StepReport};
pub use clip::{clip_grad_norm, global_grad_norm};
pub use schedule::{LrSchedule, ScheduleKind};

/// The kernels of this crate, for `squid kernels check` (the pipeline gathers every crate's list).
pub static KERNELS: &[squid_cuda::KernelSource] =
    &[advantage::KERNEL, logprob::KERNEL, adamw::KERNEL, policy_loss::KERNEL];

/// What can be wrong with an optimizer, advantage or loss call's inputs.
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
    /// Two inputs that must agree in length do not.
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        /// Which input.
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// Sequence offsets that are not `0 = cu[0] <= cu[1] <= ... <= cu[n] = total`.
    #[error("bad cu_seqlens: {0}")]
    CuSeqlens(String),
    /// A configuration value out of its range.
    #[error("bad config `{what}`: {why}")]
    Config {
        /// Which option.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A group with a single sample, whose baseline is undefined, and the config does not say what to do.
    #[error("group {group} has a single sample (baseline undefined); set SingletonPolicy to allow it")]
    SingletonGroup {
        /// The group's position in order of first appearance.
        group: usize,
    },
    /// Whitening needs at least two loss tokens.
    #[error("whitening needs at least 2 loss tokens, got {0}")]
    TooFewTokens(usize),
    /// A target token id outside the vocabulary.
    #[error("target id {id} at token {index} is outside the vocabulary of {vocab}")]
    TargetOutOfRange {
        /// The token row.
        index: usize,
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The optimizer was built for another set of parameter shapes or storage type.
    #[error("parameter mismatch: {0}")]
    ParamMismatch(String),
    /// An optimizer step that would make a parameter or an optimizer state non-finite (NaN or
    /// infinite). The step is refused and nothing changes: parameters, master weights, moments and
    /// the step count are as before the call.
    #[error("step refused: it would make {what} {index} of tensor {tensor} {value} (nothing was changed)")]
    StepRefused {
        /// What would become non-finite: `parameter`, `exp_avg`, `exp_avg_sq` or `max_exp_avg_sq`.
        what: &'static str,
        /// The parameter tensor.
        tensor: usize,
        /// The element in it.
        index: usize,
        /// The value it would have had.
        value: f32,
    },
    /// A size computed from the caller's numbers that overflows `usize` or cannot be allocated.
    #[error("size of {what}: {why}")]
    Size {
        /// What was being sized.
        what: &'static str,
        /// The numbers involved.
        why: String,
    },
    /// The device (squid-cuda: NVRTC, the driver, a launch, the simulator) failed; its message.
    #[error("device: {0}")]
    Device(String),
    /// Reading or writing optimizer state failed, or the file is not a valid checkpoint.
    #[error("checkpoint {path}: {why}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
}

/// Checks that `x` holds no NaN or infinity, naming the first bad element.
pub(crate) fn check_finite(what: &'static str, x: &[f32]) -> Result<(), Error> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite { what, index, value: x[index] }),
        None => Ok(()),
    }
}

/// `a * b`, or [`Error::Size`] naming `what` when the product overflows `usize`.
pub(crate) fn checked_product(what: &'static str, a: usize, b: usize) -> Result<usize, Error> {
    a.checked_mul(b).ok_or_else(|| Error::Size { what, why: format!("{a} * {b} overflows usize") })
}

/// A vector of `n` copies of `value`, or [`Error::Size`] when the memory cannot be had (instead of
/// the process abort of `vec!`).
pub(crate) fn try_filled<T: Clone>(what: &'static str, n: usize, value: T) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| Error::Size { what, why: format!("{n} elements: {e}") })?;
    v.resize(n, value);
    Ok(v)
}

/// Checks a length.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), Error> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Length { what, expected, got })
    }
}
