//! etcd membership end to end, in one process: a real etcd, nodes that
//! register themselves, and a router that follows etcd. Requests go through
//! the router and produce the engine's tokens; nodes leave and join; etcd
//! goes away and comes back (with its data, and blank).
//!
//! The router's view is the `EtcdMembership` it was handed; its node pool
//! applies each change within microseconds. With `[tls]`, nodes register
//! `https://` addresses and their certificate names, which the router checks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::membership::Membership;
use tandem_cluster::{
    Capacity, EtcdMembership, EtcdSection, NodeRecord, Registration, Role, TlsSection, grpc_tls,
};
use tandem_engine::ModelDir;
use tandem_tests::etcd_server::EtcdServer;
use tandem_tests::*;
use tokio_util::sync::CancellationToken;

/// Lease TTL of the test nodes (etcd's minimum here is 1 s).
const TTL_S: u32 = 2;

fn section(etcd: &EtcdServer, cluster: &str) -> EtcdSection {
    EtcdSection {
        endpoints: vec![etcd.url()],
        cluster: cluster.into(),
        lease_ttl_s: TTL_S,
    }
}

/// A node serving in this process, registered in etcd.
struct Node {
    id: String,
    addr: String,
    registration: Option<Registration>,
    stats: Option<Arc<std::sync::Mutex<tandem_decode::scheduler::Stats>>>,
    shutdown: CancellationToken,
}

impl Node {
    async fn decode(model: &Arc<ModelDir>, etcd: &EtcdSection, id: &str) -> Node {
        Self::decode_with(model, etcd, id, None).await
    }

    /// A decode node; with `tls`, serving mutual TLS and registering its
    /// `https://` address and `server_name`, as `tandem decode` does.
    async fn decode_with(
        model: &Arc<ModelDir>,
        etcd: &EtcdSection,
        id: &str,
        tls: Option<TlsSection>,
    ) -> Node {
        let mut config =
            tandem_cluster::Config::parse("[decode]\nkv_blocks = 1024\nlocal_prefill_below = 8\n")
                .unwrap()
                .decode
                .unwrap();
        config.id = id.into();
        config.tls = tls.clone();
        let shutdown = CancellationToken::new();
        let d = tandem_decode::serve(model.clone(), config, shutdown.clone())
            .await
            .expect("decode node");
        let addr = format!("{}://{}", grpc_tls::scheme(tls.is_some()), d.grpc_addr);
        let mut record = record(model, "decode", id, &addr, d.quic_addrs.clone());
        record.tls_name = tls.map(|t| t.server_name);
        Node {
            id: id.into(),
            addr,
            registration: Some(Registration::start(etcd.clone(), record).unwrap()),
            stats: Some(d.stats),
            shutdown,
        }
    }

    async fn prefill(model: &Arc<ModelDir>, etcd: &EtcdSection, id: &str) -> Node {
        Self::prefill_with(model, etcd, id, None).await
    }

    /// A prefill node; with `tls` as [`Node::decode_with`].
    async fn prefill_with(
        model: &Arc<ModelDir>,
        etcd: &EtcdSection,
        id: &str,
        tls: Option<TlsSection>,
    ) -> Node {
        let mut config =
            tandem_cluster::Config::parse("[prefill]\nchunk_tokens = 64\nkv_blocks = 512\n")
                .unwrap()
                .prefill
                .unwrap();
        config.id = id.into();
        config.tls = tls.clone();
        let shutdown = CancellationToken::new();
        let p = tandem_prefill::serve(model.clone(), config, shutdown.clone())
            .await
            .expect("prefill node");
        let addr = format!("{}://{}", grpc_tls::scheme(tls.is_some()), p.addr);
        let mut record = record(model, "prefill", id, &addr, Vec::new());
        record.tls_name = tls.map(|t| t.server_name);
        Node {
            id: id.into(),
            addr,
            registration: Some(Registration::start(etcd.clone(), record).unwrap()),
            stats: None,
            shutdown,
        }
    }

    fn steps(&self) -> u64 {
        self.stats.as_ref().unwrap().lock().unwrap().steps_total
    }

