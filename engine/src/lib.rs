//! Tandem's inference engine.
//!
//! - [`model_dir`]: opening a model: a Hugging Face directory ([`config`],
//!   [`tokenizer`], [`weights`]) or a GGUF file ([`gguf`]).
//! - [`block_manager`] and [`kv_cache`]: the paged KV cache, its allocation and its
//!   layout (shared by every backend and by the KV wire format).
//! - [`llama`]: the Llama family written once: every weight's name, shape,
//!   tensor-parallel split and GGUF name, a scoped loader, and the forward
//!   pass of one rank.
//! - [`backend`]: the forward-pass interface built for disaggregation
//!   ([`Backend`], [`KvIo`], [`BackendExt`]); [`cpu`], its CPU implementation
//!   (one rank, or sharded over tensor-parallel ranks with [`tp`]); `cuda`
//!   (feature `cuda`), the GPU one.
//! - [`sampling`], [`stop`], [`generation`]: a request's token-by-token state;
//!   [`row_sampling`]: what a step returns per row (token, logprobs, logits).
//! - [`local`]: whole-request generation in one process.
//! - [`synth`]: small random-weight models for tests and the quick start.

pub mod backend;
pub mod block_manager;
pub mod config;
pub mod constraint;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
mod fp8_cache;
pub mod generation;
pub mod gguf;
pub mod kv_cache;
pub mod kv_events;
pub mod kv_quant;
pub mod llama;
pub mod local;
pub mod mask_overlap;
pub mod model_dir;
mod plain_cache;
pub mod prefix_hash;
pub mod rope;
pub mod row_sampling;
pub mod sampling;
pub mod stop;
pub mod synth;
pub mod tokenizer;
pub mod tp;
pub mod weights;

pub use backend::{Backend, BackendExt, KvIo, SeqChunk};
pub use block_manager::{BlockError, BlockHash, BlockId, BlockManager, SequenceBlocks};
pub use config::{Architecture, ModelConfig};
pub use constraint::{Constraint, ConstraintCompiler, ConstraintState};
pub use error::{EngineError, Result};
pub use generation::{
    FinishReason, Generation, GenerationParams, StopReason, TokenEvent, banned_before_min_tokens,
};
pub use kv_cache::{KvDtype, KvLayout};
pub use kv_events::{CacheChanges, KvCursor, KvDelta, KvEvent, KvEventLog};
pub use model_dir::{BatchLimits, Device, GpuPriority, ModelDir};
pub use prefix_hash::PrefixHasher;
pub use row_sampling::{RowAsk, RowOut};
pub use sampling::{
    MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, PromptLogprob, SamplingError, SamplingParams, TokenDraw,
    TokenLogprobs, prompt_logprobs,
};
pub use tokenizer::{ChatMessage, ChatOptions, Tokenizer};
