//! The sandboxed interpreter: evaluates a [`Program`] function on argument values under a
//! [`Budget`] of steps, list cells and nesting depth. It has no I/O; every run ends, either with a
//! value or with a typed [`RunError`].

use std::collections::HashMap;
use std::rc::Rc;

use super::parser::{BinOp, Expr, Program};
use super::RunError;

/// Limits on one function call (one test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Evaluation steps (one per expression evaluated, one per list element a builtin touches).
    pub max_steps: u64,
    /// List cells and closures allocated, in total over the run.
    pub max_cells: u64,
    /// Deepest evaluation nesting (bounds recursion so the Rust stack never overflows). The
    /// default of 256 runs within a 1 MiB stack in the dev profile (tested); raise it only with a
    /// bigger stack.
    pub max_depth: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self { max_steps: 200_000, max_cells: 100_000, max_depth: 256 }
    }
}

/// Deepest nesting of a value (lists in lists, closures holding closures); keeps drops shallow.
pub const MAX_VALUE_DEPTH: u32 = 64;

/// A builtin function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `len(xs)`
    Len,
    /// `range(a, b)`: `[a, a+1, ..., b-1]`
    Range,
    /// `map(f, xs)`
    Map,
    /// `filter(f, xs)`
    Filter,
    /// `fold(f, init, xs)`: `f(...f(f(init, x0), x1)..., xn)`
    Fold,
    /// `cons(x, xs)`: `[x] ++ xs`
    Cons,
    /// `head(xs)`: first element
    Head,
    /// `tail(xs)`: all but the first element
    Tail,
    /// `abs(x)`
    Abs,
    /// `min(a, b)`
    Min,
    /// `max(a, b)`
    Max,
}

impl Builtin {
    /// The builtin called `name`.
    pub fn from_name(name: &str) -> Option<Builtin> {
        Some(match name {
            "len" => Builtin::Len,
            "range" => Builtin::Range,
            "map" => Builtin::Map,
            "filter" => Builtin::Filter,
            "fold" => Builtin::Fold,
            "cons" => Builtin::Cons,
            "head" => Builtin::Head,
            "tail" => Builtin::Tail,
            "abs" => Builtin::Abs,
            "min" => Builtin::Min,
            "max" => Builtin::Max,
            _ => return None,
        })
    }

    /// Its name in programs.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Len => "len",
            Builtin::Range => "range",
            Builtin::Map => "map",
            Builtin::Filter => "filter",
            Builtin::Fold => "fold",
            Builtin::Cons => "cons",
            Builtin::Head => "head",
            Builtin::Tail => "tail",
            Builtin::Abs => "abs",
            Builtin::Min => "min",
            Builtin::Max => "max",
        }
    }

    pub(crate) fn arity(self) -> usize {
        match self {
            Builtin::Len | Builtin::Head | Builtin::Tail | Builtin::Abs => 1,
            Builtin::Fold => 3,
            _ => 2,
        }
    }
}

/// A function value.
#[derive(Debug, Clone)]
pub enum Func {
    /// A lambda with the environment it closed over.
    Lambda {
        /// Parameter names.
        params: Rc<Vec<String>>,
        /// Body.
        body: Rc<Expr>,
        /// Captured variables.
        env: Env,
    },
    /// A top-level function, by index into [`Program::functions`].
    Def(usize),
    /// A builtin.
    Builtin(Builtin),
}

/// A value of the language.
#[derive(Debug, Clone)]
pub enum Value {
    /// A 64-bit integer (arithmetic is checked: overflow is an error).
    Int(i64),
    /// A boolean (from comparisons).
    Bool(bool),
    /// A list and its nesting depth.
    List(Rc<Vec<Value>>, u32),
    /// A function and its nesting depth.
    Func(Rc<Func>, u32),
}

impl Value {
    /// A list of integers.
    pub fn ints(items: &[i64]) -> Value {
        Value::List(Rc::new(items.iter().map(|&v| Value::Int(v)).collect()), 1)
    }

