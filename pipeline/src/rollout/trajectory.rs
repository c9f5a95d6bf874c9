//! One episode as tokens, segments and a loss mask: what the rollout loop produces and what the
//! supervised traces produce, built by the same push functions.

use squid_attention::segments::{Segment, SegmentKind};

use crate::env::{Reward, ToolCounts};
use crate::Error;

/// Why an episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The policy emitted `<submit>`.
    Submit,
    /// A tool call reached the episode's `max_tool_calls`.
    ToolLimit,
    /// A `<run>` ended the last turn allowed by `max_turns`.
    MaxTurns,
    /// A turn reached `max_new_tokens` without a tool token.
    MaxTokens,
    /// The context could not take the next token or tool output within `max_context`.
    MaxContext,
}

/// One episode. `segments` cover `tokens` exactly (adjacent Global runs merged);
/// `loss_mask[t]` is true iff token `t` was sampled by the policy. For training: inputs
/// `tokens[..n-1]`, targets `tokens[1..]`, mask `loss_mask[1..]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trajectory {
    /// Index of the task in the slice the batch was made from.
    pub task: usize,
    /// Index of this sample within its task's group.
    pub sample: usize,
    /// The tokens: prompt, sampled tokens, tool outputs, forced tokens.
    pub tokens: Vec<u32>,
    /// Document / Global segments covering `tokens`.
    pub segments: Vec<Segment>,
    /// True at tokens the policy sampled.
    pub loss_mask: Vec<bool>,
    /// At sampled tokens, the log-probability the policy gave them at temperature 1 (before
    /// top-p); 0 elsewhere, and everywhere in supervised traces.
    pub logprobs: Vec<f32>,
    /// Tokens of the prompt (`<bos>` .. `<code>`).
    pub prompt_len: usize,
    /// The reward, once the episode has ended.
    pub reward: Option<Reward>,
    /// Tool calls made (run, think, submit).
    pub tool_calls: usize,
    /// Turns: programs ended by `<run>` or `<submit>`.
    pub turns: usize,
    /// Why it ended (`None` while running).
    pub stop: Option<StopReason>,
    /// What the episode did with its tools (calls by tool, memory use, its last program).
    pub notes: EpisodeNotes,
}

/// What an episode did with its tools, for metrics, the storage policies and the lint reward.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EpisodeNotes {
    /// Tool calls by tool.
    pub tools: ToolCounts,
    /// Snippets its `<store>` calls saved.
    pub stored: Vec<String>,
    /// Memory snippets its `<recall>` calls returned.
    pub recalled: Vec<String>,
    /// Whether it ran with the project's memory (false for the without-memory half of a group).
    pub with_memory: bool,
    /// Whether a `<run>` failed an example before the end.
    pub failing_run: bool,
    /// The last program it ran, linted or submitted.
    pub program: Option<String>,
}

impl Trajectory {
    /// A trajectory holding only `prompt` (one Global segment, not trained on).
    pub fn new(task: usize, sample: usize, prompt: &[u32]) -> Self {
        let mut trajectory = Self {
            task,
            sample,
            tokens: Vec::new(),
            segments: Vec::new(),
            loss_mask: Vec::new(),
            logprobs: Vec::new(),
            prompt_len: prompt.len(),
            reward: None,
            tool_calls: 0,
            turns: 0,
            stop: None,
            notes: EpisodeNotes::default(),
        };
        trajectory.push_forced(prompt);
        trajectory
    }

    fn push(&mut self, tokens: &[u32], kind: SegmentKind, sampled: bool, logprob: f32) {
        if tokens.is_empty() {
            return;
        }
        match self.segments.last_mut() {
            Some(last) if kind == SegmentKind::Global && last.kind == SegmentKind::Global => last.len += tokens.len(),
            _ => self.segments.push(Segment { kind, len: tokens.len() }),
        }
        self.tokens.extend_from_slice(tokens);
        self.loss_mask.extend(std::iter::repeat_n(sampled, tokens.len()));
        self.logprobs.extend(std::iter::repeat_n(logprob, tokens.len()));
    }

