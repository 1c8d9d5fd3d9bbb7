//! The router against fake decode and prefill nodes on loopback: the
//! request's life (local and remote prefill), retries on full decode nodes,
//! cancellation on prefill failure, client departure and deadline, `n` > 1
//! (one prefill, later samples at the first one's decode node, a failed
//! sample resumed from its own tokens), and the
//! health service.
//!
//! (Long on purpose: one file per test binary; these tests share the fake
//! decode and prefill nodes and their log, most of the file.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tandem_cluster::{RouterSection, StaticMembership};
use tandem_engine::ModelDir;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_proto::v1 as pb;
use tandem_proto::v1::decode_node_server::{DecodeNode, DecodeNodeServer};
use tandem_proto::v1::generate_client::GenerateClient;
use tandem_proto::v1::generate_request::Prompt;
use tandem_proto::v1::generate_response::Event;
use tandem_proto::v1::prefill_node_server::{PrefillNode, PrefillNodeServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

fn model() -> Arc<ModelDir> {
    static MODEL: OnceLock<(tempfile::TempDir, Arc<ModelDir>)> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("tiny-model")
                .tempdir()
                .expect("tempdir");
            let spec = SynthSpec {
                vocab_size: 300,
                hidden_size: 32,
                intermediate_size: 64,
                num_layers: 1,
                num_heads: 2,
                num_kv_heads: 1,
                max_position_embeddings: 128,
                ..SynthSpec::default()
            };
            write_model_dir(dir.path(), &spec).expect("synth model");
            let model = Arc::new(ModelDir::open(dir.path()).expect("open model"));
            (dir, model)
        })
        .1
        .clone()
}

/// What the fake nodes saw.
#[derive(Default)]
struct Log {
    decode: Vec<pb::DecodeRequest>,
    prefill: Vec<pb::PrefillRequest>,
    cancels: Vec<String>,
}

type SharedLog = Arc<Mutex<Log>>;

fn cancels(log: &SharedLog) -> Vec<String> {
    log.lock().unwrap().cancels.clone()
}

/// Polls until `f` holds, for up to 2 s.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[derive(Clone)]
struct FakeDecode {
    log: SharedLog,
    /// Times to answer RESOURCE_EXHAUSTED before admitting.
    full: Arc<AtomicUsize>,
    tokens: u32,
    token_delay: Duration,
    /// A request id whose stream breaks (UNAVAILABLE) after this many
    /// tokens, once: a node failing mid-request.
    break_once: Arc<Mutex<Option<(String, u32)>>>,
    /// How long an admission takes (a real node answers between engine
    /// steps, which a long local prefill on a CPU makes seconds long).
    admit_delay: Duration,
    /// Set by the first `Decode` when `pause_on_decode`: the load reports
    /// stop and the admission never comes (a paused process).
    paused: Arc<AtomicBool>,
    pause_on_decode: bool,
    reports: Reports,
}

/// What a fake node's load reports say beyond an idle node's.
#[derive(Clone, Copy, Default)]
struct Reports {
    /// A prefill node working through a deep queue: 100 prompt tokens done a
    /// report (every 20 ms: a measured 5,000 tokens/s), a million queued.
    backlogged: bool,
    /// A decode node's `local_prefill_below`.
    local_prefill_below: u32,
}

