//! tandem-kv-transfer: moving a request's KV cache from a prefill node to a
//! decode node over QUIC, layer by layer, while prefill is still computing.
//!
//! - [`wire`]: the frame format and a sans-I/O decoder.
//! - [`reservation`]: the decode node's sans-I/O table of expected transfers,
//!   which decides whether each arriving frame is acceptable.
//! - [`tls`]: rustls configurations for both ends (self-signed for a local
//!   cluster, or from PEM files).
//! - [`transport`]: quinn settings for bulk transfer.
//! - [`tracker`]: the receiver's sans-I/O bookkeeping of each transfer's
//!   frames across lanes (when a Final is due, exactly one ending each).
//! - [`receiver`]: the decode side's QUIC endpoint, handing frames to a [`KvSink`].
//! - [`sender`]: the prefill side's QUIC connections, with back-pressure.
//! - [`rate`]: measured link rates per peer, and the send-rate cap.
//!
//! The decode node owns a [`KvReceiver`] and implements [`KvSink`] over its
//! [`Reservations`] and cache; the prefill node owns a [`KvSender`] per
//! decode node and opens a [`RequestStream`] per request.

pub mod error;
pub mod memory;
pub mod rate;
pub mod receiver;
pub mod reservation;
pub mod sender;
pub mod tls;
pub mod tracker;
pub mod transport;
pub mod wire;

pub use error::TransferError;
pub use rate::{LinkRates, SendRateLimit};
pub use receiver::{KvReceiver, KvSink, ReceiverConfig, SinkError};
pub use reservation::{Accepted, Expectation, Refusal, Reservations};
pub use sender::{FinalAhead, KvSender, RequestStream, SenderConfig, SentFinal};
pub use tls::{ClusterCa, NodeCert, SelfSigned, TlsError};
pub use transport::TransportTuning;
pub use wire::{
    FirstLogprobs, FirstToken, Frame, FrameDecoder, LayerHeader, LayerShape, Payload, WireDtype,
    WireError,
};
