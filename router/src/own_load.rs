//! A node's load as one router can best tell it: the node's last load
//! report, corrected by what the router itself saw happen since.
//!
//! A report is a picture taken up to one report interval ago. Taken alone
//! it keeps a node busy after its work is done: a burst that arrives right
//! after the previous one finished is refused whole by the prefill-backlog
//! bound (`router.max_prefill_backlog_s`) for a queue that no longer exists,
//! and a conversation's next turn is steered away from the decode node
//! holding its history because that node still "runs" the turn before. The
//! router knows its own part of every figure exactly, though: what its
//! requests at the node add (prompt tokens, KV blocks, one sequence), from
//! the moment it sends one until it sees the node done with it (the prefill
//! node answered or the decode node has the KV; the decode node finished;
//! or the router gave the request up and cancelled it there). So each
//! figure is the report with the router's own part replaced by what the
//! router knows now:
//!
//! ```text
//! others   = reported - ours when the report came (at least 0)
//! estimate = min(reported + sent since the report, others + ours now)
//! ```
//!
//! The first term is the report as it stood, plus what was sent after it
//! (in no report yet: a burst between reports spreads over the nodes); the
//! second drops the router's requests that finished since and keeps what
//! other routers' requests held. "Ours when the report came" also counts
//! the requests finished since the report before it: a report can be built
//! before a request finished and arrive after the router heard of the
//! finish (the two travel separately), and that request must not be taken
//! for another router's work. The price, with several routers, is that for
//! one report interval their work may be undercounted by as much as this
//! router finished in that interval; with one router, a finished request
//! never counts.
//!
//! Sans-I/O: the node pool feeds it sends, finishes and reports.

use tandem_proto::v1::NodeLoad;

/// One additive load figure of a node (prompt tokens queued, KV blocks in
/// use, sequences), as reported and as this router saw it change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figure {
    /// The last report's value.
    reported: u64,
    /// Added by this router's requests sent since the last report.
    sent_since_report: u64,
    /// Held by this router's requests the node is not done with.
    ours: u64,
    /// The part of the last report this router's requests may account for.
    ours_in_report: u64,
    /// Released by this router's requests finished since the last report.
    done_since_report: u64,
}

impl Figure {
    /// A request adding `n` was sent to the node.
    pub fn on_sent(&mut self, n: u64) {
        self.sent_since_report = self.sent_since_report.saturating_add(n);
        self.ours = self.ours.saturating_add(n);
    }

    /// The node is done with a request sent earlier that added `n`.
    pub fn on_done(&mut self, n: u64) {
        self.ours = self.ours.saturating_sub(n);
        self.done_since_report = self.done_since_report.saturating_add(n);
    }

    /// A request sent earlier that added `n` was refused: the node never
    /// held it, as if it had not been sent.
    pub fn on_refused(&mut self, n: u64) {
        self.ours = self.ours.saturating_sub(n);
        self.sent_since_report = self.sent_since_report.saturating_sub(n);
    }

    /// A load report says the figure is `value`.
    pub fn on_report(&mut self, value: u64) {
        self.reported = value;
        self.sent_since_report = 0;
        self.ours_in_report = self.ours.saturating_add(self.done_since_report);
        self.done_since_report = 0;
    }

    /// The estimate, but never less than this router's own part: a report
    /// built before the node took requests this router had already sent
    /// (reports and answers travel separately) resets what was sent since,
    /// and the estimate alone can then fall below what this router holds
    /// there. For a bound that must hold, not for ranking.
    pub fn at_least_ours(&self) -> u64 {
        self.value().max(self.ours)
    }

    /// The estimate of the figure now.
    pub fn value(&self) -> u64 {
        let as_reported = self.reported.saturating_add(self.sent_since_report);
        let others = self.reported.saturating_sub(self.ours_in_report);
        as_reported.min(others.saturating_add(self.ours))
    }
}