fn load_stream(
    role: &str,
    paused: Arc<AtomicBool>,
    reports: Reports,
) -> ReceiverStream<Result<pb::NodeLoad, Status>> {
    let (tx, rx) = mpsc::channel(4);
    let load = pb::NodeLoad {
        role: match role {
            "prefill" => pb::Role::Prefill,
            _ => pb::Role::Decode,
        }
        .into(),
        kv_blocks_total: 100,
        kv_blocks_free: 100,
        local_prefill_below: reports.local_prefill_below,
        ..Default::default()
    };
    tokio::spawn(async move {
        for tick in 0u64.. {
            let mut load = load.clone();
            if reports.backlogged {
                load.queued = 1;
                load.queued_prefill_tokens = 1_000_000 - 100 * tick.min(9_000);
            }
            if !paused.load(Ordering::Acquire) && tx.send(Ok(load)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl DecodeNode for FakeDecode {
    type DecodeStream = ReceiverStream<Result<pb::DecodeResponse, Status>>;
    type WatchLoadStream = ReceiverStream<Result<pb::NodeLoad, Status>>;

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let r = request.into_inner();
        self.log.lock().unwrap().decode.push(r.clone());
        if self.pause_on_decode {
            self.paused.store(true, Ordering::Release);
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.admit_delay).await;
        if self
            .full
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Status::resource_exhausted("out of KV blocks"));
        }
        let (tx, rx) = mpsc::channel(8);
        let (tokens, delay) = (self.tokens, self.token_delay);
        let break_after = {
            let mut b = self.break_once.lock().unwrap();
            match b.as_ref() {
                Some((id, k)) if *id == r.request_id => {
                    let k = *k;
                    *b = None;
                    Some(k)
                }
                _ => None,
            }
        };
        tokio::spawn(async move {
            let local = r.force_local_prefill;
            let admitted = pb::Admitted {
                local_prefill: local,
                kv_target: (!local).then(|| pb::KvTarget {
                    quic_addr: "127.0.0.1:9".into(),
                    transfer_id: 7,
                    ..Default::default()
                }),
            };
            let event = |e| Ok(pb::DecodeResponse { event: Some(e) });
            use pb::decode_response::Event as E;
            if tx.send(event(E::Admitted(admitted))).await.is_err() {
                return;
            }
            for i in 0..tokens {
                if break_after == Some(i) {
                    let _ = tx.send(Err(Status::unavailable("the node broke"))).await;
                    return;
                }
                tokio::time::sleep(delay).await;
                let chunk = pb::TokenChunk {
                    ids: vec![10 + i],
                    text: format!("t{i}"),
                    logprobs: Vec::new(),
                    prompt_tokens: 0,
                };
                if tx.send(event(E::Token(chunk))).await.is_err() {
                    return;
                }
            }
            let finished = pb::Finished {
                reason: pb::FinishReason::Length as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: r.prompt.len() as u32,
                    completion_tokens: tokens,
                    cached_tokens: 0,
                }),
                timings: Some(pb::Timings {
                    queue_seconds: 99.0,
                    time_to_first_token_seconds: 99.0,
                    total_seconds: 99.0,
                    spans: None,
                }),
                stop_reason: None,
            };
            let _ = tx.send(event(E::Finished(finished))).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = request.into_inner().request_id;
        self.log
            .lock()
            .unwrap()
            .cancels
            .push(format!("decode:{id}"));
        Ok(Response::new(pb::CancelResponse { found: true }))
    }

    async fn watch_load(
        &self,
        _request: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        Ok(Response::new(load_stream(
            "decode",
            self.paused.clone(),
            self.reports,
        )))
    }
}

#[derive(Clone, Copy)]
enum PrefillBehaviour {
    Ok,
    Fail(Code),
    Hang,
}

#[derive(Clone)]
struct FakePrefill {
    log: SharedLog,
    behaviour: PrefillBehaviour,
    reports: Reports,
}

#[tonic::async_trait]
impl PrefillNode for FakePrefill {
    type WatchLoadStream = ReceiverStream<Result<pb::NodeLoad, Status>>;

    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        self.log.lock().unwrap().prefill.push(request.into_inner());
        tokio::time::sleep(Duration::from_millis(20)).await;
        match self.behaviour {
            PrefillBehaviour::Ok => Ok(Response::new(pb::PrefillResponse {
                first_token: 10,
                ..Default::default()
            })),
            PrefillBehaviour::Fail(code) => Err(Status::new(code, "prefill broke")),
            PrefillBehaviour::Hang => {
                std::future::pending::<()>().await;
                Err(Status::internal("unreachable"))
            }
        }
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = request.into_inner().request_id;
        self.log
            .lock()
            .unwrap()
            .cancels
            .push(format!("prefill:{id}"));
        Ok(Response::new(pb::CancelResponse { found: true }))
    }

    async fn watch_load(
        &self,
        _request: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        Ok(Response::new(load_stream(
            "prefill",
            Arc::default(),
            self.reports,
        )))
    }
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    (l, addr)
}

async fn start_decode(fake: FakeDecode) -> String {
    let (l, addr) = listener().await;
    tokio::spawn(
        Server::builder()
            .add_service(DecodeNodeServer::new(fake))
            .serve_with_incoming(TcpIncoming::from(l)),
    );
    addr
}

async fn start_prefill(fake: FakePrefill) -> String {
    let (l, addr) = listener().await;
    tokio::spawn(
        Server::builder()
            .add_service(PrefillNodeServer::new(fake))
            .serve_with_incoming(TcpIncoming::from(l)),
    );
    addr
}

struct Cluster {
    log: SharedLog,
    full: Arc<AtomicUsize>,
    router: SocketAddr,
    shutdown: CancellationToken,
    join: tokio::task::JoinHandle<Result<(), tandem_router::RouterError>>,
}

struct Setup {
    prefill: Option<PrefillBehaviour>,
    decode_nodes: usize,
    tokens: u32,
    token_delay: Duration,
    request_timeout_s: f64,
    break_once: Option<(String, u32)>,
    admit_delay: Duration,
    pause_on_decode: bool,
    reports: Reports,
    max_prefill_backlog_s: f64,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            prefill: None,
            decode_nodes: 1,
            tokens: 5,
            token_delay: Duration::from_millis(1),
            request_timeout_s: 30.0,
            break_once: None,
            admit_delay: Duration::ZERO,
            pause_on_decode: false,
            reports: Reports::default(),
            max_prefill_backlog_s: RouterSection::default().max_prefill_backlog_s,
        }
    }
}

