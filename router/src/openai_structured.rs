//! Structured output on the HTTP API: OpenAI's `response_format` and vLLM's
//! guided-decoding fields, read into the Generate API's [`pb::OutputConstraint`].
//!
//! Accepted, as vLLM accepts them:
//!
//! - `response_format`: `{"type": "text"}` (none), `{"type": "json_object"}`,
//!   `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`;
//! - `guided_json` (a schema, as an object or as JSON text), `guided_regex`,
//!   `guided_choice` (a list of strings), `guided_grammar` (llguidance's Lark syntax);
//! - `structured_outputs`: `{"json": ..., "regex": ..., "choice": [...],
//!   "grammar": ..., "json_object": true}` (vLLM's newer spelling);
//! - `allowed_token_ids`: only these tokens may be drawn (a fixed mask, not
//!   a grammar; EOS too only when listed);
//! - `bad_words`: words never written, tokenized as vLLM does (each word, and
//!   with a leading space where that tokenizes as many tokens from another
//!   first one); a word's last token is banned right after the rest of it.
//!
//! At most one constraint per request; a second is refused naming its field.
//! Whether the schema, regex or grammar compiles is the validator's check
//! (`validation.rs`), the same for gRPC and HTTP.

use serde::Deserialize;
use serde_json::Value;
use tandem_proto::v1 as pb;
use tandem_proto::v1::output_constraint::Kind;

use tandem_engine::Tokenizer;

use crate::openai_fields::Refused;

/// The structured-output fields of a request body.
#[derive(Deserialize, Default, Debug)]
pub struct StructuredFields {
    /// OpenAI's.
    pub response_format: Option<Value>,
    /// vLLM's.
    pub guided_json: Option<Value>,
    /// vLLM's.
    pub guided_regex: Option<String>,
    /// vLLM's.
    pub guided_choice: Option<Vec<String>>,
    /// vLLM's.
    pub guided_grammar: Option<String>,
    /// vLLM's newer field holding any one of the above.
    pub structured_outputs: Option<Value>,
    /// vLLM's: only these token ids may be drawn (one constraint too).
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's: words never to write (one constraint too).
    pub bad_words: Option<Vec<String>>,
}

fn refused(param: &str, message: impl Into<String>) -> Refused {
    Refused {
        param: param.to_string(),
        message: message.into(),
    }
}

/// A JSON schema given as an object (or boolean), or as JSON text.
fn schema_text(param: &str, v: &Value) -> Result<String, Refused> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(_) | Value::Bool(_) => Ok(v.to_string()),
        other => Err(refused(
            param,
            format!("{param} must be a JSON schema (an object), got {other}"),
        )),
    }
}

fn response_format(v: &Value) -> Result<Option<Kind>, Refused> {
    let param = "response_format";
    let kind = v.get("type").and_then(Value::as_str).ok_or_else(|| {
        refused(
            param,
            "response_format.type must be \"text\", \"json_object\" or \"json_schema\"",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Kind::JsonObject(true))),
        "json_schema" => {
            let schema = v
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    refused(
                        param,
                        "response_format.json_schema.schema is missing: the JSON schema to follow",
                    )
                })?;
            Ok(Some(Kind::JsonSchema(schema_text(
                "response_format.json_schema.schema",
                schema,
            )?)))
        }
        other => Err(refused(
            param,
            format!(
                "response_format.type {other:?} is not one of \"text\", \"json_object\", \"json_schema\""
            ),
        )),
    }
}

