//! Parser: tokens -> a [`Program`] of named functions.
//!
//! Grammar (lowest precedence first):
//! ```text
//! program := ("def" NAME "(" [NAME ("," NAME)*] ")" "=" expr)+
//! expr    := "let" NAME "=" expr "in" expr
//!          | "if" expr "then" expr "else" expr
//!          | "\" NAME+ "->" expr                      # lambda
//!          | or
//! or      := and ("||" and)*
//! and     := cmp ("&&" cmp)*
//! cmp     := add [("==" | "!=" | "<" | "<=" | ">" | ">=") add]
//! add     := mul (("+" | "-" | "++") mul)*
//! mul     := unary (("*" | "/" | "%") unary)*
//! unary   := ("-" | "!") unary | postfix
//! postfix := primary ("[" expr "]")*                  # indexing
//! primary := INT | "true" | "false" | NAME | NAME "(" args ")" | "(" expr ")" | "[" args "]"
//! ```

use std::rc::Rc;

use super::lexer::{tokenize, Pos, Tok};
use super::ParseError;

/// Deepest nesting the parser accepts; deeper text is an error, never a stack overflow.
pub const MAX_PARSE_DEPTH: usize = 128;

/// Most parameters a function or lambda may take (keeps environments short).
pub const MAX_PARAMS: usize = 16;

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (truncating towards zero)
    Div,
    /// `%` (sign of the left operand)
    Rem,
    /// `++` list concatenation
    Concat,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `&&` (short-circuit)
    And,
    /// `||` (short-circuit)
    Or,
}

impl BinOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Concat => "++",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
}

/// An expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// Integer literal.
    Int(i64),
    /// `true` / `false`.
    Bool(bool),
    /// A variable, a top-level function or a builtin used as a value.
    Var(String),
    /// `[a, b, c]`
    List(Vec<Expr>),
    /// `-e`
    Neg(Box<Expr>),
    /// `!e`
    Not(Box<Expr>),
    /// `a op b`
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `xs[i]`
    Index(Box<Expr>, Box<Expr>),
    /// `f(args)`: `f` names a local function value, a top-level function or a builtin.
    Call(String, Vec<Expr>),
    /// `let name = value in body`
    Let(String, Box<Expr>, Box<Expr>),
    /// `if c then a else b`
    If(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `\a b -> body`
    Lambda(Rc<Vec<String>>, Rc<Expr>),
}

/// One `def name(params) = body`.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionDef {
    /// The function's name.
    pub name: String,
    /// Parameter names.
    pub params: Rc<Vec<String>>,
    /// The body.
    pub body: Rc<Expr>,
    /// Where the `def` starts.
    pub pos: Pos,
}

/// A parsed program: its functions in the order written.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// The functions, names unique.
    pub functions: Vec<FunctionDef>,
}

impl Program {
    /// The function called `name`, if defined.
    pub fn function(&self, name: &str) -> Option<&FunctionDef> {
        self.functions.iter().find(|f| f.name == name)
    }
}

/// Parses a whole program.
pub fn parse_program(src: &str) -> Result<Program, ParseError> {
    let tokens = tokenize(src)?;
    let mut parser = Parser { tokens, at: 0, depth: 0 };
    let mut functions: Vec<FunctionDef> = Vec::new();
    let mut names = std::collections::HashSet::new();
    while parser.peek() != &Tok::Eof {
        let def = parser.function_def()?;
        if !names.insert(def.name.clone()) {
            return Err(ParseError::DuplicateFunction { name: def.name, pos: def.pos });
        }
        functions.push(def);
    }
    if functions.is_empty() {
        return Err(ParseError::EmptyProgram);
    }
    Ok(Program { functions })
}