async fn cluster(setup: Setup) -> Cluster {
    let log = SharedLog::default();
    let full = Arc::new(AtomicUsize::new(0));
    let break_once = Arc::new(Mutex::new(setup.break_once));
    let mut decode = Vec::new();
    for _ in 0..setup.decode_nodes {
        decode.push(
            start_decode(FakeDecode {
                log: log.clone(),
                full: full.clone(),
                tokens: setup.tokens,
                token_delay: setup.token_delay,
                break_once: break_once.clone(),
                admit_delay: setup.admit_delay,
                paused: Arc::default(),
                pause_on_decode: setup.pause_on_decode,
                reports: setup.reports,
            })
            .await,
        );
    }
    let mut prefill = Vec::new();
    if let Some(behaviour) = setup.prefill {
        prefill.push(
            start_prefill(FakePrefill {
                log: log.clone(),
                behaviour,
                reports: setup.reports,
            })
            .await,
        );
    }
    let config = RouterSection {
        listen: "127.0.0.1:0".parse().unwrap(),
        request_timeout_s: setup.request_timeout_s,
        kv_timeout_ms: 1234,
        load_interval_ms: 10,
        max_prefill_backlog_s: setup.max_prefill_backlog_s,
        ..RouterSection::default()
    };
    let shutdown = CancellationToken::new();
    let running = tandem_router::serve(
        model(),
        Some("tiny".into()),
        config,
        Arc::new(StaticMembership::new(&prefill, &decode)),
        shutdown.clone(),
    )
    .await
    .unwrap();
    Cluster {
        log,
        full,
        router: running.addr,
        shutdown,
        join: running.join,
    }
}

impl Cluster {
    async fn client(&self) -> GenerateClient<tonic::transport::Channel> {
        GenerateClient::connect(format!("http://{}", self.router))
            .await
            .unwrap()
    }

