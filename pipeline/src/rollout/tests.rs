use squid_attention::segments::{Segment, SegmentKind};

use super::mock::{hashed, one_hot, repeat_turn, teacher, MockPolicy};
use super::*;
use crate::env::{generate_task, score, Level};
use crate::tokenizer::{BOS, END_OUT, OUT};

fn tasks(per_level: u64) -> Vec<Task> {
    Level::ALL.iter().flat_map(|&level| (0..per_level).map(move |seed| generate_task(level, 100 + seed))).collect()
}

fn config(group_size: usize, temperature: f32) -> RolloutConfig {
    RolloutConfig { group_size, temperature, top_p: 1.0, max_turns: 3, max_new_tokens: 120, max_context: 2048, seed: 7 }
}

fn episode_config() -> EpisodeConfig {
    EpisodeConfig { max_tool_calls: 16, ..EpisodeConfig::default() }
}

/// A program for `task` that parses and names every part but returns 0.
fn zero_program(task: &Task) -> String {
    task.parts.iter().map(|p| format!("def {}({}) = 0", p.name, p.params.join(", "))).collect::<Vec<_>>().join("\n")
}

/// Positions of each Document segment.
fn documents(t: &Trajectory) -> Vec<std::ops::Range<usize>> {
    let mut start = 0;
    let mut out = Vec::new();
    for s in &t.segments {
        if s.kind == SegmentKind::Document {
            out.push(start..start + s.len);
        }
        start += s.len;
    }
    out
}

#[test]
fn run_output_lands_as_a_document_then_forced_code() {
    let tok = Tokenizer::new();
    let task = generate_task(Level::Easy, 3);
    let program_text = zero_program(&task);
    let program = tok.encode_program(&program_text).unwrap();
    let mut policy = MockPolicy::new(tok.vocab_size(), repeat_turn(tok.vocab_size(), program.clone(), RUN));
    let cfg = RolloutConfig { max_turns: 2, ..config(1, 0.0) };
    let batch = rollout(&mut policy, &tok, std::slice::from_ref(&task), episode_config(), &cfg).unwrap();
    let t = &batch.trajectories[0];
    t.validate().unwrap();

    // The output the environment gives for this program, computed independently.
    let mut episode = Episode::new(task.clone(), episode_config());
    let expected = episode.step(ToolCall::Run { program: tok.decode_program(&program) }).unwrap().text;
    assert!(expected.starts_with("passed"), "{expected}");
    let document = tok.tool_output_tokens(&expected);

    let prompt = tok.prompt_tokens(&task);
    let mut tokens = prompt.clone();
    tokens.extend(&program);
    tokens.push(RUN);
    tokens.extend(&document);
    tokens.push(CODE);
    tokens.extend(&program);
    tokens.push(RUN);
    assert_eq!(t.tokens, tokens);
    let first = prompt.len() + program.len() + 1;
    assert_eq!(
        t.segments,
        vec![Segment::global(first), Segment::document(document.len()), Segment::global(program.len() + 2)]
    );
    let mut mask = vec![false; prompt.len()];
    mask.extend(vec![true; program.len() + 1]);
    mask.extend(vec![false; document.len() + 1]);
    mask.extend(vec![true; program.len() + 1]);
    assert_eq!(t.loss_mask, mask);
    assert_eq!((t.turns, t.tool_calls, t.stop), (2, 2, Some(StopReason::MaxTurns)));
    let reward = t.reward.as_ref().unwrap();
    assert!(!reward.malformed);
    assert_eq!(*reward, score(&task, &tok.decode_program(&program), &episode_config().reward, program_text.len()));

    // What the policy was told: prompt (Global), output (Document), <code> (Global).
    let kinds: Vec<(Vec<u32>, SegmentKind)> = policy.appends.iter().map(|(_, t, k)| (t.clone(), *k)).collect();
    assert_eq!(
        kinds,
        vec![(prompt, SegmentKind::Global), (document, SegmentKind::Document), (vec![CODE], SegmentKind::Global)]
    );
    assert_eq!(policy.live(), 0);
}

