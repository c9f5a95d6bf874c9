use squid_attention::segments::SegmentKind;

use super::*;
use crate::env::{generate_task, Level};
use crate::rollout::mock::{teacher, MockPolicy};
use crate::rollout::{rollout, RolloutConfig};
use crate::tokenizer::{END_OUT, OUT};

const KINDS: [TraceKind; 3] = [TraceKind::Direct, TraceKind::Repair, TraceKind::Think];

fn tasks(per_level: u64) -> Vec<Task> {
    Level::ALL.iter().flat_map(|&level| (0..per_level).map(move |seed| generate_task(level, 300 + seed))).collect()
}

fn episode_config() -> EpisodeConfig {
    EpisodeConfig { max_tool_calls: 4, ..EpisodeConfig::default() }
}

#[test]
fn trace_layout_invariants() {
    let tok = Tokenizer::new();
    for (i, task) in tasks(8).iter().enumerate() {
        for kind in KINDS {
            let t = trace(&tok, task, i, kind, 9, episode_config()).unwrap().expect("a failing mutation exists");
            t.validate().unwrap();
            let prompt = tok.prompt_tokens(task);
            assert_eq!(&t.tokens[..prompt.len()], &prompt[..]);
            assert_eq!(t.prompt_len, prompt.len());
            assert_eq!((*t.tokens.last().unwrap(), *t.loss_mask.last().unwrap()), (SUBMIT, true));
            assert_eq!(t.reward.as_ref().unwrap().value, 1.0, "{kind:?} {}", task.family);
            assert_eq!(t.stop, Some(StopReason::Submit));
            assert_eq!(t.task, i);
            // Segments: Global, then (Document, Global) per run.
            let docs: Vec<_> = t.segments.iter().filter(|s| s.kind == SegmentKind::Document).collect();
            assert_eq!(docs.len(), usize::from(kind == TraceKind::Repair));
            let mut start = 0;
            for s in &t.segments {
                let range = start..start + s.len;
                if s.kind == SegmentKind::Document {
                    assert_eq!((t.tokens[range.start], t.tokens[range.end - 1]), (OUT, END_OUT));
                    assert!(t.loss_mask[range.clone()].iter().all(|&m| !m));
                    assert_eq!((t.tokens[range.end], t.loss_mask[range.end]), (CODE, false), "forced <code>");
                    assert_eq!(t.tokens[range.start - 1], RUN);
                }
                start = range.end;
            }
            // Masks: true exactly after the prompt, outside documents and forced tokens.
            let forced = t.loss_mask[t.prompt_len..].iter().filter(|&&m| !m).count();
            let doc_len: usize = docs.iter().map(|s| s.len).sum();
            assert_eq!(forced, doc_len + docs.len());
            let (turns, calls) = match kind {
                TraceKind::Direct => (1, 1),
                TraceKind::Repair => (2, 2),
                TraceKind::Think => (1, 2),
            };
            assert_eq!((t.turns, t.tool_calls), (turns, calls), "{kind:?}");
            if kind == TraceKind::Think {
                assert_eq!(t.tokens[t.prompt_len], THINK);
            }
        }
    }
}

#[test]
fn repair_traces_show_a_real_failure() {
    let tok = Tokenizer::new();
    let config = episode_config();
    let mut kinds = std::collections::HashSet::new();
    for (i, task) in tasks(12).iter().enumerate() {
        let (mutation, buggy) = buggy_program(&tok, task, i as u64, &config).unwrap().expect("a failing mutation");
        kinds.insert(mutation);
        let text = tok.decode_program(&buggy);
        assert_ne!(text, tok.decode_program(&tok.encode_program(&task.reference_program()).unwrap()));
        // The output in the trace is what the environment says about this program.
        let t = trace(&tok, task, i, TraceKind::Repair, i as u64, config).unwrap().unwrap();
        let mut episode = Episode::new(task.clone(), config);
        let output = episode.step(ToolCall::Run { program: text.clone() }).unwrap().text;
        let expected = tok.tool_output_tokens(&output);
        let start = t.prompt_len + buggy.len() + 1;
        assert_eq!(&t.tokens[start..start + expected.len()], &expected[..]);
        let failed = match check_examples(task, &text, config.reward.budget) {
            Ok(report) => report.passed < report.total && output.contains("first failure"),
            Err(problem) => {
                mutation == Mutation::DropPart && output.starts_with("missing function") && problem == output
            }
        };
        assert!(failed, "{mutation:?}: {text} -> {output}");
    }
    assert!(kinds.len() >= 3, "mutations used: {kinds:?}");
}

