//! KV blocks taken as sequences grow, and given back under pressure.
//!
//! A sequence holds a block for each `block_size` tokens of its context: its
//! context's blocks from admission, one more before each step that writes
//! into a block it does not hold yet ([`Scheduler::grow_tables`]). When no
//! block is free, the newest sequence that runs or is prefilled here is
//! **preempted**, as in vLLM (recompute): its blocks are released (the full
//! ones stay named in the prefix cache, so most often they are taken back
//! by reference), and it waits, keeping its generation state (tokens,
//! sampler, stop conditions, what its stream was sent), to be prefilled here
//! again once blocks are free ([`Scheduler::resume_preempted`], oldest
//! first). Its stream sees only a pause. Preempted sequences go before new
//! requests: admission refuses while any waits.
//!
//! Sequences waiting for shipped KV are never preempted (their transfer
//! would be lost); the sequence that needs the block is itself a candidate,
//! so a step always finds one. A request whose prompt and `max_tokens` fit in
//! the cache alone therefore always finishes: the oldest sequence is
//! preempted only for its own growth, when nothing newer holds a block.

use tandem_engine::backend::Backend;
use tandem_engine::block_manager::{BlockHash, SequenceBlocks, blocks_for};

use super::Scheduler;
use crate::batch_plan::PlannedRow;
use crate::sequence::State;

impl<B: Backend> Scheduler<B> {
    /// Sequences preempted and waiting for blocks.
    pub(crate) fn preempted(&self) -> usize {
        self.seqs
            .values()
            .filter(|s| matches!(s.state, State::Preempted))
            .count()
    }

    /// `n` blocks for a sequence's context, the leading ones by reference
    /// from the prefix cache as far as `prefix` finds them, leaving at least
    /// one free block for each sequence that holds blocks here (the next one
    /// each fills), so that taking them rarely preempts anyone; or why not.
    pub(crate) fn take_blocks(
        &mut self,
        prefix: &[BlockHash],
        n: usize,
    ) -> Result<SequenceBlocks, String> {
        let holders = self.seqs.values().filter(|s| !s.table.is_empty()).count();
        self.blocks
            .allocate_sequence_leaving(prefix, n, holders)
            .map_err(|e| {
                format!("{e}, keeping one free for each of the {holders} sequences here to grow")
            })
    }

    /// Gives each row of `plan` the blocks its positions write into,
    /// preempting the newest sequences when none are free, and drops the
    /// rows of the sequences preempted.
    pub(super) fn grow_tables(&mut self, plan: &mut Vec<PlannedRow>) {
        let bs = self.backend.kv_layout().block_size;
        for r in plan.iter() {
            let needed = blocks_for(r.start + r.len, bs);
            while let Some(seq) = self.seqs.get(&r.id) {
                if matches!(seq.state, State::Preempted) || seq.table.len() >= needed {
                    break;
                }
                let more = needed - seq.table.len();
                if let Ok(blocks) = self.blocks.allocate(more) {
                    if let Some(seq) = self.seqs.get_mut(&r.id) {
                        seq.table.extend(blocks);
                    }
                    break;
                }
                // The newest candidate: `r`'s own sequence at worst.
                let Some(victim) = self
                    .seqs
                    .iter()
                    .rev()
                    .find(|(_, s)| s.preemptible())
                    .map(|(&id, _)| id)
                else {
                    break;
                };
                self.preempt(victim);
            }
        }
        plan.retain(|r| {
            self.seqs
                .get(&r.id)
                .is_some_and(|s| !matches!(s.state, State::Preempted))
        });
    }

    /// Releases sequence `id`'s blocks; it waits to be prefilled again.
    fn preempt(&mut self, id: u64) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let table = std::mem::take(&mut seq.table);
        seq.registered = 0;
        seq.state = State::Preempted;
        // Prompt log probabilities are computed again from the start.
        if let Some(scoring) = seq.prompt_logprobs.as_mut() {
            scoring.entries.clear();
        }
        let held = seq.held_first.take();
        let context_len = seq.generation.tokens().len();
        seq.span.in_scope(|| {
            tracing::info!(
                context_len,
                blocks = table.len(),
                "preempted: KV blocks given back; prefilled here again when blocks are free"
            )
        });
        self.release_blocks(&table);
        self.metrics.preempted();
        self.stats().preemptions_total += 1;
        // A first token held for a place in the batch goes out now: it was
        // computed, and the sequence's next token comes after its recompute.
        if let Some((event, _)) = held {
            self.emit(id, Ok(event));
        }
    }

    /// Takes blocks for the preempted sequences, oldest first, while they
    /// fit; each resumed one is prefilled here from the first block its
    /// context does not find in the prefix cache.
    pub(super) fn resume_preempted(&mut self) {
        let bs = self.backend.kv_layout().block_size;
        let waiting: Vec<u64> = (self.seqs.iter())
            .filter(|(_, s)| matches!(s.state, State::Preempted))
            .map(|(&id, _)| id)
            .collect();
        for id in waiting {
            let Some(seq) = self.seqs.get(&id) else {
                continue;
            };
            let tokens = seq.generation.tokens();
            let context_len = tokens.len();
            let (hashes, reusable) =
                self.reusable_prefix(&seq.hasher, tokens, seq.prompt_logprobs.is_some());
            let Ok(SequenceBlocks { table, cached }) =
                self.take_blocks(&hashes[..reusable], blocks_for(context_len, bs))
            else {
                break;
            };
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.span.in_scope(|| {
                    tracing::info!(
                        context_len,
                        cached_tokens = cached * bs,
                        "resumed after preemption"
                    )
                });
                seq.table = table;
                seq.hashes = hashes;
                seq.registered = cached;
                seq.state = State::Prefilling { done: cached * bs };
            }
        }
    }
}
