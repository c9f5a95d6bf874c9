//! The inference loop: G sampled episodes per task, all contexts stepped together, tool calls
//! intercepted mid-generation.
//!
//! Per task the prompt is appended once (one Global segment) and its context forked to the G
//! samples, which share its KV. Every active sample then advances by one token per batched
//! [`Policy::step`]. When a sample emits `<run>`, the loop decodes the turn's program, runs it
//! through [`Episode::step`], appends the output as a Document and the forced `<code>` as
//! Global, and samples the next turn from `<code>`'s logits. `</think>` closes a scratch span
//! (a `Think` tool call; its output is empty, so nothing is appended). An episode ends at
//! `<submit>`, at the episode's tool-call limit, after `max_turns` turns, when a turn reaches
//! `max_new_tokens`, or when the context would pass `max_context`; the last three call
//! [`Episode::finish`] (the last program run is scored, or 0 if none). The token layout is the
//! one in [`crate::tokenizer`].

mod sampling;
mod trajectory;

#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tool_tests;

use std::time::Instant;

use squid_attention::segments::SegmentKind;

pub use sampling::{argmax, log_prob, sample_token};
pub use trajectory::{EpisodeNotes, StopReason, TrainingExample, Trajectory};

use serde::{Deserialize, Serialize};

use crate::env::{Episode, EpisodeConfig, Memory, Rng, Task, ToolCall, ToolCounts, ToolSwitches};
use crate::policy::{ContextId, KvStats, Policy};
use crate::tokenizer::{
    Tokenizer, CODE, END_RECALL, END_SEARCH, END_STORE, END_THINK, LINT, RECALL, RUN, SEARCH, SPAN_TOOLS, STORE,
    SUBMIT, THINK,
};

/// Where `<think>` spans may go (issue 21's placements). Enforced in rollouts by masking the
/// `<think>` token elsewhere, and followed by the warm-up traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThinkPlacement {
    /// Only as the first token of the first turn (before writing anything).
    Before,
    /// Only as the first token of a turn that follows a tool's output.
    AfterTool,
    /// Never.
    Off,
}

impl ThinkPlacement {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            ThinkPlacement::Before => "before",
            ThinkPlacement::AfterTool => "after-tool",
            ThinkPlacement::Off => "off",
        }
    }

    /// Parses a flag value.
    pub fn parse(text: &str) -> Option<Self> {
        [ThinkPlacement::Before, ThinkPlacement::AfterTool, ThinkPlacement::Off].into_iter().find(|p| p.name() == text)
    }
}

/// Issue 21's additions to a rollout: the project memories samples start from, the
/// library-in-context baseline and think placement. The default adds nothing.
#[derive(Debug, Clone, Default)]
pub struct RolloutTools {
    /// The memory each task's samples start from (by task index; missing or `None` = none). Each
    /// sample gets its own copy; what enters the real memory is the caller's decision.
    pub memories: Vec<Option<Memory>>,
    /// Samples `g >= group_size / 2` of a task with a memory run without it (recall answers from
    /// an empty memory): the with/without comparison that credits stored snippets.
    pub split_memory: bool,
    /// The search baseline: the task's whole library after the prompt, one Document segment per
    /// entry (their KV cached by content, like tool outputs).
    pub library_in_context: bool,
    /// Where `<think>` may be sampled (`None` = anywhere, as before issue 21).
    pub think: Option<ThinkPlacement>,
    /// The index of `tasks[0]` in the whole step's batch: a data-parallel rank rolls out a
    /// slice of the batch, and each sample's stream depends on its task's global index, so it
    /// draws what the single-process run draws (0 for a whole batch).
    pub first_task: usize,
}
use crate::Error;

