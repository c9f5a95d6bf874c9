//! The run configuration (`config.json`): every knob of warm-up, GRPO and evaluation. Defaults
//! are sized so `squid train` with no flags is a complete run in about ten minutes on 2 cores.

use serde::{Deserialize, Serialize};

use crate::env::{MemoryPolicy, RewardMode, ToolSwitches};
use crate::model::{AttentionKind, ModelConfig};
pub use crate::rollout::ThinkPlacement;
use crate::Error;

/// Most parameters of a trained model (f32 weights, gradients and AdamW moments: 16 bytes each).
pub const MAX_PARAMS: usize = 1 << 30;
/// Most samples per task (`--group-size`, and pass@k samples).
pub const MAX_GROUP: usize = 1024;
/// Most tasks per GRPO step (and traces per warm-up step).
pub const MAX_TASKS_PER_STEP: usize = 4096;
/// Most oversampling of a GRPO step.
pub const MAX_OVERSAMPLE: usize = 64;
/// Most contexts one GRPO rollout holds (tasks x oversample x group size).
pub const MAX_ROLLOUT_CONTEXTS: usize = 16_384;
/// Most held-out tasks per level.
pub const MAX_EVAL_TASKS: usize = 10_000;
/// Most tokens a context may hold.
pub const MAX_CONTEXT: usize = 1 << 16;
/// Most turns of an episode.
pub const MAX_TURNS: usize = 64;

/// Supervised warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Traces per step.
    pub batch: usize,
    /// Peak learning rate (linear warm-up over the first tenth, cosine to a tenth of it).
    pub lr: f32,
    /// Fraction of traces that show the repair loop (write, run, read the failure, fix, submit).
    pub repair_fraction: f64,
}

/// GRPO.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoConfig {
    /// Optimizer steps (one rollout batch each).
    pub steps: u64,
    /// Tasks per step (B).
    pub tasks_per_step: usize,
    /// Samples per task (G).
    pub group_size: usize,
    /// DAPO dynamic sampling: roll out this many times `tasks_per_step` tasks and train on the
    /// first `tasks_per_step` groups whose rewards differ (a group of equal rewards has zero
    /// advantage everywhere and teaches nothing). 1 = plain GRPO on every group.
    pub oversample: usize,
    /// Constant learning rate.
    pub lr: f32,
    /// Minibatches each rollout batch is split into (one optimizer step each, so later ones
    /// see ratios away from 1 and the clip acts).
    pub minibatches: usize,
    /// PPO clip: the ratio is clamped below at `1 - clip` (and above at `1 + clip` unless
    /// `clip_high` says otherwise).
    pub clip: f32,
    /// Upper PPO clip when it differs from `clip` (DAPO's clip-higher: a larger upper bound lets
    /// unlikely tokens of good samples gain probability, which keeps exploration alive).
    #[serde(default)]
    pub clip_high: Option<f32>,
    /// KL to the warm-up policy (k3, as verl's `low_var_kl`); 0 turns the reference pass off.
    pub kl_beta: f32,
    /// Partial credit or all-or-nothing.
    #[serde(with = "reward_mode_serde")]
    pub reward: RewardMode,
    /// Added to the reward of a submission that passes every hidden test of every part (0 = off).
    /// With partial credit this ranks a full solve above a near miss, which is what pass@1 counts.
    #[serde(default)]
    pub solve_bonus: f32,
    /// Sampling temperature of the rollouts.
    pub temperature: f32,
    /// Nucleus mass of the rollouts.
    pub top_p: f32,
    /// Gradient clipping norm.
    pub max_grad_norm: f32,
    /// Use the log-probs the rollouts sampled with as the old log-probs instead of recomputing
    /// them with a forward per minibatch. `None` (the default) = on where they are bitwise the
    /// trainer's: dense or segment attention on one rank (NSA decodes through its own cache, and
    /// `--tp > 1` sums partial products over ranks, so those recompute).
    #[serde(default)]
    pub reuse_rollout_logprobs: Option<bool>,
}

