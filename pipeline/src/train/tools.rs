//! Issue 21's tools in training: project tasks among the training draws, the projects'
//! memories and their storage policies (with the with/without-memory credit), the lint reward,
//! and the per-tool metrics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::env::{generate_project, lint, Memory, MemoryPolicy, Task, ToolCounts, PROJECT_TASKS};
use crate::rollout::{RolloutTools, Trajectory};
use crate::traces::TraceTools;

use super::config::{ToolsConfig, TrainConfig};
use super::eval::splitmix;

/// The memories of a run's projects, by project seed (saved with each GRPO checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProjectMemories {
    /// Project seed -> its memory.
    pub memories: BTreeMap<u64, Memory>,
}

impl ProjectMemories {
    /// The memory of `seed`'s project, created empty with the run's budget.
    pub fn get(&mut self, seed: u64, budget: usize) -> &mut Memory {
        self.memories.entry(seed).or_insert_with(|| Memory::new(budget))
    }
}

/// The training project task for hash `h`, if the run draws project tasks and `h` picks one:
/// a project of the run's pool (seed top bit clear) and a position in it.
pub fn training_project_task(config: &TrainConfig, h: u64) -> Option<Task> {
    let tools = &config.tools;
    if tools.projects <= 0.0 {
        return None;
    }
    let draw = (splitmix(h ^ 0x9_0E1E) >> 11) as f64 / (1u64 << 53) as f64;
    if draw >= tools.projects {
        return None;
    }
    let pick = splitmix(h ^ 0x9_0E1F);
    let project = splitmix(config.seed ^ 0x9_0E20 ^ (pick % tools.pool())) >> 1;
    let position = (splitmix(pick) % PROJECT_TASKS as u64) as usize;
    Some(generate_project(project).swap_remove(position))
}

/// The held-out projects: `n` of them, seeds with the top bit set (never trained on).
pub fn held_out_projects(seed: u64, n: usize) -> Vec<Vec<Task>> {
    (0..n as u64).map(|i| generate_project((1u64 << 63) | (splitmix(seed ^ 0x9_0E21 ^ i) >> 1))).collect()
}

/// The trace switches of a run.
pub fn trace_tools(tools: &ToolsConfig) -> TraceTools {
    TraceTools {
        memory: tools.memory.is_some(),
        search: tools.search,
        lint: tools.lint,
        library_in_context: tools.library_in_context,
        think: tools.think,
    }
}

/// The rollout additions for `tasks` (memories of project tasks when the memory tool is on).
pub fn rollout_tools(tools: &ToolsConfig, tasks: &[Task], memories: &mut ProjectMemories, split: bool) -> RolloutTools {
    let budget = tools.memory_budget();
    let memories = tasks
        .iter()
        .map(|t| match (tools.memory, t.project) {
            (Some(_), Some(place)) => Some(memories.get(place.seed, budget).clone()),
            _ => None,
        })
        .collect();
    RolloutTools {
        memories,
        split_memory: split && tools.memory == Some(MemoryPolicy::PolicyDecides),
        library_in_context: tools.library_in_context,
        think: tools.think,
        first_task: 0,
    }
}

fn solved(t: &Trajectory) -> bool {
    t.reward.as_ref().is_some_and(|r| !r.malformed && r.total > 0 && r.passed == r.total)
}

/// What one group's episodes put into their project's memory under `policy`, and the credit
/// of recalled snippets (policy-decides: reward of each with-memory episode that recalled a
/// snippet minus the mean reward of the group's episodes without the memory). Returns the
/// snippets stored.
pub fn commit_group(
    policy: MemoryPolicy,
    memory: &mut Memory,
    task: &Task,
    group: &[&Trajectory],
    rewards: &[f32],
) -> usize {
    let describe = |t: &Trajectory| {
        t.notes.program.as_ref().map(|p| format!("{} {}", task.parts.first().map_or("", |p| p.description.as_str()), p))
    };
    let texts: Vec<String> = match policy {
        MemoryPolicy::Never => Vec::new(),
        MemoryPolicy::EveryAccepted => group.iter().find(|t| solved(t)).and_then(|t| describe(t)).into_iter().collect(),
        MemoryPolicy::FixesAfterFailure => {
            group.iter().find(|t| solved(t) && t.notes.failing_run).and_then(|t| describe(t)).into_iter().collect()
        }
        MemoryPolicy::PolicyDecides => {
            let without: Vec<f64> =
                group.iter().zip(rewards).filter(|(t, _)| !t.notes.with_memory).map(|(_, &r)| f64::from(r)).collect();
            if !without.is_empty() {
                let baseline = without.iter().sum::<f64>() / without.len() as f64;
                for (t, &r) in group.iter().zip(rewards) {
                    for snippet in &t.notes.recalled {
                        memory.credit(snippet, f64::from(r) - baseline);
                    }
                }
            }
            group.iter().flat_map(|t| t.notes.stored.iter().cloned()).collect()
        }
    };
    let mut stored = 0;
    for text in texts {
        if memory.store(&text).starts_with("store: stored") {
            stored += 1;
        }
    }
    stored
}

