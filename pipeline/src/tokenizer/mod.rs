//! A small, deterministic word-level tokenizer for episodes of the coding environment.
//!
//! The vocabulary is laid out in four fixed blocks:
//!
//! 1. special tokens: `<pad> <bos> <unk> <code> <run> <submit> <think> </think> <out> </out> <nl>`
//!    and issue 21's tool tokens `<store> </store> <recall> </recall> <search> </search> <lint>`;
//! 2. the ten digits `0`..`9`: an integer is written digit by digit, so every integer is
//!    representable (a `-` before it is the minus token, as in the language itself);
//! 3. symbols: the operators and punctuation of the language (`->`, `++`, `==`, `(`, ...) plus
//!    every other ASCII punctuation character (for prose: `.`, `:`, `;`, ...);
//! 4. words, sorted: keywords, builtins, a few generic names, and every word of the prompts,
//!    reference programs and tool outputs of tasks generated for a fixed range of seeds at every
//!    level (gathered at construction, so the same code always builds the same vocabulary).
//!
//! Program text goes through the environment's lexer ([`env::tokenize`]): one token per keyword,
//! operator, punctuation mark and identifier, integers as digits. [`Tokenizer::decode_program`]
//! writes text that [`env::parse_program`] reads back to the same program. Prose (task statements,
//! tool output) is split into words, digits and punctuation; newlines become `<nl>`, other white
//! space is dropped, and a word outside the vocabulary becomes `<unk>`.
//!
//! # Episode grammar
//!
//! ```text
//! episode  := prompt turn* last
//! prompt   := <bos> text(task statement) <code>             Global, not trained on
//! turn     := body tool output <code>                       body and tool sampled; output a
//!                                                           Document; <code> forced (Global)
//! tool     := <run> | <lint> | <store> text </store> | <recall> text </recall>
//!           | <search> text </search>                       (the spans end the turn when closed)
//! last     := body (<submit> | <run>)?                      the episode may also stop early
//! body     := (program token | <think> text </think>)*      think and tool spans are not program text
//! output   := <out> text(tool output) </out>
//! ```
//!
//! The program of a turn is its body with the think spans removed, decoded by
//! [`Tokenizer::decode_program`]. [`Tokenizer::prompt_tokens`] and
//! [`Tokenizer::tool_output_tokens`] build the fixed parts; the rollout loop and the supervised
//! traces both use them, so a policy trained on traces can act in the loop.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::env::{self, Budget, Episode, EpisodeConfig, Level, ParseError, Pos, RunError, Tok, ToolCall};
use crate::Error;

#[cfg(test)]
mod tests;

/// Padding (never produced by the loop).
pub const PAD: u32 = 0;
/// Start of an episode.
pub const BOS: u32 = 1;
/// A prose word outside the vocabulary.
pub const UNK: u32 = 2;
/// Ends the prompt and each tool output: the policy writes a program after it.
pub const CODE: u32 = 3;
/// Tool token: run the current turn's program on the visible examples.
pub const RUN: u32 = 4;
/// Tool token: submit the current turn's program; ends the episode.
pub const SUBMIT: u32 = 5;
/// Opens a scratch span that is not part of the program.
pub const THINK: u32 = 6;
/// Closes a scratch span.
pub const END_THINK: u32 = 7;
/// Opens a tool output (the first token of its Document segment).
pub const OUT: u32 = 8;
/// Closes a tool output (the last token of its Document segment).
pub const END_OUT: u32 = 9;
/// A line break in prose.
pub const NL: u32 = 10;
/// Opens a `<store>` span: its text is saved to the project's memory.
pub const STORE: u32 = 11;
/// Closes a `<store>` span (the tool call).
pub const END_STORE: u32 = 12;
/// Opens a `<recall>` span: its text is the query to the project's memory.
pub const RECALL: u32 = 13;
/// Closes a `<recall>` span (the tool call).
pub const END_RECALL: u32 = 14;
/// Opens a `<search>` span: its text is the query to the project's library.
pub const SEARCH: u32 = 15;
/// Closes a `<search>` span (the tool call).
pub const END_SEARCH: u32 = 16;
/// Tool token: lint the current turn's program (static diagnostics, no run).
pub const LINT: u32 = 17;

/// The special tokens, in id order.
pub const SPECIALS: [&str; 18] = [
    "<pad>",
    "<bos>",
    "<unk>",
    "<code>",
    "<run>",
    "<submit>",
    "<think>",
    "</think>",
    "<out>",
    "</out>",
    "<nl>",
    "<store>",
    "</store>",
    "<recall>",
    "</recall>",
    "<search>",
    "</search>",
    "<lint>",
];

