//! Issue 5's bad-input table, in one place.
//!
//! The rows on the client APIs run here, against a real cluster that keeps
//! serving a good request meanwhile. The rows on the KV transport are tested
//! beside its code; they are listed here so the whole table reads at once:
//!
//! | bad input                                   | answer                      | test |
//! |---------------------------------------------|-----------------------------|------|
//! | empty prompt (text or token ids)            | INVALID_ARGUMENT            | `client_api_rows` |
//! | token ids out of vocabulary                 | INVALID_ARGUMENT            | `client_api_rows` |
//! | max_tokens above the limit                  | INVALID_ARGUMENT            | `client_api_rows` |
//! | max_tokens 0                                | HTTP 400 (in the gRPC proto 0 means "default") | `http_rows` |
//! | temperature negative or NaN                 | INVALID_ARGUMENT            | `client_api_rows` |
//! | top_p outside (0, 1]                        | INVALID_ARGUMENT / HTTP 400 | `client_api_rows` (gRPC: 0 means unset), `http_rows` (0) |
//! | top_k below -1 (-1 is vLLM's "no cut")      | INVALID_ARGUMENT            | `client_api_rows` |
//! | stop list too long                          | INVALID_ARGUMENT            | `client_api_rows` |
//! | prompt longer than the context              | INVALID_ARGUMENT            | `client_api_rows` |
//! | unknown model name                          | NOT_FOUND                   | `client_api_rows` |
//! | oversized gRPC message                      | OUT_OF_RANGE / RESOURCE_EXHAUSTED (tonic's limit) | `client_api_rows` |
//! | invalid UTF-8 in `text`, truncated protobuf, no message | INVALID_ARGUMENT      | `malformed_grpc_requests` |
//! | max_tokens past the model's context         | INVALID_ARGUMENT / HTTP 400, vLLM's message | `client_api_rows`, `openai` |
//! | invalid UTF-8 in the HTTP API               | HTTP 400, OpenAI error JSON | `http_rows` |
//! | oversized HTTP body                         | HTTP 413                    | `http_rows` |
//! | random bytes, truncated frames on QUIC      | stream/connection refused, node keeps serving | `cluster::malformed_frames_on_the_quic_port_are_refused`, `kv-transfer/tests/transfer.rs::garbage_and_truncation_are_refused_and_service_continues` |
//! | duplicated KV frames                        | refused, request aborted    | `kv-transfer/src/reservation.rs::refuses_duplicates_including_overlaps` |
//! | KV frames for an unknown request            | refused                     | `kv-transfer/src/reservation.rs::refuses_unknown_request` |
//! | a reservation never filled                  | expired after the timeout, blocks returned | the decode node's `Scheduler::reap` at `kv_timeout_ms`, `cluster::malformed_frames_on_the_quic_port_are_refused` (no leak) |
//! | a peer without a valid certificate          | TLS refusal                 | `security::mutual_tls_serves_members_and_refuses_strangers_on_quic` |

use std::time::Duration;

use tandem_proto::v1 as pb;
use tandem_tests::*;
use tonic::Code;

fn text(t: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(t.into())),
        max_tokens: 2,
        ..Default::default()
    }
}

fn ids(ids: Vec<u32>) -> pb::GenerateRequest {
    greedy_request(&ids, 2)
}