    /// Runs one request to its end: the token chunks, then the final event or error.
    async fn generate(
        &self,
        req: pb::GenerateRequest,
    ) -> (Vec<pb::TokenChunk>, Result<pb::Finished, Status>) {
        let mut stream = match self.client().await.generate(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => return (Vec::new(), Err(s)),
        };
        let mut tokens = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(pb::GenerateResponse {
                    event: Some(Event::Token(t)),
                    ..
                })) => tokens.push(t),
                Ok(Some(pb::GenerateResponse {
                    event: Some(Event::Finished(f)),
                    ..
                })) => {
                    assert!(
                        matches!(stream.message().await, Ok(None)),
                        "stream ends after Finished"
                    );
                    return (tokens, Ok(f));
                }
                Ok(other) => panic!("unexpected {other:?}"),
                Err(s) => return (tokens, Err(s)),
            }
        }
    }
}

fn request(id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.into(),
        prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2, 3] })),
        max_tokens: 5,
        ..Default::default()
    }
}

#[tokio::test]
async fn local_prefill_relays_every_token_with_router_timings() {
    let c = cluster(Setup::default()).await;
    let (tokens, finished) = c.generate(request("r1")).await;
    let finished = finished.unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(tokens[0].text, "t0");
    let usage = finished.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 5));
    let t = finished.timings.unwrap();
    assert!(t.total_seconds < 99.0 && t.queue_seconds <= t.time_to_first_token_seconds);
    assert!(t.time_to_first_token_seconds <= t.total_seconds);
    {
        let log = c.log.lock().unwrap();
        assert_eq!(log.decode.len(), 1);
        let d = &log.decode[0];
        assert!(d.force_local_prefill, "no prefill node in the cluster");
        assert_eq!(
            (d.kv_timeout_ms, d.max_tokens, d.request_id.as_str()),
            (1234, 5, "r1")
        );
        assert!(log.prefill.is_empty());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        cancels(&c.log).is_empty(),
        "a finished request is not cancelled"
    );
}

#[tokio::test]
async fn a_slow_admission_at_a_node_that_still_reports_is_waited_for() {
    // Longer than the pool's stale bound (2 s): the router used to fail the
    // node, and every request behind it, for a long step at the node.
    let c = cluster(Setup {
        admit_delay: Duration::from_millis(3500),
        ..Setup::default()
    })
    .await;
    let (tokens, finished) = c.generate(request("slow")).await;
    let finished = finished.expect("the request waits for its admission");
    assert_eq!(tokens.len(), 5);
    assert_eq!(finished.reason, pb::FinishReason::Length as i32);
    assert_eq!(c.log.lock().unwrap().decode.len(), 1, "one reservation");
}

