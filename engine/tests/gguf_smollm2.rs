//! A real trained model from a GGUF file (SmolLM2-135M-Instruct, Q4_1) against
//! Hugging Face `transformers` reading the same file: last-position logits,
//! greedy continuations, the tokenizer on hard strings and the chat template.
//! Fixtures: `tests/fixtures/smollm2/`, written by `scripts/make_smollm2_fixtures.py`.
//! The model: `models/SmolLM2-135M-Instruct.Q4_1.gguf`, fetched by
//! `tandem model fetch smollm2` (scripts/test.sh runs it first); a missing
//! file fails these tests, it never skips them.

use std::path::{Path, PathBuf};

use tandem_engine::backend::{Backend, BackendExt};
use tandem_engine::block_manager::{BlockManager, blocks_for};
use tandem_engine::gguf::GgufFile;
use tandem_engine::sampling::argmax;
use tandem_engine::weights::Weights;
use tandem_engine::{ChatMessage, ModelDir};

const MAX_REL_ERR: f32 = 1e-4;
/// A greedy step whose top two logits (in the fixture) are closer than this may
/// legitimately pick the other token; the comparison stops there.
const NEAR_TIE: f64 = 1e-3;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/smollm2")
}

fn gguf_path() -> PathBuf {
    let path = std::env::var_os("TANDEM_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo run -- model fetch smollm2` (scripts/test.sh does)",
        path.display()
    );
    path
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json");
    serde_json::from_str(&text).expect("cases.json parses")
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// max |ours - theirs| / max |theirs|.
fn rel_err(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    diff / theirs.iter().map(|b| b.abs()).fold(0.0, f32::max)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).expect("a list of token ids")
}

/// Prefills `prompt` and greedily decodes `steps` tokens; returns the prompt's
/// last logits and the tokens.
fn run_greedy(backend: &mut dyn Backend, prompt: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>) {
    let block_size = 16;
    let n = blocks_for(prompt.len() + steps, block_size);
    let mut blocks = BlockManager::new(n);
    let table = blocks.allocate(n).unwrap();
    let first = backend.prefill(prompt, 0, &table).unwrap();
    let mut tokens = vec![argmax(&first)];
    while tokens.len() < steps {
        let pos = prompt.len() + tokens.len() - 1;
        let last = *tokens.last().unwrap();
        let logits = backend.decode(&[(last, pos, &table)]).unwrap().remove(0);
        tokens.push(argmax(&logits));
    }
    (first, tokens)
}

/// Our greedy tokens equal the fixture's, up to a step the fixture records as a near tie.
fn assert_same_greedy(name: &str, ours: &[u32], case: &serde_json::Value) {
    let theirs = ids(&case["greedy"]);
    let margins: Vec<f64> = serde_json::from_value(case["greedy_margins"].clone()).unwrap();
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        if a != b {
            assert!(
                margins[step] < NEAR_TIE,
                "{name}: greedy token {step} is {a}, transformers chose {b} (margin {})\nours   {ours:?}\ntheirs {theirs:?}",
                margins[step]
            );
            eprintln!("{name}: near tie at step {step} (margin {})", margins[step]);
            return;
        }
    }
}

#[test]
fn logits_and_greedy_continuations_match_transformers() {
    let model = ModelDir::open(&gguf_path()).unwrap();
    let cases = cases();
    let mut backend = model.load_cpu(96, 16).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let theirs = read_f32(&fixtures().join(case["logits_file"].as_str().unwrap()));
        let (ours, greedy) = run_greedy(&mut backend, &prompt, 24);
        let err = rel_err(&ours, &theirs);
        eprintln!(
            "{name}: {} prompt tokens, logits relative error {err:.2e}",
            prompt.len()
        );
        assert!(err < MAX_REL_ERR, "{name}: logits relative error {err:e}");
        assert_same_greedy(name, &greedy, case);
    }
}

