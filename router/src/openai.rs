//! The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions`
//! (with `stream: true` as server-sent events, and without), `/v1/models` and
//! `/v1/models/{model}`, `/health`, and vLLM's `/tokenize`, `/detokenize`,
//! `/version`, `/ping` (as `/health`) and `/metrics` (the process's Prometheus
//! metrics).
//!
//! It is a thin translation in front of the same [`GenerateService`] the gRPC
//! API uses, called in-process: requests become `GenerateRequest`s, token
//! chunks become completion chunks, and every error comes back in OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` shape with the HTTP status
//! matching the gRPC code. Unknown routes and methods get that shape too.
//!
//! Nothing a client sends is silently ignored: [`crate::openai_fields`] lists
//! every field of OpenAI's request schemas (and vLLM's extensions) and refuses,
//! with HTTP 400 naming it, any field or value Tandem does not honour.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tandem_cluster::convert::checked_sampling_from_pb;
use tandem_engine::{ChatOptions, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, ModelDir};
use tandem_proto::v1 as pb;
use tandem_proto::v1::generate_server::Generate;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tonic::{Code, Status};

use crate::error::RETRY_AFTER;
use crate::openai_fields::{self, Endpoint};
use crate::openai_tools::{self, ChatTurn, ToolFields, ToolPlan};
use crate::service::{GenerateService, REQUEST_ID_HEADER};
use crate::{openai_logprobs, openai_structured};

mod error;
use error::{ApiError, error_body};

mod chunks;
use chunks::{
    LogprobsOut, StreamUsage, add_usage, logprobs_json, running_usage_json, sse_events, usage_json,
};

mod choices;
mod prompts;
use choices::{Choices, Samples};
use prompts::{Prompts, completion_prompts, kept_prompt_tokens, last_tokens};
mod tool_chunks;
use tool_chunks::{tool_message, tool_sse_events};

mod answer;
use answer::{Output, run};
mod beam;
use beam::BeamSearch;

mod responses;
mod tokenize;

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    service: Arc<GenerateService>,
    model: Arc<ModelDir>,
    name: String,
}

/// `GET /health` (and vLLM's `GET`/`POST /ping`): 200 once the router has
/// read the membership, 503 (with a `Retry-After`) before.
async fn health(State(st): State<AppState>) -> Response {
    if st.service.is_ready() {
        "ok".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            "not ready: the cluster's membership is not read yet",
        )
            .into_response()
    }
}

/// `GET /metrics` on the API's port too, as vLLM serves it: the process's
/// Prometheus metrics (the same as `[metrics] listen` serves), or 404 when
/// the process records none. Like `/health`, it needs no API key.
async fn prometheus() -> Response {
    match tandem_telemetry::render() {
        Some(text) => {
            ([(header::CONTENT_TYPE, tandem_telemetry::EXPOSITION)], text).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            "this process records no metrics: set [metrics] listen to turn them on",
        )
            .into_response(),
    }
}

/// The HTTP routes over `service`, serving `model` under `name`.
pub fn app(service: Arc<GenerateService>, model: Arc<ModelDir>, name: String) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/metrics", get(prometheus))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model_info))
        .route("/version", get(version))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(responses::responses))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState {
            service,
            model,
            name,
        })
}

/// 404 in OpenAI's shape, for a path with no route.
async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {method} {}", uri.path()),
        param: None,
        retry_after: None,
    }
}

/// 405 in OpenAI's shape, for a known path asked with the wrong method.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("method {method} is not allowed on {}", uri.path()),
        param: None,
        retry_after: None,
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
    /// Any other shape, refused with a message naming the accepted ones.
    Other(serde_json::Value),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopInput {
    One(String),
    Many(Vec<String>),
}

/// `logprobs`: a count on `/v1/completions`, a switch on `/v1/chat/completions`.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum LogprobsInput {
    Switch(bool),
    Count(u32),
}