/// What one request of this router adds to a node's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Share {
    /// Prompt tokens to prefill (its prompt and any tokens generated before a re-run).
    pub tokens: u64,
    /// KV blocks those tokens take at the node's block size.
    pub blocks: u64,
}

/// A node's load figures that reports and this router's requests both move.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnLoad {
    /// Prompt tokens queued or being prefilled (`queued_prefill_tokens`).
    queued_tokens: Figure,
    /// KV blocks in use (`kv_blocks_total - kv_blocks_free`).
    kv_blocks: Figure,
    /// Sequences or jobs running or queued (`running + queued`).
    sequences: Figure,
}

impl OwnLoad {
    /// A request adding `share` was sent to the node.
    pub fn on_sent(&mut self, share: Share) {
        self.queued_tokens.on_sent(share.tokens);
        self.kv_blocks.on_sent(share.blocks);
        self.sequences.on_sent(1);
    }

    /// The node is done with a request sent earlier with `share`.
    pub fn on_done(&mut self, share: Share) {
        self.queued_tokens.on_done(share.tokens);
        self.kv_blocks.on_done(share.blocks);
        self.sequences.on_done(1);
    }

    /// A request sent earlier with `share` was refused: the node never held it.
    pub fn on_refused(&mut self, share: Share) {
        self.queued_tokens.on_refused(share.tokens);
        self.kv_blocks.on_refused(share.blocks);
        self.sequences.on_refused(1);
    }

    /// Takes a load report's figures.
    pub fn on_report(&mut self, load: &NodeLoad) {
        self.queued_tokens.on_report(load.queued_prefill_tokens);
        let used = load.kv_blocks_total.saturating_sub(load.kv_blocks_free);
        self.kv_blocks.on_report(u64::from(used));
        self.sequences
            .on_report(u64::from(load.running) + u64::from(load.queued));
    }

    /// Sequences or jobs running or queued at the node now, never fewer
    /// than this router's own ([`Figure::at_least_ours`]).
    pub fn sequences(&self) -> u64 {
        self.sequences.at_least_ours()
    }

    /// Prompt tokens queued or being prefilled at the node now.
    pub fn queued_tokens(&self) -> u64 {
        self.queued_tokens.value()
    }

