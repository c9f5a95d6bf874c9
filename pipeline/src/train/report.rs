//! The end of a run: `summary.json`, `report.md` (before/after table by level) and
//! `curves.png` (warm-up loss, GRPO reward, held-out pass@1 over steps).

use std::fmt::Write as _;
use std::path::Path;

use super::config::TrainConfig;
use super::metrics::{EvalMetrics, MetricsLog, StepMetrics};
use super::plot::{plot_panels, Panel, Series};
use super::RunSummary;
use crate::fsutil::write_atomic;
use crate::Error;

fn mean_of(lines: &[&StepMetrics], f: impl Fn(&StepMetrics) -> Option<f64>) -> f64 {
    let values: Vec<f64> = lines.iter().filter_map(|m| f(m)).filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// The run's summary from its metrics.
#[allow(clippy::too_many_arguments)]
pub fn summarize(
    dir: &Path,
    config: &TrainConfig,
    metrics: &MetricsLog,
    before: EvalMetrics,
    after: EvalMetrics,
    grpo_steps: u64,
    complete: bool,
    wall_s: f64,
) -> RunSummary {
    let grpo: Vec<&StepMetrics> = metrics.lines().iter().filter(|m| m.phase == "grpo").collect();
    let sft: Vec<&StepMetrics> = metrics.lines().iter().filter(|m| m.phase == "sft").collect();
    RunSummary {
        dir: dir.to_path_buf(),
        seed: config.seed,
        params: config.model.num_params(),
        before,
        after,
        grpo_steps,
        step_seconds: [mean_of(&grpo, |m| m.rollout_s), mean_of(&grpo, |m| m.reward_s), mean_of(&grpo, |m| m.train_s)],
        rollout_tokens_per_s: mean_of(&grpo, |m| m.rollout_tokens_per_s),
        train_tokens_per_s: mean_of(&grpo, |m| m.train_tokens_per_s),
        sft_tokens_per_s: mean_of(&sft, |m| m.train_tokens_per_s),
        wall_s,
        complete,
        grpo_optimizer_steps: grpo.iter().filter_map(|m| m.optimizer_steps).sum(),
        grpo_max_grad_norm: grpo.iter().filter_map(|m| m.grad_norm).filter(|v| v.is_finite()).fold(0.0, f64::max),
        grpo_weight_change: 0.0,
        grpo_steps_without_update: grpo.iter().filter(|m| m.informative_groups == Some(0.0)).count() as u64,
        notes: Vec::new(),
    }
}

fn pct(v: f64) -> String {
    format!("{:.1}", 100.0 * v)
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or("-".into(), pct)
}

/// The markdown report.
pub fn report_markdown(config: &TrainConfig, s: &RunSummary) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# squid train: seed {}\n", s.seed);
    if config.smoke {
        let _ = writeln!(
            md,
            "**A smoke run (`--quick`)**: a configuration sized to check that every stage runs and that GRPO updates the policy in about a minute. Its pass rates mean nothing.\n"
        );
    }
    let _ = writeln!(
        md,
        "{} parameters, {:?} attention, tp {}; warm-up {} steps x {} traces; GRPO {} of {} steps x {} tasks x {} samples ({} reward).\n",
        s.params,
        config.model.attention,
        config.tp,
        config.sft.steps,
        config.sft.batch,
        s.grpo_steps,
        config.grpo.steps,
        config.grpo.tasks_per_step,
        config.grpo.group_size,
        match config.grpo.reward {
            crate::env::RewardMode::PartialCredit => "partial-credit",
            crate::env::RewardMode::AllOrNothing => "all-or-nothing",
        }
    );
    let _ = writeln!(
        md,
        "Held-out tasks ({} per level, fresh draws of the training families). pass@1 is greedy; pass@{} is unbiased from {} samples at temperature {}. Percent.\n",
        config.eval.tasks_per_level, config.eval.k, config.eval.samples, config.eval.temperature
    );
    let _ = writeln!(
        md,
        "| level | pass@1 warm-up | pass@1 after GRPO | change | pass@{k} warm-up | pass@{k} after |",
        k = config.eval.k
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let rows = s.before.per_level.iter().zip(&s.after.per_level);
    for (b, a) in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:+.1} | {} | {} |",
            b.level,
            pct(b.pass_at_1),
            pct(a.pass_at_1),
            100.0 * (a.pass_at_1 - b.pass_at_1),
            opt_pct(b.pass_at_k),
            opt_pct(a.pass_at_k)
        );
    }
    let _ = writeln!(
        md,
        "| all | {} | {} | {:+.1} | {} | {} |\n",
        pct(s.before.pass_at_1),
        pct(s.after.pass_at_1),
        100.0 * (s.after.pass_at_1 - s.before.pass_at_1),
        opt_pct(s.before.pass_at_k),
        opt_pct(s.after.pass_at_k)
    );
    let _ = writeln!(
        md,
        "Tool use of the greedy held-out episodes: tool calls (run, think, submit) and `<run>` calls per episode.\n"
    );
    let _ = writeln!(md, "| level | tool calls warm-up | tool calls after | `<run>` warm-up | `<run>` after |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (b, a) in s.before.per_level.iter().zip(&s.after.per_level) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            b.level,
            num(b.tool_calls_per_episode),
            num(a.tool_calls_per_episode),
            num(b.runs_per_episode),
            num(a.runs_per_episode)
        );
    }
    let _ = writeln!(md);
    if config.withhold_constants {
        let _ = writeln!(
            md,
            "Prompts withhold the tasks' constants (`--withhold-constants`): only a failing `<run>` states them.\n"
        );
    }
    if config.tools.is_off() {
        by_tool_table(&mut md, s);
    } else {
        tools_section(&mut md, config, s);
    }
    let [r, w, t] = s.step_seconds;
    let _ = writeln!(md, "| throughput | value |\n|---|---|");
    let _ = writeln!(md, "| rollout tokens/s | {:.0} |", s.rollout_tokens_per_s);
    let _ = writeln!(md, "| GRPO training tokens/s (fwd+bwd+AdamW) | {:.0} |", s.train_tokens_per_s);
    let _ = writeln!(md, "| warm-up training tokens/s | {:.0} |", s.sft_tokens_per_s);
    let _ = writeln!(md, "| GRPO step: rollout / reward / train (s) | {r:.2} / {w:.3} / {t:.2} |");
    let _ = writeln!(md, "| wall time of this invocation (s) | {:.0} |\n", s.wall_s);
    let _ = writeln!(md, "| GRPO update | value |\n|---|---|");
    let _ = writeln!(md, "| optimizer steps | {} |", s.grpo_optimizer_steps);
    let _ = writeln!(md, "| steps without an informative group (no update) | {} |", s.grpo_steps_without_update);
    let _ = writeln!(md, "| largest gradient norm (before clipping) | {:.4} |", s.grpo_max_grad_norm);
    let _ = writeln!(md, "| relative weight change, warm-up to final | {:.3e} |\n", s.grpo_weight_change);
    let _ = writeln!(md, "![curves](curves.png)");
    md
}

