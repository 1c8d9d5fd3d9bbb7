//! The prefill node's end: QUIC connections to one decode node, and a
//! [`RequestStream`] per request that ships its KV layer by layer.
//!
//! # Throughput
//!
//! A quinn endpoint is driven by one task, and a connection's packets are
//! encrypted and acknowledged on one core, so one connection tops out far
//! below what a GPU produces. A [`KvSender`] therefore holds `connections`
//! connections spread over `endpoints` UDP sockets, and each request stripes
//! its frames round-robin over `lanes_per_request` streams on different
//! connections. Layers are cut into frames of at most `max_frame_payload`
//! bytes (whole blocks) so even one layer spreads over the lanes. The Final
//! frame carries the total frame count so the receiver can tell when the
//! stripes have all landed.
//!
//! # Back-pressure
//!
//! [`RequestStream::send_layer`] queues the frames and returns: the caller
//! can compute the next layer while this one is on the wire. Queued bytes
//! count against a per-sender budget (`max_in_flight_bytes`, a semaphore);
//! when it is spent, `send_layer` waits. Memory held is thus at most the
//! budget plus quinn's per-connection send window.
//!
//! # Ending a request
//!
//! [`RequestStream::finish`] sends the Final frame ahead of the Layer frames
//! still queued (on a stream of its own), finishes every lane and waits until
//! the receiver has acknowledged all data (or refused it). A caller that
//! knows the first token before it has queued every layer sends the Final
//! with [`FinalAhead`] (announcing the frames still to come) and ends with
//! [`RequestStream::finish_after`].
//! [`RequestStream::abort`] sends an Abort frame. Dropping a `RequestStream`
//! without either resets its streams, which the receiver reports as an abort.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, SendStream, VarInt, WriteError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::TransferError;
use crate::rate::SendRateLimit;
use crate::tls::TlsError;
use crate::transport::TransportTuning;
use crate::wire::{
    FirstToken, LAYER_HEADER_LEN, LayerHeader, LayerShape, encode_abort, encode_final,
};

/// Application error code a sender resets abandoned streams with.
pub const RESET_ABANDONED: u32 = 16;

/// Sender settings.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// QUIC connections to open.
    pub connections: usize,
    /// UDP sockets (quinn endpoints) the connections are spread over; 0
    /// means one per connection.
    pub endpoints: usize,
    /// Streams (on distinct connections) each request is striped over; 0
    /// means one per connection.
    pub lanes_per_request: usize,
    /// Bytes queued but not yet written, across all requests of this sender.
    pub max_in_flight_bytes: usize,
    /// Largest Layer frame payload; a layer is cut at block boundaries.
    pub max_frame_payload: u32,
    /// Name the receiver's certificate must carry.
    pub server_name: String,
    /// Limit on connecting, opening a stream, and the end of [`RequestStream::finish`].
    pub timeout: Duration,
    /// Transport settings.
    pub transport: TransportTuning,
    /// The sending node's model fingerprint digest, carried in every Final
    /// frame (`wire`); 0: unknown (the receiver then cannot check it).
    pub model_fingerprint: u64,
    /// Whether Layer frames carry an xxh3 checksum of their payload. QUIC
    /// already authenticates every packet, so the checksum only catches a
    /// framing bug of ours, at the cost of a pass over every byte on each
    /// side (about a quarter of a transfer's CPU): off by default.
    pub checksum_payloads: bool,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            connections: 1,
            endpoints: 0,
            lanes_per_request: 0,
            max_in_flight_bytes: 64 << 20,
            max_frame_payload: 4 << 20,
            server_name: "localhost".into(),
            timeout: Duration::from_secs(30),
            transport: TransportTuning::default(),
            model_fingerprint: 0,
            checksum_payloads: false,
        }
    }
}

