//! Which rows go into the decode node's next forward pass, with no I/O so the
//! policy is tested on its own (the engine loop in
//! [`scheduler`](crate::scheduler) runs the plan).
//!
//! A step holds at most `max_seqs` rows in at most `max_tokens` tokens:
//!
//! 1. first one row per running sequence (its last token, at its position),
//!    in the caller's order, so decoding never waits behind prompts;
//! 2. then, with what is left of the token budget, a chunk of each prompt
//!    being prefilled here (local prefill), in that order: the next
//!    `min(left to prefill, budget)` tokens.
//!
//! Sequences waiting for their KV from a prefill node, or preempted (holding
//! no blocks until they are prefilled again), take no row.

/// Where a sequence is, as the planner needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for its KV over QUIC: nothing to compute.
    AwaitingKv,
    /// Prefilled here; the first `done` context tokens are computed (or came
    /// from the prefix cache).
    Prefilling {
        /// Context tokens whose KV is written.
        done: usize,
    },
    /// Generating: its last token is fed next.
    Running,
    /// Gave its blocks back for others to grow: nothing to compute until it
    /// is prefilled again.
    Preempted,
}

/// One sequence, as the planner sees it. The caller lists them in the order
/// they take places in a step (the decode node: oldest first, those whose
/// first token waits for a place last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqView {
    /// The caller's key for the sequence.
    pub id: u64,
    /// Its phase.
    pub phase: Phase,
    /// Tokens of its context so far: prompt, tokens generated before a
    /// resume, and tokens generated here.
    pub context_len: usize,
}

/// How much one forward pass may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Most rows (sequences) in one pass (`decode.max_batch`).
    pub max_seqs: usize,
    /// Most tokens in one pass, decode tokens and prefill chunks together
    /// (`decode.max_batch_tokens`).
    pub max_tokens: usize,
}

/// What a planned row computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// The sequence's next token (its last token is fed).
    Decode,
    /// A chunk of a prompt prefilled here.
    Prefill {
        /// The chunk ends the context: the row's logits give the first token.
        completes: bool,
    },
}

/// One row of the next forward pass: context tokens `start..start + len` of
/// sequence `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRow {
    /// The sequence.
    pub id: u64,
    /// First context position fed.
    pub start: usize,
    /// Tokens fed (1 for a decode row).
    pub len: usize,
    /// What it computes.
    pub kind: RowKind,
}

impl PlannedRow {
    /// Whether a token is drawn from this row's logits.
    pub fn samples(&self) -> bool {
        matches!(
            self.kind,
            RowKind::Decode | RowKind::Prefill { completes: true }
        )
    }
}

