//! OpenAI's Responses API, `POST /v1/responses`, as vLLM serves it for a model
//! without reasoning: `input` (a string, or messages whose content is text, and
//! a conversation's `function_call` / `function_call_output` items) and
//! `instructions` go through the chat template; the answer is an assistant
//! message of `output_text` and, with function `tools`, `function_call` items
//! (read out of the text as the chat API reads `tool_calls`, `tool_choice`
//! forcing them as it does there). It is returned whole or streamed as OpenAI's
//! typed events (`response.created` .. `response.output_text.delta` ..
//! `response.completed`); with tools in play the items are sent when the
//! answer is complete, since a call cannot be told from text before.
//! `max_output_tokens`, `temperature`, `top_p`, `text.format` (plain text,
//! `json_object`, `json_schema`: structured output) and vLLM's `cache_salt` are
//! honoured.
//!
//! Responses are not stored, as in vLLM by default (`store: true`, OpenAI's
//! default, is accepted and the answer says `"store": false`), so
//! `previous_response_id` and `background` are refused; so are hosted tools
//! (web search, files, ...), `reasoning`, an `include` other than
//! `message.output_text.logprobs` (the output tokens' log probabilities, with
//! `top_logprobs` alternatives each, as chat reports them) and log
//! probabilities together with tools (not supported yet), each by name. A
//! field in neither list is refused as unknown.

use super::*;

/// The request body's fields: every one OpenAI defines for a request, and
/// vLLM's `cache_salt`. Any other is HTTP 400 naming it.
const FIELDS: [&str; 25] = [
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "store",
    "metadata",
    "user",
    "text",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "previous_response_id",
    "background",
    "reasoning",
    "include",
    "truncation",
    "top_logprobs",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "stream_options",
    "cache_salt",
];

/// The `include` entry asking for the output text's log probabilities.
const LOGPROBS_INCLUDE: &str = "message.output_text.logprobs";

/// The request body (see [`FIELDS`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResponsesRequest {
    model: Option<String>,
    input: Value,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    #[serde(default)]
    stream: bool,
    /// Accepted; nothing is stored (vLLM's default).
    #[serde(rename = "store")]
    _store: Option<bool>,
    metadata: Option<Value>,
    user: Option<String>,
    text: Option<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    previous_response_id: Option<String>,
    background: Option<bool>,
    reasoning: Option<Value>,
    include: Option<Vec<Value>>,
    truncation: Option<String>,
    top_logprobs: Option<u32>,
    /// No effect on the output (as in vLLM).
    #[serde(rename = "service_tier")]
    _service_tier: Option<Value>,
    #[serde(rename = "prompt_cache_key")]
    _prompt_cache_key: Option<Value>,
    #[serde(rename = "safety_identifier")]
    _safety_identifier: Option<Value>,
    /// Streamed answers always end with the usage (in `response.completed`).
    #[serde(rename = "stream_options")]
    _stream_options: Option<Value>,
    /// vLLM's: as in the chat API.
    cache_salt: Option<String>,
}

impl ResponsesRequest {
    /// Refuses, by name, what is not served.
    fn check(&self) -> Result<(), ApiError> {
        let refuse = |field: &str, why: &str| Err(ApiError::bad_field(field, why.to_string()));
        if self.previous_response_id.is_some() {
            return refuse(
                "previous_response_id",
                "previous_response_id is not supported: responses are not stored (as in vLLM by default); send the conversation as input",
            );
        }
        if self.background == Some(true) {
            return refuse(
                "background",
                "background is not supported: responses are not stored",
            );
        }
        if self.reasoning.as_ref().is_some_and(|r| !r.is_null()) {
            return refuse(
                "reasoning",
                "reasoning is not supported: the served model does not reason",
            );
        }
        if let Some(other) = self
            .include
            .iter()
            .flatten()
            .find(|i| i.as_str() != Some(LOGPROBS_INCLUDE))
        {
            return Err(ApiError::bad_field(
                "include",
                format!("include {other} is not supported (only \"{LOGPROBS_INCLUDE}\")"),
            ));
        }
        if let Some(n) = self.top_logprobs
            && n as usize > MAX_TOP_LOGPROBS
        {
            return Err(ApiError::bad_field(
                "top_logprobs",
                format!(
                    "top_logprobs = {n}: at most {MAX_TOP_LOGPROBS} top log probabilities per token can be requested"
                ),
            ));
        }
        if let Some(t) = self.truncation.as_deref()
            && t != "disabled"
        {
            return refuse(
                "truncation",
                "truncation must be \"disabled\": a prompt longer than the context is an error",
            );
        }
        if self.max_output_tokens == Some(0) {
            return refuse("max_output_tokens", "max_output_tokens must be at least 1");
        }
        Ok(())
    }