    /// A list of values (depth computed from the items).
    pub fn list(items: Vec<Value>) -> Value {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        Value::List(Rc::new(items), depth)
    }

    /// How deeply nested the value is (0 for integers and booleans).
    pub fn depth(&self) -> u32 {
        match self {
            Value::Int(_) | Value::Bool(_) => 0,
            Value::List(_, d) | Value::Func(_, d) => *d,
        }
    }

    /// The type's name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::Bool(_) => "bool",
            Value::List(..) => "list",
            Value::Func(..) => "function",
        }
    }

    /// Structural equality; `None` if a function is involved (functions cannot be compared).
    pub fn try_eq(&self, other: &Value) -> Option<bool> {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => Some(a == b),
            (Value::Bool(a), Value::Bool(b)) => Some(a == b),
            (Value::List(a, _), Value::List(b, _)) => {
                if a.len() != b.len() {
                    return Some(false);
                }
                for (x, y) in a.iter().zip(b.iter()) {
                    if !x.try_eq(y)? {
                        return Some(false);
                    }
                }
                Some(true)
            }
            (Value::Func(..), _) | (_, Value::Func(..)) => None,
            _ => Some(false),
        }
    }
}

impl PartialEq for Value {
    /// Structural equality; functions are never equal.
    fn eq(&self, other: &Value) -> bool {
        self.try_eq(other) == Some(true)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::List(items, _) => {
                write!(f, "[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                write!(f, "]")
            }
            Value::Func(..) => write!(f, "<function>"),
        }
    }
}

/// Variables in scope: a persistent linked list, newest first. Its length is bounded by the
/// program's lexical nesting (parse depth and parameter limits), so drops stay shallow.
#[derive(Debug, Clone, Default)]
pub struct Env(Option<Rc<EnvNode>>);

/// One binding of an [`Env`].
#[derive(Debug)]
pub struct EnvNode {
    name: String,
    value: Value,
    next: Env,
    /// Deepest value depth in this node and all after it.
    depth: u32,
}

impl Env {
    fn bind(&self, name: &str, value: Value) -> Env {
        let depth = value.depth().max(self.depth());
        Env(Some(Rc::new(EnvNode { name: name.to_string(), value, next: self.clone(), depth })))
    }

    fn depth(&self) -> u32 {
        self.0.as_ref().map_or(0, |node| node.depth)
    }

    /// The innermost binding of `name`, and how many bindings were looked at (charged as steps).
    fn lookup(&self, name: &str) -> (Option<&Value>, u64) {
        let mut at = self.0.as_ref();
        let mut walked = 0;
        while let Some(node) = at {
            walked += 1;
            if node.name == name {
                return (Some(&node.value), walked);
            }
            at = node.next.0.as_ref();
        }
        (None, walked)
    }
}

impl Drop for EnvNode {
    /// Unlinks the chain iteratively, so a long environment never recurses deeply on drop.
    fn drop(&mut self) {
        let mut next = self.next.0.take();
        while let Some(rc) = next {
            match Rc::try_unwrap(rc) {
                Ok(mut node) => next = node.next.0.take(),
                Err(_) => break,
            }
        }
    }
}

/// Runs functions of one program under a budget. Counters reset on every [`Interpreter::call`].
pub struct Interpreter<'p> {
    program: &'p Program,
    /// Function name -> index into `program.functions`.
    index: HashMap<&'p str, usize>,
    budget: Budget,
    steps: u64,
    cells: u64,
    depth: usize,
}

impl<'p> Interpreter<'p> {
    /// An interpreter for `program`.
    pub fn new(program: &'p Program, budget: Budget) -> Self {
        let index = program.functions.iter().enumerate().map(|(i, f)| (f.name.as_str(), i)).collect();
        Self { program, index, budget, steps: 0, cells: 0, depth: 0 }
    }

