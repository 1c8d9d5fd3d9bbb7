//! `router_overhead`: the latency the router adds to a request.
//!
//! Starts, in this process, a decode node and a prefill node that answer at
//! once ([`fake_nodes`]) and a real router in front of them (gRPC on
//! loopback, as in a cluster). Then it drives two open-loop phases at the
//! same fixed rate, each request its own task:
//!
//! 1. **direct**: the client plays the router's part itself, calling the fake
//!    nodes as the router would (`Decode`, read `Admitted`, `Prefill`, read
//!    the tokens and `Finished`), with the prompt already tokenized;
//! 2. **router**: the client calls `Generate` on the router with the prompt
//!    as text, and reads the stream to `Finished`.
//!
//! The phases alternate second by second (`--seconds` rounds of one second
//! of each), so background load on the machine falls on both alike. Both
//! make the same node calls over the same kind of connections, so the
//! difference of their latencies is what the router adds: auth,
//! validation and tokenization, admission, node choice, the extra gRPC hop
//! and the relay of every message. Reported per percentile:
//! `router p50 - direct p50` and `router p99 - direct p99`.
//!
//! ```text
//! cargo run -p tandem-router --bin router_overhead -- --rate 500 --seconds 10
//! ```
//!
//! Options: `--rate R` (requests/s, default 500), `--seconds S` (per phase,
//! default 10), `--tokens N` (token messages per request, default 16),
//! `--prompt-words N` (default 48), `--local` (the decode node prefills: no
//! `Prefill` call), `--metrics` (install the Prometheus recorder, so the
//! router records its metrics as in production), `--logs` (log at info to
//! stderr, one line per request, as in production).

mod fake_nodes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::{RouterSection, StaticMembership};
use tandem_engine::ModelDir;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_proto::v1 as pb;
use tandem_proto::v1::decode_node_client::DecodeNodeClient;
use tandem_proto::v1::decode_response::Event as DecodeEvent;
use tandem_proto::v1::generate_client::GenerateClient;
use tandem_proto::v1::generate_response::Event as ClientEvent;
use tandem_proto::v1::prefill_node_client::PrefillNodeClient;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The bench's settings.
struct Options {
    rate: f64,
    seconds: f64,
    tokens: u32,
    prompt_words: usize,
    local: bool,
    metrics: bool,
    logs: bool,
}

impl Options {
    fn parse() -> Result<Options, BoxError> {
        let mut o = Options {
            rate: 500.0,
            seconds: 10.0,
            tokens: 16,
            prompt_words: 48,
            local: false,
            metrics: false,
            logs: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--rate" => o.rate = value()?.parse()?,
                "--seconds" => o.seconds = value()?.parse()?,
                "--tokens" => o.tokens = value()?.parse()?,
                "--prompt-words" => o.prompt_words = value()?.parse()?,
                "--local" => o.local = true,
                "--metrics" => o.metrics = true,
                "--logs" => o.logs = true,
                other => {
                    return Err(format!("unknown option {other} (see the source's doc)").into());
                }
            }
        }
        if !(o.rate > 0.0 && o.seconds > 0.0 && o.tokens > 0) {
            return Err("--rate, --seconds and --tokens must be positive".into());
        }
        Ok(o)
    }
}

/// Latencies of one phase, sorted, and its failures.
#[derive(Default)]
struct Phase {
    latencies: Vec<Duration>,
    errors: usize,
    wall: Duration,
}

impl Phase {
    /// Adds another round's results.
    fn extend(&mut self, other: Phase) {
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
        self.errors += other.errors;
        self.wall += other.wall;
    }

    fn quantile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[i].as_secs_f64() * 1e3
    }

    fn mean(&self) -> f64 {
        let n = self.latencies.len().max(1) as f64;
        self.latencies
            .iter()
            .map(Duration::as_secs_f64)
            .sum::<f64>()
            * 1e3
            / n
    }
}

/// Sends `count` requests at `rate` per second, `send(i)` each, and times them.
async fn drive<F, Fut>(rate: f64, count: usize, send: F) -> Phase
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
        let request = send(i);
        tasks.spawn(async move {
            let t = Instant::now();
            request.await.map(|()| t.elapsed())
        });
    }
    let mut phase = Phase {
        latencies: Vec::with_capacity(count),
        errors: 0,
        wall: Duration::ZERO,
    };
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(latency)) => phase.latencies.push(latency),
            Ok(Err(e)) => {
                if phase.errors == 0 {
                    eprintln!("first error: {e}");
                }
                phase.errors += 1;
            }
            Err(e) => {
                eprintln!("a request task failed: {e}");
                phase.errors += 1;
            }
        }
    }
    phase.wall = start.elapsed();
    phase.latencies.sort_unstable();
    phase
}

/// One request the router's way, done by hand against the nodes.
async fn direct(
    mut decode: DecodeNodeClient<Channel>,
    mut prefill: PrefillNodeClient<Channel>,
    request: pb::DecodeRequest,
) -> Result<(), BoxError> {
    let mut stream = decode.decode(request.clone()).await?.into_inner();
    let Some(pb::DecodeResponse {
        event: Some(DecodeEvent::Admitted(admitted)),
    }) = stream.message().await?
    else {
        return Err("the decode stream did not start with Admitted".into());
    };
    if !admitted.local_prefill {
        prefill
            .prefill(pb::PrefillRequest {
                request_id: request.request_id.clone(),
                prompt: request.prompt.clone(),
                sampling: request.sampling,
                kv_target: admitted.kv_target,
                generated: Vec::new(),
                logprobs: request.logprobs,
                attempt: 0,
                banned_token_ids: Vec::new(),
                constraint: request.constraint,
                cache_salt: request.cache_salt,
            })
            .await?;
    }
    while let Some(message) = stream.message().await? {
        if let Some(DecodeEvent::Finished(_)) = message.event {
            return Ok(());
        }
    }
    Err("the decode stream ended before Finished".into())
}

