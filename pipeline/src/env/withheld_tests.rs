//! Tests of prompts that withhold the tasks' constants (issue 14): the prompt names them by
//! letters, a failing `<run>` states their values, and those values (read back from the run's
//! text alone) are enough to solve the task; tasks without constants and runs without the flag
//! are unchanged, and every word stays in the tokenizer's vocabulary.

use super::*;
use crate::tokenizer::{Tokenizer, UNK};

const SEEDS: u64 = 40;

/// `src` with every identifier equal to a key of `values` replaced by its value's text.
fn substitute(src: &str, values: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match values.iter().find(|(name, _)| name == word) {
            Some((_, v)) => out.push_str(v),
            None => out.push_str(word),
        }
        word.clear();
    };
    for ch in src.chars() {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            word.push(ch);
        } else {
            flush(&mut word, &mut out);
            out.push(ch);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// The constants `<run>`'s answer states for `part`: `part with k = 4, c = (0 - 2)`.
fn constants_from_output(output: &str, part: &str) -> Vec<(String, String)> {
    let start = output.rfind(&format!("{part} with ")).expect("the run states the part's constants");
    let rest = &output[start + part.len() + " with ".len()..];
    let rest = rest.split(';').next().unwrap_or("");
    rest.split(", ")
        .map(|pair| {
            let (name, value) = pair.split_once(" = ").expect("name = value");
            (name.trim().to_string(), value.trim().to_string())
        })
        .collect()
}

#[test]
fn a_failing_run_states_what_the_prompt_withholds_and_that_is_enough_to_solve() {
    let tok = Tokenizer::new();
    let config = EpisodeConfig::default();
    let mut withholding = [0usize; 3];
    for (l, level) in Level::ALL.into_iter().enumerate() {
        for seed in 0..SEEDS {
            let plain = generate_task(level, seed);
            let task = plain.clone().with_constants_withheld();
            assert_eq!(task.parts, plain.parts, "the same task, only its prompt differs");
            if !task.withholds_constants() {
                // No constants: nothing changes, a failing run says nothing more.
                assert_eq!(task.prompt(), plain.prompt());
                assert!(task.constants_text().is_none() && task.symbolic_program().is_none());
                continue;
            }
            withholding[l] += 1;
            let prompt = task.prompt();
            for part in &task.parts {
                if let Some(w) = &part.withheld {
                    assert!(prompt.contains(&w.description) && !prompt.contains(&part.description), "{prompt}");
                    assert!(plain.prompt().contains(&part.description));
                    assert!(!w.constants.is_empty());
                }
            }
            // Every token of the prompt and of the run's answer is a word of the vocabulary.
            assert!(!tok.prompt_tokens(&task).contains(&UNK), "{prompt}");
            // The program the prompt allows (letters for constants) fails, and the answer
            // states every withheld constant.
            let symbolic = task.symbolic_program().unwrap();
            let mut episode = Episode::new(task.clone(), config);
            let output = episode.step(ToolCall::Run { program: symbolic.clone() }).unwrap().text;
            assert!(episode.had_failing_run());
            assert!(output.ends_with(&task.constants_text().unwrap()), "{output}");
            assert!(!tok.tool_output_tokens(&output).contains(&UNK), "{output}");
            // Read back from the answer's text alone, the values solve the task.
            let mut program = String::new();
            for part in &task.parts {
                let def = match &part.withheld {
                    Some(w) => substitute(&w.symbolic_reference, &constants_from_output(&output, &part.name)),
                    None => part.reference.clone(),
                };
                program.push_str(&def);
                program.push('\n');
            }
            let reward = score(&task, &program, &RewardConfig::default(), 0);
            assert_eq!((reward.passed, reward.malformed), (reward.total, false), "{program}\n{output}");
            // A passing run states nothing; without the flag a failing run states nothing either.
            let mut episode = Episode::new(task.clone(), config);
            let passing = episode.step(ToolCall::Run { program: task.reference_program() }).unwrap().text;
            assert!(passing.starts_with("passed") && !passing.contains(" with "), "{passing}");
            let mut episode = Episode::new(plain.clone(), config);
            let failing = episode.step(ToolCall::Run { program: symbolic }).unwrap().text;
            assert!(output.starts_with(&failing) && output.len() > failing.len(), "{failing}");
            assert!(!failing.contains(&task.constants_text().unwrap()), "{failing}");
        }
    }
    // Most easy tasks and some of every other level draw constants.
    assert!(withholding[0] > SEEDS as usize / 2, "{withholding:?}");
    assert!(withholding[1] > 0 && withholding[2] > 0, "{withholding:?}");
}

#[test]
fn withheld_negative_constants_are_written_as_program_literals() {
    // Some count_above threshold or affine offset is negative within these seeds; the answer
    // writes it as the language's literal `(0 - n)`, which a program can copy.
    let found = (0..200).map(|seed| generate_task(Level::Easy, seed).with_constants_withheld()).find_map(|task| {
        let w = task.parts[0].withheld.as_ref()?;
        let (name, v) = w.constants.iter().find(|(_, v)| *v < 0)?;
        Some((task.constants_text().unwrap(), name.clone(), *v))
    });
    let (text, name, v) = found.expect("a negative constant among 200 easy tasks");
    assert!(text.contains(&format!("{name} = (0 - {})", -v)), "{text}");
}
