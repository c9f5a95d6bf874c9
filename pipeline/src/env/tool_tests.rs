//! Tests of issue 21's parts of the environment: project tasks, the memory, search and lint
//! tools, and their answers to bad input.

use proptest::prelude::*;

use super::lint::lint_text;
use super::*;

const PROJECT_SEEDS: u64 = 150;

fn held_out(seed: u64) -> u64 {
    (1 << 63) | seed
}

fn tools_on() -> EpisodeConfig {
    EpisodeConfig {
        max_tool_calls: 16,
        tools: ToolSwitches { memory: true, search: true, lint: true, top_k: 2 },
        ..EpisodeConfig::default()
    }
}

// ---- projects ----

#[test]
fn projects_are_deterministic_and_link_earlier_helpers() {
    for seed in (0..PROJECT_SEEDS).chain((0..PROJECT_SEEDS).map(held_out)) {
        let project = generate_project(seed);
        assert_eq!(project, generate_project(seed), "seed {seed}");
        assert_eq!(project.len(), PROJECT_TASKS);
        let helper = project[0].parts[0].name.clone();
        for (i, task) in project.iter().enumerate() {
            assert_eq!(task.project, Some(ProjectPlace { seed, position: i }));
            assert_eq!(task.level, Level::Project);
            assert_eq!(task.library.len(), i, "task {i} links the references of tasks 0..{i}");
            // The reference (which calls the helper for i > 0) passes every hidden test.
            let reward = score(task, &task.reference_program(), &RewardConfig::default(), 0);
            assert_eq!((reward.passed, reward.malformed), (reward.total, false), "seed {seed} task {i}");
            if i > 0 {
                assert!(task.reference_program().contains(helper.as_str()));
                // The helper is neither named nor defined in later prompts.
                assert!(!task.prompt().contains(&helper), "seed {seed} task {i}: {}", task.prompt());
                assert!(task.prompt().contains(super::project::USE_WORDS));
                // Without the library the reference cannot run: the helper is really reused.
                let alone = Task { library: Vec::new(), ..task.clone() };
                let r = score(&alone, &task.reference_program(), &RewardConfig::default(), 0);
                assert!(r.passed < r.total, "seed {seed} task {i} passes without its library");
            }
        }
        // generate_task(Project, ..) indexes projects (for seeds that fit in 62 bits).
        if seed >> 62 == 0 {
            assert_eq!(generate_task(Level::Project, seed << 2 | 1), generate_project(seed)[1]);
        }
    }
    // Held-out projects differ from training ones with the same low bits.
    let same = (0..PROJECT_SEEDS).filter(|&s| generate_project(s)[3] == generate_project(held_out(s))[3]).count();
    assert!(same < 5, "{same} held-out projects equal training ones");
}

#[test]
fn existing_task_families_have_no_project_fields() {
    for level in Level::ALL {
        for seed in 0..200 {
            let task = generate_task(level, seed);
            assert!(task.library.is_empty() && task.project.is_none());
            assert_ne!(task.family, "project");
        }
    }
}

#[test]
fn a_program_defining_the_helper_itself_takes_precedence() {
    let task = generate_project(3)[1].clone();
    let helper = &task.library[0];
    // Redefining the helper wrongly (constant 0) changes the results: the program's own wins.
    let own = format!("def {}(x) = 0\n{}", helper.name, task.reference_program());
    let mine = score(&task, &own, &RewardConfig::default(), 0);
    let linked = score(&task, &task.reference_program(), &RewardConfig::default(), 0);
    assert!(!mine.malformed && linked.passed == linked.total);
    assert!(mine.passed < mine.total || task.parts[0].hidden.iter().all(|c| c.expected == Value::Int(0)));
}

// ---- lint ----

fn kinds(task: &Task, src: &str) -> Vec<DiagnosticKind> {
    lint(task, src).into_iter().map(|d| d.kind).collect()
}

