//! Supervised warm-up traces: episodes written from a task's reference solution, in exactly the
//! token layout the rollout loop produces (same [`Trajectory`] push functions, same prompt and
//! tool-output tokens, the same real tool output from [`Episode::step`]), so a policy trained on
//! them can act in the loop.
//!
//! - [`TraceKind::Direct`]: write the reference program, `<submit>`.
//!   (For a prompt that withholds constants, direct and repair traces both write the program
//!   with the constants' letters, `<run>` it, and write the reference with the values the
//!   failure states.)
//! - [`TraceKind::Repair`]: write a buggy program (a mutation of the reference that fails a
//!   visible example: a literal off by one, a comparison flipped, `+`/`-` swapped, a builtin or
//!   two arguments swapped, a part dropped), `<run>`, read the real output, `<code>`, write the reference, `<submit>`.
//! - [`TraceKind::Think`]: a `<think>` span restating the first part's description, then the
//!   reference program, `<submit>`.
//! - Issue 21's tools ([`tool_trace`], [`ToolTraceKind`]): `<search>` or `<recall>` the project
//!   helper then write, `<store>` a helper, `<lint>` then submit, think after a run's output.

#[cfg(test)]
mod tests;

use squid_attention::segments::SegmentKind;

use crate::env::{check_examples, Episode, EpisodeConfig, Memory, Rng, Task, ToolCall, HELPER_WORDS};
use crate::rollout::{context_prefix, StopReason, ThinkPlacement, Trajectory};
use crate::tokenizer::{
    TokenClass, Tokenizer, CODE, DIGIT_0, END_RECALL, END_SEARCH, END_STORE, END_THINK, LINT, RECALL, RUN, SEARCH,
    STORE, SUBMIT, THINK,
};
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
    /// The program a withholding prompt allows: constants left as their letters (see
    /// [`Task::symbolic_program`]); its run fails and states their values.
    WithheldConstants,
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
    if let Some(symbolic) = task.symbolic_program() {
        return Ok(Some((Mutation::WithheldConstants, tokenizer.encode_program(&symbolic)?)));
    }
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
    let call = match tool {
        SUBMIT => ToolCall::Submit { program },
        LINT => ToolCall::Lint { program },
        _ => ToolCall::Run { program },
    };
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
    // A prompt that withholds constants leaves one way to the values: write the program with
    // their letters, run it, read them from the failure, write the reference.
    let kind = match kind {
        _ if !task.withholds_constants() => kind,
        TraceKind::Direct | TraceKind::Repair => TraceKind::Repair,
        TraceKind::Think => return Ok(None),
    };
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

/// Which of issue 21's tools the warm-up traces show (the run's switches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TraceTools {
    /// `<store>` / `<recall>` traces.
    pub memory: bool,
    /// `<search>` traces.
    pub search: bool,
    /// `<lint>` traces.
    pub lint: bool,
    /// Prompts carry the library as Documents (the search baseline).
    pub library_in_context: bool,
    /// Think placement (`None`: think traces before writing, as [`warmup_traces`] makes).
    pub think: Option<ThinkPlacement>,
}

/// The kinds of trace issue 21 adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolTraceKind {
    /// `<search> project helper </search>`, read the helper, write the reference, submit.
    Search,
    /// `<recall> project helper </recall>` from a memory holding the helper, write, submit.
    Recall,
    /// `<store>` the task's description and reference (the helper, for later tasks), then write
    /// the reference and submit.
    Store,
    /// Write the reference, `<lint>` it, read "no problems", write it again, submit.
    Lint,
    /// A repair trace with a `<think>` restating the failure right after the run's output.
    RepairThinkAfter,
    /// [`TraceKind::Think`]: think before writing (the prompt without the library).
    ThinkBefore,
}

