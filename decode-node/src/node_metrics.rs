//! What a decode node records (see `tandem_telemetry::names`): its KV
//! blocks used and free, its prefix cache's size, evictions and hits (local
//! prefills), and the sequences waiting (for KV, or being
//! prefilled here) after every engine iteration, the size of every
//! forward pass, and the KV bytes prefill nodes did not send because the
//! prefix cache here held them. KV bytes received are counted by the sink as
//! frames are accepted.
//!
//! Handles are taken once, at start, so an iteration's updates are a few
//! atomic stores.

use metrics::{Counter, Gauge, Histogram};
use tandem_engine::BlockManager;
use tandem_telemetry::names;

/// The engine loop's metric handles.
pub struct DecodeMetrics {
    kv_used: Gauge,
    kv_free: Gauge,
    waiting: Gauge,
    batch: Histogram,
    cache_queries: Counter,
    cache_hits: Counter,
    cache_blocks: Gauge,
    cache_evictions: Counter,
    kv_skipped: Counter,
    preemptions: Counter,
}

impl DecodeMetrics {
    /// Handles labelled with this node's id.
    pub fn new(node_id: &str) -> Self {
        let node = node_id.to_string();
        DecodeMetrics {
            kv_used: metrics::gauge!(names::KV_BLOCKS_USED, names::ROLE => "decode", names::NODE => node.clone()),
            kv_free: metrics::gauge!(names::KV_BLOCKS_FREE, names::ROLE => "decode", names::NODE => node.clone()),
            cache_queries: metrics::counter!(names::PREFIX_CACHE_QUERIES_TOTAL, names::ROLE => "decode", names::NODE => node.clone()),
            cache_hits: metrics::counter!(names::PREFIX_CACHE_HITS_TOTAL, names::ROLE => "decode", names::NODE => node.clone()),
            cache_blocks: metrics::gauge!(names::PREFIX_CACHE_BLOCKS, names::ROLE => "decode", names::NODE => node.clone()),
            cache_evictions: metrics::counter!(names::PREFIX_CACHE_EVICTIONS_TOTAL, names::ROLE => "decode", names::NODE => node.clone()),
            kv_skipped: metrics::counter!(names::KV_TRANSFER_SKIPPED_BYTES_TOTAL, names::NODE => node.clone()),
            preemptions: metrics::counter!(names::PREEMPTIONS_TOTAL, names::NODE => node),
            waiting: metrics::gauge!(names::QUEUE_DEPTH, names::ROLE => "decode", names::QUEUE => "decode"),
            batch: metrics::histogram!(names::BATCH_SIZE, names::ROLE => "decode"),
        }
    }

    /// The cache's blocks and the sequences not yet in the running batch, now.
    pub fn publish(&self, blocks: &BlockManager, waiting: usize) {
        let (total, free) = (blocks.total(), blocks.num_free());
        self.kv_used.set(total.saturating_sub(free) as f64);
        self.kv_free.set(free as f64);
        self.cache_blocks.set(blocks.num_cached() as f64);
        self.cache_evictions.absolute(blocks.evictions());
        self.waiting.set(waiting as f64);
    }

    /// A prompt of `tokens` tokens to prefill here, of which `cached` were in the prefix cache.
    pub fn prefix_lookup(&self, tokens: usize, cached: usize) {
        self.cache_queries.increment(tokens as u64);
        self.cache_hits.increment(cached as u64);
    }

    /// A prefill node was told not to send `bytes` of KV the cache here holds.
    pub fn kv_skipped(&self, bytes: u64) {
        self.kv_skipped.increment(bytes);
    }

    /// A sequence gave its blocks back for others to grow.
    pub fn preempted(&self) {
        self.preemptions.increment(1);
    }

    /// One forward pass over `sequences` sequences.
    pub fn step(&self, sequences: usize) {
        self.batch.record(sequences as f64);
    }
}
