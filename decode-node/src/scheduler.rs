//! The decode node's engine loop: continuous batching at iteration level.
//!
//! One std thread owns the backend (model + KV cache), the block manager and
//! every sequence; everything else talks to it through [`Command`]s. Each
//! iteration it takes new commands, then runs one forward pass over
//!
//! - every running sequence's next token (at most `max_batch` of them), and
//! - chunks of prompts it prefills itself (short prompts), within the token budget.
//!
//! A sequence whose KV comes from a prefill node joins the batch at the next
//! iteration after its last layer has landed and its first token arrived; a
//! finished one leaves at once and its blocks are free for the next request.
//!
//! Blocks for a whole request (prompt + `max_tokens`, capped at the context)
//! are taken when it is admitted, so a running sequence never runs out: when
//! the cache is full, new requests are refused (`RESOURCE_EXHAUSTED`) and the
//! router tries elsewhere or later. Nothing waits for memory, so nothing deadlocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_cluster::convert::{finish_reason_to_pb, logprobs_to_pb};
use tandem_engine::backend::Backend;
use tandem_engine::block_manager::{BlockHash, BlockId, BlockManager, SequenceBlocks, blocks_for};
use tandem_engine::kv_events::KvEventLog;
use tandem_engine::prefix_hash::PrefixHasher;
use tandem_engine::{Generation, GenerationParams, ModelDir, SeqChunk, TokenDraw, TokenEvent};
use tandem_kv_transfer::{Expectation, Reservations, WireDtype};
use tandem_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::node_metrics::DecodeMetrics;

/// What a forward pass gave back: chosen tokens, or logits to sample from.
enum Sampled {
    Tokens(Vec<u32>),
    Logits(Vec<Vec<f32>>),
}

/// One row of a [`Sampled`].
enum Row {
    Token(u32),
    Logits(Vec<f32>),
}

/// A message on a request's response stream.
pub type Event = Result<pb::DecodeResponse, Status>;

/// What the rest of the node asks of the engine loop.
pub enum Command {
    /// A new request; `reply` says whether it was admitted.
    Admit(Box<Admission>, oneshot::Sender<Result<(), Status>>),
    /// Accepted KV bytes of one layer: blocks `first_block..` of the reservation.
    ImportLayer {
        /// The request on the wire.
        transfer_id: u64,
        /// Decoder layer.
        layer: usize,
        /// First block, an index into the request's reservation.
        first_block: usize,
        /// Blocks in `payload`.
        block_count: usize,
        /// The KV heads `payload` carries (a sending tensor-parallel rank's;
        /// the reservation table has refused overlaps).
        heads: std::ops::Range<usize>,
        /// The bytes, in the cache layout.
        payload: Bytes,
    },
    /// Every layer landed; the prefill node sampled `first_token`.
    KvComplete {
        /// The request on the wire.
        transfer_id: u64,
        /// The first generated token.
        first_token: u32,
    },
    /// The KV transfer failed.
    KvAborted {
        /// The request on the wire.
        transfer_id: u64,
        /// Why.
        reason: String,
    },
    /// Stop a request and free its blocks; the reply says whether it existed.
    Cancel(String, oneshot::Sender<bool>),
}

/// A request to admit.
pub struct Admission {
    /// Client-visible id.
    pub request_id: String,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Tokens generated before, on a node that failed (see `DecodeRequest.generated`).
    pub generated: Vec<u32>,
    /// Sampling and stop conditions.
    pub params: GenerationParams,
    /// Prefill here rather than receiving KV.
    pub local_prefill: bool,
    /// How long to wait for remote KV.
    pub kv_timeout: Duration,
    /// The response stream.
    pub events: mpsc::Sender<Event>,
    /// The request's span (carrying its id); the loop logs the request's events in it.
    pub span: tracing::Span,
}