/// Appends a span tool call (`open` text `close`) and makes it; returns the answer's text.
fn span_turn(
    tokenizer: &Tokenizer,
    trajectory: &mut Trajectory,
    episode: &mut Episode,
    open: u32,
    text: &str,
    close: u32,
) -> Result<String, Error> {
    let words = tokenizer.encode_text(text);
    trajectory.push_sampled(open, 0.0);
    for &t in &words {
        trajectory.push_sampled(t, 0.0);
    }
    trajectory.push_sampled(close, 0.0);
    trajectory.turns += 1;
    let decoded = tokenizer.decode_text(&words);
    let call = match open {
        STORE => ToolCall::Store { text: decoded },
        RECALL => ToolCall::Recall { query: decoded },
        _ => ToolCall::Search { query: decoded },
    };
    let output = episode.step(call).map_err(|e| Error::Config(format!("trace episode: {e}")))?;
    if output.done {
        return Err(Error::Config("max_tool_calls is too small for a tool trace".into()));
    }
    Ok(output.text)
}

/// The trace of `kind` for `task` under `tools`, or `None` when it does not apply (no library
/// to search or recall, no failing mutation for a repair). Same token layout as the rollout
/// (the prefix holds the library when `tools.library_in_context`).
pub fn tool_trace(
    tokenizer: &Tokenizer,
    task: &Task,
    kind: ToolTraceKind,
    seed: u64,
    episode_config: EpisodeConfig,
    tools: &TraceTools,
) -> Result<Option<Trajectory>, Error> {
    if kind == ToolTraceKind::ThinkBefore {
        return trace(tokenizer, task, 0, TraceKind::Think, seed, episode_config);
    }
    let prefix = context_prefix(tokenizer, task, tools.library_in_context);
    let mut trajectory = Trajectory::new(0, 0, &prefix[0].0);
    for (tokens, kind) in &prefix[1..] {
        match kind {
            SegmentKind::Document => trajectory.push_document(tokens),
            SegmentKind::Global => trajectory.push_forced(tokens),
        }
    }
    trajectory.prompt_len = trajectory.tokens.len();
    let mut episode = Episode::new(task.clone(), episode_config);
    let reference = tokenizer.encode_program(&task.reference_program())?;
    let mut body = Vec::new();
    let answer = match kind {
        ToolTraceKind::ThinkBefore => unreachable!("handled above"),
        ToolTraceKind::Search | ToolTraceKind::Recall if task.library.is_empty() => return Ok(None),
        ToolTraceKind::Search => span_turn(tokenizer, &mut trajectory, &mut episode, SEARCH, HELPER_WORDS, END_SEARCH)?,
        ToolTraceKind::Recall => {
            let helper = &task.library[0];
            let mut memory = Memory::new(1024);
            memory.store(&format!("{} {}", helper.description, helper.code));
            episode = episode.with_memory(memory);
            trajectory.notes.with_memory = true;
            span_turn(tokenizer, &mut trajectory, &mut episode, RECALL, HELPER_WORDS, END_RECALL)?
        }
        ToolTraceKind::Store => {
            let text = format!("{} {}", task.parts[0].description, task.parts[0].reference);
            span_turn(tokenizer, &mut trajectory, &mut episode, STORE, &text, END_STORE)?
        }
        ToolTraceKind::Lint => {
            let (text, done) = write_turn(tokenizer, &mut trajectory, &mut episode, &reference, LINT)?;
            if done {
                return Err(Error::Config("max_tool_calls is too small for a lint trace".into()));
            }
            text
        }
        ToolTraceKind::RepairThinkAfter => {
            let Some((_, buggy)) = buggy_program(tokenizer, task, seed, &episode_config)? else {
                return Ok(None);
            };
            let (text, done) = write_turn(tokenizer, &mut trajectory, &mut episode, &buggy, RUN)?;
            if done {
                return Err(Error::Config("max_tool_calls is too small for a repair trace".into()));
            }
            // The thought: the run's answer restated (its first line).
            let thought = tokenizer.encode_text(text.lines().next().unwrap_or(""));
            body.push(THINK);
            body.extend_from_slice(&thought);
            body.push(END_THINK);
            text
        }
    };
    trajectory.push_document(&tokenizer.tool_output_tokens(&answer));
    trajectory.push_forced(&[CODE]);
    if kind == ToolTraceKind::RepairThinkAfter {
        let text = tokenizer.decode_text(&body[1..body.len() - 1]);
        let output =
            episode.step(ToolCall::Think { text }).map_err(|e| Error::Config(format!("trace episode: {e}")))?;
        if output.done {
            return Err(Error::Config("max_tool_calls is too small for a think trace".into()));
        }
    }
    body.extend_from_slice(&reference);
    let (_, done) = write_turn(tokenizer, &mut trajectory, &mut episode, &body, SUBMIT)?;
    debug_assert!(done, "submit ends the episode");
    trajectory.reward = Some(episode.finish());
    trajectory.tool_calls = episode.tool_calls();
    trajectory.notes.tools = episode.tool_counts();
    trajectory.notes.stored = episode.stored().to_vec();
    trajectory.notes.recalled = episode.recalled().to_vec();
    trajectory.stop = Some(StopReason::Submit);
    Ok(Some(trajectory))
}

