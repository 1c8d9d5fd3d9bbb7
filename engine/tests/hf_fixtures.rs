//! The engine against Hugging Face `transformers` (PyTorch, f32, CPU): golden logits
//! and greedy continuations written by `scripts/hf_golden.py` into `tests/fixtures/golden/`.

use std::path::{Path, PathBuf};

use tandem_engine::backend::{Backend, BackendExt};
use tandem_engine::block_manager::{BlockManager, blocks_for};
use tandem_engine::sampling::argmax;
use tandem_engine::{ChatMessage, ModelDir, SeqChunk};

const MAX_REL_ERR: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// max |ours - theirs| / max |theirs| over one row of logits.
fn rel_err(ours: &[f32], theirs: &[f32]) -> f32 {
    let diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let scale = theirs.iter().map(|b| b.abs()).fold(0.0, f32::max);
    diff / scale
}

fn check_model(name: &str) {
    let golden_path = fixtures().join(format!("golden/{name}.json"));
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&golden_path).unwrap()).unwrap();
    let logits_file =
        std::fs::read(fixtures().join(format!("golden/{name}.logits.safetensors"))).unwrap();
    let logits = safetensors::SafeTensors::deserialize(&logits_file).unwrap();
    let model = ModelDir::open(&fixtures().join(format!("models/{name}"))).unwrap();
    let vocab = model.config.vocab_size;

    let block_size = 16;
    let mut backend = model.load_cpu(64, block_size).unwrap();
    let mut worst = 0f32;
    for (i, case) in golden["cases"].as_array().unwrap().iter().enumerate() {
        let prompt: Vec<u32> = serde_json::from_value(case["prompt"].clone()).unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["continuation"].clone()).unwrap();
        let view = logits.tensor(&format!("case{i}")).unwrap();
        let rows: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(view.shape(), [expected.len(), vocab]);

        let mut blocks = BlockManager::new(64);
        let table = blocks
            .allocate(blocks_for(prompt.len() + expected.len(), block_size))
            .unwrap();
        let mut ours = backend.prefill(&prompt, 0, &table).unwrap();
        let mut continuation = Vec::new();
        let mut case_worst = 0f32;
        for (step, theirs) in rows.chunks_exact(vocab).enumerate() {
            let err = rel_err(&ours, theirs);
            case_worst = case_worst.max(err);
            assert!(
                err < MAX_REL_ERR,
                "{name} prompt {} tokens, step {step}: logits relative error {err:e}",
                prompt.len()
            );
            let token = argmax(&ours);
            continuation.push(token);
            if step + 1 < expected.len() {
                let pos = prompt.len() + step;
                ours = backend.decode(&[(token, pos, &table)]).unwrap().remove(0);
            }
        }
        assert_eq!(
            continuation,
            expected,
            "{name}: greedy continuation of a {}-token prompt",
            prompt.len()
        );
        // Every position's logits in one pass (what prompt log probabilities
        // are computed from): the sequence with its continuation, teacher
        // forced, gives at positions prompt.len() - 1 .. the same rows.
        let mut forced = prompt.clone();
        forced.extend_from_slice(&expected[..expected.len() - 1]);
        let every = backend
            .forward_every_logit(&SeqChunk {
                tokens: &forced,
                start: 0,
                block_table: &table,
            })
            .unwrap();
        assert_eq!(every.len(), forced.len());
        for (step, theirs) in rows.chunks_exact(vocab).enumerate() {
            let err = rel_err(&every[prompt.len() - 1 + step], theirs);
            assert!(
                err < MAX_REL_ERR,
                "{name} prompt {} tokens, every-logit row of step {step}: relative error {err:e}",
                prompt.len()
            );
        }
        eprintln!(
            "{name}: prompt {:>3} tokens: max logits relative error {case_worst:.2e}",
            prompt.len()
        );
        worst = worst.max(case_worst);
    }
    eprintln!("{name}: worst relative error {worst:.2e}");

    for enc in golden["encodings"].as_array().unwrap() {
        let text = enc["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(enc["ids"].clone()).unwrap();
        assert_eq!(
            model.tokenizer.encode(text, true).unwrap(),
            ids,
            "{name}: encoding of {text:?}"
        );
        // Byte-level BPE round-trips exactly (minus the BOS, a special token).
        assert_eq!(model.tokenizer.decode(&ids).unwrap(), text);
    }
    let messages: Vec<ChatMessage> = golden["chat"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    assert_eq!(
        model
            .tokenizer
            .apply_chat_template(&messages, true)
            .unwrap(),
        golden["chat"]["rendered"].as_str().unwrap()
    );
}

#[test]
fn llama_gqa_tied_embeddings_matches_transformers() {
    check_model("llama-gqa-tied");
}

#[test]
fn qwen2_with_biases_matches_transformers() {
    check_model("qwen2-bias");
}

#[test]
fn mistral_sliding_window_bf16_sharded_matches_transformers() {
    check_model("mistral-bf16-sharded");
}
