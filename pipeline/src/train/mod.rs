//! `squid train`: supervised warm-up, then GRPO with multi-step tool calls, with held-out
//! evaluation before, during and after, all written to `runs/<timestamp>/`.
//!
//! One GRPO step, end to end:
//! 1. draw B x oversample training tasks; roll each out G times from one prefilled, forked
//!    prompt ([`crate::rollout`]): the policy writes a program, may `<run>` it on the visible
//!    examples, reads the tool output (a Document segment), revises, `<submit>`s;
//! 2. score each submission on the hidden tests (partial credit or all-or-nothing, plus
//!    `solve_bonus` when every test of every part passes);
//! 3. keep the first B groups whose rewards differ (DAPO's dynamic sampling: a group of equal
//!    rewards has zero advantage), advantages within each group (GRPO, verl's estimator),
//!    broadcast to the sampled tokens (prompt and tool-output tokens are masked out of the loss);
//! 4. log-probs of the sampling policy (and of the warm-up policy for the KL term) in one forward;
//! 5. the clipped policy loss over each minibatch, backward, AdamW.
//!
//! Run layout: `config.json`, `tokenizer.json`, `metrics.jsonl`, `curves.png`,
//! `checkpoints/{warmup, sft-NNNNNN, step-NNNNNN}/`, `summary.json`, `report.md`.

mod batch;
pub mod checkpoint;
mod clock;
pub mod config;
pub mod dp;
mod eval;
pub mod experiment;
mod losses;
pub mod metrics;
pub mod passk;
pub mod plot;
mod report;
pub mod tools;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use squid_optim::advantage::{
    broadcast_to_tokens, filter_zero_variance_groups, sample_advantages, AdvantageConfig, Estimator, Groups,
};
use squid_optim::policy_loss::{KlEstimator, KlPenalty, PolicyLossConfig};
use squid_optim::{AdamWConfig, LrSchedule};

pub use crate::fsutil::{ensure_writable_dir, write_atomic};
pub use batch::{pack, TrainingBatch};
pub use checkpoint::{
    checkpoints, latest_checkpoint, remove_stale_temps, CheckpointState, Checkpoints, CHECKPOINT_FORMAT,
};
pub use clock::now_stamp;
pub use config::{EpisodeLimits, EvalConfig, GrpoConfig, SftConfig, ThinkPlacement, ToolsConfig, TrainConfig};
pub use dp::{CommGroup, DataParallel, SingleProcess};
pub use eval::{evaluate, held_out_tasks, splitmix};
pub use metrics::{EvalMetrics, LevelEval, MetricsLog, StepMetrics};

use crate::env::{generate_task, EpisodeConfig, Level, Reward, RewardConfig, Task};
use crate::model::{Model, SessionConfig, TpTrainer};
use crate::rollout::{RolloutConfig, Trajectory};
use crate::tokenizer::Tokenizer;
use crate::traces::sft_trace;
use crate::Error;

/// Where and how a run writes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Parent of new run directories (`runs/`).
    pub runs_dir: PathBuf,
    /// Name of the new run directory (default: the UTC time stamp).
    pub name: Option<String>,
    /// Continue the run in this directory from its newest checkpoint.
    pub resume: Option<PathBuf>,
    /// Draw progress bars.
    pub progress: bool,
    /// Stop after this many GRPO steps of this invocation (tests of resume; `None` = run to the end).
    pub stop_after: Option<u64>,
    /// Start GRPO from this warm-up model instead of training one (experiments sharing a warm-up).
    pub warm_start: Option<PathBuf>,
    /// Set (by a Ctrl-C handler) to stop the run at the next step boundary, after its
    /// checkpoint: [`train`] then returns [`Error::Interrupted`].
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Print one plain line per this many steps and per evaluation to stdout (for logs without a
    /// terminal, where progress bars draw nothing); `None` = no such lines.
    pub log_every: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            runs_dir: PathBuf::from("runs"),
            name: None,
            resume: None,
            progress: true,
            stop_after: None,
            warm_start: None,
            interrupt: None,
            log_every: None,
        }
    }
}

/// Messages of a run to its user (printed to stderr as they happen, and kept for the summary;
/// a data-parallel rank other than 0 keeps them without printing).
#[derive(Debug, Default)]
struct Notes(Vec<String>, bool);

impl Notes {
    fn say(&mut self, msg: String) {
        if !self.1 {
            eprintln!("squid train: {msg}");
        }
        self.0.push(msg);
    }
}

/// An exclusive lock on a run directory (`.squid-train.lock`, an flock released when dropped or
/// when the process dies): two processes never train into one directory at once.
#[derive(Debug)]
struct RunLock {
    file: File,
}