/// Where prefill nodes send KV: the QUIC receiver's address and certificate.
#[derive(Clone)]
pub struct KvEndpoint {
    /// `host:port` of the receiver's first endpoint.
    pub quic_addr: String,
    /// All the receiver's endpoints, `quic_addr` first.
    pub quic_addrs: Vec<String>,
    /// TLS name the certificate is for.
    pub server_name: String,
    /// The receiver's certificate, for prefill nodes to trust.
    pub cert_der: Vec<u8>,
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most sequences in one decode step.
    pub max_batch: usize,
    /// Most tokens in one forward pass (decode tokens plus local prefill chunks).
    pub max_batch_tokens: usize,
    /// Reuse the KV of prompt prefixes prefilled here before.
    pub prefix_cache: bool,
}

/// Load figures, published after every iteration.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Blocks in the cache.
    pub kv_blocks_total: u32,
    /// Blocks free.
    pub kv_blocks_free: u32,
    /// Sequences in the running batch.
    pub running: u32,
    /// Sequences waiting for KV or being prefilled here.
    pub queued: u32,
    /// Prompt tokens still to prefill here.
    pub queued_prefill_tokens: u64,
    /// Forward passes run.
    pub steps_total: u64,
    /// Most sequences decoded in one step so far.
    pub max_batch_seen: u32,
    /// Prompt tokens prefilled here (local prefill) since start.
    pub local_prompt_tokens_total: u64,
    /// Of those, tokens whose KV came from the prefix cache (not computed).
    pub cached_tokens_total: u64,
    /// Blocks in the prefix cache (in use or evictable).
    pub prefix_cache_blocks: u32,
    /// The salt of the node's block hashes (published for KV-aware routing).
    pub prefix_hash_salt: u64,
    /// The prefix cache's gains and drops, read by each load stream.
    pub kv_events: Arc<KvEventLog>,
}

enum State {
    AwaitingKv { deadline: Instant },
    Prefilling { done: usize },
    Running,
}

struct Sequence {
    request_id: String,
    generation: Generation,
    table: Vec<BlockId>,
    /// A locally prefilled context's full blocks' hashes (empty otherwise).
    hashes: Vec<BlockHash>,
    /// Leading blocks of `table` registered in the prefix cache (or taken from it).
    registered: usize,
    /// Context tokens whose KV came from the prefix cache (local prefill only).
    cached_tokens: usize,
    state: State,
    events: mpsc::Sender<Event>,
    span: tracing::Span,
}

/// The engine loop's state.
pub struct Scheduler<B: Backend> {
    backend: B,
    blocks: BlockManager,
    hasher: PrefixHasher,
    model: Arc<ModelDir>,
    limits: Limits,
    kv: KvEndpoint,
    reservations: Arc<Mutex<Reservations>>,
    stats: Arc<Mutex<Stats>>,
    metrics: DecodeMetrics,
    /// By transfer id, which grows with arrival: iteration order is FIFO.
    seqs: BTreeMap<u64, Sequence>,
    by_request: HashMap<String, u64>,
    next_transfer_id: u64,
}

impl<B: Backend> Scheduler<B> {
    /// An engine loop over `backend`, whose whole cache it allocates;
    /// `node_id` labels its metrics.
    pub fn new(
        backend: B,
        model: Arc<ModelDir>,
        limits: Limits,
        kv: KvEndpoint,
        reservations: Arc<Mutex<Reservations>>,
        stats: Arc<Mutex<Stats>>,
        node_id: &str,
    ) -> Self {
        let layout = backend.kv_layout();
        let total = layout.num_blocks;
        let blocks = if limits.prefix_cache {
            BlockManager::with_prefix_cache(total)
        } else {
            BlockManager::new(total)
        };
        Scheduler {
            hasher: PrefixHasher::for_model(backend.config(), &layout),
            backend,
            blocks,
            model,
            limits,
            kv,
            reservations,
            stats,
            metrics: DecodeMetrics::new(node_id),
            seqs: BTreeMap::new(),
            by_request: HashMap::new(),
            // Random start: transfer ids of a restarted node never match stale frames.
            next_transfer_id: u64::from(std::process::id()) << 32,
        }
    }