    /// Steps used by the last call.
    pub fn steps_used(&self) -> u64 {
        self.steps
    }

    /// Calls the top-level function `name` on `args` with a fresh budget.
    pub fn call(&mut self, name: &str, args: &[Value]) -> Result<Value, RunError> {
        self.steps = 0;
        self.cells = 0;
        self.depth = 0;
        let index = *self.index.get(name).ok_or_else(|| RunError::UnknownName { name: name.to_string() })?;
        self.apply(&Func::Def(index), args.to_vec())
    }

    fn step(&mut self, n: u64) -> Result<(), RunError> {
        self.steps = self.steps.saturating_add(n);
        if self.steps > self.budget.max_steps {
            return Err(RunError::StepBudget { max: self.budget.max_steps });
        }
        Ok(())
    }

    fn alloc(&mut self, n: u64) -> Result<(), RunError> {
        self.cells = self.cells.saturating_add(n);
        if self.cells > self.budget.max_cells {
            return Err(RunError::MemoryBudget { max: self.budget.max_cells });
        }
        Ok(())
    }

    fn make_list(&mut self, items: Vec<Value>) -> Result<Value, RunError> {
        self.alloc(items.len() as u64 + 1)?;
        let value = Value::list(items);
        if value.depth() > MAX_VALUE_DEPTH {
            return Err(RunError::ValueTooDeep { max: MAX_VALUE_DEPTH });
        }
        Ok(value)
    }

    fn eval(&mut self, expr: &Expr, env: &Env) -> Result<Value, RunError> {
        self.step(1)?;
        self.depth += 1;
        if self.depth > self.budget.max_depth {
            return Err(RunError::DepthLimit { max: self.budget.max_depth });
        }
        let result = self.eval_inner(expr, env);
        self.depth -= 1;
        result
    }

    fn eval_inner(&mut self, expr: &Expr, env: &Env) -> Result<Value, RunError> {
        match expr {
            Expr::Int(v) => Ok(Value::Int(*v)),
            Expr::Bool(b) => Ok(Value::Bool(*b)),
            Expr::Var(name) => self.resolve(name, env),
            Expr::List(items) => {
                let mut values = Vec::with_capacity(items.len());
                for item in items {
                    values.push(self.eval(item, env)?);
                }
                self.make_list(values)
            }
            Expr::Neg(inner) => {
                let v = int(self.eval(inner, env)?, "-")?;
                Ok(Value::Int(v.checked_neg().ok_or(RunError::Overflow { op: "-" })?))
            }
            Expr::Not(inner) => Ok(Value::Bool(!boolean(self.eval(inner, env)?, "!")?)),
            Expr::Binary(op, lhs, rhs) => self.binary(*op, lhs, rhs, env),
            Expr::Index(list, index) => {
                let list = self.eval(list, env)?;
                let index = int(self.eval(index, env)?, "index")?;
                let items = list_items(&list, "index")?;
                usize::try_from(index)
                    .ok()
                    .and_then(|i| items.get(i).cloned())
                    .ok_or(RunError::IndexOutOfRange { index, len: items.len() })
            }
            Expr::Call(name, args) => {
                let func = self.resolve(name, env)?;
                let Value::Func(func, _) = func else {
                    return Err(RunError::NotAFunction { name: name.clone() });
                };
                let mut values = Vec::with_capacity(args.len());
                for arg in args {
                    values.push(self.eval(arg, env)?);
                }
                self.apply(&func, values)
            }
            Expr::Let(name, value, body) => {
                let value = self.eval(value, env)?;
                self.eval(body, &env.bind(name, value))
            }
            Expr::If(cond, then, otherwise) => {
                if boolean(self.eval(cond, env)?, "if")? {
                    self.eval(then, env)
                } else {
                    self.eval(otherwise, env)
                }
            }
            Expr::Lambda(params, body) => {
                self.alloc(1)?;
                let depth = env.depth() + 1;
                if depth > MAX_VALUE_DEPTH {
                    return Err(RunError::ValueTooDeep { max: MAX_VALUE_DEPTH });
                }
                let func = Func::Lambda { params: params.clone(), body: body.clone(), env: env.clone() };
                Ok(Value::Func(Rc::new(func), depth))
            }
        }
    }

