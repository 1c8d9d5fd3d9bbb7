//! Which fields of an OpenAI request the HTTP API honours, and the refusal of
//! every other one: nothing a client sends is silently ignored.
//!
//! Each field of OpenAI's `/v1/completions` and `/v1/chat/completions`
//! request schemas, and each of vLLM's extensions to them, is in [`FIELDS`]
//! with one [`Rule`]:
//!
//! - [`Rule::Used`]: implemented (read by the typed request in `openai.rs`);
//! - [`Rule::NoEffect`]: accepted and without effect on the output, as in
//!   vLLM (`user`, `metadata`, `service_tier`, ...);
//! - [`Rule::NeutralOnly`]: accepted only absent, `null` or at the value that
//!   asks for nothing (`functions: []`,
//!   `suffix: ""`, ...); any other value is refused
//!   with HTTP 400 naming the field, because Tandem cannot do it yet.
//!
//! A field in neither schema is refused too (HTTP 400 naming it), as a strict
//! (`extra = "forbid"`) schema would: a misspelt `max_token` must not pass as
//! a request for the default length.

use serde_json::{Map, Value};

/// The endpoint a request body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// How the API treats one field.
#[derive(Clone, Copy)]
pub enum Rule {
    /// Implemented.
    Used,
    /// Accepted; it has no effect on the output.
    NoEffect,
    /// Accepted only when the value asks for nothing (the function says which
    /// values do; `null` always does); otherwise refused as not supported.
    NeutralOnly(fn(&Value) -> bool),
}

/// Which endpoints a field belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    Both,
    Completions,
    Chat,
}

/// Every field either endpoint knows: OpenAI's request schemas, then vLLM's
/// extensions.
const FIELDS: &[(&str, On, Rule)] = &[
    // OpenAI, both endpoints.
    ("model", On::Both, Rule::Used),
    ("max_tokens", On::Both, Rule::Used),
    ("temperature", On::Both, Rule::Used),
    ("top_p", On::Both, Rule::Used),
    ("seed", On::Both, Rule::Used),
    ("stop", On::Both, Rule::Used),
    ("stream", On::Both, Rule::Used),
    ("stream_options", On::Both, Rule::Used),
    ("presence_penalty", On::Both, Rule::Used),
    ("frequency_penalty", On::Both, Rule::Used),
    ("n", On::Both, Rule::Used),
    ("logit_bias", On::Both, Rule::Used),
    ("logprobs", On::Both, Rule::Used),
    ("user", On::Both, Rule::NoEffect),
    // Structured output: see `openai_structured`.
    ("response_format", On::Both, Rule::Used),
    // OpenAI, completions only.
    ("prompt", On::Completions, Rule::Used),
    ("best_of", On::Completions, Rule::Used),
    ("echo", On::Completions, Rule::Used),
    ("suffix", On::Completions, Rule::NeutralOnly(is_empty)),
    // OpenAI, chat only.
    ("messages", On::Chat, Rule::Used),
    ("max_completion_tokens", On::Chat, Rule::Used),
    ("top_logprobs", On::Chat, Rule::Used),
    // Tool calling: see `openai_tools`.
    ("tools", On::Chat, Rule::Used),
    ("tool_choice", On::Chat, Rule::Used),
    ("parallel_tool_calls", On::Chat, Rule::Used),
    ("functions", On::Chat, Rule::NeutralOnly(is_empty)),
    ("function_call", On::Chat, Rule::NeutralOnly(is_none_choice)),
    ("audio", On::Chat, Rule::NeutralOnly(is_empty)),
    ("modalities", On::Chat, Rule::NeutralOnly(is_text_modality)),
    ("prediction", On::Chat, Rule::NeutralOnly(is_empty)),
    ("reasoning_effort", On::Chat, Rule::NeutralOnly(is_empty)),
    ("verbosity", On::Chat, Rule::NeutralOnly(is_empty)),
    ("web_search_options", On::Chat, Rule::NeutralOnly(is_empty)),
    ("store", On::Chat, Rule::NeutralOnly(is_false_or_zero)),
    ("metadata", On::Chat, Rule::NoEffect),
    ("service_tier", On::Chat, Rule::NoEffect),
    ("prompt_cache_key", On::Chat, Rule::NoEffect),
    ("safety_identifier", On::Chat, Rule::NoEffect),
    // vLLM's sampling extensions.
    ("top_k", On::Both, Rule::Used),
    ("min_p", On::Both, Rule::Used),
    ("repetition_penalty", On::Both, Rule::Used),
    ("stop_token_ids", On::Both, Rule::Used),
    ("ignore_eos", On::Both, Rule::Used),
    ("request_id", On::Both, Rule::Used),
    ("min_tokens", On::Both, Rule::Used),
    // Beam search: see `openai/beam.rs`.
    ("use_beam_search", On::Both, Rule::Used),
    ("length_penalty", On::Both, Rule::Used),
    ("include_stop_str_in_output", On::Both, Rule::Used),
    ("skip_special_tokens", On::Both, Rule::Used),
    ("spaces_between_special_tokens", On::Both, Rule::Used),
    ("truncate_prompt_tokens", On::Both, Rule::Used),
    ("allowed_token_ids", On::Both, Rule::Used),
    ("bad_words", On::Both, Rule::Used),
    ("prompt_logprobs", On::Both, Rule::Used),
    ("return_tokens_as_token_ids", On::Both, Rule::Used),
    ("return_token_ids", On::Both, Rule::Used),
    ("logits_processors", On::Both, Rule::NeutralOnly(is_empty)),
    ("priority", On::Both, Rule::NeutralOnly(is_false_or_zero)),
    ("cache_salt", On::Both, Rule::Used),
    ("kv_transfer_params", On::Both, Rule::NeutralOnly(is_empty)),
    ("vllm_xargs", On::Both, Rule::NeutralOnly(is_empty)),
    ("guided_json", On::Both, Rule::Used),
    ("guided_regex", On::Both, Rule::Used),
    ("guided_choice", On::Both, Rule::Used),
    ("guided_grammar", On::Both, Rule::Used),
    ("guided_decoding_backend", On::Both, Rule::Used),
    ("guided_whitespace_pattern", On::Both, Rule::Used),
    ("structured_outputs", On::Both, Rule::Used),
    ("add_special_tokens", On::Completions, Rule::Used),
    (
        "prompt_embeds",
        On::Completions,
        Rule::NeutralOnly(is_empty),
    ),
    // vLLM's chat extensions.
    ("add_generation_prompt", On::Chat, Rule::Used),
    ("add_special_tokens", On::Chat, Rule::Used),
    ("continue_final_message", On::Chat, Rule::Used),
    ("echo", On::Chat, Rule::Used),
    ("documents", On::Chat, Rule::Used),
    ("chat_template", On::Chat, Rule::NeutralOnly(is_empty)),
    ("chat_template_kwargs", On::Chat, Rule::Used),
    ("mm_processor_kwargs", On::Chat, Rule::NeutralOnly(is_empty)),
    // Splits a reasoning parser's `reasoning_content` off the answer; with no
    // reasoning parser (none is served here) it has no effect, as in vLLM.
    ("include_reasoning", On::Chat, Rule::NoEffect),
];