    /// Runs until `shutdown` fires or every command sender is gone.
    pub fn run(mut self, commands: Receiver<Command>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let busy = self
                .seqs
                .values()
                .any(|s| !matches!(s.state, State::AwaitingKv { .. }));
            if !busy {
                match commands.recv_timeout(Duration::from_millis(20)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(cmd) = commands.try_recv() {
                self.handle(cmd);
            }
            self.reap(Instant::now());
            self.step();
            self.publish();
        }
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        for id in ids {
            self.fail(id, Status::unavailable("the decode node is shutting down"));
        }
        self.publish();
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Admit(a, reply) => {
                let _ = reply.send(self.admit(*a));
            }
            Command::ImportLayer {
                transfer_id,
                layer,
                first_block,
                block_count,
                heads,
                payload,
            } => {
                let Some(seq) = self.seqs.get(&transfer_id) else {
                    return;
                };
                let blocks = seq
                    .table
                    .get(first_block..first_block + block_count)
                    .map(<[_]>::to_vec);
                let result = match blocks {
                    Some(blocks) => self
                        .backend
                        .import_heads(layer, &blocks, heads, &payload)
                        .map_err(|e| e.to_string()),
                    None => Err(format!(
                        "blocks {first_block}+{block_count} beyond the reservation"
                    )),
                };
                if let Err(e) = result {
                    self.fail(
                        transfer_id,
                        Status::internal(format!("importing KV failed: {e}")),
                    );
                }
            }
            Command::KvComplete {
                transfer_id,
                first_token,
            } => {
                let Some(seq) = self.seqs.get_mut(&transfer_id) else {
                    return;
                };
                if !matches!(seq.state, State::AwaitingKv { .. }) {
                    return;
                }
                seq.state = State::Running;
                let event = seq
                    .generation
                    .push_sampled(first_token, &self.model.tokenizer);
                self.emit(transfer_id, event);
            }
            Command::KvAborted {
                transfer_id,
                reason,
            } => {
                if self.seqs.contains_key(&transfer_id) {
                    self.fail(
                        transfer_id,
                        Status::unavailable(format!("KV transfer failed: {reason}")),
                    );
                }
            }
            Command::Cancel(request_id, reply) => {
                let found = match self.by_request.get(&request_id).copied() {
                    Some(id) => {
                        if let Some(seq) = self.seqs.get(&id) {
                            seq.span
                                .in_scope(|| tracing::info!("cancelled by the router"));
                            let done = finished_message(seq, pb::FinishReason::Cancelled, "");
                            let _ = seq.events.try_send(Ok(done));
                        }
                        self.remove(id);
                        true
                    }
                    None => false,
                };
                let _ = reply.send(found);
            }
        }
    }

