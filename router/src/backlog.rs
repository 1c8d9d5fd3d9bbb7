//! The prefill backlog: how long the prompts queued at the prefill nodes
//! will take, so the router can (1) stop admitting requests before their KV
//! waits would expire and (2) give each decode reservation a KV wait long
//! enough for the prefill work queued ahead of it.
//!
//! A prefill node's rate is measured from its own load reports: the growth
//! of `prompt_tokens_total` over windows of at least [`RATE_WINDOW`] during
//! which the node was busy (something queued or running), smoothed. Until a
//! node has been measured, its rate is unknown and the router neither
//! refuses nor stretches waits on its account (the configured base wait
//! applies), so a cold cluster is never refused for want of a figure.
//!
//! Everything here is sans-I/O: reports and times go in, estimates come out.

use std::time::{Duration, Instant};

use tandem_proto::v1::NodeLoad;

/// The shortest span of reports a rate sample is taken over.
pub const RATE_WINDOW: Duration = Duration::from_millis(500);
/// Weight of a new sample in the smoothed rate.
const SMOOTHING: f64 = 0.3;

/// One prefill node's measured rate, in prompt tokens per second.
#[derive(Debug, Clone, Default)]
pub struct PrefillRate {
    /// The start of the current busy window: its time and token total.
    window: Option<(Instant, u64)>,
    tokens_per_s: Option<f64>,
}

impl PrefillRate {
    /// Takes a load report that arrived at `now`.
    pub fn on_report(&mut self, load: &NodeLoad, now: Instant) {
        let busy = load.queued > 0 || load.running > 0 || load.queued_prefill_tokens > 0;
        let Some((start, total)) = self.window else {
            if busy {
                self.window = Some((now, load.prompt_tokens_total));
            }
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if load.prompt_tokens_total < total {
            // The node restarted: its totals began again.
            self.window = busy.then_some((now, load.prompt_tokens_total));
            return;
        }
        if elapsed >= RATE_WINDOW {
            let done = load.prompt_tokens_total - total;
            // A window in which nothing finished says little when the node
            // holds one long prompt; it lowers the rate only if it was long.
            if done > 0 || elapsed >= RATE_WINDOW * 8 {
                let sample = done as f64 / elapsed.as_secs_f64();
                self.tokens_per_s = Some(match self.tokens_per_s {
                    Some(r) => r + SMOOTHING * (sample - r),
                    None => sample,
                });
                self.window = busy.then_some((now, load.prompt_tokens_total));
            }
        }
        if !busy {
            self.window = None;
        }
    }

    /// The measured rate, if any (tokens per second, positive).
    pub fn tokens_per_s(&self) -> Option<f64> {
        self.tokens_per_s.filter(|r| *r > 0.0)
    }
}

/// The work queued at the usable prefill nodes, as the router knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Prompt tokens queued or being prefilled, summed.
    pub queued_tokens: u64,
    /// Summed measured rate of the nodes that have one (tokens per second).
    pub tokens_per_s: f64,
    /// Usable prefill nodes.
    pub nodes: usize,
}

impl Backlog {
    /// Seconds to work off `extra_tokens` more than the queue, or `None`
    /// while no rate is measured.
    pub fn wait_s(&self, extra_tokens: u64) -> Option<f64> {
        (self.tokens_per_s > 0.0)
            .then(|| (self.queued_tokens.saturating_add(extra_tokens)) as f64 / self.tokens_per_s)
    }
}

/// A decode reservation's KV wait: `base` plus the time the chosen prefill
/// node needs for `tokens_ahead` (its queue plus this prompt) at its rate,
/// at most `max` (and never below `base`).
pub fn kv_wait(
    base: Duration,
    max: Duration,
    tokens_ahead: u64,
    tokens_per_s: Option<f64>,
) -> Duration {
    let Some(rate) = tokens_per_s.filter(|r| *r > 0.0) else {
        return base;
    };
    let ahead = Duration::try_from_secs_f64(tokens_ahead as f64 / rate).unwrap_or(Duration::MAX);
    base.saturating_add(ahead).min(max.max(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(queued: u32, queued_tokens: u64, total: u64) -> NodeLoad {
        NodeLoad {
            role: "prefill".into(),
            queued,
            queued_prefill_tokens: queued_tokens,
            prompt_tokens_total: total,
            ..Default::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_rate_is_measured_over_busy_windows() {
        let t = Instant::now();
        let mut r = PrefillRate::default();
        r.on_report(&load(0, 0, 0), t);
        assert_eq!(r.tokens_per_s(), None, "idle: nothing to measure");
        r.on_report(&load(2, 800, 0), t + ms(100));
        r.on_report(&load(2, 600, 200), t + ms(300));
        assert_eq!(r.tokens_per_s(), None, "the window is too short yet");
        r.on_report(&load(1, 400, 500), t + ms(600));
        // 500 tokens in 0.5 s.
        assert_eq!(r.tokens_per_s(), Some(1000.0));
        // Smoothed towards the next sample (2000/s), not replaced by it.
        r.on_report(&load(1, 100, 1500), t + ms(1100));
        let rate = r.tokens_per_s().unwrap();
        assert!((rate - 1300.0).abs() < 1e-6, "{rate}");
    }

    #[test]
    fn idle_time_does_not_lower_the_rate() {
        let t = Instant::now();
        let mut r = PrefillRate::default();
        r.on_report(&load(1, 100, 0), t);
        r.on_report(&load(0, 0, 500), t + ms(500));
        assert_eq!(r.tokens_per_s(), Some(1000.0));
        // A minute idle, then busy again.
        r.on_report(&load(0, 0, 500), t + ms(60_000));
        r.on_report(&load(1, 100, 500), t + ms(60_100));
        r.on_report(&load(0, 0, 1000), t + ms(60_600));
        assert_eq!(r.tokens_per_s(), Some(1000.0));
    }

    #[test]
    fn a_restarted_node_starts_a_new_window() {
        let t = Instant::now();
        let mut r = PrefillRate::default();
        r.on_report(&load(1, 100, 10_000), t);
        r.on_report(&load(1, 100, 0), t + ms(100));
        r.on_report(&load(1, 100, 300), t + ms(700));
        assert_eq!(r.tokens_per_s(), Some(500.0));
    }

    #[test]
    fn kv_waits_grow_with_the_work_ahead_up_to_the_cap() {
        let base = Duration::from_secs(30);
        let max = Duration::from_secs(120);
        assert_eq!(kv_wait(base, max, 50_000, None), base, "no rate: the base");
        assert_eq!(
            kv_wait(base, max, 10_000, Some(1000.0)),
            Duration::from_secs(40)
        );
        assert_eq!(kv_wait(base, max, 10_000_000, Some(1000.0)), max);
        assert_eq!(
            kv_wait(base, ms(10), 10, Some(1.0)),
            base,
            "never below the base"
        );
    }

    #[test]
    fn the_backlog_wait_needs_a_rate() {
        let b = Backlog {
            queued_tokens: 3000,
            tokens_per_s: 0.0,
            nodes: 1,
        };
        assert_eq!(b.wait_s(1000), None);
        let b = Backlog {
            tokens_per_s: 2000.0,
            ..b
        };
        assert_eq!(b.wait_s(1000), Some(2.0));
    }
}
