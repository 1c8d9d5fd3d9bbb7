//! The decode node's end: a QUIC endpoint that reads KV frames and hands
//! them to a [`KvSink`].
//!
//! One task accepts connections (at most `max_connections`, the rest are
//! refused); one task per connection accepts unidirectional streams (the peer
//! may hold at most `max_streams_per_connection` open, enforced by QUIC flow
//! control); one task per stream feeds a [`FrameDecoder`] and calls the sink.
//!
//! A request may be striped over several streams ("lanes", usually on
//! different connections). Its Final frame says how many Layer frames were
//! sent in all; the receiver holds the Final back until that many Layer
//! frames have been accepted by the sink, so `on_final` always comes after
//! every `on_layer` of the request. The first token the Final carries is
//! handed over with `on_first_token` as soon as the Final arrives, ahead of
//! Layer frames still to come (the sender sends it on a stream of its own)
//! or just before `on_final` when they are all in.
//!
//! # What the sink sees
//!
//! For every request named on some stream, the sink gets exactly one
//! *ending*: either a successful `on_final`, or one `on_abort` (sender's
//! Abort frame, a malformed frame, a sink refusal, a stream reset, a lost
//! connection, or no progress for `request_idle_timeout`). A refused
//! `on_final` is followed by `on_abort`. Frames of an ended request are
//! dropped and their streams stopped. `on_final` comes only after every
//! `on_layer` of the request returned `Ok`. Calls for one request may come
//! from several tasks (one per lane); an `on_layer` already under way on one
//! lane may overlap or follow an `on_abort` decided on another, so a sink
//! must refuse frames of a request it has released (a
//! [`Reservations`](crate::reservation::Reservations) table does).
//!
//! A broken stream is stopped with an application error code
//! ([`stop_code`]); other streams and connections carry on.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, Incoming, RecvStream, VarInt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::TransferError;
use crate::reservation::Refusal;
use crate::tls::TlsError;
use crate::tracker::{FinalAction, PendingFinal, Tracker};
use crate::transport::TransportTuning;
use crate::wire::{DEFAULT_MAX_PAYLOAD, FirstToken, Frame, FrameDecoder, LayerHeader, Payload};

/// Application error codes the receiver stops streams with.
pub mod stop_code {
    /// The sink refused a frame.
    pub const REFUSED: u32 = 1;
    /// A frame could not be decoded (bad header, checksum, truncation).
    pub const MALFORMED: u32 = 2;
    /// The request had already ended (completed or aborted).
    pub const ENDED: u32 = 3;
    /// The receiver is shutting down.
    pub const SHUTDOWN: u32 = 4;
}

/// Why a [`KvSink`] refused a frame or a transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The reservation table refused it (unknown transfer, bad shape,
    /// duplicate, incomplete at the Final frame, ...).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The KV could not be stored (e.g. the cache refused the bytes).
    #[error("storing KV failed: {0}")]
    Store(String),
    /// The receiving node is shutting down.
    #[error("the receiving node is shutting down")]
    ShuttingDown,
}

/// Where received KV goes: the decode node's cache and reservation table.
///
/// Calls are made from the receiver's tasks; keep them short (a copy into
/// the cache), or hand the payload to a worker.
pub trait KvSink: Send + Sync + 'static {
    /// Some blocks of one layer arrived, checksum (if any) verified; the
    /// payload is the received packets' bytes, not yet copied. `Err` refuses
    /// the frame: the stream is stopped and the request aborted.
    fn on_layer(&self, header: &LayerHeader, payload: Payload) -> Result<(), SinkError>;
    /// Every Layer frame of the request arrived and was accepted. `Err`
    /// refuses the request (e.g. incomplete): `on_abort` follows.
    fn on_final(&self, transfer_id: u64, layers_sent: u32) -> Result<(), SinkError>;
    /// The transfer of the request failed; release its reservation.
    fn on_abort(&self, transfer_id: u64, reason: &str);
    /// The request's Final frame arrived (from a sender whose model
    /// fingerprint matches this node's): the prefill is done and sampled
    /// `first`. Called once per transfer, before its `on_final`, possibly
    /// while Layer frames are still to come; `on_final` or `on_abort` follows.
    fn on_first_token(&self, transfer_id: u64, first: FirstToken);
    /// A Layer frame of `bytes` bytes (header included) of `transfer_id`
    /// was received from `started` (about when its first byte arrived) to
    /// now; called after `on_layer` accepted it. For measuring the link's
    /// rate (`rate`); the default ignores it.
    fn on_frame_received(&self, transfer_id: u64, bytes: u64, started: Instant) {
        let _ = (transfer_id, bytes, started);
    }
}

