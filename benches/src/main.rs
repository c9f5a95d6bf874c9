//! `squid-bench SUITE [--quick] [--json]`: ours against a baseline, interleaved, as a ratio table.

use std::process::ExitCode;

use clap::Parser;
use squid_benches::harness::{keep_freed_memory, run_case, Budget, Case, Row};
use squid_benches::roof::{fma_rate, FmaIsa, Roof};
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
    let mut cases = suites::attention_cuda::cases(gpu.clone(), quick).map_err(|e| {
        eprintln!("squid-bench: preparing the GPU cases failed: {e}");
        ExitCode::FAILURE
    })?;
    // The NSA cases (their own file: suites/attention_nsa_cuda.rs).
    cases.extend(suites::attention_nsa_cuda::cases(gpu, quick).map_err(|e| {
        eprintln!("squid-bench: preparing the GPU NSA cases failed: {e}");
        ExitCode::FAILURE
    })?);
    Ok(cases)
}

/// Without the `cuda` feature there is no device path.
#[cfg(not(feature = "cuda"))]
fn cuda_cases(_quick: bool) -> Result<Vec<Case>, ExitCode> {
    println!("no CUDA device (squid-bench was built without the `cuda` feature)");
    Err(ExitCode::SUCCESS)
}

/// The roofs as one JSON object line (`{"roof": {...}}`), before the case lines.
fn roof_json(roof: &Roof) -> serde_json::Value {
    serde_json::json!({"roof": {
        "cpu": roof.cpu.model_name, "vendor": roof.cpu.vendor, "family": roof.cpu.family,
        "model": roof.cpu.model, "stepping": roof.cpu.stepping, "threads": roof.cpu.threads,
        "fma_isa": roof.fma.isa.name(), "fma_gflops": roof.fma.gflops, "copy_gbps": roof.copy_gbps,
    }})
}

/// `machine`: the FMA throughput of every ISA this CPU has, on one thread and on all.
fn print_fma_table(quick: bool) {
    let all = rayon::current_num_threads();
    let seconds = if quick { 0.1 } else { 0.5 };
    println!("FMA throughput (independent register FMAs, best of 3; GFLOP/s, an FMA = 2 FLOPs):");
    println!("  {:<8} {:>12} {:>18}", "isa", "1 thread", format!("{all} threads"));
    for isa in FmaIsa::ALL {
        match (fma_rate(isa, 1, seconds, 3), fma_rate(isa, all, seconds, 3)) {
            (Some(one), Some(every)) => {
                println!("  {:<8} {:>12.1} {:>18.1}", isa.name(), one.gflops, every.gflops)
            }
            _ => println!("  {:<8} {:>12} {:>18}", isa.name(), "not on this CPU", "-"),
        }
    }
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
    // The machine's roofs, measured in this run, so every rate below is read against them
    // (CPU suites only: a GPU run's roof is the GPU's).
    let roof = (cli.device == "cpu").then(Roof::measure);
    if let Some(roof) = &roof {
        if cli.json {
            println!("{}", roof_json(roof));
        } else {
            println!("{}", roof.describe());
            if cli.suite == "machine" {
                print_fma_table(cli.quick);
            }
            println!();
        }
    }
    if !cli.json {
        println!("{} {:>8}", Row::header(), "of roof");
    }
    let mut baselines = Vec::new();
    for case in cases {
        if !cli.selects(&case) {
            continue;
        }
        let row = run_case(case, budget);
        let of_roof = roof.as_ref().zip(row.ours_rate()).and_then(|(roof, (unit, rate))| roof.fraction(unit, rate));
        if cli.json {
            let mut j = row.to_json();
            if let Some(f) = of_roof {
                j["of_roof"] = serde_json::json!(f);
            }
            println!("{j}");
        } else {
            let frac = of_roof.map_or_else(|| "-".to_string(), |f| format!("{:.0}%", 100.0 * f));
            println!("{} {frac:>8}", row.to_line());
        }
        if !baselines.contains(&(row.case.clone(), row.baseline)) {
            baselines.push((row.case.clone(), row.baseline));
        }
    }
    if !cli.json {
        println!("\nheap: {heap}");
        println!("ratio = baseline / ours (> 1: ours is faster); of roof = ours as a fraction of this run's");
        println!("FMA peak (GFLOP/s rows) or copy bandwidth (GB/s rows). Baselines:");
        for (case, baseline) in baselines {
            println!("  {case}: {baseline}");
        }
    }
    ExitCode::SUCCESS
}
