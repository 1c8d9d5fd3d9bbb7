//! A request's id is in the logs of all three processes that served it
//! (router, prefill node, decode node as separate `tandem` processes), in
//! text and in JSON mode; in JSON mode every log line is a JSON object, the
//! router's last line carries the request's timing spans and the decode
//! node's admission says why the prompt is prefilled where it is.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Processes, TANDEM, free_port, synth_model};

/// Starts `tandem ARGS...` with stdout and stderr (the log) in their own files.
fn spawn_logged(args: &[&str], dir: &Path, name: &str) -> Child {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    let err = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(TANDEM)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TANDEM_LOG_FORMAT")
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap()
}

/// Runs router, prefill and decode processes with `log_args`, sends one
/// request with id `id` (long enough to be prefilled remotely) and returns
/// the three logs once each mentions the id: (role, log).
fn serve_one_request(log_args: &[&str], id: &str) -> Vec<(&'static str, String)> {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(dir.path());
    let (decode, quic, prefill, router) = (free_port(), free_port(), free_port(), free_port());
    let model_section = format!("[model]\npath = {:?}\n", model.to_str().unwrap());
    let configs = [
        (
            "decode",
            format!(
                "[decode]\nlisten = \"127.0.0.1:{decode}\"\nquic_listen = \"127.0.0.1:{quic}\"\nkv_blocks = 512\nlocal_prefill_below = 4\n"
            ),
        ),
        (
            "prefill",
            format!("[prefill]\nlisten = \"127.0.0.1:{prefill}\"\nchunk_tokens = 32\n"),
        ),
        (
            "router",
            format!(
                "[router]\nlisten = \"127.0.0.1:{router}\"\nprefill_nodes = [\"http://127.0.0.1:{prefill}\"]\ndecode_nodes = [\"http://127.0.0.1:{decode}\"]\n"
            ),
        ),
    ];
    let mut procs = Processes(Vec::new());
    for (role, body) in &configs {
        let cfg = dir.path().join(format!("{role}.toml"));
        std::fs::write(&cfg, format!("{model_section}{body}")).unwrap();
        let mut args = log_args.to_vec();
        args.extend([*role, "--config", cfg.to_str().unwrap()]);
        procs.0.push(spawn_logged(&args, dir.path(), role));
    }

    let prompt = "Once upon a time, in a small town by the sea, there lived a girl who liked to walk on the beach.";
    // Until the prefill node has reported to the router, the router has the
    // decode node prefill (the fallback when no prefill node is usable): warm
    // up until a request reached the prefill node, so the one below goes
    // through all three roles.
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    for n in 0.. {
        let warm = format!("warm-up-{n}");
        let _ = Command::new(TANDEM)
            .args([
                "generate",
                "--router",
                &format!("http://127.0.0.1:{router}"),
                "--max-tokens",
                "1",
                "--request-id",
                &warm,
                prompt,
            ])
            .stdin(Stdio::null())
            .output();
        let prefill_log =
            std::fs::read_to_string(dir.path().join("prefill.log")).unwrap_or_default();
        if prefill_log.contains("warm-up-") {
            break;
        }
        assert!(
            Instant::now() < warm_deadline,
            "no request reached the prefill node:\n{prefill_log}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(TANDEM)
            .args([
                "generate",
                "--router",
                &format!("http://127.0.0.1:{router}"),
                "--max-tokens",
                "8",
                "--request-id",
                id,
                prompt,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the request never succeeded: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let read = |role: &str| {
        std::fs::read_to_string(dir.path().join(format!("{role}.log"))).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs: Vec<(&'static str, String)> = ["router", "prefill", "decode"]
            .into_iter()
            .map(|role| (role, read(role)))
            .collect();
        if logs.iter().all(|(_, log)| log.contains(id)) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "the request id {id} is missing from a log:\n{}",
            logs.iter()
                .map(|(r, l)| format!("--- {r}\n{l}"))
                .collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The span each role logs a request's lines in.
fn span_name(role: &str) -> &'static str {
    match role {
        "router" => "generate",
        "prefill" => "prefill",
        _ => "decode",
    }
}

#[test]
fn a_request_id_is_in_all_three_text_logs() {
    let id = "text-log-id-7";
    for (role, log) in serve_one_request(&[], id) {
        // The nodes' spans carry the attempt too: `prefill{request_id=ID attempt=1}`.
        let span = format!("{}{{request_id={id}", span_name(role));
        // Not necessarily the first line in the span: the router may have
        // warned that a node still starting refused it and retried.
        assert!(
            log.lines()
                .any(|l| l.contains(&span) && l.contains(" INFO ")),
            "{role}: no INFO line in span {span}:\n{log}"
        );
    }
}

#[test]
fn json_logs_are_json_lines_carrying_the_request_id() {
    let id = "json-log-id-9";
    for (role, log) in serve_one_request(&["--log-format", "json"], id) {
        let lines: Vec<Value> = log
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{role}: a log line that is not JSON ({e}): {l}"))
            })
            .collect();
        assert!(!lines.is_empty(), "{role}: no log lines");
        for line in &lines {
            assert!(
                line["timestamp"].is_string() && line["level"].is_string(),
                "{role}: {line}"
            );
        }
        let in_span = lines
            .iter()
            .filter(|l| l["span"]["request_id"] == id)
            .collect::<Vec<_>>();
        assert!(
            !in_span.is_empty(),
            "{role}: no line in the request's span:\n{log}"
        );
        for l in &in_span {
            assert_eq!(l["span"]["name"], span_name(role), "{role}: {l}");
            assert_eq!(l["spans"][0]["request_id"], id, "{role}: {l}");
        }
        let line = |message: &str| {
            in_span
                .iter()
                .find(|l| l["fields"]["message"] == message)
                .unwrap_or_else(|| panic!("{role}: no {message:?} line:\n{log}"))
        };
        match role {
            // One line at the end carries every phase of the time to first
            // token of this remotely prefilled request.
            "router" => {
                let done = line("request finished");
                for phase in [
                    "route_ms",
                    "prefill_queue_ms",
                    "prefill_compute_ms",
                    "kv_send_tail_ms",
                    "kv_import_tail_ms",
                    "first_token_ms",
                    "first_step_ms",
                ] {
                    let ms = done["fields"][phase].as_f64();
                    assert!(ms.is_some_and(|ms| ms >= 0.0), "{phase}: {done}");
                }
            }
            // The decode node says where the prompt is prefilled, and why.
            "decode" => {
                let admitted = line("admitted");
                assert_eq!(admitted["fields"]["reason"], "remote", "{admitted}");
            }
            _ => {}
        }
    }
}