/// Receiver limits.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// Streams a peer may have open at once per connection.
    pub max_streams_per_connection: u32,
    /// Largest Layer payload accepted, bytes.
    pub max_frame_payload: u32,
    /// A request with no frame for this long is aborted.
    pub request_idle_timeout: Duration,
    /// Limit on the TLS handshake.
    pub handshake_timeout: Duration,
    /// QUIC endpoints (UDP sockets, each with its own driver task) to bind:
    /// the first on the configured address, the others on the same IP with
    /// port 0. One endpoint's driver runs on one core and caps the whole
    /// receiver; senders spread their connections over all of
    /// [`KvReceiver::local_addrs`]. 0 means one.
    pub endpoints: usize,
    /// Transport settings.
    pub transport: TransportTuning,
    /// The receiving node's model fingerprint digest: a transfer whose Final
    /// frame names another (non-zero) one is refused and aborted, since its
    /// KV was computed by another model. 0: not checked.
    pub model_fingerprint: u64,
}

/// The default endpoint count: one per core, at most 8.
pub fn default_endpoints() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            max_connections: 256,
            max_streams_per_connection: 64,
            max_frame_payload: DEFAULT_MAX_PAYLOAD,
            request_idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            endpoints: default_endpoints(),
            transport: TransportTuning::default(),
            model_fingerprint: 0,
        }
    }
}

/// How an abort for KV computed by another model begins (the decode node
/// tells the router FAILED_PRECONDITION for it, not a transfer failure).
pub const MODEL_MISMATCH: &str = "KV computed by another model";

/// A running receiver. Dropping it does not stop it; call
/// [`shutdown`](Self::shutdown) or cancel the token given to
/// [`bind_with`](Self::bind_with).
pub struct KvReceiver {
    endpoints: Vec<Endpoint>,
    shutdown: CancellationToken,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KvReceiver {
    /// Binds `addr` with default limits. Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        server_tls: Arc<rustls::ServerConfig>,
        sink: Arc<dyn KvSink>,
    ) -> Result<(KvReceiver, SocketAddr), TransferError> {
        Self::bind_with(
            addr,
            server_tls,
            sink,
            ReceiverConfig::default(),
            CancellationToken::new(),
        )
    }

    /// Binds `addr`; the receiver stops when `shutdown` is cancelled.
    pub fn bind_with(
        addr: SocketAddr,
        server_tls: Arc<rustls::ServerConfig>,
        sink: Arc<dyn KvSink>,
        config: ReceiverConfig,
        shutdown: CancellationToken,
    ) -> Result<(KvReceiver, SocketAddr), TransferError> {
        let crypto = QuicServerConfig::try_from(server_tls).map_err(|e| {
            TransferError::from(TlsError::Verifier(format!("not usable for QUIC: {e}")))
        })?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(
            config
                .transport
                .transport_config(config.max_streams_per_connection),
        );
        let n = config.endpoints.max(1);
        let mut endpoints = Vec::with_capacity(n);
        for i in 0..n {
            let bind = if i == 0 {
                addr
            } else {
                SocketAddr::new(addr.ip(), 0)
            };
            endpoints.push(config.transport.endpoint(bind, Some(server.clone()))?);
        }
        let local = endpoints[0].local_addr()?;
        let shared = Arc::new(Shared {
            sink,
            tracker: Mutex::new(Tracker::default()),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            config,
            shutdown: shutdown.clone(),
        });
        tokio::spawn(sweep(shared.clone()));
        let accept_tasks = endpoints
            .iter()
            .map(|e| tokio::spawn(accept_loop(e.clone(), shared.clone())))
            .collect();
        Ok((
            KvReceiver {
                endpoints,
                shutdown,
                accept_tasks,
            },
            local,
        ))
    }

    /// The first endpoint's address (the one `bind` returned).
    pub fn local_addr(&self) -> Result<SocketAddr, TransferError> {
        Ok(self.endpoints[0].local_addr()?)
    }

