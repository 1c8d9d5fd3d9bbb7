//! `tandem bench`: a load generator against the router's `Generate` API.
//!
//! It reports what `vllm bench serve` reports, with the same definitions, so
//! numbers can be set side by side: request and token throughput, goodput
//! under SLOs, and TTFT / TPOT / ITL / end-to-end latency statistics.
//!
//! The pieces, one idea each: [`dataset`] makes the prompts, [`arrivals`]
//! says when each is sent ([`conversation`] and [`sessions`]: the
//! multi-turn workload, conversations that resend their history), [`request`] sends one over gRPC and times its
//! stream ([`openai`]: over the OpenAI-compatible HTTP API),
//! [`runner`] drives one run at one rate, [`metrics`] turns records into
//! numbers ([`spans`]: the median of each phase of the TTFT), [`node_metrics`] adds the nodes' own counters around each run
//! (`--metrics-url`), [`report`] prints and saves them and [`plot`] draws them.
//! [`run_bench`] is the whole command as a library call, for tests.

pub mod arrivals;
pub mod conversation;
pub mod dataset;
pub mod metrics;
pub mod node_metrics;
pub mod openai;
pub mod plot;
pub mod record;
pub mod report;
pub mod request;
pub mod runner;
pub mod sessions;
pub mod slo;
pub mod spans;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tandem_proto::v1::generate_client::GenerateClient;
use tonic::transport::Endpoint;

pub use arrivals::RequestRate;
pub use report::{BenchReport, RunReport};
use request::Target;
pub use slo::Slo;

/// Where prompts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetKind {
    /// Random prompts of the asked lengths (vLLM's `random`).
    Synthetic,
    /// A ShareGPT JSON file (`--dataset-path`).
    Sharegpt,
    /// Synthetic conversations (`--sessions` x `--turns`) that share a system
    /// prompt and resend their whole history each turn; `--request-rate` is
    /// then sessions started per second.
    MultiTurn,
}

/// Which of the router's APIs requests go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// gRPC `Generate` at `--router`.
    Grpc,
    /// Streamed `POST /v1/completions` at `--base-url` (vLLM's `openai` backend).
    Openai,
}

/// How synthetic prompts are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PromptFormat {
    /// Token ids in `[0, --vocab-size)`, exact lengths.
    Ids,
    /// Words from a fixed list; the router tokenizes them.
    Text,
}

/// Flags of `tandem bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// The router's address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub router: String,
    /// The API to load: gRPC, or the OpenAI-compatible HTTP API.
    #[arg(long, value_enum, default_value_t = Backend::Grpc)]
    pub backend: Backend,
    /// The router's HTTP address, for `--backend openai`.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model name to ask for; empty means the cluster's only model.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Where prompts come from.
    #[arg(long, value_enum, default_value_t = DatasetKind::Synthetic)]
    pub dataset: DatasetKind,
    /// ShareGPT JSON file for `--dataset sharegpt`.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Number of requests per run.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Prompt tokens of synthetic prompts (after the shared prefix). Default 1024.
    #[arg(long)]
    pub input_len: Option<usize>,
    /// Tokens to generate per request. Default 128 for synthetic; for ShareGPT,
    /// overrides the reply's approximate length.
    #[arg(long)]
    pub output_len: Option<usize>,
    /// Spread input lengths uniformly over `[len * (1 - r), len * (1 + r)]`.
    #[arg(long, default_value_t = 0.0)]
    pub input_len_range: f64,
    /// Spread output lengths uniformly over `[len * (1 - r), len * (1 + r)]`.
    #[arg(long, default_value_t = 0.0)]
    pub output_len_range: f64,
    /// Random tokens every synthetic prompt starts with.
    #[arg(long, default_value_t = 0)]
    pub prefix_len: usize,
    /// Multi-turn: number of conversations.
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,
    /// Multi-turn: requests (user turns) per conversation.
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    /// Multi-turn: tokens of the system prompt every conversation starts with.
    #[arg(long, default_value_t = 256)]
    pub system_prompt_len: usize,
    /// Multi-turn: tokens of each user turn.
    #[arg(long, default_value_t = 64)]
    pub turn_len: usize,
    /// Multi-turn: pause between an answer's end and the next turn.
    #[arg(long, default_value_t = 0)]
    pub think_time_ms: u64,
    /// Synthetic token ids are drawn below this; keep it within the model's vocabulary.
    #[arg(long, default_value_t = 500)]
    pub vocab_size: u32,
    /// Send synthetic prompts as token ids or as text.
    #[arg(long, value_enum, default_value_t = PromptFormat::Ids)]
    pub prompt_format: PromptFormat,
    /// Requests per second (Poisson arrivals), or `inf` for all at once;
    /// a comma-separated list runs a sweep, one run per rate.
    #[arg(long, value_delimiter = ',', default_value = "inf")]
    pub request_rate: Vec<RequestRate>,
    /// Gamma shape of inter-arrival times (1 = Poisson, < 1 burstier).
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Most requests in flight at once.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Seed of the prompts and the arrival schedule.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Goodput objectives, e.g. `ttft=500ms,tpot=50ms,e2e=5s`.
    #[arg(long)]
    pub slo: Option<Slo>,
    /// Each run stops after this long; unfinished requests count as failed.
    #[arg(long, default_value_t = 600.0)]
    pub timeout_s: f64,
    /// Write the results, per-request data included, as JSON here.
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// Draw latency against rate and TTFT/ITL distributions as SVG here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Prometheus endpoints of the cluster's nodes (`http://host:port/metrics`;
    /// comma-separated or repeated), scraped before and after each run: the
    /// report then adds prompt tokens the nodes computed and KV bytes over QUIC.
    #[arg(long, value_delimiter = ',')]
    pub metrics_url: Vec<String>,
}