fn structured_outputs(v: &Value) -> Result<Vec<(String, Kind)>, Refused> {
    let param = "structured_outputs";
    let Value::Object(fields) = v else {
        return Err(refused(param, "structured_outputs must be an object"));
    };
    let mut out = Vec::new();
    for (key, value) in fields {
        let name = format!("structured_outputs.{key}");
        let kind = match (key.as_str(), value) {
            (_, Value::Null) => continue,
            ("json", v) => Kind::JsonSchema(schema_text(&name, v)?),
            ("regex", Value::String(r)) => Kind::Regex(r.clone()),
            ("grammar", Value::String(g)) => Kind::LarkGrammar(g.clone()),
            ("json_object", Value::Bool(true)) => Kind::JsonObject(true),
            ("json_object", Value::Bool(false)) => continue,
            ("choice", Value::Array(items)) => Kind::Choice(pb::ChoiceList {
                choices: items
                    .iter()
                    .map(|c| {
                        c.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| refused(&name, format!("{name} must be strings")))
                    })
                    .collect::<Result<_, _>>()?,
            }),
            ("disable_any_whitespace" | "disable_fallback" | "whitespace_pattern", _)
            | ("structural_tag", _) => {
                return Err(refused(&name, format!("{name} is not supported by Tandem")));
            }
            (_, v) => {
                return Err(refused(
                    &name,
                    format!("{name} = {v} is not a known structured-output field of this type"),
                ));
            }
        };
        out.push((name, kind));
    }
    Ok(out)
}

/// `words` as vLLM's bad-words token sequences: each word's tokens, and its
/// tokens with a leading space when that makes as many tokens starting with
/// another one.
fn bad_word_ids(words: &[String], tokenizer: &Tokenizer) -> Result<Vec<pb::TokenIds>, Refused> {
    let mut out: Vec<pb::TokenIds> = Vec::new();
    for w in words {
        let bare = w.trim_start();
        let encode = |text: &str| {
            tokenizer
                .encode(text, false)
                .map_err(|e| refused("bad_words", format!("cannot tokenize {w:?}: {e}")))
        };
        let ids = encode(bare)?;
        if ids.is_empty() {
            return Err(refused("bad_words", format!("{w:?} has no tokens")));
        }
        let spaced = encode(&format!(" {bare}"))?;
        let distinct = spaced.len() == ids.len() && spaced.first() != ids.first();
        out.push(pb::TokenIds { ids });
        if distinct {
            out.push(pb::TokenIds { ids: spaced });
        }
    }
    Ok(out)
}

