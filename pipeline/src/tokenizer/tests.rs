use proptest::prelude::*;

use super::*;
use crate::env::{generate_task, parse_program, score, Program, RewardConfig};

fn tokenizer() -> Tokenizer {
    Tokenizer::new()
}

/// The lexer's tokens of `src` without positions.
fn lex(src: &str) -> Vec<Tok> {
    env::tokenize(src).expect("lexes").into_iter().map(|(t, _)| t).collect()
}

/// A program with every `def` position zeroed (positions depend on spacing, not meaning).
fn without_positions(mut program: Program) -> Program {
    for f in &mut program.functions {
        f.pos = Pos::default();
    }
    program
}

#[test]
fn vocabulary_is_small_deterministic_and_well_formed() {
    let a = tokenizer();
    let b = tokenizer();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.tokens, b.tokens);
    eprintln!("vocabulary: {} tokens ({} words)", a.vocab_size(), a.vocab_size() - a.first_word as usize);
    assert!(a.vocab_size() > 100 && a.vocab_size() < 400, "vocab size {}", a.vocab_size());
    for (i, s) in SPECIALS.iter().enumerate() {
        assert_eq!(a.id(s), Some(i as u32));
        assert_eq!(a.class(i as u32), Some(TokenClass::Special));
    }
    assert_eq!(a.id("<code>"), Some(CODE));
    assert_eq!(a.id("<submit>"), Some(SUBMIT));
    for d in 0..10u8 {
        assert_eq!(a.id(&d.to_string()), Some(DIGIT_0 + u32::from(d)));
        assert_eq!(a.class(DIGIT_0 + u32::from(d)), Some(TokenClass::Digit(d)));
    }
    // Every symbol of the language lexes to exactly one symbol token and is one vocab token.
    for sym in MULTI_SYMBOLS
        .iter()
        .copied()
        .chain(["(", ")", "[", "]", ",", "=", "\\", "+", "-", "*", "/", "%", "<", ">", "!"])
    {
        let lexed = lex(sym);
        assert!(lexed.len() == 2 && matches!(&lexed[0], Tok::Sym(s) if *s == sym), "{sym}: {lexed:?}");
        assert_eq!(a.class(a.id(sym).unwrap()), Some(TokenClass::Symbol), "{sym}");
    }
    for word in KEYWORDS.iter().chain(&BUILTINS).chain(&GENERIC_NAMES) {
        assert_eq!(a.class(a.id(word).unwrap_or(u32::MAX)), Some(TokenClass::Word), "{word}");
    }
    for name in BUILTINS {
        assert!(env::Builtin::from_name(name).is_some(), "{name} is a builtin");
    }
    assert_eq!(a.class(a.vocab_size() as u32), None);
}

#[test]
fn reference_programs_round_trip_and_still_pass() {
    let tok = tokenizer();
    let config = RewardConfig::default();
    for level in Level::ALL {
        // Seeds outside the range the vocabulary was gathered from.
        for seed in 1000..1040 {
            let task = generate_task(level, seed);
            let src = task.reference_program();
            let ids = tok.encode_program(&src).unwrap();
            assert!(!ids.contains(&UNK));
            let decoded = tok.decode_program(&ids);
            assert_eq!(lex(&decoded), lex(&src), "{decoded}");
            assert_eq!(
                without_positions(parse_program(&decoded).unwrap()),
                without_positions(parse_program(&src).unwrap())
            );
            assert_eq!(tok.encode_program(&decoded).unwrap(), ids);
            let reward = score(&task, &decoded, &config, decoded.len());
            assert_eq!(reward.value, 1.0, "{level:?} {seed}: {decoded}");
        }
    }
}

#[test]
fn decoded_programs_are_readable() {
    let tok = tokenizer();
    let src = "def f(xs, k) = fold(\\acc x -> acc + x * k, 0, filter(\\x -> x >= 10, xs[1]))\ndef g(n) = f([n, 2], n)";
    let text = tok.decode_program(&tok.encode_program(src).unwrap());
    assert_eq!(text, src);
}

#[test]
fn non_program_tokens_make_a_malformed_program() {
    let tok = tokenizer();
    let mut ids = tok.encode_program("def f(x) = x + 1").unwrap();
    ids.insert(3, RUN);
    let text = tok.decode_program(&ids);
    assert!(parse_program(&text).is_err(), "{text}");
    ids.remove(3);
    ids.push(tok.vocab_size() as u32 + 5);
    assert!(parse_program(&tok.decode_program(&ids)).is_err());
}

#[test]
fn prompts_and_tool_outputs_of_unseen_tasks_have_no_unknown_words() {
    let tok = tokenizer();
    for level in Level::ALL {
        for seed in 500..530 {
            let task = generate_task(level, seed);
            let prompt = tok.prompt_tokens(&task);
            assert_eq!(prompt[0], BOS);
            assert_eq!(*prompt.last().unwrap(), CODE);
            assert!(!prompt.contains(&UNK), "{}", task.prompt());
            let part = &task.parts[0];
            let mut episode = Episode::new(task.clone(), EpisodeConfig::default());
            let bad = format!("def {}({}) = 0 - head(tail([1]))", part.name, part.params.join(", "));
            let output = episode.step(ToolCall::Run { program: bad }).unwrap();
            let ids = tok.tool_output_tokens(&output.text);
            assert_eq!((ids[0], *ids.last().unwrap()), (OUT, END_OUT));
            assert!(!ids.contains(&UNK), "{}", output.text);
        }
    }
}

