//! The router's errors, and the one place they become gRPC statuses.
//!
//! Every failure a client can see is a [`RouterError`]; its conversion into
//! a [`tonic::Status`] (below, the only one) picks the code a client can act on: fix the request
//! (`INVALID_ARGUMENT`, `NOT_FOUND`), retry later (`RESOURCE_EXHAUSTED`,
//! `UNAVAILABLE`) or give up (`DEADLINE_EXCEEDED`).

use crate::node_addr::NodeAddr;
use std::net::SocketAddr;

use tonic::{Code, Status};

/// Why the router could not serve a request, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The request is malformed; the message names the bad field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The client gave no API key, or a wrong one.
    #[error("{0}")]
    Unauthenticated(String),
    /// The client's API key is past one of its rate limits.
    #[error("{message}; retry in {retry_after_s:.1} s")]
    RateLimited {
        /// Which limit.
        message: String,
        /// Seconds until the request would fit.
        retry_after_s: f64,
    },
    /// The request names a model this cluster does not serve.
    #[error("model {requested:?} is not served here (this cluster serves {served:?})")]
    ModelNotFound {
        /// What the client asked for.
        requested: String,
        /// What the cluster serves.
        served: String,
    },
    /// The admission queue is full.
    #[error("the router's queue is full ({max_queue} requests waiting); retry later")]
    QueueFull {
        /// The configured queue bound.
        max_queue: usize,
    },
    /// A node refused the request for lack of room (KV blocks, queue).
    #[error("node {node} is out of capacity: {message}; retry later")]
    NodeExhausted {
        /// The node's gRPC address.
        node: NodeAddr,
        /// The node's message.
        message: String,
    },
    /// A node failed, could not be reached, or ended a stream early.
    #[error("node {node} failed: {message}")]
    NodeUnavailable {
        /// The node's gRPC address.
        node: NodeAddr,
        /// What went wrong.
        message: String,
    },
    /// A node broke the protocol (e.g. a stream not starting with `Admitted`).
    #[error("node {node} broke the protocol: {message}")]
    Protocol {
        /// The node's gRPC address.
        node: NodeAddr,
        /// What it did.
        message: String,
    },
    /// A node already holds this attempt of the request (ALREADY_EXISTS).
    #[error("node {node} already runs this request: {message}")]
    AttemptConflict {
        /// The node's gRPC address.
        node: NodeAddr,
        /// The node's message.
        message: String,
    },
    /// The membership holds no node of a role the request needs.
    #[error("no {0} node is available")]
    NoNode(&'static str),
    /// Every node of a role is failing: their circuit breakers are open.
    #[error("every {role} node is failing (circuit breakers open); retry in {retry_after_s} s")]
    NoUsableNode {
        /// `decode` (with no usable prefill node the decode node prefills).
        role: &'static str,
        /// Seconds until a breaker lets a trial request through.
        retry_after_s: u64,
    },
    /// A decode node gave up waiting for the request's KV (DEADLINE_EXCEEDED
    /// from the node): the prefill side was late, not the decode node's
    /// fault; the request is re-run.
    #[error("node {node} did not receive the KV in time: {message}")]
    KvTimeout {
        /// The decode node's gRPC address.
        node: NodeAddr,
        /// The node's message.
        message: String,
    },
    /// The prefill nodes' queue would take longer than the admission bound.
    #[error(
        "the prefill queue is full ({wait_s:.1} s of prompts queued, limit {limit_s} s); retry later"
    )]
    PrefillBacklog {
        /// Estimated seconds to prefill what is queued.
        wait_s: f64,
        /// `router.max_prefill_backlog_s`.
        limit_s: f64,
    },
    /// The request's deadline passed.
    #[error("the request did not finish within {timeout_s} s")]
    DeadlineExceeded {
        /// The configured deadline.
        timeout_s: f64,
    },
    /// The router is shutting down.
    /// The router has not read the cluster's membership yet (just started,
    /// etcd not answered yet): UNAVAILABLE with a retry-after, not "no node".
    #[error("the router has not read the cluster's membership yet; retry shortly")]
    NotReady,
    #[error("the router is shutting down")]
    ShuttingDown,
    /// The client went away; nothing to tell it.
    #[error("the client went away")]
    ClientGone,
    /// Tokenizing the prompt failed.
    #[error("cannot tokenize the prompt: {0}")]
    Tokenizer(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptors.
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    /// The `[tls]` files for dialing nodes could not be used.
    #[error("mutual TLS to the nodes: {0}")]
    Tls(#[from] tandem_cluster::GrpcTlsError),
    /// The router's model could not be fingerprinted (see `identity`).
    #[error("fingerprinting the model: {0}")]
    Fingerprint(String),
    /// The `[router.tls]` files for the client-facing listeners could not be used.
    #[error("TLS for clients: {0}")]
    ClientTls(String),
}

impl RouterError {
    /// Classifies a status returned by a node: a node's own refusal of the
    /// request is passed through, anything else is a node failure.
    pub fn from_node_status(node: &str, status: &Status) -> Self {
        let node = NodeAddr::from(node);
        let message = status.message().to_string();
        match status.code() {
            Code::ResourceExhausted => RouterError::NodeExhausted { node, message },
            Code::InvalidArgument | Code::OutOfRange => RouterError::InvalidArgument(message),
            // The node is healthy and refused this one request: it already
            // holds the same attempt. Attempts have distinct ids, so this is
            // not a retry meeting its earlier self; not a node failure either.
            Code::AlreadyExists => RouterError::AttemptConflict { node, message },
            Code::DeadlineExceeded => RouterError::KvTimeout { node, message },
            _ => RouterError::NodeUnavailable {
                node,
                message: format!("{}: {message}", status.code()),
            },
        }
    }
}

/// The metadata key carrying a retry hint in whole seconds on
/// `RESOURCE_EXHAUSTED` statuses (the HTTP API turns it into `Retry-After`).
pub const RETRY_AFTER: &str = "retry-after";

impl RouterError {
    /// The node to blame for this error, if it is a failure of the node
    /// (its breaker counts it). Refusals of the request, attempt conflicts
    /// and KV waits that expired under load are not.
    pub fn blames_node(&self) -> Option<&str> {
        match self {
            RouterError::NodeUnavailable { node, .. } | RouterError::Protocol { node, .. } => {
                Some(node)
            }
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, for refusals a retry can cure.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            RouterError::RateLimited { retry_after_s, .. } => {
                Some(retry_after_s.ceil().clamp(1.0, 86_400.0) as u64)
            }
            RouterError::NoUsableNode { retry_after_s, .. } => Some(*retry_after_s),
            RouterError::PrefillBacklog { wait_s, limit_s } => {
                Some((wait_s - limit_s).ceil().clamp(1.0, 60.0) as u64)
            }
            RouterError::QueueFull { .. }
            | RouterError::NodeExhausted { .. }
            | RouterError::NoNode(_)
            | RouterError::NotReady => Some(1),
            _ => None,
        }
    }
}

impl RouterError {
    /// The gRPC code a client sees for this error.
    pub fn code(&self) -> Code {
        match self {
            RouterError::InvalidArgument(_) => Code::InvalidArgument,
            RouterError::Unauthenticated(_) => Code::Unauthenticated,
            RouterError::RateLimited { .. } => Code::ResourceExhausted,
            RouterError::ModelNotFound { .. } => Code::NotFound,
            RouterError::QueueFull { .. }
            | RouterError::NodeExhausted { .. }
            | RouterError::PrefillBacklog { .. } => Code::ResourceExhausted,
            RouterError::NodeUnavailable { .. }
            | RouterError::KvTimeout { .. }
            | RouterError::NoUsableNode { .. }
            | RouterError::NoNode(_)
            | RouterError::NotReady
            | RouterError::ShuttingDown
            | RouterError::Protocol { .. } => Code::Unavailable,
            RouterError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            RouterError::AttemptConflict { .. } => Code::Aborted,
            RouterError::ClientGone => Code::Cancelled,
            RouterError::Tokenizer(_)
            | RouterError::Bind { .. }
            | RouterError::Serve(_)
            | RouterError::Reflection(_)
            | RouterError::Tls(_)
            | RouterError::Fingerprint(_)
            | RouterError::ClientTls(_) => Code::Internal,
        }
    }

    /// The `status` label of `tandem_requests_total` for a request that
    /// ended with this error: its gRPC code in snake case.
    pub fn status_label(&self) -> &'static str {
        code_label(self.code())
    }
}

