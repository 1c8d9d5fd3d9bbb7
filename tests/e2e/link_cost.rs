//! Disaggregate when the link pays, through a real cluster: the prefill
//! node's KV sends are capped (`[prefill] max_send_rate_mbps`, a token bucket
//! in the KV sender, so the QUIC link is slow for real), the decode node
//! measures the rate it achieves, and once it has, long prompts are
//! prefilled on the decode node (`reason="link_slow"` in
//! `tandem_prefill_decisions_total`). Every request's timing spans reach the
//! client (`Timings.spans`) and the router's span histogram; a shipped
//! prompt's first token reaches the client ahead of its KV.
//!
//! The metrics recorder is global to the process, so this file holds one test.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_telemetry::names;
use tandem_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// `GET /metrics`, the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    conn.read_to_string(&mut response).await.expect("response");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    body.to_string()
}

/// The sum of the samples of `name` whose labels contain `label` (0 when none).
fn sample(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Runs one greedy request of 4 tokens; returns its final message and tokens.
async fn finished_with_tokens(
    client: &mut pb::generate_client::GenerateClient<tonic::transport::Channel>,
    prompt: &[u32],
) -> (pb::Finished, Vec<u32>) {
    let mut stream = client
        .generate(greedy_request(prompt, 4))
        .await
        .expect("generate")
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(msg) = stream.message().await.expect("stream") {
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => tokens.extend(t.ids),
            Some(pb::generate_response::Event::Finished(f)) => return (f, tokens),
            _ => {}
        }
    }
    panic!("the stream ended without Finished");
}

/// Runs one greedy request of 4 tokens; returns its final message.
async fn finished(
    client: &mut pb::generate_client::GenerateClient<tonic::transport::Channel>,
    prompt: &[u32],
) -> pb::Finished {
    finished_with_tokens(client, prompt).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_link_makes_long_prompts_prefill_locally() {
    let shutdown = CancellationToken::new();
    let metrics = tandem_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), shutdown.clone())
        .await
        .expect("metrics endpoint")
        .addr;
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    // A short prompt of 150 tokens teaches the decode node its prefill rate: a
    // pass's fixed costs weigh less than in one of 24 (whose rate, a cold
    // debug build's, was once low enough to keep the first long prompts remote).
    spec.decode.local_prefill_below = 200;
    let prefill = spec.prefill.as_mut().expect("a prefill node");
    // 2 Mbit/s: a 600-token prompt's ~460 KB of KV take about 1.9 s on the
    // wire, while this model prefills it here in milliseconds (0.1 s in a
    // debug build on two busy cores). Shipping must cost more than twice the
    // local estimate (the transfer overlaps the remote compute), so the
    // margin is wide: at 16 Mbit/s (0.23 s) CI once saw the first long
    // prompts, and one after `link_slow`, rightly go remote.
    prefill.max_send_rate_mbps = Some(2.0);
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;

    // A short prompt is prefilled here, which measures this node's rate.
    let short = finished(&mut client, &prompt(150, 1)).await;
    let spans = short.timings.and_then(|t| t.spans).expect("spans");
    assert!(
        spans.prefill_computed > 0.0 && spans.kv_sent == 0.0,
        "{spans:?}"
    );

    // Long prompts (distinct: no prefix cache hits) go remote while the
    // link is not measured (or no prefill node has reported yet), until a
    // measured transfer shows the link slow.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut remote_spans = None;
    let mut salt = 2;
    let text = loop {
        let p = prompt(600, salt);
        let (f, tokens) = finished_with_tokens(&mut client, &p).await;
        salt += 1;
        if let Some(s) = f.timings.and_then(|t| t.spans)
            && s.kv_sent > 0.0
        {
            // The first token went ahead of the KV, once, and the rest followed it.
            assert_eq!(tokens, reference(&model, &p, 4), "{s:?}");
            remote_spans = Some(s);
        }
        let text = scrape(metrics).await;
        if sample(
            &text,
            names::PREFILL_DECISIONS_TOTAL,
            "reason=\"link_slow\"",
        ) >= 1.0
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no long prompt was prefilled locally:\n{text}"
        );
    };
    // Shipped at least once, at about the capped rate (0.25 MB/s; the frames'
    // headers and slicing make it a little lower, never above).
    assert!(
        sample(&text, names::PREFILL_DECISIONS_TOTAL, "reason=\"remote\"") >= 1.0,
        "{text}"
    );
    let rate = sample(&text, names::KV_LINK_RATE_BYTES_PER_SECOND, "peer=");
    assert!(
        rate > 62.5e3 && rate < 312.5e3,
        "measured {rate} B/s\n{text}"
    );
    let s = remote_spans.expect("a remote prefill's spans");
    assert!(
        s.routed > 0.0
            && s.prefill_started >= s.routed
            && s.prefill_computed >= s.prefill_started
            && s.kv_sent >= s.prefill_computed
            && s.kv_imported > 0.0
            && s.first_step >= s.kv_imported,
        "{s:?}"
    );
    // Its ~467 KB of KV cannot have left faster than the cap (0.25 MB/s).
    assert!(s.kv_sent - s.prefill_started >= 1.6, "{s:?}");
    // The first token went ahead of the KV (the prefill node's Final frame
    // overtakes its layers): it reached the client about when the prefill's
    // compute ended, and the KV landed later by at least the last layer's
    // time on the wire (it leaves only once computed: a third of the KV,
    // ~0.6 s at the cap). Layers computed earlier are sent meanwhile, so how
    // much more depends on how long the compute took (milliseconds alone,
    // 0.2 s on two cores busy with other builds).
    assert!(
        s.first_token_sent >= s.prefill_computed && s.first_token_sent + 0.05 < s.kv_imported,
        "{s:?}"
    );

    // The next long prompt is prefilled here too: no KV crosses the link.
    let local = finished(&mut client, &prompt(600, salt)).await;
    let spans = local.timings.and_then(|t| t.spans).expect("spans");
    assert_eq!(spans.kv_sent, 0.0, "{spans:?}");
    assert!(spans.prefill_computed > 0.0, "{spans:?}");

    // The router recorded the phases.
    let text = scrape(metrics).await;
    let count = format!("{}_count", names::REQUEST_SPAN_SECONDS);
    assert!(
        sample(&text, &count, "span=\"kv_send_tail\"") >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, &count, "span=\"prefill_compute\"") >= 3.0,
        "{text}"
    );
    shutdown.cancel();
}
