//! `tandem`: the one binary a user installs.

mod bench;
mod certs;
mod client;
mod fetch;
mod model_cmd;
mod roles;
mod status;
mod status_breakers;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tandem_engine::{GenerationParams, ModelDir, SamplingParams};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem: a disaggregated prefill/decode LLM inference cluster"
)]
struct Cli {
    /// Log lines as `text` or `json` (one object per line, with the request's
    /// span fields); the level comes from RUST_LOG (default info).
    #[arg(long, global = true, env = "TANDEM_LOG_FORMAT", default_value = "text")]
    log_format: tandem_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant (the bench's
// flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Start the whole cluster (router, prefill node, decode node) in this process.
    Up {
        /// Config file; default: the embedded cluster-configs/local.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        metrics: roles::MetricsFlags,
    },
    /// Run the router from a config file.
    Router {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        metrics: roles::MetricsFlags,
    },
    /// Run a prefill node from a config file.
    Prefill {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        node: roles::NodeFlags,
        #[command(flatten)]
        metrics: roles::MetricsFlags,
    },
    /// Run a decode node from a config file.
    Decode {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        node: roles::NodeFlags,
        #[command(flatten)]
        metrics: roles::MetricsFlags,
    },
    /// Show the cluster's members (from etcd or the config's node lists) and their load.
    Status(status::StatusArgs),
    /// Generate a continuation of a prompt through the router, streaming it to stdout.
    Generate(GenerateArgs),
    /// Model tools: synthesize a small random model, measure engine speed.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Make a cluster CA and one certificate per node for mutual TLS between nodes.
    Certs(certs::CertsArgs),
    /// Load-test the router and report throughput and latency as `vllm bench serve` does.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt text.
    prompt: String,
    /// The router's address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    router: String,
    /// Run the engine in this process instead of asking a cluster.
    #[arg(long)]
    local: bool,
    /// Model directory or GGUF file for --local. Default: SmolLM2-135M-Instruct, fetched on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Most tokens to generate (at least 1).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k cut (0 = none).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (nucleus) cut.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Render the prompt as a user message with the model's chat template (with --local).
    #[arg(long)]
    chat: bool,
    /// The request's id, in the router's and the nodes' logs (default: one the router makes).
    #[arg(long)]
    request_id: Option<String>,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, each cause once: most of the project's errors carry their
            // cause in their own message, which anyhow's report would repeat.
            eprintln!("error: {}", tandem_cluster::grpc_tls::error_chain(&*e));
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                eprintln!("{}", e.backtrace());
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // SAFETY: the first thing the process does; no other thread runs yet.
    unsafe { tandem_engine::cpu::fix_cpu_thread_count() };
    tandem_kv_transfer::memory::keep_freed_memory();
    let cli = Cli::parse();
    tandem_telemetry::init_logs(cli.log_format)?;
    let runtime = || tokio::runtime::Runtime::new().context("starting the async runtime");
    match cli.command {
        Command::Up { config, metrics } => runtime()?.block_on(roles::up(config, metrics)),
        Command::Router { config, metrics } => runtime()?.block_on(roles::run_role(
            roles::Role::Router,
            config,
            roles::NodeFlags::default(),
            metrics,
        )),
        Command::Prefill {
            config,
            node,
            metrics,
        } => runtime()?.block_on(roles::run_role(roles::Role::Prefill, config, node, metrics)),
        Command::Decode {
            config,
            node,
            metrics,
        } => runtime()?.block_on(roles::run_role(roles::Role::Decode, config, node, metrics)),
        Command::Status(args) => runtime()?.block_on(status::run(args)),
        Command::Generate(args) if args.local => generate_local(args),
        Command::Generate(args) if args.chat => anyhow::bail!(
            "--chat needs --local (the chat template is applied in this process); against a running cluster, send chats to the OpenAI API's /v1/chat/completions (router.http_listen, 127.0.0.1:8000 with `tandem up`)"
        ),
        Command::Generate(args) => {
            let request = tandem_proto::v1::GenerateRequest {
                request_id: args.request_id.clone().unwrap_or_default(),
                prompt: Some(tandem_proto::v1::generate_request::Prompt::Text(
                    args.prompt.clone(),
                )),
                sampling: Some(tandem_cluster::convert::sampling_to_pb(&sampling(&args))),
                max_tokens: args.max_tokens,
                stop: args.stop.clone(),
                ..Default::default()
            };
            runtime()?.block_on(client::generate(&args.router, request, Some(&args.prompt)))
        }
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Certs(args) => certs::run(&args),
        Command::Bench(args) => runtime()?.block_on(bench::run_bench(&args)).map(|_| ()),
    }
}

fn sampling(args: &GenerateArgs) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        ..Default::default()
    }
}

fn generate_local(args: GenerateArgs) -> anyhow::Result<()> {
    let path = match args.model.clone() {
        Some(p) => p,
        None => model_cmd::default_model()?,
    };
    let model =
        ModelDir::open(&path).with_context(|| format!("opening model {}", path.display()))?;
    let backend = model.load_cpu(1024, 16)?;
    let mut generator = tandem_engine::local::LocalGenerator::new(backend);
    let text = if args.chat {
        model.tokenizer.apply_chat_template(
            &[tandem_engine::ChatMessage {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            true,
        )?
    } else {
        args.prompt.clone()
    };
    let prompt = model.tokenizer.encode(&text, true)?;
    let params = GenerationParams {
        sampling: sampling(&args),
        max_tokens: args.max_tokens as usize,
        stop: args.stop,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let mut stdout = std::io::stdout();
    print!("{}", args.prompt);
    let out = generator.generate(&prompt, &params, &model.tokenizer, |ev| {
        print!("{}", ev.text);
        let _ = stdout.flush();
    })?;
    println!();
    eprintln!(
        "[{} prompt tokens, {} generated, finish: {:?}, {:.2}s]",
        out.prompt_tokens,
        out.tokens.len(),
        out.finish_reason,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
