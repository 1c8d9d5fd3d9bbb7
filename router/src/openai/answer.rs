//! Running a request through the gRPC service and answering it in OpenAI's
//! shape: a server-sent event stream, or one JSON body with every choice.

use super::*;

/// How to answer: streamed or not, a streamed answer ending with a usage
/// chunk or not, and the text the completion starts with (`echo`).
pub(super) struct Output {
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// The prompt's text (completions' `echo`): first in `text`, or in the
    /// first streamed chunk.
    pub(super) echo: Option<String>,
    /// `n` and `best_of`.
    pub(super) samples: Samples,
    /// Chat: the tools in play, whose calls the answer is read for.
    pub(super) tools: Option<ToolPlan>,
}

/// Runs the request through the gRPC service and answers in OpenAI's shape,
/// as `out` says. An `X-Request-Id` header becomes the request's id (in logs
/// on every node).
pub(super) async fn run(
    st: AppState,
    auth: Option<HeaderValue>,
    headers: &HeaderMap,
    request: pb::GenerateRequest,
    out: Output,
    kind: Kind,
) -> Result<Response, ApiError> {
    let Output {
        stream,
        include_usage,
        echo,
        samples,
        tools,
    } = out;
    let request_logprobs = request.logprobs;
    let mut request = request;
    request.n = samples.best_of;
    if samples.ranks() {
        // Ranking needs each sampled token's log probability.
        request.logprobs = Some(request_logprobs.unwrap_or(0));
    }
    let mut request = tonic::Request::new(request);
    if let Some(v) = auth
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
    {
        request.metadata_mut().insert("authorization", v);
    }
    if let Some(v) = headers.get(REQUEST_ID_HEADER)
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
    {
        request.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
    let responses = st.service.generate(request).await?.into_inner();
    let id = format!(
        "{}-{:x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        rand_id()
    );
    let (created, model) = (now(), st.name.clone());
    let with_logprobs = request_logprobs.is_some();
    let tools = match (stream, tools) {
        (true, Some(plan)) => {
            let logprobs_model = with_logprobs.then(|| st.model.clone());
            let events = tool_sse_events(
                responses,
                plan,
                (include_usage, logprobs_model),
                (id, created, model),
            );
            return Ok(Sse::new(events)
                .keep_alive(KeepAlive::default())
                .into_response());
        }
        (_, tools) => tools,
    };
    if stream {
        let tokenizer = with_logprobs.then(|| st.model.clone());
        let events = sse_events(
            responses,
            kind,
            (include_usage, echo),
            tokenizer,
            id,
            created,
            model,
        );
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut answers = Choices::new(samples.best_of, echo.as_deref());
    let mut responses = responses;
    while let Some(msg) = responses.next().await {
        let msg = msg?;
        if let Some(event) = msg.event {
            answers.add(msg.index, event)?;
        }
    }
    let (picked, usage) = answers.pick(samples)?;
    let mut tools = tools; // n > 1 is refused with tools: one choice reads them
    let choices: Vec<Value> = picked
        .into_iter()
        .enumerate()
        .map(|(index, (c, f))| {
            let logprobs =
                with_logprobs.then(|| logprobs_json(&st.model.tokenizer, kind, &c.logprobs, 0));
            let text = c.text;
            match kind {
                Kind::Completion => {
                    json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(f.reason) })
                }
                Kind::Chat => {
                    let (message, reason) = match tools.take() {
                        Some(plan) => tool_message(plan, &text, f.reason),
                        None => (
                            json!({ "role": "assistant", "content": text }),
                            finish_reason(f.reason),
                        ),
                    };
                    json!({ "index": index, "message": message, "logprobs": logprobs, "finish_reason": reason })
                }
            }
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_json(&usage),
    }))
    .into_response())
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(SystemTime::now())
}
