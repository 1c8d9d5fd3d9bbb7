//! The prefill-less fallback and the circuit breakers, with a real router,
//! decode node and prefill node on loopback and the router's metrics scraped
//! over HTTP:
//!
//! 1. The router starts before its prefill node (nothing listens at the
//!    prefill address): long prompts are prefilled on the decode node and
//!    answered correctly, and the prefill node's breaker opens.
//! 2. The prefill node starts at that address: a load report half-opens
//!    the breaker, a trial request closes it, and long prompts go to the
//!    prefill node again.
//! 3. The prefill node stops: long prompts fall back to the decode node
//!    again, all correct, and the breaker opens again.
//!
//! The recorder is global to the process, so this file holds one test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::StaticMembership;
use tandem_engine::ModelDir;
use tandem_telemetry::names;
use tandem_tests::ports::free_port;
use tandem_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// `GET /metrics`; the samples of `name` as (labels, value).
async fn samples(addr: SocketAddr, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send the scrape");
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .await
        .expect("read the scrape");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{')?;
            (n == name).then_some(())?;
            let labels = labels
                .trim_end_matches('}')
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

/// The value of `name` for `node` (and `state`, if given); 0 when absent.
async fn node_metric(addr: SocketAddr, name: &str, node: &str, state: Option<&str>) -> f64 {
    samples(addr, name)
        .await
        .into_iter()
        .filter(|(l, _)| l.get("node").map(String::as_str) == Some(node))
        .filter(|(l, _)| state.is_none_or(|s| l.get("state").map(String::as_str) == Some(s)))
        .map(|(_, v)| v)
        .sum()
}

/// Waits until the breaker gauge of `node` reads `want`.
async fn breaker_reads(metrics: SocketAddr, node: &str, want: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = node_metric(metrics, names::ROUTER_BREAKER_STATE, node, None).await;
        if v == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: the breaker reads {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs long greedy prompts through the router; every answer must be the
/// engine's own continuation.
async fn long_prompts_answer_correctly(router: SocketAddr, model: &ModelDir, salts: &[u32]) {
    let mut client =
        tandem_proto::v1::generate_client::GenerateClient::connect(format!("http://{router}"))
            .await
            .expect("connect router");
    for &salt in salts {
        let p = prompt(40, salt);
        let got = complete(&mut client, greedy_request(&p, 6))
            .await
            .unwrap_or_else(|s| panic!("a long prompt failed (salt {salt}): {s:?}"));
        assert_eq!(got.tokens, reference(model, &p, 6), "salt {salt}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_prompts_fall_back_to_the_decode_node_and_breakers_show_it() {
    let shutdown = CancellationToken::new();
    let metrics = tandem_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), shutdown.clone())
        .await
        .expect("metrics endpoint")
        .addr;
    let (_dir, model) = small_model();
    let spec = ClusterSpec::default();
    assert!(spec.decode.local_prefill_below < 40, "40 tokens go remote");

    let decode = tandem_decode::serve(model.clone(), spec.decode, shutdown.clone())
        .await
        .expect("decode node");
    // Nothing listens here yet: the router starts before its prefill node.
    let prefill_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let prefill_url = format!("http://{prefill_addr}");
    let membership = Arc::new(StaticMembership::new(
        std::slice::from_ref(&prefill_url),
        &[format!("http://{}", decode.grpc_addr)],
    ));
    let mut router_config = spec.router;
    router_config.breaker_failures = 2;
    router_config.breaker_open_ms = 300;
    let router = tandem_router::serve(
        model.clone(),
        None,
        router_config,
        membership,
        shutdown.clone(),
    )
    .await
    .expect("router");

    // 1. No prefill node: the decode node prefills, the breaker opens.
    long_prompts_answer_correctly(router.addr, &model, &[1, 2, 3]).await;
    let local = decode
        .stats
        .lock()
        .expect("stats")
        .local_prompt_tokens_total;
    assert!(
        local >= 120,
        "the decode node prefilled the prompts ({local})"
    );
    breaker_reads(metrics, &prefill_url, 2.0, "open while nothing listens").await;

    // 2. The prefill node starts there: a report half-opens the breaker and
    // the next long prompt, its trial, closes it.
    let prefill_stop = shutdown.child_token();
    let mut prefill_section = spec.prefill.expect("a prefill section");
    prefill_section.listen = prefill_addr;
    let prefill = tandem_prefill::serve(model.clone(), prefill_section, prefill_stop.clone())
        .await
        .expect("prefill node");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut salt = 10;
    while prefill.load().prompt_tokens_total == 0 {
        assert!(
            Instant::now() < deadline,
            "no long prompt reached the prefill node once it was up"
        );
        long_prompts_answer_correctly(router.addr, &model, &[salt]).await;
        salt += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    breaker_reads(metrics, &prefill_url, 0.0, "closed after a trial").await;
    let transitions = names::ROUTER_BREAKER_TRANSITIONS_TOTAL;
    assert!(node_metric(metrics, transitions, &prefill_url, Some("half-open")).await >= 1.0);
    assert!(node_metric(metrics, transitions, &prefill_url, Some("closed")).await >= 1.0);
    let remote_before = prefill.load().prompt_tokens_total;
    long_prompts_answer_correctly(router.addr, &model, &[20, 21]).await;
    assert!(
        prefill.load().prompt_tokens_total >= remote_before + 80,
        "with its breaker closed the prefill node gets the long prompts"
    );

    // 3. The prefill node stops: the decode node prefills again.
    prefill_stop.cancel();
    drop(prefill);
    let local_before = decode
        .stats
        .lock()
        .expect("stats")
        .local_prompt_tokens_total;
    long_prompts_answer_correctly(router.addr, &model, &[30, 31, 32, 33]).await;
    let local = decode
        .stats
        .lock()
        .expect("stats")
        .local_prompt_tokens_total;
    assert!(
        local >= local_before + 160,
        "the decode node prefilled the prompts after the prefill node stopped"
    );
    breaker_reads(metrics, &prefill_url, 2.0, "open again").await;
    assert!(node_metric(metrics, transitions, &prefill_url, Some("open")).await >= 2.0);
    // The decode node's breaker never moved, and its KV is all free again.
    let decode_url = format!("http://{}", decode.grpc_addr);
    assert_eq!(
        node_metric(metrics, names::ROUTER_BREAKER_STATE, &decode_url, None).await,
        0.0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = decode.stats.lock().expect("stats").clone();
        if s.kv_blocks_free == s.kv_blocks_total {
            break;
        }
        assert!(Instant::now() < deadline, "KV blocks still held: {s:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    shutdown.cancel();
}