#[tokio::test]
async fn a_node_that_stops_reporting_while_it_admits_fails_the_reservation() {
    let c = cluster(Setup {
        pause_on_decode: true,
        ..Setup::default()
    })
    .await;
    let started = std::time::Instant::now();
    let (tokens, finished) = c.generate(request("paused")).await;
    let status = finished.expect_err("a paused node does not hold the request");
    assert!(tokens.is_empty());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "noticed within a few stale bounds: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_prefill_backlog_refuses_long_prompts_but_not_those_a_decode_node_prefills() {
    let c = cluster(Setup {
        prefill: Some(PrefillBehaviour::Ok),
        token_delay: Duration::from_millis(5),
        reports: Reports {
            backlogged: true,
            local_prefill_below: 4,
        },
        max_prefill_backlog_s: 10.0,
        ..Setup::default()
    })
    .await;
    let long = |id: &str| pb::GenerateRequest {
        prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: vec![5; 20] })),
        ..request(id)
    };
    // Once the prefill node's rate is measured (a busy window of 0.5 s), a
    // long prompt would wait ~200 s behind its queue: refused.
    let mut refused = None;
    for i in 0..100 {
        match c.generate(long(&format!("long-{i}"))).await.1 {
            Err(s) if s.code() == Code::ResourceExhausted => {
                refused = Some(s);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let refused = refused.expect("the backlog refuses a long prompt");
    assert!(
        refused.message().contains("prefill queue is full"),
        "{refused:?}"
    );
    // Three tokens, under the decode node's local_prefill_below: prefilled
    // there, in no prefill queue.
    let (tokens, finished) = c.generate(request("short")).await;
    finished.expect("a short prompt is served");
    assert_eq!(tokens.len(), 5);
    assert!(matches!(
        c.generate(long("long-again")).await.1,
        Err(s) if s.code() == Code::ResourceExhausted
    ));
}

#[tokio::test]
async fn remote_prefill_gets_the_kv_target() {
    let c = cluster(Setup {
        prefill: Some(PrefillBehaviour::Ok),
        // A real decode node has no token before the KV lands.
        token_delay: Duration::from_millis(60),
        tokens: 2,
        ..Setup::default()
    })
    .await;
    let (tokens, finished) = c.generate(request("r2")).await;
    finished.unwrap();
    assert_eq!(tokens.len(), 2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(cancels(&c.log).is_empty(), "{:?}", cancels(&c.log));
    let log = c.log.lock().unwrap();
    assert!(!log.decode[0].force_local_prefill);
    assert_eq!(log.prefill.len(), 1);
    let p = &log.prefill[0];
    assert_eq!(
        (p.request_id.as_str(), p.prompt.as_slice()),
        ("r2", &[1, 2, 3][..])
    );
    assert_eq!(p.kv_target.as_ref().unwrap().transfer_id, 7);
}

#[tokio::test]
async fn an_x_request_id_names_the_request_at_both_nodes() {
    let c = cluster(Setup {
        prefill: Some(PrefillBehaviour::Ok),
        token_delay: Duration::from_millis(30),
        tokens: 2,
        ..Setup::default()
    })
    .await;
    for (message_id, header_id) in [("", "from-header-1"), ("from-message", "ignored")] {
        let mut req = tonic::Request::new(request(message_id));
        req.metadata_mut()
            .insert("x-request-id", header_id.parse().unwrap());
        let mut stream = c.client().await.generate(req).await.unwrap().into_inner();
        while stream.message().await.unwrap().is_some() {}
    }
    let log = c.log.lock().unwrap();
    let decode: Vec<&str> = log.decode.iter().map(|d| d.request_id.as_str()).collect();
    let prefill: Vec<&str> = log.prefill.iter().map(|p| p.request_id.as_str()).collect();
    // The header names a request without an id; the message's own id wins.
    assert_eq!(decode, ["from-header-1", "from-message"]);
    assert_eq!(prefill, ["from-header-1", "from-message"]);
}

#[tokio::test]
async fn full_decode_nodes_are_retried_until_one_admits() {
    let c = cluster(Setup {
        decode_nodes: 2,
        ..Setup::default()
    })
    .await;
    c.full.store(5, Ordering::Release);
    let (tokens, finished) = c.generate(request("r3")).await;
    finished.unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(c.log.lock().unwrap().decode.len(), 6);
}

#[tokio::test]
async fn requests_waiting_for_a_full_decode_node_ask_it_one_at_a_time() {
    let c = cluster(Setup::default()).await;
    // Full until told otherwise: every request refused for blocks.
    c.full.store(usize::MAX, Ordering::Release);
    let runs: Vec<_> = (0..8)
        .map(|i| c.generate(request(&format!("w{i}"))))
        .collect();
    let release = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.full.store(0, Ordering::Release);
    };
    let (done, ()) = tokio::join!(futures::future::join_all(runs), release);
    for (tokens, finished) in done {
        finished.unwrap();
        assert_eq!(tokens.len(), 5);
    }
    // Only the first in line asks again (at least every 20 ms); the others wait for
    // it to be admitted. Each asking on its own would be ~15 calls apiece.
    let calls = c.log.lock().unwrap().decode.len();
    assert!(calls < 8 + 30, "{calls} Decode calls for 8 requests");
}

#[tokio::test]
async fn prefill_failure_cancels_at_the_decode_node() {
    // A full prefill node is not retried: the request fails, its reservation cancelled.
    let c = cluster(Setup {
        prefill: Some(PrefillBehaviour::Fail(Code::ResourceExhausted)),
        token_delay: Duration::from_secs(5),
        ..Setup::default()
    })
    .await;
    let (tokens, finished) = c.generate(request("r4")).await;
    assert!(tokens.is_empty());
    assert_eq!(finished.unwrap_err().code(), Code::ResourceExhausted);
    eventually("decode cancels", || {
        cancels(&c.log) == vec!["decode:r4".to_string()]
    })
    .await;
}

#[tokio::test]
async fn a_failing_prefill_node_falls_back_to_prefill_at_the_decode_node() {
    // The only prefill node fails the request: its reservation is cancelled
    // and the re-run, with no prefill node left that has not failed it, is
    // prefilled by the decode node.
    // (The fake decode node streams without waiting for KV: its first token
    // comes after the prefill node's failure.)
    let c = cluster(Setup {
        prefill: Some(PrefillBehaviour::Fail(Code::Internal)),
        tokens: 2,
        token_delay: Duration::from_millis(300),
        ..Setup::default()
    })
    .await;
    let (tokens, finished) = c.generate(request("r4")).await;
    finished.unwrap();
    assert_eq!(tokens.len(), 2);
    {
        let log = c.log.lock().unwrap();
        let local: Vec<bool> = log.decode.iter().map(|d| d.force_local_prefill).collect();
        assert_eq!(local, [false, true]);
        assert_eq!(log.prefill.len(), 1);
    }
    eventually("decode cancels", || {
        cancels(&c.log) == vec!["decode:r4".to_string()]
    })
    .await;
}

#[tokio::test]
async fn a_departed_client_is_cancelled_at_both_nodes() {
    let c = cluster(Setup {
        prefill: Some(PrefillBehaviour::Hang),
        token_delay: Duration::from_secs(5),
        ..Setup::default()
    })
    .await;
    let stream = c.client().await.generate(request("r5")).await.unwrap();
    eventually("prefill call", || !c.log.lock().unwrap().prefill.is_empty()).await;
    drop(stream);
    eventually("both cancels", || {
        let mut got = cancels(&c.log);
        got.sort();
        got == ["decode:r5", "prefill:r5"]
    })
    .await;
}

#[tokio::test]
async fn the_deadline_ends_the_request_and_cancels() {
    let c = cluster(Setup {
        token_delay: Duration::from_secs(5),
        request_timeout_s: 0.2,
        ..Setup::default()
    })
    .await;
    let (_, finished) = c.generate(request("r6")).await;
    assert_eq!(finished.unwrap_err().code(), Code::DeadlineExceeded);
    eventually("decode cancel", || cancels(&c.log) == ["decode:r6"]).await;
}

#[tokio::test]
async fn bad_requests_are_refused_before_any_node_is_asked() {
    let c = cluster(Setup::default()).await;
    let mut r = request("bad");
    r.max_tokens = 1_000_000;
    let (_, res) = c.generate(r).await;
    let s = res.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("max_tokens"), "{s:?}");
    let mut r = request("bad");
    r.model = "other".into();
    assert_eq!(c.generate(r).await.1.unwrap_err().code(), Code::NotFound);
    assert!(c.log.lock().unwrap().decode.is_empty());
}

#[tokio::test]
async fn text_prompts_are_tokenized_for_the_nodes() {
    let c = cluster(Setup::default()).await;
    let r = pb::GenerateRequest {
        prompt: Some(Prompt::Text("hello world".into())),
        ..Default::default()
    };
    c.generate(r).await.1.unwrap();
    let log = c.log.lock().unwrap();
    let want = model().tokenizer.encode("hello world", true).unwrap();
    assert_eq!(log.decode[0].prompt, want);
    // The default max_tokens: the room left in the 128-token context.
    let room = 128 - want.len() as u32;
    assert_eq!(RouterSection::default().default_max_tokens, None);
    assert_eq!(log.decode[0].max_tokens, room);
    assert!(!log.decode[0].request_id.is_empty());
}

#[tokio::test]
async fn no_decode_node_is_unavailable() {
    let c = cluster(Setup {
        decode_nodes: 0,
        ..Setup::default()
    })
    .await;
    assert_eq!(
        c.generate(request("r7")).await.1.unwrap_err().code(),
        Code::Unavailable
    );
}

#[tokio::test]
async fn health_is_served_and_shutdown_stops_the_server() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let c = cluster(Setup::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.router))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: "tandem.v1.Generate".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    drop(health);
    c.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), c.join)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}