/// Issue 21's tools: calls per greedy held-out episode by tool, warm-up / after GRPO, and the
/// project row's memory and context figures.
fn tools_section(md: &mut String, config: &TrainConfig, s: &RunSummary) {
    let t = &config.tools;
    let _ = writeln!(
        md,
        "Tools of this run: memory {}, search {}, library in context {}, lint {} (reward {}), think {}, project tasks {:.0}%.\n",
        t.memory.map_or("off", |p| p.name()),
        if t.search { "on" } else { "off" },
        if t.library_in_context { "on" } else { "off" },
        if t.lint { "on" } else { "off" },
        t.lint_reward,
        t.think.map_or("unrestricted", |p| p.name()),
        100.0 * t.projects
    );
    by_tool_table(md, s);
    let projects: Vec<_> =
        s.before.per_level.iter().zip(&s.after.per_level).filter(|(b, _)| b.level == "project").collect();
    if let Some((b, a)) = projects.first() {
        let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let _ =
            writeln!(md, "Held-out projects (greedy, in order; each project's memory kept by the storage policy).\n");
        let _ = writeln!(md, "| project tasks | warm-up | after GRPO |\n|---|---|---|");
        let _ = writeln!(md, "| pass@1 (%) | {} | {} |", pct(b.pass_at_1), pct(a.pass_at_1));
        let _ = writeln!(
            md,
            "| generated tokens per solved task | {} | {} |",
            num(b.tokens_per_solved),
            num(a.tokens_per_solved)
        );
        let _ = writeln!(
            md,
            "| memory snippets recalled per episode | {} | {} |",
            num(b.memory_hits_per_episode),
            num(a.memory_hits_per_episode)
        );
        let _ = writeln!(
            md,
            "| context tokens before the first sampled token | {} | {} |\n",
            num(b.context_prefix_tokens),
            num(a.context_prefix_tokens)
        );
    }
}

