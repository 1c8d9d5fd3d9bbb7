//! OpenAI's Responses API, `POST /v1/responses`, as vLLM serves it for a model
//! without tools or reasoning: `input` (a string, or messages whose content is
//! text) and `instructions` go through the chat template, the answer is one
//! assistant message of `output_text`, streamed as OpenAI's typed events
//! (`response.created` .. `response.output_text.delta` .. `response.completed`)
//! or returned whole. `max_output_tokens`, `temperature`, `top_p` and
//! `text.format` (plain text, `json_object`, `json_schema`: structured output)
//! are honoured.
//!
//! Responses are not stored, as in vLLM by default (`store: true`, OpenAI's
//! default, is accepted and the answer says `"store": false`), so
//! `previous_response_id` and `background` are refused; so are `tools`,
//! `reasoning`, `include` and `top_logprobs` (not supported yet), each by name.
//! A field in neither list is refused as unknown.

use super::*;

/// The request body's fields: every one OpenAI defines for a request. Any
/// other is HTTP 400 naming it.
const FIELDS: [&str; 24] = [
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
];

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
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return refuse(
                "tools",
                "tools on /v1/responses are not supported yet (use /v1/chat/completions)",
            );
        }
        if let Some(choice) = &self.tool_choice
            && !matches!(choice.as_str(), Some("none" | "auto"))
        {
            return refuse(
                "tool_choice",
                "tool_choice needs tools, which /v1/responses does not support yet",
            );
        }
        if self.reasoning.as_ref().is_some_and(|r| !r.is_null()) {
            return refuse(
                "reasoning",
                "reasoning is not supported: the served model does not reason",
            );
        }
        if self.include.as_ref().is_some_and(|i| !i.is_empty()) {
            return refuse("include", "include is not supported yet");
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return refuse(
                "top_logprobs",
                "top_logprobs on /v1/responses is not supported yet",
            );
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
                    let (role, text) = input_message(i, item)?;
                    turns.push(turn(role, text));
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
    let text = crate::openai_tools_prompt::render(
        &st.model.tokenizer,
        &turns,
        None,
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
        structured,
        ..Default::default()
    };
    let request = to_request(
        pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids }),
        &sampling,
        Kind::Chat,
        &st.model,
    )?;
    let mut call = tonic::Request::new(request);
    if let Some(v) = &auth
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
    {
        call.metadata_mut().insert("authorization", v);
    }
    if let Some(v) = headers.get(REQUEST_ID_HEADER)
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
    {
        call.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
    let responses = st.service.generate(call).await?.into_inner();
    let shell = Shell {
        id: format!("resp_{:x}", answer::rand_id()),
        item_id: format!("msg_{:x}", answer::rand_id()),
        created_at: now(),
        model: st.name.clone(),
        request: &req,
    };
    if req.stream {
        let events = stream_events(responses, shell.base(), shell.item_id.clone());
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut responses = responses;
    let (mut text, mut finished) = (String::new(), None);
    while let Some(msg) = responses.next().await {
        match msg?.event {
            Some(pb::generate_response::Event::Token(t)) => text.push_str(&t.text),
            Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
            Some(pb::generate_response::Event::PromptLogprobs(_)) | None => {}
        }
    }
    let finished = finished.ok_or_else(|| Status::internal("the answer ended without Finished"))?;
    Ok(Json(complete(shell.base(), &shell.item_id, &text, &finished)).into_response())
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
            "tools": [],
            "top_p": r.top_p.unwrap_or(1.0),
            "truncation": "disabled",
            "usage": null,
            "user": r.user,
            "metadata": r.metadata.clone().unwrap_or(json!({})),
        })
    }
}

/// The assistant message holding `text`.
fn message(item_id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{ "type": "output_text", "text": text, "annotations": [], "logprobs": [] }],
    })
}

/// The finished response: `completed`, or `incomplete` with reason
/// `max_output_tokens` when the output was cut at its limit.
fn complete(mut base: Value, item_id: &str, text: &str, f: &pb::Finished) -> Value {
    let cut = f.reason == pb::FinishReason::Length as i32;
    let status = if cut { "incomplete" } else { "completed" };
    let u = f.usage.unwrap_or_default();
    base["status"] = json!(status);
    if cut {
        base["incomplete_details"] = json!({ "reason": "max_output_tokens" });
    }
    base["output"] = json!([message(item_id, text, status)]);
    base["usage"] = json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": { "cached_tokens": u.cached_tokens },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    });
    base
}

/// OpenAI's streamed events for one message: the response created and in
/// progress, the message and its text part added, a delta per token chunk,
/// then each of them done and the response `completed` (or `incomplete`);
/// a failure ends the stream with an `error` event.
fn stream_events(
    responses: impl Stream<Item = Result<pb::GenerateResponse, Status>> + Send + Unpin + 'static,
    base: Value,
    item_id: String,
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
        let mut out = vec![
            event(json!({ "type": "response.created", "response": base })),
            event(json!({ "type": "response.in_progress", "response": base })),
            event(
                json!({ "type": "response.output_item.added", "output_index": 0,
                          "item": { "type": "message", "id": item_id, "status": "in_progress",
                                    "role": "assistant", "content": [] } }),
            ),
            event(
                json!({ "type": "response.content_part.added", "item_id": item_id,
                          "output_index": 0, "content_index": 0,
                          "part": { "type": "output_text", "text": "", "annotations": [] } }),
            ),
        ];
        // The response is created and in progress before its first token.
        for e in out.drain(..) {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let mut text = String::new();
        while let Some(msg) = responses.next().await {
            let finished = match msg {
                Ok(m) => match m.event {
                    Some(pb::generate_response::Event::Token(t)) => {
                        if !t.text.is_empty() {
                            text.push_str(&t.text);
                            out.push(event(json!({ "type": "response.output_text.delta",
                                "item_id": item_id, "output_index": 0, "content_index": 0,
                                "delta": t.text, "logprobs": [] })));
                        }
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
                let done = complete(base.clone(), &item_id, &text, &f);
                let status = done["status"].as_str().unwrap_or("completed").to_string();
                let part = json!({ "type": "output_text", "text": text, "annotations": [] });
                out.push(event(
                    json!({ "type": "response.output_text.done", "item_id": item_id,
                    "output_index": 0, "content_index": 0, "text": text, "logprobs": [] }),
                ));
                out.push(event(
                    json!({ "type": "response.content_part.done", "item_id": item_id,
                    "output_index": 0, "content_index": 0, "part": part }),
                ));
                out.push(event(
                    json!({ "type": "response.output_item.done", "output_index": 0,
                    "item": message(&item_id, &text, &status) }),
                ));
                let kind = if status == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                out.push(event(json!({ "type": kind, "response": done })));
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
            param(
                json!({"input": [{"type": "function_call_output", "call_id": "x", "output": "1"}]})
            )
            .as_deref(),
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
                json!({"input": "x", "tools": [{"type": "function"}]}),
                "tools",
            ),
            (
                json!({"input": "x", "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"input": "x", "reasoning": {"effort": "low"}}),
                "reasoning",
            ),
            (
                json!({"input": "x", "include": ["message.output_text.logprobs"]}),
                "include",
            ),
            (json!({"input": "x", "top_logprobs": 2}), "top_logprobs"),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
            ),
        ] {
            assert_eq!(param(body).as_deref(), Some(field));
        }
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
}