    /// Leaves etcd, then stops serving.
    async fn leave(&mut self) {
        if let Some(r) = self.registration.take() {
            r.withdraw().await;
        }
        self.shutdown.cancel();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn record(model: &ModelDir, role: &str, id: &str, addr: &str, quic: Vec<String>) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        role: tandem_cluster::Role::from_name(role).expect("a role name"),
        grpc_addr: addr.into(),
        tls_name: None,
        quic_addrs: quic,
        model: model.name(),
        fingerprint: Some(tandem_cluster::ModelFingerprint::of(model).expect("a fingerprint")),
        tp_size: 1,
        capacity: Capacity::default(),
    }
}

/// Waits until the router's members are exactly `nodes`; returns how long that took.
async fn wait_members(membership: &EtcdMembership, nodes: &[&Node], within: Duration) -> Duration {
    let start = Instant::now();
    let mut want: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    want.sort();
    let mut rx = membership.watch();
    loop {
        let mut now: Vec<String> = rx
            .borrow_and_update()
            .iter()
            .map(|m| m.grpc_addr.clone())
            .collect();
        now.sort();
        if now == want {
            return start.elapsed();
        }
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
            let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
            panic!("the router's members are {now:?}, not {ids:?} ({want:?}), after {within:?}");
        }
    }
}

/// A prompt long enough for the prefill node, run through the router and checked
/// against the engine itself.
async fn generate_checked(router: std::net::SocketAddr, model: &ModelDir, salt: u32) {
    let mut client =
        tandem_proto::v1::generate_client::GenerateClient::connect(format!("http://{router}"))
            .await
            .expect("connect router");
    let p = prompt(40, salt);
    // The router's node pool follows the membership channel in its own task, so
    // a request sent the instant a member appears may still find no node; such
    // a refusal (UNAVAILABLE) is retried briefly.
    let deadline = Instant::now() + Duration::from_secs(2);
    let got = loop {
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            complete(&mut client, greedy_request(&p, 6)),
        )
        .await
        .expect("the request finished in time");
        match result {
            Err(status)
                if status.code() == tonic::Code::Unavailable && Instant::now() < deadline =>
            {
                eprintln!("retrying: {}", status.message());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.expect("generate"),
        }
    };
    assert_eq!(got.tokens, reference(model, &p, 6));
}

async fn start_router(
    model: &Arc<ModelDir>,
    etcd: &EtcdSection,
    shutdown: &CancellationToken,
) -> (Arc<EtcdMembership>, std::net::SocketAddr) {
    start_router_with(model, etcd, None, shutdown).await
}

