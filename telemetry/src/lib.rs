//! Tandem's observability: what every process exports and logs.
//!
//! - [`names`]: the name of every metric Tandem exports (one list, which the
//!   Grafana dashboard's test checks its queries against), their labels and
//!   descriptions. Crates record with the `metrics` macros under these names,
//!   where the fact is known: the router records latencies, tokens and request
//!   outcomes, nodes record KV blocks, batches and transfers.
//! - [`exporter`]: installs the process's Prometheus recorder and serves
//!   `GET /metrics` on the configured address (`[metrics] listen`).
//! - [`logs`]: the `tracing` subscriber, as text or JSON lines.
//!
//! One process has one recorder: `tandem up` runs every role under one
//! exporter, and a role's own process under its own. Without a recorder
//! (no `[metrics]` section) the macros cost next to nothing.

pub mod exporter;
pub mod logs;
pub mod names;

pub use exporter::{EXPOSITION, MetricsEndpoint, install_recorder, render, serve_metrics};
pub use logs::{LogFormat, init_logs};

/// Why observability could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The Prometheus recorder could not be built or installed.
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    /// The log subscriber could not be installed.
    #[error("cannot install the log subscriber: {0}")]
    Logs(String),
}
