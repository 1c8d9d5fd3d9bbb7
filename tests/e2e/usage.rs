//! Usage per API key through a real cluster: per-key request, refusal and
//! token counters in the Prometheus scrape (labelled with the key's name,
//! never its secret), a key's tokens-per-minute quota refusing a request
//! with RESOURCE_EXHAUSTED over gRPC and 429 with Retry-After over HTTP, and
//! a beam search over HTTP counted and charged once, as the one request its
//! client sent, however many steps it takes, and a completions batch counted
//! once against the key's requests per second.
//!
//! The recorder is global to the process, so this file holds one test.

use tandem_proto::v1 as pb;
use tandem_telemetry::names;
use tandem_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// The value of `metric{key="<key>"[, reason="<reason>"]}` in a scrape; 0 if absent.
fn sample(scrape: &str, metric: &str, key: &str, reason: Option<&str>) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| l.contains(&format!("key=\"{key}\"")))
        .filter(|l| reason.is_none_or(|r| l.contains(&format!("reason=\"{r}\""))))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn with_key(req: pb::GenerateRequest, key: &str) -> tonic::Request<pb::GenerateRequest> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// Token ids as a JSON array's items.
fn ids(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// One HTTP/1.1 POST of a completion; returns the status and the lowercased head.
async fn post_completion(addr: std::net::SocketAddr, key: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\nauthorization: Bearer {key}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_is_counted_per_key_and_a_key_over_its_quota_is_refused() {
    let metrics = tandem_telemetry::install_recorder().expect("recorder");
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    let config = tandem_cluster::Config::parse(
        "[router]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         [[router.keys]]\nname = \"team-a\"\nkey = \"sk-secret-a\"\ntokens_per_min = 100\n\
         [[router.keys]]\nname = \"team-b\"\nkey = \"sk-secret-b\"\n\
         [[router.keys]]\nname = \"team-c\"\nkey = \"sk-secret-c\"\nrequests_per_s = 1\n\
         tokens_per_min = 60\n\
         [[router.keys]]\nname = \"team-d\"\nkey = \"sk-secret-d\"\nrequests_per_s = 1\n",
    )
    .unwrap();
    spec.router = config.router.unwrap();
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;
    let scrape = || metrics.render();

    // Every key is exported from the start, at 0.
    let before = scrape();
    assert!(
        before.contains(&format!(
            "{}{{key=\"team-b\"}} 0",
            names::API_KEY_REQUESTS_TOTAL
        )),
        "{before}"
    );

    // team-a: 20 prompt tokens + 10 generated, then 10 + 5.
    let p = prompt(20, 4);
    let got = complete_keyed(&mut client, greedy_request(&p, 10), "sk-secret-a")
        .await
        .unwrap();
    assert_eq!(got.tokens, reference(&model, &p, 10));
    let p2 = prompt(10, 5);
    complete_keyed(&mut client, greedy_request(&p2, 5), "sk-secret-a")
        .await
        .unwrap();
    // team-b: 12 + 3.
    complete_keyed(
        &mut client,
        greedy_request(&prompt(12, 6), 3),
        "sk-secret-b",
    )
    .await
    .unwrap();

    // team-a has used 45 of its 100 tokens a minute; a request reserving
    // 30 + 80 = 110 (a full minute's worth, at most) must wait.
    let err = complete_keyed(
        &mut client,
        greedy_request(&prompt(30, 7), 80),
        "sk-secret-a",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("tokens/min"), "{}", err.message());
    let wait: u64 = err
        .metadata()
        .get("retry-after")
        .expect("retry-after")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "retry-after {wait}");
    // Over HTTP: 429 with Retry-After.
    let http = cluster.http.expect("the router serves HTTP");
    let body = format!(
        "{{\"model\":\"{}\",\"prompt\":[{}],\"max_tokens\":90}}",
        model.name(),
        ids(&prompt(30, 8))
    );
    let (status, head) = post_completion(http, "sk-secret-a", &body).await;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("retry-after:"), "{head}");
    // team-b is not held back by team-a's quota.
    complete_keyed(&mut client, greedy_request(&prompt(8, 9), 2), "sk-secret-b")
        .await
        .unwrap();
    // team-c may send one request a second and 60 tokens a minute. A beam
    // search of 2 beams and 6 tokens after a 10-token prompt reserves
    // 10 + 2 · 6 = 22 of them, once; its dozen steps (each a call with the
    // prompt and the beam so far) take nothing more.
    let beam_prompt = prompt(10, 10);
    let body = format!(
        "{{\"model\":\"{}\",\"prompt\":[{}],\"max_tokens\":6,\"n\":2,\
         \"use_beam_search\":true,\"ignore_eos\":true,\"temperature\":0}}",
        model.name(),
        ids(&beam_prompt)
    );
    let (status, head) = post_completion(http, "sk-secret-c", &body).await;
    assert_eq!(status, 200, "{head}");
    // team-d, one request a second, sends a batch of three prompts: one
    // request, though each prompt is a call of its own.
    let batch = [prompt(6, 11), prompt(7, 12), prompt(8, 13)];
    let body = format!(
        "{{\"model\":\"{}\",\"prompt\":[[{}],[{}],[{}]],\"max_tokens\":2,\
         \"ignore_eos\":true,\"temperature\":0}}",
        model.name(),
        ids(&batch[0]),
        ids(&batch[1]),
        ids(&batch[2])
    );
    let (status, head) = post_completion(http, "sk-secret-d", &body).await;
    assert_eq!(status, 200, "{head}");
    // A request without a valid key belongs to no key.
    let err = complete_keyed(&mut client, greedy_request(&p, 2), "sk-wrong")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let after = scrape();
    let a = |metric, reason| sample(&after, metric, "team-a", reason);
    let b = |metric, reason| sample(&after, metric, "team-b", reason);
    assert_eq!(a(names::API_KEY_REQUESTS_TOTAL, None), 4.0, "{after}");
    assert_eq!(
        a(names::API_KEY_REFUSALS_TOTAL, Some("tokens_per_min")),
        2.0
    );
    assert_eq!(
        a(names::API_KEY_PROMPT_TOKENS_TOTAL, None),
        (p.len() + p2.len()) as f64
    );
    assert_eq!(a(names::API_KEY_COMPLETION_TOKENS_TOTAL, None), 15.0);
    assert_eq!(b(names::API_KEY_REQUESTS_TOTAL, None), 2.0);
    assert_eq!(b(names::API_KEY_REFUSALS_TOTAL, None), 0.0);
    assert_eq!(b(names::API_KEY_PROMPT_TOKENS_TOTAL, None), 20.0);
    assert_eq!(b(names::API_KEY_COMPLETION_TOKENS_TOTAL, None), 5.0);
    let c = |metric, reason| sample(&after, metric, "team-c", reason);
    assert_eq!(c(names::API_KEY_REQUESTS_TOTAL, None), 1.0, "{after}");
    assert_eq!(c(names::API_KEY_REFUSALS_TOTAL, None), 0.0, "{after}");
    assert_eq!(c(names::API_KEY_PROMPT_TOKENS_TOTAL, None), 10.0);
    assert_eq!(c(names::API_KEY_COMPLETION_TOKENS_TOTAL, None), 12.0);
    let d = |metric, reason| sample(&after, metric, "team-d", reason);
    assert_eq!(d(names::API_KEY_REQUESTS_TOTAL, None), 1.0, "{after}");
    assert_eq!(d(names::API_KEY_REFUSALS_TOTAL, None), 0.0, "{after}");
    assert_eq!(d(names::API_KEY_PROMPT_TOKENS_TOTAL, None), 21.0);
    assert_eq!(d(names::API_KEY_COMPLETION_TOKENS_TOTAL, None), 6.0);
    assert!(
        !after.contains("sk-secret"),
        "a secret leaked into the metrics"
    );
    assert!(!after.contains("sk-wrong"));
}

async fn complete_keyed(
    client: &mut pb::generate_client::GenerateClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
    key: &str,
) -> Result<Completion, tonic::Status> {
    complete_request(client, with_key(req, key)).await
}
