//! The benchmark suites. Each exposes `cases(quick) -> Vec<Case>`; add a suite by adding a
//! module and one line to [`SUITES`].

use crate::harness::Case;

pub mod attention;
#[cfg(feature = "cuda")]
pub mod attention_cuda;
#[cfg(feature = "cuda")]
pub mod attention_nsa_cuda;
pub mod collectives;
pub mod kvcache;
pub mod machine;
pub mod optim;
pub mod squid;

/// A suite's name, what it measures, and its case builder.
pub type SuiteEntry = (&'static str, &'static str, fn(bool) -> Vec<Case>);

/// Every suite `squid-bench` knows.
pub const SUITES: &[SuiteEntry] = &[
    ("machine", "f32 matmul GFLOP/s (gemm crate) and copy GB/s: the roofs", machine::cases),
    ("attention", "dense and NSA attention fwd/bwd/decode: GFLOP/s vs blocked gemm, NSA vs dense", attention::cases),
    ("kvcache", "RoPE forward and re-positioning, document cache disk loads", kvcache::cases),
    (
        "squid",
        "time to first token: cached documents (memory, disk) vs prefilling them; segment vs dense attention",
        squid::cases,
    ),
    ("optim", "policy loss, fused log-softmax/gather, AdamW: GB/s vs unfused", optim::cases),
    ("collectives", "local all-reduce/all-gather/reduce-scatter busbw vs gather-to-rank-0", collectives::cases),
];
