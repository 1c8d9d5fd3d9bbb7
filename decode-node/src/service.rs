//! The decode node's internal gRPC service: `Decode`, `Cancel`, `WatchLoad`.
//!
//! The edge of the node: it checks what a caller sent, hands requests to the
//! engine loop, and is the one place the loop's domain errors
//! ([`Refusal`], [`RequestError`]) become `tonic::Status` codes.

use std::pin::Pin;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_cluster::convert::generation_params;
use tandem_engine::{KvCursor, ModelDir};
use tandem_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::admission::Admission;
use crate::errors::{Refusal, RequestError};
use crate::scheduler::{Command, Stats};

/// The gRPC face of a decode node.
pub struct DecodeService {
    /// Node id for load reports.
    pub node_id: String,
    /// The served model.
    pub model: Arc<ModelDir>,
    /// The engine loop.
    pub commands: Sender<Command>,
    /// Tensor-parallel ranks of the node's model.
    pub tp_size: u32,
    /// Tokens per KV block, published in load reports.
    pub block_size: u32,
    /// Most sequences in one step, published in load reports.
    pub max_batch: u32,
    /// `decode.local_prefill_below`, published in load reports.
    pub local_prefill_below: u32,
    /// What the node serves, published in load reports.
    pub fingerprint: String,
    /// Load figures from the engine loop.
    pub stats: Arc<Mutex<Stats>>,
    /// Ends the load streams, so a stopping node's server is not held open
    /// by the routers watching it.
    pub shutdown: tokio_util::sync::CancellationToken,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::DecodeResponse, Status>> + Send>>;
type LoadStream = Pin<Box<dyn Stream<Item = Result<pb::NodeLoad, Status>> + Send>>;

/// The status a caller gets for a refused admission.
pub fn refusal_status(r: &Refusal) -> Status {
    let message = r.to_string();
    match r {
        Refusal::AlreadyRunning(_) => Status::already_exists(message),
        Refusal::ContextFull { .. } | Refusal::InvalidRequest(_) => {
            Status::invalid_argument(message)
        }
        Refusal::OutOfBlocks(_) => Status::resource_exhausted(message),
        Refusal::Reservation(_) => Status::internal(message),
        Refusal::CallerGone => Status::cancelled(message),
        Refusal::ShuttingDown => Status::unavailable(message),
    }
}

/// The status that ends the stream of an admitted request that failed.
pub fn failure_status(e: &RequestError) -> Status {
    let message = e.to_string();
    match e {
        RequestError::KvTimeout => Status::deadline_exceeded(message),
        RequestError::ModelMismatch(_) => Status::failed_precondition(message),
        RequestError::KvTransfer(_) | RequestError::ShuttingDown => Status::unavailable(message),
        RequestError::KvImport(_) | RequestError::Forward(_) | RequestError::Generation(_) => {
            Status::internal(message)
        }
    }
}

impl DecodeService {
    fn send(&self, cmd: Command) -> Result<(), Status> {
        self.commands
            .send(cmd)
            .map_err(|_| Status::unavailable("the decode node is shutting down"))
    }
}

#[tonic::async_trait]
impl pb::decode_node_server::DecodeNode for DecodeService {
    type DecodeStream = EventStream;
    type WatchLoadStream = LoadStream;

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let span = tracing::info_span!("decode", request_id = %r.request_id, attempt = r.attempt);
        let config = &self.model.config;
        if r.prompt.is_empty() {
            return Err(Status::invalid_argument("the prompt is empty"));
        }
        if let Some(bad) = r
            .prompt
            .iter()
            .chain(&r.generated)
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return Err(Status::invalid_argument(format!(
                "token id {bad} is out of the vocabulary (size {})",
                config.vocab_size
            )));
        }
        let params = generation_params(&r);
        params
            .validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.generated.len() >= params.max_tokens {
            return Err(Status::invalid_argument(format!(
                "{} tokens were already generated of max_tokens {}; nothing is left to generate",
                r.generated.len(),
                params.max_tokens
            )));
        }
        if let Some(n) = r.prompt_logprobs
            && n as usize > tandem_engine::MAX_TOP_LOGPROBS
        {
            return Err(Status::invalid_argument(format!(
                "prompt_logprobs {n} exceeds the limit of {} top log probabilities per token",
                tandem_engine::MAX_TOP_LOGPROBS
            )));
        }
        // Room for every token, the Admitted, PromptLogprobs and Finished messages.
        let (tx, rx) = mpsc::channel(params.max_tokens + 5);
        let admission = Admission {
            // State, Cancel and the KV reservation are per attempt.
            request_id: tandem_proto::attempt_key(&r.request_id, r.attempt),
            // Otherwise the loop decides, counting only the tokens its
            // prefix cache lacks.
            force_local: r.force_local_prefill,
            prompt: r.prompt,
            generated: r.generated,
            prompt_logprobs: r.prompt_logprobs.map(|n| n as usize),
            params,
            kv_timeout: Duration::from_millis(u64::from(r.kv_timeout_ms.max(1))),
            prefill_peer: r.prefill_peer,
            // A negative or NaN estimate reads as no wait.
            prefill_queue: Duration::try_from_secs_f64(r.prefill_queue_seconds).unwrap_or_default(),
            cache_salt: r.cache_salt,
            events: tx,
            span: span.clone(),
        };
        let (reply, admitted) = oneshot::channel();
        self.send(Command::Admit(Box::new(admission), reply))?;
        let admitted = admitted.await.unwrap_or(Err(Refusal::ShuttingDown));
        if let Err(refused) = admitted {
            let status = refusal_status(&refused);
            span.in_scope(|| {
                if matches!(refused, Refusal::OutOfBlocks(_)) {
                    // Back-pressure: the router asks again every few
                    // milliseconds while the node is full.
                    tracing::debug!(code = ?status.code(), "refused: {refused}")
                } else {
                    tracing::info!(code = ?status.code(), "refused: {refused}")
                }
            });
            return Err(status);
        }
        let events = ReceiverStream::new(rx).map(|e| e.map_err(|e| failure_status(&e)));
        Ok(Response::new(Box::pin(events)))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let (reply, found) = oneshot::channel();
        let r = request.into_inner();
        let key = tandem_proto::attempt_key(&r.request_id, r.attempt);
        self.send(Command::Cancel(key, reply))?;
        let found = found.await.unwrap_or(false);
        Ok(Response::new(pb::CancelResponse { found }))
    }

    async fn watch_load(
        &self,
        request: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<LoadStream>, Status> {
        let ms = request.into_inner().interval_ms;
        let interval = Duration::from_millis(if ms == 0 { 50 } else { u64::from(ms.max(5)) });
        let (tx, rx) = mpsc::channel(1);
        let stats = self.stats.clone();
        let (node_id, model, tp_size) = (self.node_id.clone(), self.model.name(), self.tp_size);
        let (block_size, max_batch) = (self.block_size, self.max_batch);
        let local_prefill_below = self.local_prefill_below;
        let fingerprint = self.fingerprint.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            // This stream's place in the KV event log: a snapshot first.
            let mut cursor = KvCursor::default();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let s = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let kv = s.kv_events.read(&mut cursor);
                let load = pb::NodeLoad {
                    node_id: node_id.clone(),
                    role: pb::Role::Decode.into(),
                    model_fingerprint: fingerprint.clone(),
                    kv_blocks_total: s.kv_blocks_total,
                    kv_blocks_free: s.kv_blocks_free,
                    running: s.running,
                    queued: s.queued,
                    queued_prefill_tokens: s.queued_prefill_tokens,
                    tp_size,
                    model: model.clone(),
                    steps_total: s.steps_total,
                    max_batch_seen: s.max_batch_seen,
                    prompt_tokens_total: s.local_prompt_tokens_total,
                    cached_tokens_total: s.cached_tokens_total,
                    prefix_cache_blocks: s.prefix_cache_blocks,
                    block_size,
                    max_batch,
                    local_prefill_below,
                    prefix_hash_salt: s.prefix_hash_salt,
                    blocks_gained: kv.gained,
                    blocks_dropped: kv.dropped,
                    blocks_snapshot: kv.snapshot,
                    ..Default::default()
                };
                if tx.send(Ok(load)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn refusals_map_to_codes_a_router_acts_on() {
        let cases = [
            (Refusal::AlreadyRunning("r#1".into()), Code::AlreadyExists),
            (
                Refusal::ContextFull {
                    context_len: 9,
                    max_context: 8,
                },
                Code::InvalidArgument,
            ),
            (Refusal::InvalidRequest("bad".into()), Code::InvalidArgument),
            (Refusal::OutOfBlocks("full".into()), Code::ResourceExhausted),
            (
                Refusal::Reservation(tandem_kv_transfer::Refusal::AlreadyRegistered(3)),
                Code::Internal,
            ),
            (Refusal::CallerGone, Code::Cancelled),
            (Refusal::ShuttingDown, Code::Unavailable),
        ];
        for (refusal, code) in cases {
            let status = refusal_status(&refusal);
            assert_eq!(status.code(), code, "{refusal:?}");
            assert_eq!(status.message(), refusal.to_string());
        }
    }

    #[test]
    fn failures_map_to_codes_a_router_acts_on() {
        let cases = [
            (RequestError::KvTimeout, Code::DeadlineExceeded),
            (RequestError::KvTransfer("reset".into()), Code::Unavailable),
            (RequestError::ShuttingDown, Code::Unavailable),
            (RequestError::KvImport("shape".into()), Code::Internal),
            (RequestError::Forward("oom".into()), Code::Internal),
            (RequestError::Generation("utf8".into()), Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(failure_status(&error).code(), code, "{error:?}");
        }
    }
}
