//! Tandem's decode node: receives prompts' KV caches over QUIC, generates
//! their tokens with continuous batching, and streams them to the router.
//!
//! - [`scheduler`]: the engine loop (continuous batching, local prefill of
//!   short prompts); it alone releases a request's blocks and reservation.
//! - [`admission`]: whether a request is taken, where its KV comes from, and
//!   which leading blocks the prefix cache here already holds.
//! - [`batch_plan`]: the sans-I/O choice of each forward pass's rows.
//! - [`sequence`]: one admitted request's state and blocks.
//! - [`errors`]: refusals at admission and failures after it (domain enums).
//! - [`sink`]: checks arriving KV against the reservations and hands it to the loop.
//! - [`service`]: the internal gRPC service the router calls, and the one
//!   place domain errors become gRPC statuses.
//! - [`node_metrics`]: the engine loop's metrics (KV blocks, waiting sequences, batch sizes).
//! - [`prefill_choice`]: the sans-I/O decision where a prompt is prefilled
//!   (here, or on a prefill node when the link pays) and why.
//! - [`link_cost`]: what that decision measures (KV rate per prefill node,
//!   this node's prefill rate).
//! - [`seq_spans`]: when a request's KV landed and its first step ran, for
//!   the router's per-request timing spans.
//!
//! Each `Decode` call gets a `decode` span carrying the router's
//! `request_id`; the engine loop logs the request's events in it.

pub mod admission;
pub mod batch_plan;
pub mod errors;
mod kv_convert;
pub mod link_cost;
pub mod node_metrics;
pub mod prefill_choice;
pub mod scheduler;
pub mod seq_spans;
pub mod sequence;
pub mod service;
pub mod sink;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tandem_cluster::listener::ConnectionLimits;
use tandem_cluster::tls_listener;
use tandem_cluster::{DecodeSection, GrpcTls, GrpcTlsError, ModelFingerprint, grpc_tls};
use tandem_engine::{BatchLimits, ModelDir};
use tandem_kv_transfer::{KvReceiver, ReceiverConfig, Reservations, SelfSigned};
use tandem_proto::v1::decode_node_server::DecodeNodeServer;
use tokio_util::sync::CancellationToken;

use crate::link_cost::SharedLinks;
use crate::prefill_choice::LinkPolicy;
use crate::scheduler::{KvEndpoint, Limits, Scheduler, Stats};
use crate::service::DecodeService;
use crate::sink::ReservedSink;

