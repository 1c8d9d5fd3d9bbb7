//! Running a request through the gRPC service and answering it in OpenAI's
//! shape: a server-sent event stream, or one JSON body with every choice.

use super::*;
use crate::prepaid::Prepaid;

/// How to answer: streamed or not, a streamed answer ending with a usage
/// chunk or not, and the text each prompt's completions start with (`echo`).
pub(super) struct Output {
    pub(super) stream: bool,
    /// The usage a streamed answer reports.
    pub(super) usage: StreamUsage,
    /// Each prompt's text (completions' `echo`): first in `text`, or in the
    /// first streamed chunk; empty for none.
    pub(super) echo: Vec<String>,
    /// `n` and `best_of`, per prompt.
    pub(super) samples: Samples,
    /// Chat: the tools in play, whose calls the answer is read for.
    pub(super) tools: Option<ToolPlan>,
    /// Log probabilities name tokens `token_id:N` (vLLM's
    /// `return_tokens_as_token_ids`).
    pub(super) tokens_as_ids: bool,
    /// vLLM's `return_token_ids`: each prompt's token ids, returned with the
    /// choices' own.
    pub(super) prompt_ids: Option<Vec<Vec<u32>>>,
    /// Completions' `echo` with `logprobs`: the prompt's tokens lead each
    /// choice's log probabilities.
    pub(super) echo_logprobs: bool,
    /// Completions' `echo` with `max_tokens` 0: each choice is its prompt
    /// alone (the one token generated is left out, as vLLM does).
    pub(super) echo_only: bool,
}

/// Runs the requests (one per prompt of a completions batch; chat has one)
/// through the gRPC service at once and answers in OpenAI's shape, as `out`
/// says: prompt `p`'s choices are indexed `p · n ..`, as vLLM numbers a
/// batch's. An `X-Request-Id` header becomes the request's id (in logs on
/// every node; `-p` added for prompt `p` of a batch).
pub(super) async fn run(
    st: AppState,
    auth: Option<HeaderValue>,
    headers: &HeaderMap,
    requests: Vec<pb::GenerateRequest>,
    out: Output,
    kind: Kind,
) -> Result<Response, ApiError> {
    let samples = out.samples;
    let batch = requests.len() > 1;
    let logprobs = requests.first().is_some_and(|r| r.logprobs.is_some());
    // Each prompt's responses, keyed by prompt. The first prompt is admitted
    // before the answer starts, so its refusal is the answer's status (a
    // single prompt's, as before batches). A batch's other prompts are
    // admitted as their streams are first polled, beside the earlier ones'
    // tokens: awaiting every admission first could wait for ever on the
    // router's running limit, held by earlier prompts whose tokens nobody
    // reads yet. Their refusal ends the answer as any later error does.
    let mut prompts: StreamMap<usize, Responses> = StreamMap::new();
    for (p, mut request) in requests.into_iter().enumerate() {
        request.n = samples.best_of;
        if samples.ranks() {
            // Ranking needs each sampled token's log probability.
            request.logprobs = Some(request.logprobs.unwrap_or(0));
        }
        if batch && !request.request_id.is_empty() {
            request.request_id = format!("{}-{p}", request.request_id);
        }
        let mut request = grpc_call(request, auth.as_ref(), headers, batch.then_some(p));
        if p == 0 {
            prompts.insert(
                p,
                Box::pin(st.service.generate(request).await?.into_inner()),
            );
            continue;
        }
        // The first prompt's call counted the client's request.
        request.extensions_mut().insert(Prepaid::Request);
        let service = st.service.clone();
        let admitted = futures::stream::once(async move { service.generate(request).await });
        let responses = futures::StreamExt::flat_map(admitted, |r| match r {
            Ok(r) => futures::future::Either::Left(r.into_inner()),
            Err(status) => futures::future::Either::Right(futures::stream::iter([Err(status)])),
        });
        prompts.insert(p, Box::pin(responses));
    }
    let per_prompt = samples.best_of;
    let prompt_count = prompts.len();
    // One stream of every prompt's responses, each tagged with its choice index.
    let responses = prompts.map(move |(p, r)| {
        r.map(|mut m| {
            m.index += p as u32 * per_prompt;
            m
        })
    });
    respond(st, Box::pin(responses), prompt_count, logprobs, out, kind).await
}

