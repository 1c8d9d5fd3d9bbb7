//! Admission: whether the engine loop takes a request, where its KV comes
//! from, and what it answers (`Admitted`).
//!
//! Blocks for the context (prompt and tokens generated before) are taken at
//! admission; a sequence takes one more each time it fills one
//! ([`preemption`](crate::scheduler::preemption), which preempts the newest
//! sequence when none is free, as vLLM does). A request is refused
//! ([`Refusal::OutOfBlocks`], which the service answers `RESOURCE_EXHAUSTED`,
//! and the router tries elsewhere or later) while preempted sequences wait
//! for blocks (they go first), or when its blocks would leave fewer free
//! than one for each sequence here to grow into. A node whose cache holds
//! fewer tokens than the model's context serves the cache's size as its
//! context ([`Scheduler::max_context`]): a sequence ends there (`length`), so
//! one alone always fits.
//!
//! With the prefix cache on, the context's leading full blocks that this
//! node already holds are taken from the cache by reference (never the block
//! of the last token: its KV is computed with the first token's logits).
//! Then:
//!
//! - **Local prefill** when the router forced it, when the tokens *not*
//!   cached here are fewer than `decode.local_prefill_below` (a long prompt
//!   whose prefix is cached here needs no prefill node), or when shipping
//!   their KV from the router's prefill node would cost more time to first
//!   token than prefilling here ([`prefill_choice`](crate::prefill_choice),
//!   at the rates [`link_cost`](crate::link_cost) measures). Prefill starts
//!   after the cached blocks. The reason is logged and counted
//!   (`tandem_prefill_decisions_total{reason}`).
//! - **Otherwise a `KvTarget`** whose `cached_blocks` tells the prefill node
//!   to ship only the blocks after them; the reservation table counts the
//!   held blocks as received and refuses frames for them, and imported
//!   blocks land after them in the same block table.
//!
//! The sequence holds its references on the cached blocks from admission
//! until it ends, so the blocks the answer claims cannot be evicted before
//! the KV arrives: an allocation evicts only blocks nobody references
//! (`BlockManager::allocate_sequence`), and a node short of blocks refuses
//! new requests instead. This is what keeps a claim true; nothing re-checks it.

use std::time::{Duration, Instant};

use tandem_cluster::kv_dtype::{wire_dtype, wire_to_pb};
use tandem_engine::Generation;
use tandem_engine::GenerationParams;
use tandem_engine::backend::Backend;
use tandem_engine::block_manager::{BlockHash, SequenceBlocks, blocks_for};
use tandem_engine::prefix_hash::PrefixHasher;
use tandem_kv_transfer::Expectation;
use tandem_proto::v1 as pb;
use tandem_telemetry::names;
use tokio::sync::mpsc;

use crate::errors::Refusal;
use crate::prefill_choice::{PrefillFacts, choose};
use crate::scheduler::{Event, Scheduler};
use crate::seq_spans::SeqSpans;
use crate::sequence::{PromptScoring, Sequence, State};

/// A request to admit.
pub struct Admission {
    /// The request's key: its id and attempt (`tandem_proto::attempt_key`).
    pub request_id: String,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Tokens generated before, on a node that failed (see `DecodeRequest.generated`).
    pub generated: Vec<u32>,
    /// The prompt's log probabilities with this many top tokens each
    /// (`DecodeRequest.prompt_logprobs`): the prompt is prefilled here, whole.
    pub prompt_logprobs: Option<usize>,
    /// Sampling and stop conditions.
    pub params: GenerationParams,
    /// Prefill here whatever the prompt's length (the router found no prefill node).
    pub force_local: bool,
    /// How long to wait for remote KV: for its first frame, and after each.
    pub kv_timeout: Duration,
    /// The prefill node the router will use for a remote prefill (empty:
    /// unknown); its measured link rate weighs the decision.
    pub prefill_peer: String,
    /// The router's estimate of the wait in that node's queue.
    pub prefill_queue: Duration,
    /// vLLM's `cache_salt` (empty: none): the prompt's blocks are looked up
    /// and named in the prefix cache from it.
    pub cache_salt: String,
    /// The response stream.
    pub events: mpsc::Sender<Event>,
    /// The request's span (carrying its id); the loop logs the request's events in it.
    pub span: tracing::Span,
}

