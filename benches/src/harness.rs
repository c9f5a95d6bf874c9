//! The common benchmark harness: each case runs our implementation and a baseline
//! interleaved (A B A B ...) after a warm-up, so both see the same machine state (frequency,
//! cache, the other core's load), and reports medians and their ratio.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// How much useful work one call does, to turn seconds into a rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Work {
    /// No rate is meaningful.
    None,
    /// Floating-point operations per call (reported as GFLOP/s).
    Flops(f64),
    /// Bytes moved per call (reported as GB/s, 1 GB = 1e9 bytes).
    Bytes(f64),
}

/// A closure that runs one call of an implementation.
pub type Runner = Box<dyn FnMut()>;

/// One benchmark case: ours against a baseline on the same inputs.
pub struct Case {
    /// Suite name (`machine`, `attention`, ...).
    pub suite: &'static str,
    /// Case name within the suite.
    pub case: String,
    /// The parameters, as `key=value` words.
    pub params: String,
    /// What the baseline is, in a few words (printed under the table).
    pub baseline: &'static str,
    /// Our implementation.
    pub ours: Runner,
    /// The baseline.
    pub base: Runner,
    /// Work per call, identical for both.
    pub work: Work,
}

/// How long to measure.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Warm-up time per implementation.
    pub warmup: Duration,
    /// Measuring time per case (both implementations together).
    pub measure: Duration,
    /// At least this many samples of each.
    pub min_samples: usize,
    /// At most this many samples of each.
    pub max_samples: usize,
}

impl Budget {
    /// `--quick`: a rough figure in about a second per case.
    pub fn quick() -> Self {
        Self {
            warmup: Duration::from_millis(100),
            measure: Duration::from_millis(800),
            min_samples: 3,
            max_samples: 50,
        }
    }

    /// The default: steadier medians.
    pub fn full() -> Self {
        Self { warmup: Duration::from_millis(500), measure: Duration::from_secs(4), min_samples: 5, max_samples: 200 }
    }
}

/// The measured outcome of one case.
#[derive(Debug, Clone)]
pub struct Row {
    /// Suite name.
    pub suite: &'static str,
    /// Case name.
    pub case: String,
    /// Parameters.
    pub params: String,
    /// Median seconds per call of ours.
    pub ours_s: f64,
    /// Median seconds per call of the baseline.
    pub base_s: f64,
    /// Samples taken of each.
    pub samples: usize,
    /// Work per call.
    pub work: Work,
    /// What the baseline is.
    pub baseline: &'static str,
}

impl Row {
    /// baseline / ours: above 1 means ours is faster.
    pub fn ratio(&self) -> f64 {
        self.base_s / self.ours_s
    }

    /// Our rate: (`gflops` or `gbps`, value), where the work has a rate.
    pub fn ours_rate(&self) -> Option<(&'static str, f64)> {
        self.rate(self.ours_s)
    }

    fn rate(&self, seconds: f64) -> Option<(&'static str, f64)> {
        match self.work {
            Work::None => None,
            Work::Flops(f) => Some(("gflops", f / seconds / 1e9)),
            Work::Bytes(b) => Some(("gbps", b / seconds / 1e9)),
        }
    }

    /// One JSON object: `suite`, `case`, `params`, `ours_s`, `base_s`, `ratio`, `samples`, and
    /// the rate of each side (`gflops`/`base_gflops` or `gbps`/`base_gbps`) where meaningful.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("suite".into(), json!(self.suite));
        m.insert("case".into(), json!(self.case));
        m.insert("params".into(), json!(self.params));
        m.insert("ours_s".into(), json!(self.ours_s));
        m.insert("base_s".into(), json!(self.base_s));
        m.insert("ratio".into(), json!(self.ratio()));
        m.insert("samples".into(), json!(self.samples));
        m.insert("baseline".into(), json!(self.baseline));
        if let (Some((unit, ours)), Some((_, base))) = (self.rate(self.ours_s), self.rate(self.base_s)) {
            m.insert(unit.into(), json!(ours));
            m.insert(format!("base_{unit}"), json!(base));
        }
        Value::Object(m)
    }

    /// The table header matching [`Row::to_line`].
    pub fn header() -> String {
        format!(
            "{:<10} {:<22} {:<40} {:>12} {:>12} {:>7} {:>16}",
            "suite", "case", "params", "ours_s", "base_s", "ratio", "rate ours/base"
        )
    }

    /// One table line.
    pub fn to_line(&self) -> String {
        let rate = match (self.rate(self.ours_s), self.rate(self.base_s)) {
            (Some((unit, o)), Some((_, b))) => {
                format!("{o:.1}/{b:.1} {}", if unit == "gflops" { "GFLOP/s" } else { "GB/s" })
            }
            _ => "-".to_string(),
        };
        format!(
            "{:<10} {:<22} {:<40} {:>12.6} {:>12.6} {:>7.2} {:>16}",
            self.suite,
            self.case,
            self.params,
            self.ours_s,
            self.base_s,
            self.ratio(),
            rate
        )
    }
}

fn time_once(f: &mut Runner) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// Keeps freed memory in this process's heap (glibc: large blocks come from the heap instead
/// of fresh `mmap`s, and the heap is not trimmed), as a framework's caching allocator would.
/// Without it every call's outputs are first-touch page faults (about 1.2 us per 4 KiB page on
/// the bench machine; NSA's four outputs at 32k tokens are 65 k pages), which times the kernel
/// zeroing pages rather than the op. Both sides of every case run under the same setting.
/// Returns whether it took (false off glibc).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's tuning parameters (under malloc's own lock).
        unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The median of a non-empty sample (mean of the middle two for even counts).
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        0.5 * (samples[n / 2 - 1] + samples[n / 2])
    }
}

/// Warms both sides up, then alternates them until the budget is spent, and returns medians.
pub fn run_case(mut case: Case, budget: Budget) -> Row {
    for f in [&mut case.ours, &mut case.base] {
        let start = Instant::now();
        loop {
            time_once(f);
            if start.elapsed() >= budget.warmup {
                break;
            }
        }
    }
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while ours.len() < budget.max_samples && (ours.len() < budget.min_samples || start.elapsed() < budget.measure) {
        ours.push(time_once(&mut case.ours));
        base.push(time_once(&mut case.base));
    }
    Row {
        suite: case.suite,
        samples: ours.len(),
        ours_s: median(&mut ours),
        base_s: median(&mut base),
        case: case.case,
        params: case.params,
        work: case.work,
        baseline: case.baseline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn a_case_runs_both_sides_alternately_and_reports_rates() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let log = Rc::new(RefCell::new(String::new()));
        let (a, b) = (log.clone(), log.clone());
        let budget = Budget { warmup: Duration::ZERO, measure: Duration::ZERO, min_samples: 3, max_samples: 3 };
        let row = run_case(
            Case {
                suite: "t",
                case: "c".into(),
                params: "n=1".into(),
                baseline: "b",
                ours: Box::new(move || a.borrow_mut().push('A')),
                base: Box::new(move || b.borrow_mut().push('B')),
                work: Work::Bytes(1e9),
            },
            budget,
        );
        // One warm-up call each, then strictly alternating samples.
        assert_eq!(log.borrow().as_str(), "ABABABAB");
        assert_eq!(row.samples, 3);
        let j = row.to_json();
        for key in ["suite", "case", "params", "ours_s", "base_s", "ratio", "gbps", "base_gbps"] {
            assert!(j.get(key).is_some(), "missing {key}");
        }
        assert!((j["ratio"].as_f64().unwrap() - row.base_s / row.ours_s).abs() < 1e-12);
    }
}
