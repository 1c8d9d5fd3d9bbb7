//! `tandem bench` against `tandem up`, both as real processes: every request
//! completes, and the table, the JSON results and the plot are written; a
//! multi-turn run sees the prefix cache serve its conversations' history.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Processes, TANDEM, free_port, spawn, synth_model};

#[test]
fn bench_against_tandem_up() {
    bench_against_up(|grpc, _| vec!["--router".into(), grpc.into()]);
}

/// The same run over the OpenAI-compatible HTTP API (streamed completions,
/// tokens counted from the usage chunk).
#[test]
fn bench_over_the_openai_api() {
    let stdout = bench_against_up(|_, http| {
        vec![
            "--backend".into(),
            "openai".into(),
            "--base-url".into(),
            http.into(),
        ]
    });
    // 24 requests x 6 tokens, counted from the server's usage.
    assert!(
        stdout.contains("Total generated tokens:                  144"),
        "{stdout}"
    );
}

/// Conversations that resend their history: every turn completes, and the
/// prefix cache serves part of the prompts (the shared system prompt and each
/// session's earlier turns), reported in the table and the JSON file.
#[test]
fn multi_turn_reports_a_cache_hit_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, router, _) = start_up(dir.path());
    let json = dir.path().join("mt.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = Command::new(TANDEM)
            .args(["bench", "--router", &router, "--dataset", "multi-turn"])
            .args([
                "--sessions",
                "3",
                "--turns",
                "3",
                "--system-prompt-len",
                "64",
            ])
            .args([
                "--turn-len",
                "16",
                "--output-len",
                "4",
                "--think-time-ms",
                "10",
            ])
            .args(["--timeout-s", "60", "--result-file", json.to_str().unwrap()])
            .output()
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Successful requests:                     9"),
        "{stdout}"
    );
    assert!(stdout.contains("Mean TTFT later turns (ms):"), "{stdout}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let run = &results["runs"][0];
    let hit_rate = run["metrics"]["prefix_cache_hit_rate"].as_f64().unwrap();
    assert!(
        hit_rate > 0.0 && hit_rate < 1.0,
        "hit rate {hit_rate}\n{stdout}"
    );
    assert!(
        run["metrics"]["first_turn_ttft"]["p99_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let requests = run["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 9);
    // A later turn resends an earlier one, so more of it is cached.
    let turn = |t: u64| {
        requests
            .iter()
            .find(|r| r["session"] == 0 && r["turn"] == t)
            .unwrap()
    };
    assert!(
        turn(2)["cached_tokens"].as_u64() > turn(0)["cached_tokens"].as_u64(),
        "{requests:?}"
    );
}

/// Starts `tandem up` with a synthesized model under `dir`; returns it and
/// its gRPC and HTTP addresses.
fn start_up(dir: &std::path::Path) -> (Processes, String, String) {
    let model = synth_model(dir);
    let (port, http_port) = (free_port(), free_port());
    let config = dir.join("local.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[router]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\n[prefill]\nchunk_tokens = 32\n[decode]\nlocal_prefill_below = 8\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let up = Processes(vec![spawn(
        &["up", "--config", config.to_str().unwrap()],
        &dir.join("up.log"),
    )]);
    (
        up,
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{http_port}"),
    )
}

/// Runs `tandem bench` (with the flags `target` gives for the gRPC and HTTP
/// addresses) against `tandem up` and checks every request completed and the
/// table, JSON and plot were written; returns the table.
fn bench_against_up(target: impl Fn(&str, &str) -> Vec<String>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (_up, router, http) = start_up(dir.path());
    let (json, svg) = (dir.path().join("bench.json"), dir.path().join("bench.svg"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = Command::new(TANDEM)
            .arg("bench")
            .args(target(&router, &http))
            .args(["--num-prompts", "24", "--request-rate", "50,inf"])
            .args([
                "--input-len",
                "40",
                "--output-len",
                "6",
                "--slo",
                "ttft=5s,tpot=1s",
                "--timeout-s",
                "60",
            ])
            .args([
                "--result-file",
                json.to_str().unwrap(),
                "--plot",
                svg.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Serving Benchmark Result"), "{stdout}");
    assert!(
        stdout.contains("Successful requests:                     24"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Failed requests:                         0"),
        "{stdout}"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let text = results.to_string();
    assert!(
        text.contains("ttft") || text.contains("TTFT"),
        "JSON results name TTFT: {text:.300}"
    );
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") || plot.contains("<svg"),
        "an SVG plot"
    );
    stdout.into_owned()
}