impl GrpoConfig {
    /// Whether the trainer reuses the rollouts' log-probs (see `reuse_rollout_logprobs`).
    pub fn reuses_rollout_logprobs(&self, attention: AttentionKind, tp: usize) -> bool {
        self.reuse_rollout_logprobs.unwrap_or(!matches!(attention, AttentionKind::Nsa(_)) && tp == 1)
    }
}

/// Held-out evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Held-out tasks per level.
    pub tasks_per_level: usize,
    /// Evaluate greedy pass@1 every this many GRPO steps (and before the first, after the last).
    pub every: u64,
    /// k of pass@k (evaluated before and after GRPO).
    pub k: usize,
    /// Sampled attempts per task for pass@k (>= k).
    pub samples: usize,
    /// Temperature of the pass@k samples.
    pub temperature: f32,
}

/// Episode limits shared by rollouts and evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeLimits {
    /// Turns (model writes a program, then runs or submits it).
    pub max_turns: usize,
    /// Tokens a turn may generate.
    pub max_new_tokens: usize,
    /// Tokens a context may hold.
    pub max_context: usize,
}

/// Everything a run needs; written to `runs/<timestamp>/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Seed of task draws, initialisation and sampling.
    pub seed: u64,
    /// Tensor-parallel ranks (threads of this process).
    pub tp: usize,
    /// The policy's shape (its `vocab` is the tokenizer's).
    pub model: ModelConfig,
    /// Warm-up.
    pub sft: SftConfig,
    /// GRPO.
    pub grpo: GrpoConfig,
    /// Evaluation.
    pub eval: EvalConfig,
    /// Episode limits.
    pub limits: EpisodeLimits,
    /// Weights of the levels (easy, medium, hard) among warm-up traces.
    pub sft_level_mix: [f64; 3],
    /// Weights of the levels among GRPO tasks.
    pub grpo_level_mix: [f64; 3],
    /// A smoke run (`--quick`): says so in its output and report. Absent from the JSON when
    /// false, so configs (and checkpoint fingerprints) of other runs are unchanged.
    #[serde(default, skip_serializing_if = "is_false")]
    pub smoke: bool,
    /// Show only this many visible examples per part in prompts (training and held-out); the
    /// `<run>` tool still runs all of them, so the others reach the policy only through a run
    /// (tools worth calling). `None` (absent from the JSON) shows them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shown_examples: Option<usize>,
    /// Prompts (training and held-out) name the constants of the families that draw them
    /// (thresholds, factors, divisors) by letters, and only a failing `<run>` states their values:
    /// running is the only way to learn them (issue 14). Absent from the JSON when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub withhold_constants: bool,
    /// The optional tools (memory, search, lint), think placement and project tasks (issue 21).
    /// Absent from the JSON when all off, so other runs' configs are unchanged.
    #[serde(default, skip_serializing_if = "ToolsConfig::is_off")]
    pub tools: ToolsConfig,
}

/// The tools of issue 21 and the project tasks that need them. All off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ToolsConfig {
    /// The memory tool (`<store>`, `<recall>`) with this storage policy; `None` = no memory tool.
    pub memory: Option<MemoryPolicy>,
    /// Bytes of snippet text a project's memory holds (eviction rule: `env::Memory`).
    pub memory_bytes: usize,
    /// The `<search>` tool over the project's library.
    pub search: bool,
    /// The baseline to search: the whole library placed after the prompt as Document segments.
    pub library_in_context: bool,
    /// The `<lint>` tool.
    pub lint: bool,
    /// Added to the training reward of a submission the linter finds clean (0 = off).
    pub lint_reward: f32,
    /// Think placement; `None` = as before issue 21 (think traces before writing, rollouts
    /// unrestricted).
    pub think: Option<ThinkPlacement>,
    /// Fraction of warm-up traces and GRPO tasks that are project tasks (0 = none).
    pub projects: f64,
    /// Training projects (a pool, so memories fill up across steps).
    pub project_pool: u64,
}

impl ToolsConfig {
    /// Whether nothing of issue 21 is switched on.
    pub fn is_off(&self) -> bool {
        self.memory.is_none()
            && !self.search
            && !self.library_in_context
            && !self.lint
            && self.lint_reward == 0.0
            && self.think.is_none()
            && self.projects == 0.0
    }

