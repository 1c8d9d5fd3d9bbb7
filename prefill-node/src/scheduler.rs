//! The prefill worker: a std thread that owns the backend and its block
//! manager, and runs chunked, batched prefill steps.
//!
//! Jobs arrive through a bounded queue ([`Scheduler::submit`]). A job is
//! admitted (moved from the queue to the active set) when the blocks for its
//! whole prompt can be allocated; the queue is FIFO, so a large prompt at the
//! head waits for blocks rather than being overtaken forever. Each step plans
//! chunks over the active jobs ([`batch_plan`](crate::batch_plan)) and runs
//! one `forward`. In the forward's per-layer hook, the blocks each chunk
//! wrote are exported and handed to that job's sending task through a
//! bounded channel, so the transfer of layer L overlaps the compute of layer
//! L+1 and a slow decode node slows this worker instead of filling memory. On
//! a GPU the export only queues a device-to-host copy into pinned memory and
//! the sending task waits for it, so the forward pass does not stop for it.
//! After a job's last chunk its first token is sampled, its sending task is
//! told to finish, and its blocks are freed.
//!
//! With the prefix cache on, admission takes the leading full blocks of a
//! prompt that an earlier prompt already computed from the block manager by
//! reference and starts computing after them (always leaving at least the
//! last token to compute, for the logits of the first token). A job's full
//! blocks are registered in the cache as soon as a step has computed them.
//!
//! What is shipped is decided by the decode node, not by this cache: it
//! holds the prompt's first `KvTarget.cached_blocks` blocks already (its own
//! prefix cache), so a job ships every block from there on. Blocks this
//! node had cached but the decode node lacks go in each layer's frame of the
//! job's first computed chunk; a chunk wholly inside the decode node's
//! blocks ships nothing (it is computed only for the blocks after it).
//!
//! The queue, the set of known request ids and the load figures live in one
//! small struct behind a mutex, held only for bookkeeping, never across a
//! forward pass.
//!
//! (Long on purpose: the worker thread's admission, chunk planning, per-layer
//! export and bookkeeping are one state machine over one set of jobs; split,
//! each piece would need the others' private state.)

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::Gauge;
use tandem_cluster::kv_dtype::wire_dtype;
use tandem_engine::TokenLogprobs;
use tandem_engine::backend::KvExport;
use tandem_engine::block_manager::blocks_for;
use tandem_engine::sampling::Sampler;
use tandem_engine::{
    Backend, BlockHash, BlockId, BlockManager, KvCursor, KvDelta, KvEventLog, PrefixHasher,
    SeqChunk,
};
use tandem_kv_transfer::LayerShape;
use tokio_util::sync::CancellationToken;

use crate::batch_plan::{StepLimits, plan_step};
use crate::error::PrefillError;
use crate::job::{Job, JobEvent};
use crate::node_metrics::{PrefillMetrics, queue_depth};

/// Load figures, as reported by `WatchLoad`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// Blocks in the cache.
    pub kv_blocks_total: usize,
    /// Blocks not held by an active job.
    pub kv_blocks_free: usize,
    /// Jobs being prefilled.
    pub running: usize,
    /// Jobs waiting in the queue.
    pub queued: usize,
    /// Prompt tokens not yet computed, queued and active.
    pub queued_prefill_tokens: u64,
    /// Forward passes run since start.
    pub steps_total: u64,
    /// Most jobs in one forward pass.
    pub max_batch_seen: usize,
    /// Prompt tokens of admitted jobs since start.
    pub prompt_tokens_total: u64,
    /// Of those, tokens whose KV came from the prefix cache (not computed).
    pub cached_tokens_total: u64,
    /// Blocks in the prefix cache (in use or evictable).
    pub prefix_cache_blocks: usize,
    /// Cached blocks evicted since start.
    pub prefix_cache_evictions: u64,
}