/// A quinn client config from a rustls one, with the bulk transport settings.
pub fn quinn_client_config(
    client_tls: Arc<rustls::ClientConfig>,
    transport: &TransportTuning,
) -> Result<quinn::ClientConfig, TransferError> {
    let crypto = QuicClientConfig::try_from(client_tls).map_err(|e| {
        TransferError::from(TlsError::Verifier(format!("not usable for QUIC: {e}")))
    })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport.transport_config(0));
    Ok(cfg)
}

/// Connections from a prefill node to one decode node's [`KvReceiver`](crate::receiver::KvReceiver).
pub struct KvSender {
    endpoints: Vec<Endpoint>,
    connections: Vec<Connection>,
    next: AtomicUsize,
    budget: Arc<Semaphore>,
    config: SenderConfig,
    /// A cap on the bytes/s all this sender's streams write together.
    send_limit: Option<Arc<SendRateLimit>>,
}

impl KvSender {
    /// Opens `connections` connections to `addr` with default settings.
    pub async fn connect(
        addr: SocketAddr,
        client_tls: Arc<rustls::ClientConfig>,
        connections: usize,
    ) -> Result<KvSender, TransferError> {
        Self::connect_with(
            addr,
            client_tls,
            SenderConfig {
                connections,
                ..SenderConfig::default()
            },
        )
        .await
    }

    /// Opens the connections `config` describes, all to `addr`.
    pub async fn connect_with(
        addr: SocketAddr,
        client_tls: Arc<rustls::ClientConfig>,
        config: SenderConfig,
    ) -> Result<KvSender, TransferError> {
        Self::connect_many_with(&[addr], client_tls, config).await
    }

    /// Opens `connections` connections (in all) with default settings,
    /// spread round-robin over the receiver's endpoints `addrs` (its
    /// [`local_addrs`](crate::receiver::KvReceiver::local_addrs)).
    pub async fn connect_many(
        addrs: &[SocketAddr],
        client_tls: Arc<rustls::ClientConfig>,
        connections: usize,
    ) -> Result<KvSender, TransferError> {
        Self::connect_many_with(
            addrs,
            client_tls,
            SenderConfig {
                connections,
                ..SenderConfig::default()
            },
        )
        .await
    }

    /// Opens `config.connections` connections (in all), spread round-robin
    /// over the receiver endpoints `addrs`: connection `i` goes to
    /// `addrs[(offset + i) % addrs.len()]`. The offset varies per sender
    /// (process id and a counter), so that several prefill nodes with fewer
    /// connections than the receiver has endpoints do not all crowd the
    /// first ones.
    pub async fn connect_many_with(
        addrs: &[SocketAddr],
        client_tls: Arc<rustls::ClientConfig>,
        config: SenderConfig,
    ) -> Result<KvSender, TransferError> {
        if addrs.is_empty() {
            return Err(TransferError::InvalidArgument("no receiver address".into()));
        }
        if addrs.iter().any(|a| a.is_ipv4() != addrs[0].is_ipv4()) {
            return Err(TransferError::InvalidArgument(
                "receiver addresses mix IPv4 and IPv6".into(),
            ));
        }
        let addr = addrs[0];
        if config.connections == 0 {
            return Err(TransferError::InvalidArgument(
                "connections must be at least 1".into(),
            ));
        }
        if config.max_in_flight_bytes == 0 || config.max_frame_payload == 0 {
            return Err(TransferError::InvalidArgument(
                "byte limits must be nonzero".into(),
            ));
        }
        let client = quinn_client_config(client_tls, &config.transport)?;
        let n_endpoints = match config.endpoints {
            0 => config.connections,
            n => n.min(config.connections),
        };
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoints = Vec::with_capacity(n_endpoints);
        for _ in 0..n_endpoints {
            let mut ep = config.transport.endpoint(bind, None)?;
            ep.set_default_client_config(client.clone());
            endpoints.push(ep);
        }
        let mut pending = Vec::with_capacity(config.connections);
        static SENDERS: AtomicUsize = AtomicUsize::new(0);
        let offset = if addrs.len() > config.connections {
            (std::process::id() as usize).wrapping_add(SENDERS.fetch_add(1, Ordering::Relaxed))
        } else {
            0
        };
        for i in 0..config.connections {
            let to = addrs[(offset.wrapping_add(i)) % addrs.len()];
            let connecting = endpoints[i % n_endpoints]
                .connect(to, &config.server_name)
                .map_err(|e| TransferError::Connection(e.to_string()))?;
            pending.push(connecting);
        }
        let all = futures::future::try_join_all(pending);
        let connections = tokio::time::timeout(config.timeout, all)
            .await
            .map_err(|_| TransferError::Timeout("connecting"))?
            .map_err(|e| TransferError::Connection(e.to_string()))?;
        let budget = Arc::new(Semaphore::new(
            config.max_in_flight_bytes.min(Semaphore::MAX_PERMITS),
        ));
        Ok(KvSender {
            endpoints,
            connections,
            next: AtomicUsize::new(0),
            budget,
            config,
            send_limit: None,
        })
    }

