//! Reading tool calls out of generated text as it arrives: a state machine
//! fed text pieces ([`ToolStream::push`]) and the end ([`ToolStream::finish`]),
//! returning what to send ([`ToolDelta`]s). The streamed answer sends each
//! delta as a chunk; the plain answer gathers them ([`collect`]).
//!
//! - A named `tool_choice`: the text is the call's arguments; the call's id
//!   and name go first, then each piece as an arguments delta.
//! - `required`: the text is a JSON array of `{"name", "parameters"}`
//!   (constrained); each item becomes a call once its name is complete, and
//!   its `parameters` text streams as arguments deltas as it grows.
//! - `auto`: Hermes `<tool_call>{"name", "arguments"}</tool_call>` blocks
//!   become calls (a block left open at the end too, as vLLM's Hermes parser
//!   reads it); text around them stays content (held back while it could be
//!   the start of a tag). An output that starts with `{` or `[` is held to the
//!   end and read as one `{name, arguments|parameters}` object or a list of
//!   them (vLLM's llama/JSON convention), or else sent as content. Only calls
//!   to offered tools count; with `parallel_tool_calls: false` only the first.

use serde_json::Value;

use crate::openai_tools::{ToolMode, ToolPlan, call_id};
use crate::openai_tools_scan::scan_required;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A piece of the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolDelta {
    /// Plain text for `content`.
    Content(String),
    /// Part of tool call number `index`: its first delta carries the id and
    /// the name, later ones only arguments text.
    Call {
        /// Which call (from 0).
        index: usize,
        /// `call_...`, on the first delta of a call.
        id: Option<String>,
        /// The function, on the first delta of a call.
        name: Option<String>,
        /// More of the arguments' JSON text.
        arguments: String,
    },
}

/// Where the reader is.
#[derive(Debug)]
enum State {
    /// Auto, before any text but whitespace.
    Start,
    /// Auto, in text (content).
    Text,
    /// Auto, inside a `<tool_call>` block.
    InCall,
    /// Auto, an output that looks like bare JSON: held to the end.
    Json,
    /// Forced (required or named): held or streamed as arguments.
    Forced,
}

/// The tool-call reader of one answer.
#[derive(Debug)]
pub struct ToolStream {
    plan: ToolPlan,
    state: State,
    buf: String,
    /// Whitespace content held until more text comes (dropped at the end).
    pending_space: String,
    calls: usize,
    /// Required: bytes of each call's arguments sent so far.
    args_sent: Vec<usize>,
}

impl ToolStream {
    /// A reader for an answer generated under `plan`.
    pub fn new(plan: ToolPlan) -> Self {
        let state = match plan.mode {
            ToolMode::Auto => State::Start,
            _ => State::Forced,
        };
        ToolStream {
            plan,
            state,
            buf: String::new(),
            pending_space: String::new(),
            calls: 0,
            args_sent: Vec::new(),
        }
    }