/// Fields both endpoints share (OpenAI's names, plus vLLM's extensions).
/// Fields absent here are either without effect or refused unless neutral:
/// see [`openai_fields`].
#[derive(Deserialize, Default)]
struct Sampling {
    /// vLLM's: the request's id (in logs on every node), like `X-Request-Id`.
    request_id: Option<String>,
    /// Choices to return (parallel samples of the prompt).
    n: Option<u32>,
    model: Option<String>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    /// Any 64-bit integer, signed or not (vLLM's range); -1 is none, as in vLLM.
    #[serde(default, deserialize_with = "seed")]
    seed: Option<u64>,
    stop: Option<StopInput>,
    #[serde(default, deserialize_with = "null_default")]
    stream: bool,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    /// vLLM's: generation stops after one of these tokens.
    #[serde(default, deserialize_with = "null_default")]
    stop_token_ids: Vec<u32>,
    /// `{"include_usage": true}` adds a last chunk with the usage (OpenAI's
    /// streaming option), which load generators count tokens with; vLLM's
    /// `"continuous_usage_stats": true` beside it gives every chunk its
    /// choice's usage so far.
    stream_options: Option<StreamOptions>,
    /// Completions: how many top log probabilities per token; chat: whether to
    /// report log probabilities (how many top ones: `top_logprobs`).
    logprobs: Option<LogprobsInput>,
    /// Chat only (the completions schema refuses it).
    top_logprobs: Option<u32>,
    /// vLLM's: the prompt tokens' log probabilities, with this many top
    /// tokens each (-1 in vLLM: the whole vocabulary, refused here).
    prompt_logprobs: Option<i64>,
    /// Token id (a JSON object's keys are strings) -> bias in [-100, 100].
    logit_bias: Option<BTreeMap<String, f32>>,
    /// vLLM's: tokens generated before EOS, a stop id or a stop string may end it.
    #[serde(default)]
    min_tokens: u32,
    /// vLLM's: only the prompt's last this many tokens are run (-1: as many
    /// as the model's context holds).
    truncate_prompt_tokens: Option<i64>,
    /// vLLM's: false keeps special tokens' text in the output (default true).
    skip_special_tokens: Option<bool>,
    /// vLLM's: false, with special tokens kept, gives an added token that
    /// follows another its bare text (default true).
    spaces_between_special_tokens: Option<bool>,
    /// vLLM's: the stop string (or stop token's text) that ends the output stays in it.
    #[serde(default)]
    include_stop_str_in_output: bool,
    /// vLLM's: log probabilities name each token `token_id:N` instead of its text.
    #[serde(default, deserialize_with = "null_default")]
    return_tokens_as_token_ids: bool,
    /// vLLM's: the answer carries the prompt's token ids and each choice's
    /// (streamed: the prompt's in a choice's first chunk, each chunk its own).
    #[serde(default, deserialize_with = "null_default")]
    return_token_ids: bool,
    /// vLLM's: the prompt's blocks in the prefix caches are named from it,
    /// so only requests with the same salt share them.
    cache_salt: Option<String>,
    /// vLLM's: answer with a beam search of `n` beams (see `beam`).
    #[serde(default)]
    use_beam_search: bool,
    /// vLLM's: a beam's score is its log probability over its length to this power.
    length_penalty: Option<f64>,
    /// `response_format` and vLLM's guided-decoding fields.
    #[serde(flatten)]
    structured: openai_structured::StructuredFields,
}

/// A field vLLM declares `T | None`: `null` reads as its default.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `seed`: vLLM takes any integer of 64 bits, signed (its range) or not;
/// -1 asks for none (vLLM's "random"), another negative seed is used as its
/// two's complement (as torch's generators take one).
fn seed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seed {
        Unsigned(u64),
        Signed(i64),
    }
    match Option::<Value>::deserialize(d)? {
        None => Ok(None),
        Some(v) => match serde_json::from_value::<Seed>(v) {
            Ok(Seed::Unsigned(n)) => Ok(Some(n)),
            Ok(Seed::Signed(-1)) => Ok(None),
            Ok(Seed::Signed(n)) => Ok(Some(n as u64)),
            Err(_) => Err(serde::de::Error::custom(
                "seed must be an integer of 64 bits (-1: none)",
            )),
        },
    }
}

