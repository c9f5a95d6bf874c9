//! Prints greedy transcripts of a checkpointed policy on held-out tasks: what it wrote, what the
//! tools said, the reward. `cargo run --release -p squid-pipeline --example transcript --
//! runs/<run>/checkpoints/warmup/model.safetensors [tasks per level] [seed] [runs/<run>/config.json]`
//!
//! With the run's `config.json`, the episodes get that run's tools (memory, search, lint, think
//! placement, library in context), and when it draws project tasks, held-out projects are shown
//! too, task by task, each project's memory kept by the run's storage policy.

use squid_pipeline::env::{EpisodeConfig, Task};
use squid_pipeline::model::{Model, SessionConfig};
use squid_pipeline::rollout::{rollout_with, RolloutConfig, RolloutTools, Trajectory};
use squid_pipeline::tokenizer::Tokenizer;
use squid_pipeline::train::tools::{commit_group, held_out_projects, rollout_tools, ProjectMemories};
use squid_pipeline::train::{held_out_tasks, TrainConfig};

fn show(tokenizer: &Tokenizer, task: &Task, t: &Trajectory) {
    let r = t.reward.as_ref();
    let place = task.project.map_or(String::new(), |p| format!(" task {} of the project", p.position));
    println!(
        "=== {} / {} (seed {}){place}: reward {:?}",
        task.level.name(),
        task.family,
        task.seed,
        r.map(|r| (r.passed, r.total))
    );
    println!("{}", task.prompt().trim_end());
    println!("--- reference:\n{}", task.reference_program());
    let calls: Vec<String> =
        t.notes.tools.by_tool().iter().filter(|(_, n)| *n > 0).map(|(name, n)| format!("{name} {n}")).collect();
    println!("--- tool calls: {}", calls.join(", "));
    println!("--- episode:\n{}\n", tokenizer.decode_text(&t.tokens[t.prompt_len..]));
}

fn main() -> Result<(), squid_pipeline::Error> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: transcript MODEL.safetensors [tasks per level] [seed] [config.json]");
    let per_level: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let run_config: TrainConfig = match args.get(4) {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| squid_pipeline::Error::Config(format!("{p}: {e}")))?;
            serde_json::from_str(&text).map_err(|e| squid_pipeline::Error::Config(format!("{p}: {e}")))?
        }
        None => TrainConfig::default(),
    };
    let model = Model::load(path)?;
    let tokenizer = Tokenizer::new();
    let limits = &run_config.limits;
    let config = RolloutConfig {
        group_size: 1,
        temperature: 0.0,
        top_p: 1.0,
        max_turns: limits.max_turns,
        max_new_tokens: limits.max_new_tokens,
        max_context: limits.max_context,
        seed,
    };
    let tools = &run_config.tools;
    let episode =
        EpisodeConfig { max_tool_calls: limits.max_turns, tools: tools.switches(), ..EpisodeConfig::default() };
    let extras =
        RolloutTools { library_in_context: tools.library_in_context, think: tools.think, ..RolloutTools::default() };
    // The run's prompts: examples cut, constants withheld, as its evaluations saw them.
    let tasks: Vec<_> = held_out_tasks(seed, per_level).into_iter().map(|t| run_config.prompted(t)).collect();
    let mut session = model.session(SessionConfig::default())?;
    let batch = rollout_with(&mut session, &tokenizer, &tasks, episode, &config, &extras)?;
    drop(session);
    for (task, t) in tasks.iter().zip(&batch.trajectories) {
        show(&tokenizer, task, t);
    }
    if tools.projects > 0.0 {
        let projects = held_out_projects(seed, per_level.max(1));
        let mut memories = ProjectMemories::default();
        for project in &projects {
            for task in project {
                let extras = rollout_tools(tools, std::slice::from_ref(task), &mut memories, false);
                let mut session = model.session(SessionConfig::default())?;
                let batch =
                    rollout_with(&mut session, &tokenizer, std::slice::from_ref(task), episode, &config, &extras)?;
                let t = &batch.trajectories[0];
                show(&tokenizer, task, t);
                if let (Some(policy), Some(place)) = (tools.memory, task.project) {
                    let memory = memories.get(place.seed, tools.memory_budget());
                    commit_group(policy, memory, task, &[t], &[t.reward_value() as f32]);
                }
            }
        }
    }
    Ok(())
}