/// The figure: warm-up loss, GRPO reward (mean and pass rate), held-out pass@1.
pub fn curves(path: &Path, metrics: &MetricsLog) -> Result<(), Error> {
    let lines = metrics.lines();
    let series = |phase: &str, name: &str, f: &dyn Fn(&StepMetrics) -> Option<f64>| Series {
        name: name.into(),
        points: lines.iter().filter(|m| m.phase == phase).filter_map(|m| f(m).map(|v| (m.step as f64, v))).collect(),
    };
    let mut eval_levels: Vec<Series> = Vec::new();
    let evals: Vec<&StepMetrics> = lines.iter().filter(|m| m.phase == "eval" && m.eval.is_some()).collect();
    eval_levels.push(Series {
        name: "all".into(),
        points: evals.iter().map(|m| (m.step as f64, m.eval.as_ref().expect("filtered").pass_at_1)).collect(),
    });
    if let Some(first) = evals.first().and_then(|m| m.eval.as_ref()) {
        for (i, level) in first.per_level.iter().enumerate() {
            eval_levels.push(Series {
                name: level.level.clone(),
                points: evals
                    .iter()
                    .filter_map(|m| {
                        m.eval.as_ref().and_then(|e| e.per_level.get(i)).map(|l| (m.step as f64, l.pass_at_1))
                    })
                    .collect(),
            });
        }
    }
    let smooth = |series: Series, window: usize| -> Series {
        let points = (0..series.points.len())
            .map(|i| {
                let lo = i.saturating_sub(window - 1);
                let part = &series.points[lo..=i];
                (series.points[i].0, part.iter().map(|p| p.1).sum::<f64>() / part.len() as f64)
            })
            .collect();
        Series { name: format!("{} ({window}-step mean)", series.name), points }
    };
    let mut panels = vec![
        Panel {
            title: "warm-up".into(),
            x_label: "SFT step".into(),
            y_label: "NLL of reference tokens".into(),
            series: vec![series("sft", "loss", &|m| m.loss)],
        },
        Panel {
            title: "GRPO rollouts".into(),
            x_label: "GRPO step".into(),
            y_label: "per step".into(),
            series: vec![
                smooth(series("grpo", "mean reward", &|m| m.reward_mean), 10),
                smooth(series("grpo", "pass rate", &|m| m.pass_rate), 10),
            ],
        },
        Panel {
            title: "held-out pass@1 (greedy)".into(),
            x_label: "GRPO step (0 = warm-up policy)".into(),
            y_label: "pass@1".into(),
            series: eval_levels,
        },
    ];
    // A warm-started run has no warm-up curve to show.
    panels.retain(|p| p.series.iter().any(|s| !s.points.is_empty()));
    plot_panels(path, &panels)
}

/// Writes `summary.json`, `report.md` and `curves.png`.
pub fn write_all(dir: &Path, config: &TrainConfig, metrics: &MetricsLog, summary: &RunSummary) -> Result<(), Error> {
    write_atomic(&dir.join("summary.json"), &serde_json::to_vec_pretty(summary).expect("summary serializes"))?;
    write_atomic(&dir.join("report.md"), report_markdown(config, summary).as_bytes())?;
    curves(&dir.join("curves.png"), metrics)
}

/// Calls per greedy held-out episode by level and tool, warm-up / after GRPO.
fn by_tool_table(md: &mut String, s: &RunSummary) {
    let tools = ["run", "think", "submit", "store", "recall", "search", "lint"];
    let _ = writeln!(md, "Calls per greedy held-out episode by tool, warm-up / after GRPO.\n");
    let _ = writeln!(md, "| level | {} |", tools.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(tools.len()));
    for (b, a) in s.before.per_level.iter().zip(&s.after.per_level) {
        let cell = |tool: &str| {
            let get = |l: &super::metrics::LevelEval| {
                l.tool_calls_by_tool.as_ref().and_then(|m| m.get(tool)).map_or("-".to_string(), |v| format!("{v:.2}"))
            };
            format!("{} / {}", get(b), get(a))
        };
        let cells: Vec<String> = tools.iter().map(|t| cell(t)).collect();
        let _ = writeln!(md, "| {} | {} |", b.level, cells.join(" | "));
    }
    let _ = writeln!(md);
}