/// A gRPC code in snake case (`RESOURCE_EXHAUSTED` → `resource_exhausted`).
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

impl From<RouterError> for Status {
    fn from(err: RouterError) -> Self {
        let code = err.code();
        let mut status = Status::new(code, err.to_string());
        if let Some(secs) = err.retry_after_s() {
            status
                .metadata_mut()
                .insert(RETRY_AFTER, tonic::metadata::MetadataValue::from(secs));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_statuses_are_classified() {
        let e = RouterError::from_node_status("n", &Status::resource_exhausted("no blocks"));
        assert_eq!(Status::from(e).code(), Code::ResourceExhausted);
        let e = RouterError::from_node_status("n", &Status::internal("boom"));
        assert_eq!(Status::from(e).code(), Code::Unavailable);
        let e = RouterError::from_node_status("n", &Status::invalid_argument("prompt too long"));
        let s = Status::from(e);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("prompt too long"));
    }

    #[test]
    fn status_labels_name_the_code() {
        assert_eq!(
            RouterError::QueueFull { max_queue: 1 }.status_label(),
            "resource_exhausted"
        );
        assert_eq!(RouterError::ClientGone.status_label(), "cancelled");
        assert_eq!(
            RouterError::DeadlineExceeded { timeout_s: 1.0 }.status_label(),
            "deadline_exceeded"
        );
    }

    #[test]
    fn queue_full_says_retry() {
        let s = Status::from(RouterError::QueueFull { max_queue: 3 });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("queue is full") && s.message().contains("retry"));
        assert_eq!(s.metadata().get(RETRY_AFTER).unwrap(), "1");
    }