    /// `instructions` and `input` as chat turns.
    fn turns(&self) -> Result<Vec<ChatTurn>, ApiError> {
        let turn = |role: &str, text: String| ChatTurn {
            role: role.into(),
            content: Some(text),
            tool_calls: None,
            tool_call_id: None,
        };
        let mut turns: Vec<ChatTurn> = self
            .instructions
            .iter()
            .map(|i| turn("system", i.clone()))
            .collect();
        match &self.input {
            Value::String(s) => turns.push(turn("user", s.clone())),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    match item.get("type").and_then(Value::as_str) {
                        Some("function_call") => {
                            let call = function_call(i, item)?;
                            // Calls after an assistant message (or after each
                            // other) are that message's `tool_calls`.
                            match turns.last_mut() {
                                Some(last) if last.role == "assistant" => {
                                    last.tool_calls.get_or_insert_with(Vec::new).push(call)
                                }
                                _ => turns.push(ChatTurn {
                                    role: "assistant".into(),
                                    content: None,
                                    tool_calls: Some(vec![call]),
                                    tool_call_id: None,
                                }),
                            }
                        }
                        Some("function_call_output") => {
                            let (call_id, output) = function_output(i, item)?;
                            turns.push(ChatTurn {
                                role: "tool".into(),
                                content: Some(output),
                                tool_calls: None,
                                tool_call_id: Some(call_id),
                            });
                        }
                        _ => {
                            let (role, text) = input_message(i, item)?;
                            turns.push(turn(role, text));
                        }
                    }
                }
            }
            _ => {
                return Err(ApiError::bad_field(
                    "input",
                    "input must be a string or a list of messages",
                ));
            }
        }
        if turns.iter().all(|t| t.role == "system") {
            return Err(ApiError::bad_field("input", "input holds no message"));
        }
        Ok(turns)
    }

    /// `tools`, `tool_choice` and `parallel_tool_calls` in the chat API's
    /// shape: a function tool's `name`, `description`, `parameters` and
    /// `strict` go under `function`, as does a named `tool_choice`'s name.
    fn chat_tools(&self) -> Result<openai_tools::ToolFields, ApiError> {
        let mut tools = Vec::new();
        for (i, t) in self.tools.iter().flatten().enumerate() {
            match t.get("type").and_then(Value::as_str) {
                Some("function") => {
                    let mut function = serde_json::Map::new();
                    for key in ["name", "description", "parameters", "strict"] {
                        if let Some(v) = t.get(key) {
                            function.insert(key.into(), v.clone());
                        }
                    }
                    tools.push(json!({ "type": "function", "function": function }));
                }
                other => {
                    return Err(ApiError::bad_field(
                        &format!("tools[{i}].type"),
                        format!("tools of type {other:?} are not supported (function tools only)"),
                    ));
                }
            }
        }
        let tool_choice = match &self.tool_choice {
            None => None,
            Some(Value::String(mode)) => Some(json!(mode)),
            Some(choice) => match (
                choice.get("type").and_then(Value::as_str),
                choice.get("name"),
            ) {
                (Some("function"), Some(name)) => {
                    Some(json!({ "type": "function", "function": { "name": name } }))
                }
                _ => {
                    return Err(ApiError::bad_field(
                        "tool_choice",
                        "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}",
                    ));
                }
            },
        };
        Ok(openai_tools::ToolFields {
            tools: (!tools.is_empty()).then_some(Value::Array(tools)),
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls.map(Value::Bool),
        })
    }

    /// How many top log probabilities each output token carries, when they are
    /// asked for: `include` naming `message.output_text.logprobs`, or
    /// `top_logprobs` above 0 (which would be pointless without them).
    fn logprobs(&self) -> Option<u32> {
        let included = self
            .include
            .iter()
            .flatten()
            .any(|i| i.as_str() == Some(LOGPROBS_INCLUDE));
        (included || self.top_logprobs.is_some_and(|n| n > 0))
            .then(|| self.top_logprobs.unwrap_or(0))
    }

    /// `text.format` as chat's `response_format` (`None`: plain text).
    fn response_format(&self) -> Result<Option<Value>, ApiError> {
        let Some(format) = self.text.as_ref().and_then(|t| t.get("format")) else {
            return Ok(None);
        };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
            Some("json_schema") => Ok(Some(json!({
                "type": "json_schema",
                "json_schema": {
                    "name": format.get("name").cloned().unwrap_or(json!("response")),
                    "schema": format.get("schema").cloned().unwrap_or(json!({})),
                    "strict": format.get("strict").cloned().unwrap_or(Value::Null),
                },
            }))),
            _ => Err(ApiError::bad_field(
                "text.format",
                "text.format.type must be \"text\", \"json_object\" or \"json_schema\"",
            )),
        }
    }
}

