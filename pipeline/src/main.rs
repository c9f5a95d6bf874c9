//! `squid`: the reference RL-for-code pipeline's command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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

/// `text [default: D]`, with `--quick`'s value when it differs: the defaults come from the code.
fn dflt<T: std::fmt::Display>(text: &str, value: impl Fn(&TrainConfig) -> T) -> String {
    let (full, quick) = (value(&TrainConfig::default()).to_string(), value(&TrainConfig::quick()).to_string());
    if full == quick {
        format!("{text} [default: {full}]")
    } else {
        format!("{text} [default: {full}; with --quick: {quick}]")
    }
}

fn mix_text(m: [f64; 3]) -> String {
    format!("{},{},{}", m[0], m[1], m[2])
}

#[derive(clap::Args, Clone, Default)]
struct TrainArgs {
    /// Start from this run configuration (a run's `config.json`), so a run can be repeated;
    /// flags given beside it override its values (and are listed when the run starts).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long, help = dflt("Seed of tasks, initialisation and sampling.", |c| c.seed))]
    seed: Option<u64>,
    /// Where new run directories go [default: runs].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run directory name [default: UTC time stamp and seed].
    #[arg(long)]
    name: Option<String>,
    /// Continue the run in this directory from its newest checkpoint that loads (older ones
    /// are tried when the newest is corrupt). Its config.json holds every setting: flags that
    /// would change it are refused.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Skip the warm-up: start GRPO from this model (a `warmup/model.safetensors` of an
    /// earlier run with the same model shape).
    #[arg(long, value_name = "MODEL")]
    warm_start: Option<PathBuf>,
    #[arg(long, help = dflt("Tensor-parallel ranks (threads).", |c| c.tp))]
    tp: Option<usize>,
    /// Attention of the policy [default: segments].
    #[arg(long, value_enum)]
    attention: Option<AttentionArg>,
    /// Reward of the GRPO phase [default: partial].
    #[arg(long, value_enum)]
    reward: Option<RewardArg>,
    #[arg(long, help = dflt("Warm-up steps.", |c| c.sft.steps))]
    sft_steps: Option<u64>,
    #[arg(long, help = dflt("GRPO steps.", |c| c.grpo.steps))]
    steps: Option<u64>,
    #[arg(long, help = dflt("Tasks per GRPO step.", |c| c.grpo.tasks_per_step))]
    tasks_per_step: Option<usize>,
    #[arg(long, help = dflt("Samples per task.", |c| c.grpo.group_size))]
    group_size: Option<usize>,
    #[arg(long, help = dflt("GRPO learning rate.", |c| c.grpo.lr))]
    lr: Option<f32>,
    #[arg(long, help = dflt("KL coefficient to the warm-up policy (0 = off).", |c| c.grpo.kl_beta))]
    kl_beta: Option<f32>,
    #[arg(long, help = dflt("Sampling temperature of the GRPO rollouts.", |c| c.grpo.temperature))]
    temperature: Option<f32>,
    #[arg(long, help = dflt("Roll out this many times the tasks per step and train on the groups whose rewards differ.", |c| c.grpo.oversample))]
    oversample: Option<usize>,
    #[arg(long, help = dflt("Minibatches (optimizer steps) per GRPO step.", |c| c.grpo.minibatches))]
    minibatches: Option<usize>,
    #[arg(long, help = dflt("PPO clip (lower side, and upper unless --clip-high is given).", |c| c.grpo.clip))]
    clip: Option<f32>,
    #[arg(long, help = dflt("Upper PPO clip (DAPO clip-higher; none = --clip).", |c| c.grpo.clip_high.map_or("none".to_string(), |v| v.to_string())))]
    clip_high: Option<f32>,
    #[arg(long, help = dflt("Reward added to a submission that passes every hidden test (0 = off).", |c| c.grpo.solve_bonus))]
    solve_bonus: Option<f32>,
    /// Old log-probs: reuse the rollouts' (`true`) or recompute them per minibatch (`false`);
    /// unset = reuse where they are bitwise the trainer's (dense/segment attention, --tp 1).
    #[arg(long)]
    reuse_rollout_logprobs: Option<bool>,
    #[arg(long, help = dflt("Held-out tasks per level.", |c| c.eval.tasks_per_level))]
    eval_tasks: Option<usize>,
    #[arg(long, value_parser = parse_mix, help = dflt("Level weights of the warm-up traces, `easy,medium,hard`.", |c| mix_text(c.sft_level_mix)))]
    sft_mix: Option<[f64; 3]>,
    #[arg(long, value_parser = parse_mix, help = dflt("Level weights of the GRPO tasks, `easy,medium,hard`.", |c| mix_text(c.grpo_level_mix)))]
    grpo_mix: Option<[f64; 3]>,
    #[arg(long, help = dflt("Evaluate pass@1 every N GRPO steps.", |c| c.eval.every))]
    eval_every: Option<u64>,
    /// Show only N visible examples per part in prompts; the `<run>` tool still runs them all,
    /// so the rest reach the policy only by running its program [default: all].
    #[arg(long, value_name = "N")]
    shown_examples: Option<usize>,
    /// Prompts name the tasks' constants (thresholds, factors, divisors) by letters; only a
    /// failing `<run>` states their values, so the policy must run to learn them.
    #[arg(long)]
    withhold_constants: bool,
    /// The memory tool (`<store>`, `<recall>`) with this storage policy: never,
    /// every-accepted, fixes-after-failure, policy-decides [default: no memory tool].
    #[arg(long, value_name = "POLICY", value_parser = parse_memory_policy)]
    memory: Option<squid_pipeline::env::MemoryPolicy>,
    /// Bytes a project's memory holds; the lowest-credit, then least recently used, entries
    /// are evicted to fit [default: 1024].
    #[arg(long, value_name = "BYTES")]
    memory_bytes: Option<usize>,
    /// The `<search>` tool over the project's library.
    #[arg(long)]
    search: bool,
    /// The search baseline: the project's whole library after the prompt as cached Documents.
    #[arg(long)]
    library_in_context: bool,
    /// The `<lint>` tool (static diagnostics without running).
    #[arg(long)]
    lint: bool,
    /// Reward added to a submission the linter finds clean [default: 0].
    #[arg(long, value_name = "W")]
    lint_reward: Option<f32>,
    /// Where `<think>` goes: before, after-tool, off [default: as before, unrestricted].
    #[arg(long, value_name = "PLACEMENT", value_parser = parse_think)]
    think: Option<squid_pipeline::rollout::ThinkPlacement>,
    /// Fraction of warm-up traces and GRPO tasks drawn from projects (tasks that reuse an
    /// earlier task's helper); adds a held-out `project` row to every evaluation [default: 0].
    #[arg(long, value_name = "F")]
    projects: Option<f64>,
    /// Every tool of issue 21 on (policy-decided memory, search, lint with reward 0.1, think
    /// after tool output, a third of tasks from projects); other flags override parts.
    #[arg(long)]
    all_tools: bool,
    /// A smoke run (about a minute): easy tasks only, sized so GRPO does update the policy;
    /// checks the whole loop, proves nothing about learning.
    #[arg(long)]
    quick: bool,
    /// No progress bars (without a terminal there are none; plain lines are logged instead).
    #[arg(long)]
    no_progress: bool,
    #[arg(
        long,
        default_value_t = 10,
        help = "Without a terminal (or with --no-progress), log one line per this many steps (and every evaluation)."
    )]
    log_every: u64,
    /// Under `mpirun` (the `mpi` feature): seconds a rank waits for its peers at a collective
    /// before the job fails with an error naming the missing ranks and is aborted. It must
    /// exceed rank 0's longest evaluation, which the others wait through.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    dp_timeout: u64,
}