#[test]
fn submit_ends_with_the_hidden_test_reward() {
    let tok = Tokenizer::new();
    let task = generate_task(Level::Medium, 5);
    let program = tok.encode_program(&task.reference_program()).unwrap();
    let mut policy = MockPolicy::new(tok.vocab_size(), repeat_turn(tok.vocab_size(), program.clone(), SUBMIT));
    let batch = rollout(&mut policy, &tok, std::slice::from_ref(&task), episode_config(), &config(2, 0.0)).unwrap();
    for t in &batch.trajectories {
        assert_eq!(t.stop, Some(StopReason::Submit));
        assert_eq!((t.turns, t.tool_calls), (1, 1));
        assert_eq!(t.reward.as_ref().unwrap().value, 1.0);
        assert_eq!(*t.tokens.last().unwrap(), SUBMIT);
        assert_eq!(t.sampled_tokens(), program.len() + 1);
    }
}

#[test]
fn each_limit_ends_the_episode_with_a_reward() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let task = generate_task(Level::Easy, 11);
    let prompt_len = tok.prompt_tokens(&task).len();
    let x = tok.id("x").unwrap();
    let run_one = |policy: &mut MockPolicy, cfg: &RolloutConfig, episode: EpisodeConfig| {
        let batch = rollout(policy, &tok, std::slice::from_ref(&task), episode, cfg).unwrap();
        assert_eq!(policy.live(), 0);
        let t = batch.trajectories.into_iter().next().unwrap();
        t.validate().unwrap();
        assert!(t.reward.is_some(), "every ended episode has a reward");
        assert!(t.tokens.len() <= cfg.max_context);
        t
    };

    // Max tokens: a turn that never calls a tool.
    let mut policy = MockPolicy::new(vocab, Box::new(move |_: &[u32]| one_hot(vocab, x)));
    let cfg = RolloutConfig { max_new_tokens: 9, ..config(1, 0.0) };
    let t = run_one(&mut policy, &cfg, episode_config());
    assert_eq!((t.stop, t.sampled_tokens(), t.turns), (Some(StopReason::MaxTokens), 9, 0));
    assert!(t.reward.as_ref().unwrap().malformed, "no program was run");

    // Max context while sampling.
    let mut policy = MockPolicy::new(vocab, Box::new(move |_: &[u32]| one_hot(vocab, x)));
    let cfg = RolloutConfig { max_new_tokens: 1000, max_context: prompt_len + 7, ..config(1, 0.0) };
    let t = run_one(&mut policy, &cfg, episode_config());
    assert_eq!((t.stop, t.tokens.len()), (Some(StopReason::MaxContext), prompt_len + 7));

    // Max context at a tool output: the run happens (and is scored), its output does not fit.
    let program = tok.encode_program(&task.reference_program()).unwrap();
    let mut policy = MockPolicy::new(vocab, repeat_turn(vocab, program.clone(), RUN));
    let cfg = RolloutConfig { max_context: prompt_len + program.len() + 4, ..config(1, 0.0) };
    let t = run_one(&mut policy, &cfg, episode_config());
    assert_eq!((t.stop, t.tool_calls, t.turns), (Some(StopReason::MaxContext), 1, 1));
    assert_eq!(*t.tokens.last().unwrap(), RUN);
    assert_eq!(t.reward.as_ref().unwrap().value, 1.0, "finish scores the last program run");

    // Max turns.
    let mut policy = MockPolicy::new(vocab, repeat_turn(vocab, program.clone(), RUN));
    let cfg = RolloutConfig { max_turns: 3, ..config(1, 0.0) };
    let t = run_one(&mut policy, &cfg, episode_config());
    assert_eq!((t.stop, t.turns, documents(&t).len()), (Some(StopReason::MaxTurns), 3, 2));
    assert_eq!(t.reward.as_ref().unwrap().value, 1.0);

    // The episode's tool-call limit.
    let mut policy = MockPolicy::new(vocab, repeat_turn(vocab, program, RUN));
    let cfg = RolloutConfig { max_turns: 50, ..config(1, 0.0) };
    let t = run_one(&mut policy, &cfg, EpisodeConfig { max_tool_calls: 4, ..EpisodeConfig::default() });
    assert_eq!((t.stop, t.turns, t.tool_calls), (Some(StopReason::ToolLimit), 4, 4));
}