/// Answers from `responses`, every prompt's (choice `i` answers prompt
/// `i / best_of`), in OpenAI's shape as `out` says; `logprobs`: whether the
/// requests asked for log probabilities.
pub(super) async fn respond(
    st: AppState,
    responses: Responses,
    prompt_count: usize,
    logprobs: bool,
    out: Output,
    kind: Kind,
) -> Result<Response, ApiError> {
    let Output {
        stream,
        usage,
        echo,
        samples,
        tools,
        tokens_as_ids,
        prompt_ids,
        echo_logprobs,
        echo_only,
    } = out;
    let logprobs_out = logprobs.then(|| LogprobsOut {
        model: st.model.clone(),
        as_ids: tokens_as_ids,
    });
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
    let per_prompt = samples.best_of;
    let tools = match (stream, tools) {
        (true, Some(plan)) => {
            let events =
                tool_sse_events(responses, plan, (usage, logprobs_out), (id, created, model));
            return Ok(Sse::new(events)
                .keep_alive(KeepAlive::default())
                .into_response());
        }
        (_, tools) => tools,
    };
    if stream {
        let events = sse_events(
            responses,
            kind,
            (usage, echo, per_prompt),
            (logprobs_out, prompt_ids, echo_logprobs, echo_only),
            id,
            created,
            model,
        );
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut answers: Vec<Choices> = (0..prompt_count)
        .map(|p| Choices::new(samples.best_of, echo.get(p).map(String::as_str)))
        .collect();
    let mut responses = responses;
    while let Some(msg) = responses.next().await {
        let msg = msg?;
        if let Some(event) = msg.event {
            let p = (msg.index / per_prompt) as usize;
            let answer = answers.get_mut(p).ok_or_else(|| {
                Status::internal(format!("a response for prompt {p}, which was not sent"))
            })?;
            answer.add(msg.index % per_prompt, event)?;
        }
    }
    let mut picked = Vec::new();
    let mut usage = pb::Usage::default();
    // Each prompt's log probabilities, when asked.
    let mut prompt_logprobs = Vec::new();
    for mut answer in answers {
        prompt_logprobs.push(answer.prompt_logprobs.take());
        let (choices, u) = answer.pick(samples)?;
        picked.extend(choices);
        add_usage(&mut usage, &u);
    }
    let names = LogprobsOut {
        model: st.model.clone(),
        as_ids: tokens_as_ids,
    };
    let mut tools = tools; // n > 1 is refused with tools: one choice reads them
    let choices: Vec<Value> = picked
        .into_iter()
        .enumerate()
        .map(|(index, (c, f))| {
            let p = index / samples.n.max(1) as usize;
            let prompt = prompt_logprobs.get(p).and_then(Option::as_ref);
            // With max_tokens 0 the generated token is left out.
            let generated: &[pb::TokenLogprobs] = if echo_only { &[] } else { &c.logprobs };
            let logprobs = logprobs_out.as_ref().map(|m| match (kind, echo_logprobs) {
                (Kind::Completion, true) => {
                    openai_logprobs::completion_after_prompt(m.names(), prompt, generated, 0)
                }
                _ => logprobs_json(m.names(), kind, generated, 0),
            });
            let text = match echo.get(p) {
                Some(prompt_text) if echo_only => prompt_text.clone(),
                _ => c.text,
            };
            let mut choice = match kind {
                Kind::Completion => {
                    let mut choice = json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(f.reason) });
                    // vLLM's prompt_logprobs: on each choice of its prompt.
                    if let Some(p) = prompt {
                        choice["prompt_logprobs"] = openai_logprobs::prompt(names.names(), p);
                    }
                    choice
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
            };
            choice["stop_reason"] = stop_reason(&f);
            // vLLM's return_token_ids: the choice's ids, and for completions
            // its prompt's (chat gives the prompt's once, beside the choices).
            if let Some(prompts) = &prompt_ids {
                choice["token_ids"] = json!(c.ids);
                if kind == Kind::Completion {
                    let p = index / samples.n.max(1) as usize;
                    choice["prompt_token_ids"] = json!(prompts.get(p));
                }
            }
            choice
        })
        .collect();
    let mut answer = json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_json(&usage),
    });
    if kind == Kind::Chat
        && let Some(prompts) = &prompt_ids
    {
        answer["prompt_token_ids"] = json!(prompts.first());
    }
    // Chat's prompt_logprobs: beside the choices (as vLLM).
    if kind == Kind::Chat
        && let Some(Some(p)) = prompt_logprobs.first()
    {
        answer["prompt_logprobs"] = openai_logprobs::prompt(names.names(), p);
    }
    Ok(Json(answer).into_response())
}

/// The client's `Authorization` header as gRPC metadata (none if absent or
/// not a valid metadata value, which the service then refuses as a missing key).
pub(super) fn authorization(
    auth: Option<&HeaderValue>,
) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    tonic::metadata::MetadataValue::try_from(auth?.as_bytes()).ok()
}

/// `request` as a call of the gRPC service, carrying the HTTP request's
/// `Authorization` (`auth`) and `X-Request-Id` (with `-p` added for prompt `p`
/// of a batch: `batch_prompt`).
pub(super) fn grpc_call(
    request: pb::GenerateRequest,
    auth: Option<&HeaderValue>,
    headers: &HeaderMap,
    batch_prompt: Option<usize>,
) -> tonic::Request<pb::GenerateRequest> {
    let mut call = tonic::Request::new(request);
    if let Some(v) = authorization(auth) {
        call.metadata_mut().insert("authorization", v);
    }
    if let Some(v) = headers.get(REQUEST_ID_HEADER) {
        let id = match (batch_prompt, v.to_str()) {
            (Some(p), Ok(id)) => format!("{id}-{p}"),
            _ => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        };
        if let Ok(v) = tonic::metadata::MetadataValue::try_from(id.as_str()) {
            call.metadata_mut().insert(REQUEST_ID_HEADER, v);
        }
    }
    call
}

/// One prompt's responses (or every prompt's, tagged by choice index).
pub(super) type Responses =
    std::pin::Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

/// A random id for an answer (`chatcmpl-..`, `resp_..`).
pub(super) fn rand_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(SystemTime::now())
}
