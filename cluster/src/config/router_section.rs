//! The `[router]` section: its keys, their defaults, and the API-key list
//! it assembles. Split out of `config.rs` for length; re-exported there, so
//! `tandem_cluster::config::RouterSection` is unchanged.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ApiKeySection, ClientTlsSection, ConfigError, ConnectionsSection, TlsSection};

/// `[router]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// Address of the client-facing gRPC API.
    #[serde(default = "default_router_listen")]
    pub listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (`/v1/completions`,
    /// `/v1/chat/completions`, `/v1/models`, `/health`); absent: no HTTP API.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Origins whose pages may call the HTTP API from a browser (CORS), as
    /// vLLM's `--allowed-origins`: `["*"]` (the default) any, `[]` none.
    #[serde(default = "default_allowed_origins")]
    pub http_allowed_origins: Vec<String>,
    /// gRPC addresses of the prefill nodes (`http://host:port`); filled in by `tandem up`.
    #[serde(default)]
    pub prefill_nodes: Vec<String>,
    /// gRPC addresses of the decode nodes; filled in by `tandem up`.
    #[serde(default)]
    pub decode_nodes: Vec<String>,
    /// Requests running at once; more wait in the admission queue.
    #[serde(default = "default_max_running")]
    pub max_running: usize,
    /// Requests waiting for admission; more are refused with RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Requests this router keeps at a decode node beyond its `max_batch`
    /// (waiting there for their KV or a batch slot); more wait at the router,
    /// to be sent as the node finishes requests, so a saturated decode node
    /// holds no request that gets its first token and then waits for a slot.
    /// Absent: no limit (the node's KV blocks bound it).
    #[serde(default)]
    pub decode_waiting: Option<usize>,
    /// Deadline of a request from arrival to its last token, in seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: f64,
    /// How long a decode node waits for a request's KV to start coming (and
    /// then between its frames, so a long prompt's prefill is not cut), in
    /// milliseconds.
    #[serde(default = "default_kv_timeout")]
    pub kv_timeout_ms: u32,
    /// max_tokens when a chat, responses or gRPC request gives none; left
    /// out, the rest of the model's context (vLLM's default), at most
    /// `max_tokens_limit`. Completions default to 16, as vLLM's and OpenAI's.
    #[serde(default)]
    pub default_max_tokens: Option<u32>,
    /// Largest max_tokens a request may ask for.
    #[serde(default = "default_max_tokens_limit")]
    pub max_tokens_limit: u32,
    /// Largest `n` (parallel samples) and `best_of` a request may ask for;
    /// more is refused with INVALID_ARGUMENT / HTTP 400 naming the field.
    #[serde(default = "default_max_n")]
    pub max_n: u32,
    /// Interval of the nodes' load reports, in milliseconds.
    #[serde(default = "default_load_interval")]
    pub load_interval_ms: u32,
    /// API keys clients must send as `authorization: Bearer <key>`; with
    /// none here, in `api_keys_file` nor in `[[router.keys]]`, the router is
    /// open (the local default). Named `key-1`, `key-2`, ... in metrics, by
    /// position; `[[router.keys]]` gives keys their own names.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line: `<key>` or `<name> <key>` (blank
    /// lines and `#` comments skipped); read at start and added to
    /// `[[router.keys]]` (unnamed ones after `api_keys`, by position).
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// API keys with a name (the `key` label of the per-key usage metrics)
    /// and optionally their own limits.
    #[serde(default)]
    pub keys: Vec<ApiKeySection>,
    /// Requests per second each API key may make (token bucket, burst of one
    /// second); absent: unlimited. A key's `requests_per_s` overrides it.
    #[serde(default)]
    pub rate_limit_rps: Option<f64>,
    /// Tokens per minute each API key may use (token bucket holding a
    /// minute's worth): a request reserves its prompt tokens plus its
    /// `max_tokens` when admitted, and gets back what it did not generate
    /// when it ends. Absent: unlimited. A key's `tokens_per_min` overrides it.
    #[serde(default)]
    pub rate_limit_tokens_per_min: Option<f64>,
    /// TLS for the client-facing gRPC and HTTP APIs (`[router.tls]`);
    /// absent: plaintext (the local default).
    #[serde(default, rename = "tls")]
    pub client_tls: Option<ClientTlsSection>,
    /// Longest prompt, in tokens (besides the model's context); absent: the context.
    #[serde(default)]
    pub max_prompt_tokens: Option<u32>,
    /// Largest request message, in bytes: gRPC messages and HTTP bodies.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Longest KV wait a decode reservation gets, in milliseconds: the wait
    /// is `kv_timeout_ms` plus the prefill work queued ahead of the request
    /// at its measured rate, capped here. Equal to `kv_timeout_ms`: a fixed wait.
    #[serde(default = "default_kv_timeout_max")]
    pub kv_timeout_max_ms: u32,
    /// Admission refuses new requests (RESOURCE_EXHAUSTED, retry-after)
    /// while the prefill nodes' queued prompt tokens would take longer than
    /// this many seconds at their measured rate; 0 turns the check off.
    #[serde(default = "default_max_prefill_backlog")]
    pub max_prefill_backlog_s: f64,
    /// Failures of a node in a row that open its circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker first keeps a node out, in milliseconds
    /// (doubling after each failed trial, up to a minute).
    #[serde(default = "default_breaker_open")]
    pub breaker_open_ms: u32,
    /// Trial requests a half-open breaker lets through at a time.
    #[serde(default = "default_breaker_probes")]
    pub breaker_probes: u32,
    /// How nodes are chosen (`kv_aware`, `least_loaded`, `round_robin`); see
    /// [`crate::routing`].
    #[serde(default)]
    pub routing: crate::routing::RoutingPolicy,
    /// `kv_aware`: cost of each prompt block the node would still prefill.
    #[serde(default = "crate::routing::default_overlap_weight")]
    pub kv_overlap_weight: f64,
    /// `kv_aware`: cost of each block of load (queued prefill, KV in use).
    #[serde(default = "crate::routing::default_load_weight")]
    pub kv_load_weight: f64,
    /// `kv_aware`: fraction of KV blocks in use past which a node's cached
    /// blocks no longer attract requests.
    #[serde(default = "crate::routing::default_overload_threshold")]
    pub kv_overload_threshold: f64,

    /// The config's `[tls]` section, copied here by the loader (not a key of
    /// this section): with it the router dials nodes over mutual TLS.
    #[serde(skip)]
    pub tls: Option<TlsSection>,
    /// The config's `[connections]` section, copied here by the loader (not
    /// a key of this section): limits on the gRPC and HTTP listeners.
    #[serde(skip)]
    pub connections: ConnectionsSection,
    /// The config's `[model] fingerprint`, copied here by the loader (not a
    /// key of this section): the model identity the router pairs nodes by.
    #[serde(skip)]
    pub model_fingerprint: Option<crate::fingerprint::ModelFingerprint>,
}