#[test]
fn think_spans_are_tool_calls_and_not_program_text() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let task = generate_task(Level::Easy, 2);
    let mut body = vec![THINK];
    body.extend(tok.encode_text("Return the sum"));
    body.push(END_THINK);
    body.extend(tok.encode_program(&task.reference_program()).unwrap());
    let mut policy = MockPolicy::new(vocab, repeat_turn(vocab, body.clone(), SUBMIT));
    let batch = rollout(&mut policy, &tok, std::slice::from_ref(&task), episode_config(), &config(1, 0.0)).unwrap();
    let t = &batch.trajectories[0];
    assert_eq!((t.stop, t.tool_calls, t.turns), (Some(StopReason::Submit), 2, 1));
    assert_eq!(t.reward.as_ref().unwrap().value, 1.0);
    assert!(documents(t).is_empty(), "a think call appends nothing");

    // With a tool-call limit of 1 the think call itself ends the episode.
    let mut policy = MockPolicy::new(vocab, repeat_turn(vocab, body, SUBMIT));
    let limited = EpisodeConfig { max_tool_calls: 1, ..EpisodeConfig::default() };
    let batch = rollout(&mut policy, &tok, std::slice::from_ref(&task), limited, &config(1, 0.0)).unwrap();
    assert_eq!(batch.trajectories[0].stop, Some(StopReason::ToolLimit));
    assert_eq!(*batch.trajectories[0].tokens.last().unwrap(), END_THINK);
}

#[test]
fn greedy_is_deterministic_and_seed_independent() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let tasks = tasks(1);
    let run = |seed: u64| {
        let mut policy = MockPolicy::new(vocab, hashed(vocab, 8.0));
        let cfg = RolloutConfig { seed, ..config(3, 0.0) };
        rollout(&mut policy, &tok, &tasks, episode_config(), &cfg).unwrap().trajectories
    };
    let a = run(1);
    assert_eq!(a, run(1));
    let b = run(2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.tokens, &x.loss_mask, &x.segments), (&y.tokens, &y.loss_mask, &y.segments));
    }
    for group in a.chunks(3) {
        assert!(group.iter().all(|t| t.tokens == group[0].tokens), "greedy samples of one task agree");
    }
    assert!(a.iter().all(|t| t.sampled_tokens() > 0));
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let tasks = tasks(1);
    let run = |seed: u64| {
        let mut policy = MockPolicy::new(vocab, hashed(vocab, 6.0));
        let cfg = RolloutConfig { seed, ..config(4, 1.0) };
        rollout(&mut policy, &tok, &tasks, episode_config(), &cfg).unwrap().trajectories
    };
    let a = run(11);
    assert_eq!(a, run(11));
    let b = run(12);
    assert!(a.iter().zip(&b).any(|(x, y)| x.tokens != y.tokens), "another seed, other samples");
    for group in a.chunks(4) {
        assert!(group.iter().any(|t| t.tokens != group[0].tokens), "samples of one task differ");
        for (g, t) in group.iter().enumerate() {
            assert_eq!((t.task, t.sample), (group[0].task, g));
        }
    }
}

/// The smallest set of most probable tokens (ties: lower id first) whose mass reaches `top_p`,
/// computed plainly.
fn naive_nucleus(logits: &[f32], temperature: f32, top_p: f32) -> Vec<u32> {
    let probs: Vec<f64> = logits.iter().map(|&v| (f64::from(v) / f64::from(temperature)).exp()).collect();
    let total: f64 = probs.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap().then(a.cmp(&b)));
    let mut mass = 0.0;
    let mut out = Vec::new();
    for i in order {
        out.push(i as u32);
        mass += probs[i] / total;
        if mass >= f64::from(top_p) - 1e-9 {
            break;
        }
    }
    out
}

