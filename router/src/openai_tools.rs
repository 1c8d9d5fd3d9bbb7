//! Tool calling on `/v1/chat/completions`, as vLLM's OpenAI server does it:
//! the request's `tools` and `tool_choice`, the chat history's `tool` messages
//! and assistant `tool_calls`, the prompt they render to, the constraint a
//! forced call generates under, and the `tool_calls` read back from the text.
//!
//! - `tool_choice: "none"`: the tools are offered in the prompt (as vLLM does
//!   unless started with `--exclude-tools-when-tool-choice-none`), but the
//!   output is plain content: nothing is parsed or constrained.
//! - `"auto"` (the default when tools are given): the tools are offered and
//!   the output is read for calls ([`crate::openai_tools_stream`]): Hermes
//!   `<tool_call>{"name": .., "arguments": ..}</tool_call>` blocks, or an
//!   output that is one JSON object (or list) of `{name, arguments}`.
//! - `"required"`: the output is constrained (llguidance) to a JSON array of
//!   `{"name", "parameters"}` objects, each matching one tool's schema (as
//!   vLLM builds it); `parallel_tool_calls: false` allows one item only.
//! - a named function: the output is constrained to that function's
//!   `parameters` schema and is the call's `arguments`.
//!
//! The prompt the tools and the history render to is
//! [`crate::openai_tools_prompt`]'s.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{Value, json};
use tandem_engine::{Constraint, Tokenizer};
use tandem_proto::v1 as pb;

use crate::openai_fields::Refused;

/// The tool fields of a chat request.
#[derive(Deserialize, Default, Debug)]
pub struct ToolFields {
    /// OpenAI's function definitions.
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name"}}`.
    pub tool_choice: Option<Value>,
    /// Whether more than one call may be made (default true).
    pub parallel_tool_calls: Option<Value>,
}