fn default_max_request_bytes() -> usize {
    4 << 20
}
fn default_kv_timeout_max() -> u32 {
    120_000
}
fn default_max_prefill_backlog() -> f64 {
    10.0
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_open() -> u32 {
    5_000
}
fn default_breaker_probes() -> u32 {
    1
}

fn default_router_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
fn default_max_running() -> usize {
    512
}
pub(super) fn default_max_queue() -> usize {
    1024
}
fn default_request_timeout() -> f64 {
    300.0
}
fn default_allowed_origins() -> Vec<String> {
    vec!["*".into()]
}
fn default_kv_timeout() -> u32 {
    30_000
}
fn default_max_tokens_limit() -> u32 {
    8192
}
fn default_max_n() -> u32 {
    16
}
fn default_load_interval() -> u32 {
    50
}

impl Default for RouterSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every router field has a default"))
    }
}

impl RouterSection {
    /// Every API key with its name, in order: `api_keys` (named `key-1`,
    /// `key-2`, ... by position), then `[[router.keys]]` (and the named
    /// lines of `api_keys_file`).
    pub fn all_keys(&self) -> Vec<ApiKeySection> {
        let unnamed = self
            .api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| ApiKeySection {
                name: format!("key-{}", i + 1),
                key: k.clone(),
                requests_per_s: None,
                tokens_per_min: None,
            });
        unnamed.chain(self.keys.iter().cloned()).collect()
    }

    pub(super) fn validate_keys(&self) -> Result<(), ConfigError> {
        crate::client_access::validate_keys(&self.all_keys()).map_err(ConfigError::Invalid)
    }
}
