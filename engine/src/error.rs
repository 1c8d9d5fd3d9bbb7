//! The engine's error type: one enum, each variant naming what went wrong and where.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is malformed, lacks a field, or has an unusable value.
    #[error("bad model config {path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The config names an architecture the engine does not implement.
    #[error(
        "unsupported architecture {0:?}: Tandem runs LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM"
    )]
    UnsupportedArchitecture(String),
    /// A safetensors file is corrupt, truncated, or does not hold what the config says.
    #[error("bad weights in {path}: {message}")]
    Weights {
        /// The safetensors file (or index).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file is truncated, malformed, or holds something the engine cannot run.
    #[error("bad GGUF file {path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the architecture needs is in none of the weight files.
    #[error("tensor {name:?} is missing from the model's weights")]
    MissingTensor {
        /// The tensor's name.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// Its shape in the file.
        actual: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// `tokenizer.json` is malformed or does not fit the model.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A prompt or token sequence the model cannot take.
    #[error("{0}")]
    InvalidInput(String),
    /// Sampling parameters out of range.
    #[error("invalid sampling parameters: {0}")]
    Sampling(#[from] crate::sampling::SamplingError),
    /// The KV cache has too few free blocks.
    #[error(transparent)]
    Blocks(#[from] crate::block_manager::BlockError),
    /// A KV layer import or export did not fit the cache.
    #[error("kv cache: {0}")]
    KvCache(String),
    /// The model cannot be split over the requested tensor-parallel ranks, or a rank failed.
    #[error("tensor parallelism: {0}")]
    TensorParallel(String),
    /// What a tensor-parallel rank reports when another rank of the same pass
    /// failed first (that rank's own error is the one a pass returns).
    #[error("tensor parallelism: another rank failed")]
    PeerRankFailed,
    /// A tensor operation failed (a bug or an exhausted allocator).
    #[error("tensor computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    /// A device backend failed (for CUDA: driver, compiler, cuBLAS, or an
    /// unsupported shape). It holds the backend's own error type, boxed so this
    /// module depends on no backend, and says it in its message (not also as
    /// its source, or a report of the chain would say it twice).
    #[error("cuda: {0}")]
    Device(Box<dyn std::error::Error + Send + Sync>),
}

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
