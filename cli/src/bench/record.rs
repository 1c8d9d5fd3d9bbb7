//! What one benchmark request did: the record both transports (gRPC in
//! [`request`](super::request), HTTP in [`openai`](super::openai)) fill in,
//! and the report and metrics read. Its own module so that neither transport
//! imports the other.

use serde::Serialize;

use super::dataset::BenchPrompt;

/// What happened to one request. Times are seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestRecord {
    /// Position in the dataset (multi-turn: `session * turns + turn`).
    pub index: usize,
    /// Multi-turn only: the conversation this request belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<usize>,
    /// Multi-turn only: the turn within its conversation, from 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<usize>,
    pub success: bool,
    /// gRPC status code (`Ok` on success; `DeadlineExceeded` when the run's
    /// `--timeout-s` stopped it).
    pub status: String,
    /// Error text of a failure.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Send time from the start of the run.
    pub sent_at_s: f64,
    /// Prompt tokens: the server's count, else the dataset's.
    pub input_tokens: u64,
    /// Output tokens asked for (`max_tokens`).
    pub requested_output_tokens: u64,
    pub output_tokens: u64,
    /// Prompt tokens served from a prefix cache (the server's count; 0 when
    /// it reports none).
    pub cached_tokens: u64,
    pub ttft_s: f64,
    pub e2e_s: f64,
    /// Gaps between consecutive streamed chunks after the first.
    pub itl_s: Vec<f64>,
    /// The phases of its time to first token (`spans`), seconds; gRPC only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spans_s: Vec<(String, f64)>,
    /// The answer as streamed, kept so a multi-turn session can send it back
    /// as history: token ids (gRPC) and text (both APIs).
    #[serde(skip)]
    pub answer_ids: Vec<u32>,
    #[serde(skip)]
    pub answer_text: String,
}

impl RequestRecord {
    /// A request that never finished: not sent, or cut off by the run's deadline.
    pub fn unfinished(index: usize, prompt: &BenchPrompt) -> Self {
        RequestRecord {
            index,
            status: format!("{:?}", tonic::Code::DeadlineExceeded),
            error: "the run's --timeout-s passed before the request finished".into(),
            input_tokens: prompt.input_len as u64,
            requested_output_tokens: prompt.output_len as u64,
            ..Default::default()
        }
    }
}
