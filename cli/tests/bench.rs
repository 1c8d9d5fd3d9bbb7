//! `tandem bench` against `tandem up`, both as real processes: every request
//! completes, and the table, the JSON results and the plot are written.

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

/// Runs `tandem bench` (with the flags `target` gives for the gRPC and HTTP
/// addresses) against `tandem up` and checks every request completed and the
/// table, JSON and plot were written; returns the table.
fn bench_against_up(target: impl Fn(&str, &str) -> Vec<String>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(dir.path());
    let (port, http_port) = (free_port(), free_port());
    let config = dir.path().join("local.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[router]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\n[prefill]\nchunk_tokens = 32\n[decode]\nlocal_prefill_below = 8\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let _up = Processes(vec![spawn(
        &["up", "--config", config.to_str().unwrap()],
        &dir.path().join("up.log"),
    )]);
    let (json, svg) = (dir.path().join("bench.json"), dir.path().join("bench.svg"));
    let router = format!("http://127.0.0.1:{port}");
    let http = format!("http://127.0.0.1:{http_port}");
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
