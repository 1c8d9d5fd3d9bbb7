//! What the link-cost prefill decision ([`prefill_choice`](crate::prefill_choice))
//! measures: the KV rate achieved from each prefill node, from real
//! transfers, and this node's own prefill rate.
//!
//! The rate per peer: the router names the prefill node it will use in the
//! `DecodeRequest` (`prefill_peer`); admission notes it against the transfer
//! ([`LinkBook::expect`]); the sink adds each accepted Layer frame's bytes
//! and receive time ([`LinkBook::frame`], the union of the frames' receive
//! intervals, as a transfer's lanes receive side by side); at the Final
//! frame the transfer's bytes over that busy time feed the peer's moving
//! average ([`LinkBook::finished`]). Transfers of less than
//! [`MIN_SAMPLE_BYTES`] are not counted.
//!
//! The local rate: prompt tokens over the duration of forward passes that
//! prefilled at least [`MIN_PREFILL_TOKENS`] tokens here, smoothed alike.
//! The bound is low so that the short prompts a decode node prefills anyway
//! teach it its rate; a small pass's fixed costs make that rate an
//! underestimate, which errs towards the prefill node. Until it is
//! measured, long prompts go remote.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_kv_transfer::LinkRates;
use tandem_telemetry::names;

/// Weight of a new sample in the moving averages.
pub const ALPHA: f64 = 0.3;
/// Transfers with fewer bytes are not counted (latency, not the link, dominates).
pub const MIN_SAMPLE_BYTES: u64 = 256 << 10;
/// Forward passes prefilling fewer tokens here are not counted.
pub const MIN_PREFILL_TOKENS: usize = 16;
/// Transfers being measured before unfinished ones are dropped.
const MAX_METERS: usize = 4096;

/// One transfer being measured.
#[derive(Debug)]
struct Meter {
    peer: String,
    bytes: u64,
    busy: Duration,
    last_end: Option<Instant>,
}

/// Link rates per prefill node and the transfers being measured; shared by
/// the sink (frames) and the engine loop (admission).
#[derive(Debug)]
pub struct LinkBook {
    rates: LinkRates,
    meters: HashMap<u64, Meter>,
}

/// A [`LinkBook`] shared between the sink and the engine loop.
#[derive(Debug, Clone)]
pub struct SharedLinks(Arc<Mutex<LinkBook>>);

impl Default for SharedLinks {
    fn default() -> Self {
        SharedLinks(Arc::new(Mutex::new(LinkBook {
            rates: LinkRates::new(ALPHA, MIN_SAMPLE_BYTES),
            meters: HashMap::new(),
        })))
    }
}

impl SharedLinks {
    /// The book, locked for a few map operations.
    pub fn lock(&self) -> MutexGuard<'_, LinkBook> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LinkBook {
    /// Transfer `transfer_id` will come from `peer`.
    pub fn expect(&mut self, transfer_id: u64, peer: &str) {
        if self.meters.len() >= MAX_METERS {
            self.meters.clear();
        }
        self.meters.insert(
            transfer_id,
            Meter {
                peer: peer.to_owned(),
                bytes: 0,
                busy: Duration::ZERO,
                last_end: None,
            },
        );
    }

    /// A frame of `bytes` of `transfer_id` arrived from `started` to `now`.
    pub fn frame(&mut self, transfer_id: u64, bytes: u64, started: Instant, now: Instant) {
        let Some(m) = self.meters.get_mut(&transfer_id) else {
            return;
        };
        m.bytes += bytes;
        // Frames of a transfer's lanes overlap: count the time any was arriving.
        let from = m.last_end.map_or(started, |e| e.max(started));
        m.busy += now.saturating_duration_since(from);
        m.last_end = Some(m.last_end.map_or(now, |e| e.max(now)));
    }

    /// Transfer `transfer_id` ended whole: counts its rate for its peer.
    /// Returns the peer and its new smoothed rate when the sample counted.
    pub fn finished(&mut self, transfer_id: u64) -> Option<(String, f64)> {
        let m = self.meters.remove(&transfer_id)?;
        if !self.rates.observe(&m.peer, m.bytes, m.busy) {
            return None;
        }
        let rate = self.rates.rate(&m.peer)?;
        metrics::gauge!(names::KV_LINK_RATE_BYTES_PER_SECOND, names::PEER => m.peer.clone())
            .set(rate);
        Some((m.peer, rate))
    }

    /// Stops measuring `transfer_id` (aborted, timed out, ended).
    pub fn forget(&mut self, transfer_id: u64) {
        self.meters.remove(&transfer_id);
    }

    /// The smoothed rate from `peer`, bytes/s.
    pub fn rate(&self, peer: &str) -> Option<f64> {
        self.rates.rate(peer)
    }
}

/// This node's smoothed prefill rate, and when it was last sampled.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalRate {
    rate: Option<f64>,
    sampled: Option<Instant>,
}

impl LocalRate {
    /// A forward pass prefilled `tokens` (and decoded some rows) in `elapsed`.
    pub fn observe(&mut self, tokens: usize, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if tokens < MIN_PREFILL_TOKENS || secs <= 0.0 {
            return;
        }
        let sample = tokens as f64 / secs;
        self.rate = Some(match self.rate {
            Some(r) => r + ALPHA * (sample - r),
            None => sample,
        });
        self.sampled = Some(Instant::now());
    }

    /// Tokens/s; `None` before any sample.
    pub fn tokens_per_s(&self) -> Option<f64> {
        self.rate
    }

    /// How long ago the last sample came (zero before any).
    pub fn age(&self) -> Duration {
        self.sampled.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_frames_count_their_union() {
        let links = SharedLinks::default();
        let mut book = links.lock();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        book.expect(7, "p");
        // Two lanes, 200 KB each over 0..100 ms and 50..150 ms: 150 ms busy.
        book.frame(7, 200_000, ms(0), ms(100));
        book.frame(7, 200_000, ms(50), ms(150));
        // A third after a gap (compute): only its own 50 ms.
        book.frame(7, 100_000, ms(300), ms(350));
        let (peer, rate) = book.finished(7).expect("counted");
        assert_eq!(peer, "p");
        assert!((rate - 500_000.0 / 0.2).abs() < 1.0, "{rate}");
        assert_eq!(book.rate("p"), Some(rate));
        // A small transfer does not move it.
        book.expect(8, "p");
        book.frame(8, 1000, ms(0), ms(100));
        assert!(book.finished(8).is_none());
        assert_eq!(book.rate("p"), Some(rate));
    }

    #[test]
    fn the_local_rate_ignores_small_passes() {
        let mut r = LocalRate::default();
        r.observe(10, Duration::from_millis(1));
        assert_eq!(r.tokens_per_s(), None);
        r.observe(MIN_PREFILL_TOKENS, Duration::ZERO);
        assert_eq!(r.tokens_per_s(), None);
        assert_eq!(r.age(), Duration::ZERO, "no sample, no age");
        r.observe(1000, Duration::from_millis(100));
        assert_eq!(r.tokens_per_s(), Some(10_000.0));
        // Aged from the last counted sample; small passes do not refresh it.
        std::thread::sleep(Duration::from_millis(20));
        r.observe(10, Duration::from_millis(1));
        assert!(r.age() >= Duration::from_millis(20), "{:?}", r.age());
    }
}
