//! Model identity with real processes and a real etcd: a decode node loaded
//! with other weights under the same model name (another synth seed, same
//! shape), a decode node of another shape (3 layers against 2) and a prefill
//! node with the other weights join a running cluster. None of them gets a
//! request, `tandem status` says why, the router counts them in
//! `tandem_router_incompatible_nodes`, and greedy outputs stay identical to
//! the run before they joined. Measured: the time from a mismatched node's
//! key appearing in etcd to the router holding it as incompatible.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{Processes, TANDEM, free_port, spawn, synth_model_with};
use tandem_proto::v1 as pb;
use tandem_tests::etcd_server::EtcdServer;

const CLUSTER: &str = "ident";

const PROMPTS: [&str; 4] = [
    "Once upon a time, in a small town by the sea, there lived a girl who liked to walk along the shore every morning.",
    "The quick brown fox",
    "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
];

fn model(dir: &Path, name: &str, layers: &str, seed: &str) -> PathBuf {
    let at = dir.join(name);
    std::fs::create_dir_all(&at).unwrap();
    synth_model_with(
        &at,
        &[
            "--hidden",
            "64",
            "--intermediate",
            "128",
            "--layers",
            layers,
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--max-position",
            "1024",
            "--seed",
            seed,
        ],
    )
}

