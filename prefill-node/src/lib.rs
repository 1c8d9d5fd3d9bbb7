//! tandem-prefill: Tandem's prefill node.
//!
//! A prefill node takes a prompt and a KV target (a decode node's QUIC
//! receiver and the blocks it reserved), computes the prompt in chunks
//! batched with other prompts, streams each layer's KV to the decode node as
//! soon as the layer is computed, samples the first token and returns it.
//!
//! - [`serve`]: starts the node (gRPC `PrefillNode` + health) in-process.
//! - `validation`: checking requests and KV targets against the model.
//! - `batch_plan`: the chunked-prefill policy (sans-I/O).
//! - `scheduler`: the worker thread that owns the backend.
//! - `transfer`: a request's sending side; `senders`: connections per decode node.
//! - `service`: the gRPC shell; each `Prefill` call runs in a `prefill` span
//!   carrying the router's `request_id`.
//! - `node_metrics`: queue depth, KV blocks, batch sizes, KV bytes and transfer time.
//! - [`error`]: [`PrefillError`] and its mapping to gRPC codes.

mod batch_plan;
pub mod error;
mod job;
mod node_metrics;
mod scheduler;
mod senders;
mod service;
mod transfer;
mod validation;

use std::net::SocketAddr;
use std::sync::Arc;

use tandem_cluster::listener::ConnectionLimits;
use tandem_cluster::tls_listener;
use tandem_cluster::{GrpcTls, ModelFingerprint, PrefillSection, grpc_tls};
use tandem_engine::{BatchLimits, GpuPriority, ModelDir};
use tandem_proto::v1::prefill_node_server::PrefillNodeServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use batch_plan::{PlannedChunk, StepLimits, plan_step};
pub use error::PrefillError;
pub use scheduler::LoadSnapshot;

use crate::node_metrics::TransferMetrics;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::senders::SenderCache;
use crate::service::{PrefillGrpc, PrefillService};
use crate::validation::NodeShape;

/// A prefill node serving in the background.
pub struct RunningPrefill {
    /// The address the gRPC service listens on (the real port when `listen` had port 0).
    pub addr: SocketAddr,
    scheduler: Arc<Scheduler>,
    task: JoinHandle<Result<(), PrefillError>>,
}

impl RunningPrefill {
    /// The node's current load (what `WatchLoad` reports).
    pub fn load(&self) -> LoadSnapshot {
        self.scheduler.load()
    }

    /// Waits until the node has stopped (after its shutdown token fired):
    /// the server, the worker thread and the KV connections.
    pub async fn wait(self) -> Result<(), PrefillError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(PrefillError::Server(format!("server task failed: {e}"))),
        }
    }
}

/// Most jobs in one prefill pass: per-sequence buffers of a CUDA backend
/// (logits, attention partials) grow with it, and a pass of this many
/// prompts already fills a GPU.
const MAX_SEQS_PER_PASS: usize = 256;

/// The most one prefill pass holds (see `batch_plan::plan_step`): at most
/// `max_batch_tokens` tokens, or one block when the budget is below a block;
/// every chunk has at least one token, so no more sequences than tokens, and
/// no more than [`MAX_SEQS_PER_PASS`].
fn batch_limits(config: &PrefillSection) -> BatchLimits {
    let max_tokens = config.max_batch_tokens.max(config.block_size);
    BatchLimits {
        max_tokens,
        max_seqs: config.max_batch_tokens.min(MAX_SEQS_PER_PASS),
        priority: GpuPriority::Normal,
    }
}