impl RunLock {
    fn acquire(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(".squid-train.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| crate::fsutil::io_error(&path, e))?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => Ok(Self { file }),
            Err(fs4::TryLockError::WouldBlock) => Err(Error::RunLocked { dir: dir.to_path_buf() }),
            Err(fs4::TryLockError::Error(e)) => Err(crate::fsutil::io_error(&path, e)),
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = fs4::FileExt::unlock(&self.file);
    }
}

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run directory.
    pub dir: PathBuf,
    /// Seed.
    pub seed: u64,
    /// Model parameters.
    pub params: usize,
    /// Held-out evaluation of the warm-up policy.
    pub before: EvalMetrics,
    /// Held-out evaluation after GRPO.
    pub after: EvalMetrics,
    /// GRPO steps done.
    pub grpo_steps: u64,
    /// Mean seconds per GRPO step in rollout / reward / train.
    pub step_seconds: [f64; 3],
    /// Mean rollout tokens per second over GRPO.
    pub rollout_tokens_per_s: f64,
    /// Mean training tokens per second over GRPO.
    pub train_tokens_per_s: f64,
    /// Mean training tokens per second in the warm-up.
    pub sft_tokens_per_s: f64,
    /// Wall seconds of this invocation.
    pub wall_s: f64,
    /// Whether the run reached its last GRPO step (false when stopped early by `stop_after`).
    pub complete: bool,
    /// Optimizer steps GRPO took (minibatches trained; a step without an informative group
    /// takes none).
    #[serde(default)]
    pub grpo_optimizer_steps: u64,
    /// Largest gradient norm (before clipping) over the GRPO optimizer steps; 0 without any.
    #[serde(default)]
    pub grpo_max_grad_norm: f64,
    /// How far GRPO moved the weights: `|w_after - w_warmup| / |w_warmup|` over all parameters.
    #[serde(default)]
    pub grpo_weight_change: f64,
    /// GRPO steps in which no group was informative (every sample of every group scored alike).
    #[serde(default)]
    pub grpo_steps_without_update: u64,
    /// What this invocation told its user (fallbacks, holes in the metrics, warnings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

fn progress_bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:32}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// A training task for (`seed`, `phase` 1 = warm-up / 2 = GRPO, `step`, `i`): level drawn by the
/// phase's mix, seed with the top bit clear (held-out tasks have it set).
fn training_task(config: &TrainConfig, phase: u64, step: u64, i: u64) -> Task {
    let h = splitmix(config.seed ^ splitmix(phase ^ splitmix(step ^ splitmix(i))));
    if let Some(task) = tools::training_project_task(config, h) {
        return shown(config, task);
    }
    let mix = if phase == 1 { config.sft_level_mix } else { config.grpo_level_mix };
    let total: f64 = mix.iter().sum();
    let u = (h >> 11) as f64 / (1u64 << 53) as f64 * total;
    let mut acc = 0.0;
    let mut level = Level::Hard;
    for (l, w) in Level::ALL.iter().zip(mix) {
        acc += w;
        if u < acc {
            level = *l;
            break;
        }
    }
    shown(config, generate_task(level, splitmix(h) >> 1))
}

/// `task` as this run's prompts show it ([`TrainConfig::prompted`]).
fn shown(config: &TrainConfig, task: Task) -> Task {
    config.prompted(task)
}

fn episode_config(config: &TrainConfig) -> EpisodeConfig {
    EpisodeConfig {
        reward: RewardConfig { mode: config.grpo.reward, ..RewardConfig::default() },
        max_tool_calls: config.limits.max_turns,
        tools: config.tools.switches(),
    }
}

fn adamw(max_grad_norm: f32) -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.0,
        amsgrad: false,
        max_grad_norm: Some(max_grad_norm),
    }
}

/// The run directory, its config and where to start.
struct Prepared {
    dir: PathBuf,
    config: TrainConfig,
    resume_from: Option<(PathBuf, CheckpointState)>,
    /// Held for the whole run.
    _lock: Option<RunLock>,
    /// The stored summary of a run that had already finished.
    finished: Option<RunSummary>,
}

/// Whether the checkpoint at `path` can be resumed from: its model loads (checksums checked)
/// and, for a warm-up or GRPO step, its optimizer state loads too.
fn verify_checkpoint(path: &Path, state: &CheckpointState, config: &TrainConfig) -> Result<(), Error> {
    if state.config_fingerprint != config.fingerprint() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "written by a run with another configuration".into(),
        });
    }
    let model = Model::load(path.join("model.safetensors"))?;
    if state.phase != "warmup" {
        TpTrainer::new(&model, config.tp, adamw(config.grpo.max_grad_norm))?.load_optimizer(path)?;
    }
    Ok(())
}

/// The newest checkpoint under `root` that loads, saying which newer ones were skipped and why.
fn resume_point(
    root: &Path,
    config: &TrainConfig,
    notes: &mut Notes,
) -> Result<Option<(PathBuf, CheckpointState)>, Error> {
    let all = checkpoints(root)?;
    for (path, reason) in &all.unreadable {
        notes.say(format!("skipping checkpoint {}: {reason}", path.display()));
    }
    let mut failed: Option<Error> = None;
    for (path, state) in all.found {
        match verify_checkpoint(&path, &state, config) {
            Ok(()) => {
                if failed.is_some() {
                    notes.say(format!("resuming from the older checkpoint {}", path.display()));
                }
                return Ok(Some((path, state)));
            }
            // Another run's checkpoint is not a corruption to step over.
            Err(e @ Error::Checkpoint { .. }) if state.config_fingerprint != config.fingerprint() => return Err(e),
            Err(e) => {
                notes.say(format!("checkpoint {} cannot be used ({e}); trying the previous one", path.display()));
                failed = Some(e);
            }
        }
    }
    match failed {
        // Every checkpoint is corrupt: starting over silently would throw the run away.
        Some(e) => Err(e),
        None => Ok(None),
    }
}

fn prepare(config: TrainConfig, opts: &RunOptions, notes: &mut Notes) -> Result<Prepared, Error> {
    if let Some(dir) = &opts.resume {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            reason: format!("cannot read the run config: {e}"),
        })?;
        let config: TrainConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint { path: path.clone(), reason: format!("not a squid run config: {e}") })?;
        config.validate()?;
        ensure_writable_dir(dir)?;
        let lock = RunLock::acquire(dir)?;
        notes.say(format!("run directory: {} (resumed)", dir.display()));
        let ckpt_root = dir.join("checkpoints");
        for gone in remove_stale_temps(&ckpt_root)?.into_iter().chain(remove_stale_temps(dir)?) {
            notes.say(format!("removed {}, left by a killed save", gone.display()));
        }
        let resume_from = resume_point(&ckpt_root, &config, notes)?;
        let finished = match &resume_from {
            Some((_, s)) if s.phase == "grpo" && s.step == config.grpo.steps => std::fs::read(dir.join("summary.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<RunSummary>(&bytes).ok())
                .filter(|summary| summary.complete && summary.grpo_steps == config.grpo.steps),
            _ => None,
        };
        return Ok(Prepared { dir: dir.clone(), config, resume_from, _lock: Some(lock), finished });
    }
    config.validate()?;
    let name = opts.name.clone().unwrap_or_else(|| format!("{}-seed{}", now_stamp(), config.seed));
    let dir = opts.runs_dir.join(name);
    ensure_writable_dir(&dir)?;
    let lock = RunLock::acquire(&dir)?;
    if dir.join("config.json").exists() {
        return Err(Error::Config(format!("{} already holds a run (use --resume to continue it)", dir.display())));
    }
    notes.say(format!("run directory: {}", dir.display()));
    let json = serde_json::to_vec_pretty(&config).expect("config serializes");
    write_atomic(&dir.join("config.json"), &json)?;
    Ok(Prepared { dir, config, resume_from: None, _lock: Some(lock), finished: None })
}