#[test]
fn top_p_never_samples_outside_the_nucleus() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let tasks = tasks(1);
    for (top_p, temperature) in [(0.3, 1.0), (0.7, 0.7), (0.9, 1.5)] {
        let mut policy = MockPolicy::new(vocab, hashed(vocab, 10.0));
        let cfg = RolloutConfig { top_p, temperature, ..config(3, temperature) };
        let batch = rollout(&mut policy, &tok, &tasks, episode_config(), &cfg).unwrap();
        let mut logits_of = hashed(vocab, 10.0);
        let mut checked = 0;
        for t in &batch.trajectories {
            for (i, &sampled) in t.loss_mask.iter().enumerate() {
                if sampled {
                    let logits = logits_of(&t.tokens[..i]);
                    let nucleus = naive_nucleus(&logits, temperature, top_p);
                    assert!(nucleus.contains(&t.tokens[i]), "token {} outside the top-{top_p} nucleus", t.tokens[i]);
                    // The recorded log-probability is the temperature-1 one of these logits.
                    let lp = log_prob(&logits, t.tokens[i]).unwrap();
                    assert!((t.logprobs[i] - lp).abs() < 1e-5);
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "{checked}");
    }
}

#[test]
fn sampler_keeps_to_the_nucleus_and_follows_the_distribution() {
    let mut rng = Rng::new(3);
    let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0, 2.0, f32::NEG_INFINITY];
    for top_p in [0.05f32, 0.4, 0.6, 0.8, 0.95, 1.0] {
        let nucleus = naive_nucleus(&logits, 1.0, top_p);
        for _ in 0..300 {
            let (t, _) = sample_token(&logits, 1.0, top_p, &mut rng).unwrap();
            assert!(nucleus.contains(&t), "top_p {top_p}: {t} not in {nucleus:?}");
        }
    }
    // Frequencies follow softmax: with temperature 1 and no truncation, token 0 and token 5 have
    // p = e^2 / Z each (about 0.33); 6000 draws put each within 0.03 of it (> 5 sigma).
    let z: f64 = logits.iter().map(|&v| f64::from(v).exp()).sum();
    let mut counts = [0usize; 7];
    for _ in 0..6000 {
        counts[sample_token(&logits, 1.0, 1.0, &mut rng).unwrap().0 as usize] += 1;
    }
    for (i, &c) in counts.iter().enumerate() {
        let p = f64::from(logits[i]).exp() / z;
        assert!((c as f64 / 6000.0 - p).abs() < 0.03, "token {i}: {c} draws, p {p}");
    }
    assert_eq!(counts[6], 0, "-inf is never drawn");
    // Greedy: the first maximum.
    assert_eq!(sample_token(&logits, 0.0, 0.5, &mut rng).unwrap().0, 0);
    // Bad rows are errors, not panics.
    assert!(matches!(sample_token(&[0.0, f32::NAN], 1.0, 1.0, &mut rng), Err(Error::BadLogits(_))));
    assert!(matches!(sample_token(&[f32::INFINITY], 1.0, 1.0, &mut rng), Err(Error::BadLogits(_))));
    assert!(matches!(sample_token(&[f32::NEG_INFINITY; 3], 1.0, 1.0, &mut rng), Err(Error::BadLogits(_))));
    assert!(matches!(sample_token(&[], 1.0, 1.0, &mut rng), Err(Error::BadLogits(_))));
    let lp: f64 = (0..6).map(|t| f64::from(log_prob(&logits, t).unwrap()).exp()).sum();
    assert!((lp - 1.0).abs() < 1e-6);
}

#[test]
fn prompt_once_per_task_forks_batched_steps_and_masks() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let tasks = tasks(2);
    let group = 4;
    let mut policy = MockPolicy::new(vocab, hashed(vocab, 6.0));
    let batch = rollout(&mut policy, &tok, &tasks, episode_config(), &config(group, 1.0)).unwrap();
    assert_eq!(batch.trajectories.len(), tasks.len() * group);

    // One prompt append and one open per task; G - 1 forks; everything closed.
    let prompt_appends: Vec<_> = policy.appends.iter().filter(|(_, t, _)| t.first() == Some(&BOS)).collect();
    assert_eq!(prompt_appends.len(), tasks.len());
    for ((_, tokens, kind), task) in prompt_appends.iter().zip(&tasks) {
        assert_eq!((tokens, *kind), (&tok.prompt_tokens(task), SegmentKind::Global));
    }
    assert_eq!(
        (policy.opened, policy.forks, policy.closed),
        (tasks.len(), tasks.len() * (group - 1), tasks.len() * group)
    );
    assert_eq!(policy.live(), 0);

    // Every step carries all samples still active: the first one has all of them.
    assert_eq!(policy.steps[0].len(), tasks.len() * group);
    let longest = batch.trajectories.iter().map(Trajectory::sampled_tokens).max().unwrap();
    assert!(policy.steps.len() <= longest, "{} steps for {longest} tokens", policy.steps.len());
    assert_eq!(batch.stats.policy_steps, policy.steps.len());

    // Masks: exactly the tokens after the prompt that are neither tool output nor forced <code>.
    let mut sampled = 0;
    for (i, t) in batch.trajectories.iter().enumerate() {
        assert_eq!((t.task, t.sample), (i / group, i % group));
        t.validate().unwrap();
        let docs = documents(t);
        for (p, &m) in t.loss_mask.iter().enumerate() {
            let in_doc = docs.iter().any(|d| d.contains(&p));
            let forced_code = docs.iter().any(|d| d.end == p);
            assert_eq!(m, p >= t.prompt_len && !in_doc && !forced_code, "trajectory {i} token {p}");
            if forced_code {
                assert_eq!(t.tokens[p], CODE);
            }
        }
        for d in docs {
            assert_eq!((t.tokens[d.start], t.tokens[d.end - 1]), (OUT, END_OUT));
        }
        assert!(t.reward.is_some() && t.stop.is_some());
        sampled += t.sampled_tokens();
    }
    // Every sampled token but each episode's last went through a batched step.
    let stepped: usize = policy.steps.iter().map(Vec::len).sum();
    assert_eq!(sampled, stepped + batch.trajectories.len());
    assert_eq!(batch.stats.generated_tokens, sampled);
    let calls: usize = batch.trajectories.iter().map(|t| t.tool_calls).sum();
    assert_eq!(batch.stats.tool_calls, calls);
    assert!((batch.stats.tool_calls_per_episode - calls as f64 / batch.trajectories.len() as f64).abs() < 1e-12);
}

