//! The config file: one TOML schema for every role.
//!
//! A file has a `[model]` section and one section per role it runs:
//! `[router]`, `[prefill]`, `[decode]`. `tandem up` runs every role present in
//! one process; `tandem router|prefill|decode --config FILE` runs one. Unknown
//! keys are errors, so a typo never silently falls back to a default.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::client_access::{ApiKeySection, ClientTlsSection};

mod router_section;
pub use router_section::RouterSection;

mod node_sections;
pub use node_sections::{DecodeSection, KvCacheDtype, PrefillSection};

/// The default `[model] path`: SmolLM2-135M-Instruct, which `tandem model fetch
/// smollm2` puts there and the roles fetch on first use.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the synthesized random-weight model lives: the fallback when the
/// default model cannot be fetched, and a tiny model for tests.
pub const SYNTH_MODEL_DIR: &str = "models/tandem-synth";

/// A config that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("bad config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value that parses but cannot work.
    #[error("bad config: {0}")]
    Invalid(String),
}

/// A whole config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The model every role serves.
    #[serde(default)]
    pub model: ModelSection,
    /// The router role.
    pub router: Option<RouterSection>,
    /// The prefill role.
    pub prefill: Option<PrefillSection>,
    /// The decode role.
    pub decode: Option<DecodeSection>,
    /// Mutual TLS between the router and nodes: the QUIC KV transport and
    /// the internal gRPC services; absent: the local default (plaintext
    /// gRPC, a self-signed certificate per decode node's QUIC receiver, no
    /// client certificates).
    pub tls: Option<TlsSection>,
    /// How nodes find each other: static (the router's node lists) unless
    /// `[membership.etcd]` is set.
    #[serde(default)]
    pub membership: MembershipSection,
    /// This process's Prometheus endpoint; absent: no metrics are recorded or served.
    pub metrics: Option<MetricsSection>,
    /// Limits on every TCP listener of the process (router gRPC and HTTP,
    /// node gRPC), so half-open and slow connections cannot pile up.
    #[serde(default)]
    pub connections: ConnectionsSection,
}

/// `[connections]`: what every TCP listener of the process (the router's
/// gRPC and HTTP APIs, each node's internal gRPC service) allows a
/// connection, each listener on its own. Connections closed under these
/// limits are counted in `tandem_connections_rejected_total`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsSection {
    /// Open connections per listener; one more is accepted and closed at once.
    /// Keep the sum over a process's listeners under its open-files limit
    /// (`ulimit -n`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a connection has to start: an HTTP/2 (gRPC) connection to send
    /// its preface (and, with `[tls]`, finish its TLS handshake), an HTTP/1
    /// request to send its request line and headers. It is also how long an
    /// HTTP/1 connection may sit idle between requests.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_s: f64,
    /// Seconds between HTTP/2 keep-alive pings on a gRPC connection (and TCP
    /// keep-alive probes on every connection): a peer that stops answering
    /// is found out.
    #[serde(default = "default_keepalive_interval")]
    pub keepalive_interval_s: f64,
    /// Seconds a gRPC peer has to acknowledge a keep-alive ping before its
    /// connection is closed.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_s: f64,
}

fn default_max_connections() -> usize {
    2048
}
fn default_header_timeout() -> f64 {
    10.0
}
fn default_keepalive_interval() -> f64 {
    30.0
}
fn default_keepalive_timeout() -> f64 {
    10.0
}

impl Default for ConnectionsSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every connections field has a default"))
    }
}

impl ConnectionsSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "connections.max_connections must be at least 1".into(),
            ));
        }
        for (key, v) in [
            ("header_timeout_s", self.header_timeout_s),
            ("keepalive_interval_s", self.keepalive_interval_s),
            ("keepalive_timeout_s", self.keepalive_timeout_s),
        ] {
            // At most a day: a larger value is a typo, and Duration overflows past u64 seconds.
            if !(v > 0.0 && v <= 86_400.0) {
                return Err(ConfigError::Invalid(format!(
                    "connections.{key} ({v}) must be a positive number of seconds, at most 86400"
                )));
            }
        }
        Ok(())
    }
}

/// `[metrics]`: where this process serves Prometheus' `GET /metrics`. One
/// endpoint per process: `tandem up` serves every role's metrics on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the `/metrics` endpoint; port 0 picks a free one (logged at start).
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

/// `[membership]`: static by default; with `[membership.etcd]`, nodes register
/// in etcd under a lease and the router watches them come and go.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipSection {
    /// etcd membership; absent: static membership from `router.prefill_nodes`
    /// and `router.decode_nodes`.
    pub etcd: Option<EtcdSection>,
    /// The IP address other hosts reach this node at, registered in etcd and
    /// handed to prefill nodes as the decode node's KV address. Needed when a
    /// node listens on an unspecified address (`0.0.0.0`); default: the
    /// listen address. `--advertise-ip` overrides it (e.g. a pod's IP).
    pub advertise_ip: Option<IpAddr>,
    /// How long a stopping node waits for its in-flight requests after leaving
    /// the membership, in seconds.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_s: f64,
}

