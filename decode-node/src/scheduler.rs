//! The decode node's engine loop: continuous batching at iteration level.
//!
//! One std thread owns the backend (model + KV cache), the block manager and
//! every sequence; everything else talks to it through [`Command`]s. Each
//! iteration it takes new commands (admissions: [`admission`](crate::admission)),
//! ends sequences whose KV is late or whose caller left, then runs one
//! forward pass over the rows the planner ([`batch_plan`](crate::batch_plan))
//! picks: every running sequence's next token, and chunks of prompts it
//! prefills itself, within the batch limits.
//!
//! A sequence whose KV comes from a prefill node joins the batch at the next
//! iteration after its last layer has landed and its first token arrived; a
//! finished one leaves at once and its blocks are free for the next request.
//! While a step runs on the device the loop also takes the commands that
//! arrive (KV layers, completed transfers, admissions), so a landing transfer
//! does not wait for the step's end; cancels and aborted transfers, which end
//! sequences that may be in the step, wait for it.
//!
//! **One owner of a request's resources**: this loop. Once a sequence is
//! admitted, `Scheduler::remove` is the only place its blocks and its KV
//! reservation are released, whatever ended it (finish, cancel, caller gone,
//! KV timeout, a failed or refused transfer: the sink only reports those);
//! before that, admission undoes its own allocation when it cannot answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_cluster::convert::{finish_reason_to_pb, logprobs_to_pb};
use tandem_engine::backend::Backend;
use tandem_engine::block_manager::{BlockId, BlockManager};
use tandem_engine::kv_events::KvEventLog;
use tandem_engine::mask_overlap::{MaskJob, overlap};
use tandem_engine::prefix_hash::PrefixHasher;
use tandem_engine::{ModelDir, RowAsk, RowOut, SeqChunk, TokenDraw, TokenEvent, TokenLogprobs};
use tandem_kv_transfer::Reservations;
use tandem_proto::v1 as pb;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::batch_plan::{PlannedRow, RowKind, SeqView, StepLimits, plan_step};
use crate::errors::{Refusal, RequestError};
use crate::link_cost::{LocalRate, SharedLinks};
use crate::node_metrics::DecodeMetrics;
use crate::prefill_choice::LinkPolicy;
use crate::sequence::{Sequence, State};
use inbox::Inbox;

/// How long the engine loop waits for a command before it looks again whether
/// the step on the device is done: the most a step's end can go unnoticed.
const STEP_POLL: Duration = Duration::from_micros(100);

/// The least time the loop spends importing KV frames outside a step's device
/// time while sequences run ([`Scheduler::import_slice`]).
const IMPORT_SLICE_MIN: Duration = Duration::from_millis(2);

/// A message on a request's response stream (the service turns the error
/// into a gRPC status).
pub type Event = Result<pb::DecodeResponse, RequestError>;

/// What the rest of the node asks of the engine loop.
pub enum Command {
    /// A new request; `reply` says whether it was admitted.
    Admit(Box<Admission>, oneshot::Sender<Result<(), Refusal>>),
    /// Accepted KV bytes of one layer: blocks `first_block..` of the reservation.
    ImportLayer {
        /// The transfer (`KvTarget.transfer_id`).
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
        /// The frame's dtype: the cache's, or a wider one to quantize (fp8 cache).
        dtype: tandem_kv_transfer::WireDtype,
        /// The bytes, in the cache layout.
        payload: tandem_kv_transfer::Payload,
    },
    /// The prefill node's Final frame arrived (often ahead of its last
    /// layers): its first token goes to the caller now; the sequence joins
    /// the batch at `KvComplete`, which follows it.
    FirstToken {
        /// The transfer.
        transfer_id: u64,
        /// The first generated token, with its log probabilities if asked.
        first: tandem_kv_transfer::FirstToken,
    },
    /// Every layer landed.
    KvComplete {
        /// The transfer.
        transfer_id: u64,
    },
    /// The KV transfer failed.
    KvAborted {
        /// The transfer.
        transfer_id: u64,
        /// Why.
        reason: String,
    },
    /// Stop a request and free its blocks; the reply says whether it existed.
    Cancel(String, oneshot::Sender<bool>),
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
    /// This node's model fingerprint, for prefill nodes to check.
    pub model_fingerprint: String,
}

