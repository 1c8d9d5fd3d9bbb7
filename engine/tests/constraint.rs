//! Structured output through `Generation`: on the random-weight synthesized
//! model (which left free would almost never write JSON) and on SmolLM2, the
//! output obeys its JSON schema / regex / choice; a resumed generation replays
//! the tokens already generated through the grammar and continues exactly as
//! the uninterrupted one; a bad schema or regex is `InvalidInput` naming the field.

use std::path::{Path, PathBuf};

use tandem_engine::local::LocalGenerator;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{
    Constraint, EngineError, FinishReason, Generation, GenerationParams, ModelDir, SamplingParams,
};

/// Compact separators (llguidance's `x-guidance` options): left free, a
/// random-weight model pads JSON with whitespace until `max_tokens`.
const SCHEMA: &str = r#"{"type": "object", "x-guidance": {"whitespace_flexible": false},
  "properties": {"name": {"type": "string", "maxLength": 12},
                 "age": {"type": "integer", "minimum": 0, "maximum": 150},
                 "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
  "required": ["name", "age", "tags"], "additionalProperties": false}"#;

fn synth() -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), &SynthSpec::default()).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

fn smollm2() -> ModelDir {
    let path: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    ModelDir::open(&path).unwrap()
}

fn params(constraint: Constraint, seed: u64) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        max_tokens: 120,
        constraint: Some(constraint),
        ..Default::default()
    }
}

/// The schema's shape, checked by hand (the test has no JSON-schema validator).
fn check_person(text: &str) {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("{text:?} is not an object"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "name", "tags"], "{text:?}");
    assert!(
        o["name"].as_str().is_some_and(|s| s.chars().count() <= 12),
        "{text:?}"
    );
    assert!(o["age"].as_u64().is_some_and(|a| a <= 150), "{text:?}");
    let tags = o["tags"].as_array().unwrap();
    assert!(tags.len() <= 3, "{text:?}");
    assert!(
        tags.iter()
            .all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 6))
    );
}

#[test]
fn random_weights_write_schema_valid_json() {
    let (_d, m) = synth();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("Describe a person:", true).unwrap();
    for seed in 0..5 {
        let out = g
            .generate(
                &prompt,
                &params(Constraint::JsonSchema(SCHEMA.into()), seed),
                &m.tokenizer,
                |_| {},
            )
            .unwrap();
        assert_eq!(out.finish_reason, FinishReason::Stop, "{:?}", out.text);
        check_person(&out.text);
        // Any JSON object.
        // Any JSON object: whatever the model writes until max_tokens is an
        // object's beginning.
        let out = g
            .generate(
                &prompt,
                &params(Constraint::JsonObject, seed),
                &m.tokenizer,
                |_| {},
            )
            .unwrap();
        assert!(out.text.starts_with('{'), "{:?}", out.text);
        if out.finish_reason == FinishReason::Stop {
            let v: serde_json::Value = serde_json::from_str(&out.text).unwrap();
            assert!(v.is_object(), "{:?}", out.text);
        }
    }
}

#[test]
fn regex_and_choice_outputs_match() {
    let (_d, m) = synth();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("Pick:", true).unwrap();
    let choices = vec![
        "red".to_string(),
        "green (light)".to_string(),
        "blue.sky".to_string(),
    ];
    for seed in 0..6 {
        let out = g
            .generate(
                &prompt,
                &params(Constraint::Regex(r"[0-9]{3}-[a-z]{2,4}".into()), seed),
                &m.tokenizer,
                |_| {},
            )
            .unwrap();
        let t = out.text.as_bytes();
        assert!(t.len() >= 6 && t.len() <= 8, "{:?}", out.text);
        assert!(
            t[..3].iter().all(u8::is_ascii_digit) && t[3] == b'-',
            "{:?}",
            out.text
        );
        assert!(t[4..].iter().all(u8::is_ascii_lowercase), "{:?}", out.text);
        assert_eq!(out.finish_reason, FinishReason::Stop);
        let out = g
            .generate(
                &prompt,
                &params(Constraint::Choice(choices.clone()), seed),
                &m.tokenizer,
                |_| {},
            )
            .unwrap();
        assert!(choices.contains(&out.text), "{:?}", out.text);
        assert_eq!(out.finish_reason, FinishReason::Stop);
    }
}

/// vLLM's allowed_token_ids: sampling draws only the listed tokens, EOS
/// included only when listed (so without it the output runs to max_tokens),
/// and a replayed token outside the list is refused.
#[test]
fn only_allowed_token_ids_are_drawn() {
    let (_d, m) = synth();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("Pick:", true).unwrap();
    let eos = m.config.eos_token_ids.clone();
    let allowed = vec![5u32, 17, 300];
    for seed in 0..4 {
        let p = GenerationParams {
            max_tokens: 24,
            ..params(Constraint::AllowedTokenIds(allowed.clone()), seed)
        };
        let out = g.generate(&prompt, &p, &m.tokenizer, |_| {}).unwrap();
        assert_eq!(out.tokens.len(), 24, "{:?}", out.tokens);
        assert!(
            out.tokens.iter().all(|t| allowed.contains(t)),
            "{:?}",
            out.tokens
        );
        assert_eq!(out.finish_reason, FinishReason::Length);
    }
    // EOS listed: it may end the output (greedy among EOS alone ends at once).
    let only_eos = GenerationParams {
        sampling: SamplingParams::default(),
        ..params(Constraint::AllowedTokenIds(eos.clone()), 0)
    };
    let out = g
        .generate(&prompt, &only_eos, &m.tokenizer, |_| {})
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Eos, "{:?}", out.tokens);
    let p = params(Constraint::AllowedTokenIds(allowed), 0);
    let err = Generation::resume(prompt, &[6], p, &eos, &m.tokenizer).err();
    assert!(
        matches!(&err, Some(EngineError::InvalidInput(e)) if e.starts_with("allowed_token_ids")),
        "{err:?}"
    );
}

