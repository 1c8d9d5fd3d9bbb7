//! The `PrefillNode` gRPC service: validation, queueing, shipping, cancel,
//! and load reports. Errors become statuses only here, through
//! `From<PrefillError> for Status`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::ModelFingerprint;
use tandem_engine::KvCursor;
use tandem_proto::v1 as pb;
use tandem_proto::v1::prefill_node_server::PrefillNode;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::PrefillError;
use crate::job::Job;
use crate::node_metrics::TransferMetrics;
use crate::scheduler::Scheduler;
use crate::senders::SenderCache;
use crate::transfer;
use crate::validation::{NodeShape, validate};

/// Default interval of `WatchLoad` reports.
const DEFAULT_LOAD_INTERVAL: Duration = Duration::from_millis(50);

/// The service's state, shared by every call.
pub(crate) struct PrefillService {
    pub shape: NodeShape,
    pub scheduler: Arc<Scheduler>,
    pub senders: Arc<SenderCache>,
    pub node_id: String,
    pub model_name: String,
    /// What this node serves; published in load reports and checked
    /// against each KV target's.
    pub fingerprint: ModelFingerprint,
    /// Tensor-parallel ranks of the node's model.
    pub tp_size: u32,
    pub shutdown: CancellationToken,
    pub transfer_metrics: TransferMetrics,
    /// The model (its tokenizer compiles structured-output constraints).
    pub model: Arc<tandem_engine::ModelDir>,
    /// The model's EOS ids.
    pub eos: Vec<u32>,
}

/// Cancels a request's job unless disarmed: the `Prefill` call's future
/// being dropped (its caller went away) cancels the work.
struct CancelOnDrop {
    scheduler: Arc<Scheduler>,
    request_id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.scheduler.cancel(&self.request_id);
        }
    }
}

impl PrefillService {
    /// Compiles a request's constraint and replays its generated tokens
    /// through it (off the async workers: the first constrained request
    /// builds the vocabulary's trie). Bad input is `InvalidRequest`.
    async fn start_grammar(
        &self,
        constraint: &tandem_engine::Constraint,
        generated: &[u32],
    ) -> Result<tandem_engine::ConstraintState, PrefillError> {
        let (model, constraint, generated) =
            (self.model.clone(), constraint.clone(), generated.to_vec());
        tokio::task::spawn_blocking(move || {
            let mut state = model.tokenizer.constraints()?.start(&constraint)?;
            state.replay(&generated)?;
            Ok::<_, tandem_engine::EngineError>(state)
        })
        .await
        .map_err(|e| PrefillError::Server(format!("compiling the constraint: {e}")))?
        .map_err(|e| PrefillError::InvalidRequest(e.to_string()))
    }

    async fn prefill(&self, req: pb::PrefillRequest) -> Result<pb::PrefillResponse, PrefillError> {
        let submitted = Instant::now();
        self.check_model(req.kv_target.as_ref())?;
        let v = validate(&self.shape, req).await?;
        let grammar = match &v.constraint {
            None => None,
            Some(c) => Some(
                self.start_grammar(c, &v.prompt[v.prompt.len() - v.generated..])
                    .await?,
            ),
        };
        let sender = self.senders.get(&v.target).await?;
        let cancel = CancellationToken::new();
        let (tx, rx) = mpsc::channel((2 * self.shape.num_layers).max(8));
        self.scheduler.submit(Job {
            request_id: v.request_id.clone(),
            prompt: v.prompt,
            generated: v.generated,
            sampling: v.sampling,
            logprobs: v.logprobs,
            banned: v.banned,
            held_blocks: v.held_blocks,
            cache_salt: v.cache_salt,
            grammar,
            eos: self.eos.clone(),
            events: tx,
            cancel: cancel.clone(),
            submitted,
        })?;
        let mut guard = CancelOnDrop {
            scheduler: self.scheduler.clone(),
            request_id: v.request_id,
            armed: true,
        };
        let result = transfer::ship(
            &sender,
            &v.target,
            self.shape.num_layers as u32,
            rx,
            &cancel,
            &self.transfer_metrics,
            submitted,
        )
        .await;
        match &result {
            Ok(_) => guard.armed = false,
            Err(PrefillError::Transfer { .. }) => self.senders.forget(&v.target, &sender),
            Err(_) => {}
        }
        result
    }