/// A router following etcd; with `tls`, dialing the nodes over mutual TLS.
async fn start_router_with(
    model: &Arc<ModelDir>,
    etcd: &EtcdSection,
    tls: Option<TlsSection>,
    shutdown: &CancellationToken,
) -> (Arc<EtcdMembership>, std::net::SocketAddr) {
    let membership = EtcdMembership::start(etcd.clone(), Some(model.name()), shutdown.clone());
    let config = tandem_cluster::RouterSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        request_timeout_s: 20.0,
        tls,
        ..Default::default()
    };
    let r = tandem_router::serve(
        model.clone(),
        None,
        config,
        membership.clone(),
        shutdown.clone(),
    )
    .await
    .expect("router");
    (membership, r.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_register_and_the_router_follows_them() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd"));
    let (_model_dir, model) = small_model();
    let cfg = section(&etcd, "follow");
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let started = Instant::now();
    let (membership, router) = start_router(&model, &cfg, &shutdown).await;

    let prefill = Node::prefill(&model, &cfg, "p0").await;
    let mut d1 = Node::decode(&model, &cfg, "d1").await;
    let took = wait_members(&membership, &[&prefill, &d1], Duration::from_secs(10)).await;
    eprintln!("two nodes registered and seen by the router in {took:?}");
    assert_eq!(
        membership
            .watch()
            .borrow()
            .iter()
            .filter(|m| m.role == Role::Prefill)
            .count(),
        1
    );
    generate_checked(router, &model, 1).await;
    assert!(d1.steps() > 0, "the decode node served the request");

    // A second decode node joins; the first drains away.
    let d2 = Node::decode(&model, &cfg, "d2").await;
    wait_members(&membership, &[&prefill, &d1, &d2], Duration::from_secs(10)).await;
    let left = Instant::now();
    d1.leave().await;
    let took = wait_members(&membership, &[&prefill, &d2], Duration::from_secs(5)).await;
    eprintln!(
        "a withdrawn node left the router's view {:?} after it began withdrawing ({took:?} after etcd confirmed)",
        left.elapsed()
    );
    assert!(
        left.elapsed() < Duration::from_secs(1),
        "withdrawal took {:?}",
        left.elapsed()
    );
    for salt in 2..5 {
        generate_checked(router, &model, salt).await;
    }
    assert!(d2.steps() > 0, "the remaining decode node took the traffic");
    // The watch stays up: etcd cuts clients that ping too eagerly (GOAWAY
    // after a few pings less than 5 s apart), which would show as re-listings.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(started.elapsed())).await;
    assert_eq!(
        *membership.syncs().borrow(),
        1,
        "the router's watch was re-established"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_survives_etcd_outages_and_resyncs_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdServer::start(&dir.path().join("etcd-a"));
    let (_model_dir, model) = small_model();
    let cfg = section(&etcd, "outage");
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (membership, router) = start_router(&model, &cfg, &shutdown).await;
    let mut syncs = membership.syncs();
    let prefill = Node::prefill(&model, &cfg, "p0").await;
    let mut d1 = Node::decode(&model, &cfg, "d1").await;
    wait_members(&membership, &[&prefill, &d1], Duration::from_secs(10)).await;
    generate_checked(router, &model, 1).await;

    // etcd dies for longer than the nodes' leases: routing goes on, on the last members.
    etcd.stop();
    let down = Instant::now();
    let mut served = 0;
    while down.elapsed() < Duration::from_secs(u64::from(TTL_S) * 2 + 1) {
        generate_checked(router, &model, 10 + served).await;
        served += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        membership.watch().borrow().len(),
        2,
        "the last known members stay"
    );
    eprintln!(
        "etcd down for {:?}: {served} requests served on the last known members",
        down.elapsed()
    );

    // etcd comes back with its data: the nodes register again (new leases), the router re-lists.
    let before = *syncs.borrow_and_update();
    let back = Instant::now();
    etcd.restart();
    while *syncs.borrow_and_update() == before {
        tokio::time::timeout(Duration::from_secs(10), syncs.changed())
            .await
            .expect("the router re-synced after etcd came back")
            .unwrap();
    }
    wait_members(&membership, &[&prefill, &d1], Duration::from_secs(10)).await;
    for node in [&prefill, &d1] {
        let mut registered = node.registration.as_ref().unwrap().registered();
        tokio::time::timeout(Duration::from_secs(10), registered.wait_for(|r| *r))
            .await
            .expect("the node registered again")
            .unwrap();
    }
    eprintln!(
        "etcd restarted with its data: router re-synced and nodes re-registered within {:?}",
        back.elapsed()
    );
    // Past the old leases' TTL, the keys are still there (they moved to new leases).
    tokio::time::sleep(Duration::from_secs(u64::from(TTL_S) + 1)).await;
    wait_members(&membership, &[&prefill, &d1], Duration::from_secs(1)).await;

    // etcd comes back blank (a new data dir: revisions start over).
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    generate_checked(router, &model, 50).await;
    let restarted = Instant::now();
    etcd.restart_with(&dir.path().join("etcd-b"));
    let healthy = restarted.elapsed();
    // Whether or not the router has listed the blank etcd yet, it still routes.
    generate_checked(router, &model, 51).await;
    wait_members(&membership, &[&prefill, &d1], Duration::from_secs(15)).await;
    eprintln!(
        "blank etcd: healthy {healthy:?} after its start; both nodes re-registered and the router re-synced by {:?}",
        restarted.elapsed()
    );

    // A node that joins after the restart gets traffic: the old decode node leaves,
    // so requests can only succeed through the newcomer.
    let d2 = Node::decode(&model, &cfg, "d2").await;
    wait_members(&membership, &[&prefill, &d1, &d2], Duration::from_secs(10)).await;
    d1.leave().await;
    wait_members(&membership, &[&prefill, &d2], Duration::from_secs(5)).await;
    for salt in 60..63 {
        generate_checked(router, &model, salt).await;
    }
    assert!(
        d2.steps() > 0,
        "the node that joined after the restart served requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_nodes_register_their_names_and_the_router_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd"));
    let (_model_dir, model) = small_model();
    let cfg = section(&etcd, "tls");
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    // Certificates that name the role, not the address (as pods sharing one
    // certificate would): dialing 127.0.0.1 verifies only under the name the
    // node registered.
    let ca = tandem_kv_transfer::ClusterCa::generate("test cluster CA").unwrap();
    let certs = dir.path();
    let decode_tls = write_certs(certs, &ca, "decode", &["decode.tandem"]);
    let prefill_tls = write_certs(certs, &ca, "prefill", &["prefill.tandem"]);
    let router_tls = write_certs(certs, &ca, "router", &["router.tandem"]);
    let (membership, router) = start_router_with(&model, &cfg, Some(router_tls), &shutdown).await;
    let prefill = Node::prefill_with(&model, &cfg, "p0", Some(prefill_tls)).await;
    let d = Node::decode_with(&model, &cfg, "d0", Some(decode_tls)).await;
    wait_members(&membership, &[&prefill, &d], Duration::from_secs(10)).await;
    let members = membership.watch().borrow().clone();
    for m in &members {
        assert!(m.grpc_addr.starts_with("https://127.0.0.1:"), "{m:?}");
        let name = match m.role {
            Role::Decode => "decode.tandem",
            Role::Prefill => "prefill.tandem",
        };
        assert_eq!(m.tls_name.as_deref(), Some(name), "{m:?}");
    }
    // Through the prefill node: router -> both nodes over mutual-TLS gRPC,
    // KV over mutual-TLS QUIC checked under the decode node's name.
    generate_checked(router, &model, 7).await;
    assert!(d.steps() > 0, "the decode node served the request");
}

