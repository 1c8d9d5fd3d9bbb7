//! Connection hygiene end to end: half-open and slow connections on every
//! listener (the router's gRPC and HTTP APIs, a node's gRPC service) are
//! closed within `[connections] header_timeout_s`, a listener refuses
//! connections past `max_connections`, and the cluster serves meanwhile.
//! Everything on 127.0.0.1, every loop bounded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const HALF_OPEN: usize = 500;
const TIMEOUT: Duration = Duration::from_secs(2);
const CAP: usize = 520;

/// What a half-open client sends before going silent.
fn opening(i: usize) -> &'static [u8] {
    match i % 3 {
        0 => b"",
        1 => b"GET /v1/models HT",      // a partial HTTP/1 request line
        _ => b"PRI * HTTP/2.0\r\n\r\n", // a truncated HTTP/2 preface
    }
}

/// Opens `n` connections to `addr`, each sending [`opening`] and nothing
/// more; each task ends with how long the server took to close it.
async fn half_open(addr: SocketAddr, n: usize, tasks: &mut JoinSet<Duration>) {
    for i in 0..n {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        tasks.spawn(async move {
            let started = Instant::now();
            let _ = stream.write_all(opening(i)).await;
            // Read (a server's HTTP/2 SETTINGS, say) until the server closes.
            let mut sink = [0u8; 1024];
            let closed = tokio::time::timeout(Duration::from_secs(10), async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            assert!(closed.is_ok(), "a half-open connection stayed open 10 s");
            started.elapsed()
        });
    }
}

/// `GET /health` over HTTP/1.1; the status line.
async fn http_health(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect http");
    s.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut response))
        .await
        .expect("an HTTP answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap_or_default().to_owned()
}

fn spec() -> ClusterSpec {
    let mut config = tandem_cluster::Config::parse(&format!(
        "[router]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
         [prefill]\nchunk_tokens = 64\nkv_blocks = 512\n\
         [decode]\nkv_blocks = 2048\nlocal_prefill_below = 8\n\
         [connections]\nmax_connections = {CAP}\nheader_timeout_s = {}\n",
        TIMEOUT.as_secs_f64()
    ))
    .expect("test config");
    ClusterSpec {
        decode: config.decode.take().expect("decode"),
        prefill: config.prefill.take(),
        router: config.router.take().expect("router"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_connections_are_closed_in_time_while_requests_are_served() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model, spec()).await;
    let http = cluster.http.expect("http listener");
    let mut client = cluster.client().await;
    let request = greedy_request(&prompt(40, 1), 6);

    let mut tasks = JoinSet::new();
    for addr in [cluster.router, http, cluster.decode_grpc] {
        half_open(addr, HALF_OPEN, &mut tasks).await;
    }
    // Served meanwhile, over gRPC (through both nodes) and HTTP.
    let done = complete(&mut client, request.clone())
        .await
        .expect("a request while 1,500 connections hang");
    assert_eq!(done.tokens.len(), 6);
    assert!(http_health(http).await.contains("200"));

    let mut slowest = Duration::ZERO;
    while let Some(took) = tasks.join_next().await {
        slowest = slowest.max(took.expect("half-open task"));
    }
    assert!(
        slowest < TIMEOUT + Duration::from_secs(3),
        "the slowest half-open connection lasted {slowest:?}"
    );
    // And service goes on after them.
    complete(&mut client, request).await.expect("after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_cap_are_refused_without_breaking_service() {
    let (_dir, model) = small_model();
    let cluster = Cluster::start(model, spec()).await;
    let mut client = cluster.client().await;
    let request = greedy_request(&prompt(40, 2), 4);
    // The client's channel is up and holds one of the router's permits.
    complete(&mut client, request.clone()).await.expect("first");

    // CAP + 30 silent connections: the last ~30 are closed at once, long
    // before the header timeout could close them.
    let started = Instant::now();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..CAP + 30 {
        held.push(TcpStream::connect(cluster.router).await.expect("connect"));
    }
    // The accept loop takes them in its own time (slow on a loaded machine):
    // look until the ~30 past the cap were closed, well before the header
    // timeout could close the held ones too.
    let mut closed = vec![false; held.len()];
    while refused < 30 && started.elapsed() < TIMEOUT * 2 / 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (s, closed) in held.iter_mut().zip(&mut closed) {
            if *closed {
                continue;
            }
            let mut b = [0u8; 64];
            // A held connection has nothing to read (would block); a refused
            // one reads EOF or a reset.
            let gone = match s.try_read(&mut b) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            if gone {
                *closed = true;
                refused += 1;
            }
        }
    }
    assert!(
        started.elapsed() < TIMEOUT,
        "checked before the header timeout"
    );
    assert!(
        (30..=31).contains(&refused),
        "{refused} connections refused past a cap of {CAP} (one permit is the client's)"
    );
    // The cap is full, and the connected client is still served.
    let done = complete(&mut client, request.clone())
        .await
        .expect("served at the cap");
    assert_eq!(done.tokens.len(), 4);

    // Once the silent ones time out, new clients get in again.
    drop(held);
    tokio::time::sleep(TIMEOUT).await;
    let mut fresh = cluster.client().await;
    complete(&mut fresh, request).await.expect("a new client");
}