/// Sampling and stopping settings of one rollout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutConfig {
    /// Samples per task (G).
    pub group_size: usize,
    /// Softmax temperature; 0 samples greedily (argmax).
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; 1 keeps every token.
    pub top_p: f32,
    /// Turns (programs ended by `<run>` or `<submit>`) per episode.
    pub max_turns: usize,
    /// Sampled tokens per turn.
    pub max_new_tokens: usize,
    /// Tokens per context, prompt and tool outputs included.
    pub max_context: usize,
    /// Seed of the sampling streams (each sample's stream depends on it, its task's index in the
    /// batch and its index in the group, so runs are reproducible).
    pub seed: u64,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            group_size: 8,
            temperature: 1.0,
            top_p: 1.0,
            max_turns: 3,
            max_new_tokens: 192,
            max_context: 1024,
            seed: 0,
        }
    }
}

impl RolloutConfig {
    /// Checks every field; says which one is wrong.
    pub fn validate(&self) -> Result<(), Error> {
        let problem = if self.group_size == 0 {
            "group_size must be at least 1".to_string()
        } else if !sampling::valid_temperature(self.temperature) {
            format!("temperature {} must be finite and >= 0", self.temperature)
        } else if !sampling::valid_top_p(self.top_p) {
            format!("top_p {} must be in (0, 1]", self.top_p)
        } else if self.max_turns == 0 {
            "max_turns must be at least 1".to_string()
        } else if self.max_new_tokens == 0 {
            "max_new_tokens must be at least 1".to_string()
        } else if self.max_context < 2 {
            format!("max_context {} must be at least 2", self.max_context)
        } else {
            return Ok(());
        };
        Err(Error::Config(format!("rollout: {problem}")))
    }
}

/// What a rollout measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RolloutStats {
    /// Tokens the policy sampled, over all trajectories.
    pub generated_tokens: usize,
    /// Wall-clock seconds of the whole rollout (prefill, decoding, tools).
    pub wall_seconds: f64,
    /// `generated_tokens / wall_seconds`.
    pub tokens_per_second: f64,
    /// Seconds spent in the environment ([`Episode::step`] and [`Episode::finish`]: running
    /// programs on the examples and scoring them on the hidden tests), included in
    /// `wall_seconds`.
    pub reward_seconds: f64,
    /// Tool calls over all episodes (run, think, submit and issue 21's tools).
    pub tool_calls: usize,
    /// The same by tool.
    pub tool_counts: ToolCounts,
    /// Tokens of the contexts before the policy's first token (prompt, and the library when
    /// it is placed in context), summed over trajectories.
    pub prefix_tokens: usize,
    /// Mean tool calls per episode.
    pub tool_calls_per_episode: f64,
    /// Batched [`Policy::step`] calls.
    pub policy_steps: usize,
    /// KV memory right after every prompt was prefilled and forked (maximal sharing).
    pub kv_after_fork: KvStats,
    /// KV memory at the end, before the contexts were closed: `bytes_held` against
    /// `bytes_unshared` is what forks share, `doc_hits` the tool outputs served from the cache.
    pub kv: KvStats,
}

/// The trajectories of one rollout, task-major: `trajectories[t * G + g]` is sample g of task t.
#[derive(Debug, Clone, Default)]
pub struct RolloutBatch {
    /// `tasks.len() * group_size` trajectories.
    pub trajectories: Vec<Trajectory>,
    /// Throughput, tool use and KV sharing.
    pub stats: RolloutStats,
}

/// A token sampled and recorded but not yet appended to the policy's context.
struct Pending {
    token: u32,
    /// A tool output to append (Document, then `<code>`) once `token` is in the context.
    output: Option<Vec<u32>>,
}

/// One sample's state.
struct Sample {
    ctx: ContextId,
    rng: Rng,
    episode: Episode,
    trajectory: Trajectory,
    /// Index in `trajectory.tokens` where the current turn's body starts.
    turn_start: usize,
    /// Tokens sampled in the current turn.
    turn_tokens: usize,
    /// Index of the open `<think>` of the current turn, if any.
    think_start: Option<usize>,
    /// The open store / recall / search span of the current turn: its index and closing token.
    span: Option<(usize, u32)>,
    /// Tokens the sampler never draws here (disabled tools).
    banned: Vec<u32>,
    think: Option<ThinkPlacement>,
    pending: Option<Pending>,
    /// Seconds spent in the episode's tool calls and scoring.
    env_seconds: f64,
}