    /// Refuses a KV target whose decode node serves another model (before
    /// the shape checks, so another shape reads as what it is).
    fn check_model(&self, target: Option<&pb::KvTarget>) -> Result<(), PrefillError> {
        let Some(theirs) = target
            .map(|t| t.model_fingerprint.as_str())
            .filter(|f| !f.is_empty())
        else {
            return Ok(());
        };
        let difference = match theirs.parse::<ModelFingerprint>() {
            Ok(f) => match self.fingerprint.difference(&f) {
                None => return Ok(()),
                Some(d) => d,
            },
            Err(_) => "unreadable fingerprint".to_string(),
        };
        Err(PrefillError::ModelMismatch {
            difference,
            theirs: theirs.to_string(),
            ours: self.fingerprint.to_string(),
        })
    }

    /// The load report of one stream, with the KV events since `cursor`.
    fn node_load(&self, cursor: &mut KvCursor) -> pb::NodeLoad {
        let l = self.scheduler.load();
        let (kv, salt) = self.scheduler.kv_delta(cursor);
        let u32_of = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        pb::NodeLoad {
            node_id: self.node_id.clone(),
            role: pb::Role::Prefill.into(),
            model_fingerprint: self.fingerprint.to_string(),
            kv_blocks_total: u32_of(l.kv_blocks_total),
            kv_blocks_free: u32_of(l.kv_blocks_free),
            running: u32_of(l.running),
            queued: u32_of(l.queued),
            queued_prefill_tokens: l.queued_prefill_tokens,
            tp_size: self.tp_size,
            model: self.model_name.clone(),
            steps_total: l.steps_total,
            max_batch_seen: u32_of(l.max_batch_seen),
            prompt_tokens_total: l.prompt_tokens_total,
            cached_tokens_total: l.cached_tokens_total,
            prefix_cache_blocks: u32_of(l.prefix_cache_blocks),
            block_size: u32_of(self.shape.block_size),
            prefix_hash_salt: salt,
            blocks_gained: kv.gained,
            blocks_dropped: kv.dropped,
            blocks_snapshot: kv.snapshot,
            ..Default::default()
        }
    }
}

/// The tonic service: a thin shell over [`PrefillService`].
#[derive(Clone)]
pub(crate) struct PrefillGrpc(pub Arc<PrefillService>);

#[tonic::async_trait]
impl PrefillNode for PrefillGrpc {
    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let request_id = request.get_ref().request_id.clone();
        let attempt = request.get_ref().attempt;
        let prompt_tokens = request.get_ref().prompt.len() + request.get_ref().generated.len();
        let span = tracing::info_span!("prefill", %request_id, attempt);
        span.in_scope(|| tracing::debug!(prompt_tokens, "prefill requested"));
        match self
            .0
            .prefill(request.into_inner())
            .instrument(span.clone())
            .await
        {
            Ok(r) => {
                span.in_scope(|| tracing::debug!("KV delivered"));
                Ok(Response::new(r))
            }
            Err(e) => {
                span.in_scope(|| tracing::info!("prefill failed: {e}"));
                Err(e.into())
            }
        }
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let r = request.get_ref();
        let found = self
            .0
            .scheduler
            .cancel(&tandem_proto::attempt_key(&r.request_id, r.attempt));
        Ok(Response::new(pb::CancelResponse { found }))
    }

    type WatchLoadStream = ReceiverStream<Result<pb::NodeLoad, Status>>;

    async fn watch_load(
        &self,
        request: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        let every = match request.get_ref().interval_ms {
            0 => DEFAULT_LOAD_INTERVAL,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let (tx, rx) = mpsc::channel(4);
        let service = self.0.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            // This stream's place in the KV event log: a snapshot first.
            let mut cursor = KvCursor::default();
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = service.shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let load = service.node_load(&mut cursor);
                tokio::select! {
                    _ = service.shutdown.cancelled() => break,
                    r = tx.send(Ok(load)) => if r.is_err() { break },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
