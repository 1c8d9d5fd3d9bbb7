//! `tandem decode`, `tandem prefill` and `tandem router` as separate processes,
//! started from config files, serve a request end to end (`tandem generate`).

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Processes, TANDEM, free_port, spawn, synth_model};

#[test]
fn roles_as_separate_processes_serve_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(dir.path());

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
        spawn(
            &["decode", "--config", decode_cfg.to_str().unwrap()],
            &dir.path().join("decode.log"),
        ),
        spawn(
            &["prefill", "--config", prefill_cfg.to_str().unwrap()],
            &dir.path().join("prefill.log"),
        ),
        spawn(
            &["router", "--config", router_cfg.to_str().unwrap()],
            &dir.path().join("router.log"),
        ),
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