/// vLLM's bad_words: a one-token word is never drawn; a longer word's last
/// token is not drawn right after the rest of it, while its first token
/// still is.
#[test]
fn bad_words_are_not_written() {
    let (_d, m) = synth();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("Once upon a time", true).unwrap();
    let greedy = |c: Option<Constraint>| GenerationParams {
        max_tokens: 12,
        ignore_eos: true,
        constraint: c,
        ..Default::default()
    };
    let free = g
        .generate(&prompt, &greedy(None), &m.tokenizer, |_| {})
        .unwrap()
        .tokens;
    let mut run = |c| {
        g.generate(&prompt, &greedy(Some(c)), &m.tokenizer, |_| {})
            .unwrap()
            .tokens
    };
    let out = run(Constraint::BadWords(vec![vec![free[0]]]));
    assert!(!out.contains(&free[0]), "{out:?} (free: {free:?})");
    let pair = [free[0], free[1]];
    let out = run(Constraint::BadWords(vec![pair.to_vec()]));
    assert_eq!(out[0], free[0]);
    assert_ne!(out[1], free[1], "{out:?}");
    assert!(
        out.windows(2).all(|w| w != pair),
        "{out:?} (free: {free:?})"
    );
}

#[test]
fn resume_replays_the_generated_tokens_through_the_grammar() {
    let (_d, m) = synth();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let prompt = m.tokenizer.encode("Describe a person:", true).unwrap();
    let p = params(Constraint::JsonSchema(SCHEMA.into()), 7);
    let whole = g.generate(&prompt, &p, &m.tokenizer, |_| {}).unwrap();
    assert!(whole.tokens.len() > 6, "{:?}", whole.text);
    for cut in [1, 5, whole.tokens.len() / 2] {
        let resumed = g
            .generate_resumed(&prompt, &whole.tokens[..cut], &p, &m.tokenizer, |_| {})
            .unwrap();
        assert_eq!(resumed.tokens, whole.tokens, "cut at {cut}");
        // The replayed tokens' text is not emitted again.
        assert!(whole.text.ends_with(&resumed.text), "cut at {cut}");
    }
    // Tokens the grammar forbids cannot be replayed: `x` cannot start the object.
    let x = m.tokenizer.encode("x", false).unwrap();
    let eos = &m.config.eos_token_ids;
    let err = Generation::resume(prompt.clone(), &x, p.clone(), eos, &m.tokenizer).err();
    assert!(matches!(err, Some(EngineError::InvalidInput(_))), "{err:?}");
    // A replay that completes the object leaves nothing to generate.
    let err = Generation::resume(prompt, &whole.tokens, p, eos, &m.tokenizer).err();
    assert!(matches!(err, Some(EngineError::InvalidInput(_))), "{err:?}");
}

#[test]
fn bad_constraints_are_invalid_input_naming_the_field() {
    let (_d, m) = synth();
    let compiler = m.tokenizer.constraints().unwrap();
    for (c, field) in [
        (Constraint::JsonSchema("{not json".into()), "guided_json"),
        (
            Constraint::JsonSchema(r#"{"type": "frobnicate"}"#.into()),
            "guided_json",
        ),
        (Constraint::JsonSchema("42".into()), "guided_json"),
        (Constraint::Regex("(unclosed".into()), "guided_regex"),
        (Constraint::Choice(Vec::new()), "guided_choice"),
        (
            Constraint::LarkGrammar("start: undefined_rule".into()),
            "guided_grammar",
        ),
        (Constraint::AllowedTokenIds(Vec::new()), "allowed_token_ids"),
        (Constraint::BadWords(vec![vec![1], Vec::new()]), "bad_words"),
        (
            Constraint::AllowedTokenIds(vec![1, m.config.vocab_size as u32 + 3]),
            "allowed_token_ids",
        ),
    ] {
        match compiler.start(&c) {
            Err(EngineError::InvalidInput(m)) => assert!(m.starts_with(field), "{c:?}: {m}"),
            Err(e) => panic!("{c:?}: {e}"),
            Ok(_) => panic!("{c:?} compiled"),
        }
    }
}

#[test]
fn smollm2_writes_schema_valid_json() {
    let m = smollm2();
    let mut g = LocalGenerator::new(m.load_cpu(64, 16).unwrap());
    let text = m
        .tokenizer
        .apply_chat_template(
            &[tandem_engine::ChatMessage {
                role: "user".into(),
                content: "Give me a person as JSON.".into(),
            }],
            true,
        )
        .unwrap();
    let prompt = m.tokenizer.encode(&text, false).unwrap();
    for seed in 0..3 {
        let out = g
            .generate(
                &prompt,
                &params(Constraint::JsonSchema(SCHEMA.into()), seed),
                &m.tokenizer,
                |_| {},
            )
            .unwrap();
        assert_eq!(out.finish_reason, FinishReason::Stop, "{:?}", out.text);
        check_person(&out.text);
    }
}
