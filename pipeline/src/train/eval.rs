//! Held-out evaluation: greedy pass@1 and sampled pass@k per level. A task passes when every
//! hidden test of every part passes (the all-or-nothing criterion, whatever the training reward).

use crate::env::{EpisodeConfig, Level, RewardConfig, Task, PROJECT_TASKS};
use crate::model::{Model, SessionConfig};
use crate::rollout::{rollout_with, RolloutConfig, RolloutTools, Trajectory};
use crate::tokenizer::Tokenizer;
use crate::Error;

use super::config::TrainConfig;
use super::metrics::{EvalMetrics, LevelEval};
use super::passk::pass_at_k;

/// The held-out tasks: `per_level` of each level, from a seed space training never draws from
/// (training seeds have the top bit clear, held-out ones set). They are fresh draws of the same
/// families (new constants and tests), not new families.
pub fn held_out_tasks(seed: u64, per_level: usize) -> Vec<Task> {
    let mut tasks = Vec::with_capacity(per_level * Level::ALL.len());
    for level in Level::ALL {
        for i in 0..per_level as u64 {
            let s = (1u64 << 63) | (splitmix(seed ^ 0xE7A1_0000_0000_0000 ^ i) >> 1);
            tasks.push(crate::env::generate_task(level, s));
        }
    }
    tasks
}

/// A well-mixed 64-bit hash (one splitmix64 step).
pub fn splitmix(x: u64) -> u64 {
    crate::env::Rng::new(x).next_u64()
}

/// Held-out tasks rolled out per session (bounds the KV held at once).
const EVAL_CHUNK: usize = 16;

/// `<run>` tokens the policy sampled in `t` (each one a run of its program on the examples).
pub fn runs_of(t: &Trajectory) -> usize {
    t.tokens.iter().zip(&t.loss_mask).filter(|&(&tok, &sampled)| sampled && tok == crate::tokenizer::RUN).count()
}

fn passed(reward: Option<&crate::env::Reward>) -> bool {
    reward.is_some_and(|r| !r.malformed && r.total > 0 && r.passed == r.total)
}

/// Evaluates `model` on `tasks` under `config`'s episode limits and evaluation settings: greedy
/// pass@1 always, pass@k (from `eval.samples` attempts at `eval.temperature`) when
/// `with_pass_k`. Episodes are scored with partial credit whatever the training reward, so the
/// greedy reward column means the same in every run.
pub fn evaluate(
    model: &Model,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    config: &TrainConfig,
    with_pass_k: bool,
) -> Result<EvalMetrics, Error> {
    let (limits, eval, seed) = (&config.limits, &config.eval, config.seed);
    let episode = eval_episode(config);
    let rollout_config = |group_size: usize, temperature: f32| RolloutConfig {
        group_size,
        temperature,
        top_p: 1.0,
        max_turns: limits.max_turns,
        max_new_tokens: limits.max_new_tokens,
        max_context: limits.max_context,
        seed,
    };
    // In chunks of tasks, so the KV of one chunk's contexts bounds the memory.
    let extras = RolloutTools {
        library_in_context: config.tools.library_in_context,
        think: config.tools.think,
        ..RolloutTools::default()
    };
    let run = |group_size: usize, temperature: f32| -> Result<Vec<Trajectory>, Error> {
        let mut out = Vec::with_capacity(tasks.len() * group_size);
        for (c, chunk) in tasks.chunks(EVAL_CHUNK).enumerate() {
            let mut settings = rollout_config(group_size, temperature);
            settings.seed = splitmix(seed ^ c as u64);
            let mut session =
                model.session(SessionConfig::for_contexts(chunk.len() * group_size, limits.max_context))?;
            out.extend(rollout_with(&mut session, tokenizer, chunk, episode, &settings, &extras)?.trajectories);
        }
        Ok(out)
    };
    let greedy = run(1, 0.0)?;
    let sampled = if with_pass_k { Some(run(eval.samples, eval.temperature)?) } else { None };
    let mut per_level = Vec::new();
    let (mut pass1_all, mut passk_all, mut reward_all) = (0.0, 0.0, 0.0);
    for level in Level::ALL {
        let idx: Vec<usize> = (0..tasks.len()).filter(|&i| tasks[i].level == level).collect();
        if idx.is_empty() {
            continue;
        }
        let mut p1 = 0.0;
        let mut pk = 0.0;
        let (mut calls, mut runs) = (0usize, 0usize);
        for &i in &idx {
            let t = &greedy[i];
            calls += t.tool_calls;
            runs += runs_of(t);
            p1 += f64::from(u8::from(passed(t.reward.as_ref())));
            reward_all += t.reward.as_ref().map_or(0.0, |r| r.value.max(0.0));
            if let Some(s) = &sampled {
                let group = &s[i * eval.samples..(i + 1) * eval.samples];
                let c = group.iter().filter(|t| passed(t.reward.as_ref())).count();
                pk += pass_at_k(eval.samples, c, eval.k);
            }
        }
        pass1_all += p1;
        passk_all += pk;
        let n = idx.len() as f64;
        per_level.push(LevelEval {
            level: level.name().to_string(),
            tasks: idx.len(),
            pass_at_1: p1 / n,
            pass_at_k: sampled.as_ref().map(|_| pk / n),
            tool_calls_per_episode: Some(calls as f64 / n),
            runs_per_episode: Some(runs as f64 / n),
            tool_calls_by_tool: Some(super::tools::calls_by_tool(idx.iter().map(|&i| &greedy[i]))),
            ..LevelEval::default()
        });
    }
    if config.tools.projects > 0.0 {
        per_level.push(evaluate_projects(model, tokenizer, config)?);
    }
    let n = tasks.len().max(1) as f64;
    Ok(EvalMetrics {
        pass_at_1: pass1_all / n,
        pass_at_k: sampled.as_ref().map(|_| passk_all / n),
        k: eval.k,
        per_level,
        greedy_reward: reward_all / n,
    })
}

