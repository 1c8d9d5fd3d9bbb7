//! Where the QUIC receiver delivers KV: checked against the reservation table,
//! then handed to the engine loop to be written into the reserved blocks.
//!
//! The hand-off channel is unbounded on purpose: the reservation table accepts
//! each (layer, block) of a reservation once, so the bytes waiting in it never
//! exceed the KV reserved for the requests in flight, which the cache size bounds.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tandem_kv_transfer::{KvSink, LayerHeader, Reservations};

use crate::scheduler::Command;

/// The decode node's [`KvSink`].
pub struct ReservedSink {
    /// The table of expected transfers, shared with the engine loop.
    pub reservations: Arc<Mutex<Reservations>>,
    /// The engine loop.
    pub commands: Sender<Command>,
    /// `tandem_kv_transfer_bytes_total{direction="received"}`: accepted payload bytes.
    pub received: metrics::Counter,
}

impl ReservedSink {
    fn table(&self) -> std::sync::MutexGuard<'_, Reservations> {
        self.reservations.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KvSink for ReservedSink {
    fn on_layer(&self, header: &LayerHeader, payload: Bytes) -> Result<(), String> {
        let accepted = self
            .table()
            .on_layer_frame(header)
            .map_err(|r| r.to_string())?;
        self.received.increment(payload.len() as u64);
        self.commands
            .send(Command::ImportLayer {
                transfer_id: header.request_id,
                layer: accepted.layer as usize,
                first_block: accepted.first_block as usize,
                block_count: accepted.block_count as usize,
                heads: accepted.head_start as usize
                    ..accepted.head_start as usize + accepted.head_count as usize,
                payload,
            })
            .map_err(|_| "the decode node is shutting down".to_string())
    }

    fn on_final(&self, request_id: u64, first_token: u32, layers_sent: u32) -> Result<(), String> {
        let complete = self
            .table()
            .on_final(request_id, first_token, layers_sent)
            .map_err(|r| r.to_string())?;
        self.commands
            .send(Command::KvComplete {
                transfer_id: complete.request_id,
                first_token: complete.first_token,
            })
            .map_err(|_| "the decode node is shutting down".to_string())
    }

    fn on_abort(&self, request_id: u64, reason: &str) {
        self.table().release(request_id);
        let _ = self.commands.send(Command::KvAborted {
            transfer_id: request_id,
            reason: reason.to_string(),
        });
    }
}