/// Why a decode node could not start.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The model could not be loaded.
    #[error(transparent)]
    Engine(#[from] tandem_engine::EngineError),
    /// The model-loading task ended without an answer (it panicked).
    #[error("loading the model failed: {0}")]
    ModelLoad(String),
    /// The model's fingerprint could not be computed (reading its files).
    #[error("fingerprinting the model: {0}")]
    Fingerprint(String),
    /// The KV receiver's TLS material (`[tls]` or the self-signed certificate).
    #[error("KV receiver TLS: {0}")]
    ReceiverTls(String),
    /// The QUIC KV receiver could not start.
    #[error("KV receiver: {0}")]
    Receiver(#[from] tandem_kv_transfer::TransferError),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    EngineThread(std::io::Error),
    /// The gRPC listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Mutual TLS on the gRPC service (`[tls]`).
    #[error("gRPC TLS: {0}")]
    GrpcTls(String),
}

impl From<GrpcTlsError> for DecodeError {
    fn from(e: GrpcTlsError) -> Self {
        DecodeError::GrpcTls(e.to_string())
    }
}

/// A decode node that is serving.
pub struct RunningDecode {
    /// Its internal gRPC address.
    pub grpc_addr: SocketAddr,
    /// Its QUIC KV receiver's address.
    pub quic_addr: SocketAddr,
    /// Every QUIC endpoint's address as prefill nodes are told it (advertised).
    pub quic_addrs: Vec<String>,
    /// Its load figures (also served by `WatchLoad`).
    pub stats: Arc<Mutex<Stats>>,
    /// Ends when the node has stopped.
    pub done: tokio::task::JoinHandle<()>,
}

/// The most one decode step holds (see `Scheduler::step`): `max_batch`
/// sequences, decoding or prefilling locally, in `max_batch_tokens` tokens;
/// its GPU work at `gpu_priority`.
fn batch_limits(config: &DecodeSection) -> BatchLimits {
    BatchLimits {
        max_tokens: config.max_batch_tokens,
        max_seqs: config.max_batch,
        priority: config.gpu_priority,
    }
}

/// Starts a decode node: the engine loop, the QUIC receiver and the gRPC service.
///
/// With `config.tls` both the QUIC receiver and the gRPC service are mutual
/// TLS: they present the node's certificate and refuse peers without one
/// signed by the cluster CA.
pub async fn serve(
    model: Arc<ModelDir>,
    config: DecodeSection,
    shutdown: CancellationToken,
) -> Result<RunningDecode, DecodeError> {
    serve_advertising(model, config, None, shutdown).await
}

/// [`serve`], telling prefill nodes to send KV to `advertise_ip` when the
/// QUIC receiver listens on an unspecified address (`0.0.0.0`, `::`), as a
/// node in a container does; prefill nodes on other hosts cannot reach `0.0.0.0`.
pub async fn serve_advertising(
    model: Arc<ModelDir>,
    config: DecodeSection,
    advertise_ip: Option<IpAddr>,
    shutdown: CancellationToken,
) -> Result<RunningDecode, DecodeError> {
    // The gRPC server's TLS first: a bad `[tls]` file fails before the model loads.
    let conn_limits = ConnectionLimits::from(&config.connections);
    // Its certificate is reloaded when the files change (the QUIC receiver
    // below serves the same one).
    let grpc_tls = match &config.tls {
        Some(t) => {
            GrpcTls::load(t)?;
            Some(grpc_tls::node_server_tls(t).map_err(|e| DecodeError::GrpcTls(e.to_string()))?)
        }
        None => None,
    };
    let mut server = conn_limits.grpc_server(tonic::transport::Server::builder());
    let backend = {
        let model = model.clone();
        let (blocks, block_size, tp) = (config.kv_blocks, config.block_size, config.tp);
        let limits = batch_limits(&config);
        let kv_dtype = config.kv_dtype.engine();
        tokio::task::spawn_blocking(move || {
            model.load_tp_kv(tp, blocks, block_size, limits, kv_dtype)
        })
        .await
        .map_err(|e| DecodeError::ModelLoad(e.to_string()))??
    };
    let fingerprint = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || ModelFingerprint::of(&model))
            .await
            .map_err(|e| DecodeError::Fingerprint(e.to_string()))?
            .map_err(|e| DecodeError::Fingerprint(e.to_string()))?
    };
    let reservations = Arc::new(Mutex::new(Reservations::new()));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let (commands, command_rx) = std::sync::mpsc::channel();

    // With `[tls]`: the cluster certificate, and senders must present one
    // signed by the cluster CA (mutual TLS). Without: a self-signed
    // certificate made now, handed to prefill nodes with each KV target.
    let (server_tls, cert_der, server_name) = match &config.tls {
        Some(t) => {
            let cert = grpc_tls
                .as_ref()
                .map(|g| g.cert().clone())
                .ok_or_else(|| DecodeError::GrpcTls("[tls] not loaded".into()))?;
            let leaf = cert.current().cert.first().cloned().ok_or_else(|| {
                DecodeError::ReceiverTls(format!("[tls] cert {}: no certificate", t.cert.display()))
            })?;
            let server_tls =
                tandem_kv_transfer::tls::server_config_with_resolver(cert, Some(&t.ca))
                    .map_err(|e| DecodeError::ReceiverTls(format!("[tls]: {e}")))?;
            (server_tls, leaf.to_vec(), t.server_name.clone())
        }
        None => {
            let cert = SelfSigned::generate(&["localhost"])
                .map_err(|e| DecodeError::ReceiverTls(e.to_string()))?;
            let server_tls = cert
                .server_config()
                .map_err(|e| DecodeError::ReceiverTls(e.to_string()))?;
            (server_tls, cert.cert.to_vec(), "localhost".to_owned())
        }
    };
    let links = SharedLinks::default();
    let sink = Arc::new(ReservedSink::new(
        reservations.clone(),
        commands.clone(),
        links.clone(),
    ));
    let (receiver, quic_addr) = KvReceiver::bind_with(
        config.quic_listen,
        server_tls,
        sink,
        ReceiverConfig {
            model_fingerprint: fingerprint.digest(),
            ..ReceiverConfig::default()
        },
        shutdown.clone(),
    )?;

    let advertised = |mut a: SocketAddr| {
        if let Some(ip) = advertise_ip
            && a.ip().is_unspecified()
        {
            a.set_ip(ip);
        }
        a
    };
    let quic_addrs: Vec<SocketAddr> = receiver
        .local_addrs()?
        .into_iter()
        .map(advertised)
        .collect();
    let endpoint = KvEndpoint {
        quic_addr: advertised(quic_addr).to_string(),
        quic_addrs: quic_addrs.iter().map(ToString::to_string).collect(),
        server_name,
        cert_der,
        model_fingerprint: fingerprint.to_string(),
    };
    let kv_addrs = endpoint.quic_addrs.clone();
    let limits = Limits {
        max_batch: config.max_batch,
        max_batch_tokens: config.max_batch_tokens,
        prefix_cache: config.prefix_cache,
        local_prefill_below: config.local_prefill_below,
        hold_first_token: config.hold_first_token,
    };
    let policy = LinkPolicy {
        local_prefill_below: config.local_prefill_below,
        link_cost: config.link_cost_prefill,
        default_link_rate: config.default_link_rate_mbps.map(|m| m * 1e6 / 8.0),
        tpot_budget: std::time::Duration::from_millis(config.tpot_budget_ms),
    };
    let scheduler = Scheduler::new(
        backend,
        model.clone(),
        limits,
        endpoint,
        reservations,
        stats.clone(),
        &config.id,
    )
    .with_link_cost(policy, links);
    let loop_shutdown = shutdown.clone();
    let engine = std::thread::Builder::new()
        .name(format!("decode-{}", config.id))
        .spawn(move || scheduler.run(command_rx, loop_shutdown))
        .map_err(DecodeError::EngineThread)?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DecodeError::Listen {
            addr: config.listen,
            source,
        })?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|source| DecodeError::Listen {
            addr: config.listen,
            source,
        })?;
    let service = DecodeService {
        node_id: config.id.clone(),
        model,
        commands,
        tp_size: u32::try_from(config.tp).unwrap_or(u32::MAX),
        block_size: u32::try_from(config.block_size).unwrap_or(u32::MAX),
        max_batch: u32::try_from(config.max_batch).unwrap_or(u32::MAX),
        local_prefill_below: u32::try_from(config.local_prefill_below).unwrap_or(u32::MAX),
        fingerprint: fingerprint.to_string(),
        stats: stats.clone(),
        shutdown: shutdown.clone(),
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<DecodeNodeServer<DecodeService>>()
        .await;
    if let Some(tls) = &grpc_tls {
        tls.watch("decode_grpc", shutdown.clone());
    }
    tracing::info!(id = %config.id, %grpc_addr, %quic_addr, "decode node serving");
    let done = tokio::spawn(async move {
        let result = server
            .add_service(health_service)
            .add_service(DecodeNodeServer::new(service))
            .serve_with_incoming_shutdown(
                tls_listener::incoming(
                    listener,
                    "decode_grpc",
                    conn_limits,
                    grpc_tls.as_ref(),
                    shutdown.clone(),
                ),
                shutdown.cancelled_owned(),
            )
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "decode gRPC server failed");
        }
        receiver.shutdown().await;
        let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    });
    Ok(RunningDecode {
        grpc_addr,
        quic_addr,
        quic_addrs: kv_addrs,
        stats,
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_engine::GpuPriority;

    #[test]
    fn the_backend_is_sized_for_the_configured_batch() {
        let config =
            tandem_cluster::Config::parse(
                "[model]\nbackend = \"cuda\"\n[decode]\nmax_batch = 300\nmax_batch_tokens = 5000\ngpu_priority = \"high\"\n",
            )
            .unwrap()
            .decode
            .unwrap();
        assert_eq!(
            batch_limits(&config),
            BatchLimits {
                max_tokens: 5000,
                max_seqs: 300,
                priority: GpuPriority::High,
            }
        );
    }
}