    /// Caps what every request of this sender writes, together, at
    /// `bytes_per_s` (a token bucket, `[prefill] max_send_rate_mbps`): the
    /// frames leave in [`SendRateLimit::SLICE`]-byte pieces at that rate.
    pub fn with_send_rate_limit(mut self, bytes_per_s: f64) -> Self {
        self.send_limit = Some(Arc::new(SendRateLimit::new(bytes_per_s)));
        self
    }

    /// Opens the streams of one request's transfer.
    pub async fn open_request(&self, transfer_id: u64) -> Result<RequestStream, TransferError> {
        let n = self.connections.len();
        let lanes = match self.config.lanes_per_request {
            0 => n,
            l => l.min(n),
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut opening = Vec::with_capacity(lanes);
        for i in 0..lanes {
            opening.push(self.connections[(start + i) % n].open_uni());
        }
        let streams =
            tokio::time::timeout(self.config.timeout, futures::future::try_join_all(opening))
                .await
                .map_err(|_| TransferError::Timeout("opening a stream"))?
                .map_err(|e| TransferError::Connection(e.to_string()))?;
        let failure = Arc::new(Mutex::new(None));
        let lanes = streams
            .into_iter()
            .map(|send| {
                // A few frames of queue per lane; the byte budget is the real bound.
                let (tx, rx) = mpsc::channel(64);
                let cancel = CancellationToken::new();
                let task = tokio::spawn(run_lane(
                    send,
                    rx,
                    cancel.clone(),
                    failure.clone(),
                    LaneSettings {
                        timeout: self.config.timeout,
                        limit: self.send_limit.clone(),
                        checksum: self.config.checksum_payloads,
                    },
                ));
                Lane { tx, cancel, task }
            })
            .collect();
        Ok(RequestStream {
            transfer_id,
            final_conn: self.connections[start % n].clone(),
            timeout: self.config.timeout,
            lanes,
            next_lane: 0,
            frames_sent: 0,
            budget: self.budget.clone(),
            max_permits: self.config.max_in_flight_bytes.min(Semaphore::MAX_PERMITS),
            max_frame_payload: self.config.max_frame_payload,
            model_fingerprint: self.config.model_fingerprint,
            failure,
            done: false,
        })
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Each connection's QUIC statistics (packets, losses, congestion
    /// window, UDP calls), in connection order.
    pub fn connection_stats(&self) -> Vec<quinn::ConnectionStats> {
        self.connections.iter().map(Connection::stats).collect()
    }

    /// The receiver address each connection goes to, in connection order.
    pub fn remote_addrs(&self) -> Vec<SocketAddr> {
        self.connections
            .iter()
            .map(Connection::remote_address)
            .collect()
    }

    /// Closes the connections and waits (bounded) for the close to be sent.
    pub async fn close(&self) {
        for c in &self.connections {
            c.close(VarInt::from_u32(0), b"done");
        }
        for e in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
        }
    }
}

/// What every lane of a sender shares.
struct LaneSettings {
    /// Limit on the receiver's acknowledgement of the finished stream.
    timeout: Duration,
    /// The sender's rate cap, if any.
    limit: Option<Arc<SendRateLimit>>,
    /// Whether frames carry a checksum ([`SenderConfig::checksum_payloads`]).
    checksum: bool,
}

enum LaneMsg {
    /// A Layer frame whose checksum (if any) the lane computes (so
    /// connections hash in parallel), holding its share of the budget until written.
    Layer(LayerHeader, Bytes, OwnedSemaphorePermit),
    /// Bytes to write.
    Write(Vec<Bytes>),
    /// Finish the stream and wait for the receiver's acknowledgement.
    Finish,
    /// Answer once every message before this one is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

struct Lane {
    tx: mpsc::Sender<LaneMsg>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), TransferError>>,
}

/// One request's transfer, striped over one or more streams.
pub struct RequestStream {
    transfer_id: u64,
    /// Where the Final frame's own stream opens (the first lane's connection).
    final_conn: Connection,
    /// Limit on waiting for the receiver's acknowledgement.
    timeout: Duration,
    lanes: Vec<Lane>,
    next_lane: usize,
    frames_sent: u32,
    budget: Arc<Semaphore>,
    max_permits: usize,
    max_frame_payload: u32,
    model_fingerprint: u64,
    failure: Arc<Mutex<Option<TransferError>>>,
    done: bool,
}

impl RequestStream {
    /// The request.
    pub fn transfer_id(&self) -> u64 {
        self.transfer_id
    }

