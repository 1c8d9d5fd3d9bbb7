//! Circuit breakers, one per node: whether the router may send a node work.
//!
//! A breaker is *closed* while the node works; `failures` failures of the
//! node in a row (a broken stream, no answer, a protocol violation, a load
//! stream that cannot be opened) *open* it: the node gets no requests for
//! `open` (doubling, up to [`OPEN_MAX`], each time a probe fails). Once that
//! time is past, the node's next load report is the first probe: the node
//! answers again, so the breaker turns *half-open* and lets `probes` trial
//! requests through. A trial that succeeds closes the breaker; one that
//! fails opens it again. A trial that ends without a verdict (its client
//! went away) frees its slot after another `open`.
//!
//! Only failures *of the node* count: a refusal of one request (out of KV
//! blocks, a bad argument), an attempt conflict or a KV wait that expired
//! under overload are not the node's fault, and the caller does not report
//! them (see [`crate::error::RouterError::blames_node`]).
//!
//! The state machine is sans-I/O: every method takes the time, so tests
//! drive it with a made-up clock. [`crate::nodes::NodePool`] holds one per
//! node and exports its state as `tandem_router_breaker_state{node,role}`.

use std::time::{Duration, Instant};

/// The longest a breaker stays open before the next probe.
pub const OPEN_MAX: Duration = Duration::from_secs(60);

/// A breaker's settings (`[router] breaker_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker (at least 1).
    pub failures: u32,
    /// How long the breaker first stays open.
    pub open: Duration,
    /// Trial requests let through while half-open (at least 1).
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 3,
            open: Duration::from_secs(5),
            probes: 1,
        }
    }
}

/// The three states, as shown in metrics and `tandem status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// The node gets work.
    Closed,
    /// The node gets a bounded number of trial requests.
    HalfOpen,
    /// The node gets no work.
    Open,
}

impl BreakerState {
    /// The value of the `tandem_router_breaker_state` gauge: 0 closed,
    /// 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }

    /// Lower-case name, for logs and the status listing.
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Open => "open",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        /// How long it was opened for (doubles on a failed probe).
        open_for: Duration,
    },
    HalfOpen {
        /// Trials sent in the current window.
        trials: u32,
        /// When the current window of trials began.
        window: Instant,
        open_for: Duration,
    },
}

