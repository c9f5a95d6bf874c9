//! Supervised warm-up traces: episodes written from a task's reference solution, in exactly the
//! token layout the rollout loop produces (same [`Trajectory`] push functions, same prompt and
//! tool-output tokens, the same real tool output from [`Episode::step`]), so a policy trained on
//! them can act in the loop.
//!
//! - [`TraceKind::Direct`]: write the reference program, `<submit>`.
//! - [`TraceKind::Repair`]: write a buggy program (a mutation of the reference that fails a
//!   visible example: a literal off by one, a comparison flipped, `+`/`-` swapped, a builtin or
//!   two arguments swapped, a part dropped), `<run>`, read the real output, `<code>`, write the reference, `<submit>`.
//! - [`TraceKind::Think`]: a `<think>` span restating the first part's description, then the
//!   reference program, `<submit>`.

#[cfg(test)]
mod tests;

use crate::env::{check_examples, Episode, EpisodeConfig, Rng, Task, ToolCall};
use crate::rollout::{StopReason, Trajectory};
use crate::tokenizer::{TokenClass, Tokenizer, CODE, DIGIT_0, END_THINK, RUN, SUBMIT, THINK};
use crate::Error;

/// Which kind of trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraceKind {
    /// Reference program, submit.
    Direct,
    /// Buggy program, run, tool output, reference program, submit.
    Repair,
    /// Think span, reference program, submit.
    Think,
}

/// How a buggy program was made from the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// An integer literal changed by one, or `[]` made `[0]`.
    Literal,
    /// The two arguments of a call swapped.
    SwapArguments,
    /// A comparison flipped (`<` and `<=`, `>` and `>=`, `==` and `!=`, `<` and `>`).
    Comparison,
    /// `+` and `-` swapped, or `*` made `+`.
    Arithmetic,
    /// A builtin replaced (`min`/`max`, `map`/`filter`).
    Builtin,
    /// One part of a multi-part program left out.
    DropPart,
}

/// Every single mutation of the program `ids`, in a fixed order.
fn mutants(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<(Mutation, Vec<u32>)> {
    let id = |text: &str| tokenizer.id(text).expect("language tokens are in the vocabulary");
    let swaps: [(&str, &str, Mutation); 12] = [
        ("<", "<=", Mutation::Comparison),
        ("<=", "<", Mutation::Comparison),
        (">", ">=", Mutation::Comparison),
        (">=", ">", Mutation::Comparison),
        ("==", "!=", Mutation::Comparison),
        ("!=", "==", Mutation::Comparison),
        ("+", "-", Mutation::Arithmetic),
        ("-", "+", Mutation::Arithmetic),
        ("*", "+", Mutation::Arithmetic),
        ("max", "min", Mutation::Builtin),
        ("min", "max", Mutation::Builtin),
        ("map", "filter", Mutation::Builtin),
    ];
    let mut out = Vec::new();
    for (at, &token) in ids.iter().enumerate() {
        for &(from, to, kind) in &swaps {
            if token == id(from) {
                let mut mutant = ids.to_vec();
                mutant[at] = id(to);
                out.push((kind, mutant));
            }
        }
        if token == id(">") || token == id("<") {
            let mut mutant = ids.to_vec();
            mutant[at] = id(if token == id(">") { "<" } else { ">" });
            out.push((Mutation::Comparison, mutant));
        }
    }
    // Swapped arguments of a two-argument call `f(a, b)` with one-token arguments.
    let is_word = |t: u32| matches!(tokenizer.class(t), Some(TokenClass::Word));
    for at in 0..ids.len().saturating_sub(5) {
        let window = &ids[at..at + 6];
        if is_word(window[0])
            && window[1] == id("(")
            && window[3] == id(",")
            && window[5] == id(")")
            && window[2] != window[4]
        {
            let mut mutant = ids.to_vec();
            mutant.swap(at + 2, at + 4);
            out.push((Mutation::SwapArguments, mutant));
        }
    }
    // An empty list literal made `[0]`.
    for at in 0..ids.len().saturating_sub(1) {
        if ids[at] == id("[") && ids[at + 1] == id("]") {
            let mut mutant = ids[..=at].to_vec();
            mutant.push(DIGIT_0);
            mutant.extend_from_slice(&ids[at + 1..]);
            out.push((Mutation::Literal, mutant));
        }
    }
    // Integer literals: maximal runs of digits.
    let is_digit = |t: u32| matches!(tokenizer.class(t), Some(TokenClass::Digit(_)));
    let mut at = 0;
    while at < ids.len() {
        if !is_digit(ids[at]) {
            at += 1;
            continue;
        }
        let start = at;
        while at < ids.len() && is_digit(ids[at]) {
            at += 1;
        }
        let text: String = ids[start..at].iter().map(|&t| char::from(b'0' + (t - DIGIT_0) as u8)).collect();
        let Ok(value) = text.parse::<u64>() else { continue };
        for new in [value.checked_add(1), value.checked_sub(1)].into_iter().flatten() {
            let mut mutant = ids[..start].to_vec();
            mutant.extend(new.to_string().bytes().map(|b| DIGIT_0 + u32::from(b - b'0')));
            mutant.extend_from_slice(&ids[at..]);
            out.push((Mutation::Literal, mutant));
        }
    }
    // Parts: each `def` up to the next one.
    let def = id("def");
    let starts: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == def).collect();
    if starts.len() > 1 {
        for (k, &start) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(ids.len());
            let mut mutant = ids[..start].to_vec();
            mutant.extend_from_slice(&ids[end..]);
            out.push((Mutation::DropPart, mutant));
        }
    }
    out
}

