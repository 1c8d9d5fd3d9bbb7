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
    let mut tokens = Vec::with_capacity(entries.len());
    let mut token_logprobs = Vec::with_capacity(entries.len());
    let mut top_logprobs = Vec::with_capacity(entries.len());
    let mut text_offset = Vec::with_capacity(entries.len());
    let mut at = offset;
    for e in entries {
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
        token_logprobs.push(clamp(e.logprob));
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

/// Characters of the completions shape's tokens, to continue `text_offset`
/// in the next streamed chunk.
pub fn token_chars(names: TokenNames<'_>, entries: &[pb::TokenLogprobs]) -> usize {
    entries
        .iter()
        .map(|e| names.name(e.id).chars().count())
        .sum()
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
}
