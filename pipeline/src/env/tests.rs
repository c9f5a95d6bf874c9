use proptest::prelude::*;

use super::*;

fn run(src: &str, args: &[Value]) -> Result<Value, RunFailure> {
    run_function(src, "f", args, Budget::default())
}

fn run_err(src: &str, args: &[Value]) -> RunError {
    match run(src, args) {
        Err(RunFailure::Run(e)) => e,
        other => panic!("expected a runtime error from {src:?}, got {other:?}"),
    }
}

fn int(v: i64) -> Value {
    Value::Int(v)
}

// ---- the language ----

#[test]
fn arithmetic_precedence_and_comparisons() {
    assert_eq!(run("def f() = 1 + 2 * 3", &[]), Ok(int(7)));
    assert_eq!(run("def f() = (1 + 2) * 3 - 4 / 2", &[]), Ok(int(7)));
    assert_eq!(run("def f() = 10 - 3 - 2", &[]), Ok(int(5)));
    // Truncating division and remainder, as in Rust.
    assert_eq!(
        run("def f() = [0 - 7 / 2, 0 - 7 % 2, (0 - 7) / 2, (0 - 7) % 2]", &[]),
        Ok(Value::ints(&[-3, -1, -3, -1]))
    );
    assert_eq!(run("def f() = -3 + 1", &[]), Ok(int(-2)));
    assert_eq!(run("def f() = 1 < 2 && 2 <= 2 && 3 > 2 && (3 >= 4) == false", &[]), Ok(Value::Bool(true)));
    assert_eq!(run("def f() = !(1 == 1) || 1 != 2", &[]), Ok(Value::Bool(true)));
    assert_eq!(run("def f() = [1, 2] == [1, 2] && [1] != [1, 2]", &[]), Ok(Value::Bool(true)));
    // Short-circuit: the right side would divide by zero.
    assert_eq!(run("def f() = 1 == 2 && 1 / 0 == 1", &[]), Ok(Value::Bool(false)));
}

#[test]
fn let_if_lambdas_and_recursion() {
    assert_eq!(run("def f(x) = let y = x * 2 in let y = y + 1 in y", &[int(5)]), Ok(int(11)));
    assert_eq!(run("def f(x) = if x > 0 then 1 else if x < 0 then 0 - 1 else 0", &[int(-4)]), Ok(int(-1)));
    let fact = "def f(n) = if n <= 1 then 1 else n * f(n - 1)";
    assert_eq!(run(fact, &[int(10)]), Ok(int(3_628_800)));
    // Closures capture their environment; functions are values.
    let adder = "def add(k) = \\x -> x + k\ndef f(x) = let g = add(10) in g(x)";
    assert_eq!(run(adder, &[int(5)]), Ok(int(15)));
    let by_name = "def sq(x) = x * x\ndef f(xs) = map(sq, xs)";
    assert_eq!(run(by_name, &[Value::ints(&[1, 2, 3])]), Ok(Value::ints(&[1, 4, 9])));
    // Mutual recursion.
    let parity = "def even(n) = if n == 0 then true else odd(n - 1)\ndef odd(n) = if n == 0 then false else even(n - 1)\ndef f(n) = even(n)";
    assert_eq!(run(parity, &[int(7)]), Ok(Value::Bool(false)));
    assert_eq!(run("# a comment\ndef f() = 1 # trailing", &[]), Ok(int(1)));
}

