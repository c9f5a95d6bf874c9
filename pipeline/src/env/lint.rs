//! The `<lint>` tool: static diagnostics of a program, found without running it. Each kind is
//! something the language's semantics make certain from the text alone:
//!
//! - parse errors, and functions the task needs that are missing or take the wrong number of
//!   parameters;
//! - undefined names (not a local, a function of the program or its linked library, or a
//!   builtin);
//! - wrong arity: a call of a top-level function or builtin with the wrong number of arguments,
//!   and a lambda literal given to `map` / `filter` (1 parameter) or `fold` (2) with another count;
//! - unused bindings: a parameter, `let` or lambda parameter never read (names starting with
//!   `_` are exempt);
//! - unreachable branches: an `if` whose condition is a constant (`true`, `false`, a comparison
//!   of two integer literals);
//! - division or remainder by the literal 0.

use super::interp::Builtin;
use super::reward::{missing_part, parse_linked};
use super::{parse_program, BinOp, Expr, Program, Task};

/// What kind of problem a diagnostic reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiagnosticKind {
    /// The text does not parse.
    Parse,
    /// A function the task needs is missing or has another parameter count.
    MissingFunction,
    /// A name that refers to nothing.
    UndefinedName,
    /// A call with the wrong number of arguments.
    WrongArity,
    /// A binding never read.
    UnusedBinding,
    /// A branch no input can reach.
    UnreachableBranch,
    /// `/` or `%` by the literal 0.
    DivisionByZero,
}