/// Batching and admission limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most sequences in one decode step.
    pub max_batch: usize,
    /// Most tokens in one forward pass (decode tokens plus local prefill chunks).
    pub max_batch_tokens: usize,
    /// Reuse the KV of prompt prefixes held here.
    pub prefix_cache: bool,
    /// Prompts with fewer tokens than this left to compute (not held in the
    /// prefix cache) are prefilled here.
    pub local_prefill_below: usize,
    /// A first token sent ahead of its KV reaches the caller only once its
    /// sequence has a place in the batch (`decode.hold_first_token`).
    pub hold_first_token: bool,
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
    /// Sequences preempted (their blocks given back) since start.
    pub preemptions_total: u64,
    /// Prompt tokens prefilled here (local prefill) since start.
    pub local_prompt_tokens_total: u64,
    /// Of those, tokens whose KV came from the prefix cache (not computed).
    pub cached_tokens_total: u64,
    /// Blocks in the prefix cache (in use or evictable).
    pub prefix_cache_blocks: u32,
    /// KV payload bytes received from prefill nodes and written here.
    pub kv_received_bytes_total: u64,
    /// KV bytes prefill nodes were told not to send, the prefix cache here
    /// holding them (`tandem_kv_transfer_skipped_bytes_total`).
    pub kv_skipped_bytes_total: u64,
    /// The salt of the node's block hashes (published for KV-aware routing).
    pub prefix_hash_salt: u64,
    /// The prefix cache's gains and drops, read by each load stream.
    pub kv_events: Arc<KvEventLog>,
}

