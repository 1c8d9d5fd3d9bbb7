//! Nodes failing mid-request, as real processes: a decode node killed while it
//! generates, a decode node paused (SIGSTOP: alive, silent), a prefill node
//! killed while it prefills. Each time the router re-runs the request
//! elsewhere and the client's stream goes on with no token repeated or lost:
//! for greedy sampling the whole output equals a run with no failure. Then
//! every surviving node's KV blocks return to their total.
//!
//! (Long on purpose: one file per test binary; these tests share one harness
//! that spawns and kills the real `tandem` processes, most of the file.)

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Processes, free_port, spawn, synth_model_with};
use tandem_proto::v1 as pb;
use tandem_proto::v1::decode_node_client::DecodeNodeClient;
use tandem_proto::v1::generate_client::GenerateClient;
use tandem_proto::v1::generate_response::Event;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tonic::codec::Streaming;

/// Tokens each request generates: enough for the failure to land mid-stream.
const MAX_TOKENS: u32 = 300;
/// Tokens the client reads before a decode node is made to fail.
const BEFORE_FAILURE: usize = 20;

struct Node {
    port: u16,
    /// Index in the `Processes`.
    proc: usize,
    alive: bool,
}

struct Cluster {
    dir: tempfile::TempDir,
    procs: Processes,
    router: u16,
    prefill: Vec<Node>,
    decode: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed assertion anywhere shows the processes' logs.
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

impl Cluster {
    /// A router, two prefill nodes and three decode nodes, each its own
    /// process, serving a model `hidden` wide.
    fn start(hidden: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (hidden, intermediate) = (hidden.to_string(), (hidden * 8 / 3).to_string());
        let model = synth_model_with(
            dir.path(),
            &[
                "--hidden",
                &hidden,
                "--intermediate",
                &intermediate,
                "--layers",
                "6",
                "--heads",
                "6",
                "--kv-heads",
                "2",
                "--max-position",
                "2048",
            ],
        );
        let model_section = format!("[model]\npath = {:?}\n", model.to_str().unwrap());
        let mut procs = Processes(Vec::new());
        let mut start = |name: String, role: &str, body: String| {
            let cfg = dir.path().join(format!("{name}.toml"));
            std::fs::write(&cfg, format!("{model_section}{body}")).unwrap();
            procs.0.push(spawn(
                &[role, "--config", cfg.to_str().unwrap()],
                &dir.path().join(format!("{name}.log")),
            ));
            procs.0.len() - 1
        };
        let mut decode = Vec::new();
        for i in 0..3 {
            let (port, quic) = (free_port(), free_port());
            let proc = start(
                format!("decode{i}"),
                "decode",
                format!(
                    "[decode]\nid = \"decode-{i}\"\nlisten = \"127.0.0.1:{port}\"\nquic_listen = \"127.0.0.1:{quic}\"\nkv_blocks = 512\nlocal_prefill_below = 4\n"
                ),
            );
            decode.push(Node {
                port,
                proc,
                alive: true,
            });
        }
        let mut prefill = Vec::new();
        for i in 0..2 {
            let port = free_port();
            let proc = start(
                format!("prefill{i}"),
                "prefill",
                format!(
                    "[prefill]\nid = \"prefill-{i}\"\nlisten = \"127.0.0.1:{port}\"\nchunk_tokens = 64\n"
                ),
            );
            prefill.push(Node {
                port,
                proc,
                alive: true,
            });
        }
        let router = free_port();
        let list = |nodes: &[Node]| {
            nodes
                .iter()
                .map(|n| format!("\"http://127.0.0.1:{}\"", n.port))
                .collect::<Vec<_>>()
                .join(", ")
        };
        start(
            "router".into(),
            "router",
            format!(
                // No prefill-backlog admission bound: these runs check that
                // failures lose nothing, and a prefill node whose transfers
                // stall on a killed decode node reads as slow to the rate
                // estimate (docs/RELIABILITY.md), which would refuse (with
                // retry-after) requests these tests count as lost.
                "[router]\nlisten = \"127.0.0.1:{router}\"\nprefill_nodes = [{}]\ndecode_nodes = [{}]\nmax_prefill_backlog_s = 0\n",
                list(&prefill),
                list(&decode)
            ),
        );
        Cluster {
            dir,
            procs,
            router,
            prefill,
            decode,
        }
    }