/// Starts a prefill node: loads `model` on the CPU with a cache of
/// `config.kv_blocks` blocks, starts the worker thread, and serves
/// `PrefillNode` and gRPC health on `config.listen` (port 0 picks one).
/// Returns once listening. Everything stops when `shutdown` fires; await
/// [`RunningPrefill::wait`] to know when it has.
///
/// With `config.tls` the gRPC service is mutual TLS (it presents the node's
/// certificate and refuses clients without one signed by the cluster CA),
/// and KV goes to decode nodes over mutual-TLS QUIC.
pub async fn serve(
    model: Arc<ModelDir>,
    config: PrefillSection,
    shutdown: CancellationToken,
) -> Result<RunningPrefill, PrefillError> {
    config
        .validate()
        .map_err(|e| PrefillError::Config(e.to_string()))?;
    // The gRPC server's TLS first: a bad `[tls]` file fails before the model loads.
    let limits = ConnectionLimits::from(&config.connections);
    // Its certificate is reloaded when the files change.
    let mut server = limits.grpc_server(tonic::transport::Server::builder());
    let grpc_tls = match &config.tls {
        Some(t) => {
            GrpcTls::load(t).map_err(|e| PrefillError::Config(e.to_string()))?;
            Some(grpc_tls::node_server_tls(t).map_err(|e| PrefillError::Config(e.to_string()))?)
        }
        None => None,
    };
    let mut shape = NodeShape::new(&model.config, config.block_size);
    shape.check_wire_limits()?;
    let fingerprint = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || ModelFingerprint::of(&model))
            .await
            .map_err(|e| PrefillError::Server(format!("fingerprinting the model: {e}")))?
            .map_err(|e| PrefillError::Config(format!("fingerprinting the model: {e}")))?
    };
    let backend = {
        let model = model.clone();
        let (blocks, bs, tp) = (config.kv_blocks, config.block_size, config.tp);
        let limits = batch_limits(&config);
        let kv_dtype = config.kv_dtype.engine();
        tokio::task::spawn_blocking(move || model.load_tp_kv(tp, blocks, bs, limits, kv_dtype))
            .await
            .map_err(|e| PrefillError::Server(format!("loading the model: {e}")))??
    };
    shape.kv_dtype = tandem_cluster::kv_dtype::wire_dtype(backend.kv_layout().dtype);
    let scheduler = Arc::new(Scheduler::start(
        backend,
        SchedulerConfig {
            limits: StepLimits {
                chunk_tokens: config.chunk_tokens,
                max_batch_tokens: config.max_batch_tokens,
                block_size: config.block_size,
                max_seqs: batch_limits(&config).max_seqs,
            },
            max_queue: config.max_queue,
            node_id: &config.id,
            prefix_cache: config.prefix_cache,
        },
    )?);
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            scheduler.stop();
            return Err(PrefillError::Server(format!(
                "cannot listen on {}: {e}",
                config.listen
            )));
        }
    };
    let addr = listener
        .local_addr()
        .map_err(|e| PrefillError::Server(e.to_string()))?;
    let cluster_tls = match &config.tls {
        None => None,
        Some(t) => Some(
            tandem_kv_transfer::tls::client_config_from_pem(&t.ca, Some((&t.cert, &t.key)))
                .map_err(|e| PrefillError::Config(format!("[tls]: {e}")))?,
        ),
    };
    let senders = Arc::new(SenderCache::new(&config, cluster_tls, fingerprint.digest()));
    let service = PrefillGrpc(Arc::new(PrefillService {
        shape,
        scheduler: scheduler.clone(),
        senders: senders.clone(),
        node_id: config.id.clone(),
        model_name: model.name(),
        fingerprint,
        tp_size: u32::try_from(config.tp).unwrap_or(u32::MAX),
        shutdown: shutdown.clone(),
        transfer_metrics: TransferMetrics::new(),
        eos: model.config.eos_token_ids.clone(),
        model: model.clone(),
    }));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PrefillNodeServer<PrefillGrpc>>()
        .await;
    // The worker stops as soon as shutdown fires, so in-flight calls end
    // (UNAVAILABLE) and the server's graceful shutdown can complete.
    {
        let scheduler = scheduler.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            scheduler.stop();
        });
    }
    if let Some(tls) = &grpc_tls {
        tls.watch("prefill_grpc", shutdown.clone());
    }
    let server = server
        .add_service(health)
        .add_service(PrefillNodeServer::new(service))
        .serve_with_incoming_shutdown(
            tls_listener::incoming(
                listener,
                "prefill_grpc",
                limits,
                grpc_tls.as_ref(),
                shutdown.clone(),
            ),
            shutdown.clone().cancelled_owned(),
        );
    let worker = scheduler.clone();
    let task = tokio::spawn(async move {
        let served = server.await;
        worker.stop();
        let joiner = worker.clone();
        let _ = tokio::task::spawn_blocking(move || joiner.join()).await;
        senders.close_all().await;
        tracing::info!("prefill node stopped");
        served.map_err(|e| PrefillError::Server(e.to_string()))
    });
    tracing::info!(%addr, id = %config.id, "prefill node listening");
    Ok(RunningPrefill {
        addr,
        scheduler,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml: &str) -> PrefillSection {
        tandem_cluster::Config::parse(toml)
            .unwrap()
            .prefill
            .unwrap()
    }

    #[test]
    fn the_backend_is_sized_for_the_configured_budget() {
        let c = section("[prefill]\nchunk_tokens = 512\nmax_batch_tokens = 10000\n");
        assert_eq!(
            batch_limits(&c),
            BatchLimits {
                max_tokens: 10000,
                max_seqs: MAX_SEQS_PER_PASS,
                priority: GpuPriority::Normal,
            }
        );
        // A budget below one block still runs a block-sized chunk.
        let c = section("[prefill]\nblock_size = 32\nchunk_tokens = 32\nmax_batch_tokens = 8\n");
        assert_eq!(
            batch_limits(&c),
            BatchLimits {
                max_tokens: 32,
                max_seqs: 8,
                priority: GpuPriority::Normal,
            }
        );
    }
}