#[test]
fn lint_finds_each_kind() {
    let task = generate_task(Level::Easy, 0);
    let name = &task.parts[0].name;
    let params = task.parts[0].params.join(", ");
    let def = |body: &str| format!("def {name}({params}) = {body}");
    let p0 = &task.parts[0].params[0];
    use DiagnosticKind::*;
    assert_eq!(kinds(&task, "def"), [Parse]);
    assert_eq!(kinds(&task, "def other(x) = x"), [MissingFunction]);
    assert_eq!(kinds(&task, &format!("def {name}({params}, extra) = {p0} + extra")), [MissingFunction]);
    assert_eq!(kinds(&task, &def(&format!("{p0} + nowhere"))), [UndefinedName]);
    assert_eq!(kinds(&task, &def(&format!("ghost({p0})"))), [UndefinedName]);
    assert_eq!(kinds(&task, &def(&format!("len({p0}, 1)"))), [WrongArity]);
    assert_eq!(kinds(&task, &format!("{}\ndef two(a, b) = a + b\ndef three(q) = two(q)", def(p0))), [WrongArity]);
    assert_eq!(kinds(&task, &def(&format!("map(\\a b -> a, {p0})"))), [WrongArity, UnusedBinding]);
    assert_eq!(kinds(&task, &def("0")), [UnusedBinding]);
    assert_eq!(kinds(&task, &def(&format!("let y = 1 in {p0}"))), [UnusedBinding]);
    assert_eq!(kinds(&task, &def(&format!("let _y = 1 in {p0}"))), []);
    assert_eq!(kinds(&task, &def(&format!("if 1 < 2 then {p0} else {p0}"))), [UnreachableBranch]);
    assert_eq!(kinds(&task, &def(&format!("if !true then {p0} else {p0}"))), [UnreachableBranch]);
    assert_eq!(kinds(&task, &def(&format!("if len([{p0}]) > 0 then {p0} else {p0}"))), []);
    assert_eq!(kinds(&task, &def(&format!("{p0} % 0"))), [DivisionByZero]);
    // A local function value's arity is not known: no diagnostic.
    assert_eq!(kinds(&task, &def(&format!("let g = \\a -> a in g({p0}, 1)"))), []);
    assert_eq!(lint_text(&task, &task.reference_program()), "lint: no problems found");
    assert!(lint_text(&task, &def("ghost + nope + 0 % 0 + 1 / 0")).contains("and 1 more"));
}

#[test]
fn lint_has_no_false_positive_on_any_reference() {
    let mut checked = 0;
    for level in Level::ALL {
        for seed in 0..300 {
            let task = generate_task(level, seed);
            assert_eq!(lint(&task, &task.reference_program()), [], "{level:?} seed {seed}");
            checked += 1;
        }
    }
    for seed in 0..PROJECT_SEEDS {
        for task in generate_project(seed) {
            // The helper of later tasks comes from the linked library.
            assert_eq!(lint(&task, &task.reference_program()), [], "project {seed}");
            checked += 1;
        }
    }
    assert!(checked > 1000);
}

// ---- memory and search ----

#[test]
fn memory_recalls_by_similarity_and_evicts_least_recently_used() {
    let mut m = Memory::new(140);
    assert_eq!(m.recall("anything", 2).text, "recall: the memory is empty");
    assert!(m.store("def sum_all(xs) = fold(\\acc x -> acc + gap(x), 0, xs)").starts_with("store: stored"));
    assert!(m
        .store("The project helper: return the distance from x to 2. def gap(x) = abs(x - 2)")
        .starts_with("store: stored"));
    let r = m.recall("project helper", 1);
    assert_eq!(r.hits, [1]);
    assert!(r.text.contains("def gap(x)"), "{}", r.text);
    assert_eq!(m.recall("zebra", 2).text, "recall: no stored snippet matches");
    // Full: the least recently used entry (entry 0; entry 1 was just recalled) goes first.
    let answer = m.store("def best_of(xs) = 1");
    assert!(answer.contains("forgot 1"), "{answer}");
    assert_eq!(m.entries().len(), 2);
    assert!(m.entries().iter().all(|e| !e.text.contains("sum_all")));
    assert!(m.used_bytes() <= m.budget_bytes());
    assert_eq!(m.evictions, 1);
    // Identical snippets are not stored twice.
    assert!(m.store("def best_of(xs) = 1").starts_with("store: already in memory"));
    assert_eq!(m.entries().len(), 2);
}

#[test]
fn memory_evicts_the_lowest_credit_first() {
    let mut m = Memory::new(30);
    m.store("aaaaaaaaaa");
    m.store("bbbbbbbbbb");
    m.credit("aaaaaaaaaa", 0.5);
    m.credit("bbbbbbbbbb", -0.5);
    m.store("cccccccccccc");
    // b has the lower credit although a is older.
    let texts: Vec<&str> = m.entries().iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, ["aaaaaaaaaa", "cccccccccccc"]);
}