/// Stops the run when `opts.interrupt` is set (checked between steps, after each checkpoint).
/// With data parallelism, any rank's interrupt stops every rank at the same step.
fn check_interrupt(opts: &RunOptions, dir: &Path, phase: &str, step: u64, dp: &dyn DataParallel) -> Result<(), Error> {
    let mut set = [i64::from(opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)))];
    dp.max_i64(&mut set)?;
    if set[0] > 0 {
        return Err(Error::Interrupted { phase: phase.into(), step, dir: dir.to_path_buf() });
    }
    Ok(())
}

/// `|a - b| / |b|` over all parameters (0 when `b` is all zeros and `a` equals it).
fn relative_change(after: &Model, before: &Model) -> f64 {
    let (mut diff, mut base) = (0.0f64, 0.0f64);
    for (a, b) in after.params().iter().zip(before.params()) {
        for (&x, &y) in a.iter().zip(b) {
            diff += f64::from(x - y).powi(2);
            base += f64::from(y).powi(2);
        }
    }
    if base > 0.0 {
        (diff / base).sqrt()
    } else {
        diff.sqrt()
    }
}

/// One plain log line of a step (for logs without a terminal).
fn log_line(m: &StepMetrics, total: u64) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    match m.phase.as_str() {
        "sft" => format!("warm-up step {}/{total}: loss {} grad norm {}", m.step, f(m.loss), f(m.grad_norm)),
        "eval" => {
            let e = m.eval.as_ref();
            let levels: Vec<String> = e
                .map(|e| e.per_level.iter().map(|l| format!("{} {:.1}%", l.level, 100.0 * l.pass_at_1)).collect())
                .unwrap_or_default();
            format!(
                "eval after GRPO step {}: pass@1 {:.1}% ({})",
                m.step,
                100.0 * e.map_or(0.0, |e| e.pass_at_1),
                levels.join(", ")
            )
        }
        _ => format!(
            "GRPO step {}/{total}: reward {} pass {} informative groups {} loss {} grad norm {} tool calls/episode {}",
            m.step,
            f(m.reward_mean),
            f(m.pass_rate),
            f(m.informative_groups),
            f(m.loss),
            f(m.grad_norm),
            f(m.tool_calls_per_episode)
        ),
    }
}

/// Prints `m`'s log line when plain lines are asked for and the step is due (evals always).
fn maybe_log(opts: &RunOptions, m: &StepMetrics, total: u64) {
    if let Some(n) = opts.log_every {
        if m.phase == "eval" || m.step % n.max(1) == 0 || m.step == total {
            println!("{}", log_line(m, total));
        }
    }
}

/// Runs (or resumes) a whole training run. Says where it writes first; a resumed run that had
/// already finished returns its stored summary (with a note saying so).
pub fn train(config: TrainConfig, opts: &RunOptions) -> Result<RunSummary, Error> {
    train_data_parallel(config, opts, &SingleProcess)
}

/// What rank 0 tells the other ranks after preparing the run: whether it succeeded, whether the
/// run had already finished, and the checkpoint to resume from (phase code, step; -1 = none).
fn share_start(dp: &dyn DataParallel, lead: Option<&Result<Prepared, Error>>) -> Result<[i64; 4], Error> {
    let mut word = [0i64; 4];
    if let Some(prepared) = lead {
        word = match prepared {
            Err(_) => [0, 0, -1, 0],
            Ok(p) => {
                let (phase, step) = match &p.resume_from {
                    None => (-1, 0),
                    Some((_, s)) => (checkpoint_phase_code(&s.phase), s.step as i64),
                };
                [1, i64::from(p.finished.is_some()), phase, step]
            }
        };
    }
    dp.broadcast_i64(&mut word)?;
    Ok(word)
}

fn checkpoint_phase_code(phase: &str) -> i64 {
    match phase {
        "sft" => 0,
        "warmup" => 1,
        _ => 2,
    }
}

/// The run as a rank other than 0 sees it: the config (the resumed run's, else the given one)
/// and the checkpoint rank 0 chose, read from the same directory (a file system every rank
/// shares). It writes nothing.
fn prepare_follower(config: TrainConfig, opts: &RunOptions, start: [i64; 4]) -> Result<Prepared, Error> {
    let (dir, config) = match &opts.resume {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| crate::fsutil::io_error(&path, e))?;
            let config: TrainConfig = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                reason: format!("not a squid run config: {e}"),
            })?;
            (dir.clone(), config)
        }
        None => (opts.runs_dir.join(opts.name.clone().unwrap_or_default()), config),
    };
    config.validate()?;
    let resume_from = match start[2] {
        -1 => None,
        code => {
            let phase = ["sft", "warmup", "grpo"][usize::try_from(code).unwrap_or(2).min(2)];
            let state = CheckpointState {
                format: CHECKPOINT_FORMAT.into(),
                phase: phase.into(),
                step: start[3] as u64,
                config_fingerprint: config.fingerprint(),
            };
            let path = dir.join("checkpoints").join(checkpoint::checkpoint_name(&state));
            Some((path, state))
        }
    };
    Ok(Prepared { dir, config, resume_from, _lock: None, finished: None })
}