fn sampling(f: impl FnOnce(&mut pb::SamplingParams)) -> pb::GenerateRequest {
    let mut r = ids(prompt(4, 1));
    let mut s = pb::SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        ..Default::default()
    };
    f(&mut s);
    r.sampling = Some(s);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_api_rows() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let vocab = model.config.vocab_size as u32;
    let context = model.config.max_position_embeddings;

    // A good request runs through the whole table.
    let mut good_client = cluster.client().await;
    let good_prompt = prompt(100, 7);
    let good =
        tokio::spawn(
            async move { complete(&mut good_client, greedy_request(&good_prompt, 48)).await },
        );

    let rows: Vec<(&str, pb::GenerateRequest, &[Code], &str)> = vec![
        (
            "empty text prompt",
            text(""),
            &[Code::InvalidArgument],
            "empty",
        ),
        (
            "empty token ids",
            ids(vec![]),
            &[Code::InvalidArgument],
            "empty",
        ),
        (
            "no prompt",
            pb::GenerateRequest::default(),
            &[Code::InvalidArgument],
            "prompt is missing",
        ),
        (
            "token out of vocabulary",
            ids(vec![1, vocab, 2]),
            &[Code::InvalidArgument],
            "outside the vocabulary",
        ),
        (
            "max_tokens above the limit",
            {
                let mut r = ids(prompt(4, 1));
                r.max_tokens = 1_000_000;
                r
            },
            &[Code::InvalidArgument],
            "max_tokens",
        ),
        (
            "temperature negative",
            sampling(|s| s.temperature = -0.5),
            &[Code::InvalidArgument],
            "temperature",
        ),
        (
            "temperature NaN",
            sampling(|s| s.temperature = f32::NAN),
            &[Code::InvalidArgument],
            "temperature",
        ),
        (
            "top_p negative",
            sampling(|s| s.top_p = -0.1),
            &[Code::InvalidArgument],
            "top_p",
        ),
        (
            "top_p above 1",
            sampling(|s| s.top_p = 1.5),
            &[Code::InvalidArgument],
            "top_p",
        ),
        (
            "top_k below -1",
            sampling(|s| s.top_k = -2),
            &[Code::InvalidArgument],
            "top_k",
        ),
        (
            "stop list too long",
            {
                let mut r = ids(prompt(4, 1));
                r.stop = vec!["x".into(); 17];
                r
            },
            &[Code::InvalidArgument],
            "stop",
        ),
        (
            "prompt longer than the context",
            ids(prompt(context + 10, 1)),
            &[Code::InvalidArgument],
            "context",
        ),
        (
            "max_tokens past the context",
            {
                let mut r = ids(prompt(context - 10, 1));
                r.max_tokens = 11;
                r
            },
            &[Code::InvalidArgument],
            "maximum context length",
        ),
        (
            "unknown model",
            {
                let mut r = ids(prompt(4, 1));
                r.model = "gpt-17".into();
                r
            },
            &[Code::NotFound],
            "gpt-17",
        ),
        (
            "oversized message",
            text(&"a".repeat(5 << 20)),
            &[Code::OutOfRange, Code::ResourceExhausted],
            "message",
        ),
    ];
    let mut client = cluster.client().await;
    for (name, request, codes, needle) in rows {
        let status = match complete(&mut client, request).await {
            Ok(c) => panic!("{name}: accepted ({c:?})"),
            Err(s) => s,
        };
        assert!(codes.contains(&status.code()), "{name}: {status:?}");
        assert!(
            status
                .message()
                .to_lowercase()
                .contains(&needle.to_lowercase()),
            "{name}: message {:?} does not mention {needle:?}",
            status.message()
        );
        eprintln!("{name:32} -> {:?}: {}", status.code(), status.message());
    }

    let got = tokio::time::timeout(Duration::from_secs(120), good)
        .await
        .expect("the good request finished")
        .unwrap()
        .expect("the good request succeeded");
    assert_eq!(got.tokens.len(), 48);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_rows() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    spec.router.max_request_bytes = 64 << 10;
    let cluster = Cluster::start(model, spec).await;
    let http = cluster.http.unwrap();

    let mut invalid_utf8 = br#"{"prompt": "ab"#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(br#"", "max_tokens": 2}"#);
    let (status, body) = post_completions(http, &invalid_utf8).await;
    assert_eq!(status, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");

    let big = format!(
        r#"{{"prompt": "{}", "max_tokens": 2}}"#,
        "a".repeat(100 << 10)
    );
    let (status, body) = post_completions(http, big.as_bytes()).await;
    assert_eq!(status, 413, "{body}");

    for bad in [
        &br#"{"prompt": "hi", "max_tokens": 0}"#[..],
        br#"{"prompt": "hi", "max_tokens": 2, "top_p": 0}"#,
        br#"{"prompt": "hi", "max_tokens": 2, "top_p": 1.5}"#,
    ] {
        let (status, body) = post_completions(http, bad).await;
        assert_eq!(status, 400, "{body}");
    }
    let (status, body) = post_completions(http, br#"{"prompt": "", "max_tokens": 2}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("empty"), "{body}");

    // And a good one is still served.
    let (status, body) = post_completions(http, br#"{"prompt": "hello", "max_tokens": 2}"#).await;
    assert_eq!(status, 200, "{body}");
}

/// Sends raw bytes as the one message of a `Generate` call (or none).
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;

struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `Generate` with `messages` as raw protobuf bytes; returns the status
/// it fails with, or `None` if it streamed responses.
async fn raw_generate(
    channel: tonic::transport::Channel,
    messages: Vec<Vec<u8>>,
) -> Option<tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/tandem.v1.Generate/Generate");
    let request = tonic::Request::new(tokio_stream::iter(messages));
    match grpc.streaming(request, path, RawCodec).await {
        Err(status) => Some(status),
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_grpc_requests() {
    use prost::Message;

    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.router))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // GenerateRequest.text (field 3, length-delimited) holding invalid UTF-8.
    let mut invalid_utf8 = vec![3 << 3 | 2, 4, b'a', 0xff, 0xfe, b'b'];
    invalid_utf8.extend([6 << 3, 2]); // max_tokens = 2
    // A good request with its last bytes cut off.
    let good = text("hello there").encode_to_vec();
    let truncated = good[..good.len() - 3].to_vec();
    let rows: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        ("invalid UTF-8 in text", vec![invalid_utf8], "UTF-8"),
        (
            "truncated message",
            vec![truncated],
            "malformed GenerateRequest",
        ),
        ("no message", vec![], "malformed GenerateRequest"),
    ];
    for (name, messages, needle) in rows {
        let status = raw_generate(channel.clone(), messages)
            .await
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{name}: {:?} should mention {needle:?}",
            status.message()
        );
        eprintln!("{name:24} -> {:?}: {}", status.code(), status.message());
        // The same bytes, well formed, are served.
        let next = raw_generate(channel.clone(), vec![good.clone()]).await;
        assert!(next.is_none(), "{name}: the next request: {next:?}");
    }
    let mut client = cluster.client().await;
    let got = complete(&mut client, text("hello")).await.unwrap();
    assert_eq!(got.tokens.len(), 2);
}