    /// The episode's tool switches.
    pub fn switches(&self) -> ToolSwitches {
        ToolSwitches { memory: self.memory.is_some(), search: self.search, lint: self.lint, ..ToolSwitches::default() }
    }

    /// Every tool on (CI's tools run): policy-decided memory, search, lint with a reward,
    /// think after tool output, a third of the tasks from projects.
    pub fn all_on() -> Self {
        Self {
            memory: Some(MemoryPolicy::PolicyDecides),
            search: true,
            lint: true,
            lint_reward: 0.1,
            think: Some(ThinkPlacement::AfterTool),
            projects: 0.34,
            ..Self::default()
        }
    }

    /// The memory size in effect (a default when unset).
    pub fn memory_budget(&self) -> usize {
        if self.memory_bytes == 0 {
            1024
        } else {
            self.memory_bytes
        }
    }

    /// The project pool in effect (a default when unset).
    pub fn pool(&self) -> u64 {
        if self.project_pool == 0 {
            16
        } else {
            self.project_pool
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.projects) {
            return Err(Error::Config(format!("--projects {} must be in [0, 1]", self.projects)));
        }
        if !(self.lint_reward.is_finite() && self.lint_reward >= 0.0) {
            return Err(Error::Config(format!("--lint-reward {} must be finite and non-negative", self.lint_reward)));
        }
        if self.memory_bytes > 1 << 20 {
            return Err(Error::Config(format!("--memory-bytes {} is above {}", self.memory_bytes, 1 << 20)));
        }
        if self.project_pool > 1 << 20 {
            return Err(Error::Config(format!("--project-pool {} is above {}", self.project_pool, 1 << 20)));
        }
        Ok(())
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            tp: 1,
            model: ModelConfig::small(),
            sft: SftConfig { steps: 600, batch: 16, lr: 3e-3, repair_fraction: 0.3 },
            // GRPO probes (BENCHMARKS.md): rollouts at temperature 1.2 (the warm-up policy is
            // nearly deterministic, so groups at 1.0 rarely hold a different answer), a bonus of 1
            // for a full solve on top of partial credit (pass@1 counts full solves only), training
            // on up to 12 informative groups of the 24 tasks rolled out, clip-higher 0.28.
            grpo: GrpoConfig {
                steps: 300,
                tasks_per_step: 12,
                group_size: 8,
                oversample: 2,
                lr: 3e-4,
                minibatches: 2,
                clip: 0.2,
                clip_high: Some(0.28),
                kl_beta: 0.0,
                reward: RewardMode::PartialCredit,
                solve_bonus: 1.0,
                temperature: 1.2,
                top_p: 1.0,
                max_grad_norm: 1.0,
                reuse_rollout_logprobs: None,
            },
            eval: EvalConfig { tasks_per_level: 50, every: 25, k: 4, samples: 8, temperature: 1.0 },
            limits: EpisodeLimits { max_turns: 3, max_new_tokens: 160, max_context: 768 },
            // Multi-part (hard) tasks are rare in the warm-up and 60% of GRPO: the supervised
            // phase teaches the language and the tools, RL with per-part partial credit teaches
            // composing several tested functions (probe runs: BENCHMARKS.md). Medium tasks are
            // solved by the warm-up (their groups are all-equal and filtered out), so GRPO draws
            // few of them.
            sft_level_mix: [0.475, 0.475, 0.05],
            grpo_level_mix: [0.3, 0.1, 0.6],
            smoke: false,
            shown_examples: None,
            withhold_constants: false,
            tools: ToolsConfig::default(),
        }
    }
}

impl TrainConfig {
    /// `task` as this run's prompts show it: examples cut to `shown_examples`, constants
    /// withheld under `withhold_constants` (training, held-out and transcript tasks alike).
    pub fn prompted(&self, task: crate::env::Task) -> crate::env::Task {
        let task = match self.shown_examples {
            Some(n) => task.with_shown_examples(n),
            None => task,
        };
        if self.withhold_constants {
            task.with_constants_withheld()
        } else {
            task
        }
    }