/// One node's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Inner,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config: BreakerConfig {
                failures: config.failures.max(1),
                probes: config.probes.max(1),
                ..config
            },
            inner: Inner::Closed { failures: 0 },
        }
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
        }
    }

    /// Whether a request may be sent to the node at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        match self.inner {
            Inner::Closed { .. } => true,
            Inner::Open { .. } => false,
            Inner::HalfOpen { trials, window, .. } => {
                trials < self.config.probes || now >= window + self.config.open
            }
        }
    }

    /// A request was sent to the node: while half-open, it takes a trial slot.
    pub fn on_sent(&mut self, now: Instant) {
        if let Inner::HalfOpen {
            trials,
            window,
            open_for,
        } = self.inner
        {
            self.inner = if now >= window + self.config.open {
                // The earlier trials never came back with a verdict.
                Inner::HalfOpen {
                    trials: 1,
                    window: now,
                    open_for,
                }
            } else {
                Inner::HalfOpen {
                    trials: trials.saturating_add(1),
                    window,
                    open_for,
                }
            };
        }
    }

    /// A load report arrived: past the open time, the node is probed.
    /// Returns the new state when it changed.
    pub fn on_report(&mut self, now: Instant) -> Option<BreakerState> {
        match self.inner {
            Inner::Open { until, open_for } if now >= until => {
                self.inner = Inner::HalfOpen {
                    trials: 0,
                    window: now,
                    open_for,
                };
                Some(BreakerState::HalfOpen)
            }
            _ => None,
        }
    }

    /// The node served a request (or answered one as a healthy node does).
    /// Returns the new state when it changed.
    pub fn on_success(&mut self) -> Option<BreakerState> {
        let changed = !matches!(self.inner, Inner::Closed { .. });
        self.inner = Inner::Closed { failures: 0 };
        changed.then_some(BreakerState::Closed)
    }

    /// The node failed at `now`. Returns the new state when it changed.
    pub fn on_failure(&mut self, now: Instant) -> Option<BreakerState> {
        match self.inner {
            Inner::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.config.failures {
                    self.open(now, self.config.open);
                    Some(BreakerState::Open)
                } else {
                    self.inner = Inner::Closed { failures };
                    None
                }
            }
            Inner::HalfOpen { open_for, .. } => {
                self.open(now, (open_for * 2).min(OPEN_MAX));
                Some(BreakerState::Open)
            }
            // Already open: more failures of requests sent before it opened
            // (or of its load stream) do not push the probe further away.
            Inner::Open { .. } => None,
        }
    }

    fn open(&mut self, now: Instant, open_for: Duration) {
        self.inner = Inner::Open {
            until: now + open_for,
            open_for,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failures: 2,
            open: Duration::from_secs(5),
            probes: 1,
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn opens_after_failures_in_a_row_only() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        assert_eq!(b.on_failure(t), None);
        // A success in between resets the count.
        assert_eq!(b.on_success(), None);
        assert_eq!(b.on_failure(t), None);
        assert!(b.allows(t));
        assert_eq!(b.on_failure(t), Some(BreakerState::Open));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allows(t));
        assert!(!b.allows(t + s(100)), "open until a report probes it");
    }

    #[test]
    fn a_report_after_the_open_time_half_opens_and_a_success_closes() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        b.on_failure(t);
        b.on_failure(t);
        // A report before the open time is up changes nothing.
        assert_eq!(b.on_report(t + s(4)), None);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.on_report(t + s(5)), Some(BreakerState::HalfOpen));
        let now = t + s(5);
        assert!(b.allows(now));
        b.on_sent(now);
        // One trial at a time.
        assert!(!b.allows(now));
        assert_eq!(b.on_success(), Some(BreakerState::Closed));
        assert!(b.allows(now));
    }

    #[test]
    fn a_failed_trial_reopens_for_twice_as_long() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        b.on_failure(t);
        b.on_failure(t);
        b.on_report(t + s(5));
        b.on_sent(t + s(5));
        assert_eq!(b.on_failure(t + s(6)), Some(BreakerState::Open));
        assert_eq!(b.on_report(t + s(15)), None, "10 s, not 5");
        assert_eq!(b.on_report(t + s(16)), Some(BreakerState::HalfOpen));
    }

    #[test]
    fn the_open_time_is_capped() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        b.on_failure(t);
        b.on_failure(t);
        let mut now = t;
        for _ in 0..20 {
            now += OPEN_MAX;
            assert_eq!(b.on_report(now), Some(BreakerState::HalfOpen));
            assert_eq!(b.on_failure(now), Some(BreakerState::Open));
        }
        assert_eq!(b.on_report(now + OPEN_MAX), Some(BreakerState::HalfOpen));
    }

    #[test]
    fn failures_while_open_do_not_delay_the_probe() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.on_failure(t + s(4)), None);
        assert_eq!(b.on_report(t + s(5)), Some(BreakerState::HalfOpen));
    }

    #[test]
    fn a_trial_without_verdict_frees_its_slot_after_the_open_time() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            probes: 2,
            ..config()
        });
        b.on_failure(t);
        b.on_failure(t);
        b.on_report(t + s(5));
        b.on_sent(t + s(5));
        b.on_sent(t + s(6));
        assert!(!b.allows(t + s(7)));
        assert!(b.allows(t + s(10)));
        b.on_sent(t + s(10));
        assert!(b.allows(t + s(10)), "a new window of two trials");
    }

    #[test]
    fn settings_below_one_are_one() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            failures: 0,
            probes: 0,
            ..config()
        });
        assert_eq!(b.on_failure(t), Some(BreakerState::Open));
        b.on_report(t + s(5));
        assert!(b.allows(t + s(5)));
    }
}
