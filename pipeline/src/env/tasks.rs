//! Coding tasks generated from a seed: each part is a function to write, described in words, with
//! a few visible examples, hidden tests, and a reference solution in the language. Expected
//! outputs come from plain Rust oracles, independent of the interpreter, so that a test can hold
//! the reference solutions (run by the interpreter) to them.

use super::Value;

/// A small deterministic generator (splitmix64): the same seed gives the same tasks everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller over two draws in the open interval `(0, 1)`).
    pub fn normal(&mut self) -> f64 {
        let mut open = || ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let (u1, u2) = (open(), open());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform in `lo..=hi` (`lo <= hi`; the tiny modulo bias does not matter here).
    pub fn int(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi - lo + 1).max(1) as u64;
        lo + (self.next_u64() % span) as i64
    }

    /// Uniform index in `0..n` (`n >= 1`).
    pub fn index(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A list with a length in `min_len..=max_len` and values in `lo..=hi`.
    pub fn list(&mut self, min_len: usize, max_len: usize, lo: i64, hi: i64) -> Vec<i64> {
        let len = min_len + self.index(max_len - min_len + 1);
        (0..len).map(|_| self.int(lo, hi)).collect()
    }
}

/// Difficulty of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// One function, one list builtin or a simple integer rule.
    Easy,
    /// One function needing a fold with a non-trivial step, recursion or two combined operations.
    Medium,
    /// Two or three functions, each with its own tests; some parts build on earlier ones.
    Hard,
    /// One task of a project ([`generate_project`](super::generate_project)): later tasks call the project's helper,
    /// which their prompts do not restate. Not in [`Level::ALL`] (the three levels every run
    /// trains and evaluates on); runs with projects add it.
    Project,
}

impl Level {
    /// All levels, easiest first.
    pub const ALL: [Level; 3] = [Level::Easy, Level::Medium, Level::Hard];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Level::Easy => "easy",
            Level::Medium => "medium",
            Level::Hard => "hard",
            Level::Project => "project",
        }
    }
}

/// One input/output pair.
#[derive(Debug, Clone, PartialEq)]
pub struct TestCase {
    /// Arguments, in parameter order.
    pub args: Vec<Value>,
    /// The value the function must return.
    pub expected: Value,
}

impl TestCase {
    /// `name(a, b) == expected` as text.
    pub fn describe(&self, name: &str) -> String {
        let args: Vec<String> = self.args.iter().map(Value::to_string).collect();
        format!("{name}({}) == {}", args.join(", "), self.expected)
    }
}

/// One function the policy must write.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPart {
    /// The function's name.
    pub name: String,
    /// Its parameter names.
    pub params: Vec<String>,
    /// What it must compute, in words.
    pub description: String,
    /// Examples shown to the policy (and run by the `run` tool).
    pub visible: Vec<TestCase>,
    /// Tests the reward uses.
    pub hidden: Vec<TestCase>,
    /// A correct definition in the language (may call earlier parts).
    pub reference: String,
    /// The part's drawn constants and the text that names them instead of stating them, for
    /// tasks that withhold constants (`None` for parts without constants).
    pub withheld: Option<Withheld>,
}

/// A part's drawn constants, as a prompt that withholds them sees them: the description names
/// each constant by a letter, and only a failing `<run>` states their values (as a failing
/// test's message states the parameters it was written for), so running is worth a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    /// The description with every constant replaced by its letter.
    pub description: String,
    /// The reference with every constant replaced by its letter (unbound: running it fails
    /// with an unknown name, and the run's answer then states the values).
    pub symbolic_reference: String,
    /// Letter and value of each constant, in the order the description names them.
    pub constants: Vec<(String, i64)>,
}

impl Withheld {
    fn new(description: String, symbolic_reference: String, constants: &[(&str, i64)]) -> Self {
        let constants = constants.iter().map(|&(name, v)| (name.to_string(), v)).collect();
        Self { description, symbolic_reference, constants }
    }
}

