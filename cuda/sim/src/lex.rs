//! Tokens of PTX text, each with its 1-based line.

use crate::Error;

/// A token.
#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// A name: directives (`.reg`), opcodes (`ld.global.f32`), registers (`%r1`), labels.
    Ident(String),
    /// A numeric literal as written.
    Num(String),
    /// A string literal (contents).
    Str(String),
    /// One punctuation character.
    Punct(char),
}

/// A token and where it is.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token.
    pub tok: Tok,
    /// 1-based line.
    pub line: u32,
}

fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '$' || c == '%' || c == '.'
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '.' || c == ':'
}

/// Splits PTX text into tokens, dropping comments.
pub fn lex(text: &str) -> Result<Vec<Token>, Error> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1u32;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
        } else if c == '"' {
            let start = i + 1;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            out.push(Token { tok: Tok::Str(chars[start..i.min(chars.len())].iter().collect()), line });
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Token { tok: Tok::Num(chars[start..i].iter().collect()), line });
        } else if ident_start(c) {
            let start = i;
            i += 1;
            while i < chars.len() && ident_char(chars[i]) {
                // `::` belongs to names such as `shared::cta`; a single ':' ends a label.
                if chars[i] == ':' && chars.get(i + 1) != Some(&':') && (i == 0 || chars[i - 1] != ':') {
                    break;
                }
                i += 1;
            }
            out.push(Token { tok: Tok::Ident(chars[start..i].iter().collect()), line });
        } else if "{}[](),;:<>+-|!@=*".contains(c) {
            out.push(Token { tok: Tok::Punct(c), line });
            i += 1;
        } else {
            return Err(Error::Parse { line: line as usize, message: format!("unexpected character {c:?}") });
        }
    }
    Ok(out)
}
