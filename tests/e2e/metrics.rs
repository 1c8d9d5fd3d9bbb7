//! Prometheus metrics move as requests go through a real cluster: a router, a
//! prefill node and a decode node on loopback with one `/metrics` endpoint
//! (as `tandem up` has), scraped over HTTP before, during and after a few
//! requests, one of them long enough to be prefilled remotely and shipped
//! over QUIC.
//!
//! The recorder is global to the process, so this file holds one test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_telemetry::names;
use tandem_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A sample's labels.
type Labels = BTreeMap<String, String>;

/// One scrape: every sample, by metric name, with its labels.
#[derive(Debug, Default)]
struct Scrape {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
    text: String,
}

impl Scrape {
    /// Parses Prometheus' text format (the subset the exporter writes).
    fn parse(text: &str) -> Scrape {
        let mut samples: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label=value");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            samples
                .entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        Scrape {
            samples,
            text: text.to_string(),
        }
    }

    /// The sum of `name`'s samples whose labels include `labels` (0 when none).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(have, _)| {
                labels
                    .iter()
                    .all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.contains_key(name)
    }
}

/// `GET /metrics` over a plain HTTP/1.1 connection.
async fn scrape(addr: SocketAddr) -> Scrape {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Scrape::parse(body)
}

/// Sends `METHOD PATH` (with a JSON `body`, if any) over a new HTTP/1.1
/// connection; returns the whole answer.
async fn http_exchange(addr: SocketAddr, method_path: &str, body: Option<&str>) -> String {
    let mut request = format!("{method_path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    match body {
        Some(body) => request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => request.push_str("\r\n"),
    }
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP API");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    answer
}