/// Fails on every rank when any rank failed (`ok` false): a rank that stopped alone would leave
/// the others waiting for it until the deadline.
fn all_ok(dp: &dyn DataParallel, ok: bool, what: &str) -> Result<(), Error> {
    let mut failed = [i64::from(!ok)];
    dp.sum_i64(&mut failed)?;
    if failed[0] > 0 && ok {
        return Err(Error::Config(format!("data parallelism: {} rank(s) failed {what}; stopping", failed[0])));
    }
    Ok(())
}

/// [`train`] as one rank of a data-parallel group (see [`dp`]): rank 0 prepares, evaluates and
/// writes the run directory; every rank rolls out and trains on its share of each step. With
/// one rank this is the single-process run.
pub fn train_data_parallel(config: TrainConfig, opts: &RunOptions, dp: &dyn DataParallel) -> Result<RunSummary, Error> {
    let wall = Instant::now();
    let tokenizer = Tokenizer::new();
    let mut config = config;
    config.model.vocab = tokenizer.vocab_size();
    let lead = dp.rank() == 0;
    let mut notes = Notes(Vec::new(), !lead);
    // Only rank 0 draws progress and logs lines.
    let quiet;
    let opts = if lead {
        opts
    } else {
        quiet = RunOptions { progress: false, log_every: None, ..opts.clone() };
        &quiet
    };
    let prepared = if lead {
        let prepared = prepare(config, opts, &mut notes);
        share_start(dp, Some(&prepared))?;
        prepared?
    } else {
        let start = share_start(dp, None)?;
        if start[0] == 0 {
            return Err(Error::Config("data parallelism: rank 0 could not prepare the run; stopping".into()));
        }
        let mut p = prepare_follower(config, opts, start);
        if let Ok(p) = &mut p {
            if start[1] == 1 {
                p.finished = Some(RunSummary {
                    dir: p.dir.clone(),
                    seed: p.config.seed,
                    params: p.config.model.num_params(),
                    before: EvalMetrics::default(),
                    after: EvalMetrics::default(),
                    grpo_steps: p.config.grpo.steps,
                    step_seconds: [0.0; 3],
                    rollout_tokens_per_s: 0.0,
                    train_tokens_per_s: 0.0,
                    sft_tokens_per_s: 0.0,
                    wall_s: 0.0,
                    complete: true,
                    grpo_optimizer_steps: 0,
                    grpo_max_grad_norm: 0.0,
                    grpo_weight_change: 0.0,
                    grpo_steps_without_update: 0,
                    notes: Vec::new(),
                });
            }
        }
        all_ok(dp, p.is_ok(), "to read the run's configuration")?;
        p?
    };
    if lead {
        all_ok(dp, true, "to read the run's configuration")?;
    }
    let Prepared { dir, config, resume_from, _lock, finished } = prepared;
    dp::check_same_config(dp, &config.fingerprint())?;
    if dp.world() > 1 && !config.tools.is_off() {
        // The project memories are updated by every group of a step and the tool metrics are
        // per episode: neither is shared between ranks yet.
        return Err(Error::Config(
            "data parallelism (mpirun) does not support issue 21's tools yet; run them in one process".into(),
        ));
    }
    if let Some(mut summary) = finished {
        notes.say(format!(
            "{} is already complete ({} of {} GRPO steps): nothing to do",
            dir.display(),
            summary.grpo_steps,
            config.grpo.steps
        ));
        summary.notes = notes.0;
        return Ok(summary);
    }
    if config.smoke {
        notes.say("a smoke run (--quick): it checks that every stage runs and that GRPO updates the policy; its pass rates mean nothing".into());
    }
    if config.model.vocab != tokenizer.vocab_size() {
        return Err(Error::Checkpoint {
            path: dir.join("config.json"),
            reason: format!("vocab {} but this tokenizer has {}", config.model.vocab, tokenizer.vocab_size()),
        });
    }
    let tok_path = dir.join("tokenizer.json");
    if !lead {
    } else if tok_path.exists() {
        let saved = std::fs::read_to_string(&tok_path).map_err(|e| crate::fsutil::io_error(&tok_path, e))?;
        if saved != tokenizer.to_json() {
            return Err(Error::Checkpoint { path: tok_path, reason: "the run used another tokenizer".into() });
        }
    } else {
        write_atomic(&tok_path, tokenizer.to_json().as_bytes())?;
    }
    let ckpt_root = dir.join("checkpoints");
    let fingerprint = config.fingerprint();
    let (phase_done, step_done) = match &resume_from {
        None => ("none".to_string(), 0),
        Some((_, s)) => (s.phase.clone(), s.step),
    };
    let mut metrics = if lead {
        MetricsLog::open(&dir.join("metrics.jsonl"), |m| match phase_done.as_str() {
            "none" => false,
            "sft" => m.phase == "sft" && m.step <= step_done,
            "warmup" => m.phase == "sft" || (m.phase == "eval" && m.step == 0),
            _ => m.phase != "grpo" && m.phase != "eval" || m.step <= step_done,
        })?
    } else {
        MetricsLog::in_memory()
    };
    // A file cut or edited by hand: the steps are not re-run, so say which are missing.
    let has_sft = metrics.lines().iter().any(|m| m.phase == "sft");
    let holes = match phase_done.as_str() {
        "sft" => vec![("warm-up", metrics.missing_steps("sft", step_done))],
        "grpo" => vec![
            ("warm-up", if has_sft { metrics.missing_steps("sft", config.sft.steps) } else { Vec::new() }),
            ("GRPO", metrics.missing_steps("grpo", step_done)),
        ],
        _ => Vec::new(),
    };
    for (phase, missing) in holes.into_iter().filter(|(_, m)| lead && !m.is_empty()) {
        notes.say(format!(
            "metrics.jsonl has no line for {phase} steps {} (cut or edited by hand?): they are not re-run, so the curves and means skip them",
            metrics::format_ranges(&missing)
        ));
    }

    // ---- warm-up -------------------------------------------------------------------------
    let warmup_model = match (&resume_from, &opts.warm_start) {
        (Some((_, s)), _) if s.phase != "sft" => Model::load(ckpt_root.join("warmup").join("model.safetensors"))?,
        (_, Some(warm)) if resume_from.is_none() => {
            let m = Model::load(warm)?;
            if m.config() != &config.model {
                return Err(Error::Checkpoint {
                    path: warm.clone(),
                    reason: format!("a model of another shape ({:?}) than this run's ({:?})", m.config(), config.model),
                });
            }
            if lead {
                save_model_checkpoint(&ckpt_root, "warmup", 0, &fingerprint, &m, None)?;
            }
            m
        }
        _ => {
            let start = match &resume_from {
                Some((path, s)) if s.phase == "sft" => Some((path.clone(), s.step)),
                _ => None,
            };
            let m = run_sft(&config, &tokenizer, &ckpt_root, &fingerprint, start, &mut metrics, opts, &dir, dp)?;
            if lead {
                save_model_checkpoint(&ckpt_root, "warmup", 0, &fingerprint, &m, None)?;
                checkpoint::prune_phase(&ckpt_root, "sft", 0)?;
            }
            m
        }
    };
    let held_out: Vec<Task> =
        held_out_tasks(config.seed, config.eval.tasks_per_level).into_iter().map(|t| shown(&config, t)).collect();
    let episode = episode_config(&config);
    let before = match metrics.lines().iter().find(|m| m.phase == "eval" && m.step == 0).and_then(|m| m.eval.clone()) {
        Some(e) => e,
        None if !lead => EvalMetrics::default(),
        None => {
            let e = evaluate(&warmup_model, &tokenizer, &held_out, &config, true)?;
            let m = StepMetrics { phase: "eval".into(), step: 0, eval: Some(e.clone()), ..Default::default() };
            maybe_log(opts, &m, config.grpo.steps);
            metrics.push(m)?;
            e
        }
    };
    check_interrupt(opts, &dir, "warm-up", config.sft.steps, dp)?;

    // ---- GRPO ----------------------------------------------------------------------------
    let (start_model, first_step) = match &resume_from {
        Some((path, s)) if s.phase == "grpo" => (Model::load(path.join("model.safetensors"))?, s.step + 1),
        _ => (warmup_model.clone(), 1),
    };
    let mut trainer = TpTrainer::new(&start_model, config.tp, adamw(config.grpo.max_grad_norm))?;
    if let Some((path, s)) = &resume_from {
        if s.phase == "grpo" {
            trainer.load_optimizer(path)?;
        }
    }
    let reference = (config.grpo.kl_beta > 0.0).then_some(&warmup_model);
    let bar = progress_bar(opts.progress, config.grpo.steps, "grpo");
    bar.set_position(first_step - 1);
    let mut last = first_step - 1;
    // The projects' memories: from the checkpoint resumed from, else empty.
    let mut memories = match &resume_from {
        Some((path, s)) if s.phase == "grpo" => tools::load_memories(path)?,
        _ => tools::ProjectMemories::default(),
    };
    for step in first_step..=config.grpo.steps {
        if opts.stop_after.is_some_and(|n| step - first_step >= n) {
            break;
        }
        let m = grpo_step(&config, &tokenizer, &mut trainer, reference, episode, step, &mut memories, dp)?;
        bar.set_message(format!("reward {:.3}", m.reward_mean.unwrap_or(0.0)));
        if m.informative_groups == Some(0.0) {
            bar.suspend(|| {
                notes.say(format!(
                    "GRPO step {step}: no informative group (every sample of every group scored alike), so no update"
                ))
            });
        }
        maybe_log(opts, &m, config.grpo.steps);
        metrics.push(m)?;
        let model = trainer.gather()?;
        if lead && step % config.eval.every == 0 && step != config.grpo.steps {
            let e = evaluate(&model, &tokenizer, &held_out, &config, false)?;
            let m = StepMetrics { phase: "eval".into(), step, eval: Some(e), ..Default::default() };
            maybe_log(opts, &m, config.grpo.steps);
            metrics.push(m)?;
        }
        let with_memories = config.tools.memory.is_some().then_some(&memories);
        if lead {
            save_checkpoint_with(&ckpt_root, "grpo", step, &fingerprint, &model, Some(&trainer), with_memories)?;
            checkpoint::prune(&ckpt_root, 2)?;
        }
        bar.inc(1);
        last = step;
        if step != config.grpo.steps {
            check_interrupt(opts, &dir, "GRPO", step, dp)?;
        }
    }
    bar.finish_and_clear();
    let complete = last == config.grpo.steps;
    let final_model = trainer.gather()?;
    let after = match metrics.lines().iter().find(|m| m.phase == "eval" && m.step == config.grpo.steps && complete) {
        Some(m) if m.eval.as_ref().is_some_and(|e| e.pass_at_k.is_some()) => m.eval.clone().expect("checked"),
        _ if !lead => EvalMetrics::default(),
        _ => {
            let e = evaluate(&final_model, &tokenizer, &held_out, &config, true)?;
            let m = StepMetrics { phase: "eval".into(), step: last, eval: Some(e.clone()), ..Default::default() };
            maybe_log(opts, &m, config.grpo.steps);
            metrics.push(m)?;
            e
        }
    };
    let mut summary =
        report::summarize(&dir, &config, &metrics, before, after, last, complete, wall.elapsed().as_secs_f64());
    summary.grpo_weight_change = relative_change(&final_model, &warmup_model);
    if dp.world() > 1 {
        notes.say(format!(
            "data parallel over {} ranks (rank {}); rank 0 evaluates and writes the run",
            dp.world(),
            dp.rank()
        ));
    }
    summary.notes = notes.0;
    let written = if lead { report::write_all(&dir, &config, &metrics, &summary) } else { Ok(()) };
    // Every rank leaves together: rank 0's last evaluation and report come before the others'
    // exit (an MPI rank that finalises early would wait on it past the deadline).
    all_ok(dp, written.is_ok(), "to write the report")?;
    written?;
    Ok(summary)
}