#[test]
fn bad_memory_and_search_input_is_answered() {
    let mut m = Memory::new(64);
    assert!(m.store("   ").contains("nothing to store"));
    assert!(m.store(&"x".repeat(MAX_SNIPPET_BYTES + 1)).contains("more than the 512 allowed"));
    assert!(m.store(&"x".repeat(65)).contains("more than the whole memory"));
    assert!(m.entries().is_empty());
    assert!(m.recall("", 2).text.contains("query is empty"));
    assert!(m.recall(&"q".repeat(MAX_QUERY_BYTES + 1), 2).text.contains("more than the 128 allowed"));
    let task = generate_project(5)[2].clone();
    assert!(search_library(&task, "", 2).contains("query is empty"));
    assert!(search_library(&task, &"q ".repeat(100), 2).contains("more than the 128 allowed"));
    assert_eq!(search_library(&generate_project(5)[0], "project helper", 2), "search: the library is empty");
}

#[test]
fn search_finds_the_helper_for_the_prompts_words() {
    for seed in 0..PROJECT_SEEDS {
        let project = generate_project(seed);
        let helper = &project[0].parts[0].reference;
        for task in &project[1..] {
            let answer = search_library(task, HELPER_WORDS, 1);
            assert_eq!(answer.lines().nth(1), Some(helper.as_str()), "project {seed}: {answer}");
        }
    }
}

#[test]
fn episode_runs_the_new_tools_and_counts_them() {
    let task = generate_project(7)[2].clone();
    let helper = task.library[0].code.clone();
    // Off: each tool answers that it is not available.
    let mut off = Episode::new(task.clone(), EpisodeConfig::default());
    for (call, answer) in [
        (ToolCall::Store { text: "x".into() }, "memory: not available in this run"),
        (ToolCall::Recall { query: "x".into() }, "memory: not available in this run"),
        (ToolCall::Search { query: "x".into() }, "search: not available in this run"),
        (ToolCall::Lint { program: "def".into() }, "lint: not available in this run"),
    ] {
        assert_eq!(off.step(call).unwrap().text, answer);
    }
    let mut memory = Memory::new(256);
    memory.store(&format!("{} {helper}", task.library[0].description));
    let mut e = Episode::new(task.clone(), tools_on()).with_memory(memory.clone());
    let out = e.step(ToolCall::Search { query: HELPER_WORDS.into() }).unwrap();
    assert!(out.text.contains(&helper) && !out.done, "{}", out.text);
    let out = e.step(ToolCall::Recall { query: HELPER_WORDS.into() }).unwrap();
    assert!(out.text.contains(&helper), "{}", out.text);
    assert_eq!(e.recalled().len(), 1);
    let out = e.step(ToolCall::Lint { program: "def nothing(x) = y".into() }).unwrap();
    assert!(out.text.starts_with("lint: 3 problem(s)"), "{}", out.text);
    let out = e.step(ToolCall::Store { text: task.reference_program() }).unwrap();
    assert!(out.text.starts_with("store: stored"), "{}", out.text);
    assert_eq!(e.stored(), [task.reference_program()]);
    // The episode's stores went to its copy, not the caller's memory.
    assert_eq!(memory.entries().len(), 1);
    let out = e.step(ToolCall::Run { program: "def nothing(x) = x".into() }).unwrap();
    assert!(out.text.starts_with("missing function"));
    assert!(e.had_failing_run());
    let out = e.step(ToolCall::Submit { program: task.reference_program() }).unwrap();
    assert_eq!(out.reward.unwrap().value, 1.0);
    let counts = e.tool_counts();
    assert_eq!(
        counts.by_tool(),
        [("run", 1), ("think", 0), ("submit", 1), ("store", 1), ("recall", 1), ("search", 1), ("lint", 1)]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any text into any of the new tools is answered, never a panic, and memory stays within
    /// its budget.
    #[test]
    fn tools_answer_any_text(texts in prop::collection::vec(".{0,300}", 1..8), budget in 0usize..600, seed in 0u64..50) {
        let task = generate_project(seed)[(seed % 4) as usize].clone();
        let mut e = Episode::new(task, EpisodeConfig { max_tool_calls: 64, ..tools_on() }).with_memory(Memory::new(budget));
        let mut m = Memory::new(budget);
        for text in &texts {
            for call in [
                ToolCall::Store { text: text.clone() },
                ToolCall::Recall { query: text.clone() },
                ToolCall::Search { query: text.clone() },
                ToolCall::Lint { program: text.clone() },
            ] {
                let out = e.step(call).unwrap();
                prop_assert!(!out.text.is_empty());
            }
            m.store(text);
            prop_assert!(m.used_bytes() <= budget);
            let _ = m.recall(text, 3);
        }
    }
}