/// One request through the router.
async fn routed(
    mut client: GenerateClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<(), BoxError> {
    let mut stream = client.generate(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        if let Some(ClientEvent::Finished(_)) = message.event {
            return Ok(());
        }
    }
    Err("the stream ended before Finished".into())
}

/// A small model for the router's tokenizer and validation, in a temporary directory.
fn synth_model(dir: &std::path::Path) -> Result<Arc<ModelDir>, BoxError> {
    let spec = SynthSpec {
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        max_position_embeddings: 4096,
        ..SynthSpec::default()
    };
    write_model_dir(dir, &spec)?;
    Ok(Arc::new(ModelDir::open(dir)?))
}

fn main() -> Result<(), BoxError> {
    let options = Options::parse()?;
    if options.logs {
        tandem_telemetry::init_logs(tandem_telemetry::LogFormat::Text)?;
    }
    tokio::runtime::Runtime::new()?.block_on(run(options))
}

async fn run(o: Options) -> Result<(), BoxError> {
    if o.metrics {
        tandem_telemetry::install_recorder()?;
    }
    let dir = std::env::temp_dir().join(format!("tandem-router-overhead-{}", std::process::id()));
    let model = synth_model(&dir)?;
    let shutdown = CancellationToken::new();
    let nodes = fake_nodes::start(o.tokens, o.local, &shutdown).await?;
    let decode_url = format!("http://{}", nodes.decode);
    let prefill_url = format!("http://{}", nodes.prefill);
    let config = RouterSection {
        listen: "127.0.0.1:0".parse()?,
        max_running: 100_000,
        max_queue: 100_000,
        ..RouterSection::default()
    };
    let membership = Arc::new(StaticMembership::new(
        std::slice::from_ref(&prefill_url),
        std::slice::from_ref(&decode_url),
    ));
    let router =
        tandem_router::serve(model.clone(), None, config, membership, shutdown.clone()).await?;

    let text: String = (0..o.prompt_words)
        .map(|i| ["the", "little", "fish", "swam", "fast", "to", "catch", "up"][i % 8])
        .collect::<Vec<_>>()
        .join(" ");
    let ids = model.tokenizer.encode(&text, true)?;
    let generate = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(text.clone())),
        max_tokens: o.tokens,
        ..Default::default()
    };
    let client = GenerateClient::new(
        Channel::from_shared(format!("http://{}", router.addr))?
            .connect()
            .await?,
    );
    let decode = DecodeNodeClient::new(Channel::from_shared(decode_url)?.connect().await?);
    let prefill = PrefillNodeClient::new(Channel::from_shared(prefill_url)?.connect().await?);
    let decode_request = |i: usize| pb::DecodeRequest {
        request_id: format!("direct-{i}"),
        prompt: ids.clone(),
        sampling: Some(pb::SamplingParams::default()),
        max_tokens: o.tokens,
        kv_timeout_ms: 30_000,
        ..Default::default()
    };

    // The router learns its nodes from their first load reports.
    let ready = Instant::now();
    while routed(client.clone(), generate.clone()).await.is_err() {
        if ready.elapsed() > Duration::from_secs(10) {
            return Err("the router never served a request".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let rounds = o.seconds.ceil().max(1.0) as usize;
    let per_round = (o.rate * o.seconds / rounds as f64).round().max(1.0) as usize;
    let count = per_round * rounds;
    let warmup = o.rate.round().max(1.0) as usize;
    let direct_phase = |n: usize, offset: usize| {
        let (d, p) = (decode.clone(), prefill.clone());
        drive(o.rate, n, move |i| {
            direct(d.clone(), p.clone(), decode_request(offset + i))
        })
    };
    let routed_phase = |n: usize| {
        let c = client.clone();
        let g = generate.clone();
        drive(o.rate, n, move |_| routed(c.clone(), g.clone()))
    };
    // One second of each first, to warm connections and allocators.
    direct_phase(warmup, 0).await;
    routed_phase(warmup).await;
    let (mut d, mut r) = (Phase::default(), Phase::default());
    for round in 0..rounds {
        d.extend(direct_phase(per_round, warmup + round * per_round).await);
        r.extend(routed_phase(per_round).await);
    }
    shutdown.cancel();
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "router overhead: {} req/s, {rounds} rounds of {per_round} requests per phase ({count} each, alternating), prompt {} words = {} tokens (text, tokenized by the router), {} token messages per request, {} prefill{}{}",
        o.rate,
        o.prompt_words,
        ids.len(),
        o.tokens,
        if o.local { "local" } else { "remote" },
        if o.metrics { ", metrics on" } else { "" },
        if o.logs { ", info logs on" } else { "" },
    );
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10}",
        "phase", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "mean ms", "errors", "req/s"
    );
    for (name, p) in [("direct (nodes)", &d), ("through router", &r)] {
        println!(
            "{:<16} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>10.1}",
            name,
            p.quantile(0.5),
            p.quantile(0.9),
            p.quantile(0.99),
            p.quantile(0.999),
            p.mean(),
            p.errors,
            p.latencies.len() as f64 / p.wall.as_secs_f64(),
        );
    }
    println!(
        "router adds: p50 {:+.3} ms, p90 {:+.3} ms, p99 {:+.3} ms, mean {:+.3} ms",
        r.quantile(0.5) - d.quantile(0.5),
        r.quantile(0.9) - d.quantile(0.9),
        r.quantile(0.99) - d.quantile(0.99),
        r.mean() - d.mean(),
    );
    Ok(())
}