fn save_model_checkpoint(
    root: &Path,
    phase: &str,
    step: u64,
    fingerprint: &str,
    model: &Model,
    trainer: Option<&TpTrainer>,
) -> Result<PathBuf, Error> {
    save_checkpoint_with(root, phase, step, fingerprint, model, trainer, None)
}

/// [`save_model_checkpoint`] plus the projects' memories (in the same atomic directory).
fn save_checkpoint_with(
    root: &Path,
    phase: &str,
    step: u64,
    fingerprint: &str,
    model: &Model,
    trainer: Option<&TpTrainer>,
    memories: Option<&tools::ProjectMemories>,
) -> Result<PathBuf, Error> {
    let state = CheckpointState {
        format: CHECKPOINT_FORMAT.into(),
        phase: phase.into(),
        step,
        config_fingerprint: fingerprint.into(),
    };
    checkpoint::save_checkpoint(root, &state, |dir| {
        model.save(dir.join("model.safetensors"))?;
        if let Some(t) = trainer {
            t.save_optimizer(dir)?;
        }
        if let Some(m) = memories {
            tools::save_memories(dir, m)?;
        }
        Ok(())
    })
}

/// The supervised warm-up; resumes from an `sft` checkpoint when given.
#[allow(clippy::too_many_arguments)]
fn run_sft(
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    ckpt_root: &Path,
    fingerprint: &str,
    start: Option<(PathBuf, u64)>,
    metrics: &mut MetricsLog,
    opts: &RunOptions,
    dir: &Path,
    dp: &dyn DataParallel,
) -> Result<Model, Error> {
    let sft = &config.sft;
    let lead = dp.rank() == 0;
    let (model, first) = match &start {
        Some((path, step)) => (Model::load(path.join("model.safetensors"))?, step + 1),
        None => (Model::init(config.model, config.seed)?, 1),
    };
    let mut trainer = TpTrainer::new(&model, config.tp, adamw(1.0))?;
    if let Some((path, _)) = &start {
        trainer.load_optimizer(path)?;
    }
    let schedule = LrSchedule::cosine(sft.lr, (sft.steps / 10).max(1), sft.steps.max(2), 0.1)?;
    let episode = episode_config(config);
    let vocab = config.model.vocab;
    let bar = progress_bar(opts.progress, sft.steps, "warm-up");
    bar.set_position(first - 1);
    for step in first..=sft.steps {
        let t0 = Instant::now();
        // This rank's share of the step's traces (all of them in one process).
        let mine = dp::share(sft.batch, dp.rank(), dp.world());
        let traces: Vec<Trajectory> = (mine.start as u64..mine.end as u64)
            .map(|i| {
                let task = training_task(config, 1, step, i);
                let draw = (splitmix(config.seed ^ step.wrapping_mul(0x9E37) ^ i) >> 11) as f64 / (1u64 << 53) as f64;
                let repair = draw < sft.repair_fraction;
                if config.tools.is_off() {
                    sft_trace(&task, tokenizer, repair, splitmix(step ^ i), episode)
                } else {
                    let switches = tools::trace_tools(&config.tools);
                    crate::traces::sft_tool_trace(&task, tokenizer, repair, splitmix(step ^ i), episode, &switches)
                }
            })
            .collect::<Result<_, _>>()?;
        let refs: Vec<&Trajectory> = traces.iter().collect();
        let batch = if refs.is_empty() { None } else { Some(pack(&refs)?) };
        // The mean is over the whole step's loss tokens, on every rank.
        let mut counts = batch.as_ref().map_or([0, 0], |b| [b.loss_tokens() as i64, b.len() as i64]);
        dp.sum_i64(&mut counts)?;
        let n = counts[0].max(1) as f32;
        let mut report = trainer.step_data_parallel(
            batch.as_ref().map(|b| &b.batch),
            schedule.lr_at(step - 1),
            |logits| match &batch {
                Some(b) => losses::sft_loss(b, logits, vocab, n),
                None => Err(Error::Shape("warm-up: a loss without a batch".into())),
            },
            dp,
        )?;
        let mut loss = [report.loss];
        dp.sum_f32(&mut loss)?;
        report.loss = loss[0];
        let secs = t0.elapsed().as_secs_f64();
        let m = StepMetrics {
            phase: "sft".into(),
            step,
            loss: Some(f64::from(report.loss)),
            grad_norm: Some(f64::from(report.grad_norm)),
            train_tokens_per_s: Some(counts[1] as f64 / secs),
            train_s: Some(secs),
            ..Default::default()
        };
        maybe_log(opts, &m, sft.steps);
        metrics.push(m)?;
        bar.set_message(format!("loss {:.3}", report.loss));
        if lead {
            let model = trainer.gather()?;
            save_model_checkpoint(ckpt_root, "sft", step, fingerprint, &model, Some(&trainer))?;
            checkpoint::prune_phase(ckpt_root, "sft", 2)?;
        }
        bar.inc(1);
        if step != sft.steps {
            check_interrupt(opts, dir, "warm-up", step, dp)?;
        }
    }
    bar.finish_and_clear();
    trainer.gather()
}