/// A string field of input item `i`, or HTTP 400 naming it.
fn item_field<'a>(i: usize, item: &'a Value, kind: &str, name: &str) -> Result<&'a str, ApiError> {
    item.get(name).and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_field(
            &format!("input[{i}].{name}"),
            format!("a {kind} item needs a string {name}"),
        )
    })
}

/// A `function_call` input item as a chat `tool_calls` entry.
fn function_call(i: usize, item: &Value) -> Result<Value, ApiError> {
    let field = |name| item_field(i, item, "function_call", name);
    Ok(json!({
        "id": field("call_id")?,
        "type": "function",
        "function": { "name": field("name")?, "arguments": field("arguments")? },
    }))
}

/// A `function_call_output` input item: its call's id and the output.
fn function_output(i: usize, item: &Value) -> Result<(String, String), ApiError> {
    let field = |name| item_field(i, item, "function_call_output", name);
    Ok((field("call_id")?.to_string(), field("output")?.to_string()))
}

/// One `input` item: a message (`type` absent or `"message"`) with a role and
/// text content (a string, or parts of type `input_text` / `output_text`).
fn input_message(i: usize, item: &Value) -> Result<(&'static str, String), ApiError> {
    let bad = |field: String, m: String| ApiError::bad_field(&field, m);
    if let Some(kind) = item.get("type").and_then(Value::as_str)
        && kind != "message"
    {
        return Err(bad(
            format!("input[{i}].type"),
            format!("input items of type {kind:?} are not supported yet (messages only)"),
        ));
    }
    let role = match item.get("role").and_then(Value::as_str) {
        Some("user") => "user",
        Some("assistant") => "assistant",
        Some("system" | "developer") => "system",
        other => {
            return Err(bad(
                format!("input[{i}].role"),
                format!(
                    "a message's role must be user, assistant, system or developer, got {other:?}"
                ),
            ));
        }
    };
    let text = match item.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("input_text" | "output_text" | "text"), Some(Value::String(t))) => {
                        texts.push(t.as_str())
                    }
                    (kind, _) => {
                        return Err(bad(
                            format!("input[{i}].content[{j}]"),
                            format!(
                                "content parts of type {kind:?} are not supported (the served model reads text only)"
                            ),
                        ));
                    }
                }
            }
            texts.join("\n")
        }
        _ => {
            return Err(bad(
                format!("input[{i}].content"),
                "a message's content must be a string or a list of text parts".into(),
            ));
        }
    };
    Ok((role, text))
}

