//! Learning-rate schedules, as Hugging Face `transformers` defines them (TRL uses those; verl's
//! cosine is the same with a `min_lr_ratio`). `step` counts optimizer steps already taken: the
//! first update uses `lr_at(0)`.

use crate::Error;

/// The shape and numbers of a schedule, as plain data; [`LrSchedule::new`] checks them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
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

/// A learning-rate schedule whose numbers were checked when it was made (so [`LrSchedule::lr_at`]
/// always returns a finite rate >= 0): `lr` finite and >= 0, for cosine `total > warmup` and
/// `min_ratio` in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    kind: ScheduleKind,
}

impl LrSchedule {
    /// A schedule of this kind, or [`Error::Config`] naming the bad number.
    pub fn new(kind: ScheduleKind) -> Result<Self, Error> {
        let lr = match kind {
            ScheduleKind::Constant { lr } | ScheduleKind::LinearWarmup { lr, .. } => lr,
            ScheduleKind::Cosine { lr, warmup, total, min_ratio } => {
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
            Ok(Self { kind })
        } else {
            Err(Error::Config { what: "lr", why: format!("{lr} is not a finite value >= 0") })
        }
    }

    /// `lr` always.
    pub fn constant(lr: f32) -> Result<Self, Error> {
        Self::new(ScheduleKind::Constant { lr })
    }

    /// Linear warm-up over `warmup` steps, then `lr`.
    pub fn linear_warmup(lr: f32, warmup: u64) -> Result<Self, Error> {
        Self::new(ScheduleKind::LinearWarmup { lr, warmup })
    }

    /// Linear warm-up, then a cosine half-cycle down to `min_ratio * lr` at `total`.
    pub fn cosine(lr: f32, warmup: u64, total: u64, min_ratio: f32) -> Result<Self, Error> {
        Self::new(ScheduleKind::Cosine { lr, warmup, total, min_ratio })
    }

    /// What the schedule is.
    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }

    /// The rate for the update that follows `step` completed steps.
    pub fn lr_at(&self, step: u64) -> f32 {
        let warm = |lr: f32, warmup: u64| -> Option<f32> {
            (step < warmup).then(|| (f64::from(lr) * step as f64 / warmup as f64) as f32)
        };
        match self.kind {
            ScheduleKind::Constant { lr } => lr,
            ScheduleKind::LinearWarmup { lr, warmup } => warm(lr, warmup).unwrap_or(lr),
            ScheduleKind::Cosine { lr, warmup, total, min_ratio } => warm(lr, warmup).unwrap_or_else(|| {
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
        let c = LrSchedule::constant(0.1).unwrap();
        assert_eq!((c.lr_at(0), c.lr_at(1000)), (0.1, 0.1));
        // Warm-up 4: 0, 0.25, 0.5, 0.75 of lr, then lr.
        let w = LrSchedule::linear_warmup(1.0, 4).unwrap();
        assert_eq!((0..6).map(|s| w.lr_at(s)).collect::<Vec<_>>(), vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
        // Cosine, warm-up 2, total 10, floor 0.1: step 6 is half-way (progress 0.5, cos = 0):
        // 0.1 + 0.9 * 0.5 = 0.55; step 10 and later: 0.1; step 4 (progress 0.25):
        // 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.1 + 0.9 * 0.853553 = 0.868198.
        let s = LrSchedule::cosine(1.0, 2, 10, 0.1).unwrap();
        assert_eq!((s.lr_at(0), s.lr_at(1), s.lr_at(2)), (0.0, 0.5, 1.0));
        assert!((s.lr_at(6) - 0.55).abs() < 1e-6);
        assert!((s.lr_at(4) - 0.868_198).abs() < 1e-6);
        assert!((s.lr_at(10) - 0.1).abs() < 1e-7 && (s.lr_at(99) - 0.1).abs() < 1e-7);
    }

    #[test]
    fn bad_schedules_cannot_be_made() {
        // Before, these were accepted as enum values and checked only by a `validate` the caller had
        // to remember; `lr_at` of the first subtracted past zero.
        assert!(matches!(LrSchedule::cosine(1.0, 5, 5, 0.0), Err(Error::Config { what: "total", .. })));
        assert!(matches!(LrSchedule::cosine(1.0, 0, 5, f32::NAN), Err(Error::Config { what: "min_ratio", .. })));
        assert!(matches!(LrSchedule::cosine(1.0, 0, 5, 1.5), Err(Error::Config { what: "min_ratio", .. })));
        for lr in [f32::NAN, -1e-3, f32::INFINITY] {
            assert!(matches!(LrSchedule::constant(lr), Err(Error::Config { what: "lr", .. })));
            assert!(matches!(LrSchedule::linear_warmup(lr, 3), Err(Error::Config { what: "lr", .. })));
        }
        let s = LrSchedule::linear_warmup(0.5, 0).unwrap();
        assert_eq!((s.lr_at(0), s.lr_at(u64::MAX)), (0.5, 0.5));
        assert_eq!(s.kind(), ScheduleKind::LinearWarmup { lr: 0.5, warmup: 0 });
    }
}