/// Whether a scored submission passed every hidden test of every part (what pass@1 counts).
fn solved(reward: Option<&Reward>) -> bool {
    reward.is_some_and(|r| !r.malformed && r.passed == r.total)
}

/// The reward GRPO trains on: the environment's (partial credit or all-or-nothing; 0 for an
/// episode that never submitted) plus `solve_bonus` for a full solve.
fn training_reward(reward: Option<&Reward>, solve_bonus: f32) -> f32 {
    let base = reward.map_or(0.0, |r| r.value as f32);
    if solved(reward) {
        base + solve_bonus
    } else {
        base
    }
}

/// One GRPO step (see the module docs); returns its metrics line.
#[allow(clippy::too_many_arguments)]
fn grpo_step(
    config: &TrainConfig,
    tokenizer: &Tokenizer,
    trainer: &mut TpTrainer,
    reference: Option<&Model>,
    episode: EpisodeConfig,
    step: u64,
    memories: &mut tools::ProjectMemories,
    dp: &dyn DataParallel,
) -> Result<StepMetrics, Error> {
    let g = &config.grpo;
    let vocab = config.model.vocab;
    // 1. rollouts from the current policy, of this rank's share of the step's tasks
    let t_rollout = Instant::now();
    let rolled_tasks = g.tasks_per_step * g.oversample;
    let mine = dp::share(rolled_tasks, dp.rank(), dp.world());
    let tasks: Vec<Task> = (mine.start as u64..mine.end as u64).map(|i| training_task(config, 2, step, i)).collect();
    let policy = trainer.gather()?;
    let rollout_config = RolloutConfig {
        group_size: g.group_size,
        temperature: g.temperature,
        top_p: g.top_p,
        max_turns: config.limits.max_turns,
        max_new_tokens: config.limits.max_new_tokens,
        max_context: config.limits.max_context,
        seed: splitmix(config.seed ^ 0x5EED ^ step),
    };
    let rolled = if tasks.is_empty() {
        crate::rollout::RolloutBatch::default()
    } else {
        let mut session =
            policy.session(SessionConfig::for_contexts(tasks.len() * g.group_size, config.limits.max_context))?;
        let mut extras = tools::rollout_tools(&config.tools, &tasks, memories, true);
        extras.first_task = mine.start;
        crate::rollout::rollout_with(&mut session, tokenizer, &tasks, episode, &rollout_config, &extras)?
    };
    let rollout_s = t_rollout.elapsed().as_secs_f64() - rolled.stats.reward_seconds;
    // 2. rewards (scored inside the episodes; the time is reported separately)
    let lint_reward = config.tools.lint_reward;
    let my_rewards: Vec<f32> = rolled
        .trajectories
        .iter()
        .map(|t| {
            let bonus = if lint_reward > 0.0 && tools::lint_clean(&tasks[t.task], t) { lint_reward } else { 0.0 };
            training_reward(t.reward.as_ref(), g.solve_bonus) + bonus
        })
        .collect();
    // Every rank sees the whole step's rewards: groups are kept and scored on all of them.
    let rewards = dp::gather_shares(dp, &my_rewards, rolled_tasks, g.group_size)?;
    // The storage policy: what each project group puts into its project's memory.
    let mut stored = 0;
    if let Some(policy) = config.tools.memory {
        for (t, task) in tasks.iter().enumerate() {
            if let Some(place) = task.project {
                let range = t * g.group_size..(t + 1) * g.group_size;
                let group: Vec<&Trajectory> = rolled.trajectories[range.clone()].iter().collect();
                let memory = memories.get(place.seed, config.tools.memory_budget());
                stored += tools::commit_group(policy, memory, task, &group, &my_rewards[range]);
            }
        }
    }
    let tools_on = !config.tools.is_off();
    // Counts over every rank: passes, generated tokens, tool calls, KV bytes held and unshared.
    let stats = &rolled.stats;
    let mut totals = [
        rolled.trajectories.iter().filter(|t| solved(t.reward.as_ref())).count() as i64,
        stats.generated_tokens as i64,
        stats.tool_calls as i64,
        stats.kv.bytes_held as i64,
        stats.kv.bytes_unshared as i64,
    ];
    dp.sum_i64(&mut totals)?;
    let passes = totals[0];
    // 3. dynamic sampling (keep groups whose rewards differ), advantages per group
    let t_train = Instant::now();
    let filter = filter_zero_variance_groups(&rewards, Groups::Size(g.group_size))?;
    let informative = filter.kept_groups.iter().filter(|&&k| k).count();
    let kept: Vec<usize> = (0..rolled_tasks).filter(|&t| filter.kept_groups[t]).take(g.tasks_per_step).collect();
    let kept_rewards: Vec<f32> =
        kept.iter().flat_map(|&t| &rewards[t * g.group_size..(t + 1) * g.group_size]).copied().collect();
    let grpo_advantages = AdvantageConfig::new(Estimator::Grpo(squid_optim::advantage::GrpoConfig::verl()));
    let advantages = sample_advantages(&kept_rewards, Groups::Size(g.group_size), &grpo_advantages)?;
    let mut loss_config = PolicyLossConfig {
        clip_low: g.clip,
        clip_high: g.clip_high.unwrap_or(g.clip),
        kl: reference.map(|_| KlPenalty { estimator: KlEstimator::K3, beta: g.kl_beta, k3_clamp: Some(10.0) }),
        ..PolicyLossConfig::default()
    };
    // 4-5. per minibatch (whole groups): old / reference log-probs, loss, backward, AdamW
    let groups_per_mb = kept.len().div_ceil(g.minibatches).max(1);
    let mut sums = [0.0f64; 6]; // loss, clip frac, entropy, kl, grad norm, tokens
    let mut minibatches = 0.0;
    let reuse = g.reuses_rollout_logprobs(config.model.attention, config.tp);
    let gap = Mutex::new(None::<f32>);
    let record_gap = |x: f32| {
        let mut worst = gap.lock().expect("gap lock");
        *worst = Some(worst.map_or(x, |w| w.max(x)));
    };
    for first_group in (0..kept.len()).step_by(groups_per_mb) {
        let groups = first_group..(first_group + groups_per_mb).min(kept.len());
        // The minibatch's groups this rank rolled out (all of them in one process), with their
        // positions among the kept samples (for the advantages).
        let own: Vec<usize> = groups.clone().filter(|&k| mine.contains(&kept[k])).collect();
        let trajectories: Vec<&Trajectory> = own
            .iter()
            .flat_map(|&k| {
                let t = kept[k] - mine.start;
                &rolled.trajectories[t * g.group_size..(t + 1) * g.group_size]
            })
            .collect();
        let own_advantages: Vec<f32> =
            own.iter().flat_map(|&k| &advantages[k * g.group_size..(k + 1) * g.group_size]).copied().collect();
        let batch = if trajectories.is_empty() { None } else { Some(pack(&trajectories)?) };
        // The whole minibatch's loss tokens and sequences: the loss is normalised by them.
        let mut counts = batch.as_ref().map_or([0; 3], |b| {
            let seqs = b.cu_seqlens().windows(2).filter(|w| b.mask[w[0] as usize..w[1] as usize].contains(&true));
            [b.loss_tokens() as i64, seqs.count() as i64, b.len() as i64]
        });
        dp.sum_i64(&mut counts)?;
        if dp.world() > 1 {
            loss_config.denominators.tokens = Some(counts[0] as f64);
            loss_config.denominators.seqs = Some(counts[1] as f64);
        }
        let first = minibatches == 0.0;
        let prepared = match &batch {
            Some(batch) => {
                let rollout_logp: Vec<f32> =
                    trajectories.iter().flat_map(|t| t.training_example().old_logprobs).collect();
                let old_logp = if reuse {
                    rollout_logp.clone()
                } else {
                    let logp = losses::target_logprobs(batch, policy.forward(&batch.batch)?.logits(), vocab)?.logp;
                    record_gap(losses::max_masked_gap(&logp, &rollout_logp, &batch.mask));
                    logp
                };
                let ref_logp = match reference {
                    Some(r) => Some(losses::target_logprobs(batch, r.forward(&batch.batch)?.logits(), vocab)?.logp),
                    None => None,
                };
                let adv = broadcast_to_tokens(&own_advantages, batch.cu_seqlens(), &batch.mask)?;
                Some((batch, old_logp, ref_logp, adv, rollout_logp))
            }
            None => None,
        };
        let seen = Mutex::new(None);
        let mut report = trainer.step_data_parallel(
            batch.as_ref().map(|b| &b.batch),
            g.lr,
            |logits| {
                let Some((batch, old, ref_logp, adv, rollout_logp)) = &prepared else {
                    return Err(Error::Shape("GRPO: a loss without a batch".into()));
                };
                if first {
                    // The trainer's forward before this step's first update: the weights that sampled.
                    let now = losses::target_logprobs(batch, logits, vocab)?.logp;
                    record_gap(losses::max_masked_gap(&now, rollout_logp, &batch.mask));
                }
                let targets = losses::GrpoTargets { old_logp: old, ref_logp: ref_logp.as_deref(), advantages: adv };
                let (loss, dlogits, out) = losses::grpo_loss(batch, logits, vocab, targets, &loss_config)?;
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(out.metrics);
                Ok((loss, dlogits))
            },
            dp,
        )?;
        // The metrics over the whole minibatch: the loss is the sum of the ranks' parts (each
        // normalised by the whole minibatch), the token means are weighted by loss tokens.
        let m = seen.into_inner().unwrap_or_else(|p| p.into_inner());
        let weight = batch.as_ref().map_or(0.0, |b| b.loss_tokens() as f32) / (counts[0].max(1) as f32);
        let mut parts = [report.loss, 0.0, 0.0, 0.0];
        if let Some(m) = &m {
            let (clip, entropy, kl) =
                (m.clip_frac_low + m.clip_frac_high, m.entropy.unwrap_or(0.0), m.kl.unwrap_or(m.approx_kl));
            if dp.world() > 1 {
                parts[1..].copy_from_slice(&[clip * weight, entropy * weight, kl * weight]);
            } else {
                parts[1..].copy_from_slice(&[clip, entropy, kl]);
            }
        }
        dp.sum_f32(&mut parts)?;
        report.loss = parts[0];
        sums[0] += f64::from(report.loss);
        sums[1] += f64::from(parts[1]);
        sums[2] += f64::from(parts[2]);
        sums[3] += f64::from(parts[3]);
        sums[4] += f64::from(report.grad_norm);
        sums[5] += counts[2] as f64;
        minibatches += 1.0;
    }
    let train_s = t_train.elapsed().as_secs_f64();
    let n = rewards.len() as f64;
    let per_minibatch = |i: usize| (minibatches > 0.0).then(|| sums[i] / minibatches);
    let mean = rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
    let std = (rewards.iter().map(|&r| (f64::from(r) - mean).powi(2)).sum::<f64>() / n).sqrt();
    Ok(StepMetrics {
        phase: "grpo".into(),
        step,
        loss: per_minibatch(0),
        reward_mean: Some(mean),
        reward_std: Some(std),
        pass_rate: Some(passes as f64 / n),
        kl: per_minibatch(3),
        clip_frac: per_minibatch(1),
        entropy: per_minibatch(2),
        grad_norm: per_minibatch(4),
        rollout_tokens_per_s: Some(totals[1] as f64 / rollout_s.max(1e-9)),
        train_tokens_per_s: (minibatches > 0.0).then(|| sums[5] / train_s.max(1e-9)),
        tool_calls_per_episode: Some(totals[2] as f64 / n),
        rollout_s: Some(rollout_s),
        reward_s: Some(stats.reward_seconds),
        train_s: Some(train_s),
        kv_shared_fraction: Some(totals[3] as f64 / (totals[4] as f64).max(1.0)),
        informative_groups: Some(informative as f64 / rolled_tasks as f64),
        optimizer_steps: Some(minibatches as u64),
        tool_calls_by_tool: Some(tools::calls_by_tool(rolled.trajectories.iter())),
        tool_calls_by_level: Some(tools::calls_by_level(&tasks, rolled.trajectories.iter())),
        memory_hits_per_episode: config.tools.memory.is_some().then(|| tools::memory_hits(rolled.trajectories.iter())),
        memory_stored: config.tools.memory.is_some().then_some(stored as u64),
        context_prefix_tokens: tools_on.then(|| stats.prefix_tokens as f64 / n),
        logprob_gap: gap.into_inner().expect("gap lock").map(f64::from),
        reused_rollout_logprobs: Some(reuse),
        eval: None,
    })
}
#[cfg(test)]
mod tests;
