//! `metrics.jsonl`: one JSON object per line, appended and flushed as each step ends, so a run
//! killed at any moment keeps every finished step. On resume the file is cut back to the
//! checkpointed step (rewritten atomically), so no step is ever recorded twice.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{io_error, write_atomic};
use crate::Error;

/// Held-out pass rates at one point of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Greedy pass@1 over all held-out tasks (all hidden tests of all parts pass).
    pub pass_at_1: f64,
    /// Unbiased pass@k from sampled attempts per task (evaluated before and after GRPO only).
    pub pass_at_k: Option<f64>,
    /// The k of `pass_at_k`.
    pub k: usize,
    /// Per level, easiest first.
    pub per_level: Vec<LevelEval>,
    /// Mean partial-credit reward of the greedy attempts.
    pub greedy_reward: f64,
}

/// Pass rates of one level.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LevelEval {
    /// `easy`, `medium` or `hard`.
    pub level: String,
    /// Held-out tasks of this level.
    pub tasks: usize,
    /// Greedy pass@1.
    pub pass_at_1: f64,
    /// Unbiased pass@k, when sampled.
    pub pass_at_k: Option<f64>,
    /// Tool calls (run, think, submit) per greedy episode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls_per_episode: Option<f64>,
    /// `<run>` calls (the policy running its program on the visible examples) per greedy episode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_per_episode: Option<f64>,
    /// Tool calls per greedy episode by tool (`run`, `think`, `submit`, `store`, `recall`,
    /// `search`, `lint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls_by_tool: Option<std::collections::BTreeMap<String, f64>>,
    /// Generated tokens per solved task (greedy; runs with issue 21's tools on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_solved: Option<f64>,
    /// Memory snippets recalled per greedy episode (memory tool on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_hits_per_episode: Option<f64>,
    /// Context tokens before the policy's first token per greedy episode (tools on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_prefix_tokens: Option<f64>,
}

/// One line of `metrics.jsonl` (fields absent from a line read back as `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StepMetrics {
    /// `"sft"`, `"grpo"` or `"eval"`.
    pub phase: String,
    /// Step within the phase (eval lines carry the GRPO step they follow; 0 = the warm-up policy).
    pub step: u64,
    /// Training loss of the step.
    pub loss: Option<f64>,
    /// Mean training reward of the step's samples (the solve bonus included).
    pub reward_mean: Option<f64>,
    /// Standard deviation of the step's rewards.
    pub reward_std: Option<f64>,
    /// Fraction of samples that passed every hidden test.
    pub pass_rate: Option<f64>,
    /// KL to the warm-up policy (k3 estimator, mean over loss tokens), when computed.
    pub kl: Option<f64>,
    /// Fraction of loss tokens whose ratio was clipped.
    pub clip_frac: Option<f64>,
    /// Mean policy entropy over loss tokens (nats).
    pub entropy: Option<f64>,
    /// Gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Rollout tokens generated per second.
    pub rollout_tokens_per_s: Option<f64>,
    /// Training tokens (forward + backward) per second.
    pub train_tokens_per_s: Option<f64>,
    /// Tool calls per episode.
    pub tool_calls_per_episode: Option<f64>,
    /// Seconds spent generating.
    pub rollout_s: Option<f64>,
    /// Seconds spent scoring (sandbox runs of hidden tests).
    pub reward_s: Option<f64>,
    /// Seconds spent in forward, backward and the optimizer.
    pub train_s: Option<f64>,
    /// KV bytes held by the rollout at its peak / bytes it would hold without sharing.
    pub kv_shared_fraction: Option<f64>,
    /// Fraction of rolled-out groups whose rewards differ (the informative ones).
    pub informative_groups: Option<f64>,
    /// Optimizer steps (minibatches) the GRPO step took: 0 when no group was informative.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer_steps: Option<u64>,
    /// Tool calls per episode by tool (`run`, `think`, `submit`, `store`, `recall`, `search`,
    /// `lint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls_by_tool: Option<std::collections::BTreeMap<String, f64>>,
    /// Tool calls per episode by level of the step's tasks (`easy`, `medium`, `hard`,
    /// `project`), then by tool as in `tool_calls_by_tool`; levels the step did not draw are
    /// absent. Whether the policy keeps calling tools where they pay (issue 14).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls_by_level: Option<std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>>,
    /// Memory snippets recalls returned, per episode (memory tool on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_hits_per_episode: Option<f64>,
    /// Snippets the storage policy put into memories this step (memory tool on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_stored: Option<u64>,
    /// Largest `|rollout log-prob - trainer log-prob|` over the step's sampled tokens, the trainer's
    /// being its forward with the weights that sampled (the first minibatch's, and every
    /// minibatch's recomputed old log-probs when they are recomputed); 0 when exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob_gap: Option<f64>,
    /// Whether the old log-probs were the rollouts' (not recomputed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reused_rollout_logprobs: Option<bool>,
    /// Context tokens before the policy's first token (prompt, library in context), per episode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_prefix_tokens: Option<f64>,
    /// Held-out evaluation, on eval lines.
    pub eval: Option<EvalMetrics>,
}