/// Whether `t`'s last program is well formed and lint-clean for `task` (the lint reward's test).
pub fn lint_clean(task: &Task, t: &Trajectory) -> bool {
    let well_formed = t.reward.as_ref().is_some_and(|r| !r.malformed);
    well_formed && t.notes.program.as_deref().is_some_and(|p| lint(task, p).is_empty())
}

/// Mean calls per episode by tool, over `trajectories`.
pub fn calls_by_tool<'a>(trajectories: impl Iterator<Item = &'a Trajectory>) -> BTreeMap<String, f64> {
    let mut counts = ToolCounts::default();
    let mut n = 0usize;
    for t in trajectories {
        counts.merge(&t.notes.tools);
        n += 1;
    }
    counts.by_tool().iter().map(|&(name, c)| (name.to_string(), c as f64 / n.max(1) as f64)).collect()
}

/// Mean calls per episode by level of the episode's task (`tasks[t.task]`), then by tool.
/// Trajectories whose task index is out of range are left out.
pub fn calls_by_level<'a>(
    tasks: &[Task],
    trajectories: impl Iterator<Item = &'a Trajectory>,
) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut levels: BTreeMap<&'static str, Vec<&'a Trajectory>> = BTreeMap::new();
    for t in trajectories {
        if let Some(task) = tasks.get(t.task) {
            levels.entry(task.level.name()).or_default().push(t);
        }
    }
    levels.into_iter().map(|(level, ts)| (level.to_string(), calls_by_tool(ts.into_iter()))).collect()
}

/// Recalls that returned at least one snippet, per episode.
pub fn memory_hits<'a>(trajectories: impl Iterator<Item = &'a Trajectory>) -> f64 {
    let (mut hits, mut n) = (0usize, 0usize);
    for t in trajectories {
        hits += t.notes.recalled.len();
        n += 1;
    }
    hits as f64 / n.max(1) as f64
}

/// File of the projects' memories in a GRPO checkpoint directory.
const MEMORIES_FILE: &str = "memories.json";

/// Writes `memories` into the checkpoint directory `dir` (atomically).
pub fn save_memories(dir: &std::path::Path, memories: &ProjectMemories) -> Result<(), crate::Error> {
    let json = serde_json::to_vec(memories).expect("memories serialize");
    crate::fsutil::write_atomic(&dir.join(MEMORIES_FILE), &json)
}