/// A generated task.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Difficulty.
    pub level: Level,
    /// The seed it was generated from.
    pub seed: u64,
    /// Which family (for per-family statistics).
    pub family: &'static str,
    /// The functions to write, in order.
    pub parts: Vec<TaskPart>,
    /// Visible examples per part that the prompt shows (`None` = all). The `run` tool runs all
    /// of them, so the ones left out show only in its output: running is then worth a call.
    pub shown_examples: Option<usize>,
    /// Definitions of earlier tasks of the same project, linked into every program this task
    /// runs or scores (a function the program defines itself takes precedence). Empty outside
    /// projects. The prompt does not show them: the policy finds them with its tools.
    pub library: Vec<LibraryEntry>,
    /// Where this task sits in its project, for project tasks.
    pub project: Option<ProjectPlace>,
    /// The prompt names the parts' constants by letters instead of stating them, and a failing
    /// `<run>` states their values ([`Task::constants_text`]): the policy must run to learn them.
    pub withhold_constants: bool,
}

/// One definition of a project's library: what it does, in words, and its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryEntry {
    /// The function's name.
    pub name: String,
    /// The description of the task that defined it.
    pub description: String,
    /// Its definition in the language.
    pub code: String,
}

/// A project task's place: which project, which task of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProjectPlace {
    /// The project's seed.
    pub seed: u64,
    /// 0 = the task that defines the helper.
    pub position: usize,
}

impl Task {
    /// The task statement: each part's signature, description and visible examples.
    pub fn prompt(&self) -> String {
        let mut out = String::new();
        for (i, part) in self.parts.iter().enumerate() {
            if self.parts.len() > 1 {
                out.push_str(&format!("Part {}: ", i + 1));
            }
            let description = match (&part.withheld, self.withhold_constants) {
                (Some(w), true) => &w.description,
                _ => &part.description,
            };
            out.push_str(&format!("def {}({})\n{}\n", part.name, part.params.join(", "), description));
            for case in part.visible.iter().take(self.shown_examples.unwrap_or(usize::MAX)) {
                out.push_str(&format!("  {}\n", case.describe(&part.name)));
            }
        }
        out
    }

    /// This task with only the first `shown` visible examples of each part in its prompt.
    pub fn with_shown_examples(mut self, shown: usize) -> Self {
        self.shown_examples = Some(shown);
        self
    }

    /// This task with its constants withheld from the prompt (see [`Task::withhold_constants`]).
    pub fn with_constants_withheld(mut self) -> Self {
        self.withhold_constants = true;
        self
    }

    /// Whether the prompt withholds any constant (the flag is on and some part has constants).
    pub fn withholds_constants(&self) -> bool {
        self.withhold_constants && self.parts.iter().any(|p| p.withheld.is_some())
    }

    /// What a failing `<run>` adds when the prompt withholds constants: `name with k = 4 , c =
    /// (0 - 2)` per part that has constants, `;`-separated, values written as program literals
    /// (so the policy can copy them). `None` when nothing is withheld.
    pub fn constants_text(&self) -> Option<String> {
        if !self.withholds_constants() {
            return None;
        }
        let parts: Vec<String> = self
            .parts
            .iter()
            .filter_map(|p| {
                let w = p.withheld.as_ref()?;
                let values: Vec<String> = w.constants.iter().map(|(name, v)| format!("{name} = {}", lit(*v))).collect();
                Some(format!("{} with {}", p.name, values.join(", ")))
            })
            .collect();
        Some(parts.join("; "))
    }

    /// The program a policy that read the withholding prompt can write before running: every
    /// part's reference with its constants left as their letters. `None` when nothing is withheld.
    pub fn symbolic_program(&self) -> Option<String> {
        if !self.withholds_constants() {
            return None;
        }
        let defs: Vec<&str> = self
            .parts
            .iter()
            .map(|p| p.withheld.as_ref().map_or(p.reference.as_str(), |w| w.symbolic_reference.as_str()))
            .collect();
        Some(defs.join("\n"))
    }