/// One warm-up trace of `task` for a run with issue 21's tools: a tool trace drawn by `seed`
/// among those the switches allow and the task fits (search or recall for a project task with
/// a library, store for a project's helper task, lint, think after a tool's output), else
/// [`sft_trace`] (whose think-before trace is not used under `--think off` or `after-tool`;
/// [`sft_trace`] makes no think trace anyway).
pub fn sft_tool_trace(
    task: &Task,
    tokenizer: &Tokenizer,
    repair: bool,
    seed: u64,
    episode_config: EpisodeConfig,
    tools: &TraceTools,
) -> Result<Trajectory, Error> {
    if task.withholds_constants() {
        return sft_trace(task, tokenizer, true, seed, episode_config);
    }
    let mut kinds = Vec::new();
    let project_later = !task.library.is_empty();
    if project_later && tools.search {
        kinds.push(ToolTraceKind::Search);
    }
    if project_later && tools.memory {
        kinds.push(ToolTraceKind::Recall);
    }
    if task.project.is_some_and(|p| p.position == 0) && tools.memory {
        kinds.push(ToolTraceKind::Store);
    }
    if tools.lint {
        kinds.push(ToolTraceKind::Lint);
    }
    if repair && tools.think == Some(ThinkPlacement::AfterTool) {
        kinds.push(ToolTraceKind::RepairThinkAfter);
    }
    if tools.think == Some(ThinkPlacement::Before) {
        kinds.push(ToolTraceKind::ThinkBefore);
    }
    // Only traces that fit the episode's tool-call limit (a repair with a think after the run
    // takes three calls, the others two).
    kinds.retain(|&k| if k == ToolTraceKind::RepairThinkAfter { 3 } else { 2 } <= episode_config.max_tool_calls);
    let mut rng = Rng::new(seed ^ 0x7001_5EED);
    // Half the traces (all for later project tasks, which need the helper's name) use a tool.
    if !kinds.is_empty() && (project_later || rng.index(2) == 0) {
        let kind = kinds[rng.index(kinds.len())];
        if let Some(t) = tool_trace(tokenizer, task, kind, seed, episode_config, tools)? {
            return Ok(t);
        }
    }
    if tools.library_in_context && project_later {
        // The baseline's traces: the library is in the prefix, write and submit.
        let prefix_trace = tool_trace_direct(tokenizer, task, episode_config)?;
        return Ok(prefix_trace);
    }
    sft_trace(task, tokenizer, repair, seed, episode_config)
}

/// A direct trace with the library in the prefix.
fn tool_trace_direct(tokenizer: &Tokenizer, task: &Task, episode_config: EpisodeConfig) -> Result<Trajectory, Error> {
    let prefix = context_prefix(tokenizer, task, true);
    let mut trajectory = Trajectory::new(0, 0, &prefix[0].0);
    for (tokens, kind) in &prefix[1..] {
        match kind {
            SegmentKind::Document => trajectory.push_document(tokens),
            SegmentKind::Global => trajectory.push_forced(tokens),
        }
    }
    trajectory.prompt_len = trajectory.tokens.len();
    let mut episode = Episode::new(task.clone(), episode_config);
    let reference = tokenizer.encode_program(&task.reference_program())?;
    write_turn(tokenizer, &mut trajectory, &mut episode, &reference, SUBMIT)?;
    trajectory.reward = Some(episode.finish());
    trajectory.tool_calls = episode.tool_calls();
    trajectory.notes.tools = episode.tool_counts();
    trajectory.stop = Some(StopReason::Submit);
    Ok(trajectory)
}