/// The open `metrics.jsonl` of a run.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    /// `None` for [`MetricsLog::in_memory`].
    file: Option<File>,
    lines: Vec<StepMetrics>,
}

impl MetricsLog {
    /// Opens (creating) `path`, keeping only the lines `keep` accepts (used on resume to drop
    /// steps after the checkpoint). A line that does not parse (a torn last write) is dropped.
    /// Kept lines are written back as they were read (their text, not a re-serialisation), so
    /// no value drifts however often a run is resumed.
    pub fn open(path: &Path, keep: impl Fn(&StepMetrics) -> bool) -> Result<Self, Error> {
        let mut lines = Vec::new();
        if path.exists() {
            let reader = BufReader::new(File::open(path).map_err(|e| io_error(path, e))?);
            let mut text = String::new();
            for line in reader.lines() {
                let line = line.map_err(|e| io_error(path, e))?;
                if let Ok(m) = serde_json::from_str::<StepMetrics>(&line) {
                    if keep(&m) {
                        lines.push(m);
                        text.push_str(line.trim_end());
                        text.push('\n');
                    }
                }
            }
            write_atomic(path, text.as_bytes())?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| io_error(path, e))?;
        Ok(Self { path: path.to_path_buf(), file: Some(file), lines })
    }

    /// A log that keeps its lines without writing them (the ranks of a data-parallel run other
    /// than rank 0, which alone writes the run directory).
    pub fn in_memory() -> Self {
        Self { path: PathBuf::new(), file: None, lines: Vec::new() }
    }

    /// Appends one line and flushes it to the OS.
    pub fn push(&mut self, m: StepMetrics) -> Result<(), Error> {
        let mut line = serde_json::to_string(&m).expect("metrics serialize");
        line.push('\n');
        if let Some(file) = &mut self.file {
            file.write_all(line.as_bytes()).map_err(|e| io_error(&self.path, e))?;
            file.flush().map_err(|e| io_error(&self.path, e))?;
        }
        self.lines.push(m);
        Ok(())
    }

    /// Every line so far (this run and the resumed part).
    pub fn lines(&self) -> &[StepMetrics] {
        &self.lines
    }

    /// Steps of `phase` in `1..=last` that have no line (a file cut or edited by hand), as
    /// ranges `first..=last`.
    pub fn missing_steps(&self, phase: &str, last: u64) -> Vec<(u64, u64)> {
        let mut seen: Vec<u64> = self.lines.iter().filter(|m| m.phase == phase).map(|m| m.step).collect();
        seen.sort_unstable();
        seen.dedup();
        let mut holes = Vec::new();
        let mut next = 1;
        for s in seen.into_iter().filter(|&s| s >= 1 && s <= last).chain(std::iter::once(last + 1)) {
            if s > next {
                holes.push((next, s - 1));
            }
            next = s + 1;
        }
        holes
    }
}

/// `3-5, 9` for the ranges `[(3, 5), (9, 9)]`.
pub fn format_ranges(ranges: &[(u64, u64)]) -> String {
    let parts: Vec<String> =
        ranges.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_lines_are_rewritten_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        // Values whose shortest decimal form a lenient parser may read 1 ulp off.
        let text = concat!(
            r#"{"phase":"grpo","step":1,"loss":0.30000000000000004,"reward_mean":2.2250738585072014e-308}"#,
            "\n",
            r#"{"phase":"grpo","step":2,"loss":0.1234567890123456789,"grad_norm":1.7976931348623157e308}"#,
            "\n",
            r#"{"phase":"grpo","step":3,"loss":1.0}"#,
            "\n"
        );
        std::fs::write(&path, text).unwrap();
        for _ in 0..3 {
            MetricsLog::open(&path, |_| true).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let log = MetricsLog::open(&path, |m| m.step <= 2).unwrap();
        assert_eq!(log.lines().len(), 2);
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept, text.lines().take(2).map(|l| format!("{l}\n")).collect::<String>());
    }

    #[test]
    fn missing_steps_are_found_as_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let line = |phase: &str, step: u64| format!("{{\"phase\":\"{phase}\",\"step\":{step}}}\n");
        let text: String = [1, 2, 6, 8].iter().map(|&s| line("grpo", s)).chain([line("eval", 4)]).collect();
        std::fs::write(&path, text).unwrap();
        let log = MetricsLog::open(&path, |_| true).unwrap();
        assert_eq!(log.missing_steps("grpo", 8), [(3, 5), (7, 7)]);
        assert_eq!(log.missing_steps("grpo", 10), [(3, 5), (7, 7), (9, 10)]);
        assert_eq!(log.missing_steps("grpo", 2), []);
        assert_eq!(log.missing_steps("sft", 0), []);
        assert_eq!(format_ranges(&log.missing_steps("grpo", 8)), "3-5, 7");
    }
}