/// `stream_options`; vLLM's defaults: `include_usage` true, `continuous_usage_stats` false.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

impl StreamOptions {
    /// The usage a streamed answer reports: continuous only with
    /// `include_usage`, as vLLM has it.
    fn usage(options: Option<StreamOptions>) -> StreamUsage {
        let Some(o) = options else {
            return StreamUsage::Off;
        };
        match (
            o.include_usage.unwrap_or(true),
            o.continuous_usage_stats.unwrap_or(false),
        ) {
            (true, true) => StreamUsage::Continuous,
            (true, false) => StreamUsage::Final,
            (false, _) => StreamUsage::Off,
        }
    }

    /// Whether an option is given (vLLM refuses that without `stream`).
    fn any(options: Option<StreamOptions>) -> bool {
        options.is_some_and(|o| o.include_usage.is_some() || o.continuous_usage_stats.is_some())
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: PromptInput,
    /// Start the completion's text with the prompt's.
    #[serde(default, deserialize_with = "null_default")]
    echo: bool,
    /// Samples to run, of which the `n` most likely are returned.
    best_of: Option<u32>,
    /// vLLM's: text prompts are encoded with the tokenizer's special tokens
    /// (its BOS, for models that have one); false leaves them out.
    add_special_tokens: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatTurn>,
    /// vLLM's: end the prompt with the template's assistant header (default).
    add_generation_prompt: Option<bool>,
    /// vLLM's: end the prompt inside the final message, for the model to
    /// continue it (with `add_generation_prompt: false`).
    #[serde(default)]
    continue_final_message: bool,
    /// vLLM's: the answer starts with the final message's content when that
    /// message has the answer's role.
    #[serde(default)]
    echo: bool,
    /// vLLM's: documents, for chat templates that read them.
    documents: Option<Value>,
    /// vLLM's: further variables for the chat template (`enable_thinking`, ..).
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// vLLM's: the tokenizer's special tokens added to the rendered prompt
    /// (default false: the template writes the ones it wants).
    #[serde(default)]
    add_special_tokens: bool,
    /// `tools`, `tool_choice`, `parallel_tool_calls`: see [`openai_tools`].
    #[serde(flatten)]
    tools: ToolFields,
    #[serde(flatten)]
    sampling: Sampling,
}

/// The number of top log probabilities a request asks for (`None`: none),
/// checked as vLLM checks it, each error naming its field.
fn logprobs_asked(s: &Sampling, kind: Kind) -> Result<Option<u32>, ApiError> {
    let too_many = |field: &str, n: u32| {
        ApiError::bad_field(
            field,
            format!(
                "{field} = {n}: at most {MAX_TOP_LOGPROBS} top log probabilities per token can be requested"
            ),
        )
    };
    let asked = match (kind, s.logprobs) {
        (_, None) => None,
        (Kind::Completion, Some(LogprobsInput::Count(n))) => Some(n),
        (Kind::Completion, Some(LogprobsInput::Switch(_))) => {
            return Err(ApiError::bad_field(
                "logprobs",
                "logprobs must be an integer (how many top log probabilities per token) on /v1/completions",
            ));
        }
        (Kind::Chat, Some(LogprobsInput::Switch(on))) => on.then(|| s.top_logprobs.unwrap_or(0)),
        (Kind::Chat, Some(LogprobsInput::Count(_))) => {
            return Err(ApiError::bad_field(
                "logprobs",
                "logprobs must be true or false on /v1/chat/completions; the count is top_logprobs",
            ));
        }
    };
    if kind == Kind::Chat
        && let Some(n) = s.top_logprobs
    {
        if n as usize > MAX_TOP_LOGPROBS {
            return Err(too_many("top_logprobs", n));
        }
        if n > 0 && asked.is_none() {
            return Err(ApiError::bad_field(
                "top_logprobs",
                "when using top_logprobs, logprobs must be set to true",
            ));
        }
    }
    if let Some(n) = asked
        && n as usize > MAX_TOP_LOGPROBS
    {
        return Err(too_many("logprobs", n));
    }
    Ok(asked)
}

/// vLLM's `prompt_logprobs`, checked as vLLM checks it: how many top tokens
/// each prompt token's entry lists (`None`: none asked, or 0 with `stream`,
/// which vLLM accepts and answers nothing for).
fn prompt_logprobs_asked(s: &Sampling) -> Result<Option<u32>, ApiError> {
    let bad = |m: String| ApiError::bad_field("prompt_logprobs", m);
    match s.prompt_logprobs {
        None => Ok(None),
        Some(n) if s.stream && (n > 0 || n == -1) => Err(bad(
            "`prompt_logprobs` are not available when `stream=True`.".into(),
        )),
        Some(-1) => Err(bad(format!(
            "prompt_logprobs = -1 (the whole vocabulary) is not supported: at most {MAX_TOP_LOGPROBS} top log probabilities per token can be requested"
        ))),
        Some(n) if n < 0 => Err(bad(
            "`prompt_logprobs` must be a positive value or -1.".into()
        )),
        Some(n) if n as usize > MAX_TOP_LOGPROBS => Err(bad(format!(
            "prompt_logprobs = {n}: at most {MAX_TOP_LOGPROBS} top log probabilities per token can be requested"
        ))),
        Some(_) if s.stream => Ok(None),
        Some(n) => Ok(Some(n as u32)),
    }
}

/// `logit_bias` as the wire's map, each entry checked against the vocabulary
/// (`vocab` ids) and OpenAI's range, the error naming the field.
fn logit_bias(s: &Sampling, vocab: usize) -> Result<HashMap<u32, f32>, ApiError> {
    let bad = |m: String| ApiError::bad_field("logit_bias", m);
    let mut out = HashMap::new();
    for (key, &bias) in s.logit_bias.iter().flatten() {
        let id: u32 = key
            .trim()
            .parse()
            .map_err(|_| bad(format!("logit_bias key {key:?} is not a token id")))?;
        if id as usize >= vocab {
            return Err(bad(format!(
                "logit_bias: token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        if !(bias.is_finite() && bias.abs() <= MAX_LOGIT_BIAS) {
            return Err(bad(format!(
                "logit_bias[{id}] = {bias}: a bias must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"
            )));
        }
        out.insert(id, bias);
    }
    Ok(out)
}

/// `max_tokens` of a completion that gives none, as in vLLM and OpenAI.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

fn to_request(
    prompt: pb::generate_request::Prompt,
    s: &Sampling,
    kind: Kind,
    model: &ModelDir,
) -> Result<pb::GenerateRequest, ApiError> {
    let vocab = model.config.vocab_size;
    if StreamOptions::any(s.stream_options) && !s.stream {
        return Err(ApiError::bad_field(
            "stream_options",
            "Stream options can only be defined when stream=True.",
        ));
    }
    // In the proto 0 means "unset"; in OpenAI's API an explicit 0 is an error.
    if let Some(p) = s.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::bad_field(
            "top_p",
            format!("top_p must be in (0, 1], got {p}"),
        ));
    }
    // The wire's 0 means "not set" (1.0); vLLM refuses a penalty that is not positive.
    if let Some(r) = s.repetition_penalty
        && !(r > 0.0 && r.is_finite())
    {
        return Err(ApiError::bad_field(
            "repetition_penalty",
            format!("repetition_penalty must be a finite number > 0, got {r}"),
        ));
    }
    // OpenAI's and vLLM's completions echo a prompt without generating when
    // `max_tokens` is 0 (`completions` asks for one token, then leaves it out).
    if s.max_completion_tokens.or(s.max_tokens) == Some(0) && kind != Kind::Completion {
        let field = if s.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(ApiError::bad_field(
            field,
            format!("{field} must be at least 1"),
        ));
    }
    crate::validation::check_cache_salt(s.cache_salt.as_deref())
        .map_err(|m| ApiError::bad_field("cache_salt", m))?;
    // OpenAI's defaults: temperature 1, top_p 1.
    let sampling = pb::SamplingParams {
        temperature: s.temperature.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0),
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        seed: s.seed,
        logit_bias: logit_bias(s, vocab)?,
    };
    // Checked here too (the router's validation checks every request) so that
    // the error names its field.
    checked_sampling_from_pb(Some(&sampling))
        .map_err(|e| ApiError::bad_field(e.field, e.message))?;
    Ok(pb::GenerateRequest {
        request_id: s.request_id.clone().unwrap_or_default(),
        model: s.model.clone().unwrap_or_default(),
        prompt: Some(prompt),
        sampling: Some(sampling),
        // Left out: vLLM's 16 on completions (OpenAI's default there); on
        // chat the router's default, the rest of the context as vLLM's
        // (decode nodes take KV blocks as a sequence grows, not up front).
        max_tokens: s.max_completion_tokens.or(s.max_tokens).unwrap_or(
            if kind == Kind::Completion {
                COMPLETIONS_DEFAULT_MAX_TOKENS
            } else {
                0
            },
        ),
        stop: match &s.stop {
            None => Vec::new(),
            Some(StopInput::One(one)) => vec![one.clone()],
            Some(StopInput::Many(many)) => many.clone(),
        },
        stop_token_ids: s.stop_token_ids.clone(),
        ignore_eos: s.ignore_eos,
        include_stop_str_in_output: s.include_stop_str_in_output,
        skip_special_tokens: s.skip_special_tokens,
        spaces_between_special_tokens: s.spaces_between_special_tokens,
        logprobs: logprobs_asked(s, kind)?,
        prompt_logprobs: prompt_logprobs_asked(s)?,
        min_tokens: s.min_tokens,
        // Set from the checked `n` and `best_of` in `run`.
        n: 1,
        constraint: openai_structured::constraint(&s.structured, &model.tokenizer)?,
        cache_salt: s.cache_salt.clone(),
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended a
/// choice, `null` for anything else (EOS, `max_tokens`, ...).
fn stop_reason(f: &pb::Finished) -> Value {
    match &f.stop_reason {
        Some(pb::finished::StopReason::StopString(s)) => json!(s),
        Some(pb::finished::StopReason::StopTokenId(t)) => json!(t),
        None => Value::Null,
    }
}

fn finish_reason(reason: i32) -> &'static str {
    match pb::FinishReason::try_from(reason) {
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::Cancelled) => "abort",
        _ => "stop",
    }
}

/// The served model as OpenAI's model object.
fn model_object(st: &AppState) -> Value {
    json!({ "id": st.name, "object": "model", "created": 0, "owned_by": "tandem",
            "max_model_len": st.model.config.max_position_embeddings })
}

/// `GET /v1/models`: the served model (an API key needed where keys are set,
/// as for every `/v1` route).
async fn models(State(st): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorization(&st, &headers)?;
    Ok(Json(
        json!({ "object": "list", "data": [model_object(&st)] }),
    ))
}

/// `GET /v1/models/{model}` (OpenAI's retrieve): the model object, or 404 for
/// a model not served here.
async fn model_info(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Path(model): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorization(&st, &headers)?;
    if model != st.name {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist (this cluster serves `{}`)",
                st.name
            ),
            param: Some("model".into()),
            retry_after: None,
        });
    }
    Ok(Json(model_object(&st)))
}