#[test]
fn prose_encoding_splits_words_digits_and_symbols() {
    let tok = tokenizer();
    let ids = tok.encode_text("total([-12, 3]) == -9\nReturn zzqx.");
    let text = tok.decode_text(&ids);
    assert_eq!(text, "total ( [ - 12 , 3 ] ) == - 9\nReturn <unk> .");
    assert_eq!(ids.iter().filter(|&&t| t == UNK).count(), 1);
    assert_eq!(ids.iter().filter(|&&t| t == NL).count(), 1);
    assert_eq!(tok.encode_text(""), Vec::<u32>::new());
    // Non-ASCII characters are unknown, never a panic.
    assert_eq!(tok.encode_text("é→"), vec![UNK, UNK]);
}

#[test]
fn turn_program_drops_think_spans() {
    let tok = tokenizer();
    let program = tok.encode_program("def f(x) = x").unwrap();
    let mut body = vec![THINK];
    body.extend(tok.encode_text("Return x"));
    body.push(END_THINK);
    body.extend_from_slice(&program);
    assert_eq!(tok.turn_program(&body), "def f(x) = x");
    // An unclosed span runs to the end of the turn.
    let mut open = program.clone();
    open.push(THINK);
    open.extend(tok.encode_text("more"));
    assert_eq!(tok.turn_program(&open), "def f(x) = x");
}

#[test]
fn json_round_trip_and_foreign_or_corrupt_vocabularies() {
    let tok = tokenizer();
    let json = tok.to_json();
    let back = Tokenizer::from_json(&json).unwrap();
    assert_eq!(back.tokens, tok.tokens);
    assert_eq!(back.fingerprint(), tok.fingerprint());
    tok.ensure_fingerprint(back.fingerprint()).unwrap();

    // A foreign vocabulary: valid file, other fingerprint.
    let mut tokens = tok.tokens.clone();
    tokens.push("zebra".into());
    let foreign = Tokenizer::from_tokens(tokens).unwrap();
    let err = tok.ensure_fingerprint(foreign.fingerprint()).unwrap_err();
    assert!(err.to_string().contains("foreign tokenizer"), "{err}");

    // A corrupt file: tokens edited without updating the fingerprint.
    let edited = json.replacen("\"acc\"", "\"acd\"", 1);
    assert_ne!(edited, json);
    let err = Tokenizer::from_json(&edited).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    // Wrong format, not JSON, a duplicate, a non-word.
    assert!(Tokenizer::from_json(&json.replace(FORMAT, "other-v9")).is_err());
    assert!(Tokenizer::from_json("{").is_err());
    let mut dup = tok.tokens.clone();
    dup.push("acc".into());
    assert!(Tokenizer::from_tokens(dup).unwrap_err().to_string().contains("twice"));
    let mut bad = tok.tokens.clone();
    bad.push("a b".into());
    assert!(Tokenizer::from_tokens(bad).is_err());
    assert!(Tokenizer::from_tokens(vec!["<pad>".into()]).is_err());
}

#[test]
fn unknown_identifiers_and_bad_text_are_errors() {
    let tok = tokenizer();
    let err = tok.encode_program("def zebra_crossing(x) = x").unwrap_err();
    assert!(err.to_string().contains("zebra_crossing"), "{err}");
    assert!(tok.encode_program("def f(x) = x @ 1").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any integer literal (the lexer's range) survives encode and decode.
    #[test]
    fn integers_round_trip(v in 0i64..=i64::MAX, w in 0i64..1000) {
        let tok = TOKENIZER.with(|t| t.clone());
        let src = format!("def f(x) = [{v}, x - {w}]");
        let decoded = tok.decode_program(&tok.encode_program(&src).unwrap());
        prop_assert_eq!(lex(&decoded), lex(&src));
    }

    /// Token soups of program tokens: decoding then encoding gives the same ids back whenever
    /// the text lexes (digit runs may merge, so compare after merging).
    #[test]
    fn decode_then_encode_is_stable(picks in proptest::collection::vec(0usize..60, 1..30)) {
        let tok = TOKENIZER.with(|t| t.clone());
        let pool: Vec<u32> = (DIGIT_0..DIGIT_0 + 10)
            .chain(MULTI_SYMBOLS.iter().chain(["(", ")", "[", "]", ",", "=", "\\", "+", "-", "*", "<", ">", "!"].iter()).map(|s| tok.id(s).unwrap()))
            .chain(KEYWORDS.iter().chain(&BUILTINS).chain(&GENERIC_NAMES).map(|w| tok.id(w).unwrap()))
            .collect();
        let ids: Vec<u32> = picks.iter().map(|&p| pool[p % pool.len()]).collect();
        let text = tok.decode_program(&ids);
        if let Ok(back) = tok.encode_program(&text) {
            let again = tok.decode_program(&back);
            prop_assert_eq!(lex(&again), lex(&text));
            // Without leading zeros or over-long digit runs, the ids themselves come back.
            if !text.split(|c: char| !c.is_ascii_digit()).any(|run| run.len() > 1 && run.starts_with('0')) {
                prop_assert_eq!(back, ids);
            }
        }
    }
}

thread_local! {
    static TOKENIZER: Tokenizer = Tokenizer::new();
}
