//! `squid`: the reference RL-for-code pipeline's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use squid_cuda::check::format_table;
use squid_cuda::{ptxas, Arch, Device};
use squid_pipeline::env::RewardMode;
use squid_pipeline::kernels::{check_all, workspace_registry};
use squid_pipeline::model::{AttentionKind, NsaParams};
use squid_pipeline::train::{experiment, train, RunOptions, RunSummary, TrainConfig};
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
    /// Train the reference policy: supervised warm-up, then GRPO with tool calls; writes
    /// `runs/<timestamp>/` (config, metrics.jsonl, curves.png, checkpoints, summary, report).
    Train(TrainArgs),
    /// Controlled experiments built on `train`.
    Experiment {
        #[command(subcommand)]
        which: ExperimentKind,
    },
}

#[derive(Subcommand)]
enum ExperimentKind {
    /// Partial-credit vs all-or-nothing reward from one warm-up with the same compute.
    RewardShaping(TrainArgs),
}

#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Seed of tasks, initialisation and sampling.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where new run directories go.
    #[arg(long, default_value = "runs")]
    out: PathBuf,
    /// Run directory name (default: UTC time stamp and seed).
    #[arg(long)]
    name: Option<String>,
    /// Continue the run in this directory from its newest checkpoint (its config.json wins).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Skip the warm-up: start GRPO from this model (a `warmup/model.safetensors` of an
    /// earlier run with the same model shape).
    #[arg(long, value_name = "MODEL")]
    warm_start: Option<PathBuf>,
    /// Tensor-parallel ranks (threads).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Attention of the policy.
    #[arg(long, value_enum, default_value_t = AttentionArg::Segments)]
    attention: AttentionArg,
    /// Reward of the GRPO phase.
    #[arg(long, value_enum, default_value_t = RewardArg::Partial)]
    reward: RewardArg,
    /// Warm-up steps.
    #[arg(long)]
    sft_steps: Option<u64>,
    /// GRPO steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Tasks per GRPO step.
    #[arg(long)]
    tasks_per_step: Option<usize>,
    /// Samples per task.
    #[arg(long)]
    group_size: Option<usize>,
    /// GRPO learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// KL coefficient to the warm-up policy (0 = off).
    #[arg(long)]
    kl_beta: Option<f32>,
    /// Sampling temperature of the GRPO rollouts.
    #[arg(long)]
    temperature: Option<f32>,
    /// Roll out this many times the tasks per step and train on the groups whose rewards differ.
    #[arg(long)]
    oversample: Option<usize>,
    /// Minibatches (optimizer steps) per GRPO step.
    #[arg(long)]
    minibatches: Option<usize>,
    /// PPO clip (lower side, and upper unless --clip-high is given).
    #[arg(long)]
    clip: Option<f32>,
    /// Upper PPO clip (DAPO clip-higher).
    #[arg(long)]
    clip_high: Option<f32>,
    /// Reward added to a submission that passes every hidden test (0 = off).
    #[arg(long)]
    solve_bonus: Option<f32>,
    /// Held-out tasks per level.
    #[arg(long)]
    eval_tasks: Option<usize>,
    /// Level weights of the warm-up traces, `easy,medium,hard`.
    #[arg(long, value_parser = parse_mix)]
    sft_mix: Option<[f64; 3]>,
    /// Level weights of the GRPO tasks, `easy,medium,hard`.
    #[arg(long, value_parser = parse_mix)]
    grpo_mix: Option<[f64; 3]>,
    /// Evaluate pass@1 every N GRPO steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// A small, fast configuration (about a minute): checks the whole loop, proves nothing.
    #[arg(long)]
    quick: bool,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
}

