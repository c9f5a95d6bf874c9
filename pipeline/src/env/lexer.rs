//! Tokenizer: program text -> tokens with their positions.

use super::ParseError;

/// A place in the program text (1-based line and column, 0-based byte offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Byte offset from the start of the text.
    pub offset: usize,
    /// Line, from 1.
    pub line: usize,
    /// Column (in characters), from 1.
    pub col: usize,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// One token of the language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    /// An integer literal (non-negative; `-` is an operator).
    Int(i64),
    /// A name: function, parameter, let-bound variable or builtin.
    Ident(String),
    /// `def`
    Def,
    /// `let`
    Let,
    /// `in`
    In,
    /// `if`
    If,
    /// `then`
    Then,
    /// `else`
    Else,
    /// `true`
    True,
    /// `false`
    False,
    /// An operator or punctuation: `( ) [ ] , = \ -> + - * / % ++ == != < <= > >= && || !`.
    Sym(&'static str),
    /// End of the text.
    Eof,
}

impl std::fmt::Display for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tok::Int(v) => write!(f, "{v}"),
            Tok::Ident(s) => write!(f, "{s}"),
            Tok::Def => write!(f, "def"),
            Tok::Let => write!(f, "let"),
            Tok::In => write!(f, "in"),
            Tok::If => write!(f, "if"),
            Tok::Then => write!(f, "then"),
            Tok::Else => write!(f, "else"),
            Tok::True => write!(f, "true"),
            Tok::False => write!(f, "false"),
            Tok::Sym(s) => write!(f, "{s}"),
            Tok::Eof => write!(f, "end of program"),
        }
    }
}

/// Symbols, longest first so that `->` wins over `-` and `==` over `=`.
const SYMBOLS: [&str; 23] = [
    "->", "++", "==", "!=", "<=", ">=", "&&", "||", "(", ")", "[", "]", ",", "=", "\\", "+", "-", "*", "/", "%", "<",
    ">", "!",
];

/// Longest accepted program text in bytes; longer text is a parse error, not a slow parse.
pub const MAX_PROGRAM_BYTES: usize = 64 * 1024;

/// Splits `src` into tokens; the last one is always [`Tok::Eof`]. `#` starts a comment to the end
/// of the line.
pub fn tokenize(src: &str) -> Result<Vec<(Tok, Pos)>, ParseError> {
    if src.len() > MAX_PROGRAM_BYTES {
        return Err(ParseError::TooLong { bytes: src.len(), max: MAX_PROGRAM_BYTES });
    }
    let mut tokens = Vec::new();
    let mut pos = Pos { offset: 0, line: 1, col: 1 };
    let bytes = src.as_bytes();
    let advance = |pos: &mut Pos, ch: char| {
        pos.offset += ch.len_utf8();
        if ch == '\n' {
            pos.line += 1;
            pos.col = 1;
        } else {
            pos.col += 1;
        }
    };
    while let Some(ch) = src[pos.offset..].chars().next() {
        let start = pos;
        if ch.is_whitespace() {
            advance(&mut pos, ch);
        } else if ch == '#' {
            while let Some(c) = src[pos.offset..].chars().next() {
                if c == '\n' {
                    break;
                }
                advance(&mut pos, c);
            }
        } else if ch.is_ascii_digit() {
            let mut value: i64 = 0;
            while pos.offset < bytes.len() && bytes[pos.offset].is_ascii_digit() {
                let digit = i64::from(bytes[pos.offset] - b'0');
                value = value
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(digit))
                    .ok_or(ParseError::IntTooLarge { pos: start })?;
                let c = bytes[pos.offset] as char;
                advance(&mut pos, c);
            }
            tokens.push((Tok::Int(value), start));
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            let mut word = String::new();
            while pos.offset < bytes.len() && (bytes[pos.offset].is_ascii_alphanumeric() || bytes[pos.offset] == b'_') {
                let c = bytes[pos.offset] as char;
                word.push(c);
                advance(&mut pos, c);
            }
            let tok = match word.as_str() {
                "def" => Tok::Def,
                "let" => Tok::Let,
                "in" => Tok::In,
                "if" => Tok::If,
                "then" => Tok::Then,
                "else" => Tok::Else,
                "true" => Tok::True,
                "false" => Tok::False,
                _ => Tok::Ident(word),
            };
            tokens.push((tok, start));
        } else if let Some(sym) = SYMBOLS.iter().find(|s| src[pos.offset..].starts_with(**s)) {
            for c in sym.chars() {
                advance(&mut pos, c);
            }
            tokens.push((Tok::Sym(sym), start));
        } else {
            return Err(ParseError::UnexpectedChar { ch, pos: start });
        }
    }
    tokens.push((Tok::Eof, pos));
    Ok(tokens)
}
