//! One benchmark request over the router's OpenAI-compatible HTTP API:
//! a streamed `POST /v1/completions` (server-sent events), timed as
//! [`request`](super::request) times a gRPC stream, with vLLM's
//! `openai` backend's definitions: TTFT at the first chunk, one
//! inter-token gap per later chunk, output tokens from the usage chunk
//! (`stream_options.include_usage`, cached tokens from its
//! `prompt_tokens_details.cached_tokens`), success when a chunk carries a
//! `finish_reason` and no error came.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::dataset::{BenchPrompt, PromptInput};
use super::record::RequestRecord;

/// Where completions are posted: `host:port` and the path prefix of `--base-url`.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    authority: String,
    prefix: String,
}

impl HttpTarget {
    /// Parses a base URL such as `http://127.0.0.1:8000`.
    pub fn parse(base_url: &str) -> anyhow::Result<Self> {
        let rest = base_url.strip_prefix("http://").ok_or_else(|| {
            anyhow::anyhow!(
                "--base-url {base_url:?} must start with http:// (TLS is not supported)"
            )
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        anyhow::ensure!(
            !authority.is_empty(),
            "--base-url {base_url:?} names no host"
        );
        Ok(HttpTarget {
            authority: authority.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

/// The JSON body for `prompt`: `ignore_eos` and `max_tokens` = its output length.
fn body(prompt: &BenchPrompt, model: &str) -> Value {
    let p = match &prompt.input {
        PromptInput::Text(t) => json!(t),
        PromptInput::TokenIds(ids) => json!(ids),
    };
    let mut b = json!({
        "prompt": p,
        "max_tokens": prompt.output_len,
        "ignore_eos": true,
        "temperature": 0.0,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    if !model.is_empty() {
        b["model"] = json!(model);
    }
    b
}

/// Sends request `index` and times its event stream; `run_start` anchors `sent_at_s`.
pub async fn send(
    target: &HttpTarget,
    index: usize,
    prompt: &BenchPrompt,
    model: &str,
    run_start: Instant,
) -> RequestRecord {
    let mut record = RequestRecord::unfinished(index, prompt);
    // From here on `error` holds what the server said, if anything.
    record.error.clear();
    let start = Instant::now();
    record.sent_at_s = (start - run_start).as_secs_f64();
    match stream(target, prompt, model, start, &mut record).await {
        Ok(()) => {}
        Err(e) => {
            record.success = false;
            record.status = "Unavailable".into();
            record.error = e.to_string();
        }
    }
    record
}

async fn stream(
    target: &HttpTarget,
    prompt: &BenchPrompt,
    model: &str,
    start: Instant,
    record: &mut RequestRecord,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(&target.authority).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    // The connection task ends when the response is read or the request dropped.
    tokio::spawn(conn);
    let req = Request::post(format!("{}/v1/completions", target.prefix))
        .header(HOST, &target.authority)
        .header(CONTENT_TYPE, "application/json")
        .header("x-request-id", format!("bench-{}", record.index))
        .body(Full::new(Bytes::from(body(prompt, model).to_string())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        record.status = format!("HTTP {}", status.as_u16());
        record.error = String::from_utf8_lossy(&text).into_owned();
        return Ok(());
    }
    let mut buf = Vec::new();
    let mut last_chunk: Option<Instant> = None;
    let mut finished = false;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        let now = Instant::now();
        buf.extend_from_slice(&data);
        // Events end with a blank line; a frame may hold several or part of one.
        while let Some(end) = find(&buf, b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    record.e2e_s = (now - start).as_secs_f64();
                    record.success = finished && last_chunk.is_some() && record.error.is_empty();
                    record.status = if record.success { "Ok" } else { "Internal" }.into();
                    if !finished && record.error.is_empty() {
                        record.error = "the stream ended without a finish_reason".into();
                    }
                    return Ok(());
                }
                let v: Value = serde_json::from_str(data)?;
                if let Some(e) = v.get("error") {
                    record.error = e.to_string();
                    continue;
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    record.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                    if let Some(p) = u["prompt_tokens"].as_u64().filter(|&p| p > 0) {
                        record.input_tokens = p;
                    }
                    record.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                }
                let Some(choice) = v["choices"].get(0) else {
                    continue; // the usage chunk
                };
                // A token chunk (no finish_reason yet), or a last one that still
                // carries text.
                let is_finish = choice["finish_reason"].is_string();
                finished |= is_finish;
                if let Some(t) = choice["text"].as_str() {
                    record.answer_text.push_str(t);
                }
                if !is_finish || choice["text"].as_str().is_some_and(|t| !t.is_empty()) {
                    match last_chunk {
                        None => record.ttft_s = (now - start).as_secs_f64(),
                        Some(prev) => record.itl_s.push((now - prev).as_secs_f64()),
                    }
                    last_chunk = Some(now);
                }
            }
        }
    }
    anyhow::bail!("the connection closed before data: [DONE]")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::HttpTarget;

    #[test]
    fn base_urls_split_into_authority_and_prefix() {
        let t = HttpTarget::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.prefix.as_str()),
            ("127.0.0.1:8000", "")
        );
        let t = HttpTarget::parse("http://h:1/api/").unwrap();
        assert_eq!((t.authority.as_str(), t.prefix.as_str()), ("h:1", "/api"));
        assert!(HttpTarget::parse("https://h:1").is_err());
        assert!(HttpTarget::parse("http:///x").is_err());
    }
}