/// The memories saved with the checkpoint `dir` (empty when it has none: a run without memory).
pub fn load_memories(dir: &std::path::Path) -> Result<ProjectMemories, crate::Error> {
    let path = dir.join(MEMORIES_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| crate::Error::Checkpoint {
            path: path.clone(),
            reason: format!("memories do not parse: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProjectMemories::default()),
        Err(e) => Err(crate::fsutil::io_error(&path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Reward;

    fn episode(solved: bool, failing_run: bool, with_memory: bool, stored: &[&str], recalled: &[&str]) -> Trajectory {
        let mut t = Trajectory::new(0, 0, &[1]);
        t.reward = Some(Reward {
            value: f64::from(u8::from(solved)),
            passed: usize::from(solved),
            total: 1,
            malformed: false,
            penalty: 0.0,
        });
        t.notes.program = Some(format!("def f(x) = {}", u8::from(solved)));
        t.notes.failing_run = failing_run;
        t.notes.with_memory = with_memory;
        t.notes.stored = stored.iter().map(|s| s.to_string()).collect();
        t.notes.recalled = recalled.iter().map(|s| s.to_string()).collect();
        t
    }

    #[test]
    fn storage_policies_store_what_they_say() {
        let task = generate_project(1)[0].clone();
        let group = [
            episode(false, true, true, &["note a"], &[]),
            episode(true, false, true, &[], &[]),
            episode(true, true, false, &["note b"], &[]),
        ];
        let refs: Vec<&Trajectory> = group.iter().collect();
        let rewards = [0.0, 1.0, 1.0];
        let stored = |policy| {
            let mut m = Memory::new(1024);
            commit_group(policy, &mut m, &task, &refs, &rewards);
            m.entries().iter().map(|e| e.text.clone()).collect::<Vec<_>>()
        };
        let description = &task.parts[0].description;
        assert!(stored(MemoryPolicy::Never).is_empty());
        // The first solved episode's program, with the task's description.
        assert_eq!(stored(MemoryPolicy::EveryAccepted), [format!("{description} def f(x) = 1")]);
        // Only a solve that followed a failing run (episode 2; episode 1 never failed).
        assert_eq!(stored(MemoryPolicy::FixesAfterFailure), [format!("{description} def f(x) = 1")]);
        let mut m = Memory::new(1024);
        let group2 = [episode(true, false, true, &[], &[]), episode(true, false, true, &[], &[])];
        let refs2: Vec<&Trajectory> = group2.iter().collect();
        commit_group(MemoryPolicy::FixesAfterFailure, &mut m, &task, &refs2, &[1.0, 1.0]);
        assert!(m.entries().is_empty(), "no fix, nothing stored");
        assert_eq!(stored(MemoryPolicy::PolicyDecides), ["note a", "note b"]);
    }

    #[test]
    fn policy_decides_credits_recalls_against_the_no_memory_half() {
        let task = generate_project(1)[1].clone();
        let mut m = Memory::new(1024);
        m.store("useful");
        m.store("useless");
        let group = [
            episode(true, false, true, &[], &["useful"]),
            episode(false, false, true, &[], &["useless"]),
            episode(false, false, false, &[], &[]),
            episode(true, false, false, &[], &[]),
        ];
        let refs: Vec<&Trajectory> = group.iter().collect();
        commit_group(MemoryPolicy::PolicyDecides, &mut m, &task, &refs, &[1.0, 0.0, 0.0, 1.0]);
        // Baseline 0.5: the useful recall gained 0.5, the useless one lost 0.5.
        let credit = |text: &str| m.entries().iter().find(|e| e.text == text).unwrap().mean_credit();
        assert_eq!((credit("useful"), credit("useless")), (0.5, -0.5));
    }

    #[test]
    fn project_draws_follow_the_fraction_and_default_runs_draw_none() {
        let mut config = TrainConfig::default();
        assert!((0..500).all(|h| training_project_task(&config, h).is_none()));
        assert!(!serde_json::to_string(&config).unwrap().contains("\"tools\""), "default configs are unchanged");
        config.tools.projects = 0.5;
        let drawn: Vec<Task> = (0..400).filter_map(|h| training_project_task(&config, h)).collect();
        assert!((150..250).contains(&drawn.len()), "{}", drawn.len());
        assert!(
            drawn.iter().all(|t| t.project.is_some_and(|p| p.seed >> 63 == 0)),
            "training seeds have the top bit clear"
        );
        let seeds: std::collections::BTreeSet<u64> = drawn.iter().map(|t| t.seed).collect();
        assert!(seeds.len() <= config.tools.pool() as usize);
        assert!(held_out_projects(1, 3).iter().all(|p| p[0].seed >> 63 == 1));
    }

    #[test]
    fn memories_round_trip_through_a_checkpoint_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_memories(dir.path()).unwrap(), ProjectMemories::default());
        let mut memories = ProjectMemories::default();
        memories.get(7, 100).store("kept");
        save_memories(dir.path(), &memories).unwrap();
        assert_eq!(load_memories(dir.path()).unwrap(), memories);
        std::fs::write(dir.path().join(MEMORIES_FILE), b"{ torn").unwrap();
        assert!(matches!(load_memories(dir.path()), Err(crate::Error::Checkpoint { .. })));
    }
}
