//! tandem-kv-transfer: moving a request's KV cache from a prefill node to a
//! decode node over QUIC, layer by layer, while prefill is still computing.
//!
//! - [`wire`]: the frame format and a sans-I/O decoder.
//! - [`reservation`]: the decode node's sans-I/O table of expected transfers,
//!   which decides whether each arriving frame is acceptable.
//! - [`tls`]: rustls configurations for both ends (self-signed for a local
//!   cluster, or from PEM files).
//! - [`receiver`]: the decode side's QUIC endpoint, handing frames to a [`receiver::KvSink`].
//! - [`sender`]: the prefill side's QUIC connections, with back-pressure.

pub mod wire;
pub mod reservation;
pub mod tls;
