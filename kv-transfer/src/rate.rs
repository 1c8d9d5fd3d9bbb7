//! Link rates: what a KV transfer achieves to each peer, measured from real
//! transfers and smoothed ([`LinkRates`]), and a cap on what a sender may
//! send ([`SendRateLimit`], a token bucket) so a slow link can be made for
//! real in tests and on shared networks.
//!
//! The decode node feeds [`LinkRates`] with the receive time of each Layer
//! frame (first byte of the frame to its last, see `KvSink::on_frame_timing`):
//! a layer is sent as one burst as soon as it is computed, so a frame's
//! bytes over its receive time is the link's rate, not the prefill's
//! compute rate (which a whole transfer's duration would measure). Frames
//! below a minimum size are ignored: their time is dominated by latency and
//! scheduling, not by the link.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Smoothed achieved transfer rates (bytes/s) per peer.
#[derive(Debug, Clone)]
pub struct LinkRates {
    /// Weight of a new sample in the moving average (0 < alpha ≤ 1).
    alpha: f64,
    /// Samples of fewer bytes are ignored.
    min_bytes: u64,
    by_peer: HashMap<String, f64>,
}

impl LinkRates {
    /// Rates averaged with weight `alpha` per sample, from samples of at
    /// least `min_bytes`.
    pub fn new(alpha: f64, min_bytes: u64) -> Self {
        LinkRates {
            alpha: alpha.clamp(f64::MIN_POSITIVE, 1.0),
            min_bytes,
            by_peer: HashMap::new(),
        }
    }

    /// `bytes` from `peer` took `elapsed`; returns whether it counted.
    pub fn observe(&mut self, peer: &str, bytes: u64, elapsed: Duration) -> bool {
        let secs = elapsed.as_secs_f64();
        if bytes < self.min_bytes || secs <= 0.0 {
            return false;
        }
        let sample = bytes as f64 / secs;
        let alpha = self.alpha;
        self.by_peer
            .entry(peer.to_owned())
            .and_modify(|r| *r += alpha * (sample - *r))
            .or_insert(sample);
        true
    }

    /// The smoothed rate to `peer` in bytes/s; `None` before any sample.
    pub fn rate(&self, peer: &str) -> Option<f64> {
        self.by_peer.get(peer).copied()
    }
}

/// A token bucket over bytes: [`take`](Self::take) waits until the bytes
/// fit the rate. Shared by every stream of a sender, so the cap holds for
/// the link as a whole.
#[derive(Debug)]
pub struct SendRateLimit {
    bytes_per_s: f64,
    /// Most bytes sent at once after an idle spell.
    burst: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl SendRateLimit {
    /// Bytes a sender writes between two waits on the bucket: small, so
    /// a frame's bytes leave at the capped rate rather than in one burst.
    pub const SLICE: usize = 16 << 10;

    /// At most `bytes_per_s` (positive), with bursts of one [`Self::SLICE`].
    pub fn new(bytes_per_s: f64) -> Self {
        let burst = Self::SLICE as f64;
        SendRateLimit {
            bytes_per_s: bytes_per_s.max(1.0),
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// The cap, in bytes/s.
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes_per_s
    }

    /// Waits until `bytes` may be sent, then takes them from the bucket.
    /// Callers hold the bucket in turn, so streams share the rate fairly.
    pub async fn take(&self, bytes: usize) {
        let mut b = self.bucket.lock().await;
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.bytes_per_s)
            .min(self.burst.max(bytes as f64));
        b.at = now;
        b.tokens -= bytes as f64;
        if b.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-b.tokens / self.bytes_per_s);
            tokio::time::sleep(wait).await;
            b.tokens = 0.0;
            b.at = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_sets_the_rate_and_later_ones_move_it() {
        let mut r = LinkRates::new(0.5, 1000);
        assert_eq!(r.rate("p"), None);
        assert!(r.observe("p", 1_000_000, Duration::from_secs(1)));
        assert_eq!(r.rate("p"), Some(1e6));
        assert!(r.observe("p", 3_000_000, Duration::from_secs(1)));
        assert_eq!(r.rate("p"), Some(2e6));
        assert_eq!(r.rate("q"), None);
    }

    #[test]
    fn small_or_instant_samples_are_ignored() {
        let mut r = LinkRates::new(0.5, 1000);
        assert!(!r.observe("p", 999, Duration::from_millis(1)));
        assert!(!r.observe("p", 5000, Duration::ZERO));
        assert_eq!(r.rate("p"), None);
    }

    #[tokio::test]
    async fn the_bucket_holds_the_rate() {
        let limit = SendRateLimit::new(10e6);
        let start = Instant::now();
        for _ in 0..64 {
            limit.take(SendRateLimit::SLICE).await;
        }
        // 1 MiB at 10 MB/s, less the first slice's burst: never sooner
        // (a loaded machine may make it later).
        let secs = start.elapsed().as_secs_f64();
        let expect = (63 * SendRateLimit::SLICE) as f64 / 10e6;
        assert!(secs >= expect * 0.98, "{secs} vs {expect}");
        assert!(secs < expect + 2.0, "{secs} vs {expect}");
    }
}
