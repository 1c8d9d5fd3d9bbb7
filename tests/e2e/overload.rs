//! Overload without collateral damage: many more concurrent streams than
//! the router runs (`max_running`), against a real router, prefill node and
//! decode node on loopback.
//!
//! Every admitted request must complete with the engine's own greedy
//! continuation; every refused one must be RESOURCE_EXHAUSTED with a
//! retry-after; nothing else may happen, and every KV block is free after.
//!
//! `overload_figures_before_and_after` (ignored: a load run, not a check)
//! runs a heavier scenario twice side by side, with the prefill-backlog
//! admission and the scaled KV wait turned off by config ("before", as the
//! router was) and on ("after"), and prints the figures of
//! docs/RELIABILITY.md:
//!
//! ```text
//! cargo test -p tandem-tests --test overload -- --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::RouterSection;
use tandem_engine::ModelDir;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_telemetry::names;
use tandem_tests::*;
use tonic::Code;

/// One overload run's shape.
#[derive(Clone, Copy)]
struct Load {
    streams: usize,
    prompt_len: usize,
    max_tokens: u32,
    /// gRPC connections the streams spread over.
    connections: usize,
    /// Stream `i` sends `prompt(prompt_len, salt + i)`.
    salt: u32,
}

/// What a run produced.
#[derive(Default)]
struct Outcome {
    completed: usize,
    /// Refusals by the first words of their message.
    refused: BTreeMap<String, usize>,
    /// Everything else, by code.
    failed: BTreeMap<String, usize>,
    /// Refusals without a retry-after.
    refused_without_retry_after: usize,
    /// Completed requests whose tokens were not the reference's.
    wrong: usize,
    /// Latencies of the completed requests, sorted.
    latencies: Vec<Duration>,
    wall: Duration,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "completed {} (wrong tokens {}) refused {:?} (without retry-after {}) failed {:?} \
             p50 {:.2} s p99 {:.2} s max {:.2} s wall {:.1} s",
            self.completed,
            self.wrong,
            self.refused,
            self.refused_without_retry_after,
            self.failed,
            self.percentile(0.5).as_secs_f64(),
            self.percentile(0.99).as_secs_f64(),
            self.latencies
                .last()
                .copied()
                .unwrap_or_default()
                .as_secs_f64(),
            self.wall.as_secs_f64(),
        )
    }
}

impl Outcome {
    fn refused_total(&self) -> usize {
        self.refused.values().sum()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

/// Sends `load.streams` greedy requests at once; checks and sorts the outcomes.
async fn run(cluster: &Cluster, references: &[Vec<u32>], load: &Load) -> Outcome {
    let mut clients = Vec::new();
    for _ in 0..load.connections {
        clients.push(cluster.client().await);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..load.streams {
        let mut client = clients[i % clients.len()].clone();
        let p = prompt(load.prompt_len, load.salt + i as u32);
        let max_tokens = load.max_tokens;
        tasks.spawn(async move {
            let t = Instant::now();
            let r = complete(&mut client, greedy_request(&p, max_tokens)).await;
            (i, r, t.elapsed())
        });
    }
    let mut out = Outcome::default();
    while let Some(done) = tasks.join_next().await {
        let (i, result, took) = done.expect("a stream task panicked");
        match result {
            Ok(c) => {
                out.completed += 1;
                out.latencies.push(took);
                if c.tokens != references[i] {
                    out.wrong += 1;
                }
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                if s.metadata().get("retry-after").is_none() {
                    out.refused_without_retry_after += 1;
                }
                let kind: String = s.message().split(" (").next().unwrap_or("").to_string();
                *out.refused.entry(kind).or_default() += 1;
            }
            Err(s) => {
                eprintln!("stream {i} failed: {s:?}");
                *out.failed.entry(format!("{:?}", s.code())).or_default() += 1;
            }
        }
    }
    out.wall = start.elapsed();
    out.latencies.sort();
    out
}

/// The engine's greedy continuations of the run's prompts, computed in this process.
async fn references(model: &Arc<ModelDir>, load: &Load) -> Vec<Vec<u32>> {
    let model = model.clone();
    let (n, len, max, salt) = (
        load.streams,
        load.prompt_len,
        load.max_tokens as usize,
        load.salt,
    );
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|i| reference(&model, &prompt(len, salt + i as u32), max))
            .collect()
    })
    .await
    .expect("references")
}

