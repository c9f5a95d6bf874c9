#![doc = include_str!("../README.md")]

pub mod harness;
pub mod roof;
pub mod suites;

use suites::{SuiteEntry, SUITES};

/// What `squid-bench` can fail with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A suite name that is not in [`SUITES`].
    #[error("unknown suite `{name}` (known: {known})")]
    UnknownSuite {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
}

/// Looks a suite up by name.
pub fn find_suite(name: &str) -> Result<&'static SuiteEntry, Error> {
    SUITES.iter().find(|(n, _, _)| *n == name).ok_or_else(|| Error::UnknownSuite {
        name: name.to_string(),
        known: SUITES.iter().map(|(n, _, _)| *n).collect::<Vec<_>>().join(", "),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn suites_are_found_by_name_and_unknown_ones_are_errors() {
        assert_eq!(super::find_suite("machine").unwrap().0, "machine");
        let err = super::find_suite("nope").unwrap_err();
        assert!(err.to_string().contains("machine"), "{err}");
    }
}