/// One problem the linter found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Its kind.
    pub kind: DiagnosticKind,
    /// The function it is in (`None` for whole-program problems).
    pub function: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.function {
            Some(name) => write!(f, "in {name}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Every diagnostic of `src` as a program for `task` (its library linked), in text order.
pub fn lint(task: &Task, src: &str) -> Vec<Diagnostic> {
    let own = match parse_program(src) {
        Ok(p) => p,
        Err(e) => {
            return vec![Diagnostic {
                kind: DiagnosticKind::Parse,
                function: None,
                message: format!("parse error: {e}"),
            }]
        }
    };
    let linked = parse_linked(task, src).unwrap_or_else(|_| own.clone());
    let mut out = Vec::new();
    if let Some(problem) = missing_part(task, &linked) {
        out.push(Diagnostic { kind: DiagnosticKind::MissingFunction, function: None, message: problem });
    }
    for def in &own.functions {
        let mut walker = Walker { program: &linked, function: &def.name, scope: Vec::new(), out: &mut out };
        walker.bind_all(&def.params, &def.body);
    }
    out
}

/// The `<lint>` tool's answer for `src`.
pub fn lint_text(task: &Task, src: &str) -> String {
    let found = lint(task, src);
    if found.is_empty() {
        return "lint: no problems found".into();
    }
    let mut text = format!("lint: {} problem(s)", found.len());
    for d in found.iter().take(4) {
        text.push_str(&format!("\n{d}"));
    }
    if found.len() > 4 {
        text.push_str(&format!("\nand {} more", found.len() - 4));
    }
    text
}

struct Walker<'a> {
    program: &'a Program,
    function: &'a str,
    /// Names in scope, innermost last, with whether each has been read.
    scope: Vec<(String, bool)>,
    out: &'a mut Vec<Diagnostic>,
}

impl Walker<'_> {
    fn report(&mut self, kind: DiagnosticKind, message: String) {
        self.out.push(Diagnostic { kind, function: Some(self.function.to_string()), message });
    }

    /// Binds `names` around `body`, then reports the ones never read.
    fn bind_all(&mut self, names: &[String], body: &Expr) {
        let mark = self.scope.len();
        self.scope.extend(names.iter().map(|n| (n.clone(), false)));
        self.expr(body);
        let bound: Vec<(String, bool)> = self.scope.drain(mark..).collect();
        for (name, used) in bound {
            if !used && !name.starts_with('_') {
                self.report(DiagnosticKind::UnusedBinding, format!("{name} is never used"));
            }
        }
    }

    /// Marks the innermost local `name` read; false if there is none.
    fn use_local(&mut self, name: &str) -> bool {
        match self.scope.iter_mut().rev().find(|(n, _)| n == name) {
            Some(entry) => {
                entry.1 = true;
                true
            }
            None => false,
        }
    }

    fn expr(&mut self, expr: &Expr) {
        match expr {
            Expr::Int(_) | Expr::Bool(_) => {}
            Expr::Var(name) => {
                if !self.use_local(name) && self.program.function(name).is_none() && Builtin::from_name(name).is_none()
                {
                    self.report(DiagnosticKind::UndefinedName, format!("undefined name {name}"));
                }
            }
            Expr::List(items) => items.iter().for_each(|e| self.expr(e)),
            Expr::Neg(e) | Expr::Not(e) => self.expr(e),
            Expr::Binary(op, a, b) => {
                if matches!(op, BinOp::Div | BinOp::Rem) && matches!(**b, Expr::Int(0)) {
                    self.report(DiagnosticKind::DivisionByZero, format!("{} by 0 always fails", op.symbol()));
                }
                self.expr(a);
                self.expr(b);
            }
            Expr::Index(a, b) => {
                self.expr(a);
                self.expr(b);
            }
            Expr::Call(name, args) => {
                self.call(name, args);
                args.iter().for_each(|e| self.expr(e));
            }
            Expr::Let(name, value, body) => {
                self.expr(value);
                self.bind_all(std::slice::from_ref(name), body);
            }
            Expr::If(cond, then, otherwise) => {
                if let Some(value) = constant_bool(cond) {
                    let dead = if value { "else" } else { "then" };
                    self.report(
                        DiagnosticKind::UnreachableBranch,
                        format!("the condition is always {value}, so the {dead} branch never runs"),
                    );
                }
                self.expr(cond);
                self.expr(then);
                self.expr(otherwise);
            }
            Expr::Lambda(params, body) => self.bind_all(params, body),
        }
    }

    fn call(&mut self, name: &str, args: &[Expr]) {
        if self.use_local(name) {
            return; // a local function value: its arity is not known statically
        }
        let expected = if let Some(f) = self.program.function(name) {
            f.params.len()
        } else if let Some(b) = Builtin::from_name(name) {
            let wanted = match b {
                Builtin::Map | Builtin::Filter => Some(1),
                Builtin::Fold => Some(2),
                _ => None,
            };
            if let (Some(wanted), Some(Expr::Lambda(params, _))) = (wanted, args.first()) {
                if params.len() != wanted {
                    self.report(
                        DiagnosticKind::WrongArity,
                        format!(
                            "{name} calls its function with {wanted} argument(s), the lambda takes {}",
                            params.len()
                        ),
                    );
                }
            }
            b.arity()
        } else {
            self.report(DiagnosticKind::UndefinedName, format!("undefined function {name}"));
            return;
        };
        if expected != args.len() {
            self.report(
                DiagnosticKind::WrongArity,
                format!("{name} takes {expected} argument(s), given {}", args.len()),
            );
        }
    }
}

/// The value of a condition that is the same on every input, if it is one.
fn constant_bool(expr: &Expr) -> Option<bool> {
    match expr {
        Expr::Bool(b) => Some(*b),
        Expr::Not(e) => constant_bool(e).map(|b| !b),
        Expr::Binary(op, a, b) => match (&**a, &**b) {
            (Expr::Int(x), Expr::Int(y)) => match op {
                BinOp::Eq => Some(x == y),
                BinOp::Ne => Some(x != y),
                BinOp::Lt => Some(x < y),
                BinOp::Le => Some(x <= y),
                BinOp::Gt => Some(x > y),
                BinOp::Ge => Some(x >= y),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}