#[test]
fn list_builtins() {
    let xs = [Value::ints(&[3, -1, 4, 1, 5])];
    assert_eq!(run("def f(xs) = len(xs)", &xs), Ok(int(5)));
    assert_eq!(run("def f() = range(2, 5)", &[]), Ok(Value::ints(&[2, 3, 4])));
    assert_eq!(run("def f() = range(5, 2)", &[]), Ok(Value::ints(&[])));
    assert_eq!(run("def f(xs) = map(\\x -> x + 1, xs)", &xs), Ok(Value::ints(&[4, 0, 5, 2, 6])));
    assert_eq!(run("def f(xs) = filter(\\x -> x > 2, xs)", &xs), Ok(Value::ints(&[3, 4, 5])));
    assert_eq!(run("def f(xs) = fold(\\a x -> a * 10 + x, 0, [1, 2, 3])", &xs), Ok(int(123)));
    assert_eq!(run("def f(xs) = cons(9, xs) ++ [7]", &xs), Ok(Value::ints(&[9, 3, -1, 4, 1, 5, 7])));
    assert_eq!(run("def f(xs) = [xs[0], xs[4], head(xs)]", &xs), Ok(Value::ints(&[3, 5, 3])));
    assert_eq!(run("def f(xs) = tail(xs)", &xs), Ok(Value::ints(&[-1, 4, 1, 5])));
    assert_eq!(run("def f() = [abs(0 - 3), min(2, 5), max(2, 5)]", &[]), Ok(Value::ints(&[3, 2, 5])));
    assert_eq!(run("def f() = [[1], []]", &[]), Ok(Value::list(vec![Value::ints(&[1]), Value::ints(&[])])));
    assert_eq!(Value::list(vec![Value::ints(&[1, 2]), int(3)]).to_string(), "[[1, 2], 3]");
}

#[test]
fn runtime_errors_are_typed() {
    assert_eq!(run_err("def f() = 1 / 0", &[]), RunError::DivisionByZero);
    assert_eq!(run_err("def f() = 5 % 0", &[]), RunError::DivisionByZero);
    assert_eq!(run_err("def f(x) = x * x", &[int(1 << 40)]), RunError::Overflow { op: "*" });
    assert_eq!(run_err("def f() = 1 + [1]", &[]), RunError::Type { op: "+", expected: "int", found: "list" });
    assert_eq!(
        run_err("def f() = if 1 then 2 else 3", &[]),
        RunError::Type { op: "if", expected: "bool", found: "int" }
    );
    assert_eq!(run_err("def f() = [1, 2][2]", &[]), RunError::IndexOutOfRange { index: 2, len: 2 });
    assert_eq!(run_err("def f() = [1, 2][0 - 1]", &[]), RunError::IndexOutOfRange { index: -1, len: 2 });
    assert_eq!(run_err("def f() = head([])", &[]), RunError::EmptyList { op: "head" });
    assert_eq!(run_err("def f() = tail([])", &[]), RunError::EmptyList { op: "tail" });
    assert_eq!(run_err("def f() = g(1)", &[]), RunError::UnknownName { name: "g".into() });
    assert_eq!(run_err("def f(x) = x(1)", &[int(3)]), RunError::NotAFunction { name: "x".into() });
    assert_eq!(run_err("def f() = len(1, 2)", &[]), RunError::Arity { name: "len".into(), expected: 1, found: 2 });
    assert_eq!(run_err("def f(x) = x", &[]), RunError::Arity { name: "f".into(), expected: 1, found: 0 });
    assert_eq!(
        run_err("def f() = map(\\x -> x, [1]) == map", &[]).to_string(),
        "==: expected int, bool or list, found function"
    );
    assert_eq!(
        run_function("def g() = 1", "f", &[], Budget::default()),
        Err(RunFailure::Run(RunError::UnknownName { name: "f".into() }))
    );
}