struct Parser {
    tokens: Vec<(Tok, Pos)>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.tokens[self.at.min(self.tokens.len() - 1)].0
    }

    fn pos(&self) -> Pos {
        self.tokens[self.at.min(self.tokens.len() - 1)].1
    }

    fn bump(&mut self) -> Tok {
        let tok = self.peek().clone();
        if self.at < self.tokens.len() - 1 {
            self.at += 1;
        }
        tok
    }

    fn unexpected(&self, expected: &'static str) -> ParseError {
        ParseError::Unexpected { found: self.peek().to_string(), expected, pos: self.pos() }
    }

    fn expect_sym(&mut self, sym: &'static str) -> Result<(), ParseError> {
        if self.peek() == &Tok::Sym(sym) {
            self.bump();
            Ok(())
        } else {
            Err(self.unexpected(sym))
        }
    }

    fn expect(&mut self, tok: Tok, expected: &'static str) -> Result<(), ParseError> {
        if self.peek() == &tok {
            self.bump();
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn ident(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Tok::Ident(name) => {
                let name = name.clone();
                self.bump();
                Ok(name)
            }
            _ => Err(self.unexpected("a name")),
        }
    }

    fn function_def(&mut self) -> Result<FunctionDef, ParseError> {
        let pos = self.pos();
        self.expect(Tok::Def, "def")?;
        let name = self.ident()?;
        self.expect_sym("(")?;
        let mut params = Vec::new();
        if self.peek() != &Tok::Sym(")") {
            loop {
                params.push(self.ident()?);
                if self.peek() == &Tok::Sym(",") {
                    self.bump();
                } else {
                    break;
                }
            }
        }
        self.expect_sym(")")?;
        if params.len() > MAX_PARAMS {
            return Err(ParseError::TooManyParams { pos, max: MAX_PARAMS });
        }
        self.expect_sym("=")?;
        let body = self.expr()?;
        Ok(FunctionDef { name, params: Rc::new(params), body: Rc::new(body), pos })
    }

    /// Every recursive production goes through here, so nesting is bounded.
    fn expr(&mut self) -> Result<Expr, ParseError> {
        self.depth += 1;
        if self.depth > MAX_PARSE_DEPTH {
            return Err(ParseError::TooDeep { pos: self.pos(), max: MAX_PARSE_DEPTH });
        }
        let result = self.expr_inner();
        self.depth -= 1;
        result
    }

    fn expr_inner(&mut self) -> Result<Expr, ParseError> {
        match self.peek() {
            Tok::Let => {
                self.bump();
                let name = self.ident()?;
                self.expect_sym("=")?;
                let value = self.expr()?;
                self.expect(Tok::In, "in")?;
                let body = self.expr()?;
                Ok(Expr::Let(name, Box::new(value), Box::new(body)))
            }
            Tok::If => {
                self.bump();
                let cond = self.expr()?;
                self.expect(Tok::Then, "then")?;
                let then = self.expr()?;
                self.expect(Tok::Else, "else")?;
                let otherwise = self.expr()?;
                Ok(Expr::If(Box::new(cond), Box::new(then), Box::new(otherwise)))
            }
            Tok::Sym("\\") => {
                self.bump();
                let mut params = vec![self.ident()?];
                while let Tok::Ident(_) = self.peek() {
                    if params.len() == MAX_PARAMS {
                        return Err(ParseError::TooManyParams { pos: self.pos(), max: MAX_PARAMS });
                    }
                    params.push(self.ident()?);
                }
                self.expect_sym("->")?;
                let body = self.expr()?;
                Ok(Expr::Lambda(Rc::new(params), Rc::new(body)))
            }
            _ => self.or(),
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut lhs = self.and()?;
        let depth = self.depth;
        while self.peek() == &Tok::Sym("||") {
            self.bump();
            self.chain_link()?;
            let rhs = self.and()?;
            lhs = Expr::Binary(BinOp::Or, Box::new(lhs), Box::new(rhs));
        }
        self.depth = depth;
        Ok(lhs)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut lhs = self.cmp()?;
        let depth = self.depth;
        while self.peek() == &Tok::Sym("&&") {
            self.bump();
            self.chain_link()?;
            let rhs = self.cmp()?;
            lhs = Expr::Binary(BinOp::And, Box::new(lhs), Box::new(rhs));
        }
        self.depth = depth;
        Ok(lhs)
    }

    fn cmp(&mut self) -> Result<Expr, ParseError> {
        let lhs = self.add()?;
        let op = match self.peek() {
            Tok::Sym("==") => BinOp::Eq,
            Tok::Sym("!=") => BinOp::Ne,
            Tok::Sym("<") => BinOp::Lt,
            Tok::Sym("<=") => BinOp::Le,
            Tok::Sym(">") => BinOp::Gt,
            Tok::Sym(">=") => BinOp::Ge,
            _ => return Ok(lhs),
        };
        self.bump();
        let rhs = self.add()?;
        Ok(Expr::Binary(op, Box::new(lhs), Box::new(rhs)))
    }

    fn add(&mut self) -> Result<Expr, ParseError> {
        let mut lhs = self.mul()?;
        let depth = self.depth;
        loop {
            let op = match self.peek() {
                Tok::Sym("+") => BinOp::Add,
                Tok::Sym("-") => BinOp::Sub,
                Tok::Sym("++") => BinOp::Concat,
                _ => {
                    self.depth = depth;
                    return Ok(lhs);
                }
            };
            self.bump();
            self.chain_link()?;
            let rhs = self.mul()?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
    }

    fn mul(&mut self) -> Result<Expr, ParseError> {
        let mut lhs = self.unary()?;
        let depth = self.depth;
        loop {
            let op = match self.peek() {
                Tok::Sym("*") => BinOp::Mul,
                Tok::Sym("/") => BinOp::Div,
                Tok::Sym("%") => BinOp::Rem,
                _ => {
                    self.depth = depth;
                    return Ok(lhs);
                }
            };
            self.bump();
            self.chain_link()?;
            let rhs = self.unary()?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        match self.peek() {
            Tok::Sym("-") => {
                self.bump();
                // Through `expr`'s depth guard: `- - - - ...` must not overflow the stack.
                let inner = self.nested(Self::unary)?;
                Ok(Expr::Neg(Box::new(inner)))
            }
            Tok::Sym("!") => {
                self.bump();
                let inner = self.nested(Self::unary)?;
                Ok(Expr::Not(Box::new(inner)))
            }
            _ => self.postfix(),
        }
    }

    /// Counts one more link of a left-leaning operator chain (`1+1+1+...`) against the depth limit,
    /// so that the tree it builds stays shallow enough to evaluate and drop.
    fn chain_link(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_PARSE_DEPTH {
            return Err(ParseError::TooDeep { pos: self.pos(), max: MAX_PARSE_DEPTH });
        }
        Ok(())
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Expr, ParseError>) -> Result<Expr, ParseError> {
        self.depth += 1;
        if self.depth > MAX_PARSE_DEPTH {
            return Err(ParseError::TooDeep { pos: self.pos(), max: MAX_PARSE_DEPTH });
        }
        let result = f(self);
        self.depth -= 1;
        result
    }

    fn postfix(&mut self) -> Result<Expr, ParseError> {
        let mut value = self.primary()?;
        let depth = self.depth;
        while self.peek() == &Tok::Sym("[") {
            self.bump();
            self.chain_link()?;
            let index = self.expr()?;
            self.expect_sym("]")?;
            value = Expr::Index(Box::new(value), Box::new(index));
        }
        self.depth = depth;
        Ok(value)
    }

    fn args(&mut self, close: &'static str) -> Result<Vec<Expr>, ParseError> {
        let mut args = Vec::new();
        if self.peek() != &Tok::Sym(close) {
            loop {
                args.push(self.expr()?);
                if self.peek() == &Tok::Sym(",") {
                    self.bump();
                } else {
                    break;
                }
            }
        }
        self.expect_sym(close)?;
        Ok(args)
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let start = self.at;
        match self.bump() {
            Tok::Int(v) => Ok(Expr::Int(v)),
            Tok::True => Ok(Expr::Bool(true)),
            Tok::False => Ok(Expr::Bool(false)),
            Tok::Ident(name) => {
                if self.peek() == &Tok::Sym("(") {
                    self.bump();
                    Ok(Expr::Call(name, self.args(")")?))
                } else {
                    Ok(Expr::Var(name))
                }
            }
            Tok::Sym("(") => {
                let inner = self.expr()?;
                self.expect_sym(")")?;
                Ok(inner)
            }
            Tok::Sym("[") => Ok(Expr::List(self.args("]")?)),
            _ => {
                self.at = start;
                Err(self.unexpected("an expression"))
            }
        }
    }
}