    /// Every endpoint's address, the first one first. Give them all to
    /// senders ([`KvSender::connect_many`](crate::sender::KvSender::connect_many))
    /// so their connections spread over the endpoints.
    pub fn local_addrs(&self) -> Result<Vec<SocketAddr>, TransferError> {
        self.endpoints.iter().map(|e| Ok(e.local_addr()?)).collect()
    }

    /// Stops accepting, closes every connection and waits for the accept
    /// loop to end (bounded).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for e in &self.endpoints {
            e.close(VarInt::from_u32(stop_code::SHUTDOWN), b"shutdown");
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            futures::future::join_all(self.accept_tasks),
        )
        .await;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            futures::future::join_all(self.endpoints.iter().map(|e| e.wait_idle())),
        )
        .await;
    }
}

struct Shared {
    sink: Arc<dyn KvSink>,
    /// Held for a few map operations, never across an await or a sink call.
    tracker: Mutex<Tracker>,
    /// Connections served at once, across all endpoints.
    limit: Arc<Semaphore>,
    config: ReceiverConfig,
    shutdown: CancellationToken,
}

impl Shared {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        // A panic elsewhere while holding the lock leaves counters that are
        // still consistent enough to keep serving.
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
            warn!(peer = %incoming.remote_address(), "kv receiver at its connection limit; refusing");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(incoming, shared).await;
            drop(permit);
        });
    }
    endpoint.close(VarInt::from_u32(stop_code::SHUTDOWN), b"shutdown");
}

async fn serve_connection(incoming: Incoming, shared: Arc<Shared>) {
    let peer = incoming.remote_address();
    let conn = match tokio::time::timeout(shared.config.handshake_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "kv handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "kv handshake timed out");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            s = conn.accept_uni() => s,
        };
        match stream {
            Ok(recv) => {
                tokio::spawn(serve_stream(recv, shared.clone()));
            }
            Err(e) => {
                debug!(%peer, error = %e, "kv connection ended");
                break;
            }
        }
    }
}

/// Why a stream stops early: the code to stop it with and what to tell the sink.
struct StreamFailure {
    code: u32,
    reason: String,
}

/// Most received chunks (packets' stream data) taken per read of a stream.
const READ_BATCH: usize = 32;

async fn serve_stream(mut recv: RecvStream, shared: Arc<Shared>) {
    let mut decoder = FrameDecoder::new(shared.config.max_frame_payload);
    let mut request: Option<u64> = None;
    // When the frame being decoded began to arrive.
    let mut frame_start: Option<Instant> = None;
    // Each received packet is one chunk (about 1.4 KiB on a 1500-byte MTU
    // path), and every read takes the connection's lock, which its driver
    // task needs for each incoming packet: take what has arrived in one
    // read, up to READ_BATCH chunks, rather than a lock per packet.
    let mut chunks: [Bytes; READ_BATCH] = Default::default();
    let failure = loop {
        let read = tokio::select! {
            _ = shared.shutdown.cancelled() => break Some(StreamFailure { code: stop_code::SHUTDOWN, reason: "receiver shutting down".into() }),
            c = recv.read_chunks(&mut chunks) => c,
        };
        match read {
            Ok(Some(n)) => {
                if decoder.buffered() == 0 {
                    frame_start = Some(Instant::now());
                }
                for chunk in &mut chunks[..n] {
                    decoder.push(std::mem::take(chunk));
                }
                match drain_frames(&mut decoder, &mut request, &shared, &mut frame_start) {
                    Flow::Continue => {}
                    Flow::Stop(f) => break f,
                }
                if decoder.buffered() > 0 && frame_start.is_none() {
                    // The next frame began in this chunk.
                    frame_start = Some(Instant::now());
                }
            }
            Ok(None) if decoder.is_idle() => break None,
            Ok(None) => {
                break Some(StreamFailure {
                    code: stop_code::MALFORMED,
                    reason: format!(
                        "stream ended inside a frame ({} bytes left over)",
                        decoder.buffered()
                    ),
                });
            }
            Err(e) => {
                break Some(StreamFailure {
                    code: stop_code::MALFORMED,
                    reason: format!("stream read failed: {e}"),
                });
            }
        }
    };
    let Some(failure) = failure else { return };
    let _ = recv.stop(VarInt::from_u32(failure.code));
    if failure.code == stop_code::ENDED {
        return;
    }
    let request = request.or(decoder.last_transfer_id());
    match request {
        Some(id) if shared.tracker().end(id) => {
            debug!(transfer_id = id, reason = %failure.reason, "kv transfer aborted");
            shared.sink.on_abort(id, &failure.reason);
        }
        Some(_) => {}
        None => debug!(reason = %failure.reason, "kv stream refused before naming a request"),
    }
}