    /// How many calls have been sent.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Reads one piece of generated text.
    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        if let (State::Forced, ToolMode::Named(name)) = (&self.state, &self.plan.mode) {
            if self.calls == 0 {
                self.calls = 1;
                out.push(ToolDelta::Call {
                    index: 0,
                    id: Some(call_id()),
                    name: Some(name.clone()),
                    arguments: String::new(),
                });
            }
            if !text.is_empty() {
                out.push(ToolDelta::Call {
                    index: 0,
                    id: None,
                    name: None,
                    arguments: text.to_string(),
                });
            }
            return out;
        }
        self.buf.push_str(text);
        if matches!(self.state, State::Forced) {
            self.stream_required(&mut out);
            return out;
        }
        loop {
            match self.state {
                State::Forced | State::Json => return out,
                State::Start => {
                    let trimmed = self.buf.trim_start();
                    if trimmed.is_empty() {
                        return out;
                    }
                    if trimmed.starts_with('{') || trimmed.starts_with('[') {
                        self.state = State::Json;
                        return out;
                    }
                    self.state = State::Text;
                }
                State::Text => {
                    if let Some(i) = self.buf.find(OPEN) {
                        let before: String = self.buf.drain(..i + OPEN.len()).collect();
                        self.content(&before[..i], &mut out);
                        self.state = State::InCall;
                        continue;
                    }
                    // Hold back a tail that may be the start of `<tool_call>`.
                    let keep = (1..OPEN.len())
                        .rev()
                        .find(|&n| self.buf.ends_with(&OPEN[..n]))
                        .unwrap_or(0);
                    let cut = self.buf.len() - keep;
                    let text: String = self.buf.drain(..cut).collect();
                    self.content(&text, &mut out);
                    return out;
                }
                State::InCall => {
                    let Some(i) = self.buf.find(CLOSE) else {
                        return out;
                    };
                    let block: String = self.buf.drain(..i + CLOSE.len()).collect();
                    let body = &block[..i];
                    if !self.call_from(body, &mut out) {
                        self.content(&format!("{OPEN}{block}"), &mut out);
                    }
                    self.state = State::Text;
                }
            }
        }
    }

    /// Reads the end of the text: whatever was held back.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match (&self.state, &self.plan.mode) {
            (State::Forced, ToolMode::Named(_)) => {
                if self.calls == 0 {
                    out = self.push("");
                }
            }
            (State::Forced, _) => {
                self.buf = rest;
                self.stream_required(&mut out);
                if self.calls == 0 {
                    // Cut short before a whole name: what came is content.
                    let rest = std::mem::take(&mut self.buf);
                    self.content(&rest, &mut out);
                }
            }
            (State::Json, _) => {
                if !self.calls_from_json(&rest, &mut out) {
                    self.content(&rest, &mut out);
                }
            }
            (State::InCall, _) => {
                if !self.call_from(&rest, &mut out) {
                    self.content(&format!("{OPEN}{rest}"), &mut out);
                }
            }
            (State::Start | State::Text, _) => self.content(&rest, &mut out),
        }
        out
    }

    /// Required: sends each call of the (constrained) JSON array as soon as
    /// its name is complete, then its `parameters` text as it grows.
    fn stream_required(&mut self, out: &mut Vec<ToolDelta>) {
        for (index, call) in scan_required(&self.buf).into_iter().enumerate() {
            let (Some(name), Some(start)) = (call.name, call.start) else {
                continue;
            };
            if index > 0 && !self.plan.parallel {
                break;
            }
            if index >= self.calls {
                self.calls = index + 1;
                self.args_sent.resize(self.calls, 0);
                out.push(ToolDelta::Call {
                    index,
                    id: Some(call_id()),
                    name: Some(name),
                    arguments: String::new(),
                });
            }
            let end = call.end.unwrap_or(self.buf.len());
            let from = start + self.args_sent[index];
            if let Some(more) = self.buf.get(from..end).filter(|m| !m.is_empty()) {
                self.args_sent[index] += more.len();
                out.push(ToolDelta::Call {
                    index,
                    id: None,
                    name: None,
                    arguments: more.to_string(),
                });
            }
        }
    }

    /// Sends `text` as content, holding whitespace-only text back.
    fn content(&mut self, text: &str, out: &mut Vec<ToolDelta>) {
        if text.trim().is_empty() {
            self.pending_space.push_str(text);
            return;
        }
        let mut t = std::mem::take(&mut self.pending_space);
        t.push_str(text);
        out.push(ToolDelta::Content(t));
    }

    /// One call from a Hermes block's JSON; false if it is not one.
    fn call_from(&mut self, body: &str, out: &mut Vec<ToolDelta>) -> bool {
        match serde_json::from_str::<Value>(body.trim()) {
            Ok(v) => self.call_from_value(&v, out),
            Err(_) => false,
        }
    }

    /// Calls from bare JSON (one object or a list); false if it is not that.
    fn calls_from_json(&mut self, text: &str, out: &mut Vec<ToolDelta>) -> bool {
        let Ok(v) = serde_json::from_str::<Value>(text.trim()) else {
            return false;
        };
        let items = match &v {
            Value::Array(items) if !items.is_empty() => items.clone(),
            Value::Object(_) => vec![v.clone()],
            _ => return false,
        };
        if !items.iter().all(|i| self.parse_call(i).is_some()) {
            return false;
        }
        for item in &items {
            self.call_from_value(item, out);
        }
        true
    }

    /// `{name, arguments|parameters}` naming an offered tool.
    fn parse_call(&self, v: &Value) -> Option<(String, String)> {
        let name = v.get("name")?.as_str()?;
        if !self.plan.knows(name) {
            return None;
        }
        let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
            Some(Value::String(s)) => s.clone(),
            Some(a @ Value::Object(_)) => a.to_string(),
            None => "{}".to_string(),
            Some(_) => return None,
        };
        Some((name.to_string(), arguments))
    }

    fn call_from_value(&mut self, v: &Value, out: &mut Vec<ToolDelta>) -> bool {
        let Some((name, arguments)) = self.parse_call(v) else {
            return false;
        };
        if self.calls > 0 && !self.plan.parallel {
            return true; // Read, but only the first call is made.
        }
        let index = self.calls;
        self.calls += 1;
        self.pending_space.clear();
        out.push(ToolDelta::Call {
            index,
            id: Some(call_id()),
            name: Some(name),
            arguments: String::new(),
        });
        out.push(ToolDelta::Call {
            index,
            id: None,
            name: None,
            arguments,
        });
        true
    }
}