    fn admit(&mut self, a: Admission) -> Result<(), Status> {
        let config = &self.model.config;
        if self.by_request.contains_key(&a.request_id) {
            return Err(Status::already_exists(format!(
                "request {} is already running here",
                a.request_id
            )));
        }
        let context_len = a.prompt.len() + a.generated.len();
        if context_len >= config.max_position_embeddings {
            return Err(Status::invalid_argument(format!(
                "prompt of {context_len} tokens leaves no room in the model's context of {} tokens",
                config.max_position_embeddings
            )));
        }
        let layout = self.backend.kv_layout();
        let max_len = (a.prompt.len() + a.params.max_tokens).min(config.max_position_embeddings);
        // The KV that prefill computes covers the prompt and the tokens generated before.
        let prompt_blocks = blocks_for(context_len, layout.block_size);
        let prompt_len = context_len;
        // A prompt prefilled here starts after the cached full blocks of its
        // context (never the block of its last token, whose logits it needs).
        // KV shipped by a prefill node is written into fresh blocks only.
        let hashes = if a.local_prefill && self.blocks.caching() {
            let mut context = a.prompt.clone();
            context.extend_from_slice(&a.generated);
            self.hasher.full_blocks(&context)
        } else {
            Vec::new()
        };
        let reusable = (context_len.saturating_sub(1) / layout.block_size).min(hashes.len());
        let generation = Generation::resume(
            a.prompt,
            &a.generated,
            a.params,
            &config.eos_token_ids,
            &self.model.tokenizer,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let SequenceBlocks { table, cached } = self
            .blocks
            .allocate_sequence(&hashes[..reusable], blocks_for(max_len, layout.block_size))
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let cached_tokens = cached * layout.block_size;
        let transfer_id = self.next_transfer_id;
        self.next_transfer_id += 1;
        let mut admitted = pb::Admitted {
            local_prefill: a.local_prefill,
            kv_target: None,
        };
        let state = if a.local_prefill {
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
                block_size: layout.block_size as u16,
            };
            let registered = self
                .reservations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .register(transfer_id, expect);
            if let Err(e) = registered {
                let _ = self.blocks.release(&table);
                return Err(Status::internal(format!("cannot reserve KV: {e}")));
            }
            admitted.kv_target = Some(pb::KvTarget {
                quic_addr: self.kv.quic_addr.clone(),
                quic_addrs: self.kv.quic_addrs.clone(),
                server_name: self.kv.server_name.clone(),
                server_cert_der: self.kv.cert_der.clone(),
                num_blocks: prompt_blocks as u32,
                block_size: layout.block_size as u32,
                num_layers: layout.num_layers as u32,
                num_kv_heads: layout.num_kv_heads as u32,
                head_dim: layout.head_dim as u32,
                dtype: wire_dtype(layout.dtype) as u32,
                transfer_id,
            });
            State::AwaitingKv {
                deadline: Instant::now() + a.kv_timeout,
            }
        };
        let message = pb::DecodeResponse {
            event: Some(pb::decode_response::Event::Admitted(admitted)),
        };
        if a.events.try_send(Ok(message)).is_err() {
            let _ = self.blocks.release(&table);
            self.reservations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(transfer_id);
            return Err(Status::cancelled("the caller went away"));
        }
        let (span, local) = (&a.span, a.local_prefill);
        // The loop serves every request on one thread: it enters the
        // request's span for the lines it logs about it.
        span.in_scope(|| {
            tracing::debug!(transfer_id, prompt_len, cached_tokens, local, "admitted")
        });
        if local {
            self.metrics.prefix_lookup(prompt_len, cached_tokens);
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.local_prompt_tokens_total += prompt_len as u64;
            stats.cached_tokens_total += cached_tokens as u64;
        }
        self.by_request.insert(a.request_id.clone(), transfer_id);
        self.seqs.insert(
            transfer_id,
            Sequence {
                request_id: a.request_id,
                generation,
                table,
                hashes,
                registered: cached,
                cached_tokens,
                state,
                events: a.events,
                span: a.span,
            },
        );
        Ok(())
    }

    /// Ends sequences whose KV did not arrive in time or whose caller went away.
    fn reap(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut gone = Vec::new();
        for (&id, seq) in &self.seqs {
            if seq.events.is_closed() {
                gone.push(id);
            } else if let State::AwaitingKv { deadline } = seq.state
                && now >= deadline
            {
                expired.push(id);
            }
        }
        for id in gone {
            if let Some(seq) = self.seqs.get(&id) {
                seq.span
                    .in_scope(|| tracing::info!("caller went away; freeing its blocks"));
            }
            self.remove(id);
        }
        for id in expired {
            self.fail(
                id,
                Status::deadline_exceeded("the request's KV cache did not arrive in time"),
            );
        }
    }

