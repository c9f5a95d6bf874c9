//! The rollout with issue 21's tools: every tool trace replays through the loop token for token
//! (so the warm-up shows the policy exactly what the loop does), disabled tools and ruled-out
//! think spans are never sampled.

use super::mock::{one_hot, teacher, MockPolicy};
use super::*;
use crate::env::{generate_project, Memory, MemoryPolicy};
use crate::traces::{tool_trace, ToolTraceKind, TraceTools};

fn all_on() -> EpisodeConfig {
    EpisodeConfig {
        max_tool_calls: 8,
        tools: ToolSwitches { memory: true, search: true, lint: true, top_k: 2 },
        ..EpisodeConfig::default()
    }
}

fn greedy() -> RolloutConfig {
    RolloutConfig {
        group_size: 1,
        temperature: 0.0,
        top_p: 1.0,
        max_turns: 3,
        max_new_tokens: 200,
        max_context: 2048,
        seed: 3,
    }
}

#[test]
fn every_tool_trace_replays_through_the_loop() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let project = generate_project(11);
    let cases = [
        (ToolTraceKind::Search, 2, false, None),
        (ToolTraceKind::Recall, 1, false, None),
        (ToolTraceKind::Store, 0, false, None),
        (ToolTraceKind::Lint, 3, false, None),
        (ToolTraceKind::Search, 3, true, None),
        (ToolTraceKind::RepairThinkAfter, 1, false, Some(ThinkPlacement::AfterTool)),
    ];
    for (kind, position, library_in_context, think) in cases {
        let task = project[position].clone();
        let switches = TraceTools { memory: true, search: true, lint: true, library_in_context, think };
        let trace = tool_trace(&tok, &task, kind, 5, all_on(), &switches).unwrap().expect("the trace applies");
        trace.validate().unwrap();
        assert_eq!(trace.reward.as_ref().unwrap().value, 1.0, "{kind:?}");
        // The recall trace's memory: what the trace gave its episode.
        let mut memories = vec![None];
        if kind == ToolTraceKind::Recall {
            let helper = &task.library[0];
            let mut m = Memory::new(1024);
            m.store(&format!("{} {}", helper.description, helper.code));
            memories[0] = Some(m);
        }
        let extras = RolloutTools { memories, split_memory: false, library_in_context, think, first_task: 0 };
        let mut policy = MockPolicy::new(vocab, teacher(vocab, vec![trace.tokens.clone()]));
        let batch = rollout_with(&mut policy, &tok, std::slice::from_ref(&task), all_on(), &greedy(), &extras).unwrap();
        let t = &batch.trajectories[0];
        assert_eq!(t.tokens, trace.tokens, "{kind:?}: the loop reproduces the trace");
        assert_eq!(t.segments, trace.segments, "{kind:?}");
        assert_eq!(t.loss_mask, trace.loss_mask, "{kind:?}");
        assert_eq!(t.prompt_len, trace.prompt_len, "{kind:?}");
        assert_eq!(t.notes.tools, trace.notes.tools, "{kind:?}");
        assert_eq!(t.reward_value(), 1.0, "{kind:?}");
        let counts = t.notes.tools;
        let used = match kind {
            ToolTraceKind::Search => counts.search,
            ToolTraceKind::Recall => counts.recall,
            ToolTraceKind::Store => counts.store,
            ToolTraceKind::Lint => counts.lint,
            _ => counts.think,
        };
        assert_eq!(used, 1, "{kind:?}: {counts:?}");
        if kind == ToolTraceKind::Recall {
            assert_eq!(t.notes.recalled.len(), 1);
        }
        if kind == ToolTraceKind::Store {
            assert_eq!(t.notes.stored.len(), 1);
        }
        assert_eq!(batch.stats.tool_counts, counts);
        assert_eq!(batch.stats.prefix_tokens, t.prompt_len);
    }
    // The library in context: one Document per library entry before the first sampled token.
    let task = &project[3];
    let prefix = context_prefix(&tok, task, true);
    assert_eq!(prefix.iter().filter(|(_, k)| *k == SegmentKind::Document).count(), task.library.len());
    assert_eq!(context_prefix(&tok, task, false).len(), 1);
    let _ = MemoryPolicy::Never;
}

#[test]
fn disabled_tools_and_ruled_out_thinks_are_never_sampled() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let task = generate_project(4)[2].clone();
    // A policy that always wants the token `want` most, then `<submit>`.
    let prefers = |want: u32| -> super::mock::LogitsFn {
        Box::new(move |_h: &[u32]| {
            let mut row = one_hot(vocab, want);
            row[SUBMIT as usize] = 20.0;
            row
        })
    };
    for want in [SEARCH, STORE, RECALL, LINT, END_SEARCH] {
        let mut policy = MockPolicy::new(vocab, prefers(want));
        let batch =
            rollout(&mut policy, &tok, std::slice::from_ref(&task), EpisodeConfig::default(), &greedy()).unwrap();
        let t = &batch.trajectories[0];
        assert!(!t.policy_tokens().contains(&want), "tool token {want} sampled while off");
        assert_eq!(t.stop, Some(StopReason::Submit));
    }
    for (placement, allowed_first) in
        [(ThinkPlacement::Off, false), (ThinkPlacement::Before, true), (ThinkPlacement::AfterTool, false)]
    {
        let extras = RolloutTools { think: Some(placement), ..RolloutTools::default() };
        let mut policy = MockPolicy::new(vocab, prefers(THINK));
        let cfg = RolloutConfig { max_new_tokens: 6, ..greedy() };
        let batch =
            rollout_with(&mut policy, &tok, std::slice::from_ref(&task), EpisodeConfig::default(), &cfg, &extras)
                .unwrap();
        let sampled = batch.trajectories[0].policy_tokens();
        assert_eq!(sampled.first() == Some(&THINK), allowed_first, "{placement:?}: {sampled:?}");
        // With no tool output in the episode, after-tool and off never allow it anywhere.
        if !allowed_first {
            assert!(!sampled.contains(&THINK), "{placement:?}: {sampled:?}");
        }
    }
}