/// A buggy version of `task`'s reference program, as tokens: the first mutation, in an order
/// shuffled by `seed`, that fails a visible example (or, for a dropped part, lacks a function).
/// `None` if no mutation fails.
pub fn buggy_program(
    tokenizer: &Tokenizer,
    task: &Task,
    seed: u64,
    episode_config: &EpisodeConfig,
) -> Result<Option<(Mutation, Vec<u32>)>, Error> {
    let reference = tokenizer.encode_program(&task.reference_program())?;
    let mut candidates = mutants(tokenizer, &reference);
    let mut rng = Rng::new(seed ^ 0x005E_ED0F_B065);
    for i in (1..candidates.len()).rev() {
        candidates.swap(i, rng.index(i + 1));
    }
    for (kind, ids) in candidates {
        let text = tokenizer.decode_program(&ids);
        let fails = match check_examples(task, &text, episode_config.reward.budget) {
            Ok(report) => report.passed < report.total,
            Err(problem) => kind == Mutation::DropPart && problem.starts_with("missing function"),
        };
        if fails {
            return Ok(Some((kind, ids)));
        }
    }
    Ok(None)
}

/// Appends one sampled turn (`program` then the tool token) and makes the tool call the loop
/// would make; returns the tool output's text and whether the episode ended.
fn write_turn(
    tokenizer: &Tokenizer,
    trajectory: &mut Trajectory,
    episode: &mut Episode,
    body: &[u32],
    tool: u32,
) -> Result<(String, bool), Error> {
    for &token in body {
        trajectory.push_sampled(token, 0.0);
    }
    trajectory.push_sampled(tool, 0.0);
    trajectory.turns += 1;
    let program = tokenizer.turn_program(body);
    let call = if tool == SUBMIT { ToolCall::Submit { program } } else { ToolCall::Run { program } };
    let output = episode.step(call).map_err(|e| Error::Config(format!("trace episode: {e}")))?;
    Ok((output.text, output.done))
}