/// `POST /v1/responses`.
pub(super) async fn responses(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let auth = authorization(&st, &headers)?;
    let Json(body) = body?;
    let Value::Object(fields) = &body else {
        return Err(ApiError::bad_request(
            "invalid request body: expected a JSON object",
        ));
    };
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad_field(
            unknown,
            format!("unknown field `{unknown}`: not a field of OpenAI's Responses API"),
        ));
    }
    let req: ResponsesRequest = typed_body(body)?;
    req.check()?;
    let turns = req.turns()?;
    openai_tools::check_messages(&turns)?;
    let plan = openai_tools::plan(&req.chat_tools()?, &st.model.tokenizer)?;
    let text = crate::openai_tools_prompt::render(
        &st.model.tokenizer,
        &turns,
        plan.as_ref(),
        &ChatOptions {
            add_generation_prompt: true,
            continue_final_message: false,
            documents: None,
            template_kwargs: None,
        },
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let ids = st
        .model
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let structured: openai_structured::StructuredFields =
        typed_body(json!({ "response_format": req.response_format()? }))?;
    let sampling = Sampling {
        model: req.model.clone(),
        max_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        cache_salt: req.cache_salt.clone(),
        structured,
        ..Default::default()
    };
    let mut request = to_request(
        pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids }),
        &sampling,
        Kind::Chat,
        &st.model,
    )?;
    request.logprobs = req.logprobs();
    if plan.is_some() && request.logprobs.is_some() {
        return Err(ApiError::bad_field(
            "include",
            "log probabilities together with tools on /v1/responses are not supported yet",
        ));
    }
    let names = request.logprobs.map(|_| LogprobsOut {
        model: st.model.clone(),
        as_ids: false,
    });
    // A required or named tool_choice constrains the output, as in the chat API.
    if let Some(forced) = plan.as_ref().and_then(ToolPlan::constraint) {
        if request.constraint.is_some() {
            return Err(ApiError::bad_field(
                "tool_choice",
                "a required or named tool_choice constrains the output already; \
                 it cannot be combined with text.format",
            ));
        }
        request.constraint = Some(forced);
    }
    let call = answer::grpc_call(request, auth.as_ref(), &headers, None);
    let responses = st.service.generate(call).await?.into_inner();
    let shell = Shell {
        id: format!("resp_{:x}", answer::rand_id()),
        item_id: format!("msg_{:x}", answer::rand_id()),
        created_at: now(),
        model: st.name.clone(),
        request: &req,
    };
    if req.stream {
        let events = stream_events(responses, shell.base(), shell.item_id.clone(), plan, names);
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut responses = responses;
    let (mut text, mut finished, mut entries) = (String::new(), None, Vec::new());
    while let Some(msg) = responses.next().await {
        match msg?.event {
            Some(pb::generate_response::Event::Token(t)) => {
                text.push_str(&t.text);
                entries.extend(t.logprobs);
            }
            Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
            Some(pb::generate_response::Event::PromptLogprobs(_)) | None => {}
        }
    }
    let finished = finished.ok_or_else(|| Status::internal("the answer ended without Finished"))?;
    let status = status_of(&finished);
    let logprobs = logprobs_json(names.as_ref(), &entries);
    let items = output_items(
        plan.as_ref(),
        &shell.item_id,
        (&text, logprobs),
        &finished,
        status,
    );
    Ok(Json(complete(shell.base(), items, &finished)).into_response())
}

/// What every form of the answer repeats.
struct Shell<'a> {
    id: String,
    item_id: String,
    created_at: u64,
    model: String,
    request: &'a ResponsesRequest,
}

impl Shell<'_> {
    /// The response object before any output: `status` in progress.
    fn base(&self) -> Value {
        let r = self.request;
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": "in_progress",
            "error": null,
            "incomplete_details": null,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "model": self.model,
            "output": [],
            "parallel_tool_calls": r.parallel_tool_calls.unwrap_or(true),
            "previous_response_id": null,
            "reasoning": null,
            "store": false,
            "temperature": r.temperature.unwrap_or(1.0),
            "text": r.text.clone().unwrap_or(json!({"format": {"type": "text"}})),
            "tool_choice": r.tool_choice.clone().unwrap_or(json!("auto")),
            "tools": r.tools.clone().unwrap_or_default(),
            "top_p": r.top_p.unwrap_or(1.0),
            "truncation": "disabled",
            "usage": null,
            "user": r.user,
            "metadata": r.metadata.clone().unwrap_or(json!({})),
        })
    }
}

/// The assistant message holding `text` and its tokens' `logprobs` (an array).
fn message(item_id: &str, text: &str, logprobs: Value, status: &str) -> Value {
    json!({
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{ "type": "output_text", "text": text, "annotations": [], "logprobs": logprobs }],
    })
}