/// Plans one forward pass over `seqs` (in the order they take places) within `limits`.
pub fn plan_step(seqs: &[SeqView], limits: StepLimits) -> Vec<PlannedRow> {
    let mut budget = limits.max_tokens;
    let mut rows = Vec::new();
    let full = |rows: &Vec<PlannedRow>, budget: usize| rows.len() >= limits.max_seqs || budget == 0;
    for s in seqs {
        if full(&rows, budget) {
            break;
        }
        if s.phase == Phase::Running && s.context_len > 0 {
            rows.push(PlannedRow {
                id: s.id,
                start: s.context_len - 1,
                len: 1,
                kind: RowKind::Decode,
            });
            budget -= 1;
        }
    }
    for s in seqs {
        if full(&rows, budget) {
            break;
        }
        if let Phase::Prefilling { done } = s.phase
            && done < s.context_len
        {
            let len = (s.context_len - done).min(budget);
            rows.push(PlannedRow {
                id: s.id,
                start: done,
                len,
                kind: RowKind::Prefill {
                    completes: done + len == s.context_len,
                },
            });
            budget -= len;
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(id: u64, context_len: usize) -> SeqView {
        SeqView {
            id,
            phase: Phase::Running,
            context_len,
        }
    }

    fn prefilling(id: u64, done: usize, context_len: usize) -> SeqView {
        SeqView {
            id,
            phase: Phase::Prefilling { done },
            context_len,
        }
    }

    fn limits(max_seqs: usize, max_tokens: usize) -> StepLimits {
        StepLimits {
            max_seqs,
            max_tokens,
        }
    }

    #[test]
    fn running_sequences_feed_their_last_token_before_any_prefill() {
        let seqs = [prefilling(1, 0, 10), running(2, 7), running(3, 3)];
        let rows = plan_step(&seqs, limits(8, 100));
        assert_eq!(
            rows,
            vec![
                PlannedRow {
                    id: 2,
                    start: 6,
                    len: 1,
                    kind: RowKind::Decode
                },
                PlannedRow {
                    id: 3,
                    start: 2,
                    len: 1,
                    kind: RowKind::Decode
                },
                PlannedRow {
                    id: 1,
                    start: 0,
                    len: 10,
                    kind: RowKind::Prefill { completes: true }
                },
            ]
        );
        assert!(rows.iter().all(PlannedRow::samples));
    }

    #[test]
    fn prefill_chunks_take_what_is_left_of_the_token_budget() {
        let seqs = [running(1, 5), prefilling(2, 4, 20), prefilling(3, 0, 8)];
        let rows = plan_step(&seqs, limits(8, 10));
        // 1 decode token, then 9 of prompt 2's 16 left; nothing for prompt 3.
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[1],
            PlannedRow {
                id: 2,
                start: 4,
                len: 9,
                kind: RowKind::Prefill { completes: false }
            }
        );
        assert!(!rows[1].samples());
        // The next step continues where the chunk ended.
        let seqs = [running(1, 6), prefilling(2, 13, 20), prefilling(3, 0, 8)];
        let rows = plan_step(&seqs, limits(8, 10));
        assert_eq!(rows[1].start, 13);
        assert_eq!(rows[1].len, 7);
        assert_eq!(rows[1].kind, RowKind::Prefill { completes: true });
        assert_eq!((rows[2].id, rows[2].len), (3, 2));
    }

    #[test]
    fn at_most_max_seqs_rows_and_max_tokens_tokens() {
        let seqs: Vec<SeqView> = (0..10).map(|i| running(i, 4)).collect();
        let rows = plan_step(&seqs, limits(3, 100));
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![0, 1, 2]);
        let rows = plan_step(&seqs, limits(100, 4));
        assert_eq!(rows.len(), 4);
        // Oldest first: the same sequences lead every step.
        assert_eq!(rows[0].id, 0);
    }

    #[test]
    fn sequences_awaiting_kv_take_no_row_and_nothing_plans_nothing() {
        let seqs = [SeqView {
            id: 1,
            phase: Phase::AwaitingKv,
            context_len: 50,
        }];
        assert!(plan_step(&seqs, limits(8, 100)).is_empty());
        assert!(plan_step(&[], limits(8, 100)).is_empty());
        assert!(plan_step(&[running(1, 3)], limits(8, 0)).is_empty());
    }

    #[test]
    fn token_budget_is_never_exceeded() {
        // Every mix of running and prefilling sequences, budgets 1..40.
        for max_tokens in 1..40 {
            for max_seqs in 1..6 {
                let seqs = [
                    prefilling(0, 3, 17),
                    running(1, 9),
                    prefilling(2, 0, 30),
                    running(3, 2),
                    prefilling(4, 15, 16),
                ];
                let rows = plan_step(&seqs, limits(max_seqs, max_tokens));
                let tokens: usize = rows.iter().map(|r| r.len).sum();
                assert!(tokens <= max_tokens);
                assert!(rows.len() <= max_seqs);
                assert!(rows.iter().all(|r| r.len > 0));
                let mut ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), rows.len(), "a sequence got two rows");
            }
        }
    }
}