/// Waits until every KV block of both nodes is free and nothing is queued.
async fn wait_idle(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (free, total) = cluster.decode_blocks();
        let p = cluster.prefill_load().await;
        if free == total && p.kv_blocks_free == p.kv_blocks_total && p.queued == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "KV not at idle: decode {free}/{total}, prefill {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A counter's value summed over the series whose labels include `label`.
fn counter(name: &str, label: &str) -> f64 {
    let text = tandem_telemetry::install_recorder()
        .expect("recorder")
        .render();
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn spec(router: impl FnOnce(&mut RouterSection)) -> ClusterSpec {
    let mut spec = ClusterSpec::default();
    router(&mut spec.router);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_completes_every_admitted_request_and_refuses_the_rest_cleanly() {
    tandem_telemetry::install_recorder().expect("recorder");
    let (_dir, model) = small_model();
    let load = Load {
        streams: 400,
        prompt_len: 200,
        max_tokens: 8,
        connections: 8,
        salt: 0,
    };
    let references = references(&model, &load).await;
    let cluster = Cluster::start(
        model.clone(),
        spec(|r| {
            r.max_running = 32;
            r.max_queue = 128;
            r.kv_timeout_ms = 5_000;
            r.max_prefill_backlog_s = 0.05;
        }),
    )
    .await;
    let reruns_before = counter(names::ROUTER_RERUNS_TOTAL, "reason");
    // The first wave meets a cold router (no prefill rate measured yet): the
    // admission queue's bound refuses what does not fit.
    let first = run(&cluster, &references, &load).await;
    eprintln!("first wave: {first:?}");
    // Later waves find the prefill rate measured (a busy window of at least
    // 0.5 s in which prompts finished: usually the first wave; on a loaded
    // machine the rate may take a wave more): the backlog bound refuses.
    let mut waves = vec![first];
    while waves.len() < 5 {
        let out = run(&cluster, &references, &load).await;
        eprintln!("wave {}: {out:?}", waves.len() + 1);
        let backlog_refused = out.refused.contains_key("the prefill queue is full");
        waves.push(out);
        if backlog_refused {
            break;
        }
    }
    for out in &waves {
        assert_eq!(out.wrong, 0, "wrong tokens: {out:?}");
        assert!(out.failed.is_empty(), "failed requests: {out:?}");
        assert_eq!(out.refused_without_retry_after, 0, "{out:?}");
        assert_eq!(out.completed + out.refused_total(), load.streams);
        assert!(out.completed > 0, "{out:?}");
        assert!(
            out.refused_total() > 0,
            "400 at once must overflow: {out:?}"
        );
    }
    // 32 run and 128 wait: at least that many are served.
    assert!(waves[0].completed >= 160, "{:?}", waves[0]);
    let last = &waves[waves.len() - 1];
    assert!(
        last.refused.contains_key("the prefill queue is full"),
        "the backlog bound refused within {} waves: {last:?}",
        waves.len()
    );
    assert_eq!(
        counter(names::ROUTER_RERUNS_TOTAL, "reason") - reruns_before,
        0.0,
        "nothing failed and no KV wait expired, so nothing was re-run"
    );
    wait_idle(&cluster).await;
}

/// A model large enough that prefill, not the router, is the bottleneck.
fn load_model() -> (tempfile::TempDir, Arc<ModelDir>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = SynthSpec {
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        max_position_embeddings: 1024,
        seed: 7,
        ..Default::default()
    };
    write_model_dir(dir.path(), &spec).expect("synth");
    let model = Arc::new(ModelDir::open(dir.path()).expect("open model"));
    (dir, model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a load run for the figures in docs/RELIABILITY.md, not a check"]
async fn overload_figures_before_and_after() {
    tandem_telemetry::install_recorder().expect("recorder");
    let (_dir, model) = load_model();
    let load = Load {
        streams: 600,
        prompt_len: 400,
        max_tokens: 8,
        connections: 16,
        salt: 0,
    };
    // A warm-up, so the router has measured the prefill rate (a cold router
    // admits and waits as if nothing were queued: docs/RELIABILITY.md).
    let warm_up = Load {
        streams: 64,
        salt: 100_000,
        ..load
    };
    let references = references(&model, &load).await;
    let warm_references = self::references(&model, &warm_up).await;
    for (name, admission_and_scaling) in [("before", false), ("after", true)] {
        let mut spec = spec(|r| {
            r.max_running = 256;
            r.max_queue = 512;
            // The issue's 30 s wait, scaled to this model's speed.
            r.kv_timeout_ms = 2_000;
            r.request_timeout_s = 300.0;
            if admission_and_scaling {
                // The default bound.
                r.max_prefill_backlog_s = 10.0;
                r.kv_timeout_max_ms = 60_000;
            } else {
                r.max_prefill_backlog_s = 0.0;
                r.kv_timeout_max_ms = r.kv_timeout_ms;
            }
        });
        if let Some(p) = spec.prefill.as_mut() {
            p.kv_blocks = 4096;
        }
        spec.decode.kv_blocks = 8192;
        let cluster = Cluster::start(model.clone(), spec).await;
        let warm = run(&cluster, &warm_references, &warm_up).await;
        println!("{name}: warm-up {warm:?}");
        wait_idle(&cluster).await;
        let failures = counter(names::ROUTER_RERUNS_TOTAL, "node_failure");
        let timeouts = counter(names::ROUTER_RERUNS_TOTAL, "kv_timeout");
        let out = run(&cluster, &references, &load).await;
        let failures = counter(names::ROUTER_RERUNS_TOTAL, "node_failure") - failures;
        let timeouts = counter(names::ROUTER_RERUNS_TOTAL, "kv_timeout") - timeouts;
        println!(
            "{name}: streams {} {out:?}; re-runs: node_failure {failures} kv_timeout {timeouts}",
            load.streams
        );
        wait_idle(&cluster).await;
        drop(cluster);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The most sequences the decode node held at once while `run` ran.
async fn run_watching_decode(
    cluster: &Cluster,
    references: &[Vec<u32>],
    load: &Load,
) -> (Outcome, u32) {
    let stats = cluster.decode_stats.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let watching = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut most = 0;
            while !stop.is_cancelled() {
                let s = stats.lock().expect("stats").clone();
                most = most.max(s.running + s.queued);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            most
        })
    };
    let out = run(cluster, references, load).await;
    stop.cancel();
    (out, watching.await.expect("watcher"))
}

/// With `router.decode_waiting`, a saturated decode node holds at most its
/// `max_batch` plus that many requests (none gets its first token and then
/// waits long for a batch slot); the others wait at the router and are all
/// served, correctly. Without it the node takes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saturated_decode_node_holds_max_batch_plus_decode_waiting() {
    let (_dir, model) = small_model();
    let load = Load {
        streams: 12,
        prompt_len: 40,
        max_tokens: 16,
        connections: 2,
        salt: 500,
    };
    let references = references(&model, &load).await;
    for waiting in [Some(1), None] {
        let mut spec = spec(|r| r.decode_waiting = waiting);
        spec.decode.max_batch = 2;
        let cluster = Cluster::start(model.clone(), spec).await;
        // The router learns the node's max_batch from its first report.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (out, most) = run_watching_decode(&cluster, &references, &load).await;
        eprintln!("decode_waiting {waiting:?}: at most {most} at the node; {out:?}");
        assert_eq!(out.completed, load.streams, "{out:?}");
        assert_eq!(out.wrong, 0, "{out:?}");
        match waiting {
            Some(w) => assert!(most <= 2 + w as u32, "{most} at the node"),
            None => assert!(most > 3, "without the bound the node takes more: {most}"),
        }
        wait_idle(&cluster).await;
    }
}