#[test]
fn parse_errors_carry_positions() {
    let at = |line, col, offset| Pos { line, col, offset };
    assert_eq!(
        parse_program("def f(x) = x +"),
        Err(ParseError::Unexpected { found: "end of program".into(), expected: "an expression", pos: at(1, 15, 14) })
    );
    assert_eq!(parse_program("def f(x) = 1 $"), Err(ParseError::UnexpectedChar { ch: '$', pos: at(1, 14, 13) }));
    assert_eq!(
        parse_program("def f(x) =\n  if x then"),
        Err(ParseError::Unexpected { found: "end of program".into(), expected: "an expression", pos: at(2, 12, 22) })
    );
    assert_eq!(
        parse_program("def f(x) = if x 1 else 2"),
        Err(ParseError::Unexpected { found: "1".into(), expected: "then", pos: at(1, 17, 16) })
    );
    assert_eq!(
        parse_program("def f() = 1\ndef f() = 2"),
        Err(ParseError::DuplicateFunction { name: "f".into(), pos: at(2, 1, 12) })
    );
    assert_eq!(parse_program("  # only a comment"), Err(ParseError::EmptyProgram));
    assert_eq!(parse_program("def f() = 99999999999999999999"), Err(ParseError::IntTooLarge { pos: at(1, 11, 10) }));
    assert_eq!(parse_program("f(x) = 1").unwrap_err().to_string(), "1:1: expected def, found f");
    let many = format!("def f({}) = 1", (0..20).map(|i| format!("a{i}")).collect::<Vec<_>>().join(", "));
    assert!(matches!(parse_program(&many), Err(ParseError::TooManyParams { max: MAX_PARAMS, .. })));
    let big = "def f() = 1 ".repeat(MAX_PROGRAM_BYTES / 8);
    assert!(matches!(parse_program(&big), Err(ParseError::TooLong { .. })));
}

#[test]
fn deep_nesting_is_a_parse_error_not_a_stack_overflow() {
    let parens = format!("def f() = {}1{}", "(".repeat(5000), ")".repeat(5000));
    assert!(matches!(parse_program(&parens), Err(ParseError::TooDeep { .. })));
    let chain = format!("def f() = 1{}", " + 1".repeat(5000));
    assert!(matches!(parse_program(&chain), Err(ParseError::TooDeep { .. })));
    let negs = format!("def f() = {}1", "- ".repeat(5000));
    assert!(matches!(parse_program(&negs), Err(ParseError::TooDeep { .. })));
    let lets = format!("def f() = {}1", "let a = 1 in ".repeat(5000));
    assert!(matches!(parse_program(&lets), Err(ParseError::TooDeep { .. })));
    // Within the limit, a long chain parses and evaluates.
    let ok = format!("def f() = 0{}", " + 1".repeat(100));
    assert_eq!(run(&ok, &[]), Ok(int(100)));
}

// ---- sandbox budgets ----

/// Runs `f` on a thread with a 1 MiB stack: the budgets must hold with far less than the default.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(1 << 20).spawn(f).expect("spawn").join().expect("no stack overflow")
}

#[test]
fn runaway_recursion_hits_the_depth_limit() {
    let err = on_small_stack(|| run_err("def f(n) = f(n + 1)", &[int(0)]));
    assert_eq!(err, RunError::DepthLimit { max: Budget::default().max_depth });
    let err = on_small_stack(|| run_err("def f(n) = 1 + f(n + 1)", &[int(0)]));
    assert_eq!(err, RunError::DepthLimit { max: Budget::default().max_depth });
    let through_lambda = "def f(n) = let g = \\x -> f(x + 1) in g(n)";
    assert!(matches!(on_small_stack(|| run_err(through_lambda, &[int(0)])), RunError::DepthLimit { .. }));
    let through_map = "def f(xs) = map(\\x -> f([x]), xs)";
    assert!(matches!(on_small_stack(move || run_err(through_map, &[Value::ints(&[1])])), RunError::DepthLimit { .. }));
}

#[test]
fn long_loops_hit_the_step_budget() {
    let budget = Budget::default();
    assert_eq!(run_err("def f() = len(range(0, 1000000000000))", &[]), RunError::StepBudget { max: budget.max_steps });
    let exponential = "def f(n) = if n == 0 then 0 else f(n - 1) + f(n - 1)";
    assert_eq!(run_err(exponential, &[int(40)]), RunError::StepBudget { max: budget.max_steps });
    let fold_loop = "def f() = fold(\\a x -> a + x, 0, map(\\x -> x * 2, range(0, 60000)))";
    assert_eq!(run_err(fold_loop, &[]), RunError::StepBudget { max: budget.max_steps });
}