/// The engine loop's state.
pub struct Scheduler<B: Backend> {
    pub(crate) backend: B,
    pub(crate) blocks: BlockManager,
    pub(crate) hasher: PrefixHasher,
    pub(crate) model: Arc<ModelDir>,
    pub(crate) limits: Limits,
    pub(crate) kv: KvEndpoint,
    reservations: Arc<Mutex<Reservations>>,
    stats: Arc<Mutex<Stats>>,
    pub(crate) metrics: DecodeMetrics,
    /// By transfer id, which grows with arrival: iteration order is FIFO.
    pub(crate) seqs: BTreeMap<u64, Sequence>,
    pub(crate) by_request: HashMap<String, u64>,
    pub(crate) next_transfer_id: u64,
    /// Where long prompts are prefilled (`prefill_choice`), and what it measures.
    pub(crate) policy: LinkPolicy,
    pub(crate) links: SharedLinks,
    pub(crate) local_rate: LocalRate,
    /// A command taken while a step ran that had to wait for its end (one that
    /// can end a sequence, which may be in the step); handled first next turn.
    held: Option<Command>,
    /// While sequences run, how long imports may hold the loop outside a
    /// step's device time before the next step starts (a quarter of the last
    /// step, at least [`IMPORT_SLICE_MIN`]): a 4k prompt of an 8B model is
    /// ~60 ms of imports on an H200 host, which taken in one go stalled every running
    /// sequence's next token; the rest wait for the next step's device time.
    import_slice: Duration,
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
            policy: LinkPolicy {
                local_prefill_below: limits.local_prefill_below,
                link_cost: false,
                default_link_rate: None,
                tpot_budget: Duration::from_millis(50),
            },
            links: SharedLinks::default(),
            local_rate: LocalRate::default(),
            held: None,
            import_slice: IMPORT_SLICE_MIN,
        }
    }

    /// Weighs the link's cost in where long prompts are prefilled, with the
    /// rates `links` measures (shared with the KV sink).
    pub fn with_link_cost(mut self, policy: LinkPolicy, links: SharedLinks) -> Self {
        self.policy = policy;
        self.links = links;
        self
    }

    /// Runs until `shutdown` fires or every command sender is gone.
    pub fn run(mut self, commands: Receiver<Command>, shutdown: CancellationToken) {
        let mut commands = Inbox::new(commands);
        while !shutdown.is_cancelled() {
            if let Some(cmd) = self.held.take() {
                self.handle(cmd);
            }
            if !self.stepping() {
                match commands.recv_timeout(Duration::from_millis(20)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            self.take_waiting_commands(&mut commands);
            self.reap(Instant::now());
            let started = Instant::now();
            self.step(&mut commands);
            let took = started.elapsed();
            self.import_slice = (took / 4).max(IMPORT_SLICE_MIN);
            if took > Duration::from_millis(50) {
                tracing::debug!(ms = took.as_secs_f64() * 1e3, "slow engine step");
            }
            self.publish();
        }
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        for id in ids {
            self.fail(id, RequestError::ShuttingDown);
        }
        self.publish();
    }

    /// The longest context a sequence here reaches: the model's, or the KV
    /// cache's size if that is smaller (a sequence alone must fit in it).
    pub(crate) fn max_context(&self) -> usize {
        let cache = self.blocks.total() * self.backend.kv_layout().block_size;
        self.model.config.max_position_embeddings.min(cache)
    }

    pub(crate) fn reservations(&self) -> MutexGuard<'_, Reservations> {
        self.reservations.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn release_blocks(&mut self, table: &[BlockId]) {
        if let Err(e) = self.blocks.release(table) {
            tracing::error!(error = %e, "block accounting error");
        }
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
                dtype,
                payload,
            } => self.import(
                transfer_id,
                layer,
                first_block..first_block + block_count,
                heads,
                (dtype, &payload),
            ),
            Command::KvComplete { transfer_id } => {
                let Some(seq) = self.seqs.get_mut(&transfer_id) else {
                    return;
                };
                if !matches!(seq.state, State::AwaitingKv { .. }) {
                    return;
                }
                if seq.first_token_at.is_none() {
                    // The receiver announces the first token before it
                    // completes a transfer; a node shutting down may drop it.
                    let e = "the KV landed without the first token".to_string();
                    return self.fail(transfer_id, RequestError::KvImport(e));
                }
                seq.state = State::Running;
                seq.spans.kv_imported = Some(Instant::now());
                seq.span.in_scope(|| {
                    tracing::debug!(
                        frames = seq.spans.imports,
                        import_ms = seq.spans.import_time.as_secs_f64() * 1e3,
                        "shipped KV imported"
                    )
                });
                // The context's full blocks now hold their KV (cached or
                // shipped): the next turn of a chat can start from them.
                let context_len = seq.shipped_len();
                seq.register_full_blocks(&mut self.blocks, context_len);
                if seq.answered {
                    // Its first token ended it: it waited only for its KV.
                    self.remove(transfer_id);
                }
            }
            Command::FirstToken { transfer_id, first } => {
                let Some(seq) = self.seqs.get_mut(&transfer_id) else {
                    return;
                };
                if !matches!(seq.state, State::AwaitingKv { .. }) || seq.first_token_at.is_some() {
                    return;
                }
                let logprobs = first.logprobs.map(|l| TokenLogprobs {
                    token: first.id,
                    logprob: l.logprob,
                    top: l.top,
                });
                if seq.generation.logprobs().is_some() && logprobs.is_none() {
                    let e = "the prefill node sent the first token without the log probabilities asked for";
                    return self.fail(transfer_id, RequestError::KvTransfer(e.into()));
                }
                seq.first_token_at = Some(seq.generation.tokens().len());
                // A token that ends the request answers it now; the sequence
                // keeps its blocks until the KV has landed, so the transfer
                // ends as usual (`answered`).
                let event = seq
                    .generation
                    .push_sampled(first.id, logprobs, &self.model.tokenizer);
                match event {
                    Ok(e)
                        if self.limits.hold_first_token
                            && e.finished.is_none()
                            && !self.batch_has_place_for(transfer_id) =>
                    {
                        // Out with the step that computes its second token.
                        if let Some(seq) = self.seqs.get_mut(&transfer_id) {
                            seq.held_first = Some((e, Instant::now()));
                        }
                    }
                    event => self.emit(transfer_id, event),
                }
            }
            Command::KvAborted {
                transfer_id,
                reason,
            } => {
                if self.seqs.contains_key(&transfer_id) {
                    // KV of another model: the pairing is wrong, not the node.
                    let error = if reason.starts_with(tandem_kv_transfer::receiver::MODEL_MISMATCH)
                    {
                        RequestError::ModelMismatch(reason)
                    } else {
                        RequestError::KvTransfer(reason)
                    };
                    self.fail(transfer_id, error);
                }
            }
            Command::Cancel(request_id, reply) => {
                let found = match self.by_request.get(&request_id).copied() {
                    Some(id) => {
                        if let Some(seq) = self.seqs.get(&id) {
                            seq.span
                                .in_scope(|| tracing::info!("cancelled by the router"));
                            let done = seq.finished_message(pb::FinishReason::Cancelled);
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

    /// Writes accepted KV into blocks `blocks` (indices into the reservation)
    /// of transfer `id`'s table.
    fn import(
        &mut self,
        id: u64,
        layer: usize,
        blocks: std::ops::Range<usize>,
        heads: std::ops::Range<usize>,
        (dtype, payload): (tandem_kv_transfer::WireDtype, &tandem_kv_transfer::Payload),
    ) {
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        let layout = self.backend.kv_layout();
        let context_len = seq.shipped_len();
        let started = Instant::now();
        let result = match seq.table.get(blocks.clone()) {
            Some(table) => crate::kv_convert::to_cache_dtype(
                dtype,
                &layout,
                payload,
                blocks.clone(),
                heads.clone(),
                context_len,
            )
            .and_then(|frame| {
                let pieces: Vec<&[u8]> = frame.parts().iter().map(|p| &p[..]).collect();
                self.backend
                    .import_heads_vectored(layer, table, heads, &pieces)
                    .map_err(|e| e.to_string())
            }),
            None => Err(format!(
                "blocks {}..{} beyond the reservation",
                blocks.start, blocks.end
            )),
        };
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.spans.imports += 1;
            seq.spans.import_time += started.elapsed();
            if let State::AwaitingKv { deadline, patience } = &mut seq.state {
                *deadline = (*deadline).max(Instant::now() + *patience);
            }
        }
        match result {
            Ok(()) => self.stats().kv_received_bytes_total += payload.len() as u64,
            Err(e) => self.fail(id, RequestError::KvImport(e)),
        }
    }

    /// Ends sequences whose KV did not arrive in time or whose caller went away.
    fn reap(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut gone = Vec::new();
        for (&id, seq) in &self.seqs {
            // An answered sequence's caller is done with it: it waits for its KV.
            if seq.events.is_closed() && !seq.answered {
                gone.push(id);
            } else if let State::AwaitingKv { deadline, .. } = seq.state
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
            self.fail(id, RequestError::KvTimeout);
        }
    }

    /// Whether a sequence would run in the next step (one not waiting for
    /// its KV or for blocks).
    fn stepping(&self) -> bool {
        self.seqs
            .values()
            .any(|s| !matches!(s.state, State::AwaitingKv { .. } | State::Preempted))
    }

    /// Takes the commands waiting before a step: all of them when no
    /// sequence would run in it; else imports stop after [`import_slice`]
    /// (the others are cheap), and the rest wait in the inbox.
    ///
    /// [`import_slice`]: Self::import_slice
    fn take_waiting_commands(&mut self, commands: &mut Inbox) {
        let stepping = self.stepping();
        let slice_ends = Instant::now() + self.import_slice;
        while let Ok(cmd) = commands.try_recv() {
            let import = matches!(cmd, Command::ImportLayer { .. });
            self.handle(cmd);
            if import && stepping && Instant::now() >= slice_ends {
                break;
            }
        }
    }

    /// One forward pass over the rows the planner picks.
    /// Takes the commands that arrive while a step runs on the device: KV
    /// layers to import (a GPU backend queues their copies behind the step),
    /// completed transfers (their first token leaves now, their first decode
    /// step is the next one) and admissions. A command that can end a
    /// sequence (a cancel, an aborted transfer) is held for after the step, and
    /// the ones behind it with it, so the commands keep their order.
    /// Commands keep being taken until the step is done on the device (a
    /// backend that computes it in `start_step` is done at once), then for
    /// [`import_slice`](Self::import_slice) more: a KV frame that lands
    /// mid-step is imported then, and a transfer that completes mid-step
    /// sends its first token then, not after the step.
    fn take_commands_during_step(&mut self, commands: &mut Inbox) {
        // Once the step is done on the device, imports may go on for a slice.
        let mut slice_ends: Option<Instant> = None;
        while self.held.is_none() {
            if slice_ends.is_some_and(|end| Instant::now() >= end) {
                break;
            }
            let cmd = match commands.try_recv() {
                Ok(cmd) => cmd,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if !self.backend.step_running() => break,
                Err(TryRecvError::Empty) => match commands.recv_timeout(STEP_POLL) {
                    Ok(cmd) => cmd,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            match cmd {
                Command::Cancel(..) | Command::KvAborted { .. } => self.held = Some(cmd),
                cmd => self.handle(cmd),
            }
            if slice_ends.is_none() && !self.backend.step_running() {
                slice_ends = Some(Instant::now() + self.import_slice);
            }
        }
    }

    /// Whether sequence `id`'s first token, arriving now, finds a place in
    /// the batch: fewer than `max_batch` other sequences hold one and none
    /// waits for one (a newcomer does not overtake those already waiting).
    fn batch_has_place_for(&self, id: u64) -> bool {
        let mut places = 0;
        for (&other, seq) in &self.seqs {
            if seq.held_first.is_some() {
                return false;
            }
            places += usize::from(other != id && seq.has_place());
        }
        places < self.limits.max_batch
    }

    /// Sends the held first tokens of the sequences `plan` decodes: each goes
    /// out as its second token is computed. Drops the rows of sequences that
    /// ended meanwhile (a caller gone).
    fn release_held_first_tokens(&mut self, plan: &mut Vec<PlannedRow>) {
        for r in plan.iter().filter(|r| r.kind == RowKind::Decode) {
            let Some(seq) = self.seqs.get_mut(&r.id) else {
                continue;
            };
            if let Some((event, since)) = seq.held_first.take() {
                seq.span.in_scope(|| {
                    tracing::debug!(
                        held_ms = since.elapsed().as_secs_f64() * 1e3,
                        "first token held for a place in the batch"
                    )
                });
                self.emit(r.id, Ok(event));
            }
        }
        plan.retain(|r| self.seqs.contains_key(&r.id));
    }

    fn step(&mut self, commands: &mut Inbox) {
        self.resume_preempted();
        self.score_prompts();
        // Sequences with a place first, then those whose first token waits
        // for one, each in admission order; not those whose prompt is being
        // scored (`scoring.rs`).
        let held = |s: &Sequence| s.held_first.is_some();
        let views: Vec<SeqView> = (self.seqs.iter().filter(|(_, s)| !held(s)))
            .chain(self.seqs.iter().filter(|(_, s)| held(s)))
            .filter(|(_, s)| s.prompt_logprobs.is_none())
            .map(|(&id, s)| s.view(id))
            .collect();
        let mut plan = plan_step(
            &views,
            StepLimits {
                max_seqs: self.limits.max_batch,
                max_tokens: self.limits.max_batch_tokens,
            },
        );
        self.release_held_first_tokens(&mut plan);
        self.grow_tables(&mut plan);
        if plan.is_empty() {
            return;
        }
        // Each row's token is chosen by the backend (on a GPU on the device,
        // under the row's grammar mask, with its log probabilities: only ids
        // and those numbers come back), except where penalties or a
        // logit_bias need the request's history: those rows' logits come to
        // the host (`Generation::step`).
        let on_host: Vec<bool> = plan
            .iter()
            .map(|r| r.samples() && !self.seqs[&r.id].generation.draws_from_raw_logits())
            .collect();
        let draws: Vec<TokenDraw> = plan
            .iter()
            .zip(&on_host)
            .map(|(r, &host)| match self.seqs.get_mut(&r.id) {
                Some(seq) if r.samples() && !host => seq.generation.next_draw(),
                _ => TokenDraw::GREEDY,
            })
            .collect();
        // Constrained rows' grammar masks are computed on another thread
        // while the pass runs (they depend only on the tokens so far), and
        // given back before the backend samples (`tandem_engine::mask_overlap`).
        let mut lent: Vec<(u64, MaskJob)> = Vec::new();
        for r in plan.iter().filter(|r| r.samples()) {
            if let Some(seq) = self.seqs.get_mut(&r.id)
                && let Ok(Some(job)) = seq.generation.lend_mask_job(&self.model.tokenizer)
            {
                lent.push((r.id, job));
            }
        }
        let (lent_ids, mut jobs): (Vec<u64>, Vec<MaskJob>) = lent.into_iter().unzip();
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|r| {
                let seq = &self.seqs[&r.id];
                SeqChunk {
                    tokens: &seq.generation.tokens()[r.start..r.start + r.len],
                    start: r.start,
                    block_table: &seq.table,
                }
            })
            .collect();
        let started = Instant::now();
        let backend = &mut self.backend;
        let result = overlap(&mut jobs, || backend.start_step(&chunks, &draws, None));
        drop(chunks);
        if result.is_ok() {
            self.take_commands_during_step(commands);
        }
        for (id, job) in lent_ids.into_iter().zip(jobs) {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.generation.return_mask_job(job);
            }
        }
        // A row whose mask cannot be computed fails alone, after the step.
        let vocab = self.backend.config().vocab_size;
        let mut broken: Vec<(u64, String)> = Vec::new();
        let mut masks: Vec<Option<Vec<u32>>> = Vec::with_capacity(plan.len());
        let mut logprobs: Vec<Option<usize>> = Vec::with_capacity(plan.len());
        for (r, &host) in plan.iter().zip(&on_host) {
            let (mut mask, mut lp) = (None, None);
            if let Some(seq) = self.seqs.get_mut(&r.id)
                && r.samples()
                && !host
            {
                lp = seq.generation.logprobs();
                match seq.generation.next_mask_bits(vocab, &self.model.tokenizer) {
                    Ok(m) => mask = m,
                    Err(e) => broken.push((r.id, e.to_string())),
                }
            }
            masks.push(mask);
            logprobs.push(lp);
        }
        let asks: Vec<RowAsk<'_>> = masks
            .iter()
            .zip(&logprobs)
            .zip(&on_host)
            .map(|((mask, &logprobs), &logits)| RowAsk {
                mask: mask.as_deref(),
                logprobs,
                logits,
            })
            .collect();
        let result = result.and_then(|()| self.backend.finish_step(&asks));
        drop(asks);
        self.note_step(&plan, started);
        self.metrics.step(plan.len());
        {
            let decoding = plan.iter().filter(|r| r.kind == RowKind::Decode).count();
            let mut stats = self.stats();
            stats.steps_total += 1;
            stats.max_batch_seen = stats.max_batch_seen.max(decoding as u32);
        }
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing its sequences");
                for r in plan {
                    self.fail(r.id, RequestError::Forward(e.to_string()));
                }
                return;
            }
        };
        for (r, row) in plan.into_iter().zip(rows) {
            if let Some((_, e)) = broken.iter().find(|(id, _)| *id == r.id) {
                self.fail(r.id, RequestError::Generation(e.clone()));
                continue;
            }
            self.finish_row(r, row);
        }
    }

    /// Takes one computed row's result: the next prefill position, or a token.
    fn finish_row(&mut self, r: PlannedRow, row: RowOut) {
        let Some(seq) = self.seqs.get_mut(&r.id) else {
            return;
        };
        // Full blocks now computed can serve later prompts.
        seq.register_full_blocks(&mut self.blocks, r.start + r.len);
        if r.kind == (RowKind::Prefill { completes: true }) {
            seq.spans.prefill_computed = Some(Instant::now());
        }
        if r.kind == (RowKind::Prefill { completes: false }) {
            seq.state = State::Prefilling {
                done: r.start + r.len,
            };
            return;
        }
        seq.state = State::Running;
        let event = match row {
            RowOut::Token { token, logprobs } => {
                seq.generation
                    .accept_drawn(token, logprobs, &self.model.tokenizer)
            }
            RowOut::Logits(mut l) => seq.generation.step(&mut l, &self.model.tokenizer),
        };
        self.emit(r.id, event);
    }

    /// Sends a token to its stream; ends the sequence when it finished (one
    /// still waiting for its KV is `answered` and ends when the KV is in).
    fn emit(&mut self, id: u64, event: tandem_engine::Result<TokenEvent>) {
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        let event = match event {
            Ok(e) => e,
            Err(e) => return self.fail(id, RequestError::Generation(e.to_string())),
        };
        let chunk = pb::DecodeResponse {
            event: Some(pb::decode_response::Event::Token(pb::TokenChunk {
                ids: vec![event.token],
                text: event.text,
                logprobs: event.logprobs.iter().map(logprobs_to_pb).collect(),
                // The router sets it, on the first chunk it relays.
                prompt_tokens: 0,
            })),
        };
        // The stream holds max_tokens + a few messages, so a full stream means a caller
        // that stopped reading: treat it like one that went away.
        let alive = seq.events.try_send(Ok(chunk)).is_ok();
        let at_context_end = seq.generation.tokens().len() >= self.max_context();
        if let Some(reason) = event
            .finished
            .map(finish_reason_to_pb)
            .or(at_context_end.then_some(pb::FinishReason::Length))
        {
            let _ = seq.events.try_send(Ok(seq.finished_message(reason)));
            seq.span.in_scope(|| {
                tracing::info!(
                    ?reason,
                    prompt_tokens = seq.generation.prompt().len(),
                    cached_tokens = seq.cached_tokens,
                    local_prefill = seq.local,
                    tokens = seq.generation.output().len(),
                    "finished"
                )
            });
            if matches!(seq.state, State::AwaitingKv { .. }) {
                if let Some(seq) = self.seqs.get_mut(&id) {
                    seq.answered = true;
                }
            } else {
                self.remove(id);
            }
        } else if !alive {
            self.remove(id);
        }
    }

    fn fail(&mut self, id: u64, error: RequestError) {
        if let Some(seq) = self.seqs.get(&id) {
            if seq.answered {
                // The caller has its answer; only the KV it waited for failed.
                seq.span
                    .in_scope(|| tracing::debug!(error = %error, "KV of an answered request"));
            } else {
                seq.span
                    .in_scope(|| tracing::warn!(error = %error, "request failed"));
                let _ = seq.events.try_send(Err(error));
            }
        }
        self.remove(id);
    }

    /// Forgets a sequence and releases its blocks and its KV reservation:
    /// the one place either is released.
    fn remove(&mut self, id: u64) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.links.lock().forget(id);
            self.by_request.remove(&seq.request_id);
            self.release_blocks(&seq.table);
            self.reservations().release(id);
        }
    }

    fn publish(&mut self) {
        let events = self.blocks.drain_kv_events();
        let salt = self.hasher.salt();
        let mut s = self.stats();
        s.kv_events.record(events);
        s.prefix_hash_salt = salt;
        s.kv_blocks_total = self.blocks.total() as u32;
        s.kv_blocks_free = self.blocks.num_free() as u32;
        s.prefix_cache_blocks = self.blocks.num_cached() as u32;
        s.running = self
            .seqs
            .values()
            .filter(|q| matches!(q.state, State::Running))
            .count() as u32;
        s.queued = self.seqs.len() as u32 - s.running;
        s.queued_prefill_tokens = self.seqs.values().map(|q| q.prefill_left() as u64).sum();
        self.metrics.publish(&self.blocks, s.queued as usize);
    }
}

mod inbox;
pub(crate) mod preemption;
mod scoring;
#[cfg(test)]
mod tests;