struct State {
    waiting: VecDeque<Job>,
    /// Every queued or active job's cancellation, by request id.
    known: HashMap<String, CancellationToken>,
    shutdown: bool,
    /// Figures the worker keeps; `queued` ones are computed on read.
    load: LoadSnapshot,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    max_queue: usize,
    /// `tandem_queue_depth` of the prefill queue; set under the state's lock.
    depth: Gauge,
    /// The prefix cache's gains and drops, read by each load stream (its
    /// own lock, taken after `state`'s when both are).
    kv_events: KvEventLog,
    /// The salt of the block hashes (published for KV-aware routing).
    prefix_hash_salt: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Worker settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SchedulerConfig<'a> {
    pub limits: StepLimits,
    pub max_queue: usize,
    /// Labels the node's metrics.
    pub node_id: &'a str,
    /// Reuse the KV of prompt prefixes computed before.
    pub prefix_cache: bool,
}

/// The handle to the worker thread.
pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    block_size: usize,
    total_blocks: usize,
}

impl Scheduler {
    /// Starts the worker thread, which owns `backend` from now on.
    pub fn start<B: Backend + 'static>(
        backend: B,
        config: SchedulerConfig,
    ) -> Result<Scheduler, PrefillError> {
        let layout = backend.kv_layout();
        let total_blocks = layout.num_blocks;
        let hasher = PrefixHasher::for_model(backend.config(), &layout);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                known: HashMap::new(),
                shutdown: false,
                load: LoadSnapshot {
                    kv_blocks_total: total_blocks,
                    kv_blocks_free: total_blocks,
                    ..LoadSnapshot::default()
                },
            }),
            wake: Condvar::new(),
            max_queue: config.max_queue,
            depth: queue_depth(),
            kv_events: KvEventLog::new(),
            prefix_hash_salt: hasher.salt(),
        });
        let blocks = if config.prefix_cache {
            BlockManager::with_prefix_cache(total_blocks)
        } else {
            BlockManager::new(total_blocks)
        };
        let worker = Worker {
            backend,
            blocks,
            hasher,
            active: Vec::new(),
            cursor: 0,
            limits: config.limits,
            shared: shared.clone(),
            metrics: PrefillMetrics::new(config.node_id),
        };
        worker.metrics.blocks(&worker.blocks);
        let thread = std::thread::Builder::new()
            .name("prefill-worker".into())
            .spawn(move || worker.run())
            .map_err(|e| PrefillError::Server(format!("cannot start the worker thread: {e}")))?;
        Ok(Scheduler {
            shared,
            thread: Mutex::new(Some(thread)),
            block_size: layout.block_size,
            total_blocks,
        })
    }

    /// Queues a job, or refuses it when the queue is full, the id is taken,
    /// or the prompt can never fit the cache.
    pub fn submit(&self, job: Job) -> Result<(), PrefillError> {
        let needed = blocks_for(job.prompt.len(), self.block_size);
        if needed > self.total_blocks {
            return Err(PrefillError::PromptTooLarge {
                needed,
                total: self.total_blocks,
            });
        }
        let mut s = self.shared.lock();
        if s.shutdown {
            return Err(PrefillError::ShuttingDown);
        }
        if s.known.contains_key(&job.request_id) {
            return Err(PrefillError::Duplicate(job.request_id));
        }
        if s.waiting.len() >= self.shared.max_queue {
            return Err(PrefillError::QueueFull(s.waiting.len()));
        }
        s.known.insert(job.request_id.clone(), job.cancel.clone());
        s.waiting.push_back(job);
        self.shared.depth.set(s.waiting.len() as f64);
        drop(s);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Cancels a job: a queued one is removed now, an active one is dropped
    /// at the next step. Returns whether the job was queued or active.
    pub fn cancel(&self, request_id: &str) -> bool {
        let mut s = self.shared.lock();
        let Some(token) = s.known.get(request_id).cloned() else {
            return false;
        };
        token.cancel();
        let removed = s
            .waiting
            .iter()
            .position(|j| j.request_id == request_id)
            .and_then(|i| s.waiting.remove(i));
        if removed.is_some() {
            s.known.remove(request_id);
        }
        self.shared.depth.set(s.waiting.len() as f64);
        drop(s);
        // Dropping the job closes its channel: its sending task sees the end.
        drop(removed);
        self.shared.wake.notify_all();
        true
    }

    /// The prefix cache's changes since `cursor`'s last read (a snapshot
    /// on its first), and the salt of the hashes.
    pub fn kv_delta(&self, cursor: &mut KvCursor) -> (KvDelta, u64) {
        (
            self.shared.kv_events.read(cursor),
            self.shared.prefix_hash_salt,
        )
    }

    /// The current load.
    pub fn load(&self) -> LoadSnapshot {
        let s = self.shared.lock();
        let mut load = s.load;
        load.queued = s.waiting.len();
        load.queued_prefill_tokens += s.waiting.iter().map(|j| j.prompt.len() as u64).sum::<u64>();
        load
    }

    /// Tells the worker to stop; queued and active jobs are dropped.
    pub fn stop(&self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
    }

    /// Stops the worker and waits for its thread to end.
    pub fn join(&self) {
        self.stop();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("the prefill worker thread panicked");
        }
    }
}

