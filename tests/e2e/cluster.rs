//! The disaggregated cluster end to end: a router, a prefill node and a decode
//! node on loopback, talking real gRPC and real QUIC.
//!
//! (Long on purpose: one file per test binary; these tests share one cluster
//! harness and its leak check, and each starts the whole cluster.)

use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_tests::*;

/// Waits until the decode node's free blocks are back to its total.
async fn wait_for_no_leak(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (free, total) = cluster.decode_blocks();
        if free == total && total > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "decode node leaked KV blocks: {free} free of {total}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_output_through_the_cluster_equals_the_engine() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let mut client = cluster.client().await;
    // 1 token, exactly one block, one over, below and above the local-prefill threshold,
    // and prompts of several prefill chunks (chunk_tokens = 64).
    let lengths = [
        1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 100, 128, 129, 200, 333, 600,
    ];
    for (i, &len) in lengths.iter().enumerate() {
        let p = prompt(len, i as u32);
        let expected = reference(&model, &p, 12);
        let got = complete(&mut client, greedy_request(&p, 12))
            .await
            .expect("generate");
        assert_eq!(got.tokens, expected, "prompt of {len} tokens");
        assert_eq!(got.reason, pb::FinishReason::Length);
        assert_eq!(got.text, generated_text(&model, &expected));
    }
    wait_for_no_leak(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logprobs_are_the_log_softmax_of_the_engines_logits() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let mut client = cluster.client().await;
    let (n, top) = (6, 5);
    // local_prefill_below is 8: the first prompt's first token is sampled by the
    // prefill node, the second's by the decode node.
    for (path, len) in [("remote prefill", 40), ("local prefill", 5)] {
        let p = prompt(len, 11);
        let mut request = greedy_request(&p, n as u32);
        request.logprobs = Some(top as u32);
        let (tokens, logprobs) = complete_with_logprobs(&mut client, request)
            .await
            .expect(path);
        let logits = reference_logits(&model, &p, n);
        assert_eq!(tokens, reference(&model, &p, n), "{path}");
        assert_eq!(logprobs.len(), n, "{path}: one entry per token");
        for (i, ((lp, &token), logits)) in logprobs.iter().zip(&tokens).zip(&logits).enumerate() {
            let want = log_softmax(logits);
            assert_eq!(lp.id, token, "{path}, token {i}");
            let err = (f64::from(lp.logprob) - want[token as usize]).abs();
            assert!(
                err < 1e-4,
                "{path}, token {i}: {} vs {}",
                lp.logprob,
                want[token as usize]
            );
            let mut order: Vec<usize> = (0..want.len()).collect();
            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
            assert_eq!(lp.top.len(), top, "{path}, token {i}");
            for (t, &id) in lp.top.iter().zip(&order) {
                assert_eq!(t.id as usize, id, "{path}, token {i}: the top ranks");
                assert!(
                    (f64::from(t.logprob) - want[id]).abs() < 1e-4,
                    "{path}, token {i}"
                );
            }
            // Greedy: the chosen token is the most likely.
            assert_eq!(lp.top[0].id, token, "{path}, token {i}");
        }
        // Not asked, not sent.
        let (_, none) = complete_with_logprobs(&mut client, greedy_request(&p, 3))
            .await
            .expect(path);
        assert!(none.is_empty(), "{path}");
        // 0: the chosen token's alone.
        let mut request = greedy_request(&p, 2);
        request.logprobs = Some(0);
        let (_, only) = complete_with_logprobs(&mut client, request)
            .await
            .expect(path);
        assert_eq!(only.len(), 2, "{path}");
        assert!(only.iter().all(|l| l.top.is_empty()), "{path}");
    }
    // More than vLLM's 20 is refused, naming the field.
    let mut request = greedy_request(&prompt(10, 1), 2);
    request.logprobs = Some(21);
    let err = complete_with_logprobs(&mut client, request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("logprobs"), "{}", err.message());
    wait_for_no_leak(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompt_logprobs_are_each_prompt_tokens_log_softmax() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.decode.prefix_cache = true;
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;
    let top = 3;
    // One token (nothing to score), a short prompt, a remote-prefill length,
    // and one of several scoring chunks (256 positions a step).
    for len in [1, 5, 40, 600] {
        let p = prompt(len, 23);
        let mut request = greedy_request(&p, 4);
        request.prompt_logprobs = Some(top as u32);
        let got = complete(&mut client, request.clone())
            .await
            .expect("generate");
        // The prompt's KV the scoring wrote is the one the answer follows.
        assert_eq!(got.tokens, reference(&model, &p, 4), "prompt of {len}");
        let lp = got.prompt_logprobs.expect("prompt log probabilities");
        assert_eq!(lp.first_id, p[0]);
        assert_eq!(
            lp.tokens.len(),
            len - 1,
            "one per prompt token from the second on"
        );
        let want = reference_prompt_logprobs(&model, &p);
        for (i, (e, want)) in lp.tokens.iter().zip(&want).enumerate() {
            let target = p[i + 1];
            assert_eq!(e.id, target, "prompt of {len}, position {i}");
            let own = want[target as usize];
            assert!(
                (f64::from(e.logprob) - own).abs() < 1e-4,
                "prompt of {len}, position {i}: {} vs {own}",
                e.logprob
            );
            let rank = 1 + want.iter().filter(|&&w| w > own + 1e-9).count() as u32;
            assert!(
                e.rank.abs_diff(rank) <= 1,
                "prompt of {len}, position {i}: rank {} vs {rank}",
                e.rank
            );
            let mut order: Vec<usize> = (0..want.len()).collect();
            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
            assert_eq!(e.top.len(), top);
            for (t, &id) in e.top.iter().zip(&order) {
                assert!((f64::from(t.logprob) - want[id]).abs() < 1e-4);
            }
        }
        // Again, its blocks now in the prefix cache: the cache is not read,
        // every position is computed, the same numbers come back.
        let again = complete(&mut client, request).await.expect("again");
        assert_eq!(again.prompt_logprobs.expect("again").tokens, lp.tokens);
        assert_eq!(again.usage.cached_tokens, 0, "prompt of {len}");
    }
    // More than 20 is refused, naming the field.
    let mut request = greedy_request(&prompt(10, 1), 2);
    request.prompt_logprobs = Some(21);
    let err = complete(&mut client, request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("prompt_logprobs"),
        "{}",
        err.message()
    );
    wait_for_no_leak(&cluster).await;
}

/// The engine's own output for `request`'s parameters, in this process.
fn engine_output(
    model: &tandem_engine::ModelDir,
    p: &[u32],
    request: &pb::GenerateRequest,
) -> Vec<u32> {
    let backend = model.load_cpu(256, 16).expect("backend");
    let mut g = tandem_engine::local::LocalGenerator::new(backend);
    let params = tandem_engine::GenerationParams {
        sampling: tandem_cluster::convert::sampling_from_pb(request.sampling.as_ref()),
        max_tokens: request.max_tokens as usize,
        stop_token_ids: request.stop_token_ids.clone(),
        ignore_eos: request.ignore_eos,
        min_tokens: request.min_tokens as usize,
        ..Default::default()
    };
    g.generate(p, &params, &model.tokenizer, |_| {})
        .expect("engine generation")
        .tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logit_bias_and_min_tokens_over_grpc() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let mut client = cluster.client().await;
    let vocab = model.config.vocab_size as u32;
    // local_prefill_below is 8: the first token is sampled by the prefill node
    // for the first prompt, by the decode node for the second.
    for (path, len) in [("remote prefill", 40), ("local prefill", 5)] {
        let p = prompt(len, 23);
        let logits = reference_logits(&model, &p, 1).remove(0);
        let mut ranked: Vec<u32> = (0..vocab).collect();
        ranked.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let (greedy, runner_up, promoted) = (ranked[0], ranked[1], ranked[ranked.len() / 2]);

        // -100 on the greedy token: the runner-up comes first, and the rest is
        // the engine's own output under the same bias.
        let mut request = greedy_request(&p, 6);
        request.sampling = Some(pb::SamplingParams {
            logit_bias: [(greedy, -100.0)].into(),
            ..Default::default()
        });
        let got = complete(&mut client, request.clone()).await.expect(path);
        assert_eq!(got.tokens[0], runner_up, "{path}");
        assert!(!got.tokens.contains(&greedy), "{path}: {:?}", got.tokens);
        assert_eq!(got.tokens, engine_output(&model, &p, &request), "{path}");
        // +100 on a token from the middle of the ranking: greedy picks it.
        let mut request = greedy_request(&p, 1);
        request.sampling = Some(pb::SamplingParams {
            logit_bias: [(promoted, 100.0)].into(),
            ..Default::default()
        });
        let got = complete(&mut client, request).await.expect(path);
        assert_eq!(got.tokens, [promoted], "{path}");

        // The greedy first token as a stop id, EOS honoured: one token, unless
        // min_tokens holds both back.
        let mut request = greedy_request(&p, 8);
        request.ignore_eos = false;
        request.stop_token_ids = vec![greedy];
        let got = complete(&mut client, request.clone()).await.expect(path);
        assert_eq!(got.tokens, [greedy], "{path}");
        assert_eq!(got.reason, pb::FinishReason::Stop, "{path}");
        assert_eq!(
            got.stop_reason,
            Some(pb::finished::StopReason::StopTokenId(greedy)),
            "{path}"
        );
        request.min_tokens = 5;
        let got = complete(&mut client, request.clone()).await.expect(path);
        assert!(got.tokens.len() >= 5, "{path}: {:?}", got.tokens);
        let eos = &model.config.eos_token_ids;
        assert!(
            got.tokens[..5]
                .iter()
                .all(|t| *t != greedy && !eos.contains(t)),
            "{path}: {:?}",
            got.tokens
        );
        assert_eq!(got.tokens, engine_output(&model, &p, &request), "{path}");
    }
    // Refused, naming the field.
    for (bias, min_tokens, field) in [
        (vec![(vocab, 1.0)], 0, "logit_bias"),
        (vec![(5, 200.0)], 0, "logit_bias"),
        (vec![], 9, "min_tokens"),
    ] {
        let mut request = greedy_request(&prompt(10, 1), 8);
        request.min_tokens = min_tokens;
        request.sampling = Some(pb::SamplingParams {
            logit_bias: bias.into_iter().collect(),
            ..Default::default()
        });
        let err = complete(&mut client, request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    wait_for_no_leak(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_streams_batch_together() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let prompts: Vec<Vec<u32>> = (0..64)
        .map(|i| prompt(1 + (i * 37) % 150, i as u32))
        .collect();
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| reference(&model, p, 16)).collect();
    let mut tasks = Vec::new();
    for p in prompts {
        let mut client = cluster.client().await;
        tasks.push(tokio::spawn(async move {
            complete(&mut client, greedy_request(&p, 16)).await
        }));
    }
    for (task, want) in tasks.into_iter().zip(expected) {
        let got = task.await.expect("task").expect("generate");
        assert_eq!(got.tokens, want);
    }
    let batch = cluster.decode_stats.lock().unwrap().max_batch_seen;
    assert!(
        batch >= 4,
        "the decode node never batched several sequences (max batch {batch})"
    );
    wait_for_no_leak(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_goes_away_frees_everything() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let mut client = cluster.client().await;
    let request = greedy_request(&prompt(90, 1), 900);
    let mut stream = client
        .generate(request)
        .await
        .expect("generate")
        .into_inner();
    let mut seen = 0;
    while seen < 3 {
        if let Some(pb::generate_response::Event::Token(t)) = stream
            .message()
            .await
            .expect("stream")
            .and_then(|m| m.event)
        {
            seen += t.ids.len();
        }
    }
    let (free, total) = cluster.decode_blocks();
    assert!(free < total, "the request should hold blocks while running");
    drop(stream);
    drop(client);
    wait_for_no_leak(&cluster).await;

    // Go away while a long prompt is still being prefilled (chunks of 64 tokens).
    let mut client = cluster.client().await;
    let mut stream = client
        .generate(greedy_request(&prompt(900, 9), 50))
        .await
        .expect("generate")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.prefill_load().await.running == 0 {
        assert!(Instant::now() < deadline, "the prefill never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = stream.message().await;
    drop(stream);
    drop(client);
    wait_for_no_leak(&cluster).await;
    // And the cluster still serves.
    let mut client = cluster.client().await;
    let p = prompt(40, 2);
    let got = complete(&mut client, greedy_request(&p, 5))
        .await
        .expect("generate after cancel");
    assert_eq!(got.tokens, reference(&model, &p, 5));
}

/// A reservation whose KV never arrives ends at the request's `kv_timeout_ms`
/// with DEADLINE_EXCEEDED, and its blocks (and reservation) are released: the
/// decode node's only reservation timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reservation_never_filled_ends_at_its_kv_timeout() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let mut decode = pb::decode_node_client::DecodeNodeClient::connect(format!(
        "http://{}",
        cluster.decode_grpc
    ))
    .await
    .unwrap();
    let started = Instant::now();
    let mut stream = decode
        .decode(pb::DecodeRequest {
            request_id: "never-filled".into(),
            prompt: prompt(40, 5),
            max_tokens: 4,
            kv_timeout_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without an error"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("no KV timeout after 10 s"),
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    wait_for_no_leak(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_frames_on_the_quic_port_are_refused() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;

    // Reserve blocks directly at the decode node to learn its certificate.
    let mut decode = pb::decode_node_client::DecodeNodeClient::connect(format!(
        "http://{}",
        cluster.decode_grpc
    ))
    .await
    .unwrap();
    let mut reserved = decode
        .decode(pb::DecodeRequest {
            request_id: "garbage-victim".into(),
            prompt: prompt(40, 3),
            max_tokens: 4,
            kv_timeout_ms: 30_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::decode_response::Event::Admitted(admitted)) =
        reserved.message().await.unwrap().and_then(|m| m.event)
    else {
        panic!("expected Admitted first");
    };
    let target = admitted
        .kv_target
        .expect("a KV target for a remote prefill");

    // Random bytes straight at the UDP port.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..50u8 {
        udp.send_to(&[i; 300], cluster.decode_quic).await.unwrap();
    }
    // A real QUIC connection that sends garbage, then a truncated frame.
    let cert =
        tandem_kv_transfer::tls::client_config_trusting(&target.server_cert_der.clone().into())
            .unwrap();
    let client_config = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from((*cert).clone()).unwrap(),
    ));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config);
    let conn = endpoint
        .connect(cluster.decode_quic, &target.server_name)
        .unwrap()
        .await
        .unwrap();
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(b"this is not a KV frame at all, not even close........")
        .await
        .unwrap();
    let _ = s.finish();
    let mut s = conn.open_uni().await.unwrap();
    let mut frame = b"TDKV".to_vec();
    frame.extend_from_slice(&[1, 1, 0, 0]);
    frame.extend_from_slice(&target.transfer_id.to_le_bytes());
    s.write_all(&frame).await.unwrap();
    let _ = s.finish();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The victim's reservation ends (truncated frame for it, or the stream's abort) or
    // waits for its timeout; cancel it either way and check nothing leaked.
    let _ = decode
        .cancel(pb::CancelRequest {
            request_id: "garbage-victim".into(),
            attempt: 0,
        })
        .await
        .unwrap();
    drop(reserved);
    wait_for_no_leak(&cluster).await;

    // The node still serves a real request through the router, KV over QUIC included.
    let mut client = cluster.client().await;
    let p = prompt(120, 4);
    let got = complete(&mut client, greedy_request(&p, 6))
        .await
        .expect("generate after garbage");
    assert_eq!(got.tokens, reference(&model, &p, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_serves_reflection_and_health() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (_dir, model) = small_model();
    let cluster = Cluster::start(model, ClusterSpec::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.router))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["tandem.v1.Generate", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    // Only client-facing services: the nodes' are not served on this port.
    assert!(
        !names
            .iter()
            .any(|n| n.contains("DecodeNode") || n.contains("PrefillNode")),
        "{names:?}"
    );

    // v1alpha too (grpcio's reflection client speaks only v1alpha), the same list.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let requests = [
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "tandem.v1.DecodeNode".into(),
                )),
            },
        ];
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) = responses
            .message()
            .await
            .unwrap()
            .and_then(|r| r.message_response)
        else {
            panic!("expected a service list over v1alpha");
        };
        let alpha: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(alpha.iter().any(|n| n == "tandem.v1.Generate"), "{alpha:?}");
        assert!(
            !alpha
                .iter()
                .any(|n| n.contains("DecodeNode") || n.contains("PrefillNode")),
            "{alpha:?}"
        );
        // tonic-reflection ends the stream with NOT_FOUND for an unknown symbol.
        let e = responses
            .message()
            .await
            .expect_err("tandem.v1.DecodeNode must not be described");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("tandem.v1.DecodeNode"), "{e:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tandem.v1.Generate".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// The decode node's local prefill with its prefix cache on and off: greedy
/// outputs equal the engine's, seeded ones equal each other, for a repeated
/// prompt, prompts extending a cached one mid-block and at a block boundary,
/// a multi-turn chat, and more distinct prompts than the cache holds (which
/// evicts, never fails a request that fits, and leaves no block held).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_prefill_with_the_prefix_cache_changes_no_output() {
    let (_dir, model) = small_model();
    let spec = |prefix_cache: bool| {
        let mut s = ClusterSpec {
            prefill: None, // every prompt is prefilled on the decode node
            ..ClusterSpec::default()
        };
        s.decode.kv_blocks = 24;
        s.decode.prefix_cache = prefix_cache;
        s
    };
    let on = Cluster::start(model.clone(), spec(true)).await;
    let off = Cluster::start(model.clone(), spec(false)).await;
    let (mut on_client, mut off_client) = (on.client().await, off.client().await);
    let seeded = |p: &[u32]| pb::GenerateRequest {
        sampling: Some(pb::SamplingParams {
            temperature: 0.9,
            seed: Some(5),
            ..Default::default()
        }),
        ..greedy_request(p, 8)
    };
    let cached = || on.decode_stats.lock().expect("stats").cached_tokens_total;
    let mut run = async |p: &[u32]| -> (u64, Vec<u32>) {
        let before = cached();
        let got = complete(&mut on_client, greedy_request(p, 8))
            .await
            .expect("on");
        let hit = cached() - before;
        assert_eq!(got.tokens, reference(&model, p, 8), "{} tokens", p.len());
        let a = complete(&mut on_client, seeded(p))
            .await
            .expect("on, seeded");
        let b = complete(&mut off_client, seeded(p))
            .await
            .expect("off, seeded");
        assert_eq!(a.tokens, b.tokens, "seeded, {} tokens", p.len());
        (hit, got.tokens)
    };
    let base = prompt(100, 7);
    let extend = |n: usize| [base.clone(), prompt(n, 8)].concat();
    assert_eq!(run(&base).await.0, 0);
    assert_eq!(
        run(&base).await.0,
        96,
        "a repeated prompt reuses its 6 full blocks"
    );
    assert_eq!(run(&extend(10)).await.0, 96, "mid-block extension");
    assert_eq!(run(&extend(28)).await.0, 96, "to a block boundary (128)");
    assert_eq!(
        run(&extend(28)).await.0,
        112,
        "fully cached: the last block is computed"
    );
    // A multi-turn chat: the last prompt, its answer and a new message.
    let mut chat = prompt(40, 9);
    for turn in 0..3 {
        let (hit, answer) = run(&chat).await;
        assert!(turn == 0 || hit >= 32, "turn {turn} reused {hit} tokens");
        chat.extend(answer);
        chat.extend(prompt(20, 10 + turn));
    }
    // Pressure: 7 blocks per request, 24 in the cache, many distinct prompts.
    for salt in 100..108 {
        run(&prompt(100, salt)).await;
    }
    wait_for_no_leak(&on).await;
    wait_for_no_leak(&off).await;
    assert_eq!(
        off.decode_stats.lock().expect("stats").cached_tokens_total,
        0
    );
}