#[test]
fn big_allocations_hit_the_memory_budget() {
    let budget = Budget { max_steps: 10_000_000, ..Budget::default() };
    let doubling = "def f() = fold(\\acc x -> acc ++ acc, [1], range(0, 40))";
    let err = run_function(doubling, "f", &[], budget).unwrap_err();
    assert_eq!(err, RunFailure::Run(RunError::MemoryBudget { max: budget.max_cells }));
}

#[test]
fn deeply_nested_values_are_refused() {
    let nested_lists = "def f() = fold(\\acc x -> [acc], [], range(0, 1000))";
    assert_eq!(on_small_stack(|| run_err(nested_lists, &[])), RunError::ValueTooDeep { max: MAX_VALUE_DEPTH });
    let closure_chain = "def f() = fold(\\acc x -> \\y -> acc(y), \\y -> y, range(0, 1000))";
    assert_eq!(on_small_stack(|| run_err(closure_chain, &[])), RunError::ValueTooDeep { max: MAX_VALUE_DEPTH });
    // Within the limit they are fine.
    assert!(run("def f() = fold(\\acc x -> [acc], [], range(0, 10))", &[]).is_ok());
}

#[test]
fn budgets_reset_between_calls() {
    let program = parse_program("def f(n) = len(range(0, n))").unwrap();
    let mut interpreter = Interpreter::new(&program, Budget { max_steps: 1000, max_cells: 1000, max_depth: 64 });
    for _ in 0..10 {
        assert_eq!(interpreter.call("f", &[int(500)]), Ok(int(500)));
        assert!(interpreter.steps_used() > 500);
    }
    assert!(matches!(interpreter.call("f", &[int(5000)]), Err(RunError::StepBudget { .. })));
}

// ---- tasks ----

const SEEDS: u64 = 300;

#[test]
fn every_reference_solution_passes_all_its_tests() {
    let config = RewardConfig::default();
    let sparse = RewardConfig { mode: RewardMode::AllOrNothing, ..config };
    for level in Level::ALL {
        for seed in 0..SEEDS {
            let task = generate_task(level, seed);
            let reference = task.reference_program();
            let report = check_examples(&task, &reference, config.budget).unwrap();
            assert_eq!(report.passed, report.total, "{level:?} seed {seed}: {:?}\n{reference}", report.first_failure);
            let reward = score(&task, &reference, &config, 0);
            assert_eq!((reward.passed, reward.value), (task.hidden_count(), 1.0), "{level:?} seed {seed}\n{reference}");
            assert_eq!(score(&task, &reference, &sparse, 0).value, 1.0);
        }
    }
}

#[test]
fn tasks_are_deterministic_and_varied() {
    use std::collections::BTreeSet;
    for level in Level::ALL {
        let mut families = BTreeSet::new();
        let mut prompts = BTreeSet::new();
        for seed in 0..SEEDS {
            let task = generate_task(level, seed);
            assert_eq!(task, generate_task(level, seed));
            assert_eq!(task.level, level);
            families.insert(task.parts.iter().map(|p| p.name.clone()).collect::<Vec<_>>().join("+"));
            prompts.insert(task.prompt());
            let names: BTreeSet<_> = task.parts.iter().map(|p| &p.name).collect();
            assert_eq!(names.len(), task.parts.len(), "part names must be unique");
            match level {
                Level::Easy | Level::Medium => assert_eq!(task.parts.len(), 1),
                Level::Hard => assert!((2..=3).contains(&task.parts.len())),
                Level::Project => unreachable!("not in Level::ALL"),
            }
            for part in &task.parts {
                assert_eq!((part.visible.len(), part.hidden.len()), (3, 8));
                assert!(task.prompt().contains(&format!("def {}(", part.name)));
            }
        }
        let min_families = match level {
            Level::Easy => 4,
            Level::Medium => 5,
            Level::Hard => 20,
            Level::Project => unreachable!("not in Level::ALL"),
        };
        assert!(families.len() >= min_families, "{level:?}: only {} families", families.len());
        assert!(prompts.len() > SEEDS as usize / 2, "{level:?}: only {} distinct prompts", prompts.len());
    }
    assert_ne!(generate_task(Level::Easy, 1), generate_task(Level::Medium, 1));
}