#[test]
fn forks_share_the_prompt_and_equal_outputs_hit_the_document_cache() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let task = generate_task(Level::Hard, 4);
    let program = tok.encode_program(&zero_program(&task)).unwrap();
    let mut policy = MockPolicy::new(vocab, repeat_turn(vocab, program, RUN));
    let cfg = RolloutConfig { max_turns: 2, ..config(3, 0.0) };
    let batch = rollout(&mut policy, &tok, std::slice::from_ref(&task), episode_config(), &cfg).unwrap();
    let stats = batch.stats;
    let prompt = tok.prompt_tokens(&task).len() as u64 * super::mock::BYTES_PER_TOKEN;
    assert_eq!(stats.kv_after_fork.bytes_held, prompt);
    assert_eq!(stats.kv_after_fork.bytes_unshared, 3 * prompt);
    // Three greedy samples run the same program: one output prefilled, two cache hits.
    assert_eq!((stats.kv.doc_misses, stats.kv.doc_hits), (1, 2));
    assert!(stats.kv.bytes_held < stats.kv.bytes_unshared);
    assert!(stats.tokens_per_second > 0.0 && stats.wall_seconds > 0.0);
    assert!(stats.reward_seconds > 0.0 && stats.reward_seconds <= stats.wall_seconds);
    assert_eq!(stats.tool_calls, 6);
}

#[test]
fn bad_configurations_and_policies_are_errors() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let tasks = tasks(1);
    let bad = [
        RolloutConfig { group_size: 0, ..config(1, 1.0) },
        RolloutConfig { top_p: 0.0, ..config(1, 1.0) },
        RolloutConfig { top_p: 1.5, ..config(1, 1.0) },
        RolloutConfig { temperature: f32::NAN, ..config(1, 1.0) },
        RolloutConfig { temperature: -1.0, ..config(1, 1.0) },
        RolloutConfig { max_turns: 0, ..config(1, 1.0) },
        RolloutConfig { max_new_tokens: 0, ..config(1, 1.0) },
        RolloutConfig { max_context: 10, ..config(1, 1.0) },
    ];
    for cfg in bad {
        let mut policy = MockPolicy::new(vocab, hashed(vocab, 1.0));
        let err = rollout(&mut policy, &tok, &tasks, episode_config(), &cfg).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{cfg:?}: {err}");
        assert_eq!(policy.live(), 0, "{cfg:?}");
    }
    let mut small = MockPolicy::new(vocab - 1, hashed(vocab - 1, 1.0));
    assert!(matches!(rollout(&mut small, &tok, &tasks, episode_config(), &config(1, 1.0)), Err(Error::Config(_))));

    // NaN logits mid-rollout: an error, and every context is still closed.
    let mut nan = MockPolicy::new(
        vocab,
        Box::new(move |h: &[u32]| if h.len() > 200 { vec![f32::NAN; vocab] } else { vec![0.0; vocab] }),
    );
    let err = rollout(&mut nan, &tok, &tasks, episode_config(), &config(2, 1.0)).unwrap_err();
    assert!(matches!(err, Error::BadLogits(_)), "{err}");
    assert_eq!(nan.live(), 0);
}

