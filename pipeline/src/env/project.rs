//! Projects: sequences of tasks that share code, like work inside one codebase. Task 0 of a
//! project writes its helper (a small integer function); each later task writes a function that
//! must call the helper, whose prompt calls it only "the helper written in the first task" (neither its name nor
//! its definition is restated). The helper and every earlier task's reference are the project's
//! library: linked into the task's programs (so calling them works) and what the `search` tool
//! looks through; the memory tool holds what earlier episodes stored.
//!
//! Training draws projects with the seed's top bit clear, held-out evaluation with it set (as
//! for single tasks), so held-out projects are never trained on.

use super::tasks::{int_result, list_result, lists, lit, realize, Family, Input};
use super::{Level, LibraryEntry, ProjectPlace, Rng, Task, Value};

/// Tasks per project: the helper, then three tasks using it.
pub const PROJECT_TASKS: usize = 4;

/// The words the helper's own description starts with: what a `<search>` or `<recall>` query
/// for it says (later prompts say only "the helper", so the query picks the helper's entry
/// over the library's other entries).
pub const HELPER_WORDS: &str = "project helper";

/// How later prompts refer to the helper (without naming it).
pub const USE_WORDS: &str = "the helper written in the first task";

/// A project's helper: its name, description, definition and value.
struct Helper {
    name: &'static str,
    description: String,
    code: String,
    apply: std::rc::Rc<dyn Fn(i64) -> i64>,
}

fn helper(rng: &mut Rng) -> Helper {
    match rng.index(4) {
        0 => {
            let (lo, hi) = (rng.int(-3, 0), rng.int(2, 6));
            Helper {
                name: "clampv",
                description: format!(
                    "The project helper: return x limited to the range {lo} to {hi} ({lo} if x is smaller, {hi} if larger)."
                ),
                code: format!("def clampv(x) = max({}, min({hi}, x))", lit(lo)),
                apply: std::rc::Rc::new(move |x| x.clamp(lo, hi)),
            }
        }
        1 => {
            let m = rng.int(2, 5);
            Helper {
                name: "bucket",
                description: format!(
                    "The project helper: return the remainder of x divided by {m} (negative for negative x)."
                ),
                code: format!("def bucket(x) = x % {m}"),
                apply: std::rc::Rc::new(move |x| x % m),
            }
        }
        2 => {
            let (a, c) = (rng.int(2, 4), rng.int(-3, 3));
            Helper {
                name: "weight",
                description: format!("The project helper: return {a} * x + {c}."),
                code: format!("def weight(x) = {a} * x + {}", lit(c)),
                apply: std::rc::Rc::new(move |x| a * x + c),
            }
        }
        _ => {
            let t = rng.int(-2, 3);
            Helper {
                name: "gap",
                description: format!("The project helper: return the distance from x to {t}."),
                code: format!("def gap(x) = abs(x - {})", lit(t)),
                apply: std::rc::Rc::new(move |x| (x - t).abs()),
            }
        }
    }
}

/// The functions later tasks write, each calling the helper `h`.
fn uses(h: &Helper, rng: &mut Rng) -> Vec<Family> {
    let name = h.name;
    let (f1, f2, f3, f4) = (h.apply.clone(), h.apply.clone(), h.apply.clone(), h.apply.clone());
    let k = rng.int(0, 3);
    vec![
        Family {
            name: "sum_all",
            params: &["xs"],
            description: format!("Return the sum of {USE_WORDS} applied to every element of xs."),
            reference: format!("def sum_all(xs) = fold(\\acc x -> acc + {name}(x), 0, xs)"),
            withheld: None,
            inputs: lists(0),
            oracle: int_result(move |xs| xs.iter().map(|&x| f1(x)).sum()),
        },
        Family {
            name: "map_all",
            params: &["xs"],
            description: format!("Return xs with {USE_WORDS} applied to every element."),
            reference: format!("def map_all(xs) = map({name}, xs)"),
            withheld: None,
            inputs: lists(0),
            oracle: list_result(move |xs| xs.iter().map(|&x| f2(x)).collect()),
        },
        Family {
            name: "count_over",
            params: &["xs"],
            description: format!("Return how many elements x of xs give a value greater than {k} under {USE_WORDS}."),
            reference: format!("def count_over(xs) = len(filter(\\x -> {name}(x) > {k}, xs))"),
            withheld: None,
            inputs: lists(0),
            oracle: int_result(move |xs| xs.iter().filter(|&&x| f3(x) > k).count() as i64),
        },
        Family {
            name: "best_of",
            params: &["xs"],
            description: format!("Return the largest value of {USE_WORDS} over the elements of the non-empty list xs."),
            reference: format!("def best_of(xs) = fold(\\best x -> max(best, {name}(x)), {name}(head(xs)), tail(xs))"),
            withheld: None,
            inputs: lists(1),
            oracle: int_result(move |xs| xs.iter().map(|&x| f4(x)).max().unwrap_or(0)),
        },
    ]
}

/// The project for `seed`: [`PROJECT_TASKS`] tasks, the helper first. Deterministic; task `i`'s
/// library holds the references of tasks `0..i`.
pub fn generate_project(seed: u64) -> Vec<Task> {
    let mut rng = Rng::new(seed ^ 0x005E_ED0F_C0DE_BA5E);
    let h = helper(&mut rng);
    let apply = h.apply.clone();
    let helper_family = Family {
        name: h.name,
        params: &["x"],
        description: h.description.clone(),
        reference: h.code.clone(),
        withheld: None,
        inputs: Box::new(|rng| Input::Int(rng.int(-9, 9))),
        oracle: Box::new(move |input| match input {
            Input::Int(x) => Value::Int(apply(*x)),
            _ => Value::Int(0),
        }),
    };
    let mut pool = uses(&h, &mut rng);
    let mut families = vec![helper_family];
    for _ in 1..PROJECT_TASKS {
        families.push(pool.swap_remove(rng.index(pool.len())));
    }
    let mut library: Vec<LibraryEntry> = Vec::new();
    let mut tasks = Vec::with_capacity(PROJECT_TASKS);
    for (position, family) in families.into_iter().enumerate() {
        let part = realize(family, &mut rng);
        let entry = LibraryEntry {
            name: part.name.clone(),
            description: part.description.clone(),
            code: part.reference.clone(),
        };
        tasks.push(Task {
            level: Level::Project,
            seed,
            family: "project",
            parts: vec![part],
            shown_examples: None,
            withhold_constants: false,
            library: library.clone(),
            project: Some(ProjectPlace { seed, position }),
        });
        library.push(entry);
    }
    tasks
}
