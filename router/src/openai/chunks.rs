//! The JSON pieces of an answer: the server-sent events of a streamed
//! completion (one chunk per token chunk, then usage and `[DONE]`), and the
//! `usage` and `logprobs` objects a streamed and a plain answer share.

use super::*;
use crate::openai_logprobs::TokenNames;

/// OpenAI's `usage` object; `prompt_tokens_details.cached_tokens` counts the
/// prompt tokens served from a prefix cache, as OpenAI and vLLM report them.
pub(super) fn usage_json(u: &pb::Usage) -> serde_json::Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

/// The usage a streamed answer reports (`stream_options`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum StreamUsage {
    /// None.
    #[default]
    Off,
    /// A last chunk with the whole answer's usage (`include_usage`).
    Final,
    /// That, and on every chunk its choice's usage so far: the prompt's
    /// tokens and the choice's completion tokens (vLLM's
    /// `continuous_usage_stats`).
    Continuous,
}

/// A choice's usage so far, as vLLM's continuous usage reports it.
pub(super) fn running_usage_json(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Adds `u`'s tokens (prompt, completion, cached) to `total`: the usage of
/// a batch of prompts is the sum of theirs.
pub(super) fn add_usage(total: &mut pb::Usage, u: &pb::Usage) {
    total.prompt_tokens += u.prompt_tokens;
    total.completion_tokens += u.completion_tokens;
    total.cached_tokens += u.cached_tokens;
}

/// Server-sent events for a streamed completion, ending with `data: [DONE]`.
/// Choice `i` answers prompt `i / per_prompt` (a completions batch; one
/// prompt otherwise); with `echo` texts, each choice's first chunk starts
/// with its prompt's. With several choices their chunks come interleaved,
/// each carrying its choice's `index` (and its own `finish_reason`); the
/// usage chunk counts each prompt once and every choice's completion tokens.
/// With [`StreamUsage::Continuous`] every chunk also carries its choice's
/// usage so far. With `echo_logprobs` (completions' `echo` with `logprobs`)
/// the prompt's tokens lead the log probabilities of each choice's first chunk;
/// with `echo_only` (`max_tokens` 0) the first chunk is the prompt alone.
pub(super) fn sse_events(
    responses: impl Stream<Item = Result<pb::GenerateResponse, Status>> + Send + Unpin + 'static,
    kind: Kind,
    (stream_usage, echo, per_prompt): (StreamUsage, Vec<String>, u32),
    (logprobs_out, prompt_ids, echo_logprobs, echo_only): (
        Option<LogprobsOut>,
        Option<Vec<Vec<u32>>>,
        bool,
        bool,
    ),
    id: String,
    created: u64,
    model: String,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let usage_chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |u: pb::Usage| {
            json!({ "id": id, "object": object, "created": created, "model": model, "choices": [],
                    "usage": usage_json(&u) })
        }
    };
    let chunk = move |index: u32,
                      text: Option<&str>,
                      logprobs: Value,
                      finish: Option<&str>,
                      first: bool| {
        let choice = match kind {
            Kind::Completion => {
                json!({ "index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish })
            }
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
            }
        };
        json!({ "id": id, "object": object, "created": created, "model": model, "choices": [choice] })
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut responses = responses;
        // Per choice index: whether its first chunk went out, and the
        // characters of its tokens so far (where its next `text_offset` starts).
        let mut started: HashMap<u32, usize> = HashMap::new();
        // Per prompt: its usage, the prompt once and its choices' tokens.
        let mut usage: BTreeMap<u32, pb::Usage> = BTreeMap::new();
        // Continuous usage: each prompt's tokens (from its first chunk) and
        // each choice's completion tokens so far.
        let mut prompt_tokens: HashMap<u32, u32> = HashMap::new();
        let mut completion: HashMap<u32, u32> = HashMap::new();
        // Per prompt: its log probabilities (echo with logprobs), come before its first token.
        let mut prompt_logprobs: HashMap<u32, pb::PromptLogprobs> = HashMap::new();
        let mut failed = false;
        while let Some(msg) = responses.next().await {
            let (index, event) = match msg {
                Ok(m) => (m.index, m.event),
                Err(status) => {
                    let e = ApiError::from(status);
                    let data = error_body(e.status, &e.message, e.param.as_deref());
                    let _ = tx.send(Event::default().data(data.to_string())).await;
                    // The request failed: no usage; dropping `responses`
                    // cancels the samples still running.
                    failed = true;
                    break;
                }
            };
            // A choice's first chunk starts with its echoed prompt.
            let prompt = index / per_prompt.max(1);
            if let Some(pb::generate_response::Event::PromptLogprobs(p)) = event {
                prompt_logprobs.insert(prompt, p);
                continue;
            }
            let first = !started.contains_key(&index);
            let offset = started.entry(index).or_insert(0);
            let echoed = if first {
                echo.get(prompt as usize).cloned()
            } else {
                None
            };
            // vLLM's return_token_ids: each chunk its tokens' ids.
            let ids = match (&event, &prompt_ids) {
                (Some(pb::generate_response::Event::Token(t)), Some(_)) => Some(t.ids.clone()),
                (Some(_), Some(_)) => Some(Vec::new()),
                _ => None,
            };
            let mut data = match event {
                Some(pb::generate_response::Event::Token(mut t)) => {
                    if echo_only {
                        // max_tokens 0: the generated token is left out.
                        t.text.clear();
                        t.logprobs.clear();
                    }
                    if t.prompt_tokens > 0 {
                        prompt_tokens.insert(prompt, t.prompt_tokens);
                    }
                    *completion.entry(index).or_insert(0) += t.ids.len() as u32;
                    let logprobs = match &logprobs_out {
                        Some(m) => {
                            let lead = prompt_logprobs
                                .get(&prompt)
                                .filter(|_| first && echo_logprobs);
                            let v = match lead {
                                Some(p) => {
                                    let v = openai_logprobs::completion_after_prompt(
                                        m.names(),
                                        Some(p),
                                        &t.logprobs,
                                        *offset,
                                    );
                                    *offset += openai_logprobs::prompt_chars(m.names(), p);
                                    v
                                }
                                None => logprobs_json(m.names(), kind, &t.logprobs, *offset),
                            };
                            *offset += openai_logprobs::token_chars(m.names(), &t.logprobs);
                            v
                        }
                        None => Value::Null,
                    };
                    let text = match echoed {
                        Some(prompt) => prompt + &t.text,
                        None => t.text,
                    };
                    chunk(index, Some(&text), logprobs, None, first)
                }
                Some(pb::generate_response::Event::Finished(f)) => {
                    let u = f.usage.unwrap_or_default();
                    prompt_tokens.insert(prompt, u.prompt_tokens);
                    completion.insert(index, u.completion_tokens);
                    match usage.get_mut(&prompt) {
                        None => {
                            usage.insert(prompt, u);
                        }
                        Some(sum) => {
                            // The prompt once; each choice's completion tokens;
                            // the prompt's first sample's cached tokens.
                            sum.completion_tokens += u.completion_tokens;
                            if index % per_prompt.max(1) == 0 {
                                sum.cached_tokens = u.cached_tokens;
                            }
                        }
                    }
                    let tail = echoed.unwrap_or_default();
                    let tail = (!tail.is_empty()).then_some(tail.as_str());
                    let mut data = chunk(
                        index,
                        tail,
                        Value::Null,
                        Some(finish_reason(f.reason)),
                        first,
                    );
                    data["choices"][0]["stop_reason"] = stop_reason(&f);
                    data
                }
                Some(pb::generate_response::Event::PromptLogprobs(_)) | None => continue,
            };
            if let (Some(ids), Some(prompts)) = (ids, &prompt_ids) {
                data["choices"][0]["token_ids"] = json!(ids);
                // The prompt's ids with a choice's first chunk: in the choice
                // for completions, beside the choices for chat (as vLLM).
                if first {
                    let p = json!(prompts.get(prompt as usize));
                    match kind {
                        Kind::Completion => data["choices"][0]["prompt_token_ids"] = p,
                        Kind::Chat => data["prompt_token_ids"] = p,
                    }
                }
            }
            if stream_usage == StreamUsage::Continuous {
                data["usage"] = running_usage_json(
                    prompt_tokens.get(&prompt).copied().unwrap_or(0),
                    completion.get(&index).copied().unwrap_or(0),
                );
            }
            if tx
                .send(Event::default().data(data.to_string()))
                .await
                .is_err()
            {
                return; // The client went away; dropping `responses` cancels the request.
            }
        }
        if stream_usage != StreamUsage::Off && !failed && !usage.is_empty() {
            let mut total = pb::Usage::default();
            usage.values().for_each(|u| add_usage(&mut total, u));
            let _ = tx
                .send(Event::default().data(usage_chunk(total).to_string()))
                .await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    ReceiverStream::new(rx).map(Ok)
}

/// What an answer's log probabilities are written with: the served model
/// (its tokenizer names the tokens) and whether tokens are named `token_id:N`
/// instead (vLLM's `return_tokens_as_token_ids`).
#[derive(Clone)]
pub(super) struct LogprobsOut {
    pub(super) model: Arc<ModelDir>,
    pub(super) as_ids: bool,
}

impl LogprobsOut {
    pub(super) fn names(&self) -> TokenNames<'_> {
        TokenNames {
            tokenizer: &self.model.tokenizer,
            as_ids: self.as_ids,
        }
    }
}

/// `entries` in the endpoint's shape (see [`openai_logprobs`]).
pub(super) fn logprobs_json(
    names: TokenNames<'_>,
    kind: Kind,
    entries: &[pb::TokenLogprobs],
    offset: usize,
) -> Value {
    match kind {
        Kind::Completion => openai_logprobs::completion(names, entries, offset),
        Kind::Chat => openai_logprobs::chat(names, entries),
    }
}
