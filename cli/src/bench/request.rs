//! One benchmark request: send it, time every streamed chunk, record the outcome.
//!
//! TTFT runs from just before the RPC is issued to the first chunk that carries
//! token ids; each later chunk adds one inter-token gap (a chunk may hold several
//! tokens, as a vLLM SSE chunk may); end-to-end latency runs to the `finished`
//! message. Output tokens are the server's `usage.completion_tokens` (the ids
//! streamed, when the server sends no usage); cached tokens are its
//! `usage.cached_tokens`, the prompt tokens a prefix cache supplied. A
//! request succeeds when the stream ends with a `finished` message that is
//! not an error or a cancellation.

use std::time::Instant;

use tandem_proto::v1 as pb;
use tandem_proto::v1::generate_client::GenerateClient;
use tonic::transport::Channel;

use super::dataset::{BenchPrompt, PromptInput};
use super::openai::{self, HttpTarget};
use super::record::RequestRecord;

/// Where a benchmark sends its requests.
#[derive(Clone, Debug)]
pub enum Target {
    /// The router's gRPC `Generate`.
    Grpc(GenerateClient<Channel>),
    /// The router's OpenAI-compatible `/v1/completions`.
    OpenAi(HttpTarget),
}

impl Target {
    /// Sends request `index` and times it (see [`send`], [`openai::send`]).
    pub async fn send(
        &self,
        index: usize,
        prompt: &BenchPrompt,
        model: &str,
        run_start: Instant,
    ) -> RequestRecord {
        match self {
            Target::Grpc(c) => send(c.clone(), index, prompt, model, run_start).await,
            Target::OpenAi(t) => openai::send(t, index, prompt, model, run_start).await,
        }
    }
}

/// The wire request for `prompt`: `ignore_eos` and `max_tokens` = its output
/// length, so every request generates exactly what the dataset asks.
pub fn to_wire(index: usize, prompt: &BenchPrompt, model: &str) -> pb::GenerateRequest {
    let wire_prompt = match &prompt.input {
        PromptInput::Text(t) => pb::generate_request::Prompt::Text(t.clone()),
        PromptInput::TokenIds(ids) => {
            pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.clone() })
        }
    };
    pb::GenerateRequest {
        request_id: format!("bench-{index}"),
        model: model.to_string(),
        prompt: Some(wire_prompt),
        sampling: Some(pb::SamplingParams::default()),
        max_tokens: prompt.output_len as u32,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Sends request `index` and times its stream; `run_start` anchors `sent_at_s`.
pub async fn send(
    mut client: GenerateClient<Channel>,
    index: usize,
    prompt: &BenchPrompt,
    model: &str,
    run_start: Instant,
) -> RequestRecord {
    let mut record = RequestRecord::unfinished(index, prompt);
    let wire = to_wire(index, prompt, model);
    let start = Instant::now();
    record.sent_at_s = (start - run_start).as_secs_f64();
    let fail = |mut r: RequestRecord, status: &tonic::Status| {
        r.status = format!("{:?}", status.code());
        r.error = status.message().to_string();
        r
    };
    let mut stream = match client.generate(wire).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => return fail(record, &status),
    };
    let mut last_chunk: Option<Instant> = None;
    let mut streamed_ids = 0u64;
    loop {
        let msg = match stream.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                record.status = format!("{:?}", tonic::Code::Unknown);
                record.error = "the stream ended without a finished message".into();
                return record;
            }
            Err(status) => return fail(record, &status),
        };
        let now = Instant::now();
        match msg.event {
            Some(pb::generate_response::Event::Token(chunk)) if !chunk.ids.is_empty() => {
                streamed_ids += chunk.ids.len() as u64;
                record.answer_ids.extend_from_slice(&chunk.ids);
                record.answer_text.push_str(&chunk.text);
                match last_chunk {
                    None => record.ttft_s = (now - start).as_secs_f64(),
                    Some(prev) => record.itl_s.push((now - prev).as_secs_f64()),
                }
                last_chunk = Some(now);
            }
            Some(pb::generate_response::Event::Finished(fin)) => {
                record.e2e_s = (now - start).as_secs_f64();
                if let Some(spans) = fin.timings.as_ref().and_then(|t| t.spans.as_ref()) {
                    record.spans_s = super::spans::phases_of(spans);
                }
                let usage = fin.usage.unwrap_or_default();
                if usage.prompt_tokens > 0 {
                    record.input_tokens = usage.prompt_tokens as u64;
                }
                record.cached_tokens = usage.cached_tokens as u64;
                record.output_tokens = if usage.completion_tokens > 0 {
                    usage.completion_tokens as u64
                } else {
                    streamed_ids
                };
                let reason =
                    pb::FinishReason::try_from(fin.reason).unwrap_or(pb::FinishReason::Unspecified);
                let failed = reason == pb::FinishReason::Cancelled || last_chunk.is_none();
                record.success = !failed;
                record.status = format!(
                    "{:?}",
                    if failed {
                        tonic::Code::Internal
                    } else {
                        tonic::Code::Ok
                    }
                );
                record.error = if failed {
                    format!("finished as {}", reason.as_str_name())
                } else {
                    String::new()
                };
                return record;
            }
            _ => {}
        }
    }
}
