//! Log probabilities in OpenAI's two shapes, from the gRPC stream's
//! [`pb::TokenLogprobs`] (one per generated token; see `generate.proto` for
//! which distribution they are of).
//!
//! - `/v1/completions` (`logprobs: N`): parallel lists `tokens`,
//!   `token_logprobs`, `top_logprobs` (per token a dict of token text to
//!   logprob: the N most likely and the chosen token, so up to N + 1 entries,
//!   as OpenAI and vLLM do) and `text_offset` (where each token starts in the
//!   completion's text, counting its tokens' texts in characters, as vLLM does).
//! - `/v1/chat/completions` (`logprobs: true`, `top_logprobs: N`):
//!   `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`,
//!   the top list most likely first.
//!
//! A token is named by its own text (special tokens included; a token holding
//! part of a UTF-8 character names it U+FFFD), or, with vLLM's
//! `return_tokens_as_token_ids`, as `token_id:N` (exact whatever the text);
//! `bytes` and `text_offset` count that name, as vLLM does. A logprob of minus
//! infinity is written -9999.0, as vLLM does, since JSON has no infinity.

use serde_json::{Map, Value, json};
use tandem_engine::Tokenizer;
use tandem_proto::v1 as pb;

/// How tokens are named in log probabilities.
#[derive(Clone, Copy)]
pub struct TokenNames<'a> {
    /// The served model's tokenizer (a token's text).
    pub tokenizer: &'a Tokenizer,
    /// `token_id:N` instead of the text (vLLM's `return_tokens_as_token_ids`).
    pub as_ids: bool,
}

impl TokenNames<'_> {
    fn name(&self, id: u32) -> String {
        if self.as_ids {
            return format!("token_id:{id}");
        }
        self.tokenizer
            .token_text(id)
            .unwrap_or_else(|_| format!("token_id:{id}"))
    }
}

/// The lowest logprob written (vLLM's floor).
const FLOOR: f32 = -9999.0;

fn clamp(logprob: f32) -> f32 {
    if logprob.is_nan() {
        FLOOR
    } else {
        logprob.max(FLOOR)
    }
}

/// The completions shape of `entries`; the first token starts at character
/// `offset` of the completion's text (0, or what was streamed before).
pub fn completion(names: TokenNames<'_>, entries: &[pb::TokenLogprobs], offset: usize) -> Value {
    completion_after_prompt(names, None, entries, offset)
}

/// [`completion`] led by the prompt's tokens (completions' `echo` with
/// `logprobs`, as vLLM answers it): the prompt's first token with a null
/// log probability and null top list, then each later prompt token's.
pub fn completion_after_prompt(
    names: TokenNames<'_>,
    prompt: Option<&pb::PromptLogprobs>,
    entries: &[pb::TokenLogprobs],
    offset: usize,
) -> Value {
    let mut tokens = Vec::with_capacity(entries.len());
    let mut token_logprobs = Vec::with_capacity(entries.len());
    let mut top_logprobs = Vec::with_capacity(entries.len());
    let mut text_offset = Vec::with_capacity(entries.len());
    let mut at = offset;
    if let Some(p) = prompt {
        let token = names.name(p.first_id);
        text_offset.push(at);
        at += token.chars().count();
        tokens.push(token);
        token_logprobs.push(Value::Null);
        top_logprobs.push(Value::Null);
    }
    for e in prompt.into_iter().flat_map(|p| &p.tokens).chain(entries) {
        let token = names.name(e.id);
        let mut top = Map::new();
        for t in &e.top {
            top.entry(names.name(t.id))
                .or_insert(json!(clamp(t.logprob)));
        }
        top.entry(token.clone()).or_insert(json!(clamp(e.logprob)));
        text_offset.push(at);
        at += token.chars().count();
        tokens.push(token);
        token_logprobs.push(json!(clamp(e.logprob)));
        top_logprobs.push(Value::Object(top));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

/// The chat shape of `entries`.
pub fn chat(names: TokenNames<'_>, entries: &[pb::TokenLogprobs]) -> Value {
    let one = |id: u32, logprob: f32| {
        let token = names.name(id);
        let bytes: Vec<u8> = token.as_bytes().to_vec();
        json!({ "token": token, "logprob": clamp(logprob), "bytes": bytes })
    };
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = one(e.id, e.logprob);
            v["top_logprobs"] = e.top.iter().map(|t| one(t.id, t.logprob)).collect();
            v
        })
        .collect();
    json!({ "content": content })
}

/// vLLM's `prompt_logprobs` answer: `null` for the prompt's first token, then
/// per token a dict from token id (as a string) to `{logprob, rank,
/// decoded_token}`: the prompt's token with its rank, and the most likely
/// tokens ranked 1, 2, ...
pub fn prompt(names: TokenNames<'_>, p: &pb::PromptLogprobs) -> Value {
    let one = |id: u32, logprob: f32, rank: u32| json!({ "logprob": clamp(logprob), "rank": rank, "decoded_token": names.name(id) });
    let mut out = vec![Value::Null];
    for e in &p.tokens {
        let mut entry = Map::new();
        entry.insert(e.id.to_string(), one(e.id, e.logprob, e.rank));
        for (i, t) in e.top.iter().enumerate() {
            entry
                .entry(t.id.to_string())
                .or_insert_with(|| one(t.id, t.logprob, i as u32 + 1));
        }
        out.push(Value::Object(entry));
    }
    Value::Array(out)
}