    /// A name's value: a local, else a top-level function, else a builtin.
    fn resolve(&mut self, name: &str, env: &Env) -> Result<Value, RunError> {
        let (local, walked) = env.lookup(name);
        self.step(walked)?;
        if let Some(value) = local {
            return Ok(value.clone());
        }
        if let Some(&index) = self.index.get(name) {
            return Ok(Value::Func(Rc::new(Func::Def(index)), 1));
        }
        if let Some(builtin) = Builtin::from_name(name) {
            return Ok(Value::Func(Rc::new(Func::Builtin(builtin)), 1));
        }
        Err(RunError::UnknownName { name: name.to_string() })
    }

    fn binary(&mut self, op: BinOp, lhs: &Expr, rhs: &Expr, env: &Env) -> Result<Value, RunError> {
        let sym = op.symbol();
        let a = self.eval(lhs, env)?;
        // `&&` and `||` short-circuit: the right side runs only when it decides the result.
        match op {
            BinOp::And if !boolean(a.clone(), sym)? => return Ok(Value::Bool(false)),
            BinOp::Or if boolean(a.clone(), sym)? => return Ok(Value::Bool(true)),
            _ => {}
        }
        let b = self.eval(rhs, env)?;
        match op {
            BinOp::And | BinOp::Or => Ok(Value::Bool(boolean(b, sym)?)),
            BinOp::Eq | BinOp::Ne => {
                let eq =
                    a.try_eq(&b).ok_or(RunError::Type { op: sym, expected: "int, bool or list", found: "function" })?;
                Ok(Value::Bool(eq == (op == BinOp::Eq)))
            }
            BinOp::Concat => {
                let (xs, ys) = (list_items(&a, sym)?, list_items(&b, sym)?);
                self.step((xs.len() + ys.len()) as u64)?;
                let joined: Vec<Value> = xs.iter().chain(ys.iter()).cloned().collect();
                self.make_list(joined)
            }
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
                let (x, y) = (int(a, sym)?, int(b, sym)?);
                let value = match op {
                    BinOp::Add => x.checked_add(y),
                    BinOp::Sub => x.checked_sub(y),
                    BinOp::Mul => x.checked_mul(y),
                    _ if y == 0 => return Err(RunError::DivisionByZero),
                    BinOp::Div => x.checked_div(y),
                    _ => x.checked_rem(y),
                };
                Ok(Value::Int(value.ok_or(RunError::Overflow { op: sym })?))
            }
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let (x, y) = (int(a, sym)?, int(b, sym)?);
                Ok(Value::Bool(match op {
                    BinOp::Lt => x < y,
                    BinOp::Le => x <= y,
                    BinOp::Gt => x > y,
                    _ => x >= y,
                }))
            }
        }
    }

    fn apply(&mut self, func: &Func, args: Vec<Value>) -> Result<Value, RunError> {
        match func {
            Func::Lambda { params, body, env } => {
                check_arity("lambda", params.len(), args.len())?;
                let mut env = env.clone();
                for (name, value) in params.iter().zip(args) {
                    env = env.bind(name, value);
                }
                self.eval(body, &env)
            }
            Func::Def(index) => {
                let program = self.program;
                let def = &program.functions[*index];
                check_arity(&def.name, def.params.len(), args.len())?;
                let mut env = Env::default();
                for (name, value) in def.params.iter().zip(args) {
                    env = env.bind(name, value);
                }
                self.eval(&def.body, &env)
            }
            Func::Builtin(builtin) => {
                check_arity(builtin.name(), builtin.arity(), args.len())?;
                self.builtin(*builtin, args)
            }
        }
    }

    fn builtin(&mut self, builtin: Builtin, mut args: Vec<Value>) -> Result<Value, RunError> {
        let name = builtin.name();
        match builtin {
            Builtin::Len => Ok(Value::Int(list_items(&args[0], name)?.len() as i64)),
            Builtin::Abs => {
                let v = int(args.swap_remove(0), name)?;
                Ok(Value::Int(v.checked_abs().ok_or(RunError::Overflow { op: name })?))
            }
            Builtin::Min | Builtin::Max => {
                let (a, b) = (int(args[0].clone(), name)?, int(args[1].clone(), name)?);
                Ok(Value::Int(if builtin == Builtin::Min { a.min(b) } else { a.max(b) }))
            }
            Builtin::Range => {
                let (lo, hi) = (int(args[0].clone(), name)?, int(args[1].clone(), name)?);
                let n = hi.saturating_sub(lo).max(0) as u64;
                // Charge before allocating, so `range(0, 1000000000000)` fails cheaply.
                self.step(n)?;
                self.alloc(n + 1)?;
                Ok(Value::list((lo..hi.max(lo)).map(Value::Int).collect()))
            }
            Builtin::Head => list_items(&args[0], name)?.first().cloned().ok_or(RunError::EmptyList { op: name }),
            Builtin::Tail => {
                let items = list_items(&args[0], name)?;
                if items.is_empty() {
                    return Err(RunError::EmptyList { op: name });
                }
                self.step(items.len() as u64)?;
                self.make_list(items[1..].to_vec())
            }
            Builtin::Cons => {
                let items = list_items(&args[1], name)?;
                self.step(items.len() as u64)?;
                let mut joined = Vec::with_capacity(items.len() + 1);
                joined.push(args[0].clone());
                joined.extend(items.iter().cloned());
                self.make_list(joined)
            }
            Builtin::Map | Builtin::Filter => {
                let func = function(&args[0], name)?;
                let items = list_items(&args[1], name)?.clone();
                let mut out = Vec::with_capacity(items.len());
                for item in items.iter() {
                    let result = self.apply(&func, vec![item.clone()])?;
                    if builtin == Builtin::Map {
                        out.push(result);
                    } else if boolean(result, name)? {
                        out.push(item.clone());
                    }
                }
                self.make_list(out)
            }
            Builtin::Fold => {
                let func = function(&args[0], name)?;
                let items = list_items(&args[2], name)?.clone();
                let mut acc = args.swap_remove(1);
                for item in items.iter() {
                    acc = self.apply(&func, vec![acc, item.clone()])?;
                }
                Ok(acc)
            }
        }
    }
}

fn check_arity(name: &str, expected: usize, found: usize) -> Result<(), RunError> {
    if expected == found {
        Ok(())
    } else {
        Err(RunError::Arity { name: name.to_string(), expected, found })
    }
}

fn int(value: Value, op: &'static str) -> Result<i64, RunError> {
    match value {
        Value::Int(v) => Ok(v),
        other => Err(RunError::Type { op, expected: "int", found: other.type_name() }),
    }
}

fn boolean(value: Value, op: &'static str) -> Result<bool, RunError> {
    match value {
        Value::Bool(b) => Ok(b),
        other => Err(RunError::Type { op, expected: "bool", found: other.type_name() }),
    }
}

fn list_items<'v>(value: &'v Value, op: &'static str) -> Result<&'v Rc<Vec<Value>>, RunError> {
    match value {
        Value::List(items, _) => Ok(items),
        other => Err(RunError::Type { op, expected: "list", found: other.type_name() }),
    }
}

fn function(value: &Value, op: &'static str) -> Result<Func, RunError> {
    match value {
        Value::Func(func, _) => Ok((**func).clone()),
        other => Err(RunError::Type { op, expected: "function", found: other.type_name() }),
    }
}
