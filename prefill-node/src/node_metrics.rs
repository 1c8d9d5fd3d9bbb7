//! What a prefill node records (see `tandem_telemetry::names`): its queue
//! depth as jobs come and go, its KV blocks used and free, its prefix
//! cache's size, evictions and hits, and the prompts per forward pass after
//! every step (the worker), and the KV bytes it ships
//! (the sending side, `transfer`). Transfer times are the decode node's.
//!
//! Handles are taken once, at start.

use metrics::{Counter, Gauge, Histogram};
use tandem_engine::BlockManager;
use tandem_telemetry::names;

/// The worker's metric handles.
pub(crate) struct PrefillMetrics {
    kv_used: Gauge,
    kv_free: Gauge,
    batch: Histogram,
    cache_queries: Counter,
    cache_hits: Counter,
    cache_blocks: Gauge,
    cache_evictions: Counter,
}

impl PrefillMetrics {
    /// Handles labelled with this node's id.
    pub fn new(node_id: &str) -> Self {
        let node = node_id.to_string();
        PrefillMetrics {
            kv_used: metrics::gauge!(names::KV_BLOCKS_USED, names::ROLE => "prefill", names::NODE => node.clone()),
            kv_free: metrics::gauge!(names::KV_BLOCKS_FREE, names::ROLE => "prefill", names::NODE => node.clone()),
            batch: metrics::histogram!(names::BATCH_SIZE, names::ROLE => "prefill"),
            cache_queries: metrics::counter!(names::PREFIX_CACHE_QUERIES_TOTAL, names::ROLE => "prefill", names::NODE => node.clone()),
            cache_hits: metrics::counter!(names::PREFIX_CACHE_HITS_TOTAL, names::ROLE => "prefill", names::NODE => node.clone()),
            cache_blocks: metrics::gauge!(names::PREFIX_CACHE_BLOCKS, names::ROLE => "prefill", names::NODE => node.clone()),
            cache_evictions: metrics::counter!(names::PREFIX_CACHE_EVICTIONS_TOTAL, names::ROLE => "prefill", names::NODE => node),
        }
    }

    /// The cache's blocks, now.
    pub fn blocks(&self, blocks: &BlockManager) {
        let (total, free) = (blocks.total(), blocks.num_free());
        self.kv_used.set(total.saturating_sub(free) as f64);
        self.kv_free.set(free as f64);
        self.cache_blocks.set(blocks.num_cached() as f64);
        self.cache_evictions.absolute(blocks.evictions());
    }

    /// A prompt of `tokens` tokens admitted, of which `cached` were in the prefix cache.
    pub fn prefix_lookup(&self, tokens: usize, cached: usize) {
        self.cache_queries.increment(tokens as u64);
        self.cache_hits.increment(cached as u64);
    }

    /// One forward pass over chunks of `prompts` prompts.
    pub fn step(&self, prompts: usize) {
        self.batch.record(prompts as f64);
    }
}

/// `tandem_queue_depth{role="prefill",queue="prefill"}`.
pub(crate) fn queue_depth() -> Gauge {
    metrics::gauge!(names::QUEUE_DEPTH, names::ROLE => "prefill", names::QUEUE => "prefill")
}

/// The sending side's handles.
#[derive(Clone)]
pub(crate) struct TransferMetrics {
    /// `tandem_kv_transfer_bytes_total{direction="sent"}`.
    pub bytes: Counter,
}

impl TransferMetrics {
    pub fn new() -> Self {
        TransferMetrics {
            bytes: metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, names::DIRECTION => "sent"),
        }
    }
}