    /// The smoke run (`--quick`, CI's end-to-end run): every stage in one to two minutes on 2
    /// cores (debug build), sized so that GRPO does update the policy. Easy tasks only, in the
    /// warm-up and in GRPO: after 60 warm-up steps the policy writes programs that parse and
    /// pass some tests, so sampled groups differ (an all-equal group teaches nothing), and 4x
    /// oversampling finds such groups every step. Too short to learn anything measurable.
    pub fn quick() -> Self {
        let mut c = Self { smoke: true, ..Self::default() };
        c.sft.steps = 60;
        c.sft.batch = 8;
        c.sft_level_mix = [1.0, 0.0, 0.0];
        c.grpo_level_mix = [1.0, 0.0, 0.0];
        c.grpo.steps = 4;
        c.grpo.tasks_per_step = 4;
        c.grpo.group_size = 4;
        c.grpo.oversample = 4;
        c.eval.tasks_per_level = 4;
        c.eval.every = 2;
        c.eval.samples = 4;
        c.eval.k = 2;
        c
    }

    /// Checks the values the model config does not cover; says which one is wrong.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        self.model.validate()?;
        if self.tp == 0 {
            return bad("--tp must be at least 1".into());
        }
        if self.model.n_heads % self.tp != 0 || self.model.mlp_hidden % self.tp != 0 {
            return bad(format!(
                "--tp {} must divide the heads ({}) and the MLP width ({})",
                self.tp, self.model.n_heads, self.model.mlp_hidden
            ));
        }
        if self.sft.batch == 0 || self.grpo.tasks_per_step == 0 {
            return bad("batch sizes must be at least 1".into());
        }
        self.check_sizes()?;
        if self.grpo.group_size < 2 {
            return bad(format!("--group-size {} must be at least 2 (advantages are relative)", self.grpo.group_size));
        }
        if self.grpo.oversample == 0 {
            return bad("oversample must be at least 1".into());
        }
        if self.grpo.minibatches == 0 || self.grpo.minibatches > self.grpo.tasks_per_step {
            return bad(format!(
                "minibatches {} must be between 1 and the tasks per step ({})",
                self.grpo.minibatches, self.grpo.tasks_per_step
            ));
        }
        for (name, lr) in [("sft lr", self.sft.lr), ("grpo lr", self.grpo.lr)] {
            if !(lr.is_finite() && lr > 0.0) {
                return bad(format!("{name} {lr} must be finite and positive"));
            }
        }
        if !(0.0..=1.0).contains(&self.sft.repair_fraction) {
            return bad(format!("repair fraction {} must be in [0, 1]", self.sft.repair_fraction));
        }
        for (name, clip) in [("clip", Some(self.grpo.clip)), ("clip-high", self.grpo.clip_high)] {
            if let Some(c) = clip {
                if !(c.is_finite() && c > 0.0) {
                    return bad(format!("{name} {c} must be finite and positive"));
                }
            }
        }
        if self.grpo.clip >= 1.0 {
            return bad(format!("clip {} must be below 1 (the ratio is clamped at 1 - clip)", self.grpo.clip));
        }
        if !(self.grpo.solve_bonus.is_finite() && self.grpo.solve_bonus >= 0.0) {
            return bad(format!("solve bonus {} must be finite and non-negative", self.grpo.solve_bonus));
        }
        if !(self.grpo.kl_beta.is_finite() && self.grpo.kl_beta >= 0.0) {
            return bad(format!("kl beta {} must be finite and non-negative", self.grpo.kl_beta));
        }
        if !(self.grpo.temperature > 0.0 && self.grpo.temperature.is_finite()) {
            return bad(format!("rollout temperature {} must be positive", self.grpo.temperature));
        }
        if !(self.grpo.top_p > 0.0 && self.grpo.top_p <= 1.0) {
            return bad(format!("top-p {} must be in (0, 1]", self.grpo.top_p));
        }
        if self.eval.k == 0 || self.eval.samples < self.eval.k || self.eval.tasks_per_level == 0 || self.eval.every == 0
        {
            return bad(format!(
                "eval: need k >= 1, samples >= k, tasks >= 1, every >= 1 (k {}, samples {}, tasks {}, every {})",
                self.eval.k, self.eval.samples, self.eval.tasks_per_level, self.eval.every
            ));
        }
        if self.limits.max_turns == 0 || self.limits.max_new_tokens == 0 {
            return bad("episode limits must be at least 1".into());
        }
        for mix in [self.sft_level_mix, self.grpo_level_mix] {
            let total: f64 = mix.iter().sum();
            if mix.iter().any(|w| !(w.is_finite() && *w >= 0.0)) || total <= 0.0 {
                return bad(format!("level mix {mix:?} must be non-negative with a positive sum"));
            }
        }
        self.tools.validate()?;
        if matches!(self.model.attention, AttentionKind::Nsa(_)) && self.tp > 1 {
            return bad("--tp > 1 is implemented for dense and segment attention only".into());
        }
        Ok(())
    }

    /// Caps on every size that becomes an allocation, checked with checked arithmetic before
    /// anything is allocated: an absurd flag is a typed error naming it, not an abort.
    fn check_sizes(&self) -> Result<(), Error> {
        let too_big = |flag: &str, v: usize, max: usize, why: &str| {
            Err(Error::Config(format!("{flag} {v} is above {max}: {why}")))
        };
        let params = self.model.num_params();
        if params > MAX_PARAMS {
            return Err(Error::Config(format!(
                "model: {params} parameters is above {MAX_PARAMS}: the CPU trainer keeps f32 weights, gradients and two AdamW moments per parameter"
            )));
        }
        let checks = [
            (
                "--group-size",
                self.grpo.group_size,
                MAX_GROUP,
                "a group's samples are rolled out together, each with its own KV",
            ),
            (
                "--tasks-per-step",
                self.grpo.tasks_per_step,
                MAX_TASKS_PER_STEP,
                "every task of a step is rolled out at once",
            ),
            ("--oversample", self.grpo.oversample, MAX_OVERSAMPLE, "oversampled tasks are rolled out at once"),
            (
                "--eval-tasks",
                self.eval.tasks_per_level,
                MAX_EVAL_TASKS,
                "each evaluation rolls out every held-out task",
            ),
            ("eval samples", self.eval.samples, MAX_GROUP, "each task's pass@k samples are rolled out together"),
            ("sft batch", self.sft.batch, MAX_TASKS_PER_STEP, "a warm-up step packs every trace into one batch"),
            ("max_context", self.limits.max_context, MAX_CONTEXT, "each context's KV is sized for it"),
            ("max_new_tokens", self.limits.max_new_tokens, MAX_CONTEXT, "a turn cannot outgrow its context"),
            ("max_turns", self.limits.max_turns, MAX_TURNS, "episodes end at the tool-call limit"),
        ];
        for (flag, v, max, why) in checks {
            if v > max {
                return too_big(flag, v, max, why);
            }
        }
        // Contexts of one GRPO rollout: B x oversample x G, each up to max_context tokens.
        let contexts = self
            .grpo
            .tasks_per_step
            .checked_mul(self.grpo.oversample)
            .and_then(|n| n.checked_mul(self.grpo.group_size))
            .filter(|&n| n <= MAX_ROLLOUT_CONTEXTS);
        if contexts.is_none() {
            return Err(Error::Config(format!(
                "--tasks-per-step {} x --oversample {} x --group-size {} contexts is above {MAX_ROLLOUT_CONTEXTS}: one GRPO step rolls them out in one session",
                self.grpo.tasks_per_step, self.grpo.oversample, self.grpo.group_size
            )));
        }
        Ok(())
    }

    /// A short hash of the configuration: a checkpoint written under another one is refused.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_string(self).expect("config serializes");
        blake3::hash(json.as_bytes()).to_hex()[..16].to_string()
    }
}

mod reward_mode_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::env::RewardMode;

    pub fn serialize<S: Serializer>(mode: &RewardMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match mode {
            RewardMode::PartialCredit => "partial",
            RewardMode::AllOrNothing => "all-or-nothing",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RewardMode, D::Error> {
        match String::deserialize(d)?.as_str() {
            "partial" => Ok(RewardMode::PartialCredit),
            "all-or-nothing" => Ok(RewardMode::AllOrNothing),
            other => Err(serde::de::Error::custom(format!("unknown reward mode {other:?}"))),
        }
    }
}