#[test]
fn hidden_tests_reject_a_constant_answer() {
    // A program that returns 0 (or []) everywhere must fail most tasks: the tests discriminate.
    let mut full_marks = 0;
    let mut count = 0;
    for level in Level::ALL {
        for seed in 0..100 {
            let task = generate_task(level, seed);
            let program: String = task
                .parts
                .iter()
                .map(|p| {
                    let list_out = matches!(p.hidden[0].expected, Value::List(..));
                    format!("def {}({}) = {}\n", p.name, p.params.join(", "), if list_out { "[]" } else { "0" })
                })
                .collect();
            let reward = score(&task, &program, &RewardConfig::default(), 0);
            assert!(!reward.malformed);
            full_marks += usize::from(reward.value == 1.0);
            count += 1;
        }
    }
    assert!(full_marks * 20 < count, "{full_marks} of {count} tasks solved by a constant");
}

// ---- reward, hand-computed ----

fn hand_task() -> Task {
    let case = |x: i64, y: i64| TestCase { args: vec![int(x)], expected: int(y) };
    Task {
        level: Level::Hard,
        seed: 0,
        family: "hand",
        parts: vec![
            TaskPart {
                name: "double".into(),
                params: vec!["x".into()],
                description: "Return 2 * x.".into(),
                visible: vec![case(1, 2)],
                hidden: vec![case(0, 0), case(1, 2), case(2, 4), case(3, 6)],
                reference: "def double(x) = x + x".into(),
                withheld: None,
            },
            TaskPart {
                name: "inc".into(),
                params: vec!["x".into()],
                description: "Return x + 1.".into(),
                visible: vec![case(1, 2), case(5, 6)],
                hidden: vec![case(0, 1), case(9, 10)],
                reference: "def inc(x) = x + 1".into(),
                withheld: None,
            },
        ],
        shown_examples: None,
        library: Vec::new(),
        project: None,
        withhold_constants: false,
    }
}

#[test]
fn partial_credit_and_all_or_nothing() {
    let task = hand_task();
    let partial = RewardConfig::default();
    let sparse = RewardConfig { mode: RewardMode::AllOrNothing, ..partial };
    let all = task.reference_program();
    assert_eq!(score(&task, &all, &partial, 0).value, 1.0);
    assert_eq!(score(&task, &all, &sparse, 0).value, 1.0);
    // double right for x < 2 only (2 of 4), inc right: 4 of 6 hidden tests.
    let half = "def double(x) = if x < 2 then x * 2 else 0\ndef inc(x) = x + 1";
    let r = score(&task, half, &partial, 0);
    assert_eq!((r.passed, r.total, r.malformed), (4, 6, false));
    assert!((r.value - 4.0 / 6.0).abs() < 1e-12);
    assert_eq!(score(&task, half, &sparse, 0).value, 0.0);
    // A runtime error fails its tests without making the program malformed: inc(9) overflows? no,
    // it recurses forever, so only double's 4 tests pass.
    let looping = "def double(x) = 2 * x\ndef inc(x) = inc(x)";
    let r = score(&task, looping, &partial, 0);
    assert_eq!((r.passed, r.malformed), (4, false));
    assert!((r.value - 4.0 / 6.0).abs() < 1e-12);
}

#[test]
fn malformed_programs_score_zero() {
    let task = hand_task();
    let config = RewardConfig::default();
    for bad in
        ["def double(x) = ", "def double(x) = 2 * x", "def double(x, y) = 2 * x\ndef inc(x) = x + 1", "", "\u{0}\u{1}"]
    {
        let r = score(&task, bad, &config, 0);
        assert_eq!((r.value, r.passed, r.total, r.malformed), (0.0, 0, 6, true), "{bad:?}");
    }
}

