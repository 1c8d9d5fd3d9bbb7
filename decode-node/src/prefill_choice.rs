//! Where a prompt is prefilled: here, or on a prefill node whose KV is
//! shipped here (the link-cost decision, sans-I/O so it is tested on its own).
//!
//! Prefill here when:
//!
//! - the router forced it (no usable prefill node): `forced`;
//! - the request asks for the prompt's log probabilities, which need every
//!   position's logits: `prompt_logprobs`;
//! - the tokens not cached here are fewer than `local_prefill_below`:
//!   `short_prompt`;
//! - what shipping their KV adds to the time to first token exceeds what a
//!   local prefill costs, and a local prefill fits the running batch's TPOT
//!   budget: `link_slow`. Shipping adds the prefill node's queue estimate
//!   (from the router) and the part of the transfer (KV bytes / the
//!   measured rate from that peer) its compute does not hide (the prefill
//!   node is assumed to compute as fast as this node); a local prefill
//!   costs the uncached tokens at this node's measured prefill rate, after
//!   the local prefills already queued here (the backlog), which every
//!   running sequence waits out (spread over its chunks), so it is taken
//!   only when backlog and prompt together are within `tpot_budget` or
//!   nothing runs. Without the backlog a burst of prompts, each cheap
//!   alone, would all be kept here and queue behind one another on the
//!   node that is also decoding (measured on one H200 at 256 concurrent
//!   requests: 512 of 768 prompts kept, median TTFT 5.1 s).
//!
//! Otherwise the prompt goes to a prefill node: `remote`, or `tpot_budget`
//! when the link was slow but the running batch could not absorb the local
//! prefill; or it is prefilled here to measure this node's rate again
//! (`probe`) when that was last measured [`LOCAL_RATE_MAX_AGE`] or longer ago,
//! nothing runs or waits here, and the prompt takes at most [`PROBE_MAX`] here. The local rate is learned only from local
//! prefills, so one slow sample (a prefill under CPU contention) would
//! otherwise send every long prompt away for good, with no local prefill to
//! correct it. A peer whose link was never measured uses the configured default
//! rate; with none, it is assumed fast (remote), so a cluster starts
//! disaggregated and learns.

use std::time::Duration;

/// A local prefill rate older than this is measured again on an idle node.
pub const LOCAL_RATE_MAX_AGE: Duration = Duration::from_secs(30);

/// The longest local prefill (at the old rate) a probe takes: requests that
/// arrive meanwhile wait behind it, so a long prompt is never the probe (one
/// 6000-token prompt held a CPU node for over a minute).
pub const PROBE_MAX: Duration = Duration::from_secs(1);

/// Thresholds of the decision (`[decode]` keys).
#[derive(Debug, Clone, Copy)]
pub struct LinkPolicy {
    /// Fewer uncached tokens than this are prefilled here.
    pub local_prefill_below: usize,
    /// Weigh the link's cost at all (`decode.link_cost_prefill`).
    pub link_cost: bool,
    /// Rate assumed for a peer never measured, in bytes/s; `None`: fast.
    pub default_link_rate: Option<f64>,
    /// The stall a local prefill may add to the running batch.
    pub tpot_budget: Duration,
}

/// What is known when a request is admitted.
#[derive(Debug, Clone, Copy)]
pub struct PrefillFacts {
    /// The router found no usable prefill node.
    pub forced: bool,
    /// The request asks for the prompt's log probabilities, which only a
    /// local prefill computes.
    pub prompt_logprobs: bool,
    /// Context tokens whose KV is not held here.
    pub uncached_tokens: usize,
    /// Bytes of KV a prefill node would ship for them.
    pub kv_bytes: u64,
    /// Measured rate from the chosen prefill peer, bytes/s.
    pub link_rate: Option<f64>,
    /// The router's estimate of the wait in that peer's queue.
    pub remote_queue: Duration,
    /// Measured local prefill rate, tokens/s; `None`: not measured yet.
    pub local_rate: Option<f64>,
    /// How long ago the local rate was last sampled.
    pub local_rate_age: Duration,
    /// Prompt tokens already admitted for a local prefill here and not yet computed.
    pub local_backlog: usize,
    /// Sequences decoding here now.
    pub running: usize,
}

/// Why a prompt is prefilled where it is (the `reason` label of
/// `tandem_prefill_decisions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillReason {
    /// Local: the router found no prefill node.
    Forced,
    /// Local: the prompt's log probabilities are asked for.
    PromptLogprobs,
    /// Local: few tokens to compute.
    ShortPrompt,
    /// Local: the link would cost more than the local prefill.
    LinkSlow,
    /// Remote: the link is slow, but the running batch cannot absorb a local prefill.
    TpotBudget,
    /// Remote: the link pays.
    Remote,
    /// Local: the link pays by this node's rate, but that was measured long
    /// ago and nothing runs here: the prefill measures it again.
    Probe,
}