/// Runs an `n` > 1 request to its end: each sample's tokens and final event, by index.
async fn generate_samples(
    c: &Cluster,
    req: pb::GenerateRequest,
) -> std::collections::BTreeMap<u32, (Vec<u32>, Option<pb::Finished>)> {
    let mut stream = c.client().await.generate(req).await.unwrap().into_inner();
    let mut out: std::collections::BTreeMap<u32, (Vec<u32>, Option<pb::Finished>)> =
        Default::default();
    while let Some(msg) = stream.message().await.unwrap() {
        let entry = out.entry(msg.index).or_default();
        match msg.event {
            Some(Event::Token(t)) => entry.0.extend(t.ids),
            Some(Event::Finished(f)) => entry.1 = Some(f),
            Some(Event::PromptLogprobs(_)) | None => {}
        }
    }
    out
}

fn samples_request(id: &str, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        n,
        sampling: Some(pb::SamplingParams {
            temperature: 0.8,
            seed: Some(40),
            ..Default::default()
        }),
        ..request(id)
    }
}

#[tokio::test]
async fn n_samples_prefill_once_and_follow_the_first_to_its_decode_node() {
    let c = cluster(Setup {
        prefill: Some(PrefillBehaviour::Ok),
        ..Setup::default()
    })
    .await;
    let got = generate_samples(&c, samples_request("rn", 3)).await;
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
    for (tokens, finished) in got.values() {
        assert_eq!(tokens.len(), 5);
        assert!(finished.is_some(), "each sample finishes");
    }
    let log = c.log.lock().unwrap();
    // One prefill, of sample 0; the others prefill at the decode node.
    let prefilled: Vec<&str> = log.prefill.iter().map(|p| p.request_id.as_str()).collect();
    assert_eq!(prefilled, ["rn"]);
    let mut decoded: Vec<(String, bool, Option<u64>)> = log
        .decode
        .iter()
        .map(|d| {
            let seed = d.sampling.as_ref().and_then(|s| s.seed);
            (d.request_id.clone(), d.force_local_prefill, seed)
        })
        .collect();
    decoded.sort();
    assert_eq!(
        decoded,
        [
            ("rn".to_string(), false, Some(40)),
            ("rn-s1".to_string(), true, Some(41)),
            ("rn-s2".to_string(), true, Some(42)),
        ]
    );
}

#[tokio::test]
async fn a_sample_whose_node_fails_resumes_from_its_own_tokens() {
    let c = cluster(Setup {
        tokens: 4,
        token_delay: Duration::from_millis(5),
        break_once: Some(("rf-s1".into(), 2)),
        ..Setup::default()
    })
    .await;
    let got = generate_samples(&c, samples_request("rf", 2)).await;
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), [0, 1]);
    assert!(got.values().all(|(_, f)| f.is_some()), "{got:?}");
    assert_eq!(got[&0].0.len(), 4);
    let log = c.log.lock().unwrap();
    let reruns: Vec<(u32, Vec<u32>)> = log
        .decode
        .iter()
        .filter(|d| d.request_id == "rf-s1")
        .map(|d| (d.attempt, d.generated.clone()))
        .collect();
    // The re-run carries the two tokens sample 1 had sent; sample 0 ran once.
    assert_eq!(reruns, [(1, vec![]), (2, vec![10, 11])]);
    assert_eq!(
        log.decode.iter().filter(|d| d.request_id == "rf").count(),
        1
    );
}