/// The span tools: (opening token, closing token).
pub const SPAN_TOOLS: [(u32, u32); 3] = [(STORE, END_STORE), (RECALL, END_RECALL), (SEARCH, END_SEARCH)];

/// Id of the digit `0`; digit `d` is `DIGIT_0 + d`.
pub const DIGIT_0: u32 = SPECIALS.len() as u32;

/// The language's multi-character operators (its single-character ones are in [`PUNCTUATION`]).
const MULTI_SYMBOLS: [&str; 8] = ["->", "++", "==", "!=", "<=", ">=", "&&", "||"];

/// Every ASCII punctuation character except `_` (which is part of words).
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~";

/// Seeds per level whose tasks supply the vocabulary's words.
const VOCAB_SEEDS: u64 = 48;

/// Names a policy may want for its own variables and helpers, beyond those in the tasks.
const GENERIC_NAMES: [&str; 34] = [
    "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "m", "n", "p", "q", "r", "s", "t", "u", "v", "w", "x", "y",
    "z", "xs", "ys", "zs", "acc", "rest", "go", "helper", "lo", "hi", "sum",
];

/// The builtins of the language.
const BUILTINS: [&str; 11] = ["len", "range", "map", "filter", "fold", "cons", "head", "tail", "abs", "min", "max"];

/// The keywords of the language.
const KEYWORDS: [&str; 8] = ["def", "let", "in", "if", "then", "else", "true", "false"];

/// Format tag of the serialized tokenizer.
const FORMAT: &str = "squid-tokenizer-v1";

/// What kind of token an id is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenClass {
    /// One of [`SPECIALS`].
    Special,
    /// A digit (the value).
    Digit(u8),
    /// An operator or punctuation mark.
    Symbol,
    /// A word: keyword, identifier or prose word.
    Word,
}

/// The word-level tokenizer. Cheap to clone; build it once with [`Tokenizer::new`].
#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    index: HashMap<String, u32>,
    /// First word id (everything before it is special, digit or symbol).
    first_word: u32,
    fingerprint: String,
}

