//! etcd membership with real processes: `tandem router`, `prefill` and two
//! `decode`s configured with `[membership.etcd]` against a real etcd.
//!
//! - A decode node frozen with SIGSTOP stops renewing its lease; once the lease
//!   expires (TTL 2 s here) the router stops choosing it and requests succeed
//!   on the other node. After SIGCONT it registers again.
//! - A decode node sent SIGTERM drains: it leaves etcd first, finishes the
//!   request it is running, then exits cleanly.
//! - `tandem status` lists the members with their load.

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{Processes, TANDEM, free_port, spawn, synth_model};
use tandem_tests::etcd_server::EtcdServer;

const TTL_S: u64 = 2;
const CLUSTER: &str = "proc";

/// Sends `sig` (`-STOP`, `-CONT`, `-TERM`) with the shell's `kill`, present
/// wherever `sh` is.
fn signal(child: &Child, sig: &str) {
    let status = Command::new("sh")
        .args(["-c", &format!("kill {sig} {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} failed");
}

/// `tandem status` against the test etcd.
fn status(etcd: &EtcdServer) -> String {
    let out = Command::new(TANDEM)
        .args(["status", "--etcd", &etcd.url(), "--cluster", CLUSTER])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tandem status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls etcd (every 20 ms) until exactly `ids` are registered; returns how long it took.
fn wait_ids(etcd: &EtcdServer, ids: &[&str], within: Duration) -> Duration {
    wait_ids_at(&etcd.url(), ids, within)
}

fn wait_ids_at(url: &str, ids: &[&str], within: Duration) -> Duration {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let section = tandem_cluster::EtcdSection {
        endpoints: vec![url.to_string()],
        cluster: CLUSTER.into(),
        lease_ttl_s: TTL_S as u32,
    };
    let start = Instant::now();
    loop {
        let mut now: Vec<String> = runtime
            .block_on(tandem_cluster::etcd::list_nodes(&section))
            .map(|records| records.into_iter().map(|r| r.id).collect())
            .unwrap_or_default();
        now.sort();
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        if now == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "members are {now:?}, not {want:?}, after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `tandem generate` through the router.
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

/// Whether one `tandem generate` succeeds within `limit` (it is killed past it).
fn generate_within(router: u16, limit: Duration) -> bool {
    let mut child = Command::new(TANDEM)
        .args([
            "generate",
            "--router",
            &format!("http://127.0.0.1:{router}"),
            "--max-tokens",
            "4",
            "Once upon a time, in a small town by the sea, there lived a girl.",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn logs(dir: &Path) -> String {
    ["router", "prefill", "d1", "d2"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(format!("{f}.log"))).unwrap_or_default();
            format!("--- {f}.log\n{text}")
        })
        .collect()
}

#[test]
fn paused_nodes_are_routed_around_and_stopping_nodes_drain() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd"));
    let model = synth_model(dir.path());
    let common = format!(
        "[model]\npath = {:?}\n[membership]\ndrain_timeout_s = 30\n[membership.etcd]\nendpoints = [\"{}\"]\ncluster = \"{CLUSTER}\"\nlease_ttl_s = {TTL_S}\n",
        model.to_str().unwrap(),
        etcd.url()
    );
    let write = |name: &str, body: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{common}{body}")).unwrap();
        p
    };
    let router = free_port();
    let router_cfg = write(
        "router.toml",
        format!("[router]\nlisten = \"127.0.0.1:{router}\"\nrequest_timeout_s = 30\n"),
    );
    let prefill_cfg = write(
        "prefill.toml",
        "[prefill]\nlisten = \"127.0.0.1:0\"\nchunk_tokens = 32\n".into(),
    );
    let decode_cfg = write(
        "decode.toml",
        "[decode]\nlisten = \"127.0.0.1:0\"\nquic_listen = \"127.0.0.1:0\"\nkv_blocks = 512\nlocal_prefill_below = 4\n".into(),
    );
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let mut procs = Processes(vec![
        spawn(
            &["router", "--config", &arg(&router_cfg)],
            &dir.path().join("router.log"),
        ),
        spawn(
            &["prefill", "--config", &arg(&prefill_cfg)],
            &dir.path().join("prefill.log"),
        ),
        spawn(
            &["decode", "--config", &arg(&decode_cfg), "--id", "d1"],
            &dir.path().join("d1.log"),
        ),
        spawn(
            &["decode", "--config", &arg(&decode_cfg), "--id", "d2"],
            &dir.path().join("d2.log"),
        ),
    ]);
    wait_ids(&etcd, &["prefill-0", "d1", "d2"], Duration::from_secs(60));
    let table = status(&etcd);
    eprintln!("{table}");
    let ids: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(ids, ["d1", "d2", "prefill-0"], "{table}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = generate(router, 8);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no request succeeded: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs(dir.path())
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Freeze d1: it stops renewing its lease. Until the lease expires the router
    // may still pick it (such a request hangs); after, every request succeeds.
    // One thread watches etcd for d1's key to go; this one sends rounds of three
    // requests, each given 1.5 s.
    signal(&procs.0[2], "-STOP");
    let paused = Instant::now();
    let url = etcd.url();
    let watcher = std::thread::spawn(move || {
        wait_ids_at(&url, &["prefill-0", "d2"], Duration::from_secs(TTL_S + 5))
    });
    let mut rounds = Vec::new();
    let gone = loop {
        let started = paused.elapsed();
        let ok = (0..3).all(|_| generate_within(router, Duration::from_millis(1500)));
        rounds.push((started, ok));
        if watcher.is_finished() {
            break watcher.join().unwrap();
        }
    };
    // Rounds that began after the key left etcd must all succeed.
    let after = Instant::now();
    while after.elapsed() < Duration::from_secs(2) {
        let started = paused.elapsed();
        rounds.push((
            started,
            (0..3).all(|_| generate_within(router, Duration::from_millis(1500))),
        ));
    }
    eprintln!("d1 paused: its key left etcd {gone:?} after the pause (lease TTL {TTL_S} s)");
    let first_ok = rounds.iter().find(|(_, ok)| *ok).map(|(t, _)| *t);
    let failed: Vec<Duration> = rounds
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(t, _)| *t)
        .collect();
    eprintln!(
        "d1 paused: {} rounds of 3 requests; rounds begun at {failed:?} after the pause failed; the first that all succeeded began at {first_ok:?}",
        rounds.len()
    );
    assert!(
        gone < Duration::from_secs(TTL_S) + Duration::from_millis(1500),
        "{gone:?}"
    );
    for (started, ok) in &rounds {
        assert!(
            *ok || *started < gone,
            "a round at {started:?}, after d1 left etcd, failed\n{}",
            logs(dir.path())
        );
    }

    // Thawed, d1 finds its lease gone and registers under a new one.
    signal(&procs.0[2], "-CONT");
    let back = wait_ids(&etcd, &["prefill-0", "d1", "d2"], Duration::from_secs(10));
    eprintln!("d1 resumed: registered again after {back:?}");

    // SIGTERM d2 while idle: it leaves etcd at once and exits cleanly.
    signal(&procs.0[3], "-TERM");
    let left = wait_ids(&etcd, &["prefill-0", "d1"], Duration::from_secs(5));
    eprintln!("d2 stopped: its key left etcd after {left:?}");
    let exit = procs.0[3].wait().unwrap();
    assert!(exit.success(), "d2 exited with {exit}");
    assert!(generate(router, 4).status.success());

    // SIGTERM d1 in the middle of a long request: the request still completes.
    let sent = Instant::now();
    let long = std::thread::spawn(move || generate(router, 600));
    std::thread::sleep(Duration::from_millis(500));
    signal(&procs.0[2], "-TERM");
    let term = Instant::now();
    let out = long.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "the long request took {:?}: {}",
        sent.elapsed(),
        stderr.trim()
    );
    assert!(
        out.status.success(),
        "the request in flight failed: {stderr}\n{}",
        logs(dir.path())
    );
    assert!(stderr.contains("generated, finish"), "{stderr}");
    let exit = procs.0[2].wait().unwrap();
    eprintln!(
        "d1 drained: its request finished and it exited {:?} after SIGTERM",
        term.elapsed()
    );
    assert!(exit.success(), "d1 exited with {exit}");
    let d1_log = std::fs::read_to_string(dir.path().join("d1.log")).unwrap();
    assert!(d1_log.contains("drained"), "{d1_log}");
}
