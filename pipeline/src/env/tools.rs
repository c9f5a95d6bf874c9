//! The tool protocol: an [`Episode`] is one attempt at one task. The rollout loop turns the
//! policy's tool tokens into [`ToolCall`]s, calls [`Episode::step`], and appends the returned text
//! to the context (as a Document segment).

use super::reward::missing_part;
use super::{parse_program, score, Budget, Interpreter, Reward, RewardConfig, Task};

/// A tool call the policy made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCall {
    /// Run `program` on the visible examples.
    Run {
        /// The program text written so far.
        program: String,
    },
    /// Scratch text; does nothing and is not part of the program.
    Think {
        /// The text.
        text: String,
    },
    /// Submit `program` for scoring on the hidden tests; ends the episode.
    Submit {
        /// The final program.
        program: String,
    },
}

/// What a tool returns.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// Text for the context.
    pub text: String,
    /// The episode has ended (submit, or the tool-call limit reached).
    pub done: bool,
    /// The reward, once the episode has ended.
    pub reward: Option<Reward>,
}

/// Episode settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpisodeConfig {
    /// How submissions are scored.
    pub reward: RewardConfig,
    /// Tool calls allowed; the call that reaches it ends the episode.
    pub max_tool_calls: usize,
}

impl Default for EpisodeConfig {
    fn default() -> Self {
        Self { reward: RewardConfig::default(), max_tool_calls: 8 }
    }
}

/// A tool call on an episode that has already ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpisodeError {
    /// The episode ended earlier (submit or call limit).
    #[error("the episode has already ended")]
    Finished,
}

/// The visible-example results of one program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleReport {
    /// Examples passed.
    pub passed: usize,
    /// Examples in all.
    pub total: usize,
    /// The first failing example, as text.
    pub first_failure: Option<String>,
}

/// Runs `src` on every part's visible examples. `Err` carries the text of a parse error or a
/// missing function.
pub fn check_examples(task: &Task, src: &str, budget: Budget) -> Result<ExampleReport, String> {
    let program = parse_program(src).map_err(|e| format!("parse error: {e}"))?;
    if let Some(problem) = missing_part(task, &program) {
        return Err(problem);
    }
    let mut interpreter = Interpreter::new(&program, budget);
    let mut report = ExampleReport { passed: 0, total: 0, first_failure: None };
    for part in &task.parts {
        for case in &part.visible {
            report.total += 1;
            let failure = match interpreter.call(&part.name, &case.args) {
                Ok(value) if value == case.expected => None,
                Ok(value) => Some(format!("{}, got {value}", case.describe(&part.name))),
                Err(error) => Some(format!("{}, got error: {error}", case.describe(&part.name))),
            };
            match failure {
                None => report.passed += 1,
                Some(text) => {
                    report.first_failure.get_or_insert(text);
                }
            }
        }
    }
    Ok(report)
}

/// One attempt at one task.
#[derive(Debug, Clone)]
pub struct Episode {
    task: Task,
    config: EpisodeConfig,
    tool_calls: usize,
    last_program: Option<String>,
    reward: Option<Reward>,
}

impl Episode {
    /// A fresh episode.
    pub fn new(task: Task, config: EpisodeConfig) -> Self {
        Self { task, config, tool_calls: 0, last_program: None, reward: None }
    }

    /// The task.
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// Tool calls made so far.
    pub fn tool_calls(&self) -> usize {
        self.tool_calls
    }

    /// The reward, once ended.
    pub fn reward(&self) -> Option<&Reward> {
        self.reward.as_ref()
    }

    /// Whether the episode has ended.
    pub fn is_done(&self) -> bool {
        self.reward.is_some()
    }

    /// Handles one tool call and returns its output text.
    pub fn step(&mut self, call: ToolCall) -> Result<ToolOutput, EpisodeError> {
        if self.is_done() {
            return Err(EpisodeError::Finished);
        }
        self.tool_calls += 1;
        let text = match call {
            ToolCall::Think { .. } => String::new(),
            ToolCall::Run { program } => {
                let text = match check_examples(&self.task, &program, self.config.reward.budget) {
                    Err(problem) => problem,
                    Ok(report) => match report.first_failure {
                        None => format!("passed {}/{} examples", report.passed, report.total),
                        Some(failure) => {
                            format!("passed {}/{} examples; first failure: {failure}", report.passed, report.total)
                        }
                    },
                };
                self.last_program = Some(program);
                text
            }
            ToolCall::Submit { program } => {
                self.last_program = Some(program);
                let reward = self.finish();
                return Ok(ToolOutput { text: submitted_text(&reward), done: true, reward: Some(reward) });
            }
        };
        if self.tool_calls >= self.config.max_tool_calls {
            let reward = self.finish();
            let text = format!("{text}\ntool-call limit reached; {}", submitted_text(&reward));
            return Ok(ToolOutput { text, done: true, reward: Some(reward) });
        }
        Ok(ToolOutput { text, done: false, reward: None })
    }

    /// Ends the episode (also when the rollout stops it at max tokens or turns): scores the last
    /// program submitted or run, or gives 0 (malformed) if there is none. Idempotent.
    pub fn finish(&mut self) -> Reward {
        if let Some(reward) = &self.reward {
            return reward.clone();
        }
        let program = self.last_program.as_deref().unwrap_or("");
        let reward = score(&self.task, program, &self.config.reward, program.len());
        self.reward = Some(reward.clone());
        reward
    }
}

fn submitted_text(reward: &Reward) -> String {
    if reward.malformed {
        "submitted: malformed program, reward 0".to_string()
    } else {
        format!("submitted: {}/{} hidden tests passed, reward {:.3}", reward.passed, reward.total, reward.value)
    }
}
