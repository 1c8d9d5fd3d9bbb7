//! The decode node's internal gRPC service: `Decode`, `Cancel`, `WatchLoad`.

use std::pin::Pin;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_cluster::convert::generation_params;
use tandem_engine::{KvCursor, ModelDir};
use tandem_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::scheduler::{Admission, Command, Event, Stats};

/// The gRPC face of a decode node.
pub struct DecodeService {
    /// Node id for load reports.
    pub node_id: String,
    /// The served model.
    pub model: Arc<ModelDir>,
    /// The engine loop.
    pub commands: Sender<Command>,
    /// Prompts shorter than this are prefilled here.
    pub local_prefill_below: usize,
    /// Tensor-parallel ranks of the node's model.
    pub tp_size: u32,
    /// Tokens per KV block, published in load reports.
    pub block_size: u32,
    /// Load figures from the engine loop.
    pub stats: Arc<Mutex<Stats>>,
    /// Ends the load streams, so a stopping node's server is not held open
    /// by the routers watching it.
    pub shutdown: tokio_util::sync::CancellationToken,
}

type EventStream = Pin<Box<dyn Stream<Item = Event> + Send>>;
type LoadStream = Pin<Box<dyn Stream<Item = Result<pb::NodeLoad, Status>> + Send>>;

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
        // Room for every token, the Admitted message and the Finished message.
        let (tx, rx) = mpsc::channel(params.max_tokens + 4);
        let admission = Admission {
            // State, Cancel and the KV reservation are per attempt.
            request_id: tandem_proto::attempt_key(&r.request_id, r.attempt),
            local_prefill: r.force_local_prefill
                || r.prompt.len() + r.generated.len() < self.local_prefill_below,
            prompt: r.prompt,
            generated: r.generated,
            params,
            kv_timeout: Duration::from_millis(u64::from(r.kv_timeout_ms.max(1))),
            events: tx,
            span: span.clone(),
        };
        let (reply, admitted) = oneshot::channel();
        self.send(Command::Admit(Box::new(admission), reply))?;
        let admitted = admitted
            .await
            .map_err(|_| Status::unavailable("the decode node is shutting down"))?;
        if let Err(refused) = admitted {
            span.in_scope(
                || tracing::info!(code = ?refused.code(), "refused: {}", refused.message()),
            );
            return Err(refused);
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
        let block_size = self.block_size;
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
                    role: "decode".into(),
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
                    prefix_hash_salt: s.prefix_hash_salt,
                    blocks_gained: kv.gained,
                    blocks_dropped: kv.dropped,
                    blocks_snapshot: kv.snapshot,
                };
                if tx.send(Ok(load)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