impl Sample {
    /// Makes a tool call, timing it.
    fn tool_call(&mut self, call: ToolCall) -> Result<crate::env::ToolOutput, Error> {
        let started = Instant::now();
        let output = self.episode.step(call).map_err(|e| Error::Config(format!("episode: {e}")));
        self.env_seconds += started.elapsed().as_secs_f64();
        output
    }

    fn finish(&mut self, reason: StopReason) {
        let started = Instant::now();
        let reward = self.episode.finish();
        self.env_seconds += started.elapsed().as_secs_f64();
        self.trajectory.reward = Some(reward);
        self.trajectory.tool_calls = self.episode.tool_calls();
        self.trajectory.stop = Some(reason);
        let notes = &mut self.trajectory.notes;
        notes.tools = self.episode.tool_counts();
        notes.stored = self.episode.stored().to_vec();
        notes.recalled = self.episode.recalled().to_vec();
        notes.failing_run = self.episode.had_failing_run();
        notes.program = self.episode.last_program().map(str::to_string);
        self.pending = None;
    }

    fn is_done(&self) -> bool {
        self.trajectory.stop.is_some()
    }

    fn start_turn(&mut self) {
        self.turn_start = self.trajectory.tokens.len();
        self.turn_tokens = 0;
        self.think_start = None;
        self.span = None;
    }

    /// `logits` with the tokens this sample may not draw now set to -inf: disabled tools, `<think>`
    /// where the placement rules it out, span tokens out of place.
    fn masked(&self, logits: &[f32]) -> Vec<f32> {
        let think_banned = match self.think {
            None => false,
            Some(ThinkPlacement::Off) => true,
            Some(ThinkPlacement::Before) => !(self.trajectory.turns == 0 && self.turn_tokens == 0),
            Some(ThinkPlacement::AfterTool) => !(self.trajectory.turns > 0 && self.turn_tokens == 0),
        } && self.think_start.is_none();
        // Span tools: no span opens inside another or inside a think span; a close token only
        // closes its own span.
        let in_span = self.span.is_some() || self.think_start.is_some();
        let mut row = logits.to_vec();
        let mut ban = |t: u32| {
            if let Some(v) = row.get_mut(t as usize) {
                *v = f32::NEG_INFINITY;
            }
        };
        self.banned.iter().for_each(|&t| ban(t));
        if think_banned {
            ban(THINK);
        }
        for &(open, close) in &SPAN_TOOLS {
            if in_span {
                ban(open);
            }
            if self.span.map(|(_, c)| c) != Some(close) {
                ban(close);
            }
        }
        row
    }

    /// After a tool call that ends a turn: finish, or queue its output (Document, `<code>`).
    fn after_tool(
        &mut self,
        output: crate::env::ToolOutput,
        token: u32,
        end: usize,
        tokenizer: &Tokenizer,
        config: &RolloutConfig,
    ) {
        if output.done {
            let reason = if token == SUBMIT { StopReason::Submit } else { StopReason::ToolLimit };
            self.finish(reason);
        } else if self.trajectory.turns >= config.max_turns {
            self.finish(StopReason::MaxTurns);
        } else {
            let document = tokenizer.tool_output_tokens(&output.text);
            // Room for the output, the forced <code> and one sampled token.
            if end + document.len() + 2 > config.max_context {
                self.finish(StopReason::MaxContext);
            } else {
                self.pending = Some(Pending { token, output: Some(document) });
            }
        }
    }

