//! `tandem`: the one binary a user installs.

mod model_cmd;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Model tools: synthesize a small random model, measure engine speed.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt text.
    prompt: String,
    /// Model directory (Hugging Face layout). Default: a synthesized model in ./models/tandem-synth.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
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
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::Model(cmd) => model_cmd::run(cmd),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let path = match args.model {
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
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            ..Default::default()
        },
        max_tokens: args.max_tokens,
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
