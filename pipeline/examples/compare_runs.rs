//! Compares two `squid train` runs of one configuration, for the data-parallel check in CI
//! (`mpirun -np N squid train` against the single-process run):
//!
//! ```text
//! cargo run -p squid-pipeline --example compare_runs -- RUN_A RUN_B [MAX_WEIGHT_DIFF]
//! ```
//!
//! It requires the same GRPO steps with the same mean rewards and informative-group fractions
//! (the same samples: a rank draws each sample from its global task index), losses within 1e-4
//! relative, and the newest checkpoints' weights within `MAX_WEIGHT_DIFF` (absolute, default
//! 1e-3: summing the ranks' gradients in another order rounds differently, and AdamW's
//! normalisation can turn that into up to lr per step on an entry whose gradient is near 0).
//! It prints the largest weight difference it saw. Exit code 1 on any difference past these.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use squid_pipeline::model::Model;
use squid_pipeline::train::{latest_checkpoint, MetricsLog, StepMetrics};
use squid_pipeline::Error;

fn grpo_lines(run: &Path) -> Result<Vec<StepMetrics>, Error> {
    // Opening keeps every line as it was read (it rewrites the file with the same text).
    let log = MetricsLog::open(&run.join("metrics.jsonl"), |_| true)?;
    Ok(log.lines().iter().filter(|m| m.phase == "grpo").cloned().collect())
}

fn newest_model(run: &Path) -> Result<(PathBuf, Model), Error> {
    let root = run.join("checkpoints");
    let (dir, _) =
        latest_checkpoint(&root)?.ok_or_else(|| Error::Config(format!("{} has no checkpoint", root.display())))?;
    let model = Model::load(dir.join("model.safetensors"))?;
    Ok((dir, model))
}

fn compare(a: &Path, b: &Path, max_weight_diff: f32) -> Result<Vec<String>, Error> {
    let mut problems = Vec::new();
    let (la, lb) = (grpo_lines(a)?, grpo_lines(b)?);
    if la.len() != lb.len() || la.is_empty() {
        problems.push(format!("GRPO lines: {} vs {}", la.len(), lb.len()));
    }
    for (x, y) in la.iter().zip(&lb) {
        if (x.step, x.reward_mean, x.informative_groups) != (y.step, y.reward_mean, y.informative_groups) {
            problems.push(format!(
                "step {}: reward {:?} / informative {:?} vs step {}: {:?} / {:?}",
                x.step, x.reward_mean, x.informative_groups, y.step, y.reward_mean, y.informative_groups
            ));
        }
        let (p, q) = (x.loss.unwrap_or(0.0), y.loss.unwrap_or(0.0));
        if (p - q).abs() > 1e-4 * p.abs().max(1.0) {
            problems.push(format!("step {}: loss {p} vs {q}", x.step));
        }
    }
    let ((da, ma), (db, mb)) = (newest_model(a)?, newest_model(b)?);
    if da.file_name() != db.file_name() {
        problems.push(format!("newest checkpoints {} vs {}", da.display(), db.display()));
    }
    let (mut diff, mut scale) = (0f32, 0f32);
    for (x, y) in ma.params().iter().zip(mb.params()) {
        for (&x, &y) in x.iter().zip(y) {
            diff = diff.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    println!(
        "compare_runs: {} GRPO steps with equal rewards, largest weight difference {diff:e} (largest weight {scale:e})",
        la.len()
    );
    if diff.is_nan() || diff > max_weight_diff {
        problems.push(format!("weights differ by {diff:e}, more than {max_weight_diff:e}"));
    }
    Ok(problems)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (a, b) = match (args.first(), args.get(1)) {
        (Some(a), Some(b)) => (PathBuf::from(a), PathBuf::from(b)),
        _ => {
            eprintln!("usage: compare_runs RUN_A RUN_B [MAX_WEIGHT_DIFF]");
            return ExitCode::FAILURE;
        }
    };
    let max = match args.get(2).map(|s| s.parse::<f32>()) {
        None => 1e-3,
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            eprintln!("compare_runs: MAX_WEIGHT_DIFF: {e}");
            return ExitCode::FAILURE;
        }
    };
    match compare(&a, &b, max) {
        Ok(problems) if problems.is_empty() => ExitCode::SUCCESS,
        Ok(problems) => {
            for p in problems {
                eprintln!("compare_runs: {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("compare_runs: {e}");
            ExitCode::FAILURE
        }
    }
}
