//! Where the QUIC receiver delivers KV: checked against the reservation table,
//! then handed to the engine loop to be written into the reserved blocks.
//!
//! The sink never releases a reservation: a refused frame or a failed
//! transfer is reported to the engine loop (`Command::KvAborted`), which owns
//! the request and releases its reservation together with its blocks.
//!
//! The hand-off channel is unbounded on purpose: the reservation table accepts
//! each (layer, block) of a reservation once, so the bytes waiting in it never
//! exceed the KV reserved for the requests in flight, which the cache size bounds.
//!
//! The sink also measures each transfer (`tandem_kv_transfer_seconds`: first
//! accepted frame to the final frame) and counts the bytes it accepts.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_kv_transfer::{FirstToken, KvSink, LayerHeader, Payload, Reservations, SinkError};

use crate::link_cost::SharedLinks;
use crate::scheduler::Command;

/// The decode node's [`KvSink`].
pub struct ReservedSink {
    /// The table of expected transfers, shared with the engine loop (which
    /// registers and releases; the sink only checks frames against it).
    pub reservations: Arc<Mutex<Reservations>>,
    /// The engine loop.
    pub commands: Sender<Command>,
    /// `tandem_kv_transfer_bytes_total{direction="received"}`: accepted payload bytes.
    pub received: metrics::Counter,
    /// `tandem_kv_transfer_seconds`.
    pub transfer_seconds: metrics::Histogram,
    /// When each transfer in flight sent its first accepted frame, by transfer id.
    pub started: Mutex<HashMap<u64, Instant>>,
    /// The link rates per prefill node, fed with each frame's receive time.
    pub links: SharedLinks,
}

/// Transfers tracked for timing before stale ones (never finished nor
/// aborted, e.g. timed out) are swept.
const TRACKED_TRANSFERS: usize = 4096;
/// Age past which a transfer that never finished is forgotten.
const STALE_TRANSFER: Duration = Duration::from_secs(120);

impl ReservedSink {
    /// A sink over `reservations`, handing accepted KV to `commands`.
    pub fn new(
        reservations: Arc<Mutex<Reservations>>,
        commands: Sender<Command>,
        links: SharedLinks,
    ) -> Self {
        use tandem_telemetry::names;
        ReservedSink {
            reservations,
            commands,
            received: metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, names::DIRECTION => "received"),
            transfer_seconds: metrics::histogram!(names::KV_TRANSFER_SECONDS),
            started: Mutex::new(HashMap::new()),
            links,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Reservations> {
        self.reservations.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn started(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.started.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, cmd: Command) -> Result<(), SinkError> {
        self.commands.send(cmd).map_err(|_| SinkError::ShuttingDown)
    }
}

impl KvSink for ReservedSink {
    fn on_layer(&self, header: &LayerHeader, payload: Payload) -> Result<(), SinkError> {
        let accepted = self.table().on_layer_frame(header)?;
        self.received.increment(payload.len() as u64);
        {
            let now = Instant::now();
            let mut started = self.started();
            if started.len() >= TRACKED_TRANSFERS {
                started.retain(|_, t| now.duration_since(*t) < STALE_TRANSFER);
            }
            started.entry(header.transfer_id).or_insert(now);
        }
        self.send(Command::ImportLayer {
            transfer_id: header.transfer_id,
            layer: accepted.layer as usize,
            first_block: accepted.first_block as usize,
            block_count: accepted.block_count as usize,
            heads: accepted.head_start as usize
                ..accepted.head_start as usize + accepted.head_count as usize,
            dtype: header.shape.dtype,
            payload,
        })
    }

    fn on_final(&self, transfer_id: u64, layers_sent: u32) -> Result<(), SinkError> {
        self.table().on_final(transfer_id, layers_sent)?;
        if let Some(t) = self.started().remove(&transfer_id) {
            self.transfer_seconds.record(t.elapsed().as_secs_f64());
        }
        if let Some((peer, rate)) = self.links.lock().finished(transfer_id) {
            tracing::debug!(transfer_id, %peer, rate_mbps = rate * 8e-6, "kv link rate");
        }
        self.send(Command::KvComplete { transfer_id })
    }

    fn on_first_token(&self, transfer_id: u64, first: FirstToken) {
        // A node shutting down drops it; the transfer's ending says the rest.
        let _ = self.send(Command::FirstToken { transfer_id, first });
    }

    fn on_frame_received(&self, transfer_id: u64, bytes: u64, started: Instant) {
        self.links
            .lock()
            .frame(transfer_id, bytes, started, Instant::now());
    }

    fn on_abort(&self, transfer_id: u64, reason: &str) {
        self.started().remove(&transfer_id);
        self.links.lock().forget(transfer_id);
        // The engine loop fails the request and releases its reservation.
        let _ = self.commands.send(Command::KvAborted {
            transfer_id,
            reason: reason.to_string(),
        });
    }
}