    /// Samples the next token from `logits`, records it, and handles tool tokens.
    fn advance(&mut self, logits: &[f32], tokenizer: &Tokenizer, config: &RolloutConfig) -> Result<(), Error> {
        if self.trajectory.tokens.len() >= config.max_context {
            self.finish(StopReason::MaxContext);
            return Ok(());
        }
        let vocab = tokenizer.vocab_size();
        if logits.len() < vocab {
            return Err(Error::BadLogits(format!("row of {} entries for a vocabulary of {vocab}", logits.len())));
        }
        // A model may pad its vocabulary: only the tokenizer's ids can be sampled. Tokens a
        // disabled tool or the think placement rules out are masked; the recorded log-prob is
        // the unmasked one (what the training forward pass computes).
        let row = &logits[..vocab];
        let token = sampling::sample_masked(row, &self.masked(row), config.temperature, config.top_p, &mut self.rng)?;
        // Over the model's whole row, padding included: the trainer's log-softmax.
        let logprob = log_prob(logits, token)?;
        self.trajectory.push_sampled(token, logprob);
        self.turn_tokens += 1;
        let end = self.trajectory.tokens.len();
        match token {
            SUBMIT | RUN | LINT => {
                self.trajectory.turns += 1;
                let program = tokenizer.turn_program(&self.trajectory.tokens[self.turn_start..end - 1]);
                let call = match token {
                    SUBMIT => ToolCall::Submit { program },
                    RUN => ToolCall::Run { program },
                    _ => ToolCall::Lint { program },
                };
                let output = self.tool_call(call)?;
                self.after_tool(output, token, end, tokenizer, config);
                return Ok(());
            }
            STORE | RECALL | SEARCH if self.span.is_none() && self.think_start.is_none() => {
                let close = match token {
                    STORE => END_STORE,
                    RECALL => END_RECALL,
                    _ => END_SEARCH,
                };
                self.span = Some((end - 1, close));
            }
            END_STORE | END_RECALL | END_SEARCH if self.span.map(|(_, c)| c) == Some(token) => {
                let (open, _) = self.span.take().unwrap_or((end - 1, token));
                let text = tokenizer.decode_text(&self.trajectory.tokens[open + 1..end - 1]);
                let call = match token {
                    END_STORE => ToolCall::Store { text },
                    END_RECALL => ToolCall::Recall { query: text },
                    _ => ToolCall::Search { query: text },
                };
                self.trajectory.turns += 1;
                let output = self.tool_call(call)?;
                self.after_tool(output, token, end, tokenizer, config);
                return Ok(());
            }
            THINK if self.think_start.is_none() => self.think_start = Some(end - 1),
            END_THINK if self.think_start.is_some() => {
                let open = self.think_start.take().unwrap_or(end - 1);
                let text = tokenizer.decode_text(&self.trajectory.tokens[open + 1..end - 1]);
                let output = self.tool_call(ToolCall::Think { text })?;
                if output.done {
                    self.finish(StopReason::ToolLimit);
                    return Ok(());
                }
            }
            _ => {}
        }
        if self.turn_tokens >= config.max_new_tokens {
            self.finish(StopReason::MaxTokens);
        } else {
            self.pending = Some(Pending { token, output: None });
        }
        Ok(())
    }
}

/// Runs `config.group_size` episodes of every task in `tasks` with `policy` and returns their
/// trajectories (task-major) and statistics. Every context the rollout opens is closed before it
/// returns (also on error, as far as the policy allows).
pub fn rollout<P: Policy>(
    policy: &mut P,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    episode_config: EpisodeConfig,
    config: &RolloutConfig,
) -> Result<RolloutBatch, Error> {
    rollout_with(policy, tokenizer, tasks, episode_config, config, &RolloutTools::default())
}

