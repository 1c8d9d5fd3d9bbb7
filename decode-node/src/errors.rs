//! The decode node's domain errors: why a request was refused at admission
//! ([`Refusal`]) and why an admitted request failed ([`RequestError`]).
//!
//! The engine loop speaks only these; the gRPC service
//! ([`service`](crate::service)) turns them into `tonic::Status` codes in one
//! place, so a router can act on them (retry elsewhere, give up, back off).

/// Why the engine loop did not admit a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The same attempt of the request is already here.
    #[error("request {0} is already running here")]
    AlreadyRunning(String),
    /// The context fills the context this node serves (the model's, or its
    /// KV cache's size if smaller): nothing can be generated.
    #[error(
        "prompt of {context_len} tokens leaves no room in this node's context of {max_context} tokens (the model's context, or its KV cache if smaller)"
    )]
    ContextFull {
        /// Prompt plus tokens generated before.
        context_len: usize,
        /// The context this node serves.
        max_context: usize,
    },
    /// The request's tokens or parameters cannot start a generation.
    #[error("{0}")]
    InvalidRequest(String),
    /// Not enough free KV blocks now (the router tries another node or later).
    #[error("{0}")]
    OutOfBlocks(String),
    /// The reservation table refused the expectation (a bug, not the caller's).
    #[error("cannot reserve KV: {0}")]
    Reservation(#[from] tandem_kv_transfer::Refusal),
    /// The caller went away before the admission answer could be sent.
    #[error("the caller went away")]
    CallerGone,
    /// The node is shutting down.
    #[error("the decode node is shutting down")]
    ShuttingDown,
}

/// Why an admitted request ended without finishing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The KV did not arrive within the request's `kv_timeout_ms`.
    #[error("the request's KV cache did not arrive in time")]
    KvTimeout,
    /// The KV transfer failed (the prefill node aborted, a frame was refused,
    /// the connection broke).
    #[error("KV transfer failed: {0}")]
    KvTransfer(String),
    /// The KV came from a node serving another model (its fingerprint in the
    /// final frame differs from this node's): the pairing is wrong, not the node.
    #[error("{0}")]
    ModelMismatch(String),
    /// Writing received KV into the cache failed.
    #[error("importing KV failed: {0}")]
    KvImport(String),
    /// The forward pass failed.
    #[error("forward pass failed: {0}")]
    Forward(String),
    /// Sampling or detokenizing the next token failed.
    #[error("generation failed: {0}")]
    Generation(String),
    /// The node is shutting down.
    #[error("the decode node is shutting down")]
    ShuttingDown,
}
