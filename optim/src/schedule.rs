//! Learning-rate schedules, as Hugging Face `transformers` defines them (TRL uses those; verl's
//! cosine is the same with a `min_lr_ratio`). `step` counts optimizer steps already taken: the
//! first update uses `lr_at(0)`.

use crate::Error;

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// `lr` always.
    Constant {
        /// The rate.
        lr: f32,
    },
    /// `lr * step / warmup` for `step < warmup`, then `lr` (HF `constant_with_warmup`; step 0 has lr 0 as in HF).
    LinearWarmup {
        /// The rate after warm-up.
        lr: f32,
        /// Warm-up steps.
        warmup: u64,
    },
    /// Linear warm-up, then `lr * (min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2)` with
    /// `progress = (step - warmup) / (total - warmup)` clamped to [0, 1] (HF `cosine` with one
    /// half-cycle; `min_ratio` is verl's `min_lr_ratio`, 0 in HF).
    Cosine {
        /// The peak rate.
        lr: f32,
        /// Warm-up steps.
        warmup: u64,
        /// Total steps (the rate reaches `min_ratio * lr` here and stays there).
        total: u64,
        /// Floor as a fraction of `lr`.
        min_ratio: f32,
    },
}

impl LrSchedule {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), Error> {
        let lr = match *self {
            LrSchedule::Constant { lr } | LrSchedule::LinearWarmup { lr, .. } => lr,
            LrSchedule::Cosine { lr, warmup, total, min_ratio } => {
                if total <= warmup {
                    return Err(Error::Config { what: "total", why: format!("{total} must exceed warmup {warmup}") });
                }
                if !(0.0..=1.0).contains(&min_ratio) {
                    return Err(Error::Config { what: "min_ratio", why: format!("{min_ratio} is not in [0, 1]") });
                }
                lr
            }
        };
        if lr.is_finite() && lr >= 0.0 {
            Ok(())
        } else {
            Err(Error::Config { what: "lr", why: format!("{lr} is not a finite value >= 0") })
        }
    }

    /// The rate for the update that follows `step` completed steps.
    pub fn lr_at(&self, step: u64) -> f32 {
        let warm = |lr: f32, warmup: u64| -> Option<f32> {
            (step < warmup).then(|| (f64::from(lr) * step as f64 / warmup as f64) as f32)
        };
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::LinearWarmup { lr, warmup } => warm(lr, warmup).unwrap_or(lr),
            LrSchedule::Cosine { lr, warmup, total, min_ratio } => warm(lr, warmup).unwrap_or_else(|| {
                let progress = ((step - warmup) as f64 / (total - warmup).max(1) as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (f64::from(lr) * (f64::from(min_ratio) + (1.0 - f64::from(min_ratio)) * cosine)) as f32
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_by_hand() {
        let c = LrSchedule::Constant { lr: 0.1 };
        assert_eq!((c.lr_at(0), c.lr_at(1000)), (0.1, 0.1));
        // Warm-up 4: 0, 0.25, 0.5, 0.75 of lr, then lr.
        let w = LrSchedule::LinearWarmup { lr: 1.0, warmup: 4 };
        assert_eq!((0..6).map(|s| w.lr_at(s)).collect::<Vec<_>>(), vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
        // Cosine, warm-up 2, total 10, floor 0.1: step 6 is half-way (progress 0.5, cos = 0):
        // 0.1 + 0.9 * 0.5 = 0.55; step 10 and later: 0.1; step 4 (progress 0.25):
        // 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.1 + 0.9 * 0.853553 = 0.868198.
        let s = LrSchedule::Cosine { lr: 1.0, warmup: 2, total: 10, min_ratio: 0.1 };
        assert_eq!((s.lr_at(0), s.lr_at(1), s.lr_at(2)), (0.0, 0.5, 1.0));
        assert!((s.lr_at(6) - 0.55).abs() < 1e-6);
        assert!((s.lr_at(4) - 0.868_198).abs() < 1e-6);
        assert!((s.lr_at(10) - 0.1).abs() < 1e-7 && (s.lr_at(99) - 0.1).abs() < 1e-7);
        assert!(LrSchedule::Cosine { lr: 1.0, warmup: 5, total: 5, min_ratio: 0.0 }.validate().is_err());
        assert!(LrSchedule::Constant { lr: f32::NAN }.validate().is_err());
    }
}
