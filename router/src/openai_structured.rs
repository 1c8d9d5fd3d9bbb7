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
//!   first one); a word's last token is banned right after the rest of it;
//! - JSON whitespace: `guided_whitespace_pattern` (or `structured_outputs`'
//!   `whitespace_pattern`: a regex for the whitespace between JSON tokens) and
//!   `structured_outputs.disable_any_whitespace` (none at all), written into the
//!   schema's `x-guidance` options, as vLLM's guidance backend does; with no
//!   JSON constraint they are refused;
//! - `guided_decoding_backend` / `structured_outputs.backend`: `"guidance"`
//!   (llguidance, what Tandem runs) or `"auto"`; another backend is refused,
//!   as vLLM refuses a request's backend other than the engine's;
//!   `structured_outputs.disable_fallback`: there is no fallback to disable.
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
    /// vLLM's: the whitespace allowed between JSON tokens, as a regex.
    pub guided_whitespace_pattern: Option<String>,
    /// vLLM's: which structured-output backend (Tandem runs llguidance).
    pub guided_decoding_backend: Option<String>,
}

/// A backend a request names: llguidance's (`"guidance"`) or the server's
/// choice (`"auto"`), which is the same; any other is refused.
fn check_backend(param: &str, name: &str) -> Result<(), Refused> {
    if matches!(name, "guidance" | "auto") {
        return Ok(());
    }
    Err(refused(
        param,
        format!(
            "{param} = {name:?}: Tandem's structured output runs llguidance \
             (\"guidance\"); a request cannot pick another backend"
        ),
    ))
}