/// A job being prefilled.
struct Active {
    job: Job,
    table: Vec<BlockId>,
    /// The prompt's full blocks' hashes.
    hashes: Vec<BlockHash>,
    /// Leading prompt tokens whose KV came from the prefix cache.
    cached: usize,
    /// Leading blocks of `table` registered in the prefix cache (or taken from it).
    registered: usize,
    computed: usize,
    admitted: Instant,
    queue_seconds: f64,
}

struct Worker<B> {
    backend: B,
    blocks: BlockManager,
    hasher: PrefixHasher,
    active: Vec<Active>,
    cursor: usize,
    limits: StepLimits,
    shared: Arc<Shared>,
    metrics: PrefillMetrics,
}

impl<B: Backend> Worker<B> {
    fn run(mut self) {
        loop {
            if !self.admit() {
                break;
            }
            if self.active.is_empty() {
                continue;
            }
            self.step();
            self.publish();
        }
        // Shutdown: every job still held is dropped; its sending task sees the
        // channel close and answers UNAVAILABLE.
        let mut s = self.shared.lock();
        s.waiting.clear();
        s.known.clear();
        self.shared.depth.set(0.0);
        drop(s);
        self.active.clear();
    }

    /// Drops cancelled jobs and admits queued ones while blocks last; waits
    /// when there is nothing to do. Returns false on shutdown.
    fn admit(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut s = shared.lock();
        loop {
            if s.shutdown {
                return false;
            }
            // Cancelled active jobs go first, so their blocks can be reused.
            let mut i = 0;
            while i < self.active.len() {
                if self.active[i].job.cancel.is_cancelled() {
                    let a = self.active.swap_remove(i);
                    s.known.remove(&a.job.request_id);
                    self.release(&a);
                } else {
                    i += 1;
                }
            }
            let st = &mut *s;
            let known = &mut st.known;
            st.waiting.retain(|j| {
                let keep = !j.cancel.is_cancelled();
                if !keep {
                    known.remove(&j.request_id);
                }
                keep
            });
            while let Some(front) = s.waiting.front() {
                let bs = self.limits.block_size;
                let needed = blocks_for(front.prompt.len(), bs);
                let hashes = if self.blocks.caching() {
                    let hasher = self.hasher.with_cache_salt(&front.cache_salt);
                    hasher.full_blocks(&front.prompt)
                } else {
                    Vec::new()
                };
                // At least the last token is computed, for its logits: a block
                // holding it is never taken from the cache.
                let reusable = (front.prompt.len().saturating_sub(1) / bs).min(hashes.len());
                let Ok(seq) = self.blocks.allocate_sequence(&hashes[..reusable], needed) else {
                    break;
                };
                let Some(job) = s.waiting.pop_front() else {
                    break;
                };
                let cached = seq.cached * bs;
                self.metrics.prefix_lookup(job.prompt.len(), cached);
                s.load.prompt_tokens_total += job.prompt.len() as u64;
                s.load.cached_tokens_total += cached as u64;
                let now = Instant::now();
                self.active.push(Active {
                    queue_seconds: now.duration_since(job.submitted).as_secs_f64(),
                    job,
                    table: seq.table,
                    hashes,
                    cached,
                    registered: seq.cached,
                    computed: cached,
                    admitted: now,
                });
            }
            self.fill_load(&mut s.load);
            shared.kv_events.record(self.blocks.drain_kv_events());
            shared.depth.set(s.waiting.len() as f64);
            if !self.active.is_empty() {
                return true;
            }
            // Idle: sleep until a job, a cancel or shutdown; the timeout is a backstop.
            s = shared
                .wake
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn release(&mut self, a: &Active) {
        if let Err(e) = self.blocks.release(&a.table) {
            tracing::error!(request_id = %a.job.request_id, "releasing KV blocks: {e}");
        }
    }

    fn fill_load(&self, load: &mut LoadSnapshot) {
        load.kv_blocks_free = self.blocks.num_free();
        load.prefix_cache_blocks = self.blocks.num_cached();
        load.prefix_cache_evictions = self.blocks.evictions();
        self.metrics.blocks(&self.blocks);
        load.running = self.active.len();
        load.queued_prefill_tokens = self
            .active
            .iter()
            .map(|a| (a.job.prompt.len() - a.computed) as u64)
            .sum();
    }

    fn publish(&mut self) {
        let mut s = self.shared.lock();
        let mut load = s.load;
        self.fill_load(&mut load);
        s.load = load;
        self.shared.kv_events.record(self.blocks.drain_kv_events());
    }

    /// One forward pass over the next chunks of the active jobs.
    fn step(&mut self) {
        let jobs: Vec<(usize, usize)> = self
            .active
            .iter()
            .map(|a| (a.computed, a.job.prompt.len()))
            .collect();
        let (plan, next) = plan_step(&jobs, self.cursor, self.limits);
        self.cursor = next;
        if plan.is_empty() {
            return;
        }
        let layout = self.backend.kv_layout();
        let shards = self.backend.kv_head_shards();
        let bs = layout.block_size;
        // A job whose sending task has gone (transfer failed, caller left).
        let mut gone = vec![false; plan.len()];
        let result = {
            let active = &self.active;
            let chunks: Vec<SeqChunk<'_>> = plan
                .iter()
                .map(|p| {
                    let a = &active[p.job];
                    SeqChunk {
                        tokens: &a.job.prompt[p.start..p.end],
                        start: p.start,
                        block_table: &a.table,
                    }
                })
                .collect();
            let mut hook = |layer: usize, kv: &dyn KvExport| -> tandem_engine::Result<()> {
                for (i, p) in plan.iter().enumerate() {
                    if gone[i] {
                        continue;
                    }
                    let a = &active[p.job];
                    // The job's first computed chunk also ships the blocks
                    // cached here before it, but never those the decode
                    // node holds (`held`).
                    let first = if p.start == a.cached { 0 } else { p.start / bs };
                    let first = first.max(a.job.held_blocks);
                    let last = p.end.div_ceil(bs);
                    if first >= last {
                        continue;
                    }
                    // One frame per tensor-parallel rank, carrying the KV heads it
                    // owns, laid out as in its cache (one frame of all heads at TP=1).
                    for heads in &shards {
                        // The copy out of the cache starts now and overlaps the next
                        // layer's compute; the sending task waits for it.
                        let bytes =
                            kv.export_heads_async(layer, &a.table[first..last], heads.clone())?;
                        // The node checked at start that these fit the wire's fields.
                        let shape = LayerShape {
                            layer: layer as u16,
                            first_block: first as u32,
                            block_count: (last - first) as u32,
                            dtype: wire_dtype(layout.dtype),
                            head_start: heads.start as u16,
                            head_count: heads.len() as u16,
                            total_heads: layout.num_kv_heads as u16,
                            head_dim: layout.head_dim as u16,
                            block_size: bs as u16,
                        };
                        let event = JobEvent::Layer(shape, bytes);
                        if a.job.events.blocking_send(event).is_err() {
                            gone[i] = true;
                            break;
                        }
                    }
                }
                Ok(())
            };
            // Only a chunk that ends its prompt samples (its first token);
            // the others' logits stay on the device.
            let wants: Vec<bool> = plan
                .iter()
                .map(|p| p.end == active[p.job].job.prompt.len())
                .collect();
            self.backend.forward(&chunks, &wants, Some(&mut hook))
        };
        self.metrics.step(plan.len());
        {
            let mut s = self.shared.lock();
            s.load.steps_total += 1;
            s.load.max_batch_seen = s.load.max_batch_seen.max(plan.len());
        }
        let mut finished = Vec::new();
        match result {
            Ok(mut logits) => {
                for (i, p) in plan.iter().enumerate() {
                    let a = &mut self.active[p.job];
                    a.computed = p.end;
                    // Full blocks now computed can serve later prompts.
                    let full = (a.computed / bs).min(a.hashes.len());
                    for b in a.registered..full {
                        self.blocks.register(a.table[b], a.hashes[b]);
                    }
                    a.registered = a.registered.max(full);
                    if gone[i] {
                        finished.push(p.job);
                    } else if a.computed == a.job.prompt.len() {
                        let Some(mut l) = logits.get_mut(i).and_then(Option::take) else {
                            let err = PrefillError::Compute(
                                "the backend returned no logits for a finished prompt".into(),
                            );
                            let _ = a.job.events.blocking_send(JobEvent::Failed(err));
                            finished.push(p.job);
                            continue;
                        };
                        let (first_token, logprobs) = match first_sample(&mut a.job, &mut l) {
                            Ok(t) => t,
                            Err(e) => {
                                let failed =
                                    JobEvent::Failed(PrefillError::InvalidRequest(e.to_string()));
                                let _ = a.job.events.blocking_send(failed);
                                finished.push(p.job);
                                continue;
                            }
                        };
                        let done = JobEvent::Done {
                            first_token,
                            logprobs,
                            cached_tokens: a.cached,
                            queue_seconds: a.queue_seconds,
                            compute_seconds: a.admitted.elapsed().as_secs_f64(),
                        };
                        let _ = a.job.events.blocking_send(done);
                        finished.push(p.job);
                    }
                }
            }
            Err(e) => {
                tracing::error!("prefill forward pass failed: {e}");
                let msg = e.to_string();
                for p in &plan {
                    let a = &self.active[p.job];
                    let err = PrefillError::Compute(msg.clone());
                    let _ = a.job.events.try_send(JobEvent::Failed(err));
                    finished.push(p.job);
                }
            }
        }
        // Remove from the back so the indices stay valid.
        finished.sort_unstable();
        finished.dedup();
        let mut s = self.shared.lock();
        for &i in finished.iter().rev() {
            let a = self.active.remove(i);
            s.known.remove(&a.job.request_id);
            if let Err(e) = self.blocks.release(&a.table) {
                tracing::error!(request_id = %a.job.request_id, "releasing KV blocks: {e}");
            }
        }
        if !self.active.is_empty() {
            self.cursor %= self.active.len();
        } else {
            self.cursor = 0;
        }
    }
}

/// Samples the token after `job.prompt` from its last logits, with the sampler
/// in the state the generated tokens (if any) left it in; with its log
/// probabilities when the job asked for them, never one of `job.banned`, and
/// one the job's grammar allows (an error of the grammar is the job's).
fn first_sample(
    job: &mut Job,
    logits: &mut [f32],
) -> tandem_engine::Result<(u32, Option<TokenLogprobs>)> {
    let (prompt, generated) = job.prompt.split_at(job.prompt.len() - job.generated);
    let mut sampler = Sampler::new(job.sampling.clone(), prompt);
    for &t in generated {
        sampler.resume_after(t);
    }
    let mut banned: &[u32] = &job.banned;
    if let Some(grammar) = job.grammar.as_mut() {
        let ends: Vec<u32> = job
            .eos
            .iter()
            .filter(|t| !banned.contains(t))
            .copied()
            .collect();
        if !grammar.mask_logits(logits, &ends)? {
            // Only the end is left: min_tokens cannot hold it back.
            banned = &[];
        }
    }
    Ok(sampler.sample_banning(logits, job.logprobs, banned))
}