    /// Layer frames queued so far.
    pub fn frames_sent(&self) -> u32 {
        self.frames_sent
    }

    fn lane_failure(&self) -> TransferError {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| TransferError::Stream("lane closed".into()))
    }

    /// Queues `payload` (`shape.block_count` blocks of layer `shape.layer`,
    /// laid out as the engine exports them) for sending, cut into frames of
    /// at most `max_frame_payload` bytes. Returns once queued; waits while
    /// the sender's in-flight budget is spent.
    pub async fn send_layer(
        &mut self,
        shape: LayerShape,
        payload: Bytes,
    ) -> Result<(), TransferError> {
        let block_bytes = shape
            .block_bytes()
            .ok_or_else(|| TransferError::InvalidArgument("block size overflows".into()))?;
        if block_bytes == 0
            || shape.block_count == 0
            || shape.payload_len() != Some(payload.len() as u64)
        {
            return Err(TransferError::InvalidArgument(format!(
                "payload of {} bytes does not match {} blocks of {block_bytes} bytes",
                payload.len(),
                shape.block_count
            )));
        }
        let per_frame = blocks_per_frame(self.max_frame_payload, block_bytes);
        let mut block = 0u64;
        while block < u64::from(shape.block_count) {
            let count = per_frame.min(u64::from(shape.block_count) - block);
            let piece = payload
                .slice((block * block_bytes) as usize..((block + count) * block_bytes) as usize);
            let piece_shape = LayerShape {
                // Both fit in u32: they are bounded by block_count.
                first_block: shape.first_block.checked_add(block as u32).ok_or_else(|| {
                    TransferError::InvalidArgument("block index overflows".into())
                })?,
                block_count: count as u32,
                ..shape
            };
            let header = LayerHeader::unhashed(self.transfer_id, piece_shape, piece.len())?;
            self.queue(header, piece).await?;
            self.frames_sent += 1;
            block += count;
        }
        Ok(())
    }

