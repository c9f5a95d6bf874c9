//! `squid`: the reference RL-for-code pipeline's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use squid_cuda::check::format_table;
use squid_cuda::{ptxas, Arch, Device};
use squid_pipeline::kernels::{check_all, workspace_registry};
use squid_pipeline::Error;

#[derive(Parser)]
#[command(name = "squid", version, about = "GPU kernels and training primitives for RL on code")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the workspace's CUDA kernels, or check that they compile.
    Kernels {
        #[command(subcommand)]
        action: Option<KernelsAction>,
    },
    /// List the GPUs this machine has (or say why there are none).
    Devices,
}

#[derive(Subcommand)]
enum KernelsAction {
    /// Compile every kernel with NVRTC, assemble it with `ptxas -v`, print each entry point's
    /// registers, spills and shared memory. Exits non-zero on a failed compile or any spill.
    Check {
        /// Comma-separated targets.
        #[arg(long, default_value = "sm_80,sm_90")]
        arch: String,
        /// Fail when ptxas is not found, instead of printing the table without resources.
        #[arg(long)]
        require_ptxas: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("squid: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Kernels { action: None } => list_kernels(),
        Command::Kernels { action: Some(KernelsAction::Check { arch, require_ptxas }) } => {
            check_kernels(&arch, require_ptxas)
        }
        Command::Devices => {
            match Device::discover() {
                Ok(devices) => {
                    for d in devices {
                        println!(
                            "{}: {} ({}, {} SMs, {:.1} GiB)",
                            d.ordinal,
                            d.name,
                            d.arch,
                            d.multiprocessors,
                            d.total_memory_bytes as f64 / (1u64 << 30) as f64
                        );
                    }
                }
                Err(e) if e.is_unavailable() => println!("no GPU: {e}"),
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
    }
}

fn list_kernels() -> Result<(), Error> {
    let registry = workspace_registry()?;
    println!("{:<12} {:<16} {:<30} {:<9} entries", "kernel", "crate", "path", "fast_math");
    for k in registry.iter() {
        println!("{:<12} {:<16} {:<30} {:<9} {}", k.name, k.crate_name, k.path, k.fast_math, k.entries.join(", "));
    }
    Ok(())
}

fn check_kernels(arch: &str, require_ptxas: bool) -> Result<(), Error> {
    let archs = Arch::parse_list(arch)?;
    let registry = workspace_registry()?;
    let ptxas = match ptxas::find_ptxas() {
        Ok(p) => Some(p),
        Err(e) if require_ptxas => return Err(e.into()),
        Err(e) => {
            eprintln!("warning: {e}; printing the table without resource figures");
            None
        }
    };
    let bar = ProgressBar::new((registry.len() * archs.len()) as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let outcome = check_all(&registry, &archs, ptxas.as_deref(), |kernel, arch| {
        bar.set_message(format!("{kernel} {arch}"));
        bar.inc(1);
    });
    bar.finish_and_clear();
    print!("{}", format_table(&outcome.rows));
    for r in outcome.spilled() {
        eprintln!("spill: {} {} at {} spills registers", r.kernel, r.entry, r.arch);
    }
    for (kernel, arch, e) in &outcome.failures {
        eprintln!("failed: {kernel} at {arch}: {e}");
    }
    match outcome.problems() {
        0 => Ok(()),
        failed => Err(Error::KernelCheckFailed { failed }),
    }
}
