//! The crate's transport error type.

use std::sync::Arc;

use crate::tls::TlsError;
use crate::wire::WireError;

/// Why a transfer, or setting one up, failed. Cheap to clone, so a failure
/// seen by one lane of a request can be reported to every caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError {
    /// A socket could not be created or bound.
    #[error("socket: {0}")]
    Io(Arc<std::io::Error>),
    /// TLS material was refused.
    #[error(transparent)]
    Tls(Arc<TlsError>),
    /// A QUIC connection could not be opened, or was lost.
    #[error("connection: {0}")]
    Connection(String),
    /// Writing to a stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// The receiver stopped the stream: it refused a frame (see
    /// [`receiver::stop_code`](crate::receiver::stop_code)).
    #[error("receiver stopped the stream with code {code}")]
    Refused {
        /// The receiver's application error code.
        code: u64,
    },
    /// A frame could not be built.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The caller's arguments contradict each other.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A wait exceeded its limit.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The request was aborted locally.
    #[error("request aborted")]
    Aborted,
}

impl From<std::io::Error> for TransferError {
    fn from(e: std::io::Error) -> Self {
        TransferError::Io(Arc::new(e))
    }
}

impl From<TlsError> for TransferError {
    fn from(e: TlsError) -> Self {
        TransferError::Tls(Arc::new(e))
    }
}