    async fn queue(&mut self, header: LayerHeader, payload: Bytes) -> Result<(), TransferError> {
        let bytes = LAYER_HEADER_LEN + payload.len();
        let permits = bytes.clamp(1, self.max_permits) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| TransferError::Stream("sender closed".into()))?;
        let lane = &self.lanes[self.next_lane % self.lanes.len()];
        self.next_lane += 1;
        if lane
            .tx
            .send(LaneMsg::Layer(header, payload, permit))
            .await
            .is_err()
        {
            return Err(self.lane_failure());
        }
        Ok(())
    }

    /// Returns once every frame queued so far has been handed to the
    /// transport (written to its stream, not yet acknowledged): the time
    /// the request's last KV byte left, for its timing spans.
    pub async fn flushed(&self) {
        let mut waits = Vec::with_capacity(self.lanes.len());
        for lane in &self.lanes {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if lane.tx.send(LaneMsg::Flush(tx)).await.is_ok() {
                waits.push(rx);
            }
        }
        // A lane that failed answers nothing; its error comes with `finish`.
        for w in waits {
            let _ = w.await;
        }
    }

    /// Sends the Final frame, waits until every Layer frame queued is handed
    /// to the transport, then finishes every stream and waits until the
    /// receiver's QUIC stack has acknowledged all data. Returns when the last
    /// Layer frame was handed over (the request's last KV byte left).
    ///
    /// The Final overtakes the Layer frames still queued ([`FinalAhead`]).
    /// An error means the transfer failed (e.g. the receiver refused a frame
    /// and stopped the stream). `Ok` is delivery, not acceptance: a refusal
    /// decided after the last acknowledgement reaches the router through the
    /// decode node.
    pub async fn finish(
        self,
        first: &FirstToken,
        layers_sent: u32,
    ) -> Result<std::time::Instant, TransferError> {
        let sent = self
            .final_ahead()
            .send(first, layers_sent, self.frames_sent);
        self.finish_after(sent).await
    }

    /// What sends this request's Final frame ahead of its Layer frames, even
    /// of those not yet handed to [`send_layer`](Self::send_layer) (while this
    /// stream is busy queueing one).
    pub fn final_ahead(&self) -> FinalAhead {
        FinalAhead {
            conn: self.final_conn.clone(),
            transfer_id: self.transfer_id,
            model_fingerprint: self.model_fingerprint,
            max_frame_payload: self.max_frame_payload,
            failure: self.failure.clone(),
            timeout: self.timeout,
        }
    }

    /// Completes a transfer whose Final was made by [`FinalAhead::send`]:
    /// sends it last on a lane if it could not go ahead, waits until every
    /// Layer frame queued is handed to the transport, finishes every stream
    /// and waits for the receiver's acknowledgement, as [`finish`](Self::finish).
    /// The Layer frames queued must be the ones the Final announced; if not,
    /// the transfer is aborted (the receiver is told) and this is an error.
    pub async fn finish_after(
        mut self,
        sent: SentFinal,
    ) -> Result<std::time::Instant, TransferError> {
        if sent.frames_total != self.frames_sent {
            let e = TransferError::InvalidArgument(format!(
                "the Final frame announced {} Layer frames, {} were queued",
                sent.frames_total, self.frames_sent
            ));
            // The receiver may hold the Final, waiting: tell it.
            if let Err(abort) = self.abort(&e.to_string()).await {
                tracing::debug!("aborting a KV transfer: {abort}");
            }
            return Err(e);
        }
        self.done = true;
        if sent.task.is_none() {
            // Last on the lane the next frame would have used; the receiver
            // orders it after the other lanes by the frame count.
            let lane = &self.lanes[self.next_lane % self.lanes.len()];
            if lane
                .tx
                .send(LaneMsg::Write(vec![sent.frame]))
                .await
                .is_err()
            {
                return Err(self.lane_failure());
            }
        }
        self.flushed().await;
        let flushed = std::time::Instant::now();
        for lane in &self.lanes {
            // A closed lane has failed; its task's result says why.
            let _ = lane.tx.send(LaneMsg::Finish).await;
        }
        let tasks = std::mem::take(&mut self.lanes)
            .into_iter()
            .map(|l| l.task)
            .chain(sent.task);
        let mut failed = false;
        for task in tasks {
            failed |= !matches!(task.await, Ok(Ok(())));
        }
        if failed {
            return Err(self.lane_failure());
        }
        Ok(flushed)
    }

    /// Gives the request up: the receiver is told `reason` (on the first
    /// lane, after what was queued there) and the other lanes are reset.
    pub async fn abort(mut self, reason: &str) -> Result<(), TransferError> {
        self.done = true;
        let mut lanes = std::mem::take(&mut self.lanes).into_iter();
        let Some(first) = lanes.next() else {
            return Ok(());
        };
        for lane in lanes {
            lane.cancel.cancel();
        }
        let msg = LaneMsg::Write(vec![encode_abort(self.transfer_id, reason)]);
        if first.tx.send(msg).await.is_err() || first.tx.send(LaneMsg::Finish).await.is_err() {
            return Err(self.lane_failure());
        }
        match first.task.await {
            // The receiver stops the stream after an Abort; that is success here.
            Ok(Ok(())) | Ok(Err(TransferError::Refused { .. })) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(TransferError::Stream(format!("lane task failed: {e}"))),
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            for lane in &self.lanes {
                lane.cancel.cancel();
            }
        }
    }
}