/// [`rollout`] with issue 21's additions: project memories, the library in context, think
/// placement.
pub fn rollout_with<P: Policy>(
    policy: &mut P,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    episode_config: EpisodeConfig,
    config: &RolloutConfig,
    tools: &RolloutTools,
) -> Result<RolloutBatch, Error> {
    config.validate()?;
    if policy.vocab_size() < tokenizer.vocab_size() {
        return Err(Error::Config(format!(
            "policy vocabulary of {} is smaller than the tokenizer's {}",
            policy.vocab_size(),
            tokenizer.vocab_size()
        )));
    }
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::with_capacity(tasks.len() * config.group_size);
    let result = run_episodes(policy, tokenizer, tasks, episode_config, config, tools, &mut samples);
    let kv = policy.kv_stats();
    let mut closed = Ok(());
    for sample in &samples {
        if let Err(e) = policy.close(sample.ctx) {
            closed = closed.and(Err(e));
        }
    }
    let (policy_steps, kv_after_fork) = result?;
    closed?;
    let reward_seconds = samples.iter().map(|s| s.env_seconds).sum();
    let trajectories: Vec<Trajectory> = samples.into_iter().map(|s| s.trajectory).collect();
    let tool_calls = trajectories.iter().map(|t| t.tool_calls).sum::<usize>();
    let mut tool_counts = ToolCounts::default();
    trajectories.iter().for_each(|t| tool_counts.merge(&t.notes.tools));
    let prefix_tokens = trajectories.iter().map(|t| t.prompt_len).sum();
    let generated_tokens = trajectories.iter().map(Trajectory::sampled_tokens).sum();
    let wall_seconds = started.elapsed().as_secs_f64();
    let episodes = trajectories.len().max(1) as f64;
    let stats = RolloutStats {
        generated_tokens,
        wall_seconds,
        tokens_per_second: if wall_seconds > 0.0 { generated_tokens as f64 / wall_seconds } else { 0.0 },
        reward_seconds,
        tool_calls,
        tool_counts,
        prefix_tokens,
        tool_calls_per_episode: tool_calls as f64 / episodes,
        policy_steps,
        kv_after_fork,
        kv,
    };
    Ok(RolloutBatch { trajectories, stats })
}