    fn logs(&self) -> String {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {}\n{}\n", p.display(), tail.join("\n"))
            })
            .collect()
    }

    async fn client(&self) -> GenerateClient<tonic::transport::Channel> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match GenerateClient::connect(format!("http://127.0.0.1:{}", self.router)).await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("router never came up: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The decode node (index) whose batch holds a request, among the live ones.
    async fn busy_decode(&self) -> usize {
        for _ in 0..400 {
            for (i, n) in self.decode.iter().enumerate() {
                if n.alive
                    && let Some(l) = load(n.port, false).await
                    && l.running + l.queued > 0
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("no decode node is busy\n{}", self.logs());
    }

    /// The prefill node (index) working on a request.
    async fn busy_prefill(&self) -> usize {
        for _ in 0..2000 {
            for (i, n) in self.prefill.iter().enumerate() {
                if n.alive
                    && let Some(l) = load(n.port, true).await
                    && l.running + l.queued > 0
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("no prefill node is busy\n{}", self.logs());
    }

    fn kill(&mut self, decode: bool, i: usize) {
        let node = if decode {
            &mut self.decode[i]
        } else {
            &mut self.prefill[i]
        };
        node.alive = false;
        self.procs.0[node.proc].kill().unwrap();
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.procs.0[self.decode[i].proc].id().to_string();
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Waits until every live node's KV blocks are all free again.
    async fn assert_no_leak(&self) {
        for (n, prefill) in self
            .decode
            .iter()
            .map(|n| (n, false))
            .chain(self.prefill.iter().map(|n| (n, true)))
        {
            if !n.alive {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let l = load(n.port, prefill).await;
                if let Some(l) = &l
                    && l.kv_blocks_free == l.kv_blocks_total
                    && l.running + l.queued == 0
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} kept blocks or requests: {l:?}\n{}",
                    n.port,
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One load report from a node; None when it does not answer within a second.
async fn load(port: u16, prefill: bool) -> Option<pb::NodeLoad> {
    let addr = format!("http://127.0.0.1:{port}");
    let request = pb::WatchLoadRequest { interval_ms: 10 };
    let get = async {
        let mut stream = if prefill {
            PrefillNodeClient::connect(addr)
                .await
                .ok()?
                .watch_load(request)
                .await
                .ok()?
                .into_inner()
        } else {
            DecodeNodeClient::connect(addr)
                .await
                .ok()?
                .watch_load(request)
                .await
                .ok()?
                .into_inner()
        };
        stream.message().await.ok()?
    };
    tokio::time::timeout(Duration::from_secs(1), get)
        .await
        .ok()
        .flatten()
}

fn prompt() -> String {
    "In the old harbour town the fishermen mended their nets at dawn and told stories of the sea. "
        .repeat(12)
}

async fn start_request(
    client: &mut GenerateClient<tonic::transport::Channel>,
    id: &str,
) -> Streaming<pb::GenerateResponse> {
    let request = pb::GenerateRequest {
        request_id: id.into(),
        prompt: Some(pb::generate_request::Prompt::Text(prompt())),
        max_tokens: MAX_TOKENS,
        ignore_eos: true,
        ..Default::default()
    };
    client.generate(request).await.unwrap().into_inner()
}

/// Reads tokens until `count` have arrived in all (or the stream finishes).
async fn read_tokens(
    stream: &mut Streaming<pb::GenerateResponse>,
    tokens: &mut Vec<u32>,
    count: usize,
) -> Option<pb::Finished> {
    while tokens.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("the stream stalled for a minute")
            .unwrap_or_else(|s| panic!("the request failed: {s:?}"))
            .expect("the stream ended without Finished");
        match message.event {
            Some(Event::Token(chunk)) => tokens.extend(chunk.ids),
            Some(Event::Finished(f)) => return Some(f),
            Some(Event::PromptLogprobs(_)) => panic!("prompt log probabilities not asked for"),
            None => panic!("an empty response"),
        }
    }
    None
}

/// One request to the end, or the status that ended it (at the call or
/// mid-stream): while the nodes start up, the router may reserve a request
/// at a decode node that is up before any prefill node is, and fail it.
async fn serve_once(
    client: &mut GenerateClient<tonic::transport::Channel>,
    request: pb::GenerateRequest,
) -> Result<(Vec<u32>, pb::Finished), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut tokens = Vec::new();
    loop {
        match stream.message().await? {
            Some(pb::GenerateResponse {
                event: Some(Event::Token(chunk)),
                ..
            }) => tokens.extend(chunk.ids),
            Some(pb::GenerateResponse {
                event: Some(Event::Finished(f)),
                ..
            }) => return Ok((tokens, f)),
            other => return Err(tonic::Status::internal(format!("unexpected {other:?}"))),
        }
    }
}

async fn read_to_end(
    stream: &mut Streaming<pb::GenerateResponse>,
    tokens: &mut Vec<u32>,
) -> pb::Finished {
    read_tokens(stream, tokens, usize::MAX)
        .await
        .expect("read_tokens returns only at Finished here")
}

/// Reads to the end, returning Finished and the longest wait between two messages.
async fn read_to_end_timed(
    stream: &mut Streaming<pb::GenerateResponse>,
    tokens: &mut Vec<u32>,
) -> (pb::Finished, Duration) {
    let mut longest_gap = Duration::ZERO;
    let mut last = Instant::now();
    loop {
        let want = tokens.len() + 1;
        let finished = read_tokens(stream, tokens, want).await;
        longest_gap = longest_gap.max(last.elapsed());
        last = Instant::now();
        if let Some(f) = finished {
            return (f, longest_gap);
        }
    }
}

fn check(tokens: &[u32], finished: &pb::Finished, reference: &[u32], what: &str, logs: &str) {
    assert_eq!(
        tokens, reference,
        "{what}: the output differs from the run with no failure\n{logs}"
    );
    assert_eq!(finished.reason, pb::FinishReason::Length as i32, "{what}");
    let usage = finished.usage.unwrap();
    assert_eq!(usage.completion_tokens, MAX_TOKENS, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_survive_nodes_that_die_or_stop_answering() {
    // Wide enough that prefill and decode take a while even on a fast CPU.
    let mut cluster = Cluster::start(384);
    let mut client = cluster.client().await;

    // The reference: the same greedy request with nothing failing (retrying
    // while the nodes start up).
    let deadline = Instant::now() + Duration::from_secs(60);
    let reference = loop {
        let request = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text(prompt())),
            max_tokens: MAX_TOKENS,
            ignore_eos: true,
            ..Default::default()
        };
        match serve_once(&mut client, request).await {
            Ok((tokens, finished)) => {
                assert_eq!(finished.usage.unwrap().completion_tokens, MAX_TOKENS);
                break tokens;
            }
            Err(s) if Instant::now() > deadline => {
                panic!("the cluster never served: {s:?}\n{}", cluster.logs())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    };
    assert_eq!(reference.len(), MAX_TOKENS as usize);

    // 1. A decode node killed mid-generation.
    let mut stream = start_request(&mut client, "killed-decode").await;
    let mut tokens = Vec::new();
    assert!(
        read_tokens(&mut stream, &mut tokens, BEFORE_FAILURE)
            .await
            .is_none()
    );
    let victim = cluster.busy_decode().await;
    cluster.kill(true, victim);
    let (finished, gap) = read_to_end_timed(&mut stream, &mut tokens).await;
    eprintln!("decode node killed: the longest wait between tokens was {gap:?}");
    check(
        &tokens,
        &finished,
        &reference,
        "decode killed",
        &cluster.logs(),
    );

    // 2. A decode node paused: it keeps its connections but says nothing.
    let mut stream = start_request(&mut client, "paused-decode").await;
    let mut tokens = Vec::new();
    assert!(
        read_tokens(&mut stream, &mut tokens, BEFORE_FAILURE)
            .await
            .is_none()
    );
    let paused = cluster.busy_decode().await;
    cluster.signal(paused, "-STOP");
    // Tokens the node made before the pause may still be on their way; the
    // stall shows as the longest wait between two tokens.
    let (finished, longest_gap) = read_to_end_timed(&mut stream, &mut tokens).await;
    eprintln!("decode node paused: the longest wait between tokens was {longest_gap:?}");
    check(
        &tokens,
        &finished,
        &reference,
        "decode paused",
        &cluster.logs(),
    );
    // The router gives up on a node after 2 s without a load report.
    assert!(
        longest_gap < Duration::from_secs(10),
        "routing around a paused node took {longest_gap:?}"
    );
    cluster.signal(paused, "-CONT");

    // 3. A prefill node killed while it prefills.
    let mut stream = start_request(&mut client, "killed-prefill").await;
    let victim = cluster.busy_prefill().await;
    cluster.kill(false, victim);
    let mut tokens = Vec::new();
    let finished = read_to_end(&mut stream, &mut tokens).await;
    check(
        &tokens,
        &finished,
        &reference,
        "prefill killed",
        &cluster.logs(),
    );

    // Each failure really hit a running request and was retried.
    let router_log = std::fs::read_to_string(cluster.dir.path().join("router.log")).unwrap();
    let retries = router_log
        .matches("re-running the request elsewhere")
        .count();
    assert!(retries >= 3, "{retries} re-runs\n{}", cluster.logs());

    // Nothing leaked on the nodes still alive, the paused-then-resumed one included.
    cluster.assert_no_leak().await;
}

/// `line` without its terminal colour codes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Requests in the chaos run, how many run at once, and after how many a node dies.
const CHAOS_REQUESTS: usize = 300;
const CHAOS_CONCURRENCY: usize = 24;
const CHAOS_KILL_AFTER: usize = 60;
const CHAOS_TOKENS: u32 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_run_with_a_node_killed_loses_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let mut cluster = Cluster::start(96);
    let client = cluster.client().await;
    let prompts: Vec<String> = [
        "The lighthouse keeper climbed the stairs every evening to light the lamp.",
        "A small boat drifted past the rocks while the gulls circled overhead.",
        "Market day brought bread, cheese and apples to the square by the church.",
        "Snow fell on the mountain road and the travellers stopped at the inn.",
    ]
    .iter()
    .map(|p| p.repeat(3))
    .collect();
    let request = |i: usize| pb::GenerateRequest {
        request_id: format!("chaos-{i}"),
        prompt: Some(pb::generate_request::Prompt::Text(
            prompts[i % prompts.len()].clone(),
        )),
        max_tokens: CHAOS_TOKENS,
        ignore_eos: true,
        ..Default::default()
    };

    // References, with nothing failing (retrying while the nodes start up).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut references = Vec::new();
    for i in 0..prompts.len() {
        let tokens = loop {
            match serve_once(&mut client.clone(), request(i)).await {
                Ok((tokens, _)) => break tokens,
                Err(s) if Instant::now() > deadline => {
                    panic!("the cluster never served: {s:?}\n{}", cluster.logs())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        };
        assert_eq!(tokens.len(), CHAOS_TOKENS as usize);
        references.push(tokens);
    }

    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(CHAOS_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CHAOS_REQUESTS {
        let (mut client, done, permits, request) =
            (client.clone(), done.clone(), permits.clone(), request(i));
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let result = async {
                let mut stream = client.generate(request).await?.into_inner();
                let mut tokens = Vec::new();
                loop {
                    match stream.message().await? {
                        Some(pb::GenerateResponse {
                            event: Some(Event::Token(chunk)),
                            ..
                        }) => tokens.extend(chunk.ids),
                        Some(pb::GenerateResponse {
                            event: Some(Event::Finished(f)),
                            ..
                        }) => return Ok::<_, tonic::Status>((tokens, f)),
                        other => {
                            return Err(tonic::Status::internal(format!("unexpected {other:?}")));
                        }
                    }
                }
            }
            .await;
            done.fetch_add(1, Ordering::SeqCst);
            (i, result)
        });
    }
    while done.load(Ordering::SeqCst) < CHAOS_KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let victim = cluster.busy_decode().await;
    cluster.kill(true, victim);

    let (mut completed, mut failed) = (0, Vec::new());
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.unwrap();
        match result {
            Ok((tokens, finished)) => {
                assert_eq!(
                    tokens,
                    references[i % prompts.len()],
                    "request {i}: the output differs from the run with no failure"
                );
                assert_eq!(finished.usage.unwrap().completion_tokens, CHAOS_TOKENS);
                completed += 1;
            }
            Err(status) => failed.push((i, status)),
        }
    }
    let router_log = std::fs::read_to_string(cluster.dir.path().join("router.log")).unwrap();
    let rerun_lines: Vec<String> = router_log
        .lines()
        .filter(|l| l.contains("re-running the request elsewhere"))
        .map(strip_ansi)
        .collect();
    let retried = rerun_lines.len();
    let mut rerun_requests: Vec<&str> = rerun_lines
        .iter()
        .filter_map(|l| l.split("request_id=").nth(1))
        .filter_map(|rest| rest.split(['}', ' ']).next())
        .collect();
    rerun_requests.sort_unstable();
    rerun_requests.dedup();
    eprintln!(
        "chaos run: {CHAOS_REQUESTS} requests ({CHAOS_CONCURRENCY} at once, a decode node killed after {CHAOS_KILL_AFTER}) in {:?}: {completed} completed, {} requests re-run elsewhere ({retried} re-runs), {} failed {failed:?}",
        started.elapsed(),
        rerun_requests.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}\n{}", cluster.logs());
    assert!(retried >= 1, "the kill hit no running request");
    cluster.assert_no_leak().await;
}