/// What a request says of JSON whitespace, besides its constraint: `x-guidance`
/// entries for a JSON constraint, each with the field that set it.
#[derive(Default)]
struct Options {
    json: Vec<(String, &'static str, Value)>,
}

impl Options {
    /// `kind` with the JSON options written into its schema's `x-guidance`.
    fn apply(self, kind: Option<(String, Kind)>) -> Result<Option<(String, Kind)>, Refused> {
        let Some((param, _, _)) = self.json.first() else {
            return Ok(kind);
        };
        let param = param.clone();
        let (name, mut schema) = match kind {
            Some((name, Kind::JsonSchema(text))) => {
                let schema: Value = serde_json::from_str(&text)
                    .map_err(|e| refused(&name, format!("{name} is not valid JSON: {e}")))?;
                let schema = match schema {
                    Value::Bool(true) => serde_json::json!({}),
                    Value::Object(_) => schema,
                    _ => {
                        return Err(refused(
                            &param,
                            format!("{param} needs a JSON schema that can be matched"),
                        ));
                    }
                };
                (name, schema)
            }
            Some((name, Kind::JsonObject(true))) => (name, serde_json::json!({"type": "object"})),
            Some((name, _)) => {
                return Err(refused(
                    &param,
                    format!("{param} applies to JSON output; {name} is not a JSON constraint"),
                ));
            }
            None => {
                return Err(refused(
                    &param,
                    format!("{param} applies to JSON output, and the request asks for none"),
                ));
            }
        };
        let options = schema.as_object_mut().map(|o| {
            o.entry("x-guidance")
                .or_insert_with(|| serde_json::json!({}))
        });
        let Some(Value::Object(options)) = options else {
            return Err(refused(
                &name,
                format!("{name}'s x-guidance must be an object"),
            ));
        };
        for (field, key, value) in self.json {
            if let Some(set) = options.get(key).filter(|set| **set != value) {
                return Err(refused(
                    &field,
                    format!("{field} conflicts with the schema's x-guidance {key} = {set}"),
                ));
            }
            options.insert(key.to_string(), value);
        }
        Ok(Some((name, Kind::JsonSchema(schema.to_string()))))
    }
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

fn structured_outputs(v: &Value, opts: &mut Options) -> Result<Vec<(String, Kind)>, Refused> {
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
            ("whitespace_pattern", Value::String(p)) => {
                opts.json
                    .push((name, "whitespace_pattern", Value::String(p.clone())));
                continue;
            }
            ("disable_any_whitespace", Value::Bool(off)) => {
                if *off {
                    opts.json
                        .push((name, "whitespace_flexible", Value::Bool(false)));
                }
                continue;
            }
            // llguidance compiles the request's constraint or refuses it: there
            // is no other backend to fall back to, whatever this says.
            ("disable_fallback", Value::Bool(_)) => continue,
            ("backend", Value::String(b)) => {
                check_backend(&name, b)?;
                continue;
            }
            ("structural_tag", _) => {
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
    let mut opts = Options::default();
    if let Some(p) = &f.guided_whitespace_pattern {
        opts.json.push((
            "guided_whitespace_pattern".into(),
            "whitespace_pattern",
            Value::String(p.clone()),
        ));
    }
    if let Some(b) = &f.guided_decoding_backend {
        check_backend("guided_decoding_backend", b)?;
    }
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
        found.extend(structured_outputs(v, &mut opts)?);
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
    let first = opts.apply(first)?;
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

    /// The schema a JSON constraint carries, parsed.
    fn schema(body: Value) -> Value {
        match kind(body) {
            Some(Kind::JsonSchema(text)) => serde_json::from_str(&text).unwrap(),
            other => panic!("not a JSON schema: {other:?}"),
        }
    }

    #[test]
    fn json_whitespace_options_go_into_the_schemas_x_guidance() {
        use serde_json::json;
        let s =
            schema(json!({"guided_json": {"type": "object"}, "guided_whitespace_pattern": "\\n?"}));
        assert_eq!(
            s,
            json!({"type": "object", "x-guidance": {"whitespace_pattern": "\\n?"}})
        );
        // json_object becomes the schema of any object, with the option.
        let s = schema(json!({
            "response_format": {"type": "json_object"},
            "structured_outputs": {"disable_any_whitespace": true, "disable_fallback": true}
        }));
        assert_eq!(
            s,
            json!({"type": "object", "x-guidance": {"whitespace_flexible": false}})
        );
        let s = schema(json!({"structured_outputs": {"json": true, "whitespace_pattern": " "}}));
        assert_eq!(s, json!({"x-guidance": {"whitespace_pattern": " "}}));
        // The schema's own x-guidance stays; a different value for the same key is a conflict.
        let own = json!({"type": "object", "x-guidance": {"lenient": true}});
        let s = schema(json!({"guided_json": own, "guided_whitespace_pattern": " "}));
        assert_eq!(
            s["x-guidance"],
            json!({"lenient": true, "whitespace_pattern": " "})
        );
        let clash = json!({"x-guidance": {"whitespace_pattern": "\\t"}});
        let e = parse(json!({"guided_json": clash, "guided_whitespace_pattern": " "})).unwrap_err();
        assert_eq!(e.param, "guided_whitespace_pattern");
        // Without disable_any_whitespace: true, nothing is added.
        let s =
            schema(json!({"structured_outputs": {"json": {}, "disable_any_whitespace": false}}));
        assert_eq!(s, json!({}));
    }

    #[test]
    fn json_whitespace_without_json_and_other_backends_are_refused() {
        use serde_json::json;
        for (body, param) in [
            (
                json!({"guided_whitespace_pattern": " "}),
                "guided_whitespace_pattern",
            ),
            (
                json!({"guided_regex": "a+", "guided_whitespace_pattern": " "}),
                "guided_whitespace_pattern",
            ),
            (
                json!({"structured_outputs": {"regex": "a+", "disable_any_whitespace": true}}),
                "structured_outputs.disable_any_whitespace",
            ),
            (
                json!({"guided_decoding_backend": "xgrammar"}),
                "guided_decoding_backend",
            ),
            (
                json!({"structured_outputs": {"json": {}, "backend": "outlines"}}),
                "structured_outputs.backend",
            ),
        ] {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.param, param, "{body}: {}", e.message);
        }
        for backend in ["guidance", "auto"] {
            let body = json!({"guided_regex": "a+", "guided_decoding_backend": backend});
            assert_eq!(kind(body), Some(Kind::Regex("a+".into())));
        }
    }
}