/// `GET /version` (vLLM's): the server's version.
async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn completions(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let auth = authorization(&st, &headers)?;
    let req: CompletionRequest = strict_body(Endpoint::Completions, body)?;
    let Prompts {
        prompts,
        ids: prompt_ids,
        echo,
    } = completion_prompts(
        req.prompt,
        req.echo,
        req.add_special_tokens.unwrap_or(true),
        &req.sampling,
        &st.model,
    )?;
    let mut requests = prompts
        .into_iter()
        .map(|p| to_request(p, &req.sampling, Kind::Completion, &st.model))
        .collect::<Result<Vec<_>, _>>()?;
    // vLLM's echo with logprobs: the prompt's tokens lead the log
    // probabilities, with as many top tokens as `logprobs` asks (unless
    // `prompt_logprobs` says how many).
    let echo_logprobs = req.echo && req.sampling.logprobs.is_some();
    if echo_logprobs {
        for r in &mut requests {
            r.prompt_logprobs = r.prompt_logprobs.or(r.logprobs);
        }
    }
    // max_tokens 0 with echo (vLLM's `echo_without_generation`): one token is
    // generated, as vLLM does, and only the prompt answered; without echo, an error.
    let echo_only = req.sampling.max_tokens == Some(0);
    if echo_only && !req.echo {
        return Err(ApiError::bad_field(
            "max_tokens",
            "max_tokens must be at least 1 (0 only echoes the prompt, with echo: true)",
        ));
    }
    if echo_only {
        for r in &mut requests {
            r.max_tokens = 1;
        }
    }
    let usage = StreamOptions::usage(req.sampling.stream_options);
    let samples = Samples::check(
        req.sampling.n,
        req.best_of,
        req.sampling.stream,
        st.service.max_n(),
    )?;
    let beam = match requests.first() {
        Some(r) => BeamSearch::from_request(&req.sampling, r)?,
        None => None,
    };
    if let Some(b) = beam {
        if req.best_of.is_some_and(|best_of| best_of != b.width) {
            return Err(ApiError::bad_field(
                "best_of",
                "best_of is not supported with use_beam_search (n is the number of beams)",
            ));
        }
        if echo_only {
            return Err(ApiError::bad_field(
                "max_tokens",
                "max_tokens must be at least 1 with use_beam_search",
            ));
        }
    }
    let out = Output {
        stream: req.sampling.stream,
        usage,
        echo,
        samples,
        tools: None,
        tokens_as_ids: req.sampling.return_tokens_as_token_ids,
        prompt_ids,
        echo_logprobs,
        echo_only,
    };
    match beam {
        Some(b) => beam::run(st, auth, &headers, requests, out, Kind::Completion, b).await,
        None => run(st, auth, &headers, requests, out, Kind::Completion).await,
    }
}

