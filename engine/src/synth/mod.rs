//! `tandem model synth`: writes a small Llama-family model directory with
//! random weights: real safetensors, a real byte-level BPE `tokenizer.json`
//! trained on a built-in corpus, and a chat template.
//!
//! The output is deterministic for a seed, so test fixtures made from it can
//! be regenerated. Weights are scaled so that the logits are far from
//! uniform: greedy continuations then do not hinge on rounding-level ties,
//! which makes comparisons against other implementations meaningful.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};
use crate::llama::{self, Kind};

const EMBED_STD_TIED: f32 = 0.2;
const CORPUS: &str = include_str!("corpus.txt");
const BOS: &str = "<s>";
const EOS: &str = "</s>";
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Element type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDtype {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
}

/// Shape and options of a synthesized model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// `Llama` (GQA, Llama-3 rope scaling, tied embeddings) or `Qwen2` (q/k/v biases,
    /// separate LM head); `Mistral` is written like `Llama` with a sliding window.
    pub architecture: Architecture,
    /// Tokenizer vocabulary to train (at least 260).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Weight dtype on disk.
    pub dtype: SynthDtype,
    /// Number of safetensors shards (1: a single `model.safetensors`).
    pub shards: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for SynthSpec {
    /// The quick-start model: small enough to run fast on a laptop CPU.
    fn default() -> Self {
        SynthSpec {
            architecture: Architecture::Llama,
            vocab_size: 512,
            hidden_size: 256,
            intermediate_size: 704,
            num_layers: 4,
            num_heads: 8,
            num_kv_heads: 4,
            max_position_embeddings: 2048,
            dtype: SynthDtype::F32,
            shards: 1,
            seed: 0,
        }
    }
}

