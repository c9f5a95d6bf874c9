#![doc = include_str!("../README.md")]

/// What the simulator can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PTX text could not be parsed.
    #[error("PTX parse error at line {line}: {message}")]
    Parse {
        /// 1-based line in the PTX text.
        line: usize,
        /// What is wrong.
        message: String,
    },
}
