//! Security and overload end to end: mutual TLS between the router and the
//! nodes (the QUIC KV transport and the internal gRPC services), API keys
//! and rate limits on the router, and 2,000 concurrent streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::{Member, Role, StaticMembership, TlsSection, grpc_tls};
use tandem_kv_transfer::ClusterCa;
use tandem_proto::v1 as pb;
use tandem_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

async fn wait_for_no_leak(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
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

/// Writes `ca` and a certificate for `name` (valid for localhost and
/// 127.0.0.1, the addresses the harness dials) into `dir`.
fn write_certs(dir: &std::path::Path, ca: &ClusterCa, name: &str) -> TlsSection {
    tandem_tests::write_certs(dir, ca, name, &["localhost", "127.0.0.1"])
}

/// Tries a QUIC connection to the KV receiver with `tls` and sends a byte on
/// a stream; `true` if the receiver kept the connection open for a while.
async fn quic_peer_accepted(
    addr: std::net::SocketAddr,
    tls: Arc<rustls_client::ClientConfig>,
) -> bool {
    let client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from((*tls).clone()).unwrap(),
    ));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config);
    let conn = match endpoint.connect(addr, "localhost").unwrap().await {
        Ok(c) => c,
        Err(_) => return false,
    };
    // In TLS 1.3 the server checks the client's certificate after the client
    // considers the handshake done: a refusal shows as the connection closing.
    if let Ok(mut s) = conn.open_uni().await {
        let _ = s.write_all(b"x").await;
    }
    tokio::time::timeout(Duration::from_secs(2), conn.closed())
        .await
        .is_err()
}

mod rustls_client {
    pub use rustls::ClientConfig;
}

/// The whole cluster's `[tls]`: a CA and one certificate per role, in `dir`.
struct ClusterCerts {
    decode: TlsSection,
    prefill: TlsSection,
    router: TlsSection,
}

impl ClusterCerts {
    fn write(dir: &std::path::Path, ca: &ClusterCa) -> ClusterCerts {
        ClusterCerts {
            decode: write_certs(dir, ca, "decode"),
            prefill: write_certs(dir, ca, "prefill"),
            router: write_certs(dir, ca, "router"),
        }
    }

    /// A cluster spec with `[tls]` on every role.
    fn spec(&self) -> ClusterSpec {
        let mut spec = ClusterSpec::default();
        spec.decode.tls = Some(self.decode.clone());
        spec.prefill.as_mut().unwrap().tls = Some(self.prefill.clone());
        spec.router.tls = Some(self.router.clone());
        spec
    }
}

/// A gRPC client's TLS: trust the CA in `trust`, present `identity`'s
/// certificate when given.
fn grpc_client_tls(trust: &TlsSection, identity: Option<&TlsSection>) -> ClientTlsConfig {
    let ca = Certificate::from_pem(std::fs::read(&trust.ca).unwrap());
    let config = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    match identity {
        Some(id) => config.identity(Identity::from_pem(
            std::fs::read(&id.cert).unwrap(),
            std::fs::read(&id.key).unwrap(),
        )),
        None => config,
    }
}

/// Asks a node's internal gRPC port for one load report, as the router does:
/// over TLS with `tls`, plaintext without. `Err` says where it was refused.
async fn grpc_load(
    addr: std::net::SocketAddr,
    role: Role,
    tls: Option<ClientTlsConfig>,
) -> Result<pb::NodeLoad, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {}", grpc_tls::error_chain(&e)))?;
    let request = pb::WatchLoadRequest { interval_ms: 10 };
    let opened = match role {
        Role::Decode => pb::decode_node_client::DecodeNodeClient::new(channel)
            .watch_load(request)
            .await
            .map(|r| r.into_inner()),
        Role::Prefill => pb::prefill_node_client::PrefillNodeClient::new(channel)
            .watch_load(request)
            .await
            .map(|r| r.into_inner()),
    };
    // A status the server sent has no source; one the client made from a
    // broken connection carries the transport error.
    let call_err = |s: tonic::Status| {
        let origin = match std::error::Error::source(&s) {
            Some(e) => format!("transport: {}", grpc_tls::error_chain(e)),
            None => "sent by the server".into(),
        };
        format!("call: {:?}: {} ({origin})", s.code(), s.message())
    };
    let mut stream = opened.map_err(call_err)?;
    match stream.message().await {
        Ok(Some(load)) => Ok(load),
        Ok(None) => Err("call: the stream ended".into()),
        Err(s) => Err(call_err(s)),
    }
}