/// Trains the byte-level BPE tokenizer on the built-in corpus.
fn train_tokenizer(vocab_size: usize) -> Result<HfTokenizer> {
    let err = |e: tokenizers::Error| {
        EngineError::Tokenizer(format!("training the synthetic tokenizer: {e}"))
    };
    let specials: Vec<AddedToken> = [BOS, EOS, "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = HfTokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, CORPUS.lines()).map_err(err)?;
    let bos_id = tok
        .token_to_id(BOS)
        .ok_or_else(|| EngineError::Tokenizer("BOS missing after training".into()))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?
        .special_tokens(vec![(BOS, bos_id)])
        .build()
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    tok.with_post_processor(Some(post));
    Ok(tok)
}

/// A Gaussian sample (Box-Muller) of standard deviation `std` around `mean`;
/// it takes two `u32` words of the stream ([`WORDS_PER_SAMPLE`]).
fn normal_sample(rng: &mut ChaCha8Rng, mean: f32, std: f32) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// Stream words one [`normal_sample`] takes (a `f32` draw is one `u32` word).
const WORDS_PER_SAMPLE: u128 = 2;

/// Samples one generator's piece makes (one job of [`tensor_bytes`]).
const SAMPLES_PER_JOB: usize = 1 << 20;

/// One tensor's sampling: its element count, mean and standard deviation.
struct Draw {
    n: usize,
    mean: f32,
    std: f32,
}

/// The tensors' values as `dtype` bytes, exactly what one generator seeded
/// with `seed` gives drawing every tensor's samples in order: the stream is
/// cut into pieces that each seek to their place in it
/// (`ChaCha8Rng::set_word_pos`) and run on all cores, so an 8B-shaped model
/// takes seconds, not minutes, and the values do not depend on the core count.
fn tensor_bytes(seed: u64, draws: &[Draw], dtype: SynthDtype) -> Vec<Vec<u8>> {
    let width = match dtype {
        SynthDtype::F32 => 4,
        SynthDtype::Bf16 => 2,
    };
    let mut out: Vec<Vec<u8>> = draws.iter().map(|d| vec![0u8; d.n * width]).collect();
    let mut jobs = Vec::new();
    let mut first: u128 = 0;
    for (d, bytes) in draws.iter().zip(out.iter_mut()) {
        for (k, piece) in bytes.chunks_mut(SAMPLES_PER_JOB * width).enumerate() {
            let start = first + (k * SAMPLES_PER_JOB) as u128;
            jobs.push((piece, start * WORDS_PER_SAMPLE, d.mean, d.std));
        }
        first += d.n as u128;
    }
    let jobs = std::sync::Mutex::new(jobs.into_iter());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                loop {
                    let job = match jobs.lock() {
                        Ok(mut it) => it.next(),
                        Err(poisoned) => poisoned.into_inner().next(),
                    };
                    let Some((piece, word, mean, std)) = job else {
                        break;
                    };
                    rng.set_word_pos(word);
                    for v in piece.chunks_exact_mut(width) {
                        let x = normal_sample(&mut rng, mean, std);
                        match dtype {
                            SynthDtype::F32 => v.copy_from_slice(&x.to_le_bytes()),
                            SynthDtype::Bf16 => {
                                v.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes())
                            }
                        }
                    }
                }
            });
        }
    });
    out
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a model directory for `spec` into `dir` (created if missing).
pub fn write_model_dir(dir: &Path, spec: &SynthSpec) -> Result<()> {
    if !spec.num_heads.is_multiple_of(spec.num_kv_heads)
        || !spec.hidden_size.is_multiple_of(spec.num_heads)
    {
        return Err(EngineError::InvalidInput(
            "heads must divide hidden_size and kv heads must divide heads".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tokenizer = train_tokenizer(spec.vocab_size)?;
    let vocab = tokenizer.get_vocab_size(true);
    let id = |t: &str| tokenizer.token_to_id(t).unwrap_or(0);
    let tok_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| EngineError::Tokenizer(format!("writing {}: {e}", tok_path.display())))?;

    let arch = spec.architecture;
    let tied = arch != Architecture::Qwen2;
    let mut config = serde_json::json!({
        "architectures": [arch.hf_name()],
        "model_type": match arch { Architecture::Llama => "llama", Architecture::Mistral => "mistral", Architecture::Qwen2 => "qwen2" },
        "vocab_size": vocab,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": if arch == Architecture::Qwen2 { 1_000_000.0 } else { 10_000.0 },
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": id(BOS),
        "eos_token_id": id(EOS),
        "torch_dtype": match spec.dtype { SynthDtype::F32 => "float32", SynthDtype::Bf16 => "bfloat16" },
    });
    match arch {
        Architecture::Llama => {
            config["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": (spec.max_position_embeddings / 4).max(16),
            });
        }
        Architecture::Mistral => {
            config["sliding_window"] = serde_json::json!(spec.max_position_embeddings / 2)
        }
        Architecture::Qwen2 => config["use_sliding_window"] = serde_json::json!(false),
    }
    let cfg_path = dir.join("config.json");
    let config_text = serde_json::to_string_pretty(&config).unwrap_or_default();
    std::fs::write(&cfg_path, &config_text).map_err(io_err(&cfg_path))?;
    // The weights are the ones the engine will read for this config.
    let model_config = ModelConfig::from_json(&config_text)?;
    let tok_cfg = serde_json::json!({
        "bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE,
        "add_bos_token": true, "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let tc_path = dir.join("tokenizer_config.json");
    std::fs::write(
        &tc_path,
        serde_json::to_string_pretty(&tok_cfg).unwrap_or_default(),
    )
    .map_err(io_err(&tc_path))?;
    let gen_path = dir.join("generation_config.json");
    let gen_cfg = serde_json::json!({ "bos_token_id": id(BOS), "eos_token_id": id(EOS) });
    std::fs::write(&gen_path, gen_cfg.to_string()).map_err(io_err(&gen_path))?;

    // Weights, in the Llama definition's file order, so the stream of random
    // numbers is reproducible.
    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    let mut draws = Vec::new();
    for (name, shape, kind) in llama::tensors(&model_config) {
        let (mean, std) = match kind {
            // A small embedding keeps the residual stream from being dominated by the
            // current token, which with tied embeddings makes a random model repeat
            // its last token.
            Kind::Embedding if tied => (0.0, EMBED_STD_TIED),
            Kind::Embedding => (0.0, 1.0),
            Kind::Norm => (1.0, 0.1),
            Kind::Bias | Kind::LmHead => (0.0, 0.5),
            // `[out, in]`: unit-variance outputs for unit-variance inputs.
            Kind::Projection => (0.0, 1.0 / (shape[1] as f32).sqrt()),
        };
        draws.push(Draw {
            n: shape.iter().product(),
            mean,
            std,
        });
        tensors.push((name, shape));
    }
    let bytes = tensor_bytes(spec.seed, &draws, spec.dtype);
    write_safetensors(dir, &tensors, &bytes, spec)
}

fn write_safetensors(
    dir: &Path,
    tensors: &[(String, Vec<usize>)],
    bytes: &[Vec<u8>],
    spec: &SynthSpec,
) -> Result<()> {
    let st_dtype = match spec.dtype {
        SynthDtype::F32 => safetensors::Dtype::F32,
        SynthDtype::Bf16 => safetensors::Dtype::BF16,
    };
    let shards = spec.shards.clamp(1, tensors.len());
    let per_shard = tensors.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for s in 0..shards {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
        };
        let range = s * per_shard..((s + 1) * per_shard).min(tensors.len());
        let mut views = Vec::new();
        for i in range {
            let view =
                safetensors::tensor::TensorView::new(st_dtype, tensors[i].1.clone(), &bytes[i])
                    .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
            views.push((tensors[i].0.clone(), view));
            weight_map.insert(tensors[i].0.clone(), file.clone());
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, None, &path).map_err(|e| EngineError::Weights {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    if shards > 1 {
        let path = dir.join("model.safetensors.index.json");
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(&path, index.to_string()).map_err(io_err(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_drawn_in_parallel_are_the_sequential_stream() {
        // The middle tensor spans two jobs and starts off a job boundary.
        let draws = [
            Draw {
                n: 3,
                mean: 1.0,
                std: 0.1,
            },
            Draw {
                n: SAMPLES_PER_JOB + 5,
                mean: 0.0,
                std: 2.0,
            },
            Draw {
                n: 7,
                mean: 0.0,
                std: 0.5,
            },
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let want: Vec<Vec<f32>> = draws
            .iter()
            .map(|d| {
                (0..d.n)
                    .map(|_| normal_sample(&mut rng, d.mean, d.std))
                    .collect()
            })
            .collect();
        let got = tensor_bytes(11, &draws, SynthDtype::F32);
        for (w, g) in want.iter().zip(&got) {
            let g: Vec<f32> = g
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(&g, w);
        }
        let bf = tensor_bytes(11, &draws, SynthDtype::Bf16);
        let last = half::bf16::from_f32(want[2][6]).to_le_bytes();
        assert_eq!(&bf[2][12..14], &last);
    }
}