/// `GET /health` on the router's HTTP API: the status code and `Retry-After`.
async fn http_health(addr: std::net::SocketAddr) -> (u16, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let retry = text
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .map(|v| v.trim().to_owned());
    (code, retry)
}

/// The router's gRPC health for the whole server (`""`) and for `Generate`.
async fn grpc_health(router: std::net::SocketAddr) -> Vec<i32> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{router}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect health");
    let mut client = HealthClient::new(channel);
    let mut out = Vec::new();
    for service in ["", "tandem.v1.Generate"] {
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check");
        out.push(r.into_inner().status);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_serves_only_after_it_read_the_membership() {
    use tonic_health::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("etcd");
    let mut etcd = EtcdServer::start(&data);
    let (_model_dir, model) = small_model();
    let cfg = section(&etcd, "ready");
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    // A node registered while etcd is up; then etcd goes away and the router
    // starts: it cannot have read the membership.
    let prefill = Node::prefill(&model, &cfg, "p0").await;
    let decode = Node::decode(&model, &cfg, "d0").await;
    etcd.stop();

    let membership = EtcdMembership::start(cfg.clone(), Some(model.name()), shutdown.clone());
    let config = tandem_cluster::RouterSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        request_timeout_s: 20.0,
        ..Default::default()
    };
    let r = tandem_router::serve(
        model.clone(),
        None,
        config,
        membership.clone(),
        shutdown.clone(),
    )
    .await
    .expect("router");
    let http = r.http_addr.expect("http");

    let not_serving = ServingStatus::NotServing as i32;
    assert_eq!(grpc_health(r.addr).await, vec![not_serving, not_serving]);
    assert_eq!(http_health(http).await, (503, Some("1".into())));
    let mut client =
        tandem_proto::v1::generate_client::GenerateClient::connect(format!("http://{}", r.addr))
            .await
            .expect("connect router");
    let status = complete(&mut client, greedy_request(&prompt(40, 1), 4))
        .await
        .expect_err("refused before the membership is read");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("membership") && !status.message().contains("no decode"),
        "{}",
        status.message()
    );
    assert_eq!(status.metadata().get("retry-after").unwrap(), "1");

    // etcd back: after the first listing the router is healthy and serves.
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    let serving = ServingStatus::Serving as i32;
    while grpc_health(r.addr).await != vec![serving, serving] {
        assert!(Instant::now() < deadline, "the router never became healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(*membership.ready().borrow());
    assert_eq!(http_health(http).await.0, 200);
    wait_members(&membership, &[&prefill, &decode], Duration::from_secs(10)).await;
    generate_checked(r.addr, &model, 3).await;
}