/// Characters of the completions shape's tokens, to continue `text_offset`
/// in the next streamed chunk.
pub fn token_chars(names: TokenNames<'_>, entries: &[pb::TokenLogprobs]) -> usize {
    entries
        .iter()
        .map(|e| names.name(e.id).chars().count())
        .sum()
}

/// Characters of a prompt's tokens in the completions shape (`echo`).
pub fn prompt_chars(names: TokenNames<'_>, p: &pb::PromptLogprobs) -> usize {
    names.name(p.first_id).chars().count() + token_chars(names, &p.tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u32, logprob: f32, top: &[(u32, f32)]) -> pb::TokenLogprobs {
        pb::TokenLogprobs {
            id,
            logprob,
            top: top
                .iter()
                .map(|&(id, logprob)| pb::TopLogprob { id, logprob })
                .collect(),
            rank: 0,
        }
    }

    #[test]
    fn floor_replaces_minus_infinity_and_nan() {
        assert_eq!(clamp(f32::NEG_INFINITY), FLOOR);
        assert_eq!(clamp(f32::NAN), FLOOR);
        assert_eq!(clamp(-1.5), -1.5);
    }

    #[test]
    fn shapes_hold_every_token() {
        let dir = tempfile::tempdir().unwrap();
        tandem_engine::synth::write_model_dir(dir.path(), &Default::default()).unwrap();
        let model = tandem_engine::ModelDir::open(dir.path()).unwrap();
        let tok = TokenNames {
            tokenizer: &model.tokenizer,
            as_ids: false,
        };
        let text = |id| tok.name(id);
        let entries = [
            entry(5, -0.5, &[(5, -0.5), (6, -1.0)]),
            entry(9, -3.0, &[(6, -1.0), (7, -2.0)]),
        ];
        let c = completion(tok, &entries, 4);
        assert_eq!(c["tokens"].as_array().unwrap().len(), 2);
        assert_eq!(c["token_logprobs"][1], json!(-3.0));
        assert_eq!(c["text_offset"][0], json!(4));
        // The chosen token is in the dict even outside the top two.
        let second = c["top_logprobs"][1].as_object().unwrap();
        assert!(second.contains_key(&text(9)));
        let chat = chat(tok, &entries);
        let first = &chat["content"][0];
        assert_eq!(first["logprob"], json!(-0.5));
        assert_eq!(first["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(
            first["bytes"],
            json!(text(5).as_bytes().to_vec()),
            "bytes are the token text's"
        );
        // vLLM's return_tokens_as_token_ids: every name is `token_id:N`, and
        // the offsets and bytes count those names.
        let ids = TokenNames {
            as_ids: true,
            ..tok
        };
        let c = completion(ids, &entries, 4);
        assert_eq!(c["tokens"], json!(["token_id:5", "token_id:9"]));
        assert_eq!(c["text_offset"], json!([4, 4 + "token_id:5".len()]));
        let keys: Vec<&String> = c["top_logprobs"][1].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["token_id:6", "token_id:7", "token_id:9"]);
        assert_eq!(token_chars(ids, &entries), 20);
        let by_id = super::chat(ids, &entries);
        assert_eq!(by_id["content"][1]["token"], json!("token_id:9"));
        assert_eq!(
            by_id["content"][1]["top_logprobs"][0]["token"],
            json!("token_id:6")
        );
        assert_eq!(by_id["content"][0]["bytes"], json!(b"token_id:5".to_vec()));
    }

    #[test]
    fn prompt_shapes_lead_with_a_null_first_token() {
        let dir = tempfile::tempdir().unwrap();
        tandem_engine::synth::write_model_dir(dir.path(), &Default::default()).unwrap();
        let model = tandem_engine::ModelDir::open(dir.path()).unwrap();
        let ids = TokenNames {
            tokenizer: &model.tokenizer,
            as_ids: true,
        };
        let mut second = entry(8, -2.5, &[(6, -1.0), (8, -2.5)]);
        second.rank = 2;
        let mut third = entry(9, -4.0, &[(6, -0.5)]);
        third.rank = 7;
        let p = pb::PromptLogprobs {
            tokens: vec![second, third],
            first_id: 3,
        };
        // vLLM's prompt_logprobs: null, then id -> {logprob, rank, decoded_token}.
        let v = prompt(ids, &p);
        assert_eq!(v[0], Value::Null);
        assert_eq!(
            v[1]["8"],
            json!({"logprob": -2.5, "rank": 2, "decoded_token": "token_id:8"})
        );
        assert_eq!(v[1]["6"]["rank"], json!(1));
        assert_eq!(
            v[1].as_object().unwrap().len(),
            2,
            "the prompt token is among the top"
        );
        assert_eq!(v[2]["9"]["rank"], json!(7));
        assert_eq!(v[2].as_object().unwrap().len(), 2);
        // Echo: the prompt's tokens first, its first one without numbers.
        let generated = [entry(5, -0.5, &[])];
        let c = completion_after_prompt(ids, Some(&p), &generated, 0);
        assert_eq!(
            c["tokens"],
            json!(["token_id:3", "token_id:8", "token_id:9", "token_id:5"])
        );
        assert_eq!(c["token_logprobs"], json!([null, -2.5, -4.0, -0.5]));
        assert_eq!(c["top_logprobs"][0], Value::Null);
        assert_eq!(c["text_offset"], json!([0, 10, 20, 30]));
        assert_eq!(prompt_chars(ids, &p), 30);
    }
}
