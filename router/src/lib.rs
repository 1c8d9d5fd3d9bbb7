//! Tandem's router: the client-facing `Generate` API in front of the
//! prefill and decode nodes.
//!
//! A request passes through, in order:
//! - [`auth`]: the client's API key and its rate limits;
//! - [`validation`]: checks the request and tokenizes the prompt;
//! - [`admission`]: a bounded gate (`max_running` in flight, `max_queue` waiting);
//! - [`nodes`] and [`choice`]: the cluster's nodes, their load, which one to use;
//! - [`generate`]: the request's life at the nodes, relaying tokens to the client;
//! - [`request_metrics`]: what is recorded about each request (latencies,
//!   tokens, final status), under `tandem_telemetry::names`.
//!
//! Each request runs in a `generate` span carrying its `request_id` (the
//! client's, from the request or its `x-request-id` metadata / header, else a
//! new one); the id travels to the nodes in `DecodeRequest` and
//! `PrefillRequest`, whose handlers log in spans with the same id.
//!
//! [`serve`] runs it all on a listening socket; [`service::GenerateService`]
//! is the bare service for embedding in another server.

pub mod admission;
pub mod auth;
pub mod choice;
pub mod client_grpc;
pub mod error;
pub mod generate;
pub mod nodes;
pub mod openai;
pub mod openai_fields;
pub mod openai_logprobs;
pub mod openai_structured;
pub mod request_metrics;
pub mod service;
pub mod validation;

use std::net::SocketAddr;
use std::sync::Arc;

use tandem_cluster::listener::{self, ConnectionLimits};
use tandem_cluster::{Membership, RouterSection};
use tandem_engine::ModelDir;
use tandem_proto::v1::generate_server::GenerateServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tracing::info;

pub use error::RouterError;
pub use service::GenerateService;
pub use validation::{ValidRequest, Validator};

/// A router that is listening.
#[derive(Debug)]
pub struct RunningRouter {
    /// The address it listens on (the real port when the config asked for 0).
    pub addr: SocketAddr,
    /// The OpenAI-compatible HTTP API's address, when `http_listen` is set.
    pub http_addr: Option<SocketAddr>,
    /// The server task; ends after `shutdown` fires and open streams close.
    pub join: JoinHandle<Result<(), RouterError>>,
}

/// Binds `config.listen` and serves `Generate` and `grpc.health.v1` until
/// `shutdown` fires. Returns once the socket is listening.
///
/// The client-facing API is plaintext gRPC and HTTP, guarded by API keys;
/// with `config.tls` the router's own calls to the nodes are mutual TLS.
///
/// `model_name` is the name clients may give in `GenerateRequest.model`
/// besides the model directory's name (`[model] name` in the config).
pub async fn serve(
    model: Arc<ModelDir>,
    model_name: Option<String>,
    config: RouterSection,
    membership: Arc<dyn Membership>,
    shutdown: CancellationToken,
) -> Result<RunningRouter, RouterError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RouterError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| RouterError::Bind {
        addr: config.listen,
        source,
    })?;
    let limits = ConnectionLimits::from(&config.connections);
    let name = model_name.clone().unwrap_or_else(|| model.name());
    let service = Arc::new(GenerateService::new(
        model.clone(),
        model_name,
        &config,
        membership,
        shutdown.clone(),
    )?);
    let http_addr = match config.http_listen {
        Some(http) => Some(
            serve_http(
                http,
                openai::app(service.clone(), model, name).layer(
                    axum::extract::DefaultBodyLimit::max(config.max_request_bytes),
                ),
                limits,
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    report_health(health_reporter, service.ready(), shutdown.clone()).await;
    // Server reflection, so `grpcurl` and other tools work without the .proto
    // files: v1 and v1alpha, over the client-facing descriptors only.
    let reflection = || {
        Ok::<_, RouterError>(
            tonic_reflection::server::Builder::configure()
                .register_file_descriptor_set(client_grpc::client_descriptors()?)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        )
    };
    let reflection_v1 = reflection()?
        .build_v1()
        .map_err(|e| RouterError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()?
        .build_v1alpha()
        .map_err(|e| RouterError::Reflection(e.to_string()))?;
    let max_request_bytes = config.max_request_bytes;
    let incoming = listener::incoming(listener, "router_grpc", limits, shutdown.clone());
    info!(%addr, "router listening");
    let join = tokio::spawn(async move {
        limits
            .grpc_server(Server::builder())
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(client_grpc::ClientGenerateServer::new(
                GenerateServer::from_arc(service).max_decoding_message_size(max_request_bytes),
            ))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await?;
        info!("router stopped");
        Ok(())
    });
    Ok(RunningRouter {
        addr,
        http_addr,
        join,
    })
}

/// Reports NOT_SERVING (for `Generate` and the whole server, `""`) until
/// `ready` turns true (the membership read once), then SERVING: a router
/// that just started does not turn requests away with "no decode node".
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut ready: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    let set = move |status| {
        let reporter = reporter.clone();
        async move {
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(
                    <GenerateServer<GenerateService> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
        }
    };
    if *ready.borrow_and_update() {
        set(ServingStatus::Serving).await;
        return;
    }
    set(ServingStatus::NotServing).await;
    tokio::spawn(async move {
        let read = tokio::select! {
            _ = shutdown.cancelled() => false,
            r = ready.wait_for(|r| *r) => r.is_ok(),
        };
        if read {
            set(ServingStatus::Serving).await;
            info!("membership read: serving");
        }
    });
}

/// Serves the OpenAI-compatible HTTP API on `addr` until `shutdown` fires.
///
/// hyper's HTTP/1 server directly rather than `axum::serve`, for its
/// header-read timeout: a request head that does not arrive within
/// `limits.header_timeout` (a slowloris client, or a kept-alive connection
/// sitting idle) closes the connection.
async fn serve_http(
    addr: SocketAddr,
    app: axum::Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> Result<SocketAddr, RouterError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RouterError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| RouterError::Bind { addr, source })?;
    info!(addr = %bound, "OpenAI-compatible HTTP API listening");
    let mut conns = listener::incoming(listener, "router_http", limits, shutdown.clone());
    tokio::spawn(async move {
        use tokio_stream::StreamExt;
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        // Ends when shutdown fires: the accept task stops and drops its sender.
        while let Some(Ok(stream)) = conns.next().await {
            let peer = stream.peer();
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let conn = graceful
                .watch(http1.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    if e.is_timeout() {
                        listener::count_header_timeout("router_http");
                    }
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
            });
        }
        // Open connections finish their responses (streams end as the
        // requests hear the same shutdown), then close.
        graceful.shutdown().await;
    });
    Ok(bound)
}