fn eval_episode(config: &TrainConfig) -> EpisodeConfig {
    EpisodeConfig {
        reward: RewardConfig::default(),
        max_tool_calls: config.limits.max_turns,
        tools: config.tools.switches(),
    }
}

/// Held-out projects (seeds training never draws), greedy, one position at a time so that each
/// project's memory holds what the storage policy kept from its earlier tasks: the `project` row.
fn evaluate_projects(model: &Model, tokenizer: &Tokenizer, config: &TrainConfig) -> Result<LevelEval, Error> {
    use super::tools::{calls_by_tool, commit_group, held_out_projects, memory_hits, rollout_tools, ProjectMemories};
    let projects = held_out_projects(config.seed, config.eval.tasks_per_level.div_ceil(PROJECT_TASKS).max(1));
    let limits = &config.limits;
    let mut memories = ProjectMemories::default();
    let mut all: Vec<Trajectory> = Vec::new();
    for position in 0..PROJECT_TASKS {
        let tasks: Vec<Task> = projects.iter().map(|p| p[position].clone()).collect();
        let extras = rollout_tools(&config.tools, &tasks, &mut memories, false);
        let settings = RolloutConfig {
            group_size: 1,
            temperature: 0.0,
            top_p: 1.0,
            max_turns: limits.max_turns,
            max_new_tokens: limits.max_new_tokens,
            max_context: limits.max_context,
            seed: splitmix(config.seed ^ 0x9_0E22 ^ position as u64),
        };
        let mut session = model.session(SessionConfig::for_contexts(tasks.len(), limits.max_context))?;
        let rolled = rollout_with(&mut session, tokenizer, &tasks, eval_episode(config), &settings, &extras)?;
        drop(session);
        if let Some(policy) = config.tools.memory {
            for (task, t) in tasks.iter().zip(&rolled.trajectories) {
                if let Some(place) = task.project {
                    let memory = memories.get(place.seed, config.tools.memory_budget());
                    commit_group(policy, memory, task, &[t], &[t.reward_value() as f32]);
                }
            }
        }
        all.extend(rolled.trajectories);
    }
    let n = all.len().max(1) as f64;
    let solved = all.iter().filter(|t| passed(t.reward.as_ref())).count();
    let generated: usize = all.iter().map(Trajectory::sampled_tokens).sum();
    Ok(LevelEval {
        level: "project".into(),
        tasks: all.len(),
        pass_at_1: solved as f64 / n,
        pass_at_k: None,
        tool_calls_per_episode: Some(all.iter().map(|t| t.tool_calls).sum::<usize>() as f64 / n),
        runs_per_episode: Some(all.iter().map(runs_of).sum::<usize>() as f64 / n),
        tool_calls_by_tool: Some(calls_by_tool(all.iter())),
        tokens_per_solved: (solved > 0).then(|| generated as f64 / solved as f64),
        memory_hits_per_episode: config.tools.memory.is_some().then(|| memory_hits(all.iter())),
        context_prefix_tokens: Some(all.iter().map(|t| t.prompt_len).sum::<usize>() as f64 / n),
    })
}
