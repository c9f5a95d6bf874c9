//! `squid experiment reward-shaping`: does splitting a task into tested parts (partial credit)
//! beat a sparse all-or-nothing reward? One warm-up, then two GRPO runs from it with the same
//! compute (steps, tasks, samples), one per reward; held-out pass@1 over steps for each, as a
//! table (`reward-shaping.md`) and a plot (`reward-shaping.png`). With `--warm-start` both arms
//! start from that model instead of a fresh warm-up.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::env::RewardMode;
use crate::Error;

use super::plot::{plot_panels, Panel, Series};
use super::{ensure_writable_dir, now_stamp, train, write_atomic, MetricsLog, RunOptions, RunSummary, TrainConfig};

/// Both arms' summaries and where the comparison was written.
#[derive(Debug, Clone)]
pub struct RewardShaping {
    /// The experiment directory.
    pub dir: PathBuf,
    /// Partial-credit arm.
    pub partial: RunSummary,
    /// All-or-nothing arm.
    pub sparse: RunSummary,
}

/// Runs the experiment under `opts.runs_dir/<name or reward-shaping-stamp>/`.
pub fn reward_shaping(config: TrainConfig, opts: &RunOptions) -> Result<RewardShaping, Error> {
    let name = opts.name.clone().unwrap_or_else(|| format!("reward-shaping-{}-seed{}", now_stamp(), config.seed));
    let dir = opts.runs_dir.join(name);
    ensure_writable_dir(&dir)?;
    let arm = |mode: RewardMode, label: &str, warm: Option<PathBuf>| -> Result<RunSummary, Error> {
        let mut c = config.clone();
        c.grpo.reward = mode;
        // The two rewards as they are: the full-solve bonus would make partial credit part sparse.
        c.grpo.solve_bonus = 0.0;
        let o = RunOptions {
            runs_dir: dir.clone(),
            name: Some(label.to_string()),
            resume: None,
            progress: opts.progress,
            stop_after: None,
            warm_start: warm,
            interrupt: opts.interrupt.clone(),
            log_every: opts.log_every,
        };
        train(c, &o)
    };
    let partial = arm(RewardMode::PartialCredit, "partial-credit", opts.warm_start.clone())?;
    let warm = partial.dir.join("checkpoints").join("warmup").join("model.safetensors");
    let sparse = arm(RewardMode::AllOrNothing, "all-or-nothing", Some(warm))?;

    let curve = |s: &RunSummary| -> Result<Vec<(f64, f64)>, Error> {
        let log = MetricsLog::open(&s.dir.join("metrics.jsonl"), |_| true)?;
        Ok(log
            .lines()
            .iter()
            .filter(|m| m.phase == "eval")
            .filter_map(|m| m.eval.as_ref().map(|e| (m.step as f64, e.pass_at_1)))
            .collect())
    };
    let (cp, cs) = (curve(&partial)?, curve(&sparse)?);
    plot_panels(
        &dir.join("reward-shaping.png"),
        &[Panel {
            title: "held-out pass@1: partial credit vs all-or-nothing".into(),
            x_label: "GRPO step (0 = shared warm-up policy)".into(),
            y_label: "greedy pass@1".into(),
            series: vec![
                Series { name: "partial credit".into(), points: cp.clone() },
                Series { name: "all-or-nothing".into(), points: cs.clone() },
            ],
        }],
    )?;
    let mut md = String::new();
    let _ = writeln!(md, "# Reward shaping: partial credit vs all-or-nothing (seed {})\n", config.seed);
    let _ = writeln!(
        md,
        "Same warm-up policy, same compute: {} GRPO steps x {} tasks x {} samples each. Held-out greedy pass@1 (percent).\n",
        config.grpo.steps, config.grpo.tasks_per_step, config.grpo.group_size
    );
    let _ = writeln!(md, "| GRPO step | partial credit | all-or-nothing |\n|---|---|---|");
    for (p, s) in cp.iter().zip(&cs) {
        let _ = writeln!(md, "| {} | {:.1} | {:.1} |", p.0, 100.0 * p.1, 100.0 * s.1);
    }
    let _ = writeln!(md, "\n| level | warm-up | partial credit | all-or-nothing |\n|---|---|---|---|");
    for ((b, p), s) in partial.before.per_level.iter().zip(&partial.after.per_level).zip(&sparse.after.per_level) {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} |",
            b.level,
            100.0 * b.pass_at_1,
            100.0 * p.pass_at_1,
            100.0 * s.pass_at_1
        );
    }
    let _ = writeln!(
        md,
        "| all | {:.1} | {:.1} | {:.1} |\n\n![pass@1](reward-shaping.png)",
        100.0 * partial.before.pass_at_1,
        100.0 * partial.after.pass_at_1,
        100.0 * sparse.after.pass_at_1
    );
    write_atomic(&dir.join("reward-shaping.md"), md.as_bytes())?;
    Ok(RewardShaping { dir, partial, sparse })
}
