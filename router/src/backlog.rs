//! The prefill backlog: how long the prompts queued at the prefill nodes
//! will take, so the router can (1) stop admitting requests before their KV
//! waits would expire and (2) give each decode reservation a KV wait long
//! enough for the prefill work queued ahead of it.
//!
//! A prefill node's rate is measured by conservation over windows of at
//! least [`RATE_WINDOW`] during which the node was busy: the prompt tokens
//! the router sent it, less the growth of its reported queue
//! (`queued_prefill_tokens`: what is waiting plus what its active prompts
//! still lack), smoothed. (The node's `prompt_tokens_total` counts a prompt
//! when it starts, not when it is done, so it cannot give the rate.) A node
//! whose busy spells are all shorter than the window (it goes idle between
//! prompts that come a few at a time) would never be measured, and admission
//! would never bound its queue: until a node has a rate, its short spells
//! add up, and once together they are a window long they give its first
//! sample. That sample runs low (a spell is timed from the report that first
//! shows it busy to the one that shows it idle, so up to an interval too
//! long), which errs on the side of refusing; full windows correct it. Until
//! a node has been measured its rate is unknown: admission does not refuse on its
//! account, and KV waits are the longest allowed, since nothing says how
//! long the queue takes.
//!
//! Everything here is sans-I/O: reports and times go in, estimates come out.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tandem_proto::v1::NodeLoad;

/// The shortest span of reports a rate sample is taken over.
pub const RATE_WINDOW: Duration = Duration::from_millis(500);
/// Weight of a new sample in the smoothed rate.
const SMOOTHING: f64 = 0.3;

/// One prefill node's measured rate, in prompt tokens per second.
#[derive(Debug, Clone, Default)]
pub struct PrefillRate {
    /// The start of the current busy window.
    window: Option<Mark>,
    /// Busy spells that ended (the node went idle) before they were
    /// [`RATE_WINDOW`] long, while no rate is measured: their time and the
    /// tokens done in them.
    short: (Duration, u64),
    tokens_per_s: Option<f64>,
}

/// A report's figures at the start of a window.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    /// Prompt tokens the router had sent the node (its own count).
    sent: u64,
    /// The node's queued prompt tokens.
    queued: u64,
    /// The node's `prompt_tokens_total` (falls when the node restarts).
    started: u64,
}

impl PrefillRate {
    /// Takes a load report that arrived at `now`; `sent` is how many prompt
    /// tokens the router has sent the node so far.
    pub fn on_report(&mut self, load: &NodeLoad, sent: u64, now: Instant) {
        let busy = load.queued > 0 || load.running > 0 || load.queued_prefill_tokens > 0;
        let mark = Mark {
            at: now,
            sent,
            queued: load.queued_prefill_tokens,
            started: load.prompt_tokens_total,
        };
        let Some(start) = self.window else {
            if busy {
                self.window = Some(mark);
            }
            return;
        };
        if mark.started < start.started {
            // The node restarted: its queue and totals began again.
            self.window = busy.then_some(mark);
            self.short = (Duration::ZERO, 0);
            return;
        }
        let elapsed = now.saturating_duration_since(start.at);
        let arrived = mark.sent.saturating_sub(start.sent);
        let done = (start.queued + arrived).saturating_sub(mark.queued);
        if elapsed >= RATE_WINDOW {
            // A window in which nothing finished says little when the node
            // holds one long prompt; it lowers the rate only if it was long.
            if done > 0 || elapsed >= RATE_WINDOW * 8 {
                self.sample(done, elapsed);
                self.window = busy.then_some(mark);
            }
        } else if !busy && self.tokens_per_s().is_none() {
            // A short spell: kept until the spells add up to a window.
            let (time, tokens) = self.short;
            let (time, tokens) = (time + elapsed, tokens.saturating_add(done));
            if time >= RATE_WINDOW && tokens > 0 {
                self.sample(tokens, time);
                self.short = (Duration::ZERO, 0);
            } else {
                self.short = (time, tokens);
            }
        }
        if !busy {
            self.window = None;
        }
    }

    /// Takes `done` tokens prefilled in `elapsed` into the smoothed rate.
    fn sample(&mut self, done: u64, elapsed: Duration) {
        let sample = done as f64 / elapsed.as_secs_f64();
        self.tokens_per_s = Some(match self.tokens_per_s {
            Some(r) => r + SMOOTHING * (sample - r),
            None => sample,
        });
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

/// A request's prompt tokens counted as pending prefill work from its
/// admission until a prefill node is given it (or the decode node will
/// prefill it): the nodes' reports cannot show it yet, and a burst admitted
/// at once would otherwise pass the backlog check and get KV waits as if the
/// queue were empty. Dropping it takes the tokens off the count.
#[derive(Debug)]
pub struct PendingTokens {
    counter: Arc<AtomicU64>,
    tokens: u64,
}

impl PendingTokens {
    /// Adds `tokens` to `counter` until dropped.
    pub fn new(counter: Arc<AtomicU64>, tokens: u64) -> Self {
        counter.fetch_add(tokens, Ordering::AcqRel);
        PendingTokens { counter, tokens }
    }
}

impl Drop for PendingTokens {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.tokens, Ordering::AcqRel);
    }
}

