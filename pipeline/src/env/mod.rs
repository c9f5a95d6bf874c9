//! The RL environment: a small language of integer and list programs, a sandboxed interpreter,
//! generated coding tasks with visible and hidden tests, the tools the policy calls (`run`,
//! `think`, `submit`) and the reward.
//!
//! A program is one or more functions:
//! ```text
//! def total(xs) = fold(\acc x -> acc + x, 0, xs)
//! def evens(xs) = filter(\x -> x % 2 == 0, xs)
//! def fact(n) = if n <= 1 then 1 else n * fact(n - 1)
//! ```
//! Builtins: `len range map filter fold cons head tail abs min max`; operators
//! `+ - * / % ++ == != < <= > >= && || !`, indexing `xs[i]`, `let x = e in body`,
//! `if c then a else b`, lambdas `\a b -> body`.

mod interp;
mod lexer;
mod lint;
mod memory;
mod parser;
mod project;
mod reward;
mod tasks;
mod tools;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tool_tests;
#[cfg(test)]
mod withheld_tests;

pub use interp::{Budget, Builtin, Func, Interpreter, Value, MAX_VALUE_DEPTH};
pub use lexer::{tokenize, Pos, Tok, MAX_PROGRAM_BYTES};
pub use lint::{lint, lint_text, Diagnostic, DiagnosticKind};
pub use memory::{
    embed, similarity, top_k, Memory, MemoryEntry, MemoryPolicy, Recall, EMBED_DIM, MAX_QUERY_BYTES, MAX_SNIPPET_BYTES,
};
pub use parser::{parse_program, BinOp, Expr, FunctionDef, Program, MAX_PARAMS, MAX_PARSE_DEPTH};
pub use project::{generate_project, HELPER_WORDS, PROJECT_TASKS, USE_WORDS};
pub use reward::{score, LengthPenalty, Reward, RewardConfig, RewardMode};
pub use tasks::{generate_task, Level, LibraryEntry, ProjectPlace, Rng, Task, TaskPart, TestCase, Withheld};
pub use tools::{
    check_examples, search_library, Episode, EpisodeConfig, EpisodeError, ExampleReport, ToolCall, ToolCounts,
    ToolOutput, ToolSwitches,
};

/// Why program text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A character that starts no token.
    #[error("{pos}: unexpected character {ch:?}")]
    UnexpectedChar {
        /// The character.
        ch: char,
        /// Where.
        pos: Pos,
    },
    /// An integer literal that does not fit in 64 bits.
    #[error("{pos}: integer literal too large")]
    IntTooLarge {
        /// Where it starts.
        pos: Pos,
    },
    /// A token other than the one the grammar needs here.
    #[error("{pos}: expected {expected}, found {found}")]
    Unexpected {
        /// The token found, as text.
        found: String,
        /// What the grammar wanted.
        expected: &'static str,
        /// Where.
        pos: Pos,
    },
    /// Nesting deeper than [`MAX_PARSE_DEPTH`].
    #[error("{pos}: expression nested deeper than {max}")]
    TooDeep {
        /// Where the limit was hit.
        pos: Pos,
        /// The limit.
        max: usize,
    },
    /// More than [`MAX_PARAMS`] parameters.
    #[error("{pos}: more than {max} parameters")]
    TooManyParams {
        /// Where.
        pos: Pos,
        /// The limit.
        max: usize,
    },
    /// Two functions with one name.
    #[error("{pos}: function {name} defined twice")]
    DuplicateFunction {
        /// The name.
        name: String,
        /// The second definition.
        pos: Pos,
    },
    /// No `def` at all.
    #[error("the program defines no function")]
    EmptyProgram,
    /// Text longer than [`MAX_PROGRAM_BYTES`].
    #[error("program is {bytes} bytes, more than the {max} allowed")]
    TooLong {
        /// Its length.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a run of a program stopped without a value. Every one of these fails the test it hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// Ran out of evaluation steps.
    #[error("step budget of {max} exhausted")]
    StepBudget {
        /// The budget.
        max: u64,
    },
    /// Allocated too many list cells.
    #[error("memory budget of {max} list cells exhausted")]
    MemoryBudget {
        /// The budget.
        max: u64,
    },
    /// Recursion or nesting deeper than the budget allows.
    #[error("evaluation nested deeper than {max} (runaway recursion?)")]
    DepthLimit {
        /// The limit.
        max: usize,
    },
    /// A value nested deeper than [`MAX_VALUE_DEPTH`].
    #[error("value nested deeper than {max}")]
    ValueTooDeep {
        /// The limit.
        max: u32,
    },
    /// A name that is not a variable, function or builtin.
    #[error("unknown name {name}")]
    UnknownName {
        /// The name.
        name: String,
    },
    /// `name(...)` where `name` holds no function.
    #[error("{name} is not a function")]
    NotAFunction {
        /// The name.
        name: String,
    },
    /// An operand of the wrong type.
    #[error("{op}: expected {expected}, found {found}")]
    Type {
        /// The operator or builtin.
        op: &'static str,
        /// The type it needs.
        expected: &'static str,
        /// The type it got.
        found: &'static str,
    },
    /// A call with the wrong number of arguments.
    #[error("{name} takes {expected} argument(s), got {found}")]
    Arity {
        /// The function.
        name: String,
        /// Its parameter count.
        expected: usize,
        /// Arguments given.
        found: usize,
    },
    /// `xs[i]` out of bounds.
    #[error("index {index} out of range for a list of length {len}")]
    IndexOutOfRange {
        /// The index.
        index: i64,
        /// The list's length.
        len: usize,
    },
    /// `/` or `%` by zero.
    #[error("division by zero")]
    DivisionByZero,
    /// Integer overflow.
    #[error("integer overflow in {op}")]
    Overflow {
        /// The operator.
        op: &'static str,
    },
    /// `head` or `tail` of an empty list.
    #[error("{op} of an empty list")]
    EmptyList {
        /// The builtin.
        op: &'static str,
    },
}

/// Parses `src` and calls its function `name` on `args` under `budget`: the one-line way to run a
/// program.
pub fn run_function(src: &str, name: &str, args: &[Value], budget: Budget) -> Result<Value, RunFailure> {
    let program = parse_program(src).map_err(RunFailure::Parse)?;
    Interpreter::new(&program, budget).call(name, args).map_err(RunFailure::Run)
}

/// Either way a [`run_function`] can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunFailure {
    /// The text did not parse.
    #[error("parse error: {0}")]
    Parse(ParseError),
    /// The run stopped with an error.
    #[error("runtime error: {0}")]
    Run(RunError),
}