/// Tokens' log probabilities in the Responses API's shape (the chat API's
/// `content` entries: token, logprob, bytes, top_logprobs); `[]` when none
/// were asked for.
fn logprobs_json(names: Option<&LogprobsOut>, entries: &[pb::TokenLogprobs]) -> Value {
    match names {
        Some(n) => openai_logprobs::chat(n.names(), entries)["content"].take(),
        None => json!([]),
    }
}

/// `incomplete` when the output was cut at `max_output_tokens`, else `completed`.
fn status_of(f: &pb::Finished) -> &'static str {
    if f.reason == pb::FinishReason::Length as i32 {
        "incomplete"
    } else {
        "completed"
    }
}

/// The answer's output items: the assistant message, and with tools in play
/// each call read out of `text` (as the chat API reads `tool_calls`) as a
/// `function_call` item, the message then only when text is left besides them.
fn output_items(
    plan: Option<&ToolPlan>,
    item_id: &str,
    (text, logprobs): (&str, Value),
    f: &pb::Finished,
    status: &str,
) -> Vec<Value> {
    let Some(plan) = plan else {
        return vec![message(item_id, text, logprobs, status)];
    };
    // No log probabilities with tools (refused before the request ran).
    let (msg, _) = tool_message(plan.clone(), text, f.reason);
    let mut items = Vec::new();
    if let Some(content) = msg["content"].as_str().filter(|c| !c.is_empty()) {
        items.push(message(item_id, content, json!([]), status));
    }
    for call in msg["tool_calls"].as_array().into_iter().flatten() {
        items.push(json!({
            "type": "function_call",
            "id": format!("fc_{:x}", answer::rand_id()),
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"],
            "status": "completed",
        }));
    }
    items
}

/// The finished response with its `items`: `completed`, or `incomplete` with
/// reason `max_output_tokens` when the output was cut at its limit.
fn complete(mut base: Value, items: Vec<Value>, f: &pb::Finished) -> Value {
    let status = status_of(f);
    let u = f.usage.unwrap_or_default();
    base["status"] = json!(status);
    if status == "incomplete" {
        base["incomplete_details"] = json!({ "reason": "max_output_tokens" });
    }
    base["output"] = Value::Array(items);
    base["usage"] = json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": { "cached_tokens": u.cached_tokens },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    });
    base
}

/// OpenAI's streamed events: the response created and in progress, then for
/// a plain answer its message and text part added, a delta per token chunk,
/// each of them done; with tools in play (`plan`) every item (message, function
/// calls) once the answer is complete, each added, filled in one delta and
/// done. Last the response `completed` (or `incomplete`); a failure ends the
/// stream with an `error` event.
fn stream_events(
    responses: impl Stream<Item = Result<pb::GenerateResponse, Status>> + Send + Unpin + 'static,
    base: Value,
    item_id: String,
    plan: Option<ToolPlan>,
    names: Option<LogprobsOut>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut responses = responses;
        let mut sequence = 0u64;
        let mut event = |mut data: Value| {
            data["sequence_number"] = json!(sequence);
            sequence += 1;
            let kind = data["type"].as_str().unwrap_or_default().to_string();
            Event::default().event(kind).data(data.to_string())
        };
        let incremental = plan.is_none();
        let mut out = vec![
            event(json!({ "type": "response.created", "response": base })),
            event(json!({ "type": "response.in_progress", "response": base })),
        ];
        if incremental {
            out.extend(item_events(
                &mut event,
                0,
                &message(&item_id, "", json!([]), "in_progress"),
                Part::Opening,
            ));
        }
        // The response is created and in progress before its first token.
        for e in out.drain(..) {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let (mut text, mut entries) = (String::new(), Vec::new());
        while let Some(msg) = responses.next().await {
            let finished = match msg {
                Ok(m) => match m.event {
                    Some(pb::generate_response::Event::Token(t)) => {
                        // A chunk whose text is held back (part of a character)
                        // still brings its tokens' log probabilities.
                        if incremental && (!t.text.is_empty() || !t.logprobs.is_empty()) {
                            let logprobs = logprobs_json(names.as_ref(), &t.logprobs);
                            out.push(event(json!({ "type": "response.output_text.delta",
                                "item_id": item_id, "output_index": 0, "content_index": 0,
                                "delta": t.text, "logprobs": logprobs })));
                        }
                        text.push_str(&t.text);
                        entries.extend(t.logprobs);
                        None
                    }
                    Some(pb::generate_response::Event::Finished(f)) => Some(f),
                    Some(pb::generate_response::Event::PromptLogprobs(_)) | None => None,
                },
                Err(status) => {
                    let e = ApiError::from(status);
                    out.push(event(
                        json!({ "type": "error", "code": e.status.as_u16().to_string(),
                                "message": e.message, "param": e.param }),
                    ));
                    for e in out.drain(..) {
                        let _ = tx.send(e).await;
                    }
                    return;
                }
            };
            if let Some(f) = finished {
                let status = status_of(&f);
                let logprobs = logprobs_json(names.as_ref(), &entries);
                let items = output_items(plan.as_ref(), &item_id, (&text, logprobs), &f, status);
                for (index, item) in items.iter().enumerate() {
                    let part = if incremental {
                        Part::Closing
                    } else {
                        Part::Whole
                    };
                    out.extend(item_events(&mut event, index, item, part));
                }
                let kind = if status == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                out.push(event(
                    json!({ "type": kind, "response": complete(base.clone(), items, &f) }),
                ));
            }
            for e in out.drain(..) {
                if tx.send(e).await.is_err() {
                    return; // The client went away; dropping `responses` cancels the request.
                }
            }
        }
    });
    ReceiverStream::new(rx).map(Ok)
}