    /// One forward pass over the running batch and some local prefill.
    fn step(&mut self) {
        let mut budget = self.limits.max_batch_tokens;
        // (transfer id, chunk tokens, start, completes the prompt)
        let mut plan: Vec<(u64, Vec<u32>, usize, bool)> = Vec::new();
        for (&id, seq) in &self.seqs {
            if plan.len() >= self.limits.max_batch || budget == 0 {
                break;
            }
            if matches!(seq.state, State::Running) {
                let tokens = seq.generation.tokens();
                plan.push((id, vec![tokens[tokens.len() - 1]], tokens.len() - 1, false));
                budget -= 1;
            }
        }
        let decoding = plan.len();
        for (&id, seq) in &self.seqs {
            if plan.len() >= self.limits.max_batch || budget == 0 {
                break;
            }
            if let State::Prefilling { done } = seq.state {
                // The prompt and any tokens generated before a resume.
                let context = seq.generation.tokens();
                let n = (context.len() - done).min(budget);
                plan.push((
                    id,
                    context[done..done + n].to_vec(),
                    done,
                    done + n == context.len(),
                ));
                budget -= n;
            }
        }
        if plan.is_empty() {
            return;
        }
        // Rows whose token is used: running sequences and prompts' last chunks.
        let sampled = |state: &State, completes: bool| matches!(state, State::Running) || completes;
        // Without penalties, a logit_bias or min_tokens' bans every row's token
        // can be drawn where the logits are (on a GPU only ids come back);
        // otherwise the logits come to the host (`draws_from_raw_logits`).
        // Log probabilities are computed on the host too, from those logits (a
        // device-side computation returning only the requested numbers is to come).
        let on_device = plan.iter().all(|(id, _, _, completes)| {
            let seq = &self.seqs[id];
            !sampled(&seq.state, *completes)
                || (seq.generation.draws_from_raw_logits() && !seq.generation.wants_logprobs())
        });
        let draws: Vec<TokenDraw> = if on_device {
            plan.iter()
                .map(|(id, _, _, completes)| match self.seqs.get_mut(id) {
                    Some(seq) if sampled(&seq.state, *completes) => seq.generation.next_draw(),
                    _ => TokenDraw::GREEDY,
                })
                .collect()
        } else {
            Vec::new()
        };
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|(id, tokens, start, _)| SeqChunk {
                tokens,
                start: *start,
                block_table: &self.seqs[id].table,
            })
            .collect();
        let result = if on_device {
            self.backend
                .forward_draw(&chunks, &draws, None)
                .map(Sampled::Tokens)
        } else {
            self.backend.forward(&chunks, None).map(Sampled::Logits)
        };
        drop(chunks);
        self.metrics.step(plan.len());
        {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.steps_total += 1;
            stats.max_batch_seen = stats.max_batch_seen.max(decoding as u32);
        }
        let rows: Vec<Row> = match result {
            Ok(Sampled::Tokens(t)) => t.into_iter().map(Row::Token).collect(),
            Ok(Sampled::Logits(l)) => l.into_iter().map(Row::Logits).collect(),
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing its sequences");
                for (id, ..) in plan {
                    self.fail(id, Status::internal(format!("forward pass failed: {e}")));
                }
                return;
            }
        };
        for ((id, tokens, start, completes), row) in plan.into_iter().zip(rows) {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if let State::Prefilling { .. } = seq.state {
                // Full blocks now computed can serve later prompts.
                let bs = self.hasher.block_size();
                let full = ((start + tokens.len()) / bs).min(seq.hashes.len());
                for b in seq.registered..full {
                    self.blocks.register(seq.table[b], seq.hashes[b]);
                }
                seq.registered = seq.registered.max(full);
            }
            if let State::Prefilling { .. } = seq.state
                && !completes
            {
                seq.state = State::Prefilling {
                    done: start + tokens.len(),
                };
                continue;
            }
            seq.state = State::Running;
            let event = match row {
                Row::Token(t) => seq.generation.accept_drawn(t, &self.model.tokenizer),
                Row::Logits(mut l) => seq.generation.step(&mut l, &self.model.tokenizer),
            };
            self.emit(id, event);
        }
    }

    /// Sends a token to its stream; ends the sequence when it finished.
    fn emit(&mut self, id: u64, event: tandem_engine::Result<TokenEvent>) {
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        let event = match event {
            Ok(e) => e,
            Err(e) => return self.fail(id, Status::internal(e.to_string())),
        };
        let chunk = pb::DecodeResponse {
            event: Some(pb::decode_response::Event::Token(pb::TokenChunk {
                ids: vec![event.token],
                text: event.text,
                // A first token sampled by a prefill node has none here: the
                // router adds them from the prefill node's answer.
                logprobs: event.logprobs.iter().map(logprobs_to_pb).collect(),
            })),
        };
        // The stream holds max_tokens + a few messages, so a full stream means a caller
        // that stopped reading: treat it like one that went away.
        let alive = seq.events.try_send(Ok(chunk)).is_ok();
        let at_context_end =
            seq.generation.tokens().len() >= self.model.config.max_position_embeddings;
        if let Some(reason) = event
            .finished
            .map(finish_reason_to_pb)
            .or(at_context_end.then_some(pb::FinishReason::Length))
        {
            let _ = seq.events.try_send(Ok(finished_message(seq, reason, "")));
            seq.span.in_scope(|| {
                tracing::info!(
                    ?reason,
                    prompt_tokens = seq.generation.prompt().len(),
                    cached_tokens = seq.cached_tokens,
                    tokens = seq.generation.output().len(),
                    "finished"
                )
            });
            self.remove(id);
        } else if !alive {
            self.remove(id);
        }
    }

    fn fail(&mut self, id: u64, status: Status) {
        if let Some(seq) = self.seqs.get(&id) {
            seq.span
                .in_scope(|| tracing::warn!(error = %status.message(), "request failed"));
            let _ = seq.events.try_send(Err(status));
        }
        self.remove(id);
    }

    fn remove(&mut self, id: u64) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.by_request.remove(&seq.request_id);
            if let Err(e) = self.blocks.release(&seq.table) {
                tracing::error!(error = %e, "block accounting error");
            }
            self.reservations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(id);
        }
    }

    fn publish(&mut self) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.kv_events.record(self.blocks.drain_kv_events());
        s.prefix_hash_salt = self.hasher.salt();
        s.kv_blocks_total = self.blocks.total() as u32;
        s.kv_blocks_free = self.blocks.num_free() as u32;
        s.prefix_cache_blocks = self.blocks.num_cached() as u32;
        s.running = self
            .seqs
            .values()
            .filter(|q| matches!(q.state, State::Running))
            .count() as u32;
        s.queued = self.seqs.len() as u32 - s.running;
        s.queued_prefill_tokens = self
            .seqs
            .values()
            .map(|q| match q.state {
                State::Prefilling { done } => (q.generation.tokens().len() - done) as u64,
                _ => 0,
            })
            .sum();
        self.metrics.publish(&self.blocks, s.queued as usize);
    }
}

fn finished_message(seq: &Sequence, reason: pb::FinishReason, error: &str) -> pb::DecodeResponse {
    let g = &seq.generation;
    pb::DecodeResponse {
        event: Some(pb::decode_response::Event::Finished(pb::Finished {
            reason: reason as i32,
            error: error.to_string(),
            usage: Some(pb::Usage {
                prompt_tokens: g.prompt().len() as u32,
                completion_tokens: g.output().len() as u32,
                cached_tokens: seq.cached_tokens as u32,
            }),
            timings: None,
            text: String::new(),
        })),
    }
}

/// The wire's code for a cache dtype.
pub fn wire_dtype(d: tandem_engine::KvDtype) -> WireDtype {
    match d {
        tandem_engine::KvDtype::F32 => WireDtype::F32,
        tandem_engine::KvDtype::Bf16 => WireDtype::Bf16,
        tandem_engine::KvDtype::F16 => WireDtype::F16,
    }
}
