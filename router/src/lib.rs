//! Tandem's router: the client-facing `Generate` API in front of the
//! prefill and decode nodes.
//!
//! A request passes through, in order:
//! - [`auth`]: the client's API key and its rate limits (and [`usage`]: what
//!   each key used, as metrics);
//! - [`validation`]: checks the request and tokenizes the prompt;
//! - [`admission`]: a bounded gate (`max_running` in flight, `max_queue` waiting),
//!   and a refusal while the prefill backlog ([`backlog`]) is past its bound;
//! - [`nodes`] and [`choice`]: the cluster's nodes, their load, which one to
//!   use; [`breaker`]: a circuit breaker per node; [`decode_queue`]: requests
//!   waiting for room at a decode node (`router.decode_waiting`), in order;
//! - [`generate`]: the request's life at the nodes, relaying tokens to the client;
//! - [`request_metrics`]: what is recorded about each request (latencies,
//!   tokens, final status), under `tandem_telemetry::names`;
//!   [`request_spans`]: where its time to first token went (the nodes'
//!   points on the router's clock; phases logged and recorded).
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
pub mod backlog;
pub mod breaker;
pub mod choice;
pub mod client_grpc;
pub mod cors;
pub mod decode_queue;
pub mod drain;
pub mod error;
pub mod generate;
pub mod http_access;
pub mod identity;
pub mod kv_index;
pub mod node_addr;
pub mod nodes;
pub mod openai;
pub mod openai_fields;
pub mod openai_logprobs;
pub mod openai_structured;
pub mod openai_tools;
pub mod openai_tools_prompt;
pub mod openai_tools_scan;
pub mod openai_tools_stream;
pub mod own_load;
pub mod prepaid;
pub mod request_metrics;
pub mod request_spans;
pub mod routing;
pub mod service;
pub mod usage;
pub mod validation;

use std::net::SocketAddr;
use std::sync::Arc;

use tandem_cluster::cert_reload::{CertFiles, ReloadingCert};
use tandem_cluster::listener::{self, ConnectionLimits};
use tandem_cluster::tls_listener::{self, ALPN_GRPC, ALPN_HTTP1, ServerTls, ServerTlsError};
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
    /// Stops admitting and counts admitted requests, for a drain before
    /// `shutdown` (see [`drain`]).
    pub drain: Arc<drain::Drain>,
    /// The router's view of the cluster's nodes, for status listings and
    /// tests (what it knows of their load and cached blocks).
    pub nodes: Arc<nodes::NodePool>,
}

/// Binds `config.listen` and serves `Generate` and `grpc.health.v1` until
/// `shutdown` fires. Returns once the socket is listening.
///
/// The client-facing API is gRPC and HTTP guarded by API keys, plaintext
/// unless `config.client_tls` (`[router.tls]`) turns TLS on for both
/// (optionally requiring client certificates); with `config.tls` the
/// router's own calls to the nodes are mutual TLS.
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
    let (grpc_tls, http_tls) = client_tls(&config, shutdown.clone())?;
    let name = model_name.clone().unwrap_or_else(|| model.name());
    // The cluster's model identity: pinned, or the router's own files'.
    let mut config = config;
    if config.model_fingerprint.is_none() {
        let m = model.clone();
        let fingerprint =
            tokio::task::spawn_blocking(move || tandem_cluster::ModelFingerprint::of(&m))
                .await
                .map_err(|e| RouterError::Fingerprint(e.to_string()))?
                .map_err(|e| RouterError::Fingerprint(e.to_string()))?;
        config.model_fingerprint = Some(fingerprint);
    }
    let service = Arc::new(GenerateService::new(
        model.clone(),
        model_name,
        &config,
        membership,
        shutdown.clone(),
    )?);
    let drain = service.drain();
    let nodes = service.nodes();
    let http_addr = match config.http_listen {
        Some(http) => Some(
            serve_http(
                http,
                openai::app(service.clone(), model, name)
                    .layer(axum::extract::DefaultBodyLimit::max(
                        config.max_request_bytes,
                    ))
                    // A preflight is answered before keys.
                    .layer(axum::middleware::from_fn_with_state(
                        Arc::new(cors::Cors::new(&config.http_allowed_origins)),
                        cors::layer,
                    ))
                    // Outermost: every answer counted and every refusal logged.
                    .layer(axum::middleware::from_fn(http_access::layer)),
                limits,
                http_tls,
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    report_health(health_reporter.clone(), service.ready(), shutdown.clone()).await;
    {
        // A draining router is not a target for new requests.
        let drain = drain.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while !drain.is_stopped() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                }
            }
            for name in [
                "",
                <GenerateServer<GenerateService> as tonic::server::NamedService>::NAME,
            ] {
                health_reporter
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        });
    }
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
    let incoming = tls_listener::incoming(
        listener,
        "router_grpc",
        limits,
        grpc_tls.as_ref(),
        shutdown.clone(),
    );
    info!(%addr, tls = grpc_tls.is_some(), "router listening");
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
        drain,
        nodes,
    })
}

/// The client-facing listeners' TLS from `[router.tls]` (gRPC, HTTP), one
/// certificate for both, reloaded when its files change until `shutdown`;
/// `(None, None)` without the section. A missing or unusable file is an
/// error naming it.
fn client_tls(
    config: &RouterSection,
    shutdown: CancellationToken,
) -> Result<(Option<ServerTls>, Option<ServerTls>), RouterError> {
    let Some(t) = &config.client_tls else {
        return Ok((None, None));
    };
    const SECTION: &str = "[router.tls]";
    let tls_err = |e: ServerTlsError| RouterError::ClientTls(e.to_string());
    let cert = ReloadingCert::load(CertFiles {
        section: SECTION,
        cert: t.cert.clone(),
        key: t.key.clone(),
    })
    .map_err(|e| tls_err(e.into()))?;
    let client_ca = t.client_ca.as_deref().map(|p| ("client_ca", p));
    let grpc = ServerTls::with_cert(cert.clone(), client_ca, ALPN_GRPC).map_err(tls_err)?;
    let http = ServerTls::with_cert(cert, client_ca, ALPN_HTTP1).map_err(tls_err)?;
    // One watcher: both configurations resolve through the same certificate.
    grpc.watch("router", shutdown);
    info!(
        cert = %t.cert.display(),
        client_certificates = t.client_ca.is_some(),
        "client-facing TLS on"
    );
    Ok((Some(grpc), Some(http)))
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
    tls: Option<ServerTls>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, RouterError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RouterError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| RouterError::Bind { addr, source })?;
    info!(addr = %bound, tls = tls.is_some(), "OpenAI-compatible HTTP API listening");
    let mut conns = tls_listener::incoming(
        listener,
        "router_http",
        limits,
        tls.as_ref(),
        shutdown.clone(),
    );
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
