//! A prefill job as the worker sees it, and what the worker tells the job's
//! sending task.

use std::time::Instant;

use tandem_engine::SamplingParams;
use tandem_engine::backend::KvBytes;
use tandem_kv_transfer::LayerShape;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::PrefillError;

/// Events of one job, from the worker thread to the job's sending task.
#[derive(Debug)]
pub(crate) enum JobEvent {
    /// Blocks of one layer are final: ship them (once a device copy is done).
    Layer(LayerShape, KvBytes),
    /// The prompt is computed and the first token sampled.
    Done {
        first_token: u32,
        /// Its log probabilities, when the job asked for them.
        logprobs: Option<tandem_engine::TokenLogprobs>,
        /// Prompt tokens whose KV came from the prefix cache.
        cached_tokens: usize,
        queue_seconds: f64,
        compute_seconds: f64,
    },
    /// The job failed in the worker.
    Failed(PrefillError),
}

/// A request queued for prefill.
pub(crate) struct Job {
    pub request_id: String,
    /// The tokens to prefill: the prompt, then any generated before a resume.
    pub prompt: Vec<u32>,
    /// How many of `prompt`'s last tokens were generated (see `PrefillRequest.generated`).
    pub generated: usize,
    pub sampling: SamplingParams,
    /// Top log probabilities to report with the first token; `None`: none.
    pub logprobs: Option<usize>,
    /// Ids the first token may not be (the request's `min_tokens` not reached).
    pub banned: Vec<u32>,
    /// Leading blocks the decode node holds already (`KvTarget.cached_blocks`):
    /// computed (or taken from this node's cache) but not shipped.
    pub held_blocks: usize,
    /// vLLM's `cache_salt` (empty: none): the prompt's blocks are looked up and
    /// named in the prefix cache from it.
    pub cache_salt: String,
    /// Structured output: the grammar's parser, the generated tokens already
    /// replayed through it; the first token obeys it.
    pub grammar: Option<tandem_engine::ConstraintState>,
    /// The model's EOS ids, which end the output where the grammar accepts it.
    pub eos: Vec<u32>,
    /// To the sending task; bounded, so a slow transfer holds the worker back.
    pub events: mpsc::Sender<JobEvent>,
    /// Fired by `Cancel` or when the caller goes away.
    pub cancel: CancellationToken,
    pub submitted: Instant,
}