fn default_drain_timeout() -> f64 {
    30.0
}

/// `[membership.etcd]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// etcd client URLs, e.g. `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// Cluster name: nodes register under `/tandem/<cluster>/nodes/<role>/<id>`.
    #[serde(default = "default_cluster_name")]
    pub cluster: String,
    /// TTL of a node's lease in seconds: a node that stops answering (crashed,
    /// paused, cut off) leaves the membership this long after its last keep-alive.
    /// The router keeps nodes missing from a re-listing after an etcd outage
    /// for its own `lease_ttl_s` + 2 s, so set it no lower than the nodes'.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: u32,
}

fn default_cluster_name() -> String {
    "tandem".into()
}
fn default_lease_ttl() -> u32 {
    5
}

/// `[tls]`: the cluster CA and this process's certificate, PEM files as
/// written by `tandem certs`. With it, every connection between the router
/// and the nodes is mutual TLS, each side presenting `cert` and checking the
/// other's against `ca`:
///
/// - QUIC KV: the decode node's receiver requires a client certificate; the
///   prefill node verifies the receiver and presents its own.
/// - Internal gRPC (`DecodeNode`, `PrefillNode`, their health service): the
///   nodes serve TLS only and require a client certificate; the router and
///   `tandem status` dial `https://` addresses, verify the node and present
///   theirs. Node addresses are `https://host:port`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The cluster CA's certificate.
    pub ca: PathBuf,
    /// This process's certificate (chain, leaf first), signed by `ca`.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
    /// This node's name, a SAN of `cert`: advertised to peers (in etcd and
    /// in KV targets), which check this node's certificate against it.
    /// Default `localhost`. With static membership the router checks a
    /// node's certificate against the host of its address instead.
    #[serde(default = "default_tls_server_name")]
    pub server_name: String,
}

fn default_tls_server_name() -> String {
    "localhost".into()
}

/// Which compute backend runs the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// candle on the CPU.
    #[default]
    Cpu,
    /// The CUDA backend (needs a build with `--features cuda`).
    Cuda,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory or a GGUF file. The default is
    /// SmolLM2-135M-Instruct, fetched on first use (a small random-weight model
    /// where it cannot be fetched).
    #[serde(default = "default_model_path")]
    pub path: PathBuf,
    /// Name clients use for the model; default: the directory's name, or a
    /// GGUF file's `general.name` (else its file stem).
    pub name: Option<String>,
    /// Compute backend.
    #[serde(default)]
    pub backend: BackendKind,
    /// GPU index for the CUDA backend.
    #[serde(default)]
    pub device: usize,
    /// Pins the cluster's model identity (`c<hex>.t<hex>.p<hex>.w<hex>`, as
    /// `tandem status` shows it): the router routes only to nodes whose
    /// fingerprint is this one. Absent: the fingerprint of the router's own
    /// model files (see `tandem_cluster::fingerprint`).
    #[serde(default)]
    pub fingerprint: Option<crate::fingerprint::ModelFingerprint>,
}

fn default_model_path() -> PathBuf {
    PathBuf::from(DEFAULT_MODEL_PATH)
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: default_model_path(),
            name: None,
            backend: BackendKind::Cpu,
            device: 0,
            fingerprint: None,
        }
    }
}