impl<B: Backend> Scheduler<B> {
    /// The hashes of `context`'s full blocks (none with the prefix cache
    /// off), and how many leading ones a sequence may take from the cache:
    /// never the block of the last token (its KV is computed with the next
    /// token's logits), and none when every position's logits are needed
    /// (prompt log probabilities; the blocks are still named in the cache,
    /// for later prompts).
    pub(crate) fn reusable_prefix(
        &self,
        hasher: &PrefixHasher,
        context: &[u32],
        every_logit: bool,
    ) -> (Vec<BlockHash>, usize) {
        if !self.blocks.caching() {
            return (Vec::new(), 0);
        }
        let hashes = hasher.full_blocks(context);
        let reusable = if every_logit {
            0
        } else {
            (context.len().saturating_sub(1) / hasher.block_size()).min(hashes.len())
        };
        (hashes, reusable)
    }

    /// Admits `a` or says why not; on success the `Admitted` message is on
    /// its stream and the sequence is in the loop.
    pub(crate) fn admit(&mut self, a: Admission) -> Result<(), Refusal> {
        let model = self.model.clone();
        let config = &model.config;
        if self.by_request.contains_key(&a.request_id) {
            return Err(Refusal::AlreadyRunning(a.request_id));
        }
        let context_len = a.prompt.len() + a.generated.len();
        let max_context = self.max_context();
        if context_len >= max_context {
            return Err(Refusal::ContextFull {
                context_len,
                max_context,
            });
        }
        if a.prompt_logprobs.is_some() && !self.backend.computes_every_logit() {
            return Err(Refusal::InvalidRequest(
                "prompt_logprobs is not supported on this decode node: its backend computes only the last token's logits of a prompt (the CPU backend computes them all)".into(),
            ));
        }
        let layout = self.backend.kv_layout();
        let bs = layout.block_size;
        // The KV a prefill computes covers the prompt and the tokens generated before.
        let hasher = self.hasher.with_cache_salt(&a.cache_salt);
        let mut context = a.prompt.clone();
        context.extend_from_slice(&a.generated);
        let (hashes, reusable) =
            self.reusable_prefix(&hasher, &context, a.prompt_logprobs.is_some());
        let generation = Generation::resume(
            a.prompt,
            &a.generated,
            a.params,
            &config.eos_token_ids,
            &model.tokenizer,
        )
        .map_err(|e| Refusal::InvalidRequest(e.to_string()))?;
        let preempted = self.preempted();
        if preempted > 0 {
            return Err(Refusal::OutOfBlocks(format!(
                "{preempted} preempted sequences wait for KV blocks here"
            )));
        }
        let SequenceBlocks { table, cached } = self
            .take_blocks(&hashes[..reusable], blocks_for(context_len, bs))
            .map_err(Refusal::OutOfBlocks)?;
        // From here the sequence holds a reference on each of its `cached`
        // leading blocks until `remove` (or its preemption, which a sequence
        // waiting for shipped KV is spared): they cannot be evicted meanwhile.
        let cached_tokens = cached * bs;
        let prompt_blocks = blocks_for(context_len, bs);
        let facts = PrefillFacts {
            forced: a.force_local,
            prompt_logprobs: a.prompt_logprobs.is_some(),
            uncached_tokens: context_len - cached_tokens,
            kv_bytes: (prompt_blocks.saturating_sub(cached)
                * layout.block_bytes()
                * layout.num_layers) as u64,
            link_rate: match a.prefill_peer.as_str() {
                "" => None,
                peer => self.links.lock().rate(peer),
            },
            remote_queue: a.prefill_queue,
            local_rate: self.local_rate.tokens_per_s(),
            local_rate_age: self.local_rate.age(),
            local_backlog: self.seqs.values().map(Sequence::prefill_left).sum(),
            running: self
                .seqs
                .values()
                .filter(|s| matches!(s.state, State::Running))
                .count(),
        };
        let (reason, estimates) = choose(&self.policy, &facts);
        let local = reason.local();
        let transfer_id = self.next_transfer_id;
        self.next_transfer_id += 1;
        let mut admitted = pb::Admitted {
            local_prefill: local,
            kv_target: None,
        };
        let state = if local {
            State::Prefilling {
                done: cached_tokens,
            }
        } else {
            let expect = Expectation {
                num_layers: layout.num_layers as u32,
                num_blocks: prompt_blocks as u32,
                block_bytes: layout.block_bytes() as u64,
                dtype: wire_dtype(layout.dtype),
                total_heads: layout.num_kv_heads as u16,
                head_dim: layout.head_dim as u16,
                block_size: bs as u16,
                held_blocks: cached as u32,
            };
            let registered = self.reservations().register(transfer_id, expect);
            if let Err(e) = registered {
                self.release_blocks(&table);
                return Err(Refusal::Reservation(e));
            }
            admitted.kv_target = Some(pb::KvTarget {
                quic_addr: self.kv.quic_addr.clone(),
                quic_addrs: self.kv.quic_addrs.clone(),
                server_name: self.kv.server_name.clone(),
                server_cert_der: self.kv.cert_der.clone(),
                num_blocks: prompt_blocks as u32,
                block_size: bs as u32,
                num_layers: layout.num_layers as u32,
                num_kv_heads: layout.num_kv_heads as u32,
                head_dim: layout.head_dim as u32,
                dtype: wire_to_pb(wire_dtype(layout.dtype)) as i32,
                transfer_id,
                cached_blocks: cached as u32,
                model_fingerprint: self.kv.model_fingerprint.clone(),
            });
            State::AwaitingKv {
                deadline: Instant::now() + a.kv_timeout,
                patience: a.kv_timeout,
            }
        };
        let message = pb::DecodeResponse {
            event: Some(pb::decode_response::Event::Admitted(admitted)),
        };
        if a.events.try_send(Ok(message)).is_err() {
            self.release_blocks(&table);
            self.reservations().release(transfer_id);
            return Err(Refusal::CallerGone);
        }
        let skipped_bytes = if local {
            0
        } else {
            (cached * layout.block_bytes() * layout.num_layers) as u64
        };
        // The loop serves every request on one thread: it enters the
        // request's span for the lines it logs about it.
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        a.span.in_scope(|| {
            tracing::info!(
                transfer_id,
                prompt_len = context_len,
                cached_tokens,
                local,
                reason = reason.label(),
                prefill_peer = %a.prefill_peer,
                link_mbps = facts.link_rate.map(|r| r * 8e-6),
                local_estimate_ms = ms(estimates.local),
                remote_estimate_ms = ms(estimates.remote),
                skipped_bytes,
                "admitted"
            )
        });
        metrics::counter!(names::PREFILL_DECISIONS_TOTAL, names::REASON => reason.label())
            .increment(1);
        if !local && !a.prefill_peer.is_empty() {
            self.links.lock().expect(transfer_id, &a.prefill_peer);
        }
        {
            let mut stats = self.stats();
            if local {
                stats.local_prompt_tokens_total += context_len as u64;
                stats.cached_tokens_total += cached_tokens as u64;
            }
            stats.kv_skipped_bytes_total += skipped_bytes;
        }
        if local {
            self.metrics.prefix_lookup(context_len, cached_tokens);
        } else {
            self.metrics.kv_skipped(skipped_bytes);
        }
        self.by_request.insert(a.request_id.clone(), transfer_id);
        self.seqs.insert(
            transfer_id,
            Sequence {
                request_id: a.request_id,
                generation,
                table,
                hasher,
                hashes,
                registered: cached,
                cached_tokens,
                local,
                state,
                events: a.events,
                span: a.span,
                spans: SeqSpans::new(Instant::now()),
                first_token_at: None,
                answered: false,
                held_first: None,
                prompt_logprobs: a.prompt_logprobs.map(|top_n| PromptScoring {
                    top_n,
                    entries: Vec::new(),
                }),
            },
        );
        Ok(())
    }
}