fn parse_memory_policy(s: &str) -> Result<squid_pipeline::env::MemoryPolicy, String> {
    squid_pipeline::env::MemoryPolicy::parse(s)
        .ok_or_else(|| format!("{s:?}: one of never, every-accepted, fixes-after-failure, policy-decides"))
}

fn parse_think(s: &str) -> Result<squid_pipeline::rollout::ThinkPlacement, String> {
    squid_pipeline::rollout::ThinkPlacement::parse(s).ok_or_else(|| format!("{s:?}: one of before, after-tool, off"))
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
    /// The flags that set a configuration value (what `--resume` refuses and `--config` lets
    /// override).
    fn config_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--config", self.config.is_some()),
            ("--quick", self.quick),
            ("--seed", self.seed.is_some()),
            ("--tp", self.tp.is_some()),
            ("--attention", self.attention.is_some()),
            ("--reward", self.reward.is_some()),
            ("--sft-steps", self.sft_steps.is_some()),
            ("--steps", self.steps.is_some()),
            ("--tasks-per-step", self.tasks_per_step.is_some()),
            ("--group-size", self.group_size.is_some()),
            ("--lr", self.lr.is_some()),
            ("--kl-beta", self.kl_beta.is_some()),
            ("--temperature", self.temperature.is_some()),
            ("--oversample", self.oversample.is_some()),
            ("--minibatches", self.minibatches.is_some()),
            ("--clip", self.clip.is_some()),
            ("--clip-high", self.clip_high.is_some()),
            ("--solve-bonus", self.solve_bonus.is_some()),
            ("--reuse-rollout-logprobs", self.reuse_rollout_logprobs.is_some()),
            ("--eval-tasks", self.eval_tasks.is_some()),
            ("--sft-mix", self.sft_mix.is_some()),
            ("--grpo-mix", self.grpo_mix.is_some()),
            ("--eval-every", self.eval_every.is_some()),
            ("--shown-examples", self.shown_examples.is_some()),
            ("--withhold-constants", self.withhold_constants),
            ("--memory", self.memory.is_some()),
            ("--memory-bytes", self.memory_bytes.is_some()),
            ("--search", self.search),
            ("--library-in-context", self.library_in_context),
            ("--lint", self.lint),
            ("--lint-reward", self.lint_reward.is_some()),
            ("--think", self.think.is_some()),
            ("--projects", self.projects.is_some()),
            ("--all-tools", self.all_tools),
        ];
        given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect()
    }

    /// Checks flags that do not go together: with `--resume` the run's config.json holds every
    /// setting, so a flag that would change one (or name a new run) is refused, not dropped.
    fn check(&self) -> Result<(), Error> {
        if self.resume.is_some() {
            let mut refused = self.config_flags();
            for (flag, given) in [
                ("--out", self.out.is_some()),
                ("--name", self.name.is_some()),
                ("--warm-start", self.warm_start.is_some()),
            ] {
                if given {
                    refused.push(flag);
                }
            }
            if !refused.is_empty() {
                return Err(Error::Config(format!(
                    "--resume continues a run as its config.json says; {} cannot change on resume (to train with other settings, start a new run: --config DIR/config.json plus the flags to change)",
                    refused.join(", ")
                )));
            }
        }
        if self.config.is_some() && self.quick {
            return Err(Error::Config("--config and --quick both give the whole configuration; use one".into()));
        }
        Ok(())
    }

    fn config(&self) -> Result<TrainConfig, Error> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("--config {}: {e}", path.display())))?;
                let c: TrainConfig = serde_json::from_str(&text)
                    .map_err(|e| Error::Config(format!("--config {}: not a squid run config: {e}", path.display())))?;
                let overrides: Vec<&str> = self.config_flags().into_iter().filter(|f| *f != "--config").collect();
                if !overrides.is_empty() {
                    eprintln!(
                        "squid train: configuration from {}, overridden by {}",
                        path.display(),
                        overrides.join(", ")
                    );
                }
                c
            }
            None if self.quick => TrainConfig::quick(),
            None => TrainConfig::default(),
        };
        if let Some(v) = self.seed {
            c.seed = v;
        }
        if let Some(v) = self.tp {
            c.tp = v;
        }
        if let Some(a) = self.attention {
            c.model.attention = match a {
                AttentionArg::Dense => AttentionKind::Dense,
                AttentionArg::Segments => AttentionKind::Segments,
                AttentionArg::Nsa => AttentionKind::Nsa(NsaParams::default()),
            };
        }
        if let Some(r) = self.reward {
            c.grpo.reward = match r {
                RewardArg::Partial => RewardMode::PartialCredit,
                RewardArg::AllOrNothing => RewardMode::AllOrNothing,
            };
        }
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
        if self.reuse_rollout_logprobs.is_some() {
            c.grpo.reuse_rollout_logprobs = self.reuse_rollout_logprobs;
        }
        if self.all_tools {
            c.tools = squid_pipeline::train::ToolsConfig::all_on();
        }
        if self.memory.is_some() {
            c.tools.memory = self.memory;
        }
        if let Some(v) = self.memory_bytes {
            c.tools.memory_bytes = v;
        }
        c.tools.search |= self.search;
        c.tools.library_in_context |= self.library_in_context;
        c.tools.lint |= self.lint;
        if let Some(v) = self.lint_reward {
            c.tools.lint_reward = v;
        }
        if self.think.is_some() {
            c.tools.think = self.think;
        }
        if let Some(v) = self.projects {
            c.tools.projects = v;
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
        if self.shown_examples.is_some() {
            c.shown_examples = self.shown_examples;
        }
        if self.withhold_constants {
            c.withhold_constants = true;
        }
        Ok(c)
    }

    fn options(&self, interrupt: Option<Arc<AtomicBool>>) -> RunOptions {
        let terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        let bars = !self.no_progress && terminal;
        RunOptions {
            runs_dir: self.out.clone().unwrap_or_else(|| PathBuf::from("runs")),
            name: self.name.clone(),
            resume: self.resume.clone(),
            progress: bars,
            stop_after: None,
            warm_start: self.warm_start.clone(),
            interrupt,
            log_every: (!bars).then_some(self.log_every.max(1)),
        }
    }
}