/// `true` when the error shows the connection refused, not a request
/// answered: the connection attempt failed, or the first call on it broke
/// in the transport. In TLS 1.3 the server checks a client's certificate
/// after the client considers the handshake done, so the client learns of
/// the refusal under its first call, as the server's `CertificateRequired`
/// alert or the connection closing; tonic then says `UNKNOWN`, `CANCELLED`
/// or `UNAVAILABLE` depending on which it read first. A status the server
/// sent does not count.
fn refused_at_handshake(err: &str) -> bool {
    err.starts_with("connect: ") || (err.starts_with("call: ") && err.contains("(transport: "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_on_every_role_serves_members_and_refuses_strangers() {
    let (_dir, model) = small_model();
    let certs = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("test cluster CA").unwrap();
    let cluster_certs = ClusterCerts::write(certs.path(), &ca);
    let cluster = Cluster::start(model.clone(), cluster_certs.spec()).await;
    let prefill_tls = cluster_certs.prefill.clone();

    // A long prompt (past decode.local_prefill_below) goes through the prefill
    // node: router -> decode and router -> prefill over mutual-TLS gRPC, its
    // KV over mutual-TLS QUIC.
    let mut client = cluster.client().await;
    let p = prompt(120, 9);
    let got = complete(&mut client, greedy_request(&p, 5))
        .await
        .expect("generate over mutual TLS");
    assert_eq!(got.tokens, reference(&model, &p, 5));
    assert!(
        cluster.prefill_load().await.node_id.starts_with("prefill"),
        "the harness reads the prefill node's load over mutual TLS"
    );

    // QUIC KV. A member's certificate is accepted...
    use tandem_kv_transfer::tls::{client_config_from_pem, client_config_trusting};
    let member =
        client_config_from_pem(&prefill_tls.ca, Some((&prefill_tls.cert, &prefill_tls.key)))
            .unwrap();
    assert!(quic_peer_accepted(cluster.decode_quic, member).await);
    // ...a peer with no client certificate is refused...
    let anonymous = client_config_from_pem(&prefill_tls.ca, None).unwrap();
    assert!(!quic_peer_accepted(cluster.decode_quic, anonymous).await);
    // ...and so is one whose certificate another CA signed.
    let other_ca = ClusterCa::generate("another CA").unwrap();
    let other = write_certs(certs.path(), &other_ca, "stranger");
    let stranger =
        client_config_from_pem(&prefill_tls.ca, Some((&other.cert, &other.key))).unwrap();
    assert!(!quic_peer_accepted(cluster.decode_quic, stranger).await);
    // A peer trusting only a self-signed certificate cannot even verify the node.
    let selfsigned = tandem_kv_transfer::SelfSigned::generate(&["localhost"]).unwrap();
    let naive = client_config_trusting(&selfsigned.cert).unwrap();
    assert!(!quic_peer_accepted(cluster.decode_quic, naive).await);

    // Internal gRPC, on the decode node's and the prefill node's ports.
    let prefill_grpc = cluster.prefill_grpc.unwrap();
    for (role, addr) in [
        (Role::Decode, cluster.decode_grpc),
        (Role::Prefill, prefill_grpc),
    ] {
        // A member's certificate is served (the router's, here)...
        let router_tls = grpc_client_tls(&cluster_certs.router, Some(&cluster_certs.router));
        let load = grpc_load(addr, role, Some(router_tls))
            .await
            .unwrap_or_else(|e| panic!("{role:?} refused a member: {e}"));
        assert!(load.kv_blocks_total > 0);
        // ...a client with no certificate is refused...
        let err = grpc_load(addr, role, Some(grpc_client_tls(&prefill_tls, None)))
            .await
            .expect_err("a client without a certificate was served");
        eprintln!("{role:?} gRPC, no client certificate: {err}");
        assert!(refused_at_handshake(&err), "{role:?}: {err}");
        // ...so is one whose certificate another CA signed...
        let err = grpc_load(
            addr,
            role,
            Some(grpc_client_tls(&prefill_tls, Some(&other))),
        )
        .await
        .expect_err("a client with another CA's certificate was served");
        eprintln!("{role:?} gRPC, another CA's client certificate: {err}");
        assert!(refused_at_handshake(&err), "{role:?}: {err}");
        // ...and a plaintext client.
        let err = grpc_load(addr, role, None)
            .await
            .expect_err("a plaintext client was served");
        eprintln!("{role:?} gRPC, plaintext client: {err}");
        assert!(refused_at_handshake(&err), "{role:?}: {err}");
        // A client with a member's certificate that trusts another CA does
        // not accept the node either (it is the node that fails the check).
        let err = grpc_load(
            addr,
            role,
            Some(grpc_client_tls(&other, Some(&prefill_tls))),
        )
        .await
        .expect_err("a client trusting another CA accepted the node");
        assert!(err.starts_with("connect: "), "{role:?}: {err}");
    }

    // The cluster still works, through the prefill node.
    let p = prompt(100, 10);
    let got = complete(&mut client, greedy_request(&p, 4))
        .await
        .expect("generate after strangers");
    assert_eq!(got.tokens, reference(&model, &p, 4));
    wait_for_no_leak(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_router_dials_no_node_without_a_cluster_certificate() {
    let (_dir, model) = small_model();
    let certs = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("test cluster CA").unwrap();
    let router_tls = write_certs(certs.path(), &ca, "router");
    let other_ca = ClusterCa::generate("another CA").unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut spec = ClusterSpec::default();
    // A decode node whose certificate another CA signed, and one with no TLS at all.
    spec.decode.tls = Some(write_certs(certs.path(), &other_ca, "impostor"));
    let impostor = tandem_decode::serve(model.clone(), spec.decode.clone(), shutdown.clone())
        .await
        .unwrap();
    spec.decode.tls = None;
    let plain = tandem_decode::serve(model.clone(), spec.decode, shutdown.clone())
        .await
        .unwrap();
    let mut router = spec.router;
    router.tls = Some(router_tls);
    router.request_timeout_s = 20.0;
    for (what, addr) in [
        (
            "another CA's certificate",
            format!("https://{}", impostor.grpc_addr),
        ),
        ("no TLS", format!("http://{}", plain.grpc_addr)),
    ] {
        let members = StaticMembership::from_members(vec![Member::new(Role::Decode, addr)]);
        let r = tandem_router::serve(
            model.clone(),
            None,
            router.clone(),
            Arc::new(members),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut client = pb::generate_client::GenerateClient::connect(format!("http://{}", r.addr))
            .await
            .unwrap();
        let started = Instant::now();
        let err = complete(&mut client, greedy_request(&prompt(4, 1), 2))
            .await
            .expect_err("a request was served by a node without a cluster certificate");
        eprintln!(
            "decode node with {what}: {:?} after {:?}: {}",
            err.code(),
            started.elapsed(),
            err.message()
        );
        assert_eq!(err.code(), Code::Unavailable, "{what}: {err:?}");
    }
    for node in [&impostor, &plain] {
        let s = node.stats.lock().unwrap();
        assert_eq!(
            s.steps_total, 0,
            "a node without a cluster certificate ran work"
        );
        assert_eq!(s.kv_blocks_free, s.kv_blocks_total);
    }
}

/// One HTTP/1.1 request; returns the status, the raw head and the body.
async fn http(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

fn with_key(mut req: pb::GenerateRequest, key: &str) -> tonic::Request<pb::GenerateRequest> {
    req.max_tokens = req.max_tokens.max(1);
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_and_rate_limits() {
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.router.api_keys = vec!["key-a".into(), "key-b".into()];
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    spec.router.rate_limit_rps = Some(2.0);
    spec.router.rate_limit_tokens_per_min = Some(2000.0);
    let cluster = Cluster::start(model.clone(), spec).await;
    let mut client = cluster.client().await;
    let req = || greedy_request(&prompt(6, 1), 2);

    // gRPC: no key, a wrong key, a malformed header.
    let err = client.generate(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("API key"), "{err:?}");
    let err = client.generate(with_key(req(), "nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // The right key works.
    let mut stream = client
        .generate(with_key(req(), "key-a"))
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}

    // Requests/s: key-a has a burst of 2 and just used 1; the third in a row is refused.
    let _ = client.generate(with_key(req(), "key-a")).await.unwrap();
    let err = client.generate(with_key(req(), "key-a")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("requests/s"), "{err:?}");
    let retry: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // Keys are limited separately.
    let _ = client.generate(with_key(req(), "key-b")).await.unwrap();

    // Tokens/min: a bucket of 2000 refilled at 33/s; requests of 908 tokens (prompt 8 +
    // max_tokens 900): two fit, the third does not. (The two streams stay
    // open: a request that ends gives back the tokens it did not generate.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut big = greedy_request(&prompt(8, 2), 900);
    big.max_tokens = 900;
    let _first = client
        .generate(with_key(big.clone(), "key-b"))
        .await
        .unwrap();
    // (a pause between, so the requests/s limit stays out of the way)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _second = client
        .generate(with_key(big.clone(), "key-b"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = client.generate(with_key(big, "key-b")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("tokens/min"), "{err:?}");
    drop((_first, _second));

    // HTTP: 401 in OpenAI's shape, then 200 with the key, then 429 with Retry-After.
    let http_addr = cluster.http.unwrap();
    let body = br#"{"prompt": "hello", "max_tokens": 2}"#;
    let (status, _, text) = http(http_addr, "/v1/completions", &[], body).await;
    assert_eq!(status, 401, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error", "{text}");
    let (status, _, text) = http(
        http_addr,
        "/v1/completions",
        &[("authorization", "Bearer wrong")],
        body,
    )
    .await;
    assert_eq!(status, 401, "{text}");
    // A client without a key learns that before anything about its body.
    let (status, _, _) = http(http_addr, "/v1/completions", &[], b"{not json").await;
    assert_eq!(status, 401);
    // Every /v1 route needs the key, the model list too (as vLLM's --api-key).
    let get = |path: &'static str, key: Option<&'static str>| async move {
        let mut s = tokio::net::TcpStream::connect(http_addr).await.unwrap();
        let auth = key
            .map(|k| format!("authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{auth}\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).to_string()
    };
    assert!(get("/v1/models", None).await.starts_with("HTTP/1.1 401"));
    assert!(
        get("/v1/models", Some("key-a"))
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(get("/health", None).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let auth = [("authorization", "Bearer key-a")];
    let (status, _, text) = http(http_addr, "/v1/completions", &auth, body).await;
    assert_eq!(status, 200, "{text}");
    let mut refused = None;
    for _ in 0..4 {
        let (status, head, text) = http(http_addr, "/v1/completions", &auth, body).await;
        if status == 429 {
            refused = Some((head, text));
            break;
        }
    }
    let (head, text) = refused.expect("a 429 past 2 requests/s");
    assert!(head.contains("retry-after: "), "{head}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{text}");
    wait_for_no_leak(&cluster).await;
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_concurrent_streams_complete_or_are_refused() {
    const STREAMS: usize = 2000;
    let (_dir, model) = small_model();
    let mut spec = ClusterSpec::default();
    spec.router.max_running = 128;
    spec.router.max_queue = 512;
    let cluster = Cluster::start(model.clone(), spec).await;
    let before = peak_rss_mib();
    // Several connections, as many clients would open.
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(cluster.client().await);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let mut client = clients[i % clients.len()].clone();
        tasks.spawn(async move {
            let req = greedy_request(&prompt(4, i as u32), 2);
            tokio::time::timeout(Duration::from_secs(90), complete(&mut client, req)).await
        });
    }
    let (mut done, mut refused) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Err(_) => panic!("a stream hung past its 90 s timeout"),
            Ok(Ok(c)) => {
                assert_eq!(c.tokens.len(), 2);
                done += 1;
            }
            Ok(Err(s)) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.metadata().get("retry-after").is_some(), "{s:?}");
                refused += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    let peak = peak_rss_mib();
    eprintln!(
        "{STREAMS} streams in {elapsed:.1?}: {done} completed, {refused} refused; \
         peak RSS of the whole test process (router + nodes + clients) {peak:.0} MiB \
         (before the streams: {before:.0} MiB)"
    );
    assert_eq!(done + refused, STREAMS);
    assert!(done >= 128, "{done} completed");
    assert!(peak < 1024.0, "peak RSS {peak:.0} MiB");
    wait_for_no_leak(&cluster).await;
    let load = cluster.prefill_load().await;
    assert_eq!(load.kv_blocks_free, load.kv_blocks_total);
}