impl Config {
    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            // Name the file: a deployment reads several.
            ConfigError::Invalid(message) => {
                ConfigError::Invalid(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        let mut config = config;
        config.read_key_files()?;
        if let Some(p) = config.prefill.as_mut() {
            p.tls = config.tls.clone();
            p.connections = config.connections.clone();
        }
        if let Some(d) = config.decode.as_mut() {
            d.tls = config.tls.clone();
            d.connections = config.connections.clone();
        }
        if let Some(r) = config.router.as_mut() {
            r.tls = config.tls.clone();
            r.connections = config.connections.clone();
            r.model_fingerprint = config.model.fingerprint;
        }
        config.validate()?;
        Ok(config)
    }

    /// Adds the keys of `router.api_keys_file` to `router.api_keys`.
    fn read_key_files(&mut self) -> Result<(), ConfigError> {
        let Some(r) = self.router.as_mut() else {
            return Ok(());
        };
        if let Some(path) = &r.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.clone(),
                source,
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    [key] => r.api_keys.push((*key).to_owned()),
                    [name, key] => r.keys.push(ApiKeySection {
                        name: (*name).to_owned(),
                        key: (*key).to_owned(),
                        requests_per_s: None,
                        tokens_per_min: None,
                    }),
                    _ => {
                        return Err(ConfigError::Invalid(format!(
                            "router.api_keys_file {} line {}: expected `<key>` or `<name> <key>`",
                            path.display(),
                            i + 1
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.prefill {
            p.validate()?;
        }
        if let Some(d) = &self.decode
            && d.gpu_priority != tandem_engine::GpuPriority::Normal
            && self.model.backend != BackendKind::Cuda
        {
            return Err(ConfigError::Invalid(
                "decode.gpu_priority ranks CUDA streams: it needs [model] backend = \"cuda\""
                    .into(),
            ));
        }
        if let Some(d) = &self.decode
            && (d.block_size == 0
                || d.max_batch == 0
                || d.kv_blocks == 0
                || d.max_batch_tokens == 0)
        {
            return Err(ConfigError::Invalid(
                "decode.block_size, max_batch, kv_blocks and max_batch_tokens must be positive"
                    .into(),
            ));
        }
        if let Some(d) = &self.decode
            && d.max_batch > d.max_batch_tokens
        {
            // Every running sequence takes a token per step, and the backend
            // sizes its buffers for this many tokens.
            return Err(ConfigError::Invalid(format!(
                "decode.max_batch ({}) must not exceed decode.max_batch_tokens ({}): each sequence in a step takes at least one token",
                d.max_batch, d.max_batch_tokens
            )));
        }
        if self.decode.as_ref().is_some_and(|d| d.tp == 0) {
            return Err(ConfigError::Invalid("decode.tp must be at least 1".into()));
        }
        if let Some(r) = self.decode.as_ref().and_then(|d| d.default_link_rate_mbps)
            && !(r.is_finite() && r > 0.0)
        {
            return Err(ConfigError::Invalid(format!(
                "decode.default_link_rate_mbps ({r}) must be a positive number"
            )));
        }
        if let (Some(p), Some(d)) = (&self.prefill, &self.decode)
            && p.block_size != d.block_size
        {
            return Err(ConfigError::Invalid(format!(
                "prefill.block_size ({}) and decode.block_size ({}) must match",
                p.block_size, d.block_size
            )));
        }
        if let Some(r) = &self.router
            && (r.max_running == 0 || r.default_max_tokens == Some(0) || r.request_timeout_s <= 0.0)
        {
            return Err(ConfigError::Invalid(
                "router.max_running, default_max_tokens and request_timeout_s must be positive"
                    .into(),
            ));
        }
        if let Some(r) = &self.router {
            if r.rate_limit_rps
                .is_some_and(|v| !(v > 0.0 && v.is_finite()))
                || r.rate_limit_tokens_per_min
                    .is_some_and(|v| !(v > 0.0 && v.is_finite()))
            {
                return Err(ConfigError::Invalid(
                    "router.rate_limit_rps and rate_limit_tokens_per_min must be positive".into(),
                ));
            }
            r.validate_keys()?;
            if r.kv_timeout_max_ms < r.kv_timeout_ms {
                return Err(ConfigError::Invalid(
                    "router.kv_timeout_max_ms must be at least router.kv_timeout_ms".into(),
                ));
            }
            if !(r.max_prefill_backlog_s >= 0.0 && r.max_prefill_backlog_s.is_finite()) {
                return Err(ConfigError::Invalid(
                    "router.max_prefill_backlog_s must be a non-negative number of seconds (0: off)"
                        .into(),
                ));
            }
            if r.breaker_failures == 0 || r.breaker_probes == 0 || r.breaker_open_ms == 0 {
                return Err(ConfigError::Invalid(
                    "router.breaker_failures, breaker_open_ms and breaker_probes must be at least 1"
                        .into(),
                ));
            }
            crate::routing::validate(
                r.kv_overlap_weight,
                r.kv_load_weight,
                r.kv_overload_threshold,
            )?;
            if r.max_request_bytes < 1024 {
                return Err(ConfigError::Invalid(
                    "router.max_request_bytes must be at least 1024".into(),
                ));
            }
            let tls = self.tls.is_some();
            for (key, addrs) in [
                ("router.prefill_nodes", &r.prefill_nodes),
                ("router.decode_nodes", &r.decode_nodes),
            ] {
                for addr in addrs {
                    let full = crate::node_scheme::with_scheme(addr, tls);
                    crate::node_scheme::check_scheme(&full, tls)
                        .map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))?;
                }
            }
        }
        if let (Some(_), Some(r)) = (&self.membership.etcd, &self.router)
            && !(r.prefill_nodes.is_empty() && r.decode_nodes.is_empty())
        {
            return Err(ConfigError::Invalid(
                "router.prefill_nodes and router.decode_nodes must be empty with membership.etcd: nodes register themselves in etcd".into(),
            ));
        }
        self.connections.validate()?;
        self.membership.validate()
    }
}

impl MembershipSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.drain_timeout_s >= 0.0 && self.drain_timeout_s.is_finite()) {
            return Err(ConfigError::Invalid(
                "membership.drain_timeout_s must be a non-negative number of seconds".into(),
            ));
        }
        let Some(etcd) = &self.etcd else {
            return Ok(());
        };
        if etcd.endpoints.is_empty() {
            return Err(ConfigError::Invalid(
                "membership.etcd.endpoints must name at least one etcd endpoint".into(),
            ));
        }
        if etcd.lease_ttl_s == 0 {
            return Err(ConfigError::Invalid(
                "membership.etcd.lease_ttl_s must be at least 1".into(),
            ));
        }
        let bad_name = |c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if etcd.cluster.is_empty() || etcd.cluster.contains(bad_name) {
            return Err(ConfigError::Invalid(format!(
                "membership.etcd.cluster ({:?}) must be letters, digits, '-', '_' or '.'",
                etcd.cluster
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