    /// All parts' reference definitions, one per line: a complete correct program.
    pub fn reference_program(&self) -> String {
        self.parts.iter().map(|p| p.reference.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// Hidden tests over all parts.
    pub fn hidden_count(&self) -> usize {
        self.parts.iter().map(|p| p.hidden.len()).sum()
    }
}

/// Visible examples per part.
const VISIBLE: usize = 3;
/// Hidden tests per part.
const HIDDEN: usize = 8;

/// Inputs a family takes.
pub(super) enum Input {
    List(Vec<i64>),
    Int(i64),
    ListInt(Vec<i64>, i64),
}

impl Input {
    fn args(&self) -> Vec<Value> {
        match self {
            Input::List(xs) => vec![Value::ints(xs)],
            Input::Int(n) => vec![Value::Int(*n)],
            Input::ListInt(xs, n) => vec![Value::ints(xs), Value::Int(*n)],
        }
    }

    fn list(&self) -> &[i64] {
        match self {
            Input::List(xs) | Input::ListInt(xs, _) => xs,
            Input::Int(_) => &[],
        }
    }
}

/// A part before its tests are drawn: text, reference, input generator and oracle.
pub(super) struct Family {
    pub(super) name: &'static str,
    pub(super) params: &'static [&'static str],
    pub(super) description: String,
    pub(super) reference: String,
    pub(super) inputs: Box<dyn Fn(&mut Rng) -> Input>,
    pub(super) oracle: Box<dyn Fn(&Input) -> Value>,
    /// The family's drawn constants, for prompts that withhold them.
    pub(super) withheld: Option<Withheld>,
}

pub(super) fn lists(min_len: usize) -> Box<dyn Fn(&mut Rng) -> Input> {
    Box::new(move |rng| Input::List(rng.list(min_len, 8, -9, 9)))
}

pub(super) fn int_result(f: impl Fn(&[i64]) -> i64 + 'static) -> Box<dyn Fn(&Input) -> Value> {
    Box::new(move |input| Value::Int(f(input.list())))
}

pub(super) fn list_result(f: impl Fn(&[i64]) -> Vec<i64> + 'static) -> Box<dyn Fn(&Input) -> Value> {
    Box::new(move |input| Value::ints(&f(input.list())))
}

fn total(rng: &mut Rng) -> Family {
    let _ = rng;
    Family {
        name: "total",
        params: &["xs"],
        description: "Return the sum of the elements of xs (0 for an empty list).".into(),
        reference: "def total(xs) = fold(\\acc x -> acc + x, 0, xs)".into(),
        withheld: None,
        inputs: lists(0),
        oracle: int_result(|xs| xs.iter().sum()),
    }
}

fn count_above(rng: &mut Rng) -> Family {
    let k = rng.int(-3, 5);
    Family {
        name: "count_above",
        params: &["xs"],
        description: format!("Return how many elements of xs are greater than {k}."),
        reference: format!("def count_above(xs) = len(filter(\\x -> x > {}, xs))", lit(k)),
        withheld: Some(Withheld::new(
            "Return how many elements of xs are greater than k.".into(),
            "def count_above(xs) = len(filter(\\x -> x > k, xs))".into(),
            &[("k", k)],
        )),
        inputs: lists(0),
        oracle: int_result(move |xs| xs.iter().filter(|&&x| x > k).count() as i64),
    }
}

fn affine(rng: &mut Rng) -> Family {
    let (m, c) = (rng.int(2, 5), rng.int(-5, 5));
    Family {
        name: "affine",
        params: &["xs"],
        description: format!("Return xs with every element x replaced by {m} * x + {c}."),
        reference: format!("def affine(xs) = map(\\x -> {m} * x + {}, xs)", lit(c)),
        withheld: Some(Withheld::new(
            "Return xs with every element x replaced by m * x + c.".into(),
            "def affine(xs) = map(\\x -> m * x + c, xs)".into(),
            &[("m", m), ("c", c)],
        )),
        inputs: lists(0),
        oracle: list_result(move |xs| xs.iter().map(|x| m * x + c).collect()),
    }
}

fn classify(rng: &mut Rng) -> Family {
    let a = rng.int(2, 4);
    let b = a + rng.int(1, 3);
    Family {
        name: "classify",
        params: &["n"],
        description: format!(
            "Return 3 if n is divisible by both {a} and {b}, else 1 if divisible by {a}, else 2 if divisible by {b}, else 0."
        ),
        reference: format!(
            "def classify(n) = if n % {a} == 0 && n % {b} == 0 then 3 else if n % {a} == 0 then 1 else if n % {b} == 0 then 2 else 0"
        ),
        withheld: Some(Withheld::new(
            "Return 3 if n is divisible by both a and b, else 1 if divisible by a, else 2 if divisible by b, else 0."
                .into(),
            "def classify(n) = if n % a == 0 && n % b == 0 then 3 else if n % a == 0 then 1 else if n % b == 0 then 2 else 0"
                .into(),
            &[("a", a), ("b", b)],
        )),
        inputs: Box::new(|rng| Input::Int(rng.int(0, 60))),
        oracle: Box::new(move |input| {
            let n = match input {
                Input::Int(n) => *n,
                _ => 0,
            };
            Value::Int(match (n % a == 0, n % b == 0) {
                (true, true) => 3,
                (true, false) => 1,
                (false, true) => 2,
                (false, false) => 0,
            })
        }),
    }
}

fn largest(rng: &mut Rng) -> Family {
    let _ = rng;
    Family {
        name: "largest",
        params: &["xs"],
        description: "Return the largest element of the non-empty list xs.".into(),
        reference: "def largest(xs) = fold(\\best x -> max(best, x), head(xs), tail(xs))".into(),
        withheld: None,
        inputs: lists(1),
        oracle: int_result(|xs| xs.iter().copied().max().unwrap_or(0)),
    }
}

fn reverse(rng: &mut Rng) -> Family {
    let _ = rng;
    Family {
        name: "reverse",
        params: &["xs"],
        description: "Return xs in reverse order.".into(),
        reference: "def reverse(xs) = fold(\\acc x -> cons(x, acc), [], xs)".into(),
        withheld: None,
        inputs: lists(0),
        oracle: list_result(|xs| xs.iter().rev().copied().collect()),
    }
}

fn running_sums(rng: &mut Rng) -> Family {
    let _ = rng;
    Family {
        name: "running_sums",
        params: &["xs"],
        description: "Return the running sums of xs: element i is xs[0] + ... + xs[i].".into(),
        reference: "def running_sums(xs) = if len(xs) == 0 then [] else \
                    let h = head(xs) in cons(h, map(\\r -> r + h, running_sums(tail(xs))))"
            .into(),
        withheld: None,
        inputs: lists(0),
        oracle: list_result(|xs| {
            xs.iter()
                .scan(0, |acc, x| {
                    *acc += x;
                    Some(*acc)
                })
                .collect()
        }),
    }
}

fn sum_squares_divisible(rng: &mut Rng) -> Family {
    let d = rng.int(2, 4);
    Family {
        name: "sum_sq_div",
        params: &["xs"],
        description: format!("Return the sum of the squares of the elements of xs that are divisible by {d}."),
        reference: format!("def sum_sq_div(xs) = fold(\\acc x -> acc + x * x, 0, filter(\\x -> x % {d} == 0, xs))"),
        withheld: Some(Withheld::new(
            "Return the sum of the squares of the elements of xs that are divisible by d.".into(),
            "def sum_sq_div(xs) = fold(\\acc x -> acc + x * x, 0, filter(\\x -> x % d == 0, xs))".into(),
            &[("d", d)],
        )),
        inputs: lists(0),
        oracle: int_result(move |xs| xs.iter().filter(|&&x| x % d == 0).map(|x| x * x).sum()),
    }
}

fn poly(rng: &mut Rng) -> Family {
    let _ = rng;
    Family {
        name: "poly",
        params: &["cs", "x"],
        description: "Evaluate the polynomial with coefficients cs (highest degree first) at x; \
                      poly([a, b, c], x) = a*x*x + b*x + c, and 0 for no coefficients."
            .into(),
        reference: "def poly(cs, x) = fold(\\acc c -> acc * x + c, 0, cs)".into(),
        withheld: None,
        inputs: Box::new(|rng| Input::ListInt(rng.list(0, 5, -5, 5), rng.int(-4, 4))),
        oracle: Box::new(|input| match input {
            Input::ListInt(cs, x) => Value::Int(cs.iter().fold(0, |acc, c| acc * x + c)),
            _ => Value::Int(0),
        }),
    }
}

/// A literal the parser reads back as the same value (`-` is an operator, so wrap negatives).
pub(super) fn lit(v: i64) -> String {
    if v < 0 {
        format!("(0 - {})", -v)
    } else {
        v.to_string()
    }
}

type FamilyFn = fn(&mut Rng) -> Family;

const EASY: [FamilyFn; 4] = [total, count_above, affine, classify];
const MEDIUM: [FamilyFn; 5] = [largest, reverse, running_sums, sum_squares_divisible, poly];

/// Draws `VISIBLE` + `HIDDEN` tests for a family.
pub(super) fn realize(family: Family, rng: &mut Rng) -> TaskPart {
    let mut cases = Vec::with_capacity(VISIBLE + HIDDEN);
    for _ in 0..VISIBLE + HIDDEN {
        let input = (family.inputs)(rng);
        cases.push(TestCase { args: input.args(), expected: (family.oracle)(&input) });
    }
    let hidden = cases.split_off(VISIBLE);
    TaskPart {
        name: family.name.to_string(),
        params: family.params.iter().map(|p| p.to_string()).collect(),
        description: family.description,
        visible: cases,
        hidden,
        reference: family.reference,
        withheld: family.withheld,
    }
}

/// The hard family whose last part calls the first two: keep, transform, sum.
fn pipeline_parts(rng: &mut Rng) -> Vec<Family> {
    let k = rng.int(-2, 3);
    let m = rng.int(2, 4);
    vec![
        Family {
            name: "keep",
            params: &["xs"],
            description: format!("Return the elements of xs greater than {k}, in order."),
            reference: format!("def keep(xs) = filter(\\x -> x > {}, xs)", lit(k)),
            withheld: Some(Withheld::new(
                "Return the elements of xs greater than k, in order.".into(),
                "def keep(xs) = filter(\\x -> x > k, xs)".into(),
                &[("k", k)],
            )),
            inputs: lists(0),
            oracle: list_result(move |xs| xs.iter().copied().filter(|&x| x > k).collect()),
        },
        Family {
            name: "scale",
            params: &["xs"],
            description: format!("Return xs with every element multiplied by {m}."),
            reference: format!("def scale(xs) = map(\\x -> x * {m}, xs)"),
            withheld: Some(Withheld::new(
                "Return xs with every element multiplied by m.".into(),
                "def scale(xs) = map(\\x -> x * m, xs)".into(),
                &[("m", m)],
            )),
            inputs: lists(0),
            oracle: list_result(move |xs| xs.iter().map(|x| x * m).collect()),
        },
        Family {
            name: "score",
            params: &["xs"],
            description: "Return the sum of scale(keep(xs)), using the two functions above.".into(),
            reference: "def score(xs) = fold(\\acc x -> acc + x, 0, scale(keep(xs)))".into(),
            withheld: None,
            inputs: lists(0),
            oracle: int_result(move |xs| xs.iter().filter(|&&x| x > k).map(|x| x * m).sum()),
        },
    ]
}

/// The task for `(level, seed)`; the same pair always gives the same task. For
/// [`Level::Project`], task `seed % 4` of the project `seed >> 2` (see [`generate_project`](super::generate_project)).
pub fn generate_task(level: Level, seed: u64) -> Task {
    // Mix the level in so that equal seeds at different levels are unrelated.
    let mut rng = Rng::new(seed ^ (level as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let (family, families): (&'static str, Vec<Family>) = match level {
        Level::Easy => {
            let f = EASY[rng.index(EASY.len())](&mut rng);
            (f.name, vec![f])
        }
        Level::Medium => {
            let f = MEDIUM[rng.index(MEDIUM.len())](&mut rng);
            (f.name, vec![f])
        }
        Level::Project => {
            return super::project::generate_project(seed >> 2)
                .swap_remove((seed & 3) as usize % super::project::PROJECT_TASKS)
        }
        Level::Hard => {
            if rng.index(3) == 0 {
                ("pipeline", pipeline_parts(&mut rng))
            } else {
                // Two or three distinct single-function families, each its own tested part.
                let mut pool: Vec<FamilyFn> = EASY.iter().chain(MEDIUM.iter()).copied().collect();
                let k = 2 + rng.index(2);
                let mut chosen = Vec::with_capacity(k);
                for _ in 0..k {
                    let f = pool.swap_remove(rng.index(pool.len()));
                    chosen.push(f(&mut rng));
                }
                ("multi", chosen)
            }
        }
    };
    let parts = families.into_iter().map(|f| realize(f, &mut rng)).collect();
    Task {
        level,
        seed,
        family,
        parts,
        shown_examples: None,
        library: Vec::new(),
        project: None,
        withhold_constants: false,
    }
}
