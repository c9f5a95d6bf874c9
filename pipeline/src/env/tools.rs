//! The tool protocol: an [`Episode`] is one attempt at one task. The rollout loop turns the
//! policy's tool tokens into [`ToolCall`]s, calls [`Episode::step`], and appends the returned text
//! to the context (as a Document segment).

use super::lint::lint_text;
use super::memory::{check_query, top_k};
use super::reward::{missing_part, parse_linked};
use super::{score, Budget, Interpreter, Memory, Reward, RewardConfig, Task};

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
    /// Save `text` to the project's memory (`<store>` text `</store>`).
    Store {
        /// The snippet.
        text: String,
    },
    /// The memory's best matches for `query` (`<recall>` query `</recall>`).
    Recall {
        /// The query.
        query: String,
    },
    /// The project library's best matches for `query` (`<search>` query `</search>`).
    Search {
        /// The query.
        query: String,
    },
    /// Static diagnostics of `program` (`<lint>`), without running it.
    Lint {
        /// The program text written so far.
        program: String,
    },
}

impl ToolCall {
    /// The tool's name (`run`, `think`, `submit`, `store`, `recall`, `search`, `lint`).
    pub fn name(&self) -> &'static str {
        match self {
            ToolCall::Run { .. } => "run",
            ToolCall::Think { .. } => "think",
            ToolCall::Submit { .. } => "submit",
            ToolCall::Store { .. } => "store",
            ToolCall::Recall { .. } => "recall",
            ToolCall::Search { .. } => "search",
            ToolCall::Lint { .. } => "lint",
        }
    }
}

/// Tool calls of one or more episodes, by tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ToolCounts {
    /// `<run>`
    pub run: usize,
    /// `<think>` spans
    pub think: usize,
    /// `<submit>`
    pub submit: usize,
    /// `<store>`
    pub store: usize,
    /// `<recall>`
    pub recall: usize,
    /// `<search>`
    pub search: usize,
    /// `<lint>`
    pub lint: usize,
}

impl ToolCounts {
    /// Counts one call.
    pub fn add(&mut self, call: &ToolCall) {
        *self.slot(call.name()) += 1;
    }

    fn slot(&mut self, name: &str) -> &mut usize {
        match name {
            "run" => &mut self.run,
            "think" => &mut self.think,
            "submit" => &mut self.submit,
            "store" => &mut self.store,
            "recall" => &mut self.recall,
            "search" => &mut self.search,
            _ => &mut self.lint,
        }
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &ToolCounts) {
        for (name, n) in other.by_tool() {
            *self.slot(name) += n;
        }
    }

    /// `(tool, calls)` for every tool, in a fixed order.
    pub fn by_tool(&self) -> [(&'static str, usize); 7] {
        [
            ("run", self.run),
            ("think", self.think),
            ("submit", self.submit),
            ("store", self.store),
            ("recall", self.recall),
            ("search", self.search),
            ("lint", self.lint),
        ]
    }
}

/// Which of the optional tools an episode offers (run, think and submit always are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolSwitches {
    /// `<store>` and `<recall>` over the project's memory ([`Episode::with_memory`]).
    pub memory: bool,
    /// `<search>` over the task's library.
    pub search: bool,
    /// `<lint>`.
    pub lint: bool,
    /// Snippets a recall or search returns.
    pub top_k: usize,
}

impl Default for ToolSwitches {
    fn default() -> Self {
        Self { memory: false, search: false, lint: false, top_k: 2 }
    }
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
    /// The optional tools offered.
    pub tools: ToolSwitches,
}

impl Default for EpisodeConfig {
    fn default() -> Self {
        Self { reward: RewardConfig::default(), max_tool_calls: 8, tools: ToolSwitches::default() }
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
    let program = parse_linked(task, src).map_err(|e| format!("parse error: {e}"))?;
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
    memory: Option<Memory>,
    stored: Vec<String>,
    recalled: Vec<String>,
    failed_run: bool,
    counts: ToolCounts,
}

impl Episode {
    /// A fresh episode.
    pub fn new(task: Task, config: EpisodeConfig) -> Self {
        Self {
            task,
            config,
            tool_calls: 0,
            last_program: None,
            reward: None,
            memory: None,
            stored: Vec::new(),
            recalled: Vec::new(),
            failed_run: false,
            counts: ToolCounts::default(),
        }
    }