/// The trace of `kind` for `task` (`task_index` is recorded in the trajectory; `seed` picks the
/// mutation of a repair trace). `None` for a repair trace when no mutation fails a visible
/// example. The trace ends with `<submit>` and its reward (1 for a correct reference).
pub fn trace(
    tokenizer: &Tokenizer,
    task: &Task,
    task_index: usize,
    kind: TraceKind,
    seed: u64,
    episode_config: EpisodeConfig,
) -> Result<Option<Trajectory>, Error> {
    let mut trajectory = Trajectory::new(task_index, 0, &tokenizer.prompt_tokens(task));
    let mut episode = Episode::new(task.clone(), episode_config);
    let reference = tokenizer.encode_program(&task.reference_program())?;
    let mut body = Vec::new();
    match kind {
        TraceKind::Direct => {}
        TraceKind::Think => {
            let thought = tokenizer.encode_text(&task.parts[0].description);
            body.push(THINK);
            body.extend_from_slice(&thought);
            body.push(END_THINK);
            let text = tokenizer.decode_text(&thought);
            let output =
                episode.step(ToolCall::Think { text }).map_err(|e| Error::Config(format!("trace episode: {e}")))?;
            if output.done {
                return Err(Error::Config(format!(
                    "max_tool_calls {} is too small for a think trace",
                    episode_config.max_tool_calls
                )));
            }
        }
        TraceKind::Repair => {
            let Some((_, buggy)) = buggy_program(tokenizer, task, seed, &episode_config)? else {
                return Ok(None);
            };
            let (text, done) = write_turn(tokenizer, &mut trajectory, &mut episode, &buggy, RUN)?;
            if done {
                return Err(Error::Config(format!(
                    "max_tool_calls {} is too small for a repair trace",
                    episode_config.max_tool_calls
                )));
            }
            trajectory.push_document(&tokenizer.tool_output_tokens(&text));
            trajectory.push_forced(&[CODE]);
        }
    }
    body.extend_from_slice(&reference);
    let (_, done) = write_turn(tokenizer, &mut trajectory, &mut episode, &body, SUBMIT)?;
    debug_assert!(done, "submit ends the episode");
    trajectory.reward = Some(episode.finish());
    trajectory.tool_calls = episode.tool_calls();
    trajectory.stop = Some(StopReason::Submit);
    Ok(Some(trajectory))
}

/// One warm-up trace of `task`: a repair trace if `repair` (a direct one when no mutation fails a
/// visible example), else a direct one. `seed` picks the mutation. Recorded as task 0, sample 0.
pub fn sft_trace(
    task: &Task,
    tokenizer: &Tokenizer,
    repair: bool,
    seed: u64,
    episode_config: EpisodeConfig,
) -> Result<Trajectory, Error> {
    if repair {
        if let Some(t) = trace(tokenizer, task, 0, TraceKind::Repair, seed, episode_config)? {
            return Ok(t);
        }
    }
    trace(tokenizer, task, 0, TraceKind::Direct, seed, episode_config)?
        .ok_or_else(|| Error::Config("a direct trace always exists".into()))
}

/// Warm-up traces for `tasks`: a direct and a repair trace per task, and a think trace for every
/// third task. `seed` picks the mutations. Repair traces whose task has no failing mutation are
/// skipped.
pub fn warmup_traces(
    tokenizer: &Tokenizer,
    tasks: &[Task],
    seed: u64,
    episode_config: EpisodeConfig,
) -> Result<Vec<Trajectory>, Error> {
    let mut out = Vec::with_capacity(tasks.len() * 2 + tasks.len() / 3 + 1);
    for (i, task) in tasks.iter().enumerate() {
        let task_seed = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut kinds = vec![TraceKind::Direct, TraceKind::Repair];
        if i % 3 == 2 {
            kinds.push(TraceKind::Think);
        }
        for kind in kinds {
            if let Some(t) = trace(tokenizer, task, i, kind, task_seed, episode_config)? {
                out.push(t);
            }
        }
    }
    Ok(out)
}