/// Sends one request's Final frame on a stream of its own, at a higher
/// priority than the request's lanes, so that it overtakes the Layer frames
/// still queued: the receiver learns the first token as soon as the prefill
/// is done, and the frame count it announces says when the layers are all
/// in (the receiver waits for them). From [`RequestStream::final_ahead`].
pub struct FinalAhead {
    conn: Connection,
    transfer_id: u64,
    model_fingerprint: u64,
    max_frame_payload: u32,
    failure: Arc<Mutex<Option<TransferError>>>,
    timeout: Duration,
}

/// A Final frame made by [`FinalAhead::send`], for [`RequestStream::finish_after`].
pub struct SentFinal {
    frame: Bytes,
    frames_total: u32,
    /// Its stream's task; `None`: it did not go ahead (no stream to spare).
    task: Option<JoinHandle<Result<(), TransferError>>>,
}

impl SentFinal {
    /// Whether the frame went ahead on a stream of its own.
    pub fn went_ahead(&self) -> bool {
        self.task.is_some()
    }
}

impl FinalAhead {
    /// Layer frames [`RequestStream::send_layer`] cuts a layer of `shape` into.
    pub fn frames_for(&self, shape: &LayerShape) -> Result<u32, TransferError> {
        let block_bytes = shape
            .block_bytes()
            .filter(|&b| b > 0)
            .ok_or_else(|| TransferError::InvalidArgument("bad block size".into()))?;
        let per_frame = blocks_per_frame(self.max_frame_payload, block_bytes);
        Ok(u64::from(shape.block_count).div_ceil(per_frame) as u32)
    }

    /// Sends the Final now, announcing `frames_total` Layer frames: every
    /// one the request will have queued when [`RequestStream::finish_after`]
    /// is called, including those not queued yet. When the connection has no
    /// stream to spare at once, the frame waits to go last on a lane.
    pub fn send(&self, first: &FirstToken, layers_sent: u32, frames_total: u32) -> SentFinal {
        let frame = encode_final(
            self.transfer_id,
            first,
            layers_sent,
            frames_total,
            self.model_fingerprint,
        );
        let task = match self.conn.open_uni().now_or_never() {
            Some(Ok(send)) => {
                // The lanes are at the default priority, 0.
                let _ = send.set_priority(1);
                let (tx, rx) = mpsc::channel(2);
                let task = tokio::spawn(run_lane(
                    send,
                    rx,
                    CancellationToken::new(),
                    self.failure.clone(),
                    LaneSettings {
                        timeout: self.timeout,
                        limit: None,
                        checksum: false,
                    },
                ));
                // The channel has room for both.
                let _ = tx.try_send(LaneMsg::Write(vec![frame.clone()]));
                let _ = tx.try_send(LaneMsg::Finish);
                Some(task)
            }
            _ => None,
        };
        SentFinal {
            frame,
            frames_total,
            task,
        }
    }
}