fn parse_mix(s: &str) -> Result<[f64; 3], String> {
    let parts: Vec<f64> =
        s.split(',').map(|p| p.trim().parse::<f64>()).collect::<Result<_, _>>().map_err(|e| format!("{s:?}: {e}"))?;
    <[f64; 3]>::try_from(parts).map_err(|p| format!("{s:?}: need three weights easy,medium,hard, got {}", p.len()))
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum AttentionArg {
    Dense,
    Segments,
    Nsa,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum RewardArg {
    Partial,
    AllOrNothing,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        let mut c = if self.quick { TrainConfig::quick() } else { TrainConfig::default() };
        c.seed = self.seed;
        c.tp = self.tp;
        c.model.attention = match self.attention {
            AttentionArg::Dense => AttentionKind::Dense,
            AttentionArg::Segments => AttentionKind::Segments,
            AttentionArg::Nsa => AttentionKind::Nsa(NsaParams::default()),
        };
        c.grpo.reward = match self.reward {
            RewardArg::Partial => RewardMode::PartialCredit,
            RewardArg::AllOrNothing => RewardMode::AllOrNothing,
        };
        if let Some(v) = self.sft_steps {
            c.sft.steps = v;
        }
        if let Some(v) = self.steps {
            c.grpo.steps = v;
        }
        if let Some(v) = self.tasks_per_step {
            c.grpo.tasks_per_step = v;
        }
        if let Some(v) = self.group_size {
            c.grpo.group_size = v;
        }
        if let Some(v) = self.lr {
            c.grpo.lr = v;
        }
        if let Some(v) = self.kl_beta {
            c.grpo.kl_beta = v;
        }
        if let Some(v) = self.temperature {
            c.grpo.temperature = v;
        }
        if let Some(v) = self.oversample {
            c.grpo.oversample = v;
        }
        if let Some(v) = self.minibatches {
            c.grpo.minibatches = v;
        }
        if let Some(v) = self.clip {
            c.grpo.clip = v;
        }
        if self.clip_high.is_some() {
            c.grpo.clip_high = self.clip_high;
        }
        if let Some(v) = self.solve_bonus {
            c.grpo.solve_bonus = v;
        }
        if let Some(v) = self.eval_tasks {
            c.eval.tasks_per_level = v;
        }
        if let Some(v) = self.sft_mix {
            c.sft_level_mix = v;
        }
        if let Some(v) = self.grpo_mix {
            c.grpo_level_mix = v;
        }
        if let Some(v) = self.eval_every {
            c.eval.every = v;
        }
        c
    }

    fn options(&self) -> RunOptions {
        RunOptions {
            runs_dir: self.out.clone(),
            name: self.name.clone(),
            resume: self.resume.clone(),
            progress: !self.no_progress,
            stop_after: None,
            warm_start: self.warm_start.clone(),
        }
    }
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
    /// Run one kernel on the simulator with profiling on and print what it did (warp
    /// instructions by class, memory requests, sectors, bank conflicts, barriers, cp.async
    /// depth) with occupancy and a roofline MODEL for A100 and H100 SXM, as a table and JSON.
    /// Needs NVRTC (and ptxas for the occupancy's registers); the counts are of the simulated
    /// run, the times a model, never a measurement.
    Profile {
        /// The kernel: gemm, softmax, logsumexp or axpy.
        name: String,
        /// Comma-separated sizes: gemm M,N,K; softmax and logsumexp ROWS,COLS; axpy N.
        #[arg(long, value_delimiter = ',')]
        shape: Vec<usize>,
        /// Print only the JSON.
        #[arg(long)]
        json: bool,
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
        Command::Kernels { action: Some(KernelsAction::Profile { name, shape, json }) } => {
            profile_kernel(&name, &shape, json)
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
        Command::Train(args) => {
            let summary = train(args.config(), &args.options())?;
            print_summary(&summary);
            Ok(())
        }
        Command::Experiment { which: ExperimentKind::RewardShaping(args) } => {
            let result = experiment::reward_shaping(args.config(), &args.options())?;
            println!("experiment: {}", result.dir.display());
            print_summary(&result.partial);
            print_summary(&result.sparse);
            Ok(())
        }
    }
}

fn print_summary(s: &RunSummary) {
    println!("run: {}", s.dir.display());
    println!(
        "held-out pass@1: warm-up {:.1}% -> after GRPO {:.1}% ({:+.1} points); pass@{}: {} -> {}",
        100.0 * s.before.pass_at_1,
        100.0 * s.after.pass_at_1,
        100.0 * (s.after.pass_at_1 - s.before.pass_at_1),
        s.after.k,
        s.before.pass_at_k.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
        s.after.pass_at_k.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
    );
    println!(
        "rollout {:.0} tokens/s, training {:.0} tokens/s; GRPO step {:.2} s rollout / {:.3} s reward / {:.2} s train; {:.0} s",
        s.rollout_tokens_per_s, s.train_tokens_per_s, s.step_seconds[0], s.step_seconds[1], s.step_seconds[2], s.wall_s
    );
}

fn list_kernels() -> Result<(), Error> {
    let registry = workspace_registry()?;
    println!("{:<12} {:<16} {:<30} {:<9} entries", "kernel", "crate", "path", "fast_math");
    for k in registry.iter() {
        println!("{:<12} {:<16} {:<30} {:<9} {}", k.name, k.crate_name, k.path, k.fast_math, k.entries.join(", "));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn profile_kernel(name: &str, shape: &[usize], json_only: bool) -> Result<(), Error> {
    let ptxas = match ptxas::find_ptxas() {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("warning: {e}; occupancy without ptxas's register counts");
            None
        }
    };
    let kp = squid_pipeline::kernels::profile_kernel(name, shape, ptxas.as_deref())?;
    if !json_only {
        print!("{}", kp.table());
        println!("\nJSON:");
    }
    println!("{}", kp.json());
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn profile_kernel(_name: &str, _shape: &[usize], _json_only: bool) -> Result<(), Error> {
    Err(Error::Config("`squid kernels profile` needs the simulator: build with --features cuda".into()))
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