/// One chat message as OpenAI sends it, tool fields included.
#[derive(Deserialize, Debug, Clone)]
pub struct ChatTurn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text; may be `null` on an assistant message carrying `tool_calls`.
    /// OpenAI's list of content parts arrives here as its text parts joined
    /// by newlines ([`content_text`]).
    #[serde(default, deserialize_with = "content_text")]
    pub content: Option<String>,
    /// An assistant message's calls (OpenAI's shape).
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` message's answer to this call.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// A message's `content`: a string, or OpenAI's list of content parts whose
/// text parts (`{"type": "text", "text": ..}`) are joined with newlines, as
/// vLLM joins them for a chat template that takes text. Any other part
/// (an image, audio, a file) is refused by name: the models served here read
/// text only.
fn content_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    let parts = match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => return Ok(Some(s)),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(D::Error::custom(
                "a message's content must be a string or a list of content parts",
            ));
        }
    };
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => texts.push(t),
                None => {
                    return Err(D::Error::custom(format!(
                        "content part {j} is of type \"text\" but has no \"text\" string"
                    )));
                }
            },
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "content part {j} is of type {other:?}: this model reads text only (parts of type \"text\")"
                )));
            }
            None => {
                return Err(D::Error::custom(format!(
                    "content part {j} has no \"type\""
                )));
            }
        }
    }
    Ok(Some(texts.join("\n")))
}

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// The function's name.
    pub name: String,
    /// The JSON schema its arguments follow (`{"type": "object"}` if none given).
    pub parameters: Value,
    /// The definition as the client sent it (what the prompt shows).
    pub definition: Value,
}

/// How the model may call the tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// `tool_choice: "none"`: shown to the model, never called; the output is content.
    Off,
    /// May call any (or none): the output is parsed.
    Auto,
    /// Must call at least one: the output is a constrained JSON array.
    Required,
    /// Must call this one: the output is its arguments.
    Named(String),
}

/// A request's tools and what it lets the model do with them.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    /// The tools offered.
    pub tools: Vec<Tool>,
    /// How they may be called.
    pub mode: ToolMode,
    /// `parallel_tool_calls` (default true).
    pub parallel: bool,
}

fn refused(param: impl Into<String>, message: impl Into<String>) -> Refused {
    Refused {
        param: param.into(),
        message: message.into(),
    }
}

/// Reads and checks the request's tool fields. `None`: no tools given. Each parameters schema is compiled
/// with `tokenizer`'s constraint compiler, so a bad one is refused naming it.
pub fn plan(f: &ToolFields, tokenizer: &Tokenizer) -> Result<Option<ToolPlan>, Refused> {
    let tools = match &f.tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t, tokenizer))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(refused("tools", "tools must be a list of tool definitions")),
    };
    let mut names = HashSet::new();
    for (i, t) in tools.iter().enumerate() {
        if !names.insert(t.name.as_str()) {
            return Err(refused(
                format!("tools[{i}].function.name"),
                format!("tool name {:?} is defined twice", t.name),
            ));
        }
    }
    let mode = match &f.tool_choice {
        None | Some(Value::Null) if tools.is_empty() => return Ok(None),
        None | Some(Value::Null) => ToolMode::Auto,
        Some(Value::String(s)) if s == "none" && tools.is_empty() => return Ok(None),
        Some(Value::String(s)) if s == "none" => ToolMode::Off,
        Some(Value::String(s)) if s == "auto" => ToolMode::Auto,
        Some(Value::String(s)) if s == "required" => ToolMode::Required,
        Some(v @ Value::Object(_)) => {
            let name = (v.get("type").and_then(Value::as_str) == Some("function"))
                .then(|| v.pointer("/function/name").and_then(Value::as_str))
                .flatten()
                .ok_or_else(|| {
                    refused(
                        "tool_choice",
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !tools.is_empty() && !names.contains(name) {
                return Err(refused(
                    "tool_choice",
                    format!("tool_choice names the function {name:?}, which is not in tools"),
                ));
            }
            ToolMode::Named(name.to_string())
        }
        Some(other) => {
            return Err(refused(
                "tool_choice",
                format!(
                    "tool_choice must be \"none\", \"auto\", \"required\" or a named function, got {other}"
                ),
            ));
        }
    };
    if tools.is_empty() {
        return Err(refused(
            "tool_choice",
            "tool_choice other than \"none\" needs tools: the request has none",
        ));
    }
    let parallel = match &f.parallel_tool_calls {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(refused(
                "parallel_tool_calls",
                format!("parallel_tool_calls must be true or false, got {other}"),
            ));
        }
    };
    Ok(Some(ToolPlan {
        tools,
        mode,
        parallel,
    }))
}

fn tool(i: usize, t: &Value, tokenizer: &Tokenizer) -> Result<Tool, Refused> {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(refused(
            format!("tools[{i}].type"),
            format!("tools[{i}].type must be \"function\" (the only tool type)"),
        ));
    }
    let name = t
        .pointer("/function/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            refused(
                format!("tools[{i}].function.name"),
                format!("tools[{i}].function.name must be a non-empty string"),
            )
        })?;
    let param = format!("tools[{i}].function.parameters");
    let parameters = match t.pointer("/function/parameters") {
        None | Some(Value::Null) => json!({"type": "object"}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(other) => {
            return Err(refused(
                &param,
                format!("{param} must be a JSON schema (an object), got {other}"),
            ));
        }
    };
    let compiler = tokenizer
        .constraints()
        .map_err(|e| refused(&param, format!("{param}: {e}")))?;
    compiler
        .start(&Constraint::JsonSchema(parameters.to_string()))
        .map_err(|e| refused(&param, format!("{param} is not a usable JSON schema: {e}")))?;
    Ok(Tool {
        name: name.to_string(),
        parameters,
        definition: t.clone(),
    })
}

impl ToolPlan {
    /// The constraint a forced call generates under (`required` or named).
    pub fn constraint(&self) -> Option<pb::OutputConstraint> {
        let schema = match &self.mode {
            ToolMode::Off | ToolMode::Auto => return None,
            ToolMode::Named(name) => self
                .tools
                .iter()
                .find(|t| &t.name == name)
                .map(|t| t.parameters.clone())?,
            ToolMode::Required => {
                let any_of: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|t| {
                        json!({
                            "type": "object",
                            "properties": {
                                "name": {"type": "string", "enum": [t.name]},
                                "parameters": t.parameters,
                            },
                            "required": ["name", "parameters"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                let mut schema =
                    json!({"type": "array", "minItems": 1, "items": {"anyOf": any_of}});
                if !self.parallel {
                    schema["maxItems"] = json!(1);
                }
                schema
            }
        };
        Some(pb::OutputConstraint {
            kind: Some(pb::output_constraint::Kind::JsonSchema(schema.to_string())),
        })
    }

    /// Whether the model may call `name`.
    pub fn knows(&self, name: &str) -> bool {
        self.tools.iter().any(|t| t.name == name)
    }
}

/// Checks the chat history's tool messages and assistant calls, each error
/// naming the message's field.
pub fn check_messages(turns: &[ChatTurn]) -> Result<(), Refused> {
    for (i, m) in turns.iter().enumerate() {
        match m.role.as_str() {
            "tool" if m.tool_call_id.as_deref().is_none_or(str::is_empty) => {
                return Err(refused(
                    format!("messages[{i}].tool_call_id"),
                    format!(
                        "messages[{i}].tool_call_id is missing: a tool message answers the call with that id"
                    ),
                ));
            }
            "assistant" => {
                for (j, c) in m.tool_calls.iter().flatten().enumerate() {
                    let ok = c
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .is_some()
                        && matches!(
                            c.pointer("/function/arguments"),
                            Some(Value::String(_) | Value::Object(_))
                        );
                    if !ok {
                        return Err(refused(
                            format!("messages[{i}].tool_calls[{j}]"),
                            format!(
                                "messages[{i}].tool_calls[{j}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}"
                            ),
                        ));
                    }
                }
            }
            // Any other role (`developer`, a custom one) goes to the
            // template as it is, as vLLM passes it.
            _ => {}
        }
        let has_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
        if m.content.is_none() && !(m.role == "assistant" && has_calls) {
            return Err(refused(
                format!("messages[{i}].content"),
                format!("messages[{i}].content is required"),
            ));
        }
    }
    Ok(())
}

/// A fresh call id, `call_` and 24 random alphanumerics (OpenAI's shape).
pub fn call_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let state = RandomState::new();
    let mut out = String::from("call_");
    for i in 0..24u64 {
        let h = state.hash_one(i);
        out.push(ALPHABET[(h % ALPHABET.len() as u64) as usize] as char);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, OnceLock};
    use tandem_engine::ModelDir;
    use tandem_engine::synth::{SynthSpec, write_model_dir};

    /// A tiny synthetic model whose chat template does not read `tools`.
    pub(crate) fn model() -> Arc<ModelDir> {
        static MODEL: OnceLock<(tempfile::TempDir, Arc<ModelDir>)> = OnceLock::new();
        MODEL
            .get_or_init(|| {
                let dir = tempfile::tempdir().expect("tempdir");
                let spec = SynthSpec {
                    vocab_size: 300,
                    hidden_size: 32,
                    intermediate_size: 64,
                    num_layers: 1,
                    num_heads: 2,
                    num_kv_heads: 1,
                    ..SynthSpec::default()
                };
                write_model_dir(dir.path(), &spec).expect("synth model");
                let model = Arc::new(ModelDir::open(dir.path()).expect("open model"));
                (dir, model)
            })
            .1
            .clone()
    }

    pub(crate) fn fields(v: Value) -> ToolFields {
        serde_json::from_value(v).unwrap()
    }

    pub(crate) fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]}}})
    }

    #[test]
    fn tool_choice_reads_as_vllm_reads_it() {
        let tok = &model().tokenizer;
        let plan_of = |v: Value| plan(&fields(v), tok);
        assert_eq!(plan_of(json!({})).unwrap(), None);
        assert_eq!(plan_of(json!({"tool_choice": "none"})).unwrap(), None);
        // Offered to the model, never called (vLLM's default).
        let off = plan_of(json!({"tools": [weather()], "tool_choice": "none"}))
            .unwrap()
            .unwrap();
        assert_eq!(off.mode, ToolMode::Off);
        assert_eq!(off.constraint(), None);
        let p = plan_of(json!({"tools": [weather()]})).unwrap().unwrap();
        assert_eq!(p.mode, ToolMode::Auto);
        assert!(p.parallel && p.constraint().is_none());
        let p = plan_of(json!({"tools": [weather()], "tool_choice":
            {"type": "function", "function": {"name": "get_weather"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(p.mode, ToolMode::Named("get_weather".into()));
        let Some(pb::output_constraint::Kind::JsonSchema(s)) = p.constraint().unwrap().kind else {
            panic!("a named call is constrained by its schema");
        };
        assert_eq!(
            serde_json::from_str::<Value>(&s).unwrap(),
            weather()["function"]["parameters"]
        );
        let p = plan_of(json!({"tools": [weather()], "tool_choice": "required",
                                "parallel_tool_calls": false}))
        .unwrap()
        .unwrap();
        let Some(pb::output_constraint::Kind::JsonSchema(s)) = p.constraint().unwrap().kind else {
            panic!("a required call is constrained");
        };
        let s: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(s["type"], "array");
        assert_eq!(s["maxItems"], 1);
        assert_eq!(
            s["items"]["anyOf"][0]["properties"]["name"]["enum"][0],
            "get_weather"
        );
    }

    #[test]
    fn bad_tool_fields_are_refused_by_name() {
        let tok = &model().tokenizer;
        for (body, param) in [
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "x"}}}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "always"}),
                "tool_choice",
            ),
            (json!({"tools": {"a": 1}}), "tools"),
            (json!({"tools": [{"type": "code"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function", "function": {}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [weather(), weather()]}),
                "tools[1].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f",
                        "parameters": {"type": "no-such-type"}}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [weather()], "parallel_tool_calls": "yes"}),
                "parallel_tool_calls",
            ),
        ] {
            let e = plan(&fields(body.clone()), tok).expect_err(param);
            assert_eq!(e.param, param, "{body}: {}", e.message);
        }
    }

    pub(crate) fn turns(v: Value) -> Vec<ChatTurn> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn content_parts_are_their_text_parts_joined_and_other_parts_are_refused() {
        let t = turns(json!([
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "user", "content": []},
            {"role": "user", "content": "plain"},
        ]));
        let texts: Vec<Option<&str>> = t.iter().map(|m| m.content.as_deref()).collect();
        assert_eq!(texts, [Some("one\ntwo"), Some(""), Some("plain")]);
        for (bad, says) in [
            (
                json!([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]),
                "\"image_url\": this model reads text only",
            ),
            (
                json!([{"type": "text"}]),
                "content part 0 is of type \"text\" but has no \"text\"",
            ),
            (json!([{"text": "hi"}]), "content part 0 has no \"type\""),
            (json!(7), "must be a string or a list of content parts"),
        ] {
            let e =
                serde_json::from_value::<Vec<ChatTurn>>(json!([{"role": "user", "content": bad}]))
                    .map(|_| ())
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn history_checks_name_the_message() {
        let ok = turns(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
        ]));
        check_messages(&ok).unwrap();
        // Other roles go to the template as they are.
        check_messages(&turns(json!([{"role": "developer", "content": "x"}]))).unwrap();
        for (v, param) in [
            (
                json!([{"role": "tool", "content": "x"}]),
                "messages[0].tool_call_id",
            ),
            (
                json!([{"role": "user", "content": null}]),
                "messages[0].content",
            ),
            (
                json!([{"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]}]),
                "messages[0].tool_calls[0]",
            ),
        ] {
            assert_eq!(check_messages(&turns(v)).unwrap_err().param, param);
        }
    }

    #[test]
    fn call_ids_look_like_openais() {
        let (a, b) = (call_id(), call_id());
        assert!(a.starts_with("call_") && a.len() == 29, "{a}");
        assert!(a[5..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