    /// `load` (the node's last report) with the estimates in place of its
    /// figures: each moved by the estimate's difference from the report.
    pub fn corrected(&self, load: &NodeLoad) -> NodeLoad {
        let to_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let reported_used = load.kv_blocks_total.saturating_sub(load.kv_blocks_free);
        let used = to_u32(self.kv_blocks.value());
        let kv_blocks_free = if used >= reported_used {
            load.kv_blocks_free.saturating_sub(used - reported_used)
        } else {
            load.kv_blocks_free.saturating_add(reported_used - used)
        };
        let reported_sequences = load.running.saturating_add(load.queued);
        let sequences = to_u32(self.sequences.value());
        let (running, queued) = if sequences >= reported_sequences {
            (
                load.running,
                load.queued.saturating_add(sequences - reported_sequences),
            )
        } else {
            // Fewer than reported: the queued ones went first, then running ones.
            let gone = reported_sequences - sequences;
            let queued = load.queued.saturating_sub(gone);
            let running = load.running.saturating_sub(gone - (load.queued - queued));
            (running, queued)
        };
        NodeLoad {
            queued_prefill_tokens: self.queued_tokens.value(),
            kv_blocks_free,
            running,
            queued,
            ..load.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_from_before_the_queue_drained_does_not_outlive_the_answers() {
        // The overload test's wave boundary: the last report still shows
        // the last prompts, then their answers come, then a burst arrives
        // before the next report.
        let mut q = Figure::default();
        q.on_sent(200);
        q.on_sent(200);
        q.on_report(300); // one started, 100 of it done
        assert_eq!(q.value(), 300);
        q.on_done(200);
        assert_eq!(q.value(), 200, "at most what is still ours");
        q.on_done(200);
        assert_eq!(q.value(), 0, "everything answered: nothing queued");
    }

    #[test]
    fn a_finish_that_overtakes_the_report_counting_it_is_not_anothers_work() {
        let mut q = Figure::default();
        q.on_sent(200);
        q.on_report(200);
        // The node finishes it and builds its next report before the
        // router hears of the finish; the finish arrives first.
        q.on_done(200);
        q.on_report(200);
        assert_eq!(q.value(), 0);
        // The report after that has nothing: still nothing.
        q.on_report(0);
        assert_eq!(q.value(), 0);
    }

    #[test]
    fn what_was_sent_since_the_report_counts_until_a_report_has_it() {
        let mut q = Figure::default();
        q.on_report(0);
        q.on_sent(500);
        assert_eq!(q.value(), 500);
        q.on_report(450);
        assert_eq!(q.value(), 450, "the node's own figure once it has it");
        q.on_sent(100);
        assert_eq!(q.value(), 550);
    }

    #[test]
    fn a_report_from_before_the_node_took_our_requests_never_counts_fewer_than_ours() {
        // Three sent, one answered; then a report built before the node had
        // admitted any of them arrives.
        let mut q = Figure::default();
        q.on_report(0);
        for _ in 0..3 {
            q.on_sent(1);
        }
        q.on_done(1);
        q.on_sent(1);
        q.on_report(0);
        assert_eq!(q.value(), 0, "the estimate alone trusts the report");
        assert_eq!(q.at_least_ours(), 3, "three of ours are there");
    }

    #[test]
    fn a_refused_request_never_counted() {
        let mut q = Figure::default();
        q.on_report(100);
        q.on_sent(50);
        assert_eq!(q.value(), 150);
        q.on_refused(50);
        assert_eq!(q.value(), 100);
        q.on_report(100);
        assert_eq!(q.value(), 100, "the next report is all the others'");
    }

    #[test]
    fn other_routers_work_stays_counted() {
        let mut q = Figure::default();
        // 1,000 tokens from elsewhere, then 300 of ours.
        q.on_report(1000);
        q.on_sent(300);
        assert_eq!(q.value(), 1300);
        q.on_report(1300);
        assert_eq!(q.value(), 1300);
        // Ours finished: the others' part of the last report remains.
        q.on_done(300);
        assert_eq!(q.value(), 1000);
        // A report built after ours finished: for one report interval
        // ours may be taken for part of it (the price of never counting a
        // finished request), then it is all the others'.
        q.on_report(900);
        assert_eq!(q.value(), 600);
        q.on_report(900);
        assert_eq!(q.value(), 900);
    }

    fn decode_load(free: u32, running: u32, queued: u32) -> NodeLoad {
        NodeLoad {
            kv_blocks_total: 256,
            kv_blocks_free: free,
            running,
            queued,
            block_size: 16,
            ..Default::default()
        }
    }

    #[test]
    fn a_decode_node_that_finished_our_turn_is_idle_before_its_next_report() {
        // The kv_routing test's back-to-back turns: the report still shows
        // the last turn running when the next turn is routed.
        let share = Share {
            tokens: 244,
            blocks: 16,
        };
        let mut own = OwnLoad::default();
        own.on_report(&decode_load(256, 0, 0));
        own.on_sent(share);
        let seen = own.corrected(&decode_load(256, 0, 0));
        assert_eq!(
            (seen.kv_blocks_free, seen.running, seen.queued),
            (240, 0, 1)
        );
        let report = decode_load(240, 1, 0);
        own.on_report(&report);
        own.on_done(share);
        let seen = own.corrected(&report);
        assert_eq!(
            (seen.kv_blocks_free, seen.running, seen.queued),
            (256, 0, 0)
        );
        assert_eq!(seen.queued_prefill_tokens, 0);
    }
}