#[test]
fn padded_vocabulary_ids_are_never_sampled() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let tasks = tasks(1);
    let padded = vocab + 8;
    let mut policy = MockPolicy::new(
        padded,
        Box::new(move |h: &[u32]| {
            let mut row = hashed(padded, 2.0)(h);
            row[padded - 1] = 50.0;
            row
        }),
    );
    let batch = rollout(&mut policy, &tok, &tasks, episode_config(), &config(2, 1.0)).unwrap();
    assert!(batch.trajectories.iter().all(|t| t.tokens.iter().all(|&x| (x as usize) < vocab)));
}

#[test]
fn a_taught_policy_solves_tasks() {
    // The teacher mock knows each task's reference: greedy decoding submits it, reward 1.
    let tok = Tokenizer::new();
    let tasks = tasks(2);
    let scripts: Vec<Vec<u32>> = tasks
        .iter()
        .map(|task| {
            let mut s = tok.prompt_tokens(task);
            s.extend(tok.encode_program(&task.reference_program()).unwrap());
            s.push(SUBMIT);
            s
        })
        .collect();
    let mut policy = MockPolicy::new(tok.vocab_size(), teacher(tok.vocab_size(), scripts));
    let cfg = RolloutConfig { max_new_tokens: 200, ..config(2, 0.0) };
    let batch = rollout(&mut policy, &tok, &tasks, episode_config(), &cfg).unwrap();
    for t in &batch.trajectories {
        assert_eq!(t.reward_value(), 1.0, "task {}", t.task);
    }
}

#[test]
fn training_examples_shift_tokens_masks_and_segments() {
    let tok = Tokenizer::new();
    let task = generate_task(Level::Easy, 3);
    let program = tok.encode_program(&zero_program(&task)).unwrap();
    let mut policy = MockPolicy::new(tok.vocab_size(), repeat_turn(tok.vocab_size(), program, RUN));
    let cfg = RolloutConfig { max_turns: 2, ..config(1, 1.0) };
    let batch = rollout(&mut policy, &tok, std::slice::from_ref(&task), episode_config(), &cfg).unwrap();
    let t = &batch.trajectories[0];
    let ex = t.training_example();
    let n = t.tokens.len();
    assert_eq!(ex.inputs, t.tokens[..n - 1]);
    assert_eq!(ex.targets, t.tokens[1..]);
    assert_eq!(ex.mask, t.loss_mask[1..]);
    assert_eq!(ex.old_logprobs, t.logprobs[1..]);
    assert_eq!(ex.segments.iter().map(|s| s.len).sum::<usize>(), n - 1);
    assert_eq!(ex.segments[..ex.segments.len() - 1], t.segments[..t.segments.len() - 1]);
    // Masked targets are exactly the sampled tokens, with their log-probabilities (<= 0: the
    // scripted policy's one-hot rows give probability 1, log-prob exactly 0, in f32).
    assert_eq!(ex.mask.iter().filter(|&&m| m).count(), t.sampled_tokens());
    assert!(ex.mask.iter().zip(&ex.old_logprobs).all(|(&m, &lp)| if m { lp <= 0.0 } else { lp == 0.0 }));
    // A one-token trajectory has nothing to train on.
    assert_eq!(Trajectory::new(0, 0, &[BOS]).training_example(), TrainingExample::default());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any row, temperature and top-p: the draw is in the plainly computed nucleus, greedy is the
    /// first maximum, and the returned log-probability is the temperature-1 one.
    #[test]
    fn sampled_tokens_lie_in_the_nucleus(
        row in proptest::collection::vec(-8.0f32..8.0, 1..40),
        temperature in 0.2f32..3.0,
        top_p in 0.01f32..1.0,
        seed in 0u64..1000,
    ) {
        let mut rng = Rng::new(seed);
        let nucleus = naive_nucleus(&row, temperature, top_p);
        for _ in 0..20 {
            let (t, lp) = sample_token(&row, temperature, top_p, &mut rng).unwrap();
            proptest::prop_assert!(nucleus.contains(&t), "{t} not in {nucleus:?}");
            proptest::prop_assert!((lp - log_prob(&row, t).unwrap()).abs() < 1e-6);
        }
        let (g, _) = sample_token(&row, 0.0, top_p, &mut rng).unwrap();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        proptest::prop_assert_eq!(g as usize, row.iter().position(|&v| v == max).unwrap());
    }
}