/// A decode reservation's KV wait: `base` plus the time the chosen prefill
/// node needs for `tokens_ahead` (its queue plus this prompt) at its rate,
/// at most `max` (and never below `base`); `max` while no rate is measured.
pub fn kv_wait(
    base: Duration,
    max: Duration,
    tokens_ahead: u64,
    tokens_per_s: Option<f64>,
) -> Duration {
    let Some(rate) = tokens_per_s.filter(|r| *r > 0.0) else {
        return max.max(base);
    };
    let ahead = Duration::try_from_secs_f64(tokens_ahead as f64 / rate).unwrap_or(Duration::MAX);
    base.saturating_add(ahead).min(max.max(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(queued: u32, queued_tokens: u64, started: u64) -> NodeLoad {
        NodeLoad {
            role: tandem_proto::v1::Role::Prefill as i32,
            queued,
            queued_prefill_tokens: queued_tokens,
            prompt_tokens_total: started,
            ..Default::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_rate_is_what_was_sent_less_what_is_still_queued() {
        let t = Instant::now();
        let mut r = PrefillRate::default();
        r.on_report(&load(0, 0, 0), 0, t);
        assert_eq!(r.tokens_per_s(), None, "idle: nothing to measure");
        // 800 tokens sent; the node starts them all at once (its
        // prompt_tokens_total jumps), which is not work done.
        r.on_report(&load(2, 800, 800), 800, t + ms(100));
        r.on_report(&load(2, 600, 800), 800, t + ms(300));
        assert_eq!(r.tokens_per_s(), None, "the window is too short yet");
        // 500 more sent, 800 queued: 500 done in 0.5 s.
        r.on_report(&load(3, 800, 1300), 1300, t + ms(600));
        assert_eq!(r.tokens_per_s(), Some(1000.0));
        // Smoothed towards the next sample (700 done in 0.5 s), not replaced by it.
        r.on_report(&load(1, 100, 1300), 1300, t + ms(1100));
        let rate = r.tokens_per_s().unwrap();
        assert!((rate - 1120.0).abs() < 1e-6, "{rate}");
    }

    #[test]
    fn idle_time_does_not_lower_the_rate() {
        let t = Instant::now();
        let mut r = PrefillRate::default();
        r.on_report(&load(1, 500, 500), 500, t);
        r.on_report(&load(0, 0, 500), 500, t + ms(500));
        assert_eq!(r.tokens_per_s(), Some(1000.0));
        // A minute idle, then busy again.
        r.on_report(&load(0, 0, 500), 500, t + ms(60_000));
        r.on_report(&load(1, 500, 1000), 1000, t + ms(60_100));
        r.on_report(&load(0, 0, 1000), 1000, t + ms(60_600));
        assert_eq!(r.tokens_per_s(), Some(1000.0));
    }

    #[test]
    fn short_busy_spells_add_up_to_a_sample() {
        // Prompts come a few at a time: the node is busy for 200 ms, idle,
        // busy again; no spell is a window long, together they are.
        let t = Instant::now();
        let mut r = PrefillRate::default();
        r.on_report(&load(1, 400, 400), 400, t);
        r.on_report(&load(0, 0, 400), 400, t + ms(200));
        r.on_report(&load(0, 0, 400), 400, t + ms(300));
        assert_eq!(r.tokens_per_s(), None, "200 ms is not a window");
        r.on_report(&load(1, 300, 700), 700, t + ms(400));
        r.on_report(&load(1, 100, 900), 900, t + ms(600));
        assert_eq!(r.tokens_per_s(), None, "another 200 ms: 400 ms in all");
        r.on_report(&load(0, 0, 900), 900, t + ms(700));
        // 400 + 500 tokens done in 200 + 300 ms of busy spells.
        assert_eq!(r.tokens_per_s(), Some(1800.0));
        // Measured: short spells no longer count, full windows do.
        r.on_report(&load(1, 1000, 1900), 1900, t + ms(800));
        r.on_report(&load(0, 0, 1900), 1900, t + ms(900));
        r.on_report(&load(1, 1000, 2900), 2900, t + ms(1000));
        r.on_report(&load(0, 0, 2900), 2900, t + ms(1100));
        assert_eq!(r.tokens_per_s(), Some(1800.0));
    }

    #[test]
    fn a_restarted_node_starts_a_new_window() {
        let t = Instant::now();
        let mut r = PrefillRate::default();
        r.on_report(&load(1, 9_000, 10_000), 10_000, t);
        // Restarted: its queue is empty, which is not 9,000 tokens done.
        r.on_report(&load(1, 300, 300), 10_300, t + ms(100));
        r.on_report(&load(1, 0, 300), 10_300, t + ms(700));
        assert_eq!(r.tokens_per_s(), Some(500.0));
    }

    #[test]
    fn kv_waits_grow_with_the_work_ahead_up_to_the_cap() {
        let base = Duration::from_secs(30);
        let max = Duration::from_secs(120);
        assert_eq!(
            kv_wait(base, max, 50_000, None),
            max,
            "no rate: the longest"
        );
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
    fn pending_tokens_count_until_dropped() {
        let counter = Arc::new(AtomicU64::new(0));
        let a = PendingTokens::new(counter.clone(), 300);
        let b = PendingTokens::new(counter.clone(), 200);
        assert_eq!(counter.load(Ordering::Acquire), 500);
        drop(a);
        assert_eq!(counter.load(Ordering::Acquire), 200);
        drop(b);
        assert_eq!(counter.load(Ordering::Acquire), 0);
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
