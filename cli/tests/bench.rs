//! `tandem bench` against `tandem up`, both as real processes: every request
//! completes, and the table, the JSON results and the plot are written.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bench_against_tandem_up() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let synth = Command::new(TANDEM)
        .args([
            "model",
            "synth",
            "--out",
            model.to_str().unwrap(),
            "--hidden",
            "64",
            "--intermediate",
            "128",
        ])
        .args(["--layers", "2", "--heads", "4", "--kv-heads", "2"])
        .status()
        .unwrap();
    assert!(synth.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("local.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[router]\nlisten = \"127.0.0.1:{port}\"\n[prefill]\nchunk_tokens = 32\n[decode]\nlocal_prefill_below = 8\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let _up = Kill(
        Command::new(TANDEM)
            .args(["up", "--config", config.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let (json, svg) = (dir.path().join("bench.json"), dir.path().join("bench.svg"));
    let router = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = Command::new(TANDEM)
            .args([
                "bench",
                "--router",
                &router,
                "--num-prompts",
                "24",
                "--request-rate",
                "50,inf",
            ])
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
}
