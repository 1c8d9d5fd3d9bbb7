//! GGUF files written here (candle's writer): a tiny model loads and runs, and
//! each kind of bad file is a typed error naming the file and the problem.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tandem_engine::backend::BackendExt;
use tandem_engine::{EngineError, ModelDir};

const HIDDEN: usize = 32;
const FFN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;

/// What to change in the tiny model before writing it.
#[derive(Default)]
struct Variant {
    arch: Option<&'static str>,
    pre: Option<&'static str>,
    tokenizer_model: Option<&'static str>,
    /// Rows of `blk.0.ffn_up.weight` (FFN when right).
    ffn_up_rows: Option<usize>,
}

fn vocab() -> Vec<String> {
    let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_end|>".to_string()];
    // GPT-2's byte alphabet for the printable ASCII bytes; "Ġ" is the space.
    tokens.extend((b'!'..=b'~').map(|b| (b as char).to_string()));
    tokens.push("Ġ".into());
    tokens.push("Ġa".into());
    tokens
}

fn tensor(rows: usize, cols: usize, seed: usize, dtype: GgmlDType) -> QTensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
        .collect();
    let t = if cols == 1 {
        Tensor::from_vec(v, rows, &Device::Cpu)
    } else {
        Tensor::from_vec(v, (rows, cols), &Device::Cpu)
    }
    .unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn write(path: &Path, variant: &Variant) {
    let tokens = vocab();
    let n = tokens.len();
    let arch = variant.arch.unwrap_or("llama");
    let key = |k: &str| format!("{arch}.{k}");
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String("tiny test model".into()),
        ),
        (key("block_count"), Value::U32(1)),
        (key("embedding_length"), Value::U32(HIDDEN as u32)),
        (key("feed_forward_length"), Value::U32(FFN as u32)),
        (key("attention.head_count"), Value::U32(HEADS as u32)),
        (key("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (key("context_length"), Value::U32(128)),
        (key("rope.freq_base"), Value::F32(10000.0)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (
            "tokenizer.ggml.model".into(),
            Value::String(variant.tokenizer_model.unwrap_or("gpt2").into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(variant.pre.unwrap_or("smollm").into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..n)
                    .map(|i| Value::I32(if i < 2 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("Ġ a".into())]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
    ];
    let q = |rows, cols, seed| tensor(rows, cols, seed, GgmlDType::F32);
    let tensors: Vec<(&str, QTensor)> = vec![
        ("token_embd.weight", tensor(n, HIDDEN, 1, GgmlDType::Q8_0)),
        ("blk.0.attn_norm.weight", q(HIDDEN, 1, 2)),
        ("blk.0.attn_q.weight", q(HEADS * HEAD_DIM, HIDDEN, 3)),
        ("blk.0.attn_k.weight", q(KV_HEADS * HEAD_DIM, HIDDEN, 4)),
        ("blk.0.attn_v.weight", q(KV_HEADS * HEAD_DIM, HIDDEN, 5)),
        ("blk.0.attn_output.weight", q(HIDDEN, HEADS * HEAD_DIM, 6)),
        ("blk.0.ffn_norm.weight", q(HIDDEN, 1, 7)),
        ("blk.0.ffn_gate.weight", q(FFN, HIDDEN, 8)),
        (
            "blk.0.ffn_up.weight",
            q(variant.ffn_up_rows.unwrap_or(FFN), HIDDEN, 9),
        ),
        (
            "blk.0.ffn_down.weight",
            tensor(HIDDEN, FFN, 10, GgmlDType::Q4_0),
        ),
        ("output_norm.weight", q(HIDDEN, 1, 11)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn written(dir: &Path, variant: &Variant) -> PathBuf {
    let path = dir.join("tiny.gguf");
    write(&path, variant);
    path
}

/// Opens and loads the model, returning the error.
fn load_error(path: &Path) -> EngineError {
    match ModelDir::open(path).and_then(|m| m.load_cpu(4, 16).map(|_| ())) {
        Ok(()) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn a_tiny_gguf_model_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(dir.path(), &Variant::default());
    let model = ModelDir::open(&path).unwrap();
    assert_eq!(model.name(), "tiny test model");
    assert_eq!(model.config.num_kv_heads, KV_HEADS);
    assert!(model.config.tie_word_embeddings);
    // `<|endoftext|>` (EOS) and `<|im_end|>` (an end-of-turn control token) both stop.
    assert_eq!(model.config.eos_token_ids, vec![0, 1]);
    assert_eq!(model.tokenizer.encode("a a", false).unwrap(), vec![66, 97]);
    let mut backend = model.load_cpu(4, 16).unwrap();
    let logits = backend.prefill(&[2, 3, 4], 0, &[0]).unwrap();
    assert_eq!(logits.len(), vocab().len());
    assert!(logits.iter().all(|x| x.is_finite()));
}

#[test]
fn a_truncated_file_names_the_tensor_it_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(dir.path(), &Variant::default());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_error(&path);
    let msg = err.to_string();
    assert!(matches!(err, EngineError::Gguf { .. }), "{msg}");
    assert!(
        msg.contains("truncated") && msg.contains("tiny.gguf"),
        "{msg}"
    );
    // Cut inside the header: still a GGUF error, not a panic.
    std::fs::write(&path, &bytes[..200]).unwrap();
    let msg = load_error(&path).to_string();
    assert!(msg.contains("tiny.gguf"), "{msg}");
}

#[test]
fn an_unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(
        dir.path(),
        &Variant {
            arch: Some("gpt2"),
            ..Variant::default()
        },
    );
    let msg = load_error(&path).to_string();
    assert!(
        msg.contains("\"gpt2\"") && msg.contains("tiny.gguf"),
        "{msg}"
    );
}

#[test]
fn a_tensor_disagreeing_with_the_metadata_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(
        dir.path(),
        &Variant {
            ffn_up_rows: Some(FFN + 32),
            ..Variant::default()
        },
    );
    let msg = load_error(&path).to_string();
    assert!(
        msg.contains("blk.0.ffn_up.weight")
            && msg.contains("[96, 32]")
            && msg.contains("tiny.gguf"),
        "{msg}"
    );
}

#[test]
fn a_quant_type_the_loader_cannot_read_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(dir.path(), &Variant::default());
    let mut bytes = std::fs::read(&path).unwrap();
    // The tensor info of ffn_gate: name, n_dims (u32), dims (u64 each), ggml type (u32).
    let name = b"blk.0.ffn_gate.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor info in the header");
    let dtype_at = at + name.len() + 4 + 2 * 8;
    assert_eq!(bytes[dtype_at..dtype_at + 4], 0u32.to_le_bytes());
    // 16 is IQ2_XXS, which candle does not dequantize.
    bytes[dtype_at..dtype_at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let msg = load_error(&path).to_string();
    assert!(
        msg.contains("ggml type 16") && msg.contains("tiny.gguf"),
        "{msg}"
    );
}

#[test]
fn an_unknown_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(
        dir.path(),
        &Variant {
            pre: Some("deepseek-coder"),
            ..Variant::default()
        },
    );
    let msg = load_error(&path).to_string();
    assert!(msg.contains("\"deepseek-coder\""), "{msg}");
    let path = written(
        dir.path(),
        &Variant {
            tokenizer_model: Some("llama"),
            ..Variant::default()
        },
    );
    let msg = load_error(&path).to_string();
    assert!(msg.contains("tokenizer model \"llama\""), "{msg}");
}