/// Waits until `done` holds for a scrape; returns that scrape.
async fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(addr).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}; last scrape:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const DECODE: [(&str, &str); 1] = [("role", "decode")];
const PREFILL: [(&str, &str); 1] = [("role", "prefill")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_as_requests_go_through_the_cluster() {
    // Before any role starts, as `tandem up` does.
    let shutdown = CancellationToken::new();
    let endpoint =
        tandem_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), shutdown.clone())
            .await
            .expect("metrics endpoint");
    let addr = endpoint.addr;
    assert_ne!(addr.port(), 0, "the bound port is reported");

    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let decode_total = spec.decode.kv_blocks as f64;
    let prefill_total = spec.prefill.as_ref().expect("a prefill node").kv_blocks as f64;
    assert!(
        spec.decode.local_prefill_below < 100,
        "the long prompt must go to the prefill node"
    );
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;

    // The nodes publish their KV gauges at start and after every step.
    let before = scrape_until(addr, "KV gauges at start", |s| {
        s.get(names::KV_BLOCKS_FREE, &DECODE) == decode_total
            && s.get(names::KV_BLOCKS_FREE, &PREFILL) == prefill_total
    })
    .await;
    assert_eq!(before.get(names::KV_BLOCKS_USED, &DECODE), 0.0);

    // Mid-request: a long generation holds decode blocks, and used + free = total.
    let long_prompt = prompt(100, 1);
    let mut running = client
        .generate(greedy_request(&long_prompt, 400))
        .await
        .expect("generate")
        .into_inner();
    let first = running.message().await.expect("stream").expect("a token");
    assert!(matches!(
        first.event,
        Some(pb::generate_response::Event::Token(_))
    ));
    let during = scrape(addr).await;
    let used = during.get(names::KV_BLOCKS_USED, &DECODE);
    assert!(
        used > 0.0,
        "a running request holds blocks:\n{}",
        during.text
    );
    assert_eq!(
        used + during.get(names::KV_BLOCKS_FREE, &DECODE),
        decode_total
    );
    while running.message().await.expect("stream").is_some() {}

    // A short prompt (prefilled on the decode node), two more long ones, and a bad request.
    let max_tokens = 12;
    let prompts = [prompt(4, 2), prompt(64, 3), prompt(150, 4)];
    for p in &prompts {
        let done = complete(&mut client, greedy_request(p, max_tokens))
            .await
            .expect("generate");
        assert_eq!(done.reason, pb::FinishReason::Length);
    }
    let bad = client
        .generate(pb::GenerateRequest::default())
        .await
        .expect_err("a request without a prompt is refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // The HTTP API: a listing, a body it refuses before anything runs, and a
    // path with no route; each answer is counted by route and status code.
    let http = cluster.http.expect("the router serves HTTP");
    for (method_path, body, want) in [
        ("GET /v1/models", None, "HTTP/1.1 200"),
        (
            "POST /v1/completions",
            Some(r#"{"prompt": 5, "max_tokens": 1}"#),
            "HTTP/1.1 400",
        ),
        ("GET /v2/nothing", None, "HTTP/1.1 404"),
    ] {
        let answer = http_exchange(http, method_path, body).await;
        assert!(answer.starts_with(want), "{method_path}: {answer}");
    }

    // After the requests: every block is free again on both nodes.
    let after = scrape_until(addr, "every KV block free after the requests", |s| {
        s.get(names::KV_BLOCKS_FREE, &DECODE) == decode_total
            && s.get(names::KV_BLOCKS_FREE, &PREFILL) == prefill_total
            && s.get(names::QUEUE_DEPTH, &DECODE) == 0.0
    })
    .await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);

    // Every name the code exports is in the scrape (but the certificate
    // reloads, exported only by a process with a TLS listener: this cluster
    // has none; tests/e2e/client_tls.rs has; and the link rate).
    for name in names::ALL {
        // Set only after a KV transfer large enough to measure the link
        // (tests/e2e/link_cost.rs has).
        if name == names::TLS_CERT_RELOADS_TOTAL || name == names::KV_LINK_RATE_BYTES_PER_SECOND {
            continue;
        }
        let present = after.has(name) || after.has(&format!("{name}_count"));
        assert!(
            present,
            "{name} is missing from the scrape:\n{}",
            after.text
        );
    }

    // Requests by status: four finished by length, one refused.
    let requests = 1 + prompts.len();
    assert_eq!(
        delta(names::REQUESTS_TOTAL, &[("status", "length")]),
        requests as f64
    );
    assert_eq!(
        delta(names::REQUESTS_TOTAL, &[("status", "invalid_argument")]),
        1.0
    );
    // Tokens: every prompt token of the admitted requests, every generated token.
    let prompt_tokens = long_prompt.len() + prompts.iter().map(Vec::len).sum::<usize>();
    assert_eq!(delta(names::PROMPT_TOKENS_TOTAL, &[]), prompt_tokens as f64);
    let generated = 400 + max_tokens as usize * prompts.len();
    assert_eq!(delta(names::GENERATION_TOKENS_TOTAL, &[]), generated as f64);

    // The HTTP answers, by route template and code; the refusal never became
    // a request (the gRPC one above is the only invalid_argument).
    for (endpoint, code) in [
        ("/v1/models", "200"),
        ("/v1/completions", "400"),
        ("unmatched", "404"),
    ] {
        assert_eq!(
            delta(
                names::HTTP_REQUESTS_TOTAL,
                &[("endpoint", endpoint), ("code", code)]
            ),
            1.0,
            "{endpoint} {code}:\n{}",
            after.text
        );
    }
    assert_eq!(delta(names::HTTP_REQUESTS_TOTAL, &[]), 3.0);

    // Latency histograms got one sample per request (TTFT), per token after
    // the first (ITL), per request and outcome (duration).
    let count = |name: &str| format!("{name}_count");
    assert_eq!(
        delta(&count(names::TIME_TO_FIRST_TOKEN_SECONDS), &[]),
        requests as f64
    );
    assert_eq!(
        delta(&count(names::INTER_TOKEN_LATENCY_SECONDS), &[]),
        (generated - requests) as f64
    );
    assert_eq!(
        delta(&count(names::REQUEST_DURATION_SECONDS), &[]),
        requests as f64 + 1.0
    );
    assert!(delta(&format!("{}_sum", names::TIME_TO_FIRST_TOKEN_SECONDS), &[]) > 0.0);
    // Buckets are cumulative: +Inf holds every sample.
    assert_eq!(
        delta(
            &format!("{}_bucket", names::TIME_TO_FIRST_TOKEN_SECONDS),
            &[("le", "+Inf")]
        ),
        requests as f64
    );

    // The three long prompts went through the prefill node and QUIC: bytes
    // sent equal bytes received, one transfer time per remote request (timed
    // at the decode node).
    let sent = delta(names::KV_TRANSFER_BYTES_TOTAL, &[("direction", "sent")]);
    let received = delta(names::KV_TRANSFER_BYTES_TOTAL, &[("direction", "received")]);
    assert!(sent > 0.0, "no KV bytes sent:\n{}", after.text);
    assert_eq!(sent, received);
    assert_eq!(delta(&count(names::KV_TRANSFER_SECONDS), &[]), 3.0);

    // Forward passes were counted on both nodes: at least one per token after
    // the long request's first.
    assert!(delta(&count(names::BATCH_SIZE), &DECODE) >= 399.0);
    assert!(delta(&count(names::BATCH_SIZE), &PREFILL) >= 3.0);

    // Gauges are back to idle: no block used, no queue.
    assert_eq!(after.get(names::KV_BLOCKS_USED, &DECODE), 0.0);
    assert_eq!(after.get(names::KV_BLOCKS_USED, &PREFILL), 0.0);
    for labels in [
        [("role", "router"), ("queue", "admission")],
        [("role", "prefill"), ("queue", "prefill")],
        [("role", "decode"), ("queue", "decode")],
    ] {
        assert_eq!(after.get(names::QUEUE_DEPTH, &labels), 0.0, "{labels:?}");
    }
    // The router's HTTP API serves the same metrics on its own /metrics, as vLLM's does.
    let api = scrape(cluster.http.expect("the router serves HTTP")).await;
    assert_eq!(
        api.get(names::KV_BLOCKS_FREE, &DECODE),
        after.get(names::KV_BLOCKS_FREE, &DECODE)
    );
    assert!(api.has(names::QUEUE_DEPTH), "{}", api.text);
    // vLLM's /ping, for load balancers that probe it: as /health.
    let mut conn = tokio::net::TcpStream::connect(cluster.http.unwrap())
        .await
        .unwrap();
    conn.write_all(
        b"POST /ping HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut pong = String::new();
    conn.read_to_string(&mut pong).await.unwrap();
    assert!(pong.starts_with("HTTP/1.1 200"), "{pong}");
    drop(cluster);
    shutdown.cancel();
}