/// A flag that Ctrl-C (SIGINT) sets; the trainer stops at the next step boundary. A second
/// Ctrl-C exits at once (130).
fn interrupt_flag() -> Option<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    {
        use signal_hook::consts::SIGINT;
        // Registered first, so it sees the flag as the previous Ctrl-C left it.
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&flag)).ok()?;
        signal_hook::flag::register(SIGINT, Arc::clone(&flag)).ok()?;
    }
    Some(flag)
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
        /// The kernel: gemm, softmax, logsumexp, axpy, flash_fwd, flash_bwd_dq, flash_bwd_dkdv,
        /// segments_fwd, decode_split, decode_combine, decode_paged, rope_fwd, rope_bwd or
        /// rope_reposition.
        name: String,
        /// Comma-separated sizes: gemm M,N,K; softmax and logsumexp ROWS,COLS; axpy N; flash_*
        /// T,HEADS,D; segments_fwd DOCS,DOC_LEN,TAIL,D; decode_* BATCH,KEYS,GROUP,D; rope_*
        /// TOKENS,HEADS,D.
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
        Err(e @ Error::Interrupted { .. }) => {
            eprintln!("squid: {e}");
            ExitCode::from(130)
        }
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
            args.check()?;
            #[cfg(feature = "mpi")]
            if mpi_run::launched() {
                return mpi_run::train(&args);
            }
            let summary = train(args.config()?, &args.options(interrupt_flag()))?;
            print_summary(&summary);
            Ok(())
        }
        Command::Experiment { which: ExperimentKind::RewardShaping(args) } => {
            args.check()?;
            let result = experiment::reward_shaping(args.config()?, &args.options(interrupt_flag()))?;
            println!("experiment: {}", result.dir.display());
            print_summary(&result.partial);
            print_summary(&result.sparse);
            Ok(())
        }
    }
}

