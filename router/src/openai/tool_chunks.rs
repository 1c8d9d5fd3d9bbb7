//! The answer of a chat request with tools in play: `tool_calls` in the
//! message (content `null` when there is none besides the calls) and
//! `finish_reason: "tool_calls"`, or, streamed, OpenAI's deltas: a call's
//! first delta carries its `index`, `id`, `type` and `function.name`, later
//! ones `function.arguments` pieces. The reading of calls out of the text is
//! [`ToolStream`]'s.

use super::*;
use crate::openai_tools::ToolPlan;
use crate::openai_tools_stream::{ToolDelta, ToolStream, collect};

/// `"tool_calls"` when calls were made and the generation ended on its own;
/// otherwise the generation's own reason (`length` keeps saying it was cut).
fn tool_finish_reason(calls: usize, reason: i32) -> &'static str {
    match finish_reason(reason) {
        "stop" if calls > 0 => "tool_calls",
        other => other,
    }
}

/// The assistant message and finish reason of a whole answer `text`.
pub(super) fn tool_message(plan: ToolPlan, text: &str, reason: i32) -> (Value, &'static str) {
    let mut reader = ToolStream::new(plan);
    let mut deltas = reader.push(text);
    deltas.extend(reader.finish());
    let (content, calls) = collect(&deltas);
    let mut message = json!({ "role": "assistant", "content": content });
    if !calls.is_empty() {
        message["tool_calls"] = calls
            .iter()
            .map(|(id, name, arguments)| {
                json!({ "id": id, "type": "function",
                        "function": { "name": name, "arguments": arguments } })
            })
            .collect();
    }
    (message, tool_finish_reason(calls.len(), reason))
}

/// One delta in OpenAI's chunk shape.
fn delta_json(d: ToolDelta) -> Value {
    match d {
        ToolDelta::Content(t) => json!({ "content": t }),
        ToolDelta::Call {
            index,
            id,
            name,
            arguments,
        } => {
            let mut call = json!({ "index": index, "function": { "arguments": arguments } });
            if let Some(id) = id {
                call["id"] = json!(id);
                call["type"] = json!("function");
            }
            if let Some(name) = name {
                call["function"]["name"] = json!(name);
            }
            json!({ "tool_calls": [call] })
        }
    }
}

/// Server-sent events of a streamed chat answer read for tool calls, ending
/// with `data: [DONE]` (and a usage chunk before it when asked).
///
/// With `logprobs_out`, each token's log probabilities ride on the first
/// chunk sent after it (a token whose text the reader holds back, a possible
/// start of a `<tool_call>` tag, has its entries carried to the next chunk),
/// so every token's entry is sent once and in order.
pub(super) fn tool_sse_events(
    responses: impl Stream<Item = Result<pb::GenerateResponse, Status>> + Send + Unpin + 'static,
    plan: ToolPlan,
    (stream_usage, logprobs_out): (StreamUsage, Option<LogprobsOut>),
    (id, created, model): (String, u64, String),
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (usage_id, usage_model) = (id.clone(), model.clone());
    // Entries not sent yet: taken by the next chunk.
    let mut pending: Vec<pb::TokenLogprobs> = Vec::new();
    let chunk = move |mut delta: Value,
                      finish: Option<&str>,
                      first: bool,
                      pending: &mut Vec<pb::TokenLogprobs>| {
        if first {
            delta["role"] = json!("assistant");
        }
        let logprobs = match &logprobs_out {
            Some(m) if !pending.is_empty() => {
                logprobs_json(m.names(), Kind::Chat, &std::mem::take(pending), 0)
            }
            Some(_) => json!({ "content": [] }),
            None => Value::Null,
        };
        json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish }] })
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut responses = responses;
        let mut reader = ToolStream::new(plan);
        let mut first = true;
        let mut usage = None;
        // Continuous usage: the prompt's tokens and the completion's so far.
        let (mut prompt_tokens, mut completion) = (0u32, 0u32);
        while let Some(msg) = responses.next().await {
            let mut data: Vec<Value> = match msg.map(|m| m.event) {
                Ok(Some(pb::generate_response::Event::Token(t))) => {
                    if t.prompt_tokens > 0 {
                        prompt_tokens = t.prompt_tokens;
                    }
                    completion += t.ids.len() as u32;
                    pending.extend(t.logprobs);
                    reader
                        .push(&t.text)
                        .into_iter()
                        .map(|d| {
                            chunk(
                                delta_json(d),
                                None,
                                std::mem::take(&mut first),
                                &mut pending,
                            )
                        })
                        .collect()
                }
                Ok(Some(pb::generate_response::Event::Finished(f))) => {
                    if let Some(u) = &f.usage {
                        (prompt_tokens, completion) = (u.prompt_tokens, u.completion_tokens);
                    }
                    usage = f.usage;
                    let mut out: Vec<Value> = reader
                        .finish()
                        .into_iter()
                        .map(|d| {
                            chunk(
                                delta_json(d),
                                None,
                                std::mem::take(&mut first),
                                &mut pending,
                            )
                        })
                        .collect();
                    let reason = tool_finish_reason(reader.calls(), f.reason);
                    let mut last = chunk(
                        json!({}),
                        Some(reason),
                        std::mem::take(&mut first),
                        &mut pending,
                    );
                    last["choices"][0]["stop_reason"] = stop_reason(&f);
                    out.push(last);
                    out
                }
                // Streamed chat never asks for the prompt's log probabilities.
                Ok(Some(pb::generate_response::Event::PromptLogprobs(_)) | None) => continue,
                Err(status) => {
                    let e = ApiError::from(status);
                    vec![error_body(e.status, &e.message, e.param.as_deref())]
                }
            };
            if stream_usage == StreamUsage::Continuous {
                for d in data.iter_mut().filter(|d| d.get("choices").is_some()) {
                    d["usage"] = running_usage_json(prompt_tokens, completion);
                }
            }
            for d in data {
                if tx.send(Event::default().data(d.to_string())).await.is_err() {
                    return; // The client went away; dropping `responses` cancels the request.
                }
            }
        }
        if stream_usage != StreamUsage::Off
            && let Some(u) = usage
        {
            let usage = json!({ "id": usage_id, "object": "chat.completion.chunk", "created": created,
                                "model": usage_model, "choices": [], "usage": usage_json(&u) });
            let _ = tx.send(Event::default().data(usage.to_string())).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    ReceiverStream::new(rx).map(Ok)
}
