//! `tandem up` drains before it leaves etcd, with real processes: SIGTERM in
//! the middle of a long request stops the router admitting (a new request is
//! refused with UNAVAILABLE), lets the long request finish, and only then
//! withdraws the nodes from etcd and exits cleanly.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{Processes, TANDEM, free_port, spawn, synth_model_with};
use tandem_proto::v1 as pb;
use tandem_tests::etcd_server::EtcdServer;

const CLUSTER: &str = "updrain";

fn generate(router: u16, max_tokens: u32) -> Output {
    Command::new(TANDEM)
        .args([
            "generate",
            "--router",
            &format!("http://127.0.0.1:{router}"),
            "--max-tokens",
            &max_tokens.to_string(),
            "Once upon a time, in a small town by the sea, there lived a girl who liked to walk.",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A long request over gRPC (EOS ignored, so the random model cannot end
/// it early): the tokens it got and how it ended.
fn long_request(router: u16, max_tokens: u32) -> Result<usize, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client =
            pb::generate_client::GenerateClient::connect(format!("http://127.0.0.1:{router}"))
                .await
                .map_err(|e| e.to_string())?;
        let request = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text(
                "Once upon a time, in a small town by the sea".into(),
            )),
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let mut stream = client
            .generate(request)
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        let mut tokens = 0;
        loop {
            match stream.message().await.map_err(|s| s.to_string())? {
                Some(pb::GenerateResponse {
                    event: Some(pb::generate_response::Event::Token(t)),
                    ..
                }) => tokens += t.ids.len(),
                Some(pb::GenerateResponse {
                    event: Some(pb::generate_response::Event::Finished(f)),
                    ..
                }) => {
                    return match f.reason() {
                        pb::FinishReason::Length => Ok(tokens),
                        other => Err(format!("finished {other:?} after {tokens} tokens")),
                    };
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    })
}

fn registered(runtime: &tokio::runtime::Runtime, url: &str) -> Option<Vec<String>> {
    let section = tandem_cluster::EtcdSection {
        endpoints: vec![url.to_string()],
        cluster: CLUSTER.into(),
        lease_ttl_s: 2,
    };
    let mut ids: Vec<String> = runtime
        .block_on(tandem_cluster::etcd::list_nodes(&section))
        .ok()?
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    Some(ids)
}

#[test]
fn sigterm_finishes_admitted_requests_before_leaving_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd"));
    // Big enough that a long request runs for seconds on a loaded CI machine.
    let model = synth_model_with(
        dir.path(),
        &[
            "--hidden",
            "256",
            "--intermediate",
            "1024",
            "--layers",
            "4",
            "--heads",
            "8",
            "--kv-heads",
            "4",
            "--max-position",
            "4096",
        ],
    );
    let router = free_port();
    let config = dir.path().join("up.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[membership]\ndrain_timeout_s = 60\n[membership.etcd]\nendpoints = [\"{}\"]\ncluster = \"{CLUSTER}\"\nlease_ttl_s = 2\n\
             [router]\nlisten = \"127.0.0.1:{router}\"\nrequest_timeout_s = 60\n\
             [prefill]\nlisten = \"127.0.0.1:0\"\nchunk_tokens = 32\n\
             [decode]\nlisten = \"127.0.0.1:0\"\nquic_listen = \"127.0.0.1:0\"\nkv_blocks = 512\nlocal_prefill_below = 4\n",
            model.to_str().unwrap(),
            etcd.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("up.log");
    let mut procs = Processes(vec![spawn(
        &["up", "--config", config.to_str().unwrap()],
        &log,
    )]);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let both = vec!["decode-0".to_string(), "prefill-0".to_string()];
    let deadline = Instant::now() + Duration::from_secs(60);
    while registered(&runtime, &etcd.url()).as_ref() != Some(&both) {
        assert!(Instant::now() < deadline, "never registered\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !generate(router, 2).status.success() {
        assert!(
            Instant::now() < deadline,
            "no request succeeded\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A long request, then SIGTERM while it runs.
    let long = std::thread::spawn(move || {
        let out = long_request(router, 500);
        (out, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = procs.0[0].id();
    let killed = Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let term = Instant::now();
    // Admission is off at once: a new request is refused, not queued.
    std::thread::sleep(Duration::from_millis(200));
    let refused = generate(router, 2);
    let refused_err = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "admitted while draining");
    assert!(
        refused_err.contains("Unavailable") || refused_err.contains("shutting down"),
        "{refused_err}"
    );
    // The nodes stay in etcd while the admitted request runs.
    let mut last_seen = None;
    while !long.is_finished() {
        if registered(&runtime, &etcd.url()).as_ref() == Some(&both) {
            last_seen = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (out, done) = long.join().unwrap();
    eprintln!(
        "the long request ended {:?} after SIGTERM: {out:?}",
        done.saturating_duration_since(term),
    );
    assert_eq!(out, Ok(500), "the admitted request failed\n{}", logs());
    assert!(
        done > term + Duration::from_millis(300),
        "the long request ended too soon to test a drain"
    );
    let exit = procs.0[0].wait().unwrap();
    let exited = term.elapsed();
    assert!(exit.success(), "tandem up exited with {exit}\n{}", logs());
    let last_seen = last_seen.expect("the nodes left etcd before the request finished");
    assert!(
        last_seen + Duration::from_millis(100) >= done,
        "the keys left etcd {:?} before the request finished",
        done - last_seen
    );
    assert_eq!(
        registered(&runtime, &etcd.url()),
        Some(vec![]),
        "still registered after exit"
    );
    let text = logs();
    let order: Vec<usize> = [
        "draining: the router admits no more requests",
        "draining: the router's requests finished",
        "draining: leaving the cluster",
    ]
    .iter()
    .map(|line| {
        text.find(line)
            .unwrap_or_else(|| panic!("no {line:?} in\n{text}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    eprintln!(
        "SIGTERM to exit: {exited:?}; the request finished {:?} after SIGTERM; the keys were last seen {:?} before it finished",
        done - term,
        done.saturating_duration_since(last_seen)
    );
}