/// Reads a decode node's stream to its end: the token ids and the finish reason.
async fn read_decode(
    stream: &mut tonic::Streaming<pb::DecodeResponse>,
) -> (Vec<u32>, pb::FinishReason) {
    let mut tokens = Vec::new();
    let mut reason = pb::FinishReason::Unspecified;
    while let Some(msg) = stream.message().await.expect("decode stream") {
        match msg.event {
            Some(pb::decode_response::Event::Token(t)) => tokens.extend(t.ids),
            Some(pb::decode_response::Event::Finished(f)) => {
                reason = pb::FinishReason::try_from(f.reason).unwrap_or_default();
            }
            _ => {}
        }
    }
    (tokens, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_of_one_request_never_touch_each_other() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model.clone(), ClusterSpec::default()).await;
    let mut decode = pb::decode_node_client::DecodeNodeClient::connect(format!(
        "http://{}",
        cluster.decode_grpc
    ))
    .await
    .unwrap();
    // Short enough to be prefilled at the decode node itself.
    let p = prompt(4, 9);
    let request = |attempt, max_tokens| pb::DecodeRequest {
        request_id: "retried".into(),
        prompt: p.clone(),
        max_tokens,
        ignore_eos: true,
        kv_timeout_ms: 30_000,
        attempt,
        ..Default::default()
    };
    // Attempt 1 lingers on the node (the router gave up on it; nobody reads it).
    let _lingering = decode.decode(request(1, 400)).await.unwrap().into_inner();
    // The retry reaches the same node: admitted, not ALREADY_EXISTS.
    let mut second = decode
        .decode(request(2, 12))
        .await
        .expect("a retry while the old attempt lingers is admitted")
        .into_inner();
    // The failed attempt's Cancel arrives late: it ends attempt 1 only.
    let cancel = |attempt| pb::CancelRequest {
        request_id: "retried".into(),
        attempt,
    };
    assert!(decode.cancel(cancel(1)).await.unwrap().into_inner().found);
    assert!(!decode.cancel(cancel(1)).await.unwrap().into_inner().found);
    let (tokens, reason) = read_decode(&mut second).await;
    assert_eq!(reason, pb::FinishReason::Length);
    assert_eq!(
        tokens,
        reference(&model, &p, 12),
        "attempt 2 got every token"
    );
    // The same attempt twice is still refused: a conflict, not a node failure.
    let mut third = decode.decode(request(3, 50)).await.unwrap().into_inner();
    let dup = decode.decode(request(3, 50)).await.unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);
    assert!(decode.cancel(cancel(3)).await.unwrap().into_inner().found);
    let (_, reason) = read_decode(&mut third).await;
    assert_eq!(reason, pb::FinishReason::Cancelled);
    wait_for_no_leak(&cluster).await;
}

