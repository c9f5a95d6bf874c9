//! `squid-bench SUITE [--quick] [--json]`: ours against a baseline, interleaved, as a ratio table.

use std::process::ExitCode;

use clap::Parser;
use squid_benches::harness::{keep_freed_memory, run_case, Budget, Case, Row};
use squid_benches::suites;

#[derive(Parser)]
#[command(name = "squid-bench", about = "squid benchmarks: ours vs a baseline in the same run")]
struct Cli {
    /// The suite to run (`list` to see them all).
    suite: String,
    /// Smaller sizes and shorter measuring: a rough figure fast.
    #[arg(long)]
    quick: bool,
    /// One JSON object per case per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Only cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Only cases whose parameters contain this (e.g. `T=65536`).
    #[arg(long)]
    params: Option<String>,
    /// The collectives backend: `local` (threads), or `mpi` (the `collectives` suite only; run
    /// under `mpirun`, needs the `mpi` feature; rank 0 prints).
    #[arg(long, default_value = "local")]
    backend: String,
    /// Leave the C heap at its defaults: large outputs are then fresh pages on every call
    /// (first-touch page faults timed with the op). By default freed memory is kept.
    #[arg(long)]
    fresh_pages: bool,
    /// Where the kernels run: `cpu`, or `cuda` (the `attention` suite; a GPU and the `cuda`
    /// feature; prints "no CUDA device" and exits 0 where there is none).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl Cli {
    /// Whether `--filter` and `--params` let `case` run.
    fn selects(&self, case: &Case) -> bool {
        self.filter.as_deref().is_none_or(|f| case.case.contains(f))
            && self.params.as_deref().is_none_or(|p| case.params.contains(p))
    }
}

/// The GPU cases; without a GPU, `Err(SUCCESS)` after printing "no CUDA device (...)", and
/// `Err(FAILURE)` when a GPU is there but the cases could not be prepared.
#[cfg(feature = "cuda")]
fn cuda_cases(quick: bool) -> Result<Vec<Case>, ExitCode> {
    let gpu = match squid_cuda::launch::Gpu::first() {
        Ok(gpu) => std::rc::Rc::new(gpu),
        Err(e) if e.is_unavailable() => {
            println!("no CUDA device ({e})");
            return Err(ExitCode::SUCCESS);
        }
        Err(e) => {
            eprintln!("squid-bench: opening the GPU failed: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    suites::attention_cuda::cases(gpu, quick).map_err(|e| {
        eprintln!("squid-bench: preparing the GPU cases failed: {e}");
        ExitCode::FAILURE
    })
}

/// Without the `cuda` feature there is no device path.
#[cfg(not(feature = "cuda"))]
fn cuda_cases(_quick: bool) -> Result<Vec<Case>, ExitCode> {
    println!("no CUDA device (squid-bench was built without the `cuda` feature)");
    Err(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.suite == "list" {
        for (name, what, _) in suites::SUITES {
            println!("{name:<12} {what}");
        }
        return ExitCode::SUCCESS;
    }
    let heap = if !cli.fresh_pages && keep_freed_memory() {
        "freed memory kept in the heap (--fresh-pages: OS defaults)"
    } else {
        "C heap defaults: large outputs are fresh pages each call"
    };
    let (_, _, build) = match squid_benches::find_suite(&cli.suite) {
        Ok(entry) => entry,
        Err(e) => {
            eprintln!("squid-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (cases, budget, prints) = match (cli.device.as_str(), cli.backend.as_str(), cli.suite.as_str()) {
        ("cuda", "local", "attention") => match cuda_cases(cli.quick) {
            Ok(cases) => (cases, if cli.quick { Budget::quick() } else { Budget::full() }, true),
            Err(code) => return code,
        },
        ("cpu", "local", _) => (build(cli.quick), if cli.quick { Budget::quick() } else { Budget::full() }, true),
        ("cpu", "mpi", "collectives") => match suites::collectives::mpi_cases(cli.quick) {
            Ok(suite) => (suite.cases, suite.budget, suite.rank == 0),
            Err(e) => {
                eprintln!("squid-bench: {e}");
                return ExitCode::FAILURE;
            }
        },
        (device, backend, suite) => {
            eprintln!(
                "squid-bench: device `{device}` with backend `{backend}` is not available for suite `{suite}` \
                 (cpu/local; cpu/mpi for collectives; cuda/local for attention)"
            );
            return ExitCode::FAILURE;
        }
    };
    if !prints {
        // A rank other than 0 of an MPI run: make the same calls, print nothing.
        for case in cases {
            if cli.selects(&case) {
                run_case(case, budget);
            }
        }
        return ExitCode::SUCCESS;
    }
    if !cli.json {
        println!("{}", Row::header());
    }
    let mut baselines = Vec::new();
    for case in cases {
        if !cli.selects(&case) {
            continue;
        }
        let row = run_case(case, budget);
        if cli.json {
            println!("{}", row.to_json());
        } else {
            println!("{}", row.to_line());
        }
        if !baselines.contains(&(row.case.clone(), row.baseline)) {
            baselines.push((row.case.clone(), row.baseline));
        }
    }
    if !cli.json {
        println!("\nheap: {heap}");
        println!("ratio = baseline / ours (> 1: ours is faster). Baselines:");
        for (case, baseline) in baselines {
            println!("  {case}: {baseline}");
        }
    }
    ExitCode::SUCCESS
}