impl PrefillReason {
    /// Prefilled here?
    pub fn local(self) -> bool {
        matches!(
            self,
            Self::Forced | Self::PromptLogprobs | Self::ShortPrompt | Self::LinkSlow | Self::Probe
        )
    }

    /// The metric label and log field.
    pub fn label(self) -> &'static str {
        match self {
            Self::Forced => "forced",
            Self::PromptLogprobs => "prompt_logprobs",
            Self::ShortPrompt => "short_prompt",
            Self::LinkSlow => "link_slow",
            Self::TpotBudget => "tpot_budget",
            Self::Remote => "remote",
            Self::Probe => "probe",
        }
    }
}

/// The estimated times a decision compared (for the log line).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimates {
    /// Local time to the KV: the backlog's prefill, then this prompt's;
    /// `None` when not needed or the rate is unknown.
    pub local: Option<Duration>,
    /// Remote time to the KV's arrival: the queue, then the longer of the
    /// compute and the transfer at the link rate (they overlap layer by
    /// layer); `None` when not needed or the link is assumed fast.
    pub remote: Option<Duration>,
}

/// Decides where a prompt is prefilled.
pub fn choose(policy: &LinkPolicy, f: &PrefillFacts) -> (PrefillReason, Estimates) {
    if f.forced {
        return (PrefillReason::Forced, Estimates::default());
    }
    if f.prompt_logprobs {
        return (PrefillReason::PromptLogprobs, Estimates::default());
    }
    if f.uncached_tokens < policy.local_prefill_below {
        return (PrefillReason::ShortPrompt, Estimates::default());
    }
    if !policy.link_cost {
        return (PrefillReason::Remote, Estimates::default());
    }
    let (Some(link), Some(local_rate)) = (f.link_rate.or(policy.default_link_rate), f.local_rate)
    else {
        return (PrefillReason::Remote, Estimates::default());
    };
    if link <= 0.0 || local_rate <= 0.0 {
        return (PrefillReason::Remote, Estimates::default());
    }
    let local = Duration::from_secs_f64(f.uncached_tokens as f64 / local_rate);
    let local_wait = Duration::from_secs_f64(f.local_backlog as f64 / local_rate) + local;
    let transfer = Duration::from_secs_f64(f.kv_bytes as f64 / link);
    // The transfer overlaps the remote compute layer by layer: what
    // shipping adds to the time to first token is the queue and the part of
    // the transfer the compute does not hide.
    let ship_cost = f.remote_queue + transfer.saturating_sub(local);
    let est = Estimates {
        local: Some(local_wait),
        remote: Some(f.remote_queue + transfer.max(local)),
    };
    if ship_cost <= local_wait {
        let idle = f.running == 0 && f.local_backlog == 0;
        if idle && f.local_rate_age >= LOCAL_RATE_MAX_AGE && local <= PROBE_MAX {
            return (PrefillReason::Probe, est);
        }
        return (PrefillReason::Remote, est);
    }
    if f.running > 0 && local_wait > policy.tpot_budget {
        return (PrefillReason::TpotBudget, est);
    }
    (PrefillReason::LinkSlow, est)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: LinkPolicy = LinkPolicy {
        local_prefill_below: 32,
        link_cost: true,
        default_link_rate: None,
        tpot_budget: Duration::from_millis(50),
    };

    /// 1000 uncached tokens, 1 MB of KV, 20k tokens/s here (50 ms).
    fn facts(link_rate: Option<f64>) -> PrefillFacts {
        PrefillFacts {
            forced: false,
            prompt_logprobs: false,
            uncached_tokens: 1000,
            kv_bytes: 1_000_000,
            link_rate,
            remote_queue: Duration::ZERO,
            local_rate: Some(20_000.0),
            local_rate_age: Duration::from_secs(1),
            local_backlog: 0,
            running: 0,
        }
    }

    #[test]
    fn a_stale_local_rate_is_measured_again_on_an_idle_node() {
        // The link pays by a local rate measured long ago: an idle node
        // prefills here once to measure it again; a busy one does not.
        let stale = PrefillFacts {
            local_rate_age: LOCAL_RATE_MAX_AGE,
            ..facts(Some(1e9))
        };
        let (reason, _) = choose(&POLICY, &stale);
        assert_eq!(reason, PrefillReason::Probe);
        assert!(reason.local());
        for busy in [
            PrefillFacts {
                running: 1,
                ..stale
            },
            PrefillFacts {
                local_backlog: 100,
                ..stale
            },
        ] {
            assert_eq!(choose(&POLICY, &busy).0, PrefillReason::Remote);
        }
        // A prompt too long to hold the node for is not the probe.
        let long = PrefillFacts {
            uncached_tokens: 40_000,
            ..stale
        };
        assert_eq!(choose(&POLICY, &long).0, PrefillReason::Remote);
        // A slow link is link_slow whatever the age.
        let slow = PrefillFacts {
            link_rate: Some(1e6),
            ..stale
        };
        assert_eq!(choose(&POLICY, &slow).0, PrefillReason::LinkSlow);
    }

    #[test]
    fn a_fast_link_sends_long_prompts_to_the_prefill_node() {
        // 1 GB/s: 1 ms of transfer, hidden behind 50 ms of compute.
        let (reason, est) = choose(&POLICY, &facts(Some(1e9)));
        assert_eq!(reason, PrefillReason::Remote);
        assert!(!reason.local());
        assert_eq!(est.local, Some(Duration::from_millis(50)));
    }

    #[test]
    fn a_slow_link_prefills_here() {
        // 1 MB/s: a second on the wire against 50 ms of compute here.
        let (reason, est) = choose(&POLICY, &facts(Some(1e6)));
        assert_eq!(reason, PrefillReason::LinkSlow);
        assert!(reason.local());
        assert!(est.remote > est.local);
    }

    #[test]
    fn a_long_remote_queue_prefills_here_too() {
        let f = PrefillFacts {
            remote_queue: Duration::from_millis(200),
            ..facts(Some(1e9))
        };
        assert_eq!(choose(&POLICY, &f).0, PrefillReason::LinkSlow);
    }

    #[test]
    fn few_uncached_tokens_prefill_here_whatever_the_link() {
        let f = PrefillFacts {
            uncached_tokens: 31,
            ..facts(Some(1e12))
        };
        assert_eq!(choose(&POLICY, &f).0, PrefillReason::ShortPrompt);
        let forced = PrefillFacts {
            forced: true,
            ..facts(Some(1e12))
        };
        assert_eq!(choose(&POLICY, &forced).0, PrefillReason::Forced);
        // Only a local prefill computes every position's logits.
        let scored = PrefillFacts {
            prompt_logprobs: true,
            ..facts(Some(1e12))
        };
        assert_eq!(choose(&POLICY, &scored).0, PrefillReason::PromptLogprobs);
        assert!(PrefillReason::PromptLogprobs.local());
    }

    #[test]
    fn an_unmeasured_peer_uses_the_default_rate_or_is_assumed_fast() {
        assert_eq!(choose(&POLICY, &facts(None)).0, PrefillReason::Remote);
        let slow_default = LinkPolicy {
            default_link_rate: Some(1e6),
            ..POLICY
        };
        assert_eq!(
            choose(&slow_default, &facts(None)).0,
            PrefillReason::LinkSlow
        );
        // A measured peer's own rate wins over the default.
        assert_eq!(
            choose(&slow_default, &facts(Some(1e9))).0,
            PrefillReason::Remote
        );
    }

    #[test]
    fn a_busy_batch_keeps_a_long_local_prefill_off_its_tpot() {
        let f = PrefillFacts {
            running: 8,
            uncached_tokens: 4000, // 200 ms here, over the 50 ms budget
            ..facts(Some(1e5))
        };
        assert_eq!(choose(&POLICY, &f).0, PrefillReason::TpotBudget);
        // Within the budget the batch takes it.
        let small = PrefillFacts {
            running: 8,
            ..facts(Some(1e5))
        };
        assert_eq!(choose(&POLICY, &small).0, PrefillReason::LinkSlow);
    }

    #[test]
    fn local_prefills_already_queued_count_against_the_next() {
        // Alone, 1000 tokens fit the budget (50 ms); behind 1000 queued
        // tokens this prompt's KV is 100 ms away and the batch would stall
        // for both: it goes to the prefill node.
        let f = PrefillFacts {
            running: 8,
            local_backlog: 1000,
            ..facts(Some(1e5))
        };
        let (reason, est) = choose(&POLICY, &f);
        assert_eq!(reason, PrefillReason::TpotBudget);
        assert_eq!(est.local, Some(Duration::from_millis(100)));
        // With nothing running the backlog only adds to the local wait, which
        // the slow link still exceeds (10 s on the wire).
        let idle = PrefillFacts { running: 0, ..f };
        assert_eq!(choose(&POLICY, &idle).0, PrefillReason::LinkSlow);
        // A long backlog makes a moderately slow link pay: 30 ms of transfer
        // beyond the compute against 500 ms behind the backlog here.
        let queued = PrefillFacts {
            local_backlog: 9000,
            running: 0,
            ..facts(Some(1e6 / 0.08))
        };
        assert_eq!(choose(&POLICY, &queued).0, PrefillReason::Remote);
    }

    #[test]
    fn no_local_rate_yet_or_the_policy_off_means_remote() {
        let f = PrefillFacts {
            local_rate: None,
            ..facts(Some(1e3))
        };
        assert_eq!(choose(&POLICY, &f).0, PrefillReason::Remote);
        let off = LinkPolicy {
            link_cost: false,
            ..POLICY
        };
        assert_eq!(choose(&off, &facts(Some(1e3))).0, PrefillReason::Remote);
    }
}
