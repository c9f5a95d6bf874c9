//! The reward of a submitted program: hidden tests passed (partial credit or all-or-nothing),
//! 0 for a program that does not parse or lacks a required function, minus an optional length
//! penalty.

use super::{parse_program, Budget, Interpreter, Program, Task};

/// How hidden-test results become a reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RewardMode {
    /// Fraction of all hidden tests passed, over all parts.
    #[default]
    PartialCredit,
    /// 1 if every hidden test of every part passes, else 0.
    AllOrNothing,
}

/// A penalty for long answers: `rate` per unit of length over `budget`, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthPenalty {
    /// Free length (in the caller's units: bytes or tokens).
    pub budget: usize,
    /// Penalty per unit over the budget.
    pub rate: f64,
    /// Cap on the penalty.
    pub max: f64,
}

/// Reward settings.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardConfig {
    /// Partial credit or all-or-nothing.
    pub mode: RewardMode,
    /// Optional length penalty.
    pub length_penalty: Option<LengthPenalty>,
    /// Budget for each hidden test.
    pub budget: Budget,
}

/// A scored program.
#[derive(Debug, Clone, PartialEq)]
pub struct Reward {
    /// The reward: in `[0, 1]` before the length penalty, `>= -max penalty` after.
    pub value: f64,
    /// Hidden tests passed.
    pub passed: usize,
    /// Hidden tests in all.
    pub total: usize,
    /// The program did not parse or lacked a function with the right arity.
    pub malformed: bool,
    /// The length penalty subtracted.
    pub penalty: f64,
}

/// Why a parsed program cannot be scored: a required function missing or with the wrong arity.
pub(crate) fn missing_part(task: &Task, program: &Program) -> Option<String> {
    for part in &task.parts {
        match program.function(&part.name) {
            None => return Some(format!("missing function {}", part.name)),
            Some(f) if f.params.len() != part.params.len() => {
                return Some(format!(
                    "function {} takes {} parameter(s), the task needs {}",
                    part.name,
                    f.params.len(),
                    part.params.len()
                ))
            }
            Some(_) => {}
        }
    }
    None
}

/// Scores `src` on `task`'s hidden tests. `length` is the answer's length in the units of
/// `config.length_penalty` (bytes of `src`, or tokens if the caller counts them).
pub fn score(task: &Task, src: &str, config: &RewardConfig, length: usize) -> Reward {
    let total = task.hidden_count();
    let program = match parse_program(src) {
        Ok(program) if missing_part(task, &program).is_none() => program,
        _ => return Reward { value: 0.0, passed: 0, total, malformed: true, penalty: 0.0 },
    };
    let mut interpreter = Interpreter::new(&program, config.budget);
    let mut passed = 0;
    for part in &task.parts {
        for case in &part.hidden {
            if matches!(interpreter.call(&part.name, &case.args), Ok(v) if v == case.expected) {
                passed += 1;
            }
        }
    }
    let base = match config.mode {
        RewardMode::PartialCredit if total > 0 => passed as f64 / total as f64,
        RewardMode::PartialCredit => 0.0,
        RewardMode::AllOrNothing => f64::from(u8::from(total > 0 && passed == total)),
    };
    let penalty = config.length_penalty.map_or(0.0, |p| (length.saturating_sub(p.budget) as f64 * p.rate).min(p.max));
    Reward { value: base - penalty, passed, total, malformed: false, penalty }
}
