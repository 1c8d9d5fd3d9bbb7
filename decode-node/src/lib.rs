//! Tandem's decode node: receives prompts' KV caches over QUIC, generates
//! their tokens with continuous batching, and streams them to the router.
//!
//! - [`scheduler`]: the engine loop (continuous batching, local prefill of short prompts).
//! - [`sink`]: checks arriving KV against the reservations and hands it to the loop.
//! - [`service`]: the internal gRPC service the router calls.
//! - [`node_metrics`]: the engine loop's metrics (KV blocks, waiting sequences, batch sizes).
//!
//! Each `Decode` call gets a `decode` span carrying the router's
//! `request_id`; the engine loop logs the request's events in it.

pub mod node_metrics;
pub mod scheduler;
pub mod service;
pub mod sink;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tandem_cluster::listener::{self, ConnectionLimits};
use tandem_cluster::{DecodeSection, GrpcTls, GrpcTlsError, grpc_tls};
use tandem_engine::{BatchLimits, ModelDir};
use tandem_kv_transfer::{KvReceiver, ReceiverConfig, Reservations, SelfSigned};
use tandem_proto::v1::decode_node_server::DecodeNodeServer;
use tokio_util::sync::CancellationToken;

use crate::scheduler::{KvEndpoint, Limits, Scheduler, Stats};
use crate::service::DecodeService;
use crate::sink::ReservedSink;

/// Why a decode node could not start.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The model could not be loaded.
    #[error(transparent)]
    Engine(#[from] tandem_engine::EngineError),
    /// The QUIC receiver or its certificate.
    #[error("KV receiver: {0}")]
    Transfer(String),
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
/// sequences, decoding or prefilling locally, in `max_batch_tokens` tokens.
fn batch_limits(config: &DecodeSection) -> BatchLimits {
    BatchLimits {
        max_tokens: config.max_batch_tokens,
        max_seqs: config.max_batch,
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
    let grpc_tls = match &config.tls {
        Some(t) => Some(
            GrpcTls::load(t)?
                .server_config()
                .timeout(conn_limits.header_timeout),
        ),
        None => None,
    };
    let mut server = conn_limits.grpc_server(tonic::transport::Server::builder());
    if let Some(tls) = grpc_tls {
        server = server
            .tls_config(tls)
            .map_err(|e| DecodeError::GrpcTls(grpc_tls::error_chain(&e)))?;
    }
    let backend = {
        let model = model.clone();
        let (blocks, block_size, tp) = (config.kv_blocks, config.block_size, config.tp);
        let limits = batch_limits(&config);
        tokio::task::spawn_blocking(move || model.load_tp(tp, blocks, block_size, limits))
            .await
            .map_err(|e| DecodeError::Transfer(e.to_string()))??
    };
    let reservations = Arc::new(Mutex::new(Reservations::new()));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let (commands, command_rx) = std::sync::mpsc::channel();

    // With `[tls]`: the cluster certificate, and senders must present one
    // signed by the cluster CA (mutual TLS). Without: a self-signed
    // certificate made now, handed to prefill nodes with each KV target.
    let (server_tls, cert_der, server_name) = match &config.tls {
        Some(t) => {
            let tls_err =
                |e: tandem_kv_transfer::TlsError| DecodeError::Transfer(format!("[tls]: {e}"));
            let server_tls =
                tandem_kv_transfer::tls::server_config_from_pem(&t.cert, &t.key, Some(&t.ca))
                    .map_err(tls_err)?;
            let pem = std::fs::read(&t.cert).map_err(|e| {
                DecodeError::Transfer(format!("[tls] cert {}: {e}", t.cert.display()))
            })?;
            use rustls::pki_types::pem::PemObject;
            let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| {
                    DecodeError::Transfer(format!(
                        "[tls] cert {}: no certificate",
                        t.cert.display()
                    ))
                })?;
            (server_tls, leaf.to_vec(), t.server_name.clone())
        }
        None => {
            let cert = SelfSigned::generate(&["localhost"])
                .map_err(|e| DecodeError::Transfer(e.to_string()))?;
            let server_tls = cert
                .server_config()
                .map_err(|e| DecodeError::Transfer(e.to_string()))?;
            (server_tls, cert.cert.to_vec(), "localhost".to_owned())
        }
    };
    let sink = Arc::new(ReservedSink::new(reservations.clone(), commands.clone()));
    let (receiver, quic_addr) = KvReceiver::bind_with(
        config.quic_listen,
        server_tls,
        sink,
        ReceiverConfig::default(),
        shutdown.clone(),
    )
    .map_err(|e| DecodeError::Transfer(e.to_string()))?;

    let advertised = |mut a: SocketAddr| {
        if let Some(ip) = advertise_ip
            && a.ip().is_unspecified()
        {
            a.set_ip(ip);
        }
        a
    };
    let quic_addrs: Vec<SocketAddr> = receiver
        .local_addrs()
        .map_err(|e| DecodeError::Transfer(e.to_string()))?
        .into_iter()
        .map(advertised)
        .collect();
    let endpoint = KvEndpoint {
        quic_addr: advertised(quic_addr).to_string(),
        quic_addrs: quic_addrs.iter().map(ToString::to_string).collect(),
        server_name,
        cert_der,
    };
    let kv_addrs = endpoint.quic_addrs.clone();
    let limits = Limits {
        max_batch: config.max_batch,
        max_batch_tokens: config.max_batch_tokens,
        prefix_cache: config.prefix_cache,
    };
    let scheduler = Scheduler::new(
        backend,
        model.clone(),
        limits,
        endpoint,
        reservations,
        stats.clone(),
        &config.id,
    );
    let loop_shutdown = shutdown.clone();
    let engine = std::thread::Builder::new()
        .name(format!("decode-{}", config.id))
        .spawn(move || scheduler.run(command_rx, loop_shutdown))
        .map_err(|e| DecodeError::Transfer(format!("cannot start the engine thread: {e}")))?;

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
        local_prefill_below: config.local_prefill_below,
        tp_size: u32::try_from(config.tp).unwrap_or(u32::MAX),
        block_size: u32::try_from(config.block_size).unwrap_or(u32::MAX),
        stats: stats.clone(),
        shutdown: shutdown.clone(),
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<DecodeNodeServer<DecodeService>>()
        .await;
    tracing::info!(id = %config.id, %grpc_addr, %quic_addr, "decode node serving");
    let done = tokio::spawn(async move {
        let result = server
            .add_service(health_service)
            .add_service(DecodeNodeServer::new(service))
            .serve_with_incoming_shutdown(
                listener::incoming(listener, "decode_grpc", conn_limits, shutdown.clone()),
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

    #[test]
    fn the_backend_is_sized_for_the_configured_batch() {
        let config =
            tandem_cluster::Config::parse("[decode]\nmax_batch = 300\nmax_batch_tokens = 5000\n")
                .unwrap()
                .decode
                .unwrap();
        assert_eq!(
            batch_limits(&config),
            BatchLimits {
                max_tokens: 5000,
                max_seqs: 300
            }
        );
    }
}