#[derive(Parser)]
struct BenchFlags {
    #[command(flatten)]
    args: BenchArgs,
}

impl BenchArgs {
    /// Args from command-line flags (without the program or subcommand name),
    /// e.g. `BenchArgs::from_flags(["--num-prompts", "10"])` in a test.
    // Used by tests and by harnesses that call `run_bench` in-process.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn from_flags<I, S>(flags: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("tandem-bench"))
            .chain(flags.into_iter().map(Into::into));
        Ok(BenchFlags::try_parse_from(argv)?.args)
    }
}

/// What a run sends: independent prompts, or conversations.
enum Workload {
    Prompts(Vec<dataset::BenchPrompt>),
    Conversations(conversation::Conversations),
}

impl Workload {
    fn num_requests(&self) -> usize {
        match self {
            Workload::Prompts(p) => p.len(),
            Workload::Conversations(c) => c.num_requests(),
        }
    }
}

fn load_workload(args: &BenchArgs, rng: &mut StdRng) -> anyhow::Result<Workload> {
    if args.dataset != DatasetKind::MultiTurn {
        return load_prompts(args, rng).map(Workload::Prompts);
    }
    let as_text = args.prompt_format == PromptFormat::Text;
    // The HTTP API streams text only, so the history can resend answers only as text.
    anyhow::ensure!(
        as_text || args.backend == Backend::Grpc,
        "--dataset multi-turn with --backend openai needs --prompt-format text"
    );
    let spec = conversation::MultiTurnSpec {
        sessions: args.sessions,
        turns: args.turns,
        system_prompt_len: args.system_prompt_len,
        turn_len: args.turn_len,
        output_len: args.output_len.unwrap_or(128),
        vocab_size: args.vocab_size,
        as_text,
    };
    conversation::Conversations::synthetic(&spec, rng).map(Workload::Conversations)
}

fn load_prompts(args: &BenchArgs, rng: &mut StdRng) -> anyhow::Result<Vec<dataset::BenchPrompt>> {
    anyhow::ensure!(args.num_prompts > 0, "--num-prompts must be positive");
    match args.dataset {
        DatasetKind::MultiTurn => anyhow::bail!("multi-turn conversations are not prompts"),
        DatasetKind::Synthetic => dataset::synthetic(
            &dataset::SyntheticSpec {
                num_prompts: args.num_prompts,
                input_len: args.input_len.unwrap_or(1024),
                output_len: args.output_len.unwrap_or(128),
                input_range_ratio: args.input_len_range,
                output_range_ratio: args.output_len_range,
                prefix_len: args.prefix_len,
                vocab_size: args.vocab_size,
                as_text: args.prompt_format == PromptFormat::Text,
            },
            rng,
        ),
        DatasetKind::Sharegpt => {
            let path = args
                .dataset_path
                .as_deref()
                .context("--dataset sharegpt needs --dataset-path FILE")?;
            dataset::sharegpt(path, args.num_prompts, args.output_len, rng)
        }
    }
}

/// The nodes' counters, when `--metrics-url` names endpoints.
async fn scrape(urls: &[String]) -> anyhow::Result<Option<node_metrics::NodeCounters>> {
    if urls.is_empty() {
        return Ok(None);
    }
    node_metrics::scrape_all(urls).await.map(Some)
}