enum Flow {
    Continue,
    Stop(Option<StreamFailure>),
}

fn drain_frames(
    decoder: &mut FrameDecoder,
    request: &mut Option<u64>,
    shared: &Shared,
    frame_start: &mut Option<Instant>,
) -> Flow {
    loop {
        let frame = match decoder.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return Flow::Continue,
            Err(e) => {
                return Flow::Stop(Some(StreamFailure {
                    code: stop_code::MALFORMED,
                    reason: e.to_string(),
                }));
            }
        };
        let id = frame.transfer_id();
        match *request {
            None => *request = Some(id),
            Some(r) if r != id => {
                return Flow::Stop(Some(StreamFailure {
                    code: stop_code::MALFORMED,
                    reason: format!("frame for transfer {id} on a stream of transfer {r}"),
                }));
            }
            Some(_) => {}
        }
        let ended = || {
            Flow::Stop(Some(StreamFailure {
                code: stop_code::ENDED,
                reason: String::new(),
            }))
        };
        let refused = |reason| {
            Flow::Stop(Some(StreamFailure {
                code: stop_code::REFUSED,
                reason,
            }))
        };
        match frame {
            Frame::Layer { header, payload } => {
                if !shared.tracker().begin_layer(id, Instant::now()) {
                    return ended();
                }
                let bytes = (crate::wire::LAYER_HEADER_LEN + payload.len()) as u64;
                if let Err(e) = shared.sink.on_layer(&header, payload) {
                    return refused(e.to_string());
                }
                if let Some(started) = frame_start.take() {
                    shared.sink.on_frame_received(id, bytes, started);
                }
                let due = shared.tracker().layer_done(id, Instant::now());
                if let Some(fin) = due {
                    deliver_final(shared, id, fin);
                }
            }
            Frame::Final {
                first,
                layers_sent,
                frames_sent,
                model_fingerprint,
                ..
            } => {
                let ours = shared.config.model_fingerprint;
                if ours != 0 && model_fingerprint != 0 && model_fingerprint != ours {
                    let reason = format!(
                        "{MODEL_MISMATCH}: the sender's is {model_fingerprint:016x}, this node's {ours:016x}"
                    );
                    if shared.tracker().end(id) {
                        shared.sink.on_abort(id, &reason);
                    }
                    return refused(reason);
                }
                let action = shared.tracker().final_arrived(
                    id,
                    PendingFinal {
                        layers_sent,
                        frames_sent,
                    },
                    Instant::now(),
                );
                match action {
                    FinalAction::Deliver(fin) => {
                        shared.sink.on_first_token(id, first);
                        deliver_final(shared, id, fin);
                    }
                    FinalAction::Wait => {
                        shared.sink.on_first_token(id, first);
                        let due = shared.tracker().first_token_announced(id);
                        if let Some(fin) = due {
                            deliver_final(shared, id, fin);
                        }
                    }
                    FinalAction::Ended => return ended(),
                    FinalAction::TooManyFrames(done) => {
                        return Flow::Stop(Some(StreamFailure {
                            code: stop_code::MALFORMED,
                            reason: format!(
                                "final says {frames_sent} layer frames but {done} arrived"
                            ),
                        }));
                    }
                }
            }
            Frame::Abort { reason, .. } => {
                let first_ending = shared.tracker().end(id);
                if first_ending {
                    shared
                        .sink
                        .on_abort(id, &format!("sender aborted: {reason}"));
                }
                // Nothing may follow an Abort on this stream.
                return Flow::Stop(Some(StreamFailure {
                    code: stop_code::ENDED,
                    reason: String::new(),
                }));
            }
        }
    }
}

fn deliver_final(shared: &Shared, id: u64, fin: PendingFinal) {
    if let Err(e) = shared.sink.on_final(id, fin.layers_sent) {
        shared.sink.on_abort(id, &format!("final refused: {e}"));
    }
}

async fn sweep(shared: Arc<Shared>) {
    let period = (shared.config.request_idle_timeout / 4).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stale = shared
            .tracker()
            .sweep(Instant::now(), shared.config.request_idle_timeout);
        for id in stale {
            shared
                .sink
                .on_abort(id, "no progress within the idle timeout");
        }
    }
}