    /// Appends one token the policy sampled (Global, trained on).
    pub fn push_sampled(&mut self, token: u32, logprob: f32) {
        self.push(&[token], SegmentKind::Global, true, logprob);
    }

    /// Appends a tool output as its own Document segment (not trained on).
    pub fn push_document(&mut self, tokens: &[u32]) {
        self.push(tokens, SegmentKind::Document, false, 0.0);
    }

    /// Appends tokens the loop forces (Global, not trained on): the prompt, `<code>`.
    pub fn push_forced(&mut self, tokens: &[u32]) {
        self.push(tokens, SegmentKind::Global, false, 0.0);
    }

    /// Tokens the policy sampled.
    pub fn sampled_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }

    /// The reward's value, 0 while the episode has not ended.
    pub fn reward_value(&self) -> f64 {
        self.reward.as_ref().map_or(0.0, |r| r.value)
    }

    /// The sampled tokens in order (what a scripted policy must emit to replay this episode).
    pub fn policy_tokens(&self) -> Vec<u32> {
        self.tokens.iter().zip(&self.loss_mask).filter(|(_, &m)| m).map(|(&t, _)| t).collect()
    }

    /// The next-token training view: inputs `tokens[..n-1]` (with their segments), targets
    /// `tokens[1..]`, and the loss mask and sampling log-probabilities of the targets.
    pub fn training_example(&self) -> TrainingExample {
        let n = self.tokens.len();
        if n < 2 {
            return TrainingExample::default();
        }
        let mut segments = self.segments.clone();
        // The dropped last token belongs to the last segment.
        if let Some(last) = segments.last_mut() {
            last.len -= 1;
            if last.len == 0 {
                segments.pop();
            }
        }
        TrainingExample {
            inputs: self.tokens[..n - 1].to_vec(),
            targets: self.tokens[1..].to_vec(),
            mask: self.loss_mask[1..].to_vec(),
            old_logprobs: self.logprobs[1..].to_vec(),
            segments,
        }
    }

    /// Checks the invariants: segments cover the tokens, per-token vectors agree in length, the
    /// loss mask is false in Documents and in the prompt.
    pub fn validate(&self) -> Result<(), Error> {
        let n = self.tokens.len();
        let covered: usize = self.segments.iter().map(|s| s.len).sum();
        if covered != n || self.loss_mask.len() != n || self.logprobs.len() != n {
            return Err(Error::Shape(format!(
                "trajectory of {n} tokens has segments covering {covered}, {} mask entries, {} logprobs",
                self.loss_mask.len(),
                self.logprobs.len()
            )));
        }
        if self.prompt_len > n || self.loss_mask[..self.prompt_len].iter().any(|&m| m) {
            return Err(Error::Shape("prompt tokens are in the loss mask".into()));
        }
        let mut start = 0;
        for segment in &self.segments {
            if segment.kind == SegmentKind::Document && self.loss_mask[start..start + segment.len].iter().any(|&m| m) {
                return Err(Error::Shape(format!("document at {start} has tokens in the loss mask")));
            }
            start += segment.len;
        }
        Ok(())
    }
}

/// One trajectory shifted for next-token training: position `t` reads `inputs[..=t]` and is
/// trained to predict `targets[t]` where `mask[t]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainingExample {
    /// `tokens[..n-1]`.
    pub inputs: Vec<u32>,
    /// `tokens[1..]`.
    pub targets: Vec<u32>,
    /// `loss_mask[1..]`: train on position `t` iff its target was sampled by the policy.
    pub mask: Vec<bool>,
    /// `logprobs[1..]`: the sampling policy's log-probability of each target (0 where masked).
    pub old_logprobs: Vec<f32>,
    /// Segments covering `inputs`.
    pub segments: Vec<Segment>,
}
