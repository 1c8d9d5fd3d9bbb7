//! The crate's error type, and its one conversion to a gRPC status.
//!
//! Each variant maps to a code a caller can act on: `INVALID_ARGUMENT` for a
//! request that will never work, `RESOURCE_EXHAUSTED` for one that may work
//! later or elsewhere, `UNAVAILABLE` when the decode node could not be reached.

use std::net::SocketAddr;

use tandem_engine::EngineError;
use tandem_kv_transfer::TransferError;

/// Everything that can go wrong in a prefill node.
#[derive(Debug, thiserror::Error)]
pub enum PrefillError {
    /// The request is malformed or does not fit the model; the message names the problem.
    #[error("invalid prefill request: {0}")]
    InvalidRequest(String),
    /// The queue of waiting requests is full.
    #[error("prefill queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The prompt needs more KV blocks than this node's whole cache.
    #[error("prompt needs {needed} KV blocks but this node's cache has {total}")]
    PromptTooLarge {
        /// Blocks the prompt needs.
        needed: usize,
        /// Blocks in the cache.
        total: usize,
    },
    /// A request with this id is already queued or running here.
    #[error("request {0:?} is already being prefilled")]
    Duplicate(String),
    /// The KV target gives no certificate; trusting a cluster CA is not implemented yet.
    #[error("KV target {0} has no server certificate and no cluster CA is configured")]
    NoTrustAnchor(String),
    /// The KV transfer to the decode node failed.
    #[error("KV transfer to decode node {addr} failed: {source}")]
    Transfer {
        /// The decode node's QUIC address.
        addr: SocketAddr,
        /// Why.
        source: TransferError,
    },
    /// The decode node serves another model than this node (its
    /// `KvTarget.model_fingerprint` differs): its KV would be computed by one
    /// model and decoded by another. Not the client's fault, and no retry on
    /// this pair helps: the router must pair other nodes.
    #[error(
        "the decode node serves another model ({difference}): {theirs}, this prefill node {ours}"
    )]
    ModelMismatch {
        /// What differs, in words.
        difference: String,
        /// The decode node's fingerprint.
        theirs: String,
        /// This node's.
        ours: String,
    },
    /// The decode node's cache cannot take this node's KV dtype (an fp8
    /// prefill node and a wider decode cache: fp8 is never widened, since the
    /// decode node would hold less precision than it advertises). The router
    /// must pair other nodes.
    #[error(
        "KV dtype mismatch: this prefill node's cache holds {ours} but the decode node's cache holds {theirs}; {ours} KV cannot be imported into a {theirs} cache (pair it with an fp8_e4m3 decode node, or set this node's kv_dtype to the decode node's)"
    )]
    KvDtypeMismatch {
        /// This node's cache dtype.
        ours: &'static str,
        /// The decode node's (`KvTarget.dtype`).
        theirs: String,
    },
    /// The request was cancelled (by `Cancel` or by its caller going away).
    #[error("request cancelled")]
    Cancelled,
    /// The node is shutting down.
    #[error("prefill node is shutting down")]
    ShuttingDown,
    /// The engine failed while computing the prompt.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// A forward pass failed while this request was in it.
    #[error("prefill compute failed: {0}")]
    Compute(String),
    /// The node's configuration cannot work with this model.
    #[error("bad prefill config: {0}")]
    Config(String),
    /// Binding or serving the gRPC listener failed.
    #[error("gRPC server: {0}")]
    Server(String),
}

impl From<PrefillError> for tonic::Status {
    fn from(e: PrefillError) -> Self {
        use tonic::Code;
        let code = match &e {
            PrefillError::InvalidRequest(_) => Code::InvalidArgument,
            PrefillError::QueueFull(_) | PrefillError::PromptTooLarge { .. } => {
                Code::ResourceExhausted
            }
            PrefillError::Duplicate(_) => Code::AlreadyExists,
            PrefillError::NoTrustAnchor(_)
            | PrefillError::ModelMismatch { .. }
            | PrefillError::KvDtypeMismatch { .. } => Code::FailedPrecondition,
            PrefillError::Transfer { .. } | PrefillError::ShuttingDown => Code::Unavailable,
            PrefillError::Cancelled => Code::Cancelled,
            PrefillError::Engine(_)
            | PrefillError::Compute(_)
            | PrefillError::Config(_)
            | PrefillError::Server(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