/// A whole answer's content (`None` when only whitespace) and calls
/// (`(id, name, arguments)`), from its deltas.
pub fn collect(deltas: &[ToolDelta]) -> (Option<String>, Vec<(String, String, String)>) {
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for d in deltas {
        match d {
            ToolDelta::Content(t) => content.push_str(t),
            ToolDelta::Call {
                index,
                id,
                name,
                arguments,
            } => {
                if *index >= calls.len() {
                    calls.push((
                        id.clone().unwrap_or_default(),
                        name.clone().unwrap_or_default(),
                        String::new(),
                    ));
                }
                if let Some(c) = calls.get_mut(*index) {
                    c.2.push_str(arguments);
                }
            }
        }
    }
    let content = (!content.trim().is_empty()).then_some(content);
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai_tools::Tool;
    use serde_json::json;

    fn plan(mode: ToolMode, parallel: bool) -> ToolPlan {
        let tool = |name: &str| Tool {
            name: name.into(),
            parameters: json!({"type": "object"}),
            definition: json!({"type": "function", "function": {"name": name}}),
        };
        ToolPlan {
            tools: vec![tool("get_weather"), tool("add")],
            mode,
            parallel,
        }
    }

    /// Feeds `pieces` one by one and gathers the answer.
    fn read(
        mode: ToolMode,
        parallel: bool,
        pieces: &[&str],
    ) -> (Option<String>, Vec<(String, String, String)>) {
        let mut s = ToolStream::new(plan(mode, parallel));
        let mut deltas = Vec::new();
        for p in pieces {
            deltas.extend(s.push(p));
        }
        deltas.extend(s.finish());
        collect(&deltas)
    }

    fn calls(c: &[(String, String, String)]) -> Vec<(&str, Value)> {
        c.iter()
            .map(|(id, name, args)| {
                assert!(id.starts_with("call_") && id.len() == 29, "{id}");
                (name.as_str(), serde_json::from_str(args).unwrap())
            })
            .collect()
    }

    #[test]
    fn hermes_blocks_become_calls_and_text_stays_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>\n";
        let (content, c) = read(ToolMode::Auto, true, &[text]);
        assert_eq!(content.as_deref(), Some("Let me check.\n"));
        assert_eq!(
            calls(&c),
            vec![
                ("get_weather", json!({"city": "Paris"})),
                ("add", json!({"a": 1}))
            ]
        );
    }

    #[test]
    fn tags_split_across_pieces_are_held_back() {
        let text = "Hi <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 2}}</tool_call> bye";
        // Every split point, one character at a time.
        let pieces: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let mut s = ToolStream::new(plan(ToolMode::Auto, true));
        let mut deltas = Vec::new();
        for p in &pieces {
            for d in s.push(p) {
                if let ToolDelta::Content(t) = &d {
                    assert!(!t.contains('<'), "a tag leaked into content: {t:?}");
                }
                deltas.push(d);
            }
        }
        deltas.extend(s.finish());
        let (content, c) = collect(&deltas);
        // The whitespace between text and a call is dropped, as vLLM does.
        assert_eq!(content.as_deref(), Some("Hi bye"));
        assert_eq!(calls(&c), vec![("add", json!({"a": 2}))]);
    }

    #[test]
    fn an_open_block_at_the_end_and_a_false_tag_read_right() {
        let (content, c) = read(
            ToolMode::Auto,
            true,
            &["<tool_call>{\"name\": \"add\", \"arguments\": {}}"],
        );
        assert_eq!(content, None);
        assert_eq!(calls(&c), vec![("add", json!({}))]);
        let (content, c) = read(ToolMode::Auto, true, &["a <tool", "_x> b"]);
        assert_eq!(content.as_deref(), Some("a <tool_x> b"));
        assert!(c.is_empty());
        // Not JSON, or an unknown tool: the block stays text.
        let (content, c) = read(
            ToolMode::Auto,
            true,
            &["<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>"],
        );
        assert!(content.unwrap().contains("rm"));
        assert!(c.is_empty());
    }

    #[test]
    fn bare_json_calls_and_plain_json_content() {
        let (content, c) = read(
            ToolMode::Auto,
            true,
            &[" {\"name\": \"add\", ", "\"parameters\": {\"a\": 1}}"],
        );
        assert_eq!(content, None);
        assert_eq!(calls(&c), vec![("add", json!({"a": 1}))]);
        let (content, c) = read(ToolMode::Auto, true, &["{\"city\": \"Paris\"}"]);
        assert_eq!(content.as_deref(), Some("{\"city\": \"Paris\"}"));
        assert!(c.is_empty());
    }

    #[test]
    fn only_the_first_call_without_parallel_calls() {
        let text = "<tool_call>{\"name\": \"add\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>";
        let (_, c) = read(ToolMode::Auto, false, &[text]);
        assert_eq!(calls(&c), vec![("add", json!({}))]);
        let (_, c) = read(ToolMode::Auto, true, &[text]);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn forced_calls() {
        let mut s = ToolStream::new(plan(ToolMode::Named("add".into()), true));
        let first = s.push("{\"a\":");
        assert!(
            matches!(&first[0], ToolDelta::Call { id: Some(_), name: Some(n), .. } if n == "add")
        );
        let mut deltas = first;
        deltas.extend(s.push(" 3}"));
        deltas.extend(s.finish());
        let (content, c) = collect(&deltas);
        assert_eq!(content, None);
        assert_eq!(calls(&c), vec![("add", json!({"a": 3}))]);

        let (content, c) = read(
            ToolMode::Required,
            true,
            &[
                "[{\"name\": \"add\", \"parameters\": {\"a\": 1}}, ",
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}]",
            ],
        );
        assert_eq!(content, None);
        assert_eq!(
            calls(&c),
            vec![
                ("add", json!({"a": 1})),
                ("get_weather", json!({"city": "Oslo"}))
            ]
        );
        // Streamed: the call goes out once its name is whole, then its
        // arguments piece by piece.
        let mut s = ToolStream::new(plan(ToolMode::Required, true));
        let text = "[ {\"name\": \"add\", \"parameters\": {\"a\": [1, {\"b\": \"}\\\"\"}]}} ,{\"name\":\"get_weather\",\"parameters\":{}}]";
        let mut deltas = Vec::new();
        let mut arg_pieces = 0;
        for ch in text.chars() {
            for d in s.push(&ch.to_string()) {
                if let ToolDelta::Call { id: None, .. } = d {
                    arg_pieces += 1;
                }
                deltas.push(d);
            }
        }
        deltas.extend(s.finish());
        assert!(arg_pieces > 10, "arguments came in {arg_pieces} pieces");
        let (content, c) = collect(&deltas);
        assert_eq!(content, None);
        assert_eq!(
            calls(&c),
            vec![
                ("add", json!({"a": [1, {"b": "}\""}]})),
                ("get_weather", json!({}))
            ]
        );
        // Cut short (max_tokens): what came stays content.
        let (content, c) = read(ToolMode::Required, true, &["[{\"name\": \"ad"]);
        assert_eq!(content.as_deref(), Some("[{\"name\": \"ad"));
        assert!(c.is_empty());
    }
}
