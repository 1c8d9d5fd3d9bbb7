//! The process's Prometheus recorder and its `GET /metrics` endpoint.
//!
//! [`install_recorder`] installs one recorder for the whole process (the
//! `metrics` facade has one global recorder), with the histogram buckets of
//! [`names::buckets`](crate::names::buckets) and every metric described; it
//! is idempotent, so `tandem up` and tests that start several roles in one
//! process share it. Install it before starting the roles: a role caches
//! some metric handles at start, and a handle taken before the recorder
//! exists records nowhere.
//!
//! [`serve_metrics`] binds the configured address (port 0 picks a free one;
//! the bound address is returned and logged) and answers `GET /metrics` with
//! the text exposition format. The exporter's own HTTP listener is not used,
//! so the endpoint hears the process's shutdown like every other server.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::header;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::TelemetryError;
use crate::names;

/// How often histogram samples are folded in when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The content type of Prometheus' text exposition format.
pub const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the process's Prometheus recorder (once; later calls return the
/// same handle). Fails if another recorder was installed first.
pub fn install_recorder() -> Result<PrometheusHandle, TelemetryError> {
    let mut installed = RECORDER.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let mut builder = PrometheusBuilder::new();
    for name in names::HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), names::buckets(name))
            .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    names::describe();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| TelemetryError::Recorder(format!("cannot start the upkeep thread: {e}")))?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// The process's metrics in the text exposition format, when its recorder is
/// installed (`None` otherwise): what another server of the process (the
/// router's HTTP API) answers on its own `/metrics`.
pub fn render() -> Option<String> {
    let installed = RECORDER.lock().unwrap_or_else(|p| p.into_inner());
    installed.as_ref().map(PrometheusHandle::render)
}

/// A `/metrics` endpoint that is serving.
#[derive(Debug, Clone, Copy)]
pub struct MetricsEndpoint {
    /// The bound address (the real port when the config asked for 0).
    pub addr: SocketAddr,
}

/// Installs the recorder if needed and serves `GET /metrics` on `addr` until
/// `shutdown` fires. Returns once listening.
pub async fn serve_metrics(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<MetricsEndpoint, TelemetryError> {
    let handle = install_recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move { ([(header::CONTENT_TYPE, EXPOSITION)], handle.render()) }
        }),
    );
    tracing::info!(addr = %bound, "Prometheus metrics at http://{bound}/metrics");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics endpoint failed");
        }
    });
    Ok(MetricsEndpoint { addr: bound })
}