/// A refused field: its name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The field, as OpenAI's error `param`.
    pub param: String,
    /// What is wrong with it.
    pub message: String,
}

/// The rule for `field` on `endpoint`, if the field is known there.
pub fn rule(endpoint: Endpoint, field: &str) -> Option<Rule> {
    FIELDS
        .iter()
        .find(|(name, on, _)| {
            *name == field
                && match on {
                    On::Both => true,
                    On::Completions => endpoint == Endpoint::Completions,
                    On::Chat => endpoint == Endpoint::Chat,
                }
        })
        .map(|&(_, _, rule)| rule)
}

/// Checks every field of a request body; the first unknown or unsupported
/// one (in the body's order) is refused.
pub fn check(endpoint: Endpoint, body: &Map<String, Value>) -> Result<(), Refused> {
    for (field, value) in body {
        match rule(endpoint, field) {
            None => {
                let path = match endpoint {
                    Endpoint::Completions => "/v1/completions",
                    Endpoint::Chat => "/v1/chat/completions",
                };
                return Err(Refused {
                    param: field.clone(),
                    message: format!(
                        "unknown field `{field}`: it is not part of {path}'s request \
                         (OpenAI's schema and vLLM's extensions)"
                    ),
                });
            }
            Some(Rule::Used | Rule::NoEffect) => {}
            Some(Rule::NeutralOnly(neutral)) => {
                if !value.is_null() && !neutral(value) {
                    return Err(Refused {
                        param: field.clone(),
                        message: format!(
                            "`{field}` = {value} is not supported yet by Tandem; \
                             leave it out or null"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

fn is_false_or_zero(v: &Value) -> bool {
    v.as_bool() == Some(false) || v.as_f64() == Some(0.0)
}

/// An empty object, list or string.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// `"none"`: call no tool.
fn is_none_choice(v: &Value) -> bool {
    v.as_str() == Some("none")
}

/// `["text"]`: text out, what the model writes anyway.
fn is_text_modality(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(endpoint: Endpoint, body: Value) -> Option<Refused> {
        check(endpoint, body.as_object().unwrap()).err()
    }

    #[test]
    fn neutral_values_pass() {
        let body = json!({
            "prompt": "x", "n": 1, "best_of": 1, "echo": false, "logprobs": null,
            "logit_bias": {}, "suffix": null, "user": "u", "min_tokens": 0,
            "response_format": {"type": "text"}, "guided_json": null,
        });
        assert_eq!(refused(Endpoint::Completions, body), None);
        let body = json!({
            "messages": [], "logprobs": false, "top_logprobs": 0, "tools": [],
            "tool_choice": "none", "metadata": {"a": "b"}, "store": false,
            "max_completion_tokens": 3, "modalities": ["text"], "include_reasoning": true,
        });
        assert_eq!(refused(Endpoint::Chat, body), None);
    }

    #[test]
    fn unsupported_values_are_refused_by_name() {
        for (endpoint, body, param) in [
            (
                Endpoint::Chat,
                json!({"chat_template": "{{ x }}"}),
                "chat_template",
            ),
            (Endpoint::Completions, json!({"suffix": "end"}), "suffix"),
            (
                Endpoint::Completions,
                json!({"kv_transfer_params": {"x": 1}}),
                "kv_transfer_params",
            ),
            (Endpoint::Chat, json!({"functions": [{}]}), "functions"),
            (
                Endpoint::Chat,
                json!({"function_call": "auto"}),
                "function_call",
            ),
            (Endpoint::Chat, json!({"store": true}), "store"),
        ] {
            let r = refused(endpoint, body).expect(param);
            assert_eq!(r.param, param);
            assert!(r.message.contains("not supported"), "{}", r.message);
        }
    }

    #[test]
    fn unknown_fields_and_other_endpoints_fields_are_refused() {
        let r = refused(Endpoint::Completions, json!({"max_token": 3})).unwrap();
        assert_eq!(r.param, "max_token");
        assert!(r.message.contains("unknown field"), "{}", r.message);
        let r = refused(Endpoint::Completions, json!({"messages": []})).unwrap();
        assert_eq!(r.param, "messages");
        let r = refused(Endpoint::Chat, json!({"prompt": "x"})).unwrap();
        assert_eq!(r.param, "prompt");
    }
}