#[test]
fn length_penalty() {
    let task = hand_task();
    let penalty = LengthPenalty { budget: 10, rate: 0.01, max: 0.2 };
    let config = RewardConfig { length_penalty: Some(penalty), ..RewardConfig::default() };
    let all = task.reference_program();
    // 20 units, 10 over: 1 - 0.1.
    let r = score(&task, &all, &config, 20);
    assert!((r.value - 0.9).abs() < 1e-12 && (r.penalty - 0.1).abs() < 1e-12);
    // Under the budget: no penalty. Far over: capped at 0.2.
    assert_eq!(score(&task, &all, &config, 5).value, 1.0);
    assert!((score(&task, &all, &config, 1000).value - 0.8).abs() < 1e-12);
    // Malformed stays 0, not negative.
    assert_eq!(score(&task, "nope", &config, 1000).value, 0.0);
}

// ---- tools ----

#[test]
fn episode_run_think_submit() {
    let task = hand_task();
    let mut episode = Episode::new(task.clone(), EpisodeConfig::default());
    let think = episode.step(ToolCall::Think { text: "double then inc".into() }).unwrap();
    assert_eq!((think.text.as_str(), think.done, think.reward.is_none()), ("", false, true));

    let out = episode.step(ToolCall::Run { program: "def double(x) = x\ndef inc(x) = x + 1".into() }).unwrap();
    assert_eq!(out.text, "passed 2/3 examples; first failure: double(1) == 2, got 1");
    assert!(!out.done);

    let out = episode.step(ToolCall::Run { program: "def double(x) = x +".into() }).unwrap();
    assert_eq!(out.text, "parse error: 1:20: expected an expression, found end of program");
    let out = episode.step(ToolCall::Run { program: "def double(x) = x * 2".into() }).unwrap();
    assert_eq!(out.text, "missing function inc");
    let out = episode.step(ToolCall::Run { program: "def double(x) = double(x)\ndef inc(x) = x + 1".into() }).unwrap();
    assert_eq!(
        out.text,
        "passed 2/3 examples; first failure: double(1) == 2, got error: evaluation nested deeper than 256 (runaway recursion?)"
    );

    let out = episode.step(ToolCall::Submit { program: task.reference_program() }).unwrap();
    assert!(out.done);
    assert_eq!(out.text, "submitted: 6/6 hidden tests passed, reward 1.000");
    assert_eq!(out.reward.as_ref().map(|r| r.value), Some(1.0));
    assert_eq!(episode.tool_calls(), 6);
    assert!(episode.is_done());
    assert_eq!(episode.step(ToolCall::Think { text: String::new() }), Err(EpisodeError::Finished));
    assert_eq!(episode.finish().value, 1.0);
}

#[test]
fn episode_ends_at_the_tool_call_limit_scoring_the_last_run() {
    let task = hand_task();
    let config = EpisodeConfig { max_tool_calls: 2, ..EpisodeConfig::default() };
    let mut episode = Episode::new(task, config);
    assert!(!episode.step(ToolCall::Run { program: "def double(x) = 2 * x\ndef inc(x) = x".into() }).unwrap().done);
    let out = episode.step(ToolCall::Think { text: "hmm".into() }).unwrap();
    assert!(out.done);
    // The last program run: double right (4), inc wrong (0) -> 4/6.
    let reward = out.reward.unwrap();
    assert_eq!((reward.passed, reward.total), (4, 6));
    assert!(out.text.contains("tool-call limit reached"));
    // With no program at all, an episode cut off by the rollout scores 0.
    let mut silent = Episode::new(hand_task(), EpisodeConfig::default());
    let reward = silent.finish();
    assert!(reward.malformed && reward.value == 0.0);
}

// ---- no panics on any text ----

const TOKENS: [&str; 44] = [
    "def",
    "f",
    "g",
    "x",
    "xs",
    "(",
    ")",
    "[",
    "]",
    ",",
    "=",
    "\\",
    "->",
    "+",
    "-",
    "*",
    "/",
    "%",
    "++",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "&&",
    "||",
    "!",
    "let",
    "in",
    "if",
    "then",
    "else",
    "true",
    "false",
    "0",
    "1",
    "7",
    "9223372036854775807",
    "map",
    "fold",
    "range",
    "len",
    "filter",
];