/// Runs the benchmark `args` describes: one run per request rate, each
/// run's table printed to stdout as it ends; writes `--result-file` and
/// `--plot` when asked.
pub async fn run_bench(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        !args.request_rate.is_empty(),
        "--request-rate needs a value"
    );
    anyhow::ensure!(
        args.timeout_s > 0.0 && args.timeout_s.is_finite(),
        "--timeout-s must be a positive number of seconds"
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    let workload = load_workload(args, &mut rng)?;
    let target = match args.backend {
        Backend::Grpc => {
            let channel = Endpoint::from_shared(args.router.clone())
                .with_context(|| format!("--router {:?} is not a URL", args.router))?
                .connect_timeout(Duration::from_secs(10))
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| {
                    format!(
                        "cannot reach the router at {} (is `tandem up` running?)",
                        args.router
                    )
                })?;
            Target::Grpc(GenerateClient::new(channel))
        }
        Backend::Openai => Target::OpenAi(openai::HttpTarget::parse(&args.base_url)?),
    };

    // As vLLM does: one request alone first, so a misconfigured run fails fast.
    // (Multi-turn: the system prompt and a turn no session sends, so only the
    // shared system prompt is warm when the run starts.)
    let probe_prompt = match &workload {
        Workload::Prompts(p) => p[0].clone(),
        Workload::Conversations(c) => c.probe(),
    };
    let probe = target
        .send(0, &probe_prompt, &args.model, std::time::Instant::now())
        .await;
    anyhow::ensure!(
        probe.success,
        "the test request failed ({}): {}",
        probe.status,
        probe.error
    );

    let mut report = BenchReport {
        router: match args.backend {
            Backend::Grpc => args.router.clone(),
            Backend::Openai => args.base_url.clone(),
        },
        dataset: format!("{:?}", args.dataset).to_lowercase(),
        num_prompts: workload.num_requests(),
        seed: args.seed,
        runs: Vec::with_capacity(args.request_rate.len()),
    };
    for &rate in &args.request_rate {
        let before = scrape(&args.metrics_url).await?;
        let mut arrival_rng = StdRng::seed_from_u64(args.seed);
        let (records, duration_s) = match &workload {
            Workload::Prompts(prompts) => {
                let offsets = arrivals::arrival_offsets(
                    prompts.len(),
                    rate,
                    args.burstiness,
                    &mut arrival_rng,
                )?;
                eprintln!(
                    "request rate {rate}, burstiness {}, max concurrency {}: {} requests",
                    args.burstiness,
                    args.max_concurrency
                        .map_or("none".to_string(), |c| c.to_string()),
                    prompts.len()
                );
                let plan = runner::RunPlan {
                    prompts,
                    offsets: &offsets,
                    max_concurrency: args.max_concurrency,
                    timeout: Duration::from_secs_f64(args.timeout_s),
                    model: &args.model,
                    progress: !args.no_progress,
                };
                runner::run(&target, &plan).await
            }
            Workload::Conversations(conversations) => {
                let offsets = arrivals::arrival_offsets(
                    conversations.sessions.len(),
                    rate,
                    args.burstiness,
                    &mut arrival_rng,
                )?;
                eprintln!(
                    "session rate {rate}, burstiness {}, max concurrency {}: {} sessions x {} turns",
                    args.burstiness,
                    args.max_concurrency
                        .map_or("none".to_string(), |c| c.to_string()),
                    conversations.sessions.len(),
                    conversations.turns()
                );
                let plan = sessions::SessionPlan {
                    conversations,
                    offsets: &offsets,
                    think_time: Duration::from_millis(args.think_time_ms),
                    max_concurrency: args.max_concurrency,
                    timeout: Duration::from_secs_f64(args.timeout_s),
                    model: &args.model,
                    progress: !args.no_progress,
                };
                sessions::run(&target, &plan).await
            }
        };
        let node_work = match before {
            Some(before) => scrape(&args.metrics_url)
                .await?
                .map(|after| node_metrics::NodeWork::from(after.since(&before))),
            None => None,
        };
        let run = RunReport {
            node_work,
            request_rate: rate,
            burstiness: args.burstiness,
            max_concurrency: args.max_concurrency,
            metrics: metrics::summarize(&records, duration_s, args.slo.as_ref()),
            requests: records,
        };
        print!("{}", report::table(&run));
        report.runs.push(run);
    }
    if report.runs.len() > 1 {
        print!("{}", report::sweep_summary(&report.runs));
    }
    if let Some(path) = &args.result_file {
        report.write_json(path)?;
        eprintln!("results written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        plot::draw(&report.runs, path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_a_sweep_and_slo() {
        let a = BenchArgs::from_flags([
            "--request-rate",
            "1,2,inf",
            "--slo",
            "ttft=500ms,tpot=50ms",
            "--max-concurrency",
            "8",
        ])
        .unwrap();
        assert_eq!(
            a.request_rate,
            vec![
                RequestRate::PerSecond(1.0),
                RequestRate::PerSecond(2.0),
                RequestRate::Infinite
            ]
        );
        assert_eq!(a.slo.unwrap().tpot_s, Some(0.05));
        assert_eq!(a.max_concurrency, Some(8));
        assert!(BenchArgs::from_flags(["--request-rate", "0"]).is_err());
    }

    #[test]
    fn sharegpt_needs_a_path() {
        let a = BenchArgs::from_flags(["--dataset", "sharegpt"]).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        assert!(load_prompts(&a, &mut rng).is_err());
    }

    #[test]
    fn multi_turn_flags_make_conversations() {
        let a = BenchArgs::from_flags([
            "--dataset",
            "multi-turn",
            "--sessions",
            "3",
            "--turns",
            "2",
            "--system-prompt-len",
            "16",
            "--think-time-ms",
            "5",
        ])
        .unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let Workload::Conversations(c) = load_workload(&a, &mut rng).unwrap() else {
            panic!("conversations expected")
        };
        assert_eq!(c.num_requests(), 6);
        assert_eq!(c.system_prompt.len(), 16);
        let http =
            BenchArgs::from_flags(["--dataset", "multi-turn", "--backend", "openai"]).unwrap();
        assert!(load_workload(&http, &mut rng).is_err());
    }
}
