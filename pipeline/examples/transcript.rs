//! Prints greedy transcripts of a checkpointed policy on held-out tasks: what it wrote, what the
//! tools said, the reward. `cargo run --release -p squid-pipeline --example transcript --
//! runs/<run>/checkpoints/warmup/model.safetensors [tasks per level] [seed]`

use squid_pipeline::model::{Model, SessionConfig};
use squid_pipeline::rollout::{rollout, RolloutConfig};
use squid_pipeline::tokenizer::Tokenizer;
use squid_pipeline::train::held_out_tasks;

fn main() -> Result<(), squid_pipeline::Error> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: transcript MODEL.safetensors [tasks per level] [seed]");
    let per_level: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let model = Model::load(path)?;
    let tokenizer = Tokenizer::new();
    let tasks = held_out_tasks(seed, per_level);
    let config = RolloutConfig {
        group_size: 1,
        temperature: 0.0,
        top_p: 1.0,
        max_turns: 3,
        max_new_tokens: 160,
        max_context: 768,
        seed,
    };
    let mut session = model.session(SessionConfig::default())?;
    let batch = rollout(&mut session, &tokenizer, &tasks, Default::default(), &config)?;
    for (task, t) in tasks.iter().zip(&batch.trajectories) {
        let r = t.reward.as_ref();
        println!(
            "=== {} / {} (seed {}): reward {:?}",
            task.level.name(),
            task.family,
            task.seed,
            r.map(|r| (r.passed, r.total))
        );
        println!("{}", task.prompt().trim_end());
        println!("--- reference:\n{}", task.reference_program());
        println!("--- episode:\n{}\n", tokenizer.decode_text(&t.tokens[t.prompt_len..]));
    }
    Ok(())
}