async fn chat_completions(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let auth = authorization(&st, &headers)?;
    let req: ChatRequest = strict_body(Endpoint::Chat, body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    openai_tools::check_messages(&req.messages)?;
    let offered = openai_tools::plan(&req.tools, &st.model.tokenizer)?;
    let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
    let text = crate::openai_tools_prompt::render(
        &st.model.tokenizer,
        &req.messages,
        offered.as_ref(),
        &ChatOptions {
            add_generation_prompt,
            continue_final_message: req.continue_final_message,
            documents: req.documents.as_ref(),
            template_kwargs: req.chat_template_kwargs.as_ref(),
        },
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    // With `tool_choice: "none"` the model saw the tools but its output is
    // plain content: no tool plan from here on.
    let tools = offered.filter(|p| p.mode != openai_tools::ToolMode::Off);
    // The template writes every special token it wants; none are added
    // unless asked (as vLLM does).
    let ids = st
        .model
        .tokenizer
        .encode(&text, req.add_special_tokens)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let echo = chat_echo(&req, add_generation_prompt, tools.is_some())?;
    let ids = last_tokens(ids, kept_prompt_tokens(&req.sampling, &st.model)?);
    let prompt_ids = req.sampling.return_token_ids.then(|| vec![ids.clone()]);
    let mut request = to_request(
        pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids }),
        &req.sampling,
        Kind::Chat,
        &st.model,
    )?;
    let samples = Samples::check(
        req.sampling.n,
        None,
        req.sampling.stream,
        st.service.max_n(),
    )?;
    if tools.is_some() && req.sampling.return_token_ids {
        return Err(ApiError::bad_field(
            "return_token_ids",
            "return_token_ids together with tools is not supported yet",
        ));
    }
    if tools.is_some() && samples.best_of > 1 {
        return Err(ApiError::bad_field(
            "n",
            "n > 1 together with tools is not supported yet",
        ));
    }
    let beam = BeamSearch::from_request(&req.sampling, &request)?;
    if beam.is_some() && tools.is_some() {
        return Err(ApiError::bad_field(
            "tools",
            "tools are not supported with use_beam_search",
        ));
    }
    if let Some(forced) = tools.as_ref().and_then(ToolPlan::constraint) {
        if request.constraint.is_some() {
            return Err(ApiError::bad_field(
                "tool_choice",
                "a required or named tool_choice constrains the output already; \
                 it cannot be combined with response_format or guided decoding",
            ));
        }
        request.constraint = Some(forced);
    }
    let out = Output {
        stream: req.sampling.stream,
        usage: StreamOptions::usage(req.sampling.stream_options),
        echo,
        samples,
        tools,
        tokens_as_ids: req.sampling.return_tokens_as_token_ids,
        prompt_ids,
        echo_logprobs: false,
        echo_only: false,
    };
    match beam {
        Some(b) => beam::run(st, auth, &headers, vec![request], out, Kind::Chat, b).await,
        None => run(st, auth, &headers, vec![request], out, Kind::Chat).await,
    }
}