/// The sampling stream of sample `sample` of the task at `task` in the batch.
fn sample_rng(seed: u64, task: usize, sample: usize) -> Rng {
    let mut mixer = Rng::new(
        seed ^ (task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (sample as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    Rng::new(mixer.next_u64())
}

/// Prefill, fork and decode; pushes every sample it opens onto `samples` (so the caller can
/// close them). Returns the number of batched steps and the KV stats after forking.
fn run_episodes<P: Policy>(
    policy: &mut P,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    episode_config: EpisodeConfig,
    config: &RolloutConfig,
    tools: &RolloutTools,
    samples: &mut Vec<Sample>,
) -> Result<(usize, KvStats), Error> {
    let mut first_logits = Vec::with_capacity(tasks.len());
    for (task_index, task) in tasks.iter().enumerate() {
        let prefix = context_prefix(tokenizer, task, tools.library_in_context);
        let prompt: Vec<u32> = prefix.iter().flat_map(|(t, _)| t.iter().copied()).collect();
        if prompt.len() + 1 > config.max_context {
            return Err(Error::Config(format!(
                "rollout: the prompt of task {task_index} ({} {} seed {}) is {} tokens; max_context {} leaves no room to answer",
                task.level.name(),
                task.family,
                task.seed,
                prompt.len(),
                config.max_context
            )));
        }
        let mut template = Trajectory::new(task_index, 0, &prefix[0].0);
        for (tokens, kind) in &prefix[1..] {
            match kind {
                SegmentKind::Document => template.push_document(tokens),
                SegmentKind::Global => template.push_forced(tokens),
            }
        }
        template.prompt_len = template.tokens.len();
        let setup = SampleSetup { task, template: &template, episode_config, config, tools };
        let root = policy.open()?;
        samples.push(new_sample(root, task_index, 0, &setup));
        let mut logits = Vec::new();
        for (tokens, kind) in &prefix {
            logits = policy.append(root, tokens, *kind)?;
        }
        for g in 1..config.group_size {
            let ctx = policy.fork(root)?;
            samples.push(new_sample(ctx, task_index, g, &setup));
        }
        first_logits.push(logits);
    }
    let kv_after_fork = policy.kv_stats();
    for sample in samples.iter_mut() {
        let logits = &first_logits[sample.trajectory.task];
        sample.advance(logits, tokenizer, config)?;
    }
    let vocab = policy.vocab_size();
    let mut steps = 0;
    loop {
        let active: Vec<usize> = (0..samples.len()).filter(|&i| samples[i].pending.is_some()).collect();
        if active.is_empty() {
            break;
        }
        let ctxs: Vec<ContextId> = active.iter().map(|&i| samples[i].ctx).collect();
        let tokens: Vec<u32> = active.iter().map(|&i| samples[i].pending.as_ref().map_or(0, |p| p.token)).collect();
        let logits = policy.step(&ctxs, &tokens)?;
        steps += 1;
        if logits.len() != active.len() * vocab {
            return Err(Error::BadLogits(format!(
                "step over {} contexts returned {} logits, expected {} x {vocab}",
                active.len(),
                logits.len(),
                active.len()
            )));
        }
        for (row, &i) in active.iter().enumerate() {
            let sample = &mut samples[i];
            let pending = sample.pending.take().expect("active samples have a pending token");
            match pending.output {
                Some(document) => {
                    policy.append(sample.ctx, &document, SegmentKind::Document)?;
                    sample.trajectory.push_document(&document);
                    let code_logits = policy.append(sample.ctx, &[CODE], SegmentKind::Global)?;
                    sample.trajectory.push_forced(&[CODE]);
                    sample.start_turn();
                    sample.advance(&code_logits, tokenizer, config)?;
                }
                None => sample.advance(&logits[row * vocab..(row + 1) * vocab], tokenizer, config)?,
            }
        }
    }
    debug_assert!(samples.iter().all(Sample::is_done));
    Ok((steps, kv_after_fork))
}

/// The context before the policy's first token, as segments: the prompt (Global, without its
/// closing `<code>`), with `library_in_context` one Document per library entry (`<out>` code
/// `</out>`), then `<code>` (Global). Without the library: the prompt as one Global segment.
pub fn context_prefix(tokenizer: &Tokenizer, task: &Task, library_in_context: bool) -> Vec<(Vec<u32>, SegmentKind)> {
    let prompt = tokenizer.prompt_tokens(task);
    if !library_in_context || task.library.is_empty() {
        return vec![(prompt, SegmentKind::Global)];
    }
    let mut out = vec![(prompt[..prompt.len() - 1].to_vec(), SegmentKind::Global)];
    for entry in &task.library {
        out.push((tokenizer.tool_output_tokens(&entry.code), SegmentKind::Document));
    }
    out.push((vec![CODE], SegmentKind::Global));
    out
}

/// What every sample of one task starts from.
struct SampleSetup<'a> {
    task: &'a Task,
    template: &'a Trajectory,
    episode_config: EpisodeConfig,
    config: &'a RolloutConfig,
    tools: &'a RolloutTools,
}

/// Tokens of the tools `switches` leaves off (never sampled).
fn banned_tokens(switches: &ToolSwitches) -> Vec<u32> {
    let mut banned = Vec::new();
    if !switches.memory {
        banned.extend([STORE, END_STORE, RECALL, END_RECALL]);
    }
    if !switches.search {
        banned.extend([SEARCH, END_SEARCH]);
    }
    if !switches.lint {
        banned.push(LINT);
    }
    banned
}

fn new_sample(ctx: ContextId, task_index: usize, sample: usize, setup: &SampleSetup<'_>) -> Sample {
    let mut trajectory = setup.template.clone();
    trajectory.sample = sample;
    let mut episode = Episode::new(setup.task.clone(), setup.episode_config);
    let memory = setup.tools.memories.get(task_index).cloned().flatten();
    let without = setup.tools.split_memory && sample >= setup.config.group_size / 2 && setup.config.group_size > 1;
    if let Some(memory) = memory.filter(|_| !without) {
        episode = episode.with_memory(memory);
        trajectory.notes.with_memory = true;
    }
    Sample {
        ctx,
        rng: sample_rng(setup.config.seed, setup.tools.first_task + task_index, sample),
        episode,
        turn_start: trajectory.tokens.len(),
        turn_tokens: 0,
        think_start: None,
        span: None,
        banned: banned_tokens(&setup.episode_config.tools),
        think: setup.tools.think,
        trajectory,
        pending: None,
        env_seconds: 0.0,
    }
}