/// `usage.cached_tokens`: 0 the first time a prompt is seen, its cached full
/// blocks the second, whether the prefill node or the decode node prefilled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_prompt_reports_its_cached_tokens() {
    let (_dir, model) = small_model();
    for remote in [true, false] {
        let mut spec = ClusterSpec::default();
        if !remote {
            spec.prefill = None;
        }
        let cluster = Cluster::start(model.clone(), spec).await;
        let mut client = cluster.client().await;
        let p = prompt(100, 42);
        let first = complete(&mut client, greedy_request(&p, 4))
            .await
            .expect("first");
        let second = complete(&mut client, greedy_request(&p, 4))
            .await
            .expect("second");
        assert_eq!(first.usage.prompt_tokens, 100, "remote {remote}");
        assert_eq!(first.usage.cached_tokens, 0, "remote {remote}");
        assert_eq!(
            second.usage.cached_tokens, 96,
            "remote {remote}: the 6 full blocks of 16"
        );
        assert_eq!(first.tokens, second.tokens, "remote {remote}");
    }
}

/// Requests that leave `max_tokens` out generate to the end of the context,
/// as vLLM's do. Four of them, shipped from the prefill node, need more KV
/// than the decode node's cache holds at full length (63 blocks each of 150):
/// the node takes blocks as they grow, preempts the newest when none is
/// free and prefills it again later, and every request ends with the tokens
/// it would have had alone, with no block left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_to_the_end_of_the_context_finish_through_preemption() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.decode.kv_blocks = 150;
    let cluster = Cluster::start(model.clone(), spec).await;
    let context = model.config.max_position_embeddings;
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(24, 40 + i)).collect();
    let mut runs = Vec::new();
    for p in &prompts {
        let mut client = cluster.client().await;
        let request = greedy_request(p, 0);
        runs.push(tokio::spawn(
            async move { complete(&mut client, request).await },
        ));
    }
    for (p, run) in prompts.iter().zip(runs) {
        let got = run.await.expect("task").expect("completed");
        assert_eq!(got.reason, pb::FinishReason::Length);
        assert_eq!(
            got.tokens.len(),
            context - p.len(),
            "the rest of the context"
        );
        assert_eq!(got.tokens, reference(&model, p, context - p.len()));
    }
    let preemptions = cluster
        .decode_stats
        .lock()
        .expect("stats")
        .preemptions_total;
    assert!(preemptions > 0, "no request was preempted");
    wait_for_no_leak(&cluster).await;
}