#[test]
fn replaying_traces_through_the_loop_reproduces_them() {
    let tok = Tokenizer::new();
    let tasks = tasks(3);
    let config = RolloutConfig {
        group_size: 2,
        temperature: 0.0,
        top_p: 1.0,
        max_turns: 3,
        max_new_tokens: 300,
        max_context: 4096,
        seed: 1,
    };
    for kind in KINDS {
        let traces: Vec<Trajectory> = tasks
            .iter()
            .enumerate()
            .map(|(i, task)| trace(&tok, task, i, kind, 5, episode_config()).unwrap().unwrap())
            .collect();
        let scripts = traces.iter().map(|t| t.tokens.clone()).collect();
        let mut policy = MockPolicy::new(tok.vocab_size(), teacher(tok.vocab_size(), scripts));
        let batch = rollout(&mut policy, &tok, &tasks, episode_config(), &config).unwrap();
        for (got, want) in batch.trajectories.iter().zip(traces.iter().flat_map(|t| [t, t])) {
            assert_eq!(got.tokens, want.tokens, "{kind:?} task {}", want.task);
            assert_eq!(got.segments, want.segments);
            assert_eq!(got.loss_mask, want.loss_mask);
            assert_eq!(got.policy_tokens(), want.policy_tokens());
            assert_eq!((got.turns, got.tool_calls, got.stop), (want.turns, want.tool_calls, want.stop));
            assert_eq!(got.reward, want.reward);
            assert_eq!(got.reward_value(), 1.0);
        }
    }
}

#[test]
fn warmup_traces_are_deterministic_and_mixed() {
    let tok = Tokenizer::new();
    let tasks = tasks(3);
    let a = warmup_traces(&tok, &tasks, 42, episode_config()).unwrap();
    let b = warmup_traces(&tok, &tasks, 42, episode_config()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), tasks.len() * 2 + tasks.len() / 3);
    assert!(a.iter().all(|t| t.reward_value() == 1.0));
    let repairs = a.iter().filter(|t| t.segments.iter().any(|s| s.kind == SegmentKind::Document)).count();
    assert_eq!(repairs, tasks.len());
    // Too few tool calls for a repair is an error, not a silent truncation.
    let one = EpisodeConfig { max_tool_calls: 1, ..EpisodeConfig::default() };
    assert!(trace(&tok, &tasks[0], 0, TraceKind::Repair, 0, one).is_err());
    assert!(trace(&tok, &tasks[0], 0, TraceKind::Think, 0, one).is_err());
    // The trainer's entry point: repair or direct, same layout as `trace`.
    for (i, task) in tasks.iter().enumerate() {
        let r = sft_trace(task, &tok, true, i as u64, episode_config()).unwrap();
        assert_eq!(r, trace(&tok, task, 0, TraceKind::Repair, i as u64, episode_config()).unwrap().unwrap());
        let d = sft_trace(task, &tok, false, i as u64, episode_config()).unwrap();
        assert_eq!(d, trace(&tok, task, 0, TraceKind::Direct, 0, episode_config()).unwrap().unwrap());
    }
}