/// Parses `src` and runs each of its functions on a few argument lists; must return, never panic.
fn parse_and_run_everything(src: &str) {
    let budget = Budget { max_steps: 20_000, max_cells: 20_000, max_depth: 256 };
    if let Ok(program) = parse_program(src) {
        let mut interpreter = Interpreter::new(&program, budget);
        for def in &program.functions {
            for arg in [int(3), int(-1), Value::ints(&[1, 2, 3]), Value::ints(&[])] {
                let args = vec![arg; def.params.len()];
                let _ = interpreter.call(&def.name, &args);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let src = String::from_utf8_lossy(&bytes).into_owned();
        parse_and_run_everything(&src);
        parse_and_run_everything(&format!("def f(x) = {src}"));
    }

    #[test]
    fn token_soup_never_panics(picks in proptest::collection::vec(0..TOKENS.len(), 0..80), prefix in any::<bool>()) {
        let soup: Vec<&str> = picks.iter().map(|&i| TOKENS[i]).collect();
        let src = if prefix { format!("def f(x) = {}", soup.join(" ")) } else { soup.join(" ") };
        parse_and_run_everything(&src);
    }

    #[test]
    fn mutated_reference_solutions_never_panic(seed in 0u64..1000, level in 0usize..3, cut in 0usize..400, pick in 0..TOKENS.len()) {
        // Near-miss programs: a reference solution with one token spliced in.
        let task = generate_task(Level::ALL[level], seed);
        let mut src = task.reference_program();
        let at = (0..=cut.min(src.len())).rev().find(|&i| src.is_char_boundary(i)).unwrap_or(0);
        src.insert_str(at, &format!(" {} ", TOKENS[pick]));
        parse_and_run_everything(&src);
        let reward = score(&task, &src, &RewardConfig::default(), src.len());
        prop_assert!((0.0..=1.0).contains(&reward.value));
    }
}

#[test]
fn many_functions_and_long_environments() {
    // Thousands of functions: found by name through the index; duplicates caught.
    let mut src: String = (0..3000).map(|i| format!("def g{i}() = {i}\n")).collect();
    src.push_str("def f() = g2999() + g0()");
    assert_eq!(run(&src, &[]), Ok(int(2999)));
    src.push_str("\ndef g5() = 0");
    assert!(matches!(parse_program(&src), Err(ParseError::DuplicateFunction { .. })));
    // A long environment: 100 nested lets, then a 16-parameter lambda that reads the outermost
    // binding through all of them; it evaluates, and drops, on a small stack.
    let lets: String = (1..100).map(|i| format!("let a{i} = a{} + 1 in ", i - 1)).collect();
    let params: Vec<String> = (0..MAX_PARAMS).map(|i| format!("p{i}")).collect();
    let args = vec!["0"; MAX_PARAMS].join(", ");
    let body = format!("def f() = let a0 = 0 in {lets}let h = \\{} -> a99 + a0 + p15 in h({args})", params.join(" "));
    assert_eq!(on_small_stack(move || run(&body, &[]).map(|v| v.to_string())), Ok("99".to_string()));
}

#[test]
fn withheld_examples_leave_the_prompt_but_show_in_run_output() {
    let task = generate_task(Level::Easy, 11);
    let part = &task.parts[0];
    let last = part.visible.last().unwrap().describe(&part.name);
    assert!(task.prompt().contains(&last));
    let prompt = task.clone().with_shown_examples(1).prompt();
    assert!(!prompt.contains(&last), "{prompt}");
    assert!(prompt.contains(&part.visible[0].describe(&part.name)));
    // By hand: inc's second example (inc(5) == 6) is withheld; a program right on the first
    // one only learns the withheld answer from running it.
    let task = hand_task().with_shown_examples(1);
    assert!(!task.prompt().contains("inc(5)"), "{}", task.prompt());
    let mut episode = Episode::new(task, EpisodeConfig::default());
    let out = episode.step(ToolCall::Run { program: "def double(x) = x + x\ndef inc(x) = 2".into() }).unwrap();
    assert!(out.text.contains("inc(5)") && out.text.contains('6'), "{}", out.text);
}