/// A scripted agent for a task whose prompt withholds its constants: it writes the program with
/// the constants' letters; if `run_first`, it `<run>`s it, then reads each `L = VALUE` of the
/// answer (the Document in its own context, token by token) and writes the program with the
/// values; else it submits with every constant guessed as 0.
fn constant_reader(tok: &Tokenizer, task: &crate::env::Task, run_first: bool) -> super::mock::LogitsFn {
    use crate::tokenizer::{END_OUT, OUT};
    let vocab = tok.vocab_size();
    let symbolic = tok.encode_program(&task.symbolic_program().unwrap()).unwrap();
    let letters: Vec<u32> = task
        .parts
        .iter()
        .filter_map(|p| p.withheld.as_ref())
        .flat_map(|w| w.constants.iter().map(|(name, _)| tok.id(name).unwrap()))
        .collect();
    let (with, equals, comma, semicolon) =
        (tok.id("with").unwrap(), tok.id("=").unwrap(), tok.id(",").unwrap(), tok.id(";").unwrap());
    let zero = tok.encode_program("0").unwrap();
    Box::new(move |history: &[u32]| {
        let written = history.len() - 1 - history.iter().rposition(|&t| t == CODE).unwrap();
        let body: Vec<u32> = match history.iter().rposition(|&t| t == OUT) {
            None if run_first => symbolic.iter().copied().chain([RUN]).collect(),
            None => {
                let guessed = symbolic.iter().flat_map(|t| if letters.contains(t) { zero.clone() } else { vec![*t] });
                guessed.chain([SUBMIT]).collect()
            }
            Some(start) => {
                let end = history.iter().rposition(|&t| t == END_OUT).unwrap();
                let answer = &history[start + 1..end];
                // Values: the tokens after `L =` up to `,` `;` or the end, after the last `with`
                // that precedes `L` (each part's constants follow `name with`).
                let mut values: Vec<(u32, Vec<u32>)> = Vec::new();
                let first_with = answer.iter().position(|&t| t == with).unwrap_or(answer.len());
                for i in first_with..answer.len().saturating_sub(1) {
                    if letters.contains(&answer[i]) && answer[i + 1] == equals {
                        let value: Vec<u32> =
                            answer[i + 2..].iter().copied().take_while(|&t| t != comma && t != semicolon).collect();
                        values.push((answer[i], value));
                    }
                }
                let filled = symbolic.iter().flat_map(|t| match values.iter().find(|(l, _)| l == t) {
                    Some((_, v)) => v.clone(),
                    None => vec![*t],
                });
                filled.chain([SUBMIT]).collect()
            }
        };
        one_hot(vocab, body[written.min(body.len() - 1)])
    })
}

#[test]
fn withheld_constants_reach_the_policy_only_through_a_run() {
    let tok = Tokenizer::new();
    let vocab = tok.vocab_size();
    let tasks: Vec<crate::env::Task> = (0..40)
        .map(|seed| crate::env::generate_task(crate::env::Level::Easy, seed).with_constants_withheld())
        .filter(|t| t.withholds_constants())
        .take(8)
        .collect();
    assert_eq!(tasks.len(), 8);
    let episode = EpisodeConfig::default();
    let cfg = RolloutConfig { max_new_tokens: 120, ..greedy() };
    let (mut ran, mut guessed) = (0.0, 0.0);
    for task in &tasks {
        // The prompt holds no value: the agent's program has letters where the constants go.
        let mut policy = MockPolicy::new(vocab, constant_reader(&tok, task, true));
        let batch = rollout(&mut policy, &tok, std::slice::from_ref(task), episode, &cfg).unwrap();
        let t = &batch.trajectories[0];
        assert_eq!((t.notes.tools.run, t.notes.tools.submit), (1, 1), "{}", task.prompt());
        assert_eq!(t.reward_value(), 1.0, "reading the run's answer solves {}", task.prompt());
        ran += t.reward_value();
        let mut policy = MockPolicy::new(vocab, constant_reader(&tok, task, false));
        let batch = rollout(&mut policy, &tok, std::slice::from_ref(task), episode, &cfg).unwrap();
        let t = &batch.trajectories[0];
        assert_eq!((t.notes.tools.run, t.notes.tools.submit), (0, 1));
        guessed += t.reward_value();
    }
    // Guessing 0 for every constant solves fewer tasks than running first.
    assert!(guessed < ran, "guessed {guessed}, ran {ran}");
}
