//! `cargo bench`: criterion over the cases of `squid-bench`'s suites (`squid_benches::suites::SUITES`,
//! the one definition of each case; this file only hands them to criterion). Each case is two
//! benchmarks, `SUITE/CASE PARAMS/ours` and `.../baseline`.
//!
//! ```sh
//! cargo bench -p squid-benches                 # every suite, squid-bench's --quick sizes
//! cargo bench -p squid-benches -- attention    # a criterion filter: suites are built only if named
//! SQUID_BENCH_FULL=1 cargo bench -p squid-benches -- optim   # the full sizes
//! cargo bench -p squid-benches -- --test       # run every case once: a smoke test, no timing
//! ```
//! Rates: a case's [`Work::Bytes`] is criterion's byte throughput; [`Work::Flops`] is reported as
//! "elements" per second, one element being one floating-point operation.

use criterion::{BenchmarkId, Criterion, Throughput};
use squid_benches::harness::Work;
use squid_benches::suites::SUITES;

/// criterion's command-line options that take a value (so the value is not taken for a filter).
const VALUE_FLAGS: &[&str] = &[
    "--save-baseline",
    "-s",
    "--baseline",
    "-b",
    "--baseline-lenient",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--profile-time",
    "--plotting-backend",
    "--output-format",
    "--color",
    "-c",
    "--format",
];

/// The filter words given to the bench binary (criterion matches them against benchmark ids).
fn filters() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if VALUE_FLAGS.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            out.push(a);
        }
    }
    out
}

/// Builds a suite's cases (their inputs can be large) only when no filter excludes the whole
/// suite: a filter names it, or is a word that could match one of its cases.
fn wanted(suite: &str, filters: &[String]) -> bool {
    filters.is_empty()
        || filters.iter().any(|f| f.starts_with(suite) || !SUITES.iter().any(|(s, _, _)| f.starts_with(s)))
}

fn main() {
    let quick = std::env::var_os("SQUID_BENCH_FULL").is_none();
    let filters = filters();
    let mut c = Criterion::default().configure_from_args();
    for &(suite, _about, cases) in SUITES {
        if !wanted(suite, &filters) {
            continue;
        }
        let mut group = c.benchmark_group(suite);
        for mut case in cases(quick) {
            match case.work {
                Work::Bytes(b) => group.throughput(Throughput::Bytes(b as u64)),
                Work::Flops(f) => group.throughput(Throughput::Elements(f as u64)),
                Work::None => &mut group,
            };
            let id = format!("{} {}", case.case, case.params);
            group.bench_function(BenchmarkId::new(id.clone(), "ours"), |b| b.iter(&mut case.ours));
            group.bench_function(BenchmarkId::new(id, "baseline"), |b| b.iter(&mut case.base));
        }
        group.finish();
    }
    c.final_summary();
}
