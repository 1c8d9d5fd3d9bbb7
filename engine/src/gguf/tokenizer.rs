//! The tokenizer stored in a GGUF file's metadata, rebuilt as a Hugging Face
//! `tokenizers` tokenizer.
//!
//! GGUF keeps the vocabulary (`tokenizer.ggml.tokens`), the BPE merges, each
//! token's type and the name of the pre-tokenizer (`tokenizer.ggml.pre`), which
//! llama.cpp maps to a list of split regexes. This module writes the equivalent
//! `tokenizer.json` (byte-level BPE, the named pre-tokenizer, control tokens as
//! special added tokens, BOS added when `add_bos_token` says so) and loads it
//! with the project's own `tokenizers` version. A tokenizer model or
//! pre-tokenizer it does not know is an error naming it: a silently different
//! tokenizer would make every answer wrong.

use serde_json::{Value as Json, json};

use super::GgufFile;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Texts of end-of-turn tokens that end a generation when they are control
/// tokens of the vocabulary, as llama.cpp detects them (a chat model's GGUF often
/// names `<|endoftext|>` as EOS while its template ends turns with `<|im_end|>`).
const END_OF_TURN: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
];

/// Llama 3's split regex (`tokenizer.ggml.pre = "llama-bpe"`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The `tokenizers` pre-tokenizer for llama.cpp's pre-tokenizer name.
fn pre_tokenizer(file: &GgufFile, pre: &str) -> Result<Json> {
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    Ok(match pre {
        // GPT-2's regex, which `ByteLevel` applies itself.
        "default" | "gpt-2" => byte_level(true),
        // GPT-2's regex after splitting every digit on its own.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT),
        "qwen2" => split(QWEN2_SPLIT),
        other => {
            return Err(file.error(format!(
                "tokenizer pre-tokenizer {other:?} is not supported (Tandem knows default, gpt-2, smollm, llama-bpe and qwen2)"
            )));
        }
    })
}

fn token_strings(file: &GgufFile) -> Result<Vec<String>> {
    let tokens = file
        .get_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| file.error("no `tokenizer.ggml.tokens` in the metadata"))?;
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            candle_core::quantized::gguf_file::Value::String(s) => Ok(s.clone()),
            other => Err(file.error(format!("token {i} is {other:?}, not a string"))),
        })
        .collect()
}

fn token_types(file: &GgufFile, n: usize) -> Result<Vec<i64>> {
    use candle_core::quantized::gguf_file::Value;
    let Some(types) = file.get_array("tokenizer.ggml.token_type")? else {
        return Ok(vec![1; n]);
    };
    if types.len() != n {
        return Err(file.error(format!("{} token types for {n} tokens", types.len())));
    }
    types
        .iter()
        .map(|t| match t {
            Value::I32(v) => Ok(i64::from(*v)),
            Value::U32(v) => Ok(i64::from(*v)),
            Value::I8(v) => Ok(i64::from(*v)),
            Value::U8(v) => Ok(i64::from(*v)),
            other => Err(file.error(format!("token type {other:?} is not an integer"))),
        })
        .collect()
}

/// Ids of the end-of-turn control tokens the vocabulary has (see [`END_OF_TURN`]).
pub(crate) fn end_of_turn_tokens(file: &GgufFile) -> Result<Vec<u32>> {
    let Some(tokens) = file.get_array("tokenizer.ggml.tokens")? else {
        return Ok(Vec::new());
    };
    let types = token_types(file, tokens.len())?;
    Ok(tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (t, ty))| {
            **ty == TOKEN_TYPE_CONTROL
                && matches!(t, candle_core::quantized::gguf_file::Value::String(s) if END_OF_TURN.contains(&s.as_str()))
        })
        .filter_map(|(i, _)| u32::try_from(i).ok())
        .collect())
}

/// Builds the tokenizer and chat template stored in `file`'s metadata.
pub fn load(file: &GgufFile, config: &ModelConfig) -> Result<Tokenizer> {
    let model = file
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| file.error("no `tokenizer.ggml.model` in the metadata"))?;
    if model != "gpt2" {
        return Err(file.error(format!(
            "tokenizer model {model:?} is not supported (Tandem reads byte-level BPE, \"gpt2\")"
        )));
    }
    let pre = file.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = pre_tokenizer(file, pre)?;
    let tokens = token_strings(file)?;
    if tokens.len() > config.vocab_size {
        return Err(file.error(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            tokens.len(),
            config.vocab_size
        )));
    }
    let types = token_types(file, tokens.len())?;
    let merges = file
        .get_array("tokenizer.ggml.merges")?
        .ok_or_else(|| file.error("no `tokenizer.ggml.merges` in the metadata"))?
        .iter()
        .map(|m| match m {
            candle_core::quantized::gguf_file::Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| file.error(format!("merge {s:?} is not two tokens"))),
            other => Err(file.error(format!("merge {other:?} is not a string"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(i, (t, ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL})
        })
        .collect();
    let token_text = |id: Option<u32>| {
        id.and_then(|id| tokens.get(id as usize))
            .cloned()
            .unwrap_or_default()
    };
    let bos = config.bos_token_id;
    let add_bos = file
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let post_processor = match bos {
        Some(id) if add_bos => {
            let text = token_text(Some(id));
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {text.clone(): {"id": text, "ids": [id], "tokens": [text]}}})
        }
        _ => Json::Null,
    };
    if file.get_bool("tokenizer.ggml.add_eos_token")? == Some(true) {
        return Err(file.error(
            "tokenizer.ggml.add_eos_token = true is not supported (an EOS appended to every prompt)",
        ));
    }
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let inner: tokenizers::Tokenizer = spec
        .to_string()
        .parse()
        .map_err(|e| file.error(format!("cannot build the tokenizer: {e}")))?;
    let eos = file
        .get_usize("tokenizer.ggml.eos_token_id")?
        .map(|id| id as u32);
    Ok(Tokenizer::from_parts(
        inner,
        file.get_str("tokenizer.chat_template")?.map(str::to_owned),
        token_text(bos),
        token_text(eos),
    ))
}