/// The request's constraint, if it asks for one; two or more are refused.
pub fn constraint(
    f: &StructuredFields,
    tokenizer: &Tokenizer,
) -> Result<Option<pb::OutputConstraint>, Refused> {
    let mut found: Vec<(String, Kind)> = Vec::new();
    if let Some(v) = &f.response_format
        && let Some(k) = response_format(v)?
    {
        found.push(("response_format".into(), k));
    }
    if let Some(v) = &f.guided_json {
        found.push((
            "guided_json".into(),
            Kind::JsonSchema(schema_text("guided_json", v)?),
        ));
    }
    if let Some(r) = &f.guided_regex {
        found.push(("guided_regex".into(), Kind::Regex(r.clone())));
    }
    if let Some(c) = &f.guided_choice {
        found.push((
            "guided_choice".into(),
            Kind::Choice(pb::ChoiceList { choices: c.clone() }),
        ));
    }
    if let Some(g) = &f.guided_grammar {
        found.push(("guided_grammar".into(), Kind::LarkGrammar(g.clone())));
    }
    if let Some(v) = &f.structured_outputs {
        found.extend(structured_outputs(v)?);
    }
    if let Some(ids) = &f.allowed_token_ids {
        found.push((
            "allowed_token_ids".into(),
            Kind::AllowedTokenIds(pb::TokenIds { ids: ids.clone() }),
        ));
    }
    if let Some(words) = f.bad_words.as_ref().filter(|w| !w.is_empty()) {
        found.push((
            "bad_words".into(),
            Kind::BadWords(pb::BadWords {
                words: bad_word_ids(words, tokenizer)?,
            }),
        ));
    }
    let mut found = found.into_iter();
    let first = found.next();
    if let Some((second, _)) = found.next() {
        let first = first.map(|f| f.0).unwrap_or_default();
        return Err(refused(
            &second,
            format!(
                "{second}: a request takes one structured-output constraint, and {first} is one already"
            ),
        ));
    }
    Ok(first.map(|(_, kind)| pb::OutputConstraint { kind: Some(kind) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        tandem_engine::synth::write_model_dir(dir.path(), &Default::default()).unwrap();
        tandem_engine::ModelDir::open(dir.path()).unwrap().tokenizer
    }

    fn parse(body: Value) -> Result<Option<pb::OutputConstraint>, Refused> {
        constraint(&serde_json::from_value(body).unwrap(), &tokenizer())
    }

    #[test]
    fn bad_words_are_their_tokens_and_their_spaced_tokens() {
        let tok = tokenizer();
        let bare = tok.encode("hello world", false).unwrap();
        let spaced = tok.encode(" hello world", false).unwrap();
        let Some(Kind::BadWords(b)) = kind(serde_json::json!({"bad_words": ["  hello world"]}))
        else {
            panic!("bad_words read as another kind");
        };
        let words: Vec<Vec<u32>> = b.words.into_iter().map(|w| w.ids).collect();
        assert_eq!(words[0], bare);
        // The spaced form is a word of its own only where vLLM keeps it.
        let distinct = spaced.len() == bare.len() && spaced[0] != bare[0];
        assert_eq!(words.len(), 1 + usize::from(distinct), "{words:?}");
        // None is no constraint; with another one, refused naming it.
        assert_eq!(kind(serde_json::json!({"bad_words": []})), None);
        let r = parse(serde_json::json!({"bad_words": ["x"], "guided_regex": "a"})).unwrap_err();
        assert_eq!(r.param, "bad_words");
    }

    fn kind(body: Value) -> Option<Kind> {
        parse(body).unwrap().and_then(|c| c.kind)
    }

    #[test]
    fn each_spelling_reads() {
        assert_eq!(kind(serde_json::json!({})), None);
        assert_eq!(
            kind(serde_json::json!({"response_format": {"type": "text"}})),
            None
        );
        assert_eq!(
            kind(serde_json::json!({"response_format": {"type": "json_object"}})),
            Some(Kind::JsonObject(true))
        );
        let schema = serde_json::json!({"type": "object"});
        assert_eq!(
            kind(
                serde_json::json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": true}}})
            ),
            Some(Kind::JsonSchema(schema.to_string()))
        );
        assert_eq!(
            kind(serde_json::json!({"guided_json": "{\"type\":\"object\"}"})),
            Some(Kind::JsonSchema("{\"type\":\"object\"}".into()))
        );
        assert_eq!(
            kind(serde_json::json!({"guided_regex": "a+"})),
            Some(Kind::Regex("a+".into()))
        );
        assert_eq!(
            kind(serde_json::json!({"structured_outputs": {"choice": ["a", "b"]}})),
            Some(Kind::Choice(pb::ChoiceList {
                choices: vec!["a".into(), "b".into()]
            }))
        );
    }

    #[test]
    fn bad_or_doubled_constraints_are_refused_by_name() {
        let e = parse(serde_json::json!({"response_format": {"type": "yaml"}})).unwrap_err();
        assert_eq!(e.param, "response_format");
        let e = parse(serde_json::json!({"response_format": {"type": "json_schema"}})).unwrap_err();
        assert_eq!(e.param, "response_format");
        let e = parse(serde_json::json!({"guided_json": 3})).unwrap_err();
        assert_eq!(e.param, "guided_json");
        let e =
            parse(serde_json::json!({"guided_regex": "a", "guided_choice": ["b"]})).unwrap_err();
        assert_eq!(e.param, "guided_choice");
        let e = parse(serde_json::json!({"structured_outputs": {"regex": 5}})).unwrap_err();
        assert_eq!(e.param, "structured_outputs.regex");
    }
}
