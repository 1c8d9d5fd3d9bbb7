//! What a decode node records (see `tandem_telemetry::names`): its KV
//! blocks used and free and the sequences waiting (for KV, or being
//! prefilled here) after every engine iteration, and the size of every
//! forward pass. KV bytes received are counted by the sink as frames are accepted.
//!
//! Handles are taken once, at start, so an iteration's updates are a few
//! atomic stores.

use metrics::{Gauge, Histogram};
use tandem_telemetry::names;

/// The engine loop's metric handles.
pub struct DecodeMetrics {
    kv_used: Gauge,
    kv_free: Gauge,
    waiting: Gauge,
    batch: Histogram,
}

impl DecodeMetrics {
    /// Handles labelled with this node's id.
    pub fn new(node_id: &str) -> Self {
        let node = node_id.to_string();
        DecodeMetrics {
            kv_used: metrics::gauge!(names::KV_BLOCKS_USED, names::ROLE => "decode", names::NODE => node.clone()),
            kv_free: metrics::gauge!(names::KV_BLOCKS_FREE, names::ROLE => "decode", names::NODE => node),
            waiting: metrics::gauge!(names::QUEUE_DEPTH, names::ROLE => "decode", names::QUEUE => "decode"),
            batch: metrics::histogram!(names::BATCH_SIZE, names::ROLE => "decode"),
        }
    }

    /// The cache's blocks and the sequences not yet in the running batch, now.
    pub fn publish(&self, total: usize, free: usize, waiting: usize) {
        self.kv_used.set(total.saturating_sub(free) as f64);
        self.kv_free.set(free as f64);
        self.waiting.set(waiting as f64);
    }

    /// One forward pass over `sequences` sequences.
    pub fn step(&self, sequences: usize) {
        self.batch.record(sequences as f64);
    }
}