    #[test]
    fn only_failures_of_the_node_blame_it() {
        for (status, blamed) in [
            (Status::internal("boom"), true),
            (Status::unavailable("down"), true),
            (Status::resource_exhausted("no blocks"), false),
            (Status::invalid_argument("bad"), false),
            (Status::already_exists("running"), false),
            (Status::deadline_exceeded("no KV in time"), false),
        ] {
            let e = RouterError::from_node_status("n", &status);
            assert_eq!(e.blames_node().is_some(), blamed, "{status:?} -> {e:?}");
        }
        let e = RouterError::from_node_status("n", &Status::deadline_exceeded("late"));
        assert_eq!(
            e.code(),
            Code::Unavailable,
            "retryable, not the client's deadline"
        );
    }

    #[test]
    fn no_usable_node_and_backlog_say_when_to_retry() {
        let s = Status::from(RouterError::NoUsableNode {
            role: "decode",
            retry_after_s: 5,
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(RETRY_AFTER).unwrap(), "5");
        let s = Status::from(RouterError::PrefillBacklog {
            wait_s: 12.5,
            limit_s: 10.0,
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.metadata().get(RETRY_AFTER).unwrap(), "3");
        assert!(s.message().contains("prefill queue"), "{s:?}");
    }

    #[test]
    fn already_exists_is_a_conflict_not_a_node_failure() {
        let e = RouterError::from_node_status("d0", &Status::already_exists("running"));
        assert!(matches!(e, RouterError::AttemptConflict { .. }), "{e:?}");
        assert_eq!(e.code(), Code::Aborted);
    }
}