fn generate(router: u16, prompt: &str) -> Output {
    Command::new(TANDEM)
        .args([
            "generate",
            "--router",
            &format!("http://127.0.0.1:{router}"),
            "--max-tokens",
            "24",
            prompt,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Every prompt's greedy output.
fn outputs(router: u16, logs: &dyn Fn() -> String) -> Vec<String> {
    PROMPTS
        .iter()
        .map(|p| {
            let out = generate(router, p);
            assert!(
                out.status.success(),
                "generate failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                logs()
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

fn registered(runtime: &tokio::runtime::Runtime, etcd: &EtcdServer) -> Vec<String> {
    let section = tandem_cluster::EtcdSection {
        endpoints: vec![etcd.url()],
        cluster: CLUSTER.into(),
        lease_ttl_s: 2,
    };
    let mut ids: Vec<String> = runtime
        .block_on(tandem_cluster::etcd::list_nodes(&section))
        .map(|records| records.into_iter().map(|r| r.id).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

/// The router's `tandem_router_incompatible_nodes`, if it exports it yet.
fn incompatible_gauge(metrics: u16) -> Option<f64> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", metrics)).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with("tandem_router_incompatible_nodes "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// One load report of a node, over its `WatchLoad`.
fn load_of(runtime: &tokio::runtime::Runtime, role: &str, addr: &str) -> pb::NodeLoad {
    runtime.block_on(async {
        let request = pb::WatchLoadRequest { interval_ms: 50 };
        let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut stream = if role == "prefill" {
            pb::prefill_node_client::PrefillNodeClient::new(channel)
                .watch_load(request)
                .await
                .unwrap()
                .into_inner()
        } else {
            pb::decode_node_client::DecodeNodeClient::new(channel)
                .watch_load(request)
                .await
                .unwrap()
                .into_inner()
        };
        stream.message().await.unwrap().unwrap()
    })
}

#[test]
fn nodes_serving_other_weights_or_shapes_get_no_requests() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd"));
    let good = model(dir.path(), "good", "2", "1");
    let seed = model(dir.path(), "seed", "2", "2");
    let shape = model(dir.path(), "shape", "3", "1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = |name: &str, model: &Path, body: String| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[model]\npath = {:?}\n[membership.etcd]\nendpoints = [\"{}\"]\ncluster = \"{CLUSTER}\"\nlease_ttl_s = 2\n{body}",
                model.to_str().unwrap(),
                etcd.url()
            ),
        )
        .unwrap();
        p.to_str().unwrap().to_string()
    };
    let (router, metrics) = (free_port(), free_port());
    let router_cfg = config(
        "router.toml",
        &good,
        format!("[router]\nlisten = \"127.0.0.1:{router}\"\nrequest_timeout_s = 30\n"),
    );
    let prefill = "[prefill]\nlisten = \"127.0.0.1:0\"\nchunk_tokens = 32\n".to_string();
    // Prompts of 4 tokens and more are prefilled by a prefill node.
    let decode = "[decode]\nlisten = \"127.0.0.1:0\"\nquic_listen = \"127.0.0.1:0\"\nkv_blocks = 512\nlocal_prefill_below = 4\n".to_string();
    let names = ["router", "p-good", "d-good", "d-seed", "d-shape", "p-seed"];
    let logs = || {
        names
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(dir.path().join(format!("{f}.log")))
                    .unwrap_or_default();
                format!("--- {f}.log\n{text}")
            })
            .collect::<String>()
    };
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut procs = Processes(vec![
        spawn(
            &[
                "router",
                "--config",
                &router_cfg,
                "--metrics-listen",
                &format!("127.0.0.1:{metrics}"),
            ],
            &log("router"),
        ),
        spawn(
            &[
                "prefill",
                "--config",
                &config("p-good.toml", &good, prefill.clone()),
                "--id",
                "p-good",
            ],
            &log("p-good"),
        ),
        spawn(
            &[
                "decode",
                "--config",
                &config("d-good.toml", &good, decode.clone()),
                "--id",
                "d-good",
            ],
            &log("d-good"),
        ),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while registered(&runtime, &etcd) != ["d-good", "p-good"] {
        assert!(
            Instant::now() < deadline,
            "nodes never registered\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The fault-free run (retried until the router has its nodes).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !generate(router, PROMPTS[0]).status.success() {
        assert!(
            Instant::now() < deadline,
            "no request succeeded\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let reference = outputs(router, &logs);
    assert_eq!(incompatible_gauge(metrics), Some(0.0), "{}", logs());

    // The mismatched nodes join; the time from each key in etcd to the
    // router holding the node as incompatible.
    let joiners = [
        ("d-seed", "decode", &seed, &decode),
        ("d-shape", "decode", &shape, &decode),
        ("p-seed", "prefill", &seed, &prefill),
    ];
    let mut exclusion = Vec::new();
    for (k, (id, role, model, body)) in joiners.iter().enumerate() {
        let cfg = config(&format!("{id}.toml"), model, (*body).clone());
        procs
            .0
            .push(spawn(&[role, "--config", &cfg, "--id", id], &log(id)));
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            if registered(&runtime, &etcd).iter().any(|r| r == id) {
                break Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{id} never registered\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let want = (k + 1) as f64;
        loop {
            if incompatible_gauge(metrics) == Some(want) {
                break;
            }
            assert!(
                seen.elapsed() < Duration::from_secs(10),
                "the router never excluded {id}\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        exclusion.push((id, seen.elapsed()));
    }
    eprintln!(
        "from registered in etcd to excluded by the router (polled every 2 ms): {exclusion:?}"
    );

    // Traffic: the same outputs, and none of it on the mismatched nodes.
    for _ in 0..3 {
        assert_eq!(outputs(router, &logs), reference, "{}", logs());
    }
    let status = Command::new(TANDEM)
        // With the router's config: the same reference as the router's.
        .args(["status", "--config", &router_cfg])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(status.status.success());
    let table = String::from_utf8_lossy(&status.stdout).into_owned();
    eprintln!("{table}");
    let row = |id: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
            .to_string()
    };
    for id in ["d-good", "p-good"] {
        assert!(row(id).ends_with("cluster model"), "{}", row(id));
    }
    assert!(
        row("d-seed").contains("INCOMPATIBLE: weights differ"),
        "{}",
        row("d-seed")
    );
    assert!(
        row("p-seed").contains("INCOMPATIBLE: weights differ"),
        "{}",
        row("p-seed")
    );
    assert!(
        row("d-shape").contains("INCOMPATIBLE: model config (shape), weights differ"),
        "{}",
        row("d-shape")
    );
    let records = runtime
        .block_on(tandem_cluster::etcd::list_nodes(
            &tandem_cluster::EtcdSection {
                endpoints: vec![etcd.url()],
                cluster: CLUSTER.into(),
                lease_ttl_s: 2,
            },
        ))
        .unwrap();
    for r in records
        .iter()
        .filter(|r| r.id.ends_with("seed") || r.id == "d-shape")
    {
        let load = load_of(&runtime, r.role.as_str(), &r.grpc_addr);
        assert_eq!(
            (load.steps_total, load.prompt_tokens_total, load.running),
            (0, 0, 0),
            "{} computed something: {load:?}\n{}",
            r.id,
            logs()
        );
    }
    let router_log = std::fs::read_to_string(log("router")).unwrap();
    let warnings = router_log
        .lines()
        .filter(|l| l.contains("serves another model"))
        .count();
    assert_eq!(
        warnings, 3,
        "each mismatched node logged once:\n{router_log}"
    );
}