/// Which of an item's events [`item_events`] writes.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    /// Added (its text to come as deltas).
    Opening,
    /// Done (its text came as deltas).
    Closing,
    /// Added, its whole text or arguments in one delta, done.
    Whole,
}

/// The events of output item `index` (a message or a function call).
fn item_events(
    event: &mut impl FnMut(Value) -> Event,
    index: usize,
    item: &Value,
    part: Part,
) -> Vec<Event> {
    let mut out = Vec::new();
    let id = &item["id"];
    let call = item["type"] == "function_call";
    if part != Part::Closing {
        let mut added = item.clone();
        added["status"] = json!("in_progress");
        if call {
            added["arguments"] = json!("");
        } else {
            added["content"] = json!([]);
        }
        out.push(event(
            json!({ "type": "response.output_item.added", "output_index": index, "item": added }),
        ));
    }
    if call {
        let arguments = &item["arguments"];
        out.push(event(
            json!({ "type": "response.function_call_arguments.delta", "item_id": id,
                               "output_index": index, "delta": arguments }),
        ));
        out.push(event(
            json!({ "type": "response.function_call_arguments.done", "item_id": id,
                               "output_index": index, "arguments": arguments }),
        ));
    } else {
        let text = &item["content"][0]["text"];
        let at = json!({ "item_id": id, "output_index": index, "content_index": 0 });
        let with = |kind: &str, extra: Value| {
            let mut e = at.clone();
            e["type"] = json!(kind);
            if let (Some(e), Value::Object(extra)) = (e.as_object_mut(), extra) {
                e.extend(extra);
            }
            e
        };
        if part != Part::Closing {
            out.push(event(with(
                "response.content_part.added",
                json!({ "part": { "type": "output_text", "text": "", "annotations": [] } }),
            )));
        }
        if part == Part::Whole {
            out.push(event(with(
                "response.output_text.delta",
                json!({ "delta": text, "logprobs": item["content"][0]["logprobs"] }),
            )));
        }
        if part != Part::Opening {
            out.push(event(with(
                "response.output_text.done",
                json!({ "text": text, "logprobs": item["content"][0]["logprobs"] }),
            )));
            out.push(event(with(
                "response.content_part.done",
                json!({ "part": { "type": "output_text", "text": text, "annotations": [] } }),
            )));
        }
    }
    if part != Part::Opening {
        out.push(event(
            json!({ "type": "response.output_item.done", "output_index": index, "item": item }),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn input_becomes_chat_turns_and_other_items_are_refused_by_name() {
        let r = request(json!({
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "No lists."},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "c"}]},
            ],
        }));
        let turns = r.turns().unwrap();
        let got: Vec<(&str, &str)> = turns
            .iter()
            .map(|t| (t.role.as_str(), t.content.as_deref().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("system", "Be brief."),
                ("system", "No lists."),
                ("user", "a\nb"),
                ("assistant", "c")
            ]
        );
        let param = |body: Value| request(body).turns().err().and_then(|e| e.param);
        assert_eq!(
            param(json!({"input": [{"type": "reasoning", "summary": []}]})).as_deref(),
            Some("input[0].type")
        );
        assert_eq!(
            param(json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}))
                .as_deref(),
            Some("input[0].content[0]")
        );
        assert_eq!(param(json!({"input": 3})).as_deref(), Some("input"));
        assert_eq!(
            param(json!({"input": [], "instructions": "x"})).as_deref(),
            Some("input")
        );
    }

    #[test]
    fn what_is_not_served_is_refused_by_name() {
        let param = |body: Value| request(body).check().err().and_then(|e| e.param);
        for (body, field) in [
            (
                json!({"input": "x", "previous_response_id": "r"}),
                "previous_response_id",
            ),
            (json!({"input": "x", "background": true}), "background"),
            (
                json!({"input": "x", "reasoning": {"effort": "low"}}),
                "reasoning",
            ),
            (
                json!({"input": "x", "include": ["file_search_call.results"]}),
                "include",
            ),
            (json!({"input": "x", "top_logprobs": 21}), "top_logprobs"),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
            ),
        ] {
            assert_eq!(param(body).as_deref(), Some(field));
        }
        // Log probabilities: asked by `include` (top_logprobs alternatives each) or
        // by top_logprobs alone.
        let asked = |body: Value| request(body).logprobs();
        assert_eq!(asked(json!({"input": "x"})), None);
        assert_eq!(asked(json!({"input": "x", "top_logprobs": 0})), None);
        assert_eq!(
            asked(json!({"input": "x", "include": ["message.output_text.logprobs"]})),
            Some(0)
        );
        assert_eq!(asked(json!({"input": "x", "top_logprobs": 3})), Some(3));
        // Neutral values pass.
        assert!(
            request(
                json!({"input": "x", "tools": [], "tool_choice": "auto", "store": true,
                               "background": false, "reasoning": null, "truncation": "disabled"})
            )
            .check()
            .is_ok()
        );
        let format =
            |f: Value| request(json!({"input": "x", "text": {"format": f}})).response_format();
        assert_eq!(format(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            format(json!({"type": "json_schema", "name": "n", "schema": {"type": "string"}}))
                .unwrap()
                .unwrap()["json_schema"]["schema"],
            json!({"type": "string"})
        );
        assert!(format(json!({"type": "xml"})).is_err());
    }

    #[test]
    fn function_tools_take_the_chat_shape_and_hosted_tools_are_refused() {
        let r = request(json!({
            "input": "x",
            "tools": [{"type": "function", "name": "f", "description": "d",
                       "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "f"},
            "parallel_tool_calls": false,
        }));
        let t = r.chat_tools().unwrap();
        assert_eq!(
            t.tools.unwrap(),
            json!([{"type": "function", "function": {"name": "f", "description": "d",
                    "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(
            t.tool_choice.unwrap(),
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(t.parallel_tool_calls, Some(json!(false)));
        let param = |body: Value| request(body).chat_tools().err().and_then(|e| e.param);
        assert_eq!(
            param(json!({"input": "x", "tools": [{"type": "web_search"}]})).as_deref(),
            Some("tools[0].type")
        );
        assert_eq!(
            param(json!({"input": "x", "tool_choice": {"type": "file_search"}})).as_deref(),
            Some("tool_choice")
        );
        // A conversation's calls and their outputs become the chat's turns.
        let turns = request(json!({"input": [
            {"role": "user", "content": "q"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"a\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
        ]}))
        .turns()
        .unwrap();
        assert_eq!(turns[1].role, "assistant");
        assert_eq!(turns[1].tool_calls.as_ref().unwrap().len(), 2);
        assert_eq!(
            turns[1].tool_calls.as_ref().unwrap()[1]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(
            (
                turns[2].role.as_str(),
                turns[2].content.as_deref(),
                turns[2].tool_call_id.as_deref()
            ),
            ("tool", Some("one"), Some("c1"))
        );
        let bad = request(json!({"input": [{"type": "function_call", "name": "f"}]})).turns();
        assert_eq!(
            bad.err().and_then(|e| e.param).as_deref(),
            Some("input[0].call_id")
        );
    }
}