/// The serialized form: the token strings in id order and their fingerprint.
#[derive(Debug, Serialize, Deserialize)]
struct TokenizerFile {
    format: String,
    fingerprint: String,
    tokens: Vec<String>,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer {
    /// The standard vocabulary (deterministic: the same on every machine and run).
    pub fn new() -> Self {
        let mut tokens: Vec<String> = fixed_tokens();
        let fixed: BTreeSet<&str> = tokens.iter().map(String::as_str).collect();
        let words: Vec<String> = gather_words().into_iter().filter(|w| !fixed.contains(w.as_str())).collect();
        tokens.extend(words);
        Self::from_tokens(tokens).expect("the standard vocabulary is valid")
    }

    fn from_tokens(tokens: Vec<String>) -> Result<Self, Error> {
        let fixed = fixed_tokens();
        if tokens.len() < fixed.len() || tokens[..fixed.len()] != fixed[..] {
            return Err(Error::Tokenizer(
                "vocabulary does not start with the special, digit and symbol tokens of this version".into(),
            ));
        }
        if tokens.len() > u32::MAX as usize {
            return Err(Error::Tokenizer(format!("vocabulary of {} tokens is too large", tokens.len())));
        }
        let mut index = HashMap::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            if id >= fixed.len() && !is_word(token) {
                return Err(Error::Tokenizer(format!("token {id} ({token:?}) is not a word")));
            }
            if index.insert(token.clone(), id as u32).is_some() {
                return Err(Error::Tokenizer(format!("token {token:?} appears twice")));
            }
        }
        let fingerprint = fingerprint_of(&tokens);
        Ok(Self { tokens, index, first_word: fixed.len() as u32, fingerprint })
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The text of token `id` (`None` outside the vocabulary).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of `text` as one token, if it is one.
    pub fn id(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }

    /// What kind of token `id` is (`None` outside the vocabulary).
    pub fn class(&self, id: u32) -> Option<TokenClass> {
        if id as usize >= self.tokens.len() {
            None
        } else if id < DIGIT_0 {
            Some(TokenClass::Special)
        } else if id < DIGIT_0 + 10 {
            Some(TokenClass::Digit((id - DIGIT_0) as u8))
        } else if id < self.first_word {
            Some(TokenClass::Symbol)
        } else {
            Some(TokenClass::Word)
        }
    }

    /// A blake3 hash (hex) of the token strings in order: equal fingerprints, equal tokenizers.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Fails with [`Error::Tokenizer`] unless `fingerprint` is this tokenizer's (a checkpoint
    /// trained with another vocabulary).
    pub fn ensure_fingerprint(&self, fingerprint: &str) -> Result<(), Error> {
        if fingerprint == self.fingerprint {
            Ok(())
        } else {
            Err(Error::Tokenizer(format!(
                "foreign tokenizer: fingerprint {fingerprint} is not this tokenizer's {}",
                self.fingerprint
            )))
        }
    }

    /// The vocabulary as JSON (format tag, fingerprint, tokens), for checkpoints.
    pub fn to_json(&self) -> String {
        let file = TokenizerFile {
            format: FORMAT.to_string(),
            fingerprint: self.fingerprint.clone(),
            tokens: self.tokens.clone(),
        };
        serde_json::to_string(&file).expect("a list of strings serializes")
    }

    /// Reads [`Tokenizer::to_json`] back, checking the format and that the fingerprint matches
    /// the tokens (a corrupt or hand-edited file is an error).
    pub fn from_json(json: &str) -> Result<Self, Error> {
        let file: TokenizerFile =
            serde_json::from_str(json).map_err(|e| Error::Tokenizer(format!("tokenizer JSON: {e}")))?;
        if file.format != FORMAT {
            return Err(Error::Tokenizer(format!("tokenizer format {:?}, expected {FORMAT:?}", file.format)));
        }
        let tokenizer = Self::from_tokens(file.tokens)?;
        if tokenizer.fingerprint != file.fingerprint {
            return Err(Error::Tokenizer(format!(
                "tokenizer fingerprint {} does not match its tokens ({}): the file is corrupt",
                file.fingerprint, tokenizer.fingerprint
            )));
        }
        Ok(tokenizer)
    }

    fn digits(&self, value: u64, out: &mut Vec<u32>) {
        for b in value.to_string().bytes() {
            out.push(DIGIT_0 + u32::from(b - b'0'));
        }
    }

    /// Program text -> tokens, through the language's lexer (comments and white space dropped).
    /// Fails on text the lexer rejects or an identifier outside the vocabulary.
    pub fn encode_program(&self, src: &str) -> Result<Vec<u32>, Error> {
        let lexed = env::tokenize(src).map_err(|e| Error::Tokenizer(format!("program does not lex: {e}")))?;
        let mut out = Vec::with_capacity(lexed.len() * 2);
        for (tok, pos) in lexed {
            match tok {
                Tok::Eof => break,
                Tok::Int(v) => self.digits(v.unsigned_abs(), &mut out),
                Tok::Sym(s) => out.push(self.id(s).expect("every language symbol is a token")),
                other => {
                    let text = other.to_string();
                    let id = self.id(&text).ok_or_else(|| {
                        Error::Tokenizer(format!("{pos}: identifier {text:?} is not in the vocabulary"))
                    })?;
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    /// Tokens -> program text that [`env::parse_program`] reads as the same token sequence. Runs
    /// of digits join into one integer; a new line starts at each `def` after the first. Tokens
    /// that are not program text (special tokens, ids outside the vocabulary) become `?`, which
    /// the lexer rejects, so such a program is malformed rather than silently changed.
    pub fn decode_program(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut prev: Option<(TokenClass, &str)> = None;
        for &id in ids {
            let (class, text) = match self.class(id) {
                Some(TokenClass::Special) | None => (TokenClass::Special, "?"),
                Some(class) => (class, self.tokens[id as usize].as_str()),
            };
            if let Some((prev_class, prev_text)) = prev {
                let glue = match (prev_class, class) {
                    (TokenClass::Digit(_), TokenClass::Digit(_)) => "",
                    _ if text == "def" => "\n",
                    // Brackets and commas are never the prefix of another symbol: safe to abut.
                    _ if matches!(prev_text, "(" | "[" | "\\") => "",
                    _ if matches!(text, ")" | "]" | ",") => "",
                    (TokenClass::Word, _) if matches!(text, "(" | "[") && !is_keyword(prev_text) => "",
                    (TokenClass::Symbol, _) if matches!(prev_text, ")" | "]") && matches!(text, "(" | "[") => "",
                    _ => " ",
                };
                out.push_str(glue);
            }
            out.push_str(text);
            prev = Some((class, text));
        }
        out
    }

    /// Prose -> tokens: words, digits and punctuation; `\n` is `<nl>`; unknown words are `<unk>`.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 2);
        let bytes = text.as_bytes();
        let mut at = 0;
        while at < text.len() {
            let ch = text[at..].chars().next().expect("at is a char boundary");
            if ch == '\n' {
                out.push(NL);
                at += 1;
            } else if ch.is_whitespace() {
                at += ch.len_utf8();
            } else if ch.is_ascii_digit() {
                out.push(DIGIT_0 + u32::from(bytes[at] - b'0'));
                at += 1;
            } else if ch.is_ascii_alphabetic() || ch == '_' {
                let start = at;
                while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
                    at += 1;
                }
                out.push(self.id(&text[start..at]).unwrap_or(UNK));
            } else if let Some(sym) = MULTI_SYMBOLS.iter().find(|s| text[at..].starts_with(**s)) {
                out.push(self.id(sym).expect("every language symbol is a token"));
                at += sym.len();
            } else {
                out.push(self.id(&text[at..at + ch.len_utf8()]).unwrap_or(UNK));
                at += ch.len_utf8();
            }
        }
        out
    }

    /// Tokens -> readable text (for logs and think spans): tokens separated by spaces, digit runs
    /// joined, `<nl>` as a line break, other special tokens by name.
    pub fn decode_text(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut prev_digit = false;
        let mut line_start = true;
        for &id in ids {
            if id == NL {
                out.push('\n');
                line_start = true;
                prev_digit = false;
                continue;
            }
            let is_digit = matches!(self.class(id), Some(TokenClass::Digit(_)));
            let joins_digits = is_digit && prev_digit;
            if !line_start && !joins_digits {
                out.push(' ');
            }
            out.push_str(self.token_text(id).unwrap_or("<unk>"));
            prev_digit = is_digit;
            line_start = false;
        }
        out
    }

    /// The prompt of `task`: `<bos>`, the task statement as prose, `<code>`.
    pub fn prompt_tokens(&self, task: &env::Task) -> Vec<u32> {
        let mut out = vec![BOS];
        out.extend(self.encode_text(&task.prompt()));
        out.push(CODE);
        out
    }

    /// A tool output as its Document segment: `<out>`, the text as prose, `</out>`.
    pub fn tool_output_tokens(&self, text: &str) -> Vec<u32> {
        let mut out = vec![OUT];
        out.extend(self.encode_text(text));
        out.push(END_OUT);
        out
    }

    /// The program written in one turn's sampled tokens: think spans (from `<think>` to
    /// `</think>`, or to the end if unclosed) and store / recall / search spans removed, then
    /// [`Tokenizer::decode_program`].
    pub fn turn_program(&self, body: &[u32]) -> String {
        let mut program = Vec::with_capacity(body.len());
        let mut close: Option<u32> = None;
        for &id in body {
            match close {
                Some(end) if id == end => close = None,
                Some(_) => {}
                None => match id {
                    THINK => close = Some(END_THINK),
                    _ => match SPAN_TOOLS.iter().find(|(open, _)| *open == id) {
                        Some(&(_, end)) => close = Some(end),
                        None => program.push(id),
                    },
                },
            }
        }
        self.decode_program(&program)
    }
}

fn is_word(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_keyword(text: &str) -> bool {
    KEYWORDS.contains(&text)
}

fn fingerprint_of(tokens: &[String]) -> String {
    let mut hasher = blake3::Hasher::new();
    for token in tokens {
        hasher.update(&(token.len() as u64).to_le_bytes());
        hasher.update(token.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

/// Specials, digits and symbols: the blocks before the words.
fn fixed_tokens() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend((0..10).map(|d: u8| char::from(b'0' + d).to_string()));
    tokens.extend(MULTI_SYMBOLS.iter().map(|s| s.to_string()));
    tokens.extend(PUNCTUATION.chars().map(String::from));
    tokens
}

/// Adds every word of `text` to `words`.
fn add_words(text: &str, words: &mut BTreeSet<String>) {
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at].is_ascii_alphabetic() || bytes[at] == b'_' {
            let start = at;
            while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
                at += 1;
            }
            words.insert(text[start..at].to_string());
        } else {
            at += 1;
        }
    }
}

/// The vocabulary's words: fixed lists, plus the words of tasks of every level for seeds
/// `0..VOCAB_SEEDS` (statements, reference programs) and of every kind of tool output.
fn gather_words() -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    for list in [&KEYWORDS[..], &BUILTINS[..], &GENERIC_NAMES[..]] {
        words.extend(list.iter().map(|w| w.to_string()));
    }
    let mut texts: Vec<String> = Vec::new();
    for level in Level::ALL {
        for seed in 0..VOCAB_SEEDS {
            let task = env::generate_task(level, seed);
            texts.push(task.prompt());
            texts.push(task.reference_program());
            let part = &task.parts[0];
            let params = part.params.join(", ");
            let config = EpisodeConfig { max_tool_calls: 3, ..EpisodeConfig::default() };
            let mut episode = Episode::new(task.clone(), config);
            for program in [
                task.reference_program(),
                format!("def {}({params}) = head([])", part.name),
                format!("def {}({params}, extra) = 0", part.name),
            ] {
                if let Ok(output) = episode.step(ToolCall::Run { program }) {
                    texts.push(output.text);
                }
            }
            for program in [task.reference_program(), String::new()] {
                let mut episode = Episode::new(task.clone(), config);
                texts.push(episode.step(ToolCall::Submit { program }).map(|o| o.text).unwrap_or_default());
            }
        }
    }
    // Project tasks and the answers of the memory, search and lint tools.
    for seed in 0..VOCAB_SEEDS {
        for task in env::generate_project(seed) {
            texts.push(task.prompt());
            texts.push(task.reference_program());
            texts.push(env::search_library(&task, env::HELPER_WORDS, 2));
            for program in [task.reference_program(), "def f(x, y) = if true then z else g(x) / 0".into()] {
                texts.push(env::lint_text(&task, &program));
            }
        }
    }
    let mut memory = env::Memory::new(40);
    texts.push(memory.recall("x", 2).text);
    texts.push(memory.store("a b c"));
    texts.push(memory.store("a b c"));
    texts.push(memory.store(&"x".repeat(39)));
    texts.push(memory.recall("q", 2).text);
    texts.push(memory.recall("", 2).text);
    texts.push(memory.recall(&"q".repeat(env::MAX_QUERY_BYTES + 1), 2).text);
    texts.push(memory.store(""));
    texts.push(memory.store(&"x".repeat(env::MAX_SNIPPET_BYTES + 1)));
    texts.push(memory.store(&"x".repeat(41)));
    let project = env::generate_project(0);
    texts.push(env::search_library(&project[0], "x", 2));
    texts.push(env::search_library(&project[1], "zzz", 2));
    for tool in ["memory", "search", "lint"] {
        texts.push(format!("{tool}: not available in this run"));
    }
    let task = env::generate_task(Level::Hard, 0);
    let budget = Budget::default();
    for program in ["", "def"] {
        if let Err(text) = env::check_examples(&task, program, budget) {
            texts.push(text);
        }
    }
    let pos = Pos::default();
    let parse_errors = [
        ParseError::UnexpectedChar { ch: '?', pos },
        ParseError::IntTooLarge { pos },
        ParseError::Unexpected { found: Tok::Eof.to_string(), expected: "a name", pos },
        ParseError::Unexpected { found: "x".into(), expected: "an expression", pos },
        ParseError::TooDeep { pos, max: 1 },
        ParseError::TooManyParams { pos, max: 1 },
        ParseError::DuplicateFunction { name: "f".into(), pos },
        ParseError::EmptyProgram,
        ParseError::TooLong { bytes: 1, max: 1 },
    ];
    texts.extend(parse_errors.iter().map(|e| format!("parse error: {e}")));
    let run_errors = [
        RunError::StepBudget { max: 1 },
        RunError::MemoryBudget { max: 1 },
        RunError::DepthLimit { max: 1 },
        RunError::ValueTooDeep { max: 1 },
        RunError::UnknownName { name: "x".into() },
        RunError::NotAFunction { name: "x".into() },
        RunError::Type { op: "+", expected: "int, bool or list", found: "function" },
        RunError::Type { op: "lambda", expected: "list", found: "bool" },
        RunError::Arity { name: "f".into(), expected: 1, found: 2 },
        RunError::IndexOutOfRange { index: 1, len: 1 },
        RunError::DivisionByZero,
        RunError::Overflow { op: "*" },
        RunError::EmptyList { op: "head" },
    ];
    texts.extend(run_errors.iter().map(|e| format!("got error: {e}")));
    texts.push("tool-call limit reached; submitted: malformed program, reward 0".into());
    for text in &texts {
        add_words(text, &mut words);
    }
    words
}