/// vLLM's chat `echo`: the text the answer starts with, the final message's
/// content when that message has the answer's role (`assistant`, or the final
/// message's own role without `add_generation_prompt`); nothing without it.
fn chat_echo(
    req: &ChatRequest,
    add_generation_prompt: bool,
    tools: bool,
) -> Result<Vec<String>, ApiError> {
    if !req.echo {
        return Ok(Vec::new());
    }
    if tools {
        return Err(ApiError::bad_field(
            "echo",
            "echo together with tools is not supported yet",
        ));
    }
    let Some(last) = req.messages.last() else {
        return Ok(Vec::new());
    };
    let role = if add_generation_prompt {
        "assistant"
    } else {
        last.role.as_str()
    };
    Ok(match &last.content {
        Some(content) if last.role == role => vec![content.clone()],
        _ => Vec::new(),
    })
}

/// A request body checked field by field ([`openai_fields::check`]), then read
/// into its typed request.
fn strict_body<T: DeserializeOwned>(
    endpoint: Endpoint,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<T, ApiError> {
    let Json(body) = body?;
    let Value::Object(fields) = &body else {
        return Err(ApiError::bad_request(
            "invalid request body: expected a JSON object",
        ));
    };
    openai_fields::check(endpoint, fields)?;
    typed_body(body)
}

/// A JSON body read into its typed request, the error in OpenAI's shape.
fn typed_body<T: DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// The request's `Authorization` header, checked before its body is read
/// (so a client without a key learns that first), to pass on as gRPC metadata.
fn authorization(st: &AppState, headers: &HeaderMap) -> Result<Option<HeaderValue>, ApiError> {
    let value = headers.get(header::AUTHORIZATION).cloned();
    let mut md = tonic::metadata::MetadataMap::new();
    if let Some(v) = &value
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
    {
        md.insert("authorization", v);
    }
    st.service
        .auth()
        .authenticate(&md)
        .map_err(|e| ApiError::from(Status::from(e)))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::{StreamOptions, StreamUsage};

    #[test]
    fn continuous_usage_needs_include_usage_as_in_vllm() {
        let o = |include_usage, continuous_usage_stats| {
            StreamOptions::usage(Some(StreamOptions {
                include_usage,
                continuous_usage_stats,
            }))
        };
        assert_eq!(StreamOptions::usage(None), StreamUsage::Off);
        assert_eq!(o(Some(false), None), StreamUsage::Off);
        assert_eq!(o(Some(false), Some(true)), StreamUsage::Off);
        assert_eq!(o(Some(true), Some(false)), StreamUsage::Final);
        assert_eq!(o(Some(true), Some(true)), StreamUsage::Continuous);
        // vLLM's defaults: `{}` reports the usage at the end.
        assert_eq!(o(None, None), StreamUsage::Final);
        assert_eq!(o(None, Some(true)), StreamUsage::Continuous);
        assert!(!StreamOptions::any(Some(StreamOptions::default())));
        assert!(StreamOptions::any(Some(StreamOptions {
            include_usage: Some(false),
            continuous_usage_stats: None,
        })));
    }
}
