//! squid's benchmarks as a library: the [`harness`] that runs ours against a baseline
//! interleaved, and the [`suites`] of cases. The `squid-bench` binary drives them.

pub mod harness;
pub mod suites;
