//! `tandem decode`, `tandem prefill` and `tandem router` as separate processes,
//! started from config files, serve a request end to end (`tandem generate`):
//! in plaintext, and with `[tls]` in every config (certificates from
//! `tandem certs`), where `tandem status` asks the nodes over mutual TLS too.
//! Then 2,000 concurrent streams against the router process, measuring its
//! own peak memory.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{Processes, TANDEM, free_port, spawn, synth_model};

/// A prompt long enough to be prefilled remotely, in several chunks.
const PROMPT: &str = "Once upon a time, in a small town by the sea, there lived a girl who liked to walk on the beach.";

/// The three roles' configs in `dir`, each with its own `[tls]` when `tls`.
struct Configs {
    decode: PathBuf,
    prefill: PathBuf,
    router: PathBuf,
    router_port: u16,
    ports: (u16, u16),
}

fn tandem(args: &[&str]) -> Output {
    Command::new(TANDEM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn tls_section(certs: &Path, name: &str) -> String {
    let file = |f: String| format!("{:?}", certs.join(f).to_str().unwrap());
    format!(
        "[tls]\nca = {}\ncert = {}\nkey = {}\nserver_name = \"localhost\"\n",
        file("ca.pem".into()),
        file(format!("{name}.pem")),
        file(format!("{name}-key.pem"))
    )
}

/// Writes the three configs; `router_extra` is added to `[router]`.
fn write_configs(dir: &Path, tls: bool, router_extra: &str) -> Configs {
    let model = synth_model(dir);
    let (decode, quic, prefill, router) = (free_port(), free_port(), free_port(), free_port());
    let certs = dir.join("certs");
    if tls {
        // One certificate per role, the router's included (it is the nodes'
        // gRPC client); the nodes' name both the name and the IP they are dialed at.
        let out = tandem(&[
            "certs",
            "--out",
            certs.to_str().unwrap(),
            "--node",
            "decode=localhost,127.0.0.1",
            "--node",
            "prefill=localhost,127.0.0.1",
            "--node",
            "router=localhost",
        ]);
        assert!(
            out.status.success(),
            "tandem certs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let scheme = if tls { "https" } else { "http" };
    let model_section = format!("[model]\npath = {:?}\n", model.to_str().unwrap());
    let write = |name: &str, body: String| {
        let p = dir.join(format!("{name}.toml"));
        let tls = if tls {
            tls_section(&certs, name)
        } else {
            String::new()
        };
        std::fs::write(&p, format!("{model_section}{body}{tls}")).unwrap();
        p
    };
    Configs {
        decode: write(
            "decode",
            format!(
                "[decode]\nlisten = \"127.0.0.1:{decode}\"\nquic_listen = \"127.0.0.1:{quic}\"\nkv_blocks = 512\nlocal_prefill_below = 4\n"
            ),
        ),
        prefill: write(
            "prefill",
            format!("[prefill]\nlisten = \"127.0.0.1:{prefill}\"\nchunk_tokens = 32\n"),
        ),
        router: write(
            "router",
            format!(
                "[router]\nlisten = \"127.0.0.1:{router}\"\nprefill_nodes = [\"{scheme}://127.0.0.1:{prefill}\"]\ndecode_nodes = [\"{scheme}://127.0.0.1:{decode}\"]\n{router_extra}"
            ),
        ),
        router_port: router,
        ports: (decode, prefill),
    }
}

fn start(dir: &Path, c: &Configs) -> Processes {
    let role = |role: &str, cfg: &Path| {
        spawn(
            &[role, "--config", cfg.to_str().unwrap()],
            &dir.join(format!("{role}.log")),
        )
    };
    Processes(vec![
        role("decode", &c.decode),
        role("prefill", &c.prefill),
        role("router", &c.router),
    ])
}

fn logs(dir: &Path) -> String {
    ["decode.log", "prefill.log", "router.log"]
        .iter()
        .map(|f| {
            format!(
                "--- {f}\n{}",
                std::fs::read_to_string(dir.join(f)).unwrap_or_default()
            )
        })
        .collect()
}

/// `tandem generate` until it succeeds (the roles are starting) or a minute passes.
fn generate(dir: &Path, router: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = format!("http://127.0.0.1:{router}");
    let output = loop {
        let out = tandem(&["generate", "--router", &url, "--max-tokens", "12", PROMPT]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "generate failed: {stderr}\n{}",
        logs(dir)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with(PROMPT), "{stdout}");
    assert!(
        stderr.contains("12 generated, finish: length"),
        "{stderr}\n{}",
        logs(dir)
    );
}

#[test]
fn roles_as_separate_processes_serve_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let configs = write_configs(dir.path(), false, "");
    let _procs = start(dir.path(), &configs);
    generate(dir.path(), configs.router_port);
}

#[test]
fn roles_with_tls_serve_a_request_and_status_asks_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let configs = write_configs(dir.path(), true, "");
    let _procs = start(dir.path(), &configs);
    generate(dir.path(), configs.router_port);
    let logs = logs(dir.path());
    assert!(
        !logs.contains("not dialing this node") && !logs.contains("cannot watch load"),
        "{logs}"
    );

    // `tandem status` with the router's config: its certificate, over mutual TLS.
    let out = tandem(&["status", "--config", configs.router.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("CACHED BLOCKS") && table.contains("CACHE HIT"),
        "{table}"
    );
    let (decode, prefill) = configs.ports;
    for (role, port) in [("decode", decode), ("prefill", prefill)] {
        let line = table
            .lines()
            .find(|l| l.contains(&format!("https://127.0.0.1:{port}")))
            .unwrap_or_else(|| panic!("no {role} line in\n{table}"));
        assert!(
            line.starts_with(role) && !line.contains("unreachable"),
            "{line}"
        );
    }

    // Without a certificate the nodes do not answer: a config listing them
    // in plaintext is refused by their TLS-only ports.
    let plain = dir.path().join("plain.toml");
    std::fs::write(
        &plain,
        format!(
            "[router]\nprefill_nodes = [\"http://127.0.0.1:{prefill}\"]\ndecode_nodes = [\"http://127.0.0.1:{decode}\"]\n"
        ),
    )
    .unwrap();
    let out = tandem(&["status", "--config", plain.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains("unreachable")).count(),
        2,
        "{table}"
    );
}

/// Peak (VmHWM) and current (VmRSS) resident memory of process `pid`, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn two_thousand_streams_against_a_router_process() {
    const STREAMS: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let configs = write_configs(dir.path(), false, "max_running = 128\nmax_queue = 512\n");
    let procs = start(dir.path(), &configs);
    // Up, and one request served.
    generate(dir.path(), configs.router_port);
    let router_pid = procs.0[2].id();
    let (peak_before, rss_before) = memory_mib(router_pid);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{}", configs.router_port);
    let (done, refused, elapsed) = runtime.block_on(async move {
        use tandem_tests::{complete, greedy_request, prompt};
        // Several connections, as many clients would open.
        let mut clients = Vec::new();
        for _ in 0..16 {
            clients.push(
                tandem_proto::v1::generate_client::GenerateClient::connect(url.clone())
                    .await
                    .unwrap(),
            );
        }
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..STREAMS {
            let mut client = clients[i % clients.len()].clone();
            tasks.spawn(async move {
                let req = greedy_request(&prompt(4, i as u32), 2);
                tokio::time::timeout(Duration::from_secs(120), complete(&mut client, req)).await
            });
        }
        let (mut done, mut refused) = (0, 0);
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Err(_) => panic!("a stream hung past its 120 s timeout"),
                Ok(Ok(c)) => {
                    assert_eq!(c.tokens.len(), 2);
                    done += 1;
                }
                Ok(Err(s)) => {
                    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                    refused += 1;
                }
            }
        }
        (done, refused, started.elapsed())
    });
    let (peak, rss) = memory_mib(router_pid);
    eprintln!(
        "{STREAMS} streams against the router process in {elapsed:.1?}: {done} completed, \
         {refused} refused (RESOURCE_EXHAUSTED); router process memory: peak (VmHWM) \
         {peak:.1} MiB, {rss:.1} MiB resident after; before the streams: peak \
         {peak_before:.1} MiB, resident {rss_before:.1} MiB"
    );
    assert_eq!(done + refused, STREAMS);
    assert!(done >= 128, "{done} completed\n{}", logs(dir.path()));
    assert!(peak < 512.0, "router peak RSS {peak:.0} MiB");
}