#[test]
fn repair_traces_fit_the_default_context() {
    // Prompt, program and tool-output lengths per level (printed with --nocapture); a whole
    // repair trace must fit the rollout's default context.
    let tok = Tokenizer::new();
    let max_context = RolloutConfig::default().max_context;
    for level in Level::ALL {
        let (mut prompt, mut program, mut output, mut total) = (Vec::new(), Vec::new(), Vec::new(), 0usize);
        for seed in 0..60 {
            let task = generate_task(level, 2000 + seed);
            let t = trace(&tok, &task, 0, TraceKind::Repair, seed, episode_config()).unwrap().unwrap();
            prompt.push(t.prompt_len);
            program.push(tok.encode_program(&task.reference_program()).unwrap().len());
            output.push(t.segments.iter().find(|s| s.kind == SegmentKind::Document).unwrap().len);
            total = total.max(t.tokens.len());
        }
        let stat = |v: &[usize]| {
            format!(
                "{}..{} (mean {:.0})",
                v.iter().min().unwrap(),
                v.iter().max().unwrap(),
                v.iter().sum::<usize>() as f64 / v.len() as f64
            )
        };
        eprintln!(
            "{:6} prompt {} program {} tool output {} longest repair trace {total}",
            level.name(),
            stat(&prompt),
            stat(&program),
            stat(&output)
        );
        assert!(total <= max_context, "{level:?}: a repair trace of {total} tokens");
    }
}

#[test]
fn withheld_constant_traces_run_the_lettered_program_read_the_values_and_replay_through_the_loop() {
    let tok = Tokenizer::new();
    let withholding: Vec<Task> =
        tasks(12).into_iter().map(Task::with_constants_withheld).filter(Task::withholds_constants).collect();
    assert!(withholding.iter().any(|t| t.level == Level::Easy) && withholding.len() >= 8);
    let mut traces = Vec::new();
    for (i, task) in withholding.iter().enumerate() {
        // Direct and repair traces both run first (nothing else can learn the constants);
        // a think-then-write trace would have to guess them, so there is none.
        let (mutation, ids) = buggy_program(&tok, task, i as u64, &episode_config()).unwrap().unwrap();
        assert_eq!(mutation, Mutation::WithheldConstants);
        assert_eq!(
            tok.decode_program(&ids),
            tok.decode_program(&tok.encode_program(&task.symbolic_program().unwrap()).unwrap())
        );
        let direct = trace(&tok, task, i, TraceKind::Direct, 3, episode_config()).unwrap().unwrap();
        let repair = trace(&tok, task, i, TraceKind::Repair, 3, episode_config()).unwrap().unwrap();
        assert_eq!(direct, repair);
        assert!(trace(&tok, task, i, TraceKind::Think, 3, episode_config()).unwrap().is_none());
        assert_eq!(
            sft_trace(task, &tok, false, 3, episode_config()).unwrap(),
            trace(&tok, task, 0, TraceKind::Repair, 3, episode_config()).unwrap().unwrap()
        );
        direct.validate().unwrap();
        assert_eq!((direct.turns, direct.tool_calls, direct.reward_value()), (2, 2, 1.0));
        // The run's answer in the trace states the constants.
        let constants = tok.tool_output_tokens(&task.constants_text().unwrap());
        let inner = &constants[1..constants.len() - 1];
        assert!(direct.tokens.windows(inner.len()).any(|w| w == inner), "{}", task.constants_text().unwrap());
        traces.push(direct);
    }
    // The loop (a teacher-forced mock policy) reproduces every trace, tool answers included.
    let config = RolloutConfig {
        group_size: 1,
        temperature: 0.0,
        top_p: 1.0,
        max_turns: 3,
        max_new_tokens: 300,
        max_context: 4096,
        seed: 1,
    };
    let scripts = traces.iter().map(|t| t.tokens.clone()).collect();
    let mut policy = MockPolicy::new(tok.vocab_size(), teacher(tok.vocab_size(), scripts));
    let batch = rollout(&mut policy, &tok, &withholding, episode_config(), &config).unwrap();
    for (got, want) in batch.trajectories.iter().zip(&traces) {
        assert_eq!(got.tokens, want.tokens);
        assert_eq!(got.segments, want.segments);
        assert_eq!(got.reward_value(), 1.0);
        assert_eq!(got.notes.tools.run, 1);
    }
    // Warm-up traces of withholding tasks all run once.
    let warm = warmup_traces(&tok, &withholding, 7, episode_config()).unwrap();
    assert_eq!(warm.len(), 2 * withholding.len());
    assert!(warm.iter().all(|t| t.tool_calls == 2 && t.reward_value() == 1.0));
}
