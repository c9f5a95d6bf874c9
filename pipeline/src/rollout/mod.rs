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

use std::time::Instant;

use squid_attention::segments::SegmentKind;

pub use sampling::{argmax, log_prob, sample_token};
pub use trajectory::{StopReason, TrainingExample, Trajectory};

use crate::env::{Episode, EpisodeConfig, Rng, Task, ToolCall};
use crate::policy::{ContextId, KvStats, Policy};
use crate::tokenizer::{Tokenizer, CODE, END_THINK, RUN, SUBMIT, THINK};
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
    /// Tool calls over all episodes (run, think, submit).
    pub tool_calls: usize,
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
#[derive(Debug, Clone)]
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
        self.pending = None;
    }

    fn is_done(&self) -> bool {
        self.trajectory.stop.is_some()
    }

    fn start_turn(&mut self) {
        self.turn_start = self.trajectory.tokens.len();
        self.turn_tokens = 0;
        self.think_start = None;
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
        // A model may pad its vocabulary: only the tokenizer's ids can be sampled.
        let (token, logprob) = sample_token(&logits[..vocab], config.temperature, config.top_p, &mut self.rng)?;
        self.trajectory.push_sampled(token, logprob);
        self.turn_tokens += 1;
        let end = self.trajectory.tokens.len();
        match token {
            SUBMIT | RUN => {
                self.trajectory.turns += 1;
                let program = tokenizer.turn_program(&self.trajectory.tokens[self.turn_start..end - 1]);
                let call = if token == SUBMIT { ToolCall::Submit { program } } else { ToolCall::Run { program } };
                let output = self.tool_call(call)?;
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
    let result = run_episodes(policy, tokenizer, tasks, episode_config, config, &mut samples);
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
    let generated_tokens = trajectories.iter().map(Trajectory::sampled_tokens).sum();
    let wall_seconds = started.elapsed().as_secs_f64();
    let episodes = trajectories.len().max(1) as f64;
    let stats = RolloutStats {
        generated_tokens,
        wall_seconds,
        tokens_per_second: if wall_seconds > 0.0 { generated_tokens as f64 / wall_seconds } else { 0.0 },
        reward_seconds,
        tool_calls,
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
    samples: &mut Vec<Sample>,
) -> Result<(usize, KvStats), Error> {
    let mut first_logits = Vec::with_capacity(tasks.len());
    for (task_index, task) in tasks.iter().enumerate() {
        let prompt = tokenizer.prompt_tokens(task);
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
        let root = policy.open()?;
        samples.push(new_sample(root, task_index, 0, task, &prompt, episode_config, config));
        let logits = policy.append(root, &prompt, SegmentKind::Global)?;
        for g in 1..config.group_size {
            let ctx = policy.fork(root)?;
            samples.push(new_sample(ctx, task_index, g, task, &prompt, episode_config, config));
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

fn new_sample(
    ctx: ContextId,
    task_index: usize,
    sample: usize,
    task: &Task,
    prompt: &[u32],
    episode_config: EpisodeConfig,
    config: &RolloutConfig,
) -> Sample {
    let trajectory = Trajectory::new(task_index, sample, prompt);
    Sample {
        ctx,
        rng: sample_rng(config.seed, task_index, sample),
        episode: Episode::new(task.clone(), episode_config),
        turn_start: trajectory.tokens.len(),
        turn_tokens: 0,
        think_start: None,
        trajectory,
        pending: None,
        env_seconds: 0.0,
    }
}
