//! `tandem decode`, `tandem prefill` and `tandem router` as separate processes,
//! started from config files, serve a request end to end (`tandem generate`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// Kills the child processes when the test ends, pass or fail.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(role: &str, config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(TANDEM)
        .args([role, "--config", config.to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[test]
fn roles_as_separate_processes_serve_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let status = Command::new(TANDEM)
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
        .args([
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--max-position",
            "1024",
        ])
        .status()
        .unwrap();
    assert!(status.success());

    let (decode, quic, prefill, router) = (free_port(), free_port(), free_port(), free_port());
    let model_section = format!("[model]\npath = {:?}\n", model.to_str().unwrap());
    let write = |name: &str, body: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{model_section}{body}")).unwrap();
        p
    };
    let decode_cfg = write(
        "decode.toml",
        format!(
            "[decode]\nlisten = \"127.0.0.1:{decode}\"\nquic_listen = \"127.0.0.1:{quic}\"\nkv_blocks = 512\nlocal_prefill_below = 4\n"
        ),
    );
    let prefill_cfg = write(
        "prefill.toml",
        format!("[prefill]\nlisten = \"127.0.0.1:{prefill}\"\nchunk_tokens = 32\n"),
    );
    let router_cfg = write(
        "router.toml",
        format!(
            "[router]\nlisten = \"127.0.0.1:{router}\"\nprefill_nodes = [\"http://127.0.0.1:{prefill}\"]\ndecode_nodes = [\"http://127.0.0.1:{decode}\"]\n"
        ),
    );
    let _procs = Processes(vec![
        spawn("decode", &decode_cfg, &dir.path().join("decode.log")),
        spawn("prefill", &prefill_cfg, &dir.path().join("prefill.log")),
        spawn("router", &router_cfg, &dir.path().join("router.log")),
    ]);

    // A prompt long enough to be prefilled remotely, in several chunks.
    let prompt = "Once upon a time, in a small town by the sea, there lived a girl who liked to walk on the beach.";
    let deadline = Instant::now() + Duration::from_secs(60);
    let output = loop {
        let out = Command::new(TANDEM)
            .args([
                "generate",
                "--router",
                &format!("http://127.0.0.1:{router}"),
                "--max-tokens",
                "12",
                prompt,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let logs: String = ["decode.log", "prefill.log", "router.log"]
        .iter()
        .map(|f| {
            format!(
                "--- {f}\n{}",
                std::fs::read_to_string(dir.path().join(f)).unwrap_or_default()
            )
        })
        .collect();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "generate failed: {stderr}\n{logs}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with(prompt), "{stdout}");
    assert!(
        stderr.contains("12 generated, finish: length"),
        "{stderr}\n{logs}"
    );
}