#[test]
fn the_chat_answer_is_paris() {
    let model = ModelDir::open(&gguf_path()).unwrap();
    let cases = cases();
    let chat = &cases["cases"][0];
    assert_eq!(chat["name"], "chat");
    let prompt = model
        .tokenizer
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(prompt, chat["prompt_text"].as_str().unwrap());
    let ids = model.tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(ids, self::ids(&chat["prompt_ids"]));
    let mut backend = model.load_cpu(16, 16).unwrap();
    let (_, greedy) = run_greedy(&mut backend, &ids, 24);
    let end = greedy
        .iter()
        .position(|t| model.config.eos_token_ids.contains(t))
        .expect("the answer ends with an end-of-turn token");
    let answer = model.tokenizer.decode(&greedy[..end]).unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");
    assert_eq!(model.tokenizer.token_to_id("<|im_end|>"), Some(greedy[end]));
}

/// llama.cpp interleaves the rotary halves of Q and K rows; loaded without
/// undoing that, the model is a different (wrong) model.
#[test]
fn the_rotary_interleave_must_be_undone() {
    let path = gguf_path();
    let model = ModelDir::open(&path).unwrap();
    let mut file = GgufFile::open(&path).unwrap();
    file.keep_rotary_interleave();
    let weights = Weights::from(file);
    let mut backend = tandem_engine::cpu::CpuBackend::new(
        tandem_engine::cpu::CpuModel::load(&model.config, &weights).unwrap(),
        16,
        16,
    )
    .unwrap();
    let cases = cases();
    let case = &cases["cases"][1];
    let theirs = read_f32(&fixtures().join(case["logits_file"].as_str().unwrap()));
    let (ours, _) = run_greedy(&mut backend, &ids(&case["prompt_ids"]), 1);
    let err = rel_err(&ours, &theirs);
    assert!(
        err > 100.0 * MAX_REL_ERR,
        "without undoing the interleave the logits still match ({err:e})"
    );
}

#[test]
fn tokenizer_matches_transformers_on_hard_strings() {
    let model = ModelDir::open(&gguf_path()).unwrap();
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = cases
        .as_array()
        .or_else(|| cases["cases"].as_array())
        .expect("a list of cases");
    assert!(cases.len() >= 20);
    for case in cases {
        let s = case["text"].as_str().unwrap();
        let plain = model.tokenizer.encode(s, false).unwrap();
        assert_eq!(plain, ids(&case["ids_no_special"]), "encoding of {s:?}");
        assert_eq!(
            model.tokenizer.encode(s, true).unwrap(),
            ids(&case["ids_special"]),
            "encoding of {s:?} with special tokens"
        );
        if !s.contains("<|") {
            assert_eq!(model.tokenizer.decode(&plain).unwrap(), s, "round trip");
        }
    }
}

#[test]
fn config_comes_from_the_metadata() {
    let model = ModelDir::open(&gguf_path()).unwrap();
    let c = &model.config;
    assert_eq!(
        (c.num_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    // `general.name` as the file has it.
    assert_eq!(model.name(), "Smollm2 135M 8k Lc100K Mix1 Ep2");
    assert_eq!(c.eos_token_ids, vec![2, 0]);
}

/// `tokenizer.ggml.pre = "smollm"` splits every numeral on its own before the
/// byte-level split, as llama.cpp and SmolLM2's own `tokenizer.json` do
/// (transformers' GGUF converter does not: it gives `[3351, 138]` here).
#[test]
fn the_smollm_pre_tokenizer_splits_numerals() {
    let model = ModelDir::open(&gguf_path()).unwrap();
    assert_eq!(
        model.tokenizer.encode(" ½", false).unwrap(),
        vec![216, 16738]
    );
}

/// Tensor parallelism slices the dequantized GGUF tensors: 3 ranks (3 query
/// heads and 1 KV head each) give the same logits.
#[test]
fn three_tensor_parallel_ranks_match_transformers() {
    let model = ModelDir::open(&gguf_path()).unwrap();
    let cases = cases();
    let case = &cases["cases"][0];
    let theirs = read_f32(&fixtures().join(case["logits_file"].as_str().unwrap()));
    let mut backend = model.load_cpu_tp(3, 16, 16).unwrap();
    let (ours, _) = run_greedy(backend.as_mut(), &ids(&case["prompt_ids"]), 1);
    let err = rel_err(&ours, &theirs);
    assert!(err < MAX_REL_ERR, "TP=3 logits relative error {err:e}");
}