    /// This episode with a copy of the project's memory for `<recall>` (its `<store>`s go to
    /// the copy and to [`Episode::stored`]; the caller decides what enters the real memory).
    pub fn with_memory(mut self, memory: Memory) -> Self {
        self.memory = Some(memory);
        self
    }

    /// Snippets this episode's `<store>` calls saved (accepted by the memory's checks).
    pub fn stored(&self) -> &[String] {
        &self.stored
    }

    /// Memory texts this episode's recalls returned.
    pub fn recalled(&self) -> &[String] {
        &self.recalled
    }

    /// Whether a `<run>` of this episode failed an example (or did not parse).
    pub fn had_failing_run(&self) -> bool {
        self.failed_run
    }

    /// Calls made so far, by tool.
    pub fn tool_counts(&self) -> ToolCounts {
        self.counts
    }

    /// The last program run, linted or submitted.
    pub fn last_program(&self) -> Option<&str> {
        self.last_program.as_deref()
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
        self.counts.add(&call);
        let tools = self.config.tools;
        let unavailable = |tool: &str| format!("{tool}: not available in this run");
        let text = match call {
            ToolCall::Think { .. } => String::new(),
            ToolCall::Store { .. } | ToolCall::Recall { .. } if !tools.memory => unavailable("memory"),
            ToolCall::Store { text } => {
                let memory = self.memory.get_or_insert_with(|| Memory::new(DEFAULT_MEMORY_BYTES));
                let answer = memory.store(&text);
                if answer.starts_with("store: stored") {
                    self.stored.push(text.trim().to_string());
                }
                answer
            }
            ToolCall::Recall { query } => {
                let memory = self.memory.get_or_insert_with(|| Memory::new(DEFAULT_MEMORY_BYTES));
                let found = memory.recall(&query, tools.top_k);
                self.recalled.extend(found.hits.iter().map(|&i| memory.entries()[i].text.clone()));
                found.text
            }
            ToolCall::Search { .. } if !tools.search => unavailable("search"),
            ToolCall::Search { query } => search_library(&self.task, query.trim(), tools.top_k),
            ToolCall::Lint { .. } if !tools.lint => unavailable("lint"),
            ToolCall::Lint { program } => {
                let text = lint_text(&self.task, &program);
                self.last_program = Some(program);
                text
            }
            ToolCall::Run { program } => {
                let (mut text, failed) = match check_examples(&self.task, &program, self.config.reward.budget) {
                    Err(problem) => (problem, true),
                    Ok(report) => match report.first_failure {
                        None => (format!("passed {}/{} examples", report.passed, report.total), false),
                        Some(failure) => (
                            format!("passed {}/{} examples; first failure: {failure}", report.passed, report.total),
                            true,
                        ),
                    },
                };
                self.failed_run |= failed;
                // A failing run states the constants a withholding prompt left out.
                if failed {
                    if let Some(constants) = self.task.constants_text() {
                        text = format!("{text}; {constants}");
                    }
                }
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

/// Bytes of a memory an episode makes for itself when none was given.
const DEFAULT_MEMORY_BYTES: usize = 2048;

/// The `<search>` tool's answer: the library entries whose name and description best match
/// `query`, their code only.
pub fn search_library(task: &Task, query: &str, k: usize) -> String {
    if let Err(answer) = check_query("search", query) {
        return answer;
    }
    if task.library.is_empty() {
        return "search: the library is empty".into();
    }
    let texts: Vec<String> = task.library.iter().map(|e| format!("{} {} {}", e.name, e.description, e.code)).collect();
    let found = top_k(query, texts.iter().map(String::as_str), k);
    if found.is_empty() {
        return "search: nothing in the library matches".into();
    }
    let mut text = format!("search: {} of {} library entries", found.len(), task.library.len());
    for (i, _) in found {
        text.push('\n');
        text.push_str(&task.library[i].code);
    }
    text
}

fn submitted_text(reward: &Reward) -> String {
    if reward.malformed {
        "submitted: malformed program, reward 0".to_string()
    } else {
        format!("submitted: {}/{} hidden tests passed, reward {:.3}", reward.passed, reward.total, reward.value)
    }
}