/// Whole blocks a Layer frame of at most `max_frame_payload` bytes carries
/// (one, when a block alone is larger).
fn blocks_per_frame(max_frame_payload: u32, block_bytes: u64) -> u64 {
    (u64::from(max_frame_payload) / block_bytes).max(1)
}

fn write_error(e: WriteError) -> TransferError {
    match e {
        WriteError::Stopped(code) => TransferError::Refused {
            code: code.into_inner(),
        },
        other => TransferError::Stream(other.to_string()),
    }
}

async fn run_lane(
    mut send: SendStream,
    mut rx: mpsc::Receiver<LaneMsg>,
    cancel: CancellationToken,
    failure: Arc<Mutex<Option<TransferError>>>,
    settings: LaneSettings,
) -> Result<(), TransferError> {
    let r = lane_loop(&mut send, &mut rx, &cancel, &settings).await;
    if let Err(e) = &r {
        if !matches!(e, TransferError::Aborted) {
            failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| e.clone());
        }
        let _ = send.reset(VarInt::from_u32(RESET_ABANDONED));
    }
    r
}

async fn write(
    send: &mut SendStream,
    chunks: &mut [Bytes],
    cancel: &CancellationToken,
) -> Result<(), TransferError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(TransferError::Aborted),
        r = send.write_all_chunks(chunks) => r.map_err(write_error),
    }
}

/// Writes `chunks`, at most at `limit`'s rate when there is one.
async fn write_limited(
    send: &mut SendStream,
    chunks: &mut [Bytes],
    cancel: &CancellationToken,
    limit: Option<&SendRateLimit>,
) -> Result<(), TransferError> {
    let Some(limit) = limit else {
        return write(send, chunks, cancel).await;
    };
    for chunk in chunks.iter() {
        let mut at = 0;
        while at < chunk.len() {
            let end = (at + SendRateLimit::SLICE).min(chunk.len());
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(TransferError::Aborted),
                _ = limit.take(end - at) => {}
            }
            write(send, &mut [chunk.slice(at..end)], cancel).await?;
            at = end;
        }
    }
    Ok(())
}

async fn lane_loop(
    send: &mut SendStream,
    rx: &mut mpsc::Receiver<LaneMsg>,
    cancel: &CancellationToken,
    settings: &LaneSettings,
) -> Result<(), TransferError> {
    let limit = settings.limit.as_deref();
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(TransferError::Aborted),
            m = rx.recv() => m,
        };
        match msg {
            // The RequestStream went away without finishing: abandon.
            None => return Err(TransferError::Aborted),
            Some(LaneMsg::Layer(mut header, payload, permit)) => {
                // A few hundred microseconds for a 4 MiB frame, on this
                // lane's task: the lanes of a request hash side by side.
                if settings.checksum {
                    header.checksum = Some(xxh3_64(&payload));
                }
                let mut chunks = [Bytes::copy_from_slice(&header.encode()), payload];
                write_limited(send, &mut chunks, cancel, limit).await?;
                drop(permit);
            }
            Some(LaneMsg::Write(mut chunks)) => write(send, &mut chunks, cancel).await?,
            Some(LaneMsg::Flush(done)) => {
                let _ = done.send(());
            }
            Some(LaneMsg::Finish) => {
                send.finish()
                    .map_err(|e| TransferError::Stream(e.to_string()))?;
                return match tokio::time::timeout(settings.timeout, send.stopped()).await {
                    Err(_) => Err(TransferError::Timeout(
                        "waiting for the receiver's acknowledgement",
                    )),
                    Ok(Ok(None)) => Ok(()),
                    Ok(Ok(Some(code))) => Err(TransferError::Refused {
                        code: code.into_inner(),
                    }),
                    Ok(Err(e)) => Err(TransferError::Stream(e.to_string())),
                };
            }
        }
    }
}