/// `mpirun -np N squid train ...`: data parallelism over the MPI processes.
#[cfg(feature = "mpi")]
mod mpi_run {
    use std::time::Duration;

    use mpi::topology::Communicator as _;
    use squid_collectives::mpi::{MpiComm, MpiOptions};
    use squid_collectives::Communicator as _;
    use squid_pipeline::train::{train_data_parallel, CommGroup};
    use squid_pipeline::Error;

    use super::{interrupt_flag, print_summary, TrainArgs};

    /// Whether an MPI launcher started this process (Open MPI's `mpirun`, or a PMI/PMIx one
    /// such as MPICH's or Slurm's).
    pub fn launched() -> bool {
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some())
    }

    /// Runs this rank's part of the run. A rank that fails aborts the MPI job at once (every
    /// other rank is killed by the launcher instead of waiting out the deadline); rank 0 alone
    /// prints the summary.
    pub fn train(args: &TrainArgs) -> Result<(), Error> {
        let options = MpiOptions { timeout: Duration::from_secs(args.dp_timeout.max(1)), ..MpiOptions::default() };
        let comm = MpiComm::init(options)?;
        let (rank, world) = (comm.rank(), comm.world_size());
        let config = args.config()?;
        let opts = args.options(interrupt_flag());
        let group = CommGroup(comm);
        match train_data_parallel(config, &opts, &group) {
            Ok(summary) => {
                if rank == 0 {
                    print_summary(&summary);
                }
                Ok(())
            }
            Err(e) if world > 1 && !matches!(e, Error::Interrupted { .. }) => {
                eprintln!("squid: rank {rank} of {world}: {e}");
                eprintln!("squid: aborting the MPI job (resume it from its last checkpoint with --resume)");
                match group.0.universe() {
                    Some(universe) => universe.world().abort(1),
                    None => std::process::exit(1),
                }
            }
            Err(e) => Err(e),
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
    println!(
        "GRPO update: {} optimizer steps ({} of {} steps without an informative group), largest grad norm {:.4}, weights moved {:.3e} (relative)",
        s.grpo_optimizer_steps, s.grpo_steps_without_update, s.grpo_steps, s.grpo_max_grad_norm, s.grpo_weight_change
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

#[cfg(test)]
mod tests {
    use super::*;

    fn train_args(args: &[&str]) -> TrainArgs {
        let argv = ["squid", "train"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Train(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn resume_refuses_flags_it_would_otherwise_drop() {
        let a = train_args(&["--resume", "runs/x", "--steps", "5", "--tp", "2"]);
        match a.check() {
            Err(Error::Config(m)) => {
                assert!(m.contains("--tp, --steps") && m.contains("cannot change on resume"), "{m}")
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        train_args(&["--resume", "runs/x", "--no-progress", "--log-every", "5"]).check().unwrap();
        assert!(train_args(&["--resume", "runs/x", "--name", "y"]).check().is_err());
        assert!(train_args(&["--config", "c.json", "--quick"]).check().is_err());
    }

    #[test]
    fn a_config_file_repeats_a_run_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = TrainConfig::quick();
        c.seed = 7;
        c.grpo.lr = 1e-4;
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
        let p = path.to_str().unwrap();
        assert_eq!(train_args(&["--config", p]).config().unwrap(), c);
        let changed = train_args(&["--config", p, "--steps", "9"]).config().unwrap();
        assert_eq!(changed.grpo.steps, 9);
        assert_eq!((changed.seed, changed.grpo.lr), (7, 1e-4));
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(
            matches!(train_args(&["--config", p]).config(), Err(Error::Config(m)) if m.contains("not a squid run config"))
        );
        // Without --config: the defaults, or --quick's.
        assert_eq!(train_args(&[]).config().unwrap(), TrainConfig::default());
        assert_eq!(train_args(&["--quick"]).config().unwrap(), TrainConfig::quick());
    }

    #[test]
    fn help_shows_the_defaults_of_both_configurations() {
        let help = dflt("GRPO steps.", |c| c.grpo.steps);
        assert_eq!(
            help,
            format!(
                "GRPO steps. [default: {}; with --quick: {}]",
                TrainConfig::default().grpo.steps,
                TrainConfig::quick().grpo.steps
            )
        );
        assert_eq!(dflt("lr", |c| c.grpo.lr), format!("lr [default: {}]", TrainConfig::default().grpo.lr));
    }

    #[test]
    fn tool_flags_set_the_tools_config_and_resume_refuses_them() {
        use squid_pipeline::env::MemoryPolicy;
        use squid_pipeline::rollout::ThinkPlacement;
        let c =
            train_args(&["--quick", "--memory", "fixes-after-failure", "--search", "--lint", "--lint-reward", "0.2"])
                .config()
                .unwrap();
        assert_eq!(c.tools.memory, Some(MemoryPolicy::FixesAfterFailure));
        assert!(c.tools.search && c.tools.lint && !c.tools.library_in_context);
        assert_eq!(c.tools.lint_reward, 0.2);
        let all = train_args(&["--all-tools", "--think", "off", "--projects", "0.5"]).config().unwrap();
        assert_eq!(all.tools.memory, Some(MemoryPolicy::PolicyDecides));
        assert_eq!((all.tools.think, all.tools.projects), (Some(ThinkPlacement::Off), 0.5));
        assert!(train_args(&["--projects", "1.5"]).config().unwrap().validate().is_err());
        assert!(train_args(&["--resume", "runs/x", "--search"]).check().is_err());
        let argv = ["squid", "train", "--memory", "sometimes"];
        assert!(Cli::try_parse_from(argv).is_err(), "an unknown policy is refused by the parser");
    }
}
