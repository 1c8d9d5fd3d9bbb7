//! The node sections, `[prefill]` and `[decode]`: their keys, their
//! defaults, and the prefill values that parse but cannot work. Split out of
//! `config.rs` for length; re-exported there, so the public paths are
//! unchanged.

use super::router_section::default_max_queue;
use super::*;

/// `[prefill]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillSection {
    /// Node id (in logs and load reports).
    #[serde(default = "default_prefill_id")]
    pub id: String,
    /// Address of the internal gRPC service.
    #[serde(default = "loopback_any")]
    pub listen: SocketAddr,
    /// KV blocks of the prefill node's own cache (the prompts being prefilled).
    #[serde(default = "default_prefill_blocks")]
    pub kv_blocks: usize,
    /// Element type of this node's KV cache: `auto` (the backend's own: f32
    /// on the CPU, bf16 on CUDA) or `fp8_e4m3` (half a bf16 cache's bytes per
    /// token, a quarter of f32's; CPU and CUDA backends). An fp8 decode node
    /// takes KV from any prefill node (quantizing wider KV on import); an fp8
    /// prefill node can feed only fp8 decode nodes.
    #[serde(default)]
    pub kv_dtype: KvCacheDtype,
    /// Tokens per KV block (must equal the decode nodes').
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// A request's share of a forward pass while other requests wait to be
    /// prefilled (a multiple of block_size); a request takes more of
    /// `max_batch_tokens` when the others leave it unused, so a prompt
    /// prefilled alone needs as few passes as that budget allows.
    #[serde(default = "default_chunk")]
    pub chunk_tokens: usize,
    /// Most prompt tokens per forward pass over all requests.
    #[serde(default = "default_prefill_budget")]
    pub max_batch_tokens: usize,
    /// Requests waiting to be prefilled; more are refused with RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// QUIC connections to each decode node.
    #[serde(default = "default_kv_connections")]
    pub kv_connections: usize,
    /// Tensor-parallel ranks the model is sharded over (CPU: threads). Any
    /// size works with any decode node's: each rank ships its own KV heads.
    #[serde(default = "default_tp")]
    pub tp: usize,

    /// Keep computed prompt blocks for reuse by later prompts with the same
    /// prefix (the prefix cache); `false` computes every prompt in full.
    #[serde(default = "default_true")]
    pub prefix_cache: bool,
    /// A cap on the KV this node sends to each decode node, in megabits per
    /// second (a token bucket over all its transfers to that node); none by
    /// default. For testing a slow link for real, or sharing a network.
    #[serde(default)]
    pub max_send_rate_mbps: Option<f64>,
    /// Give each KV frame an xxh3 checksum the decode node verifies. QUIC
    /// already authenticates every packet, so this only catches a framing
    /// bug, for about a quarter of a transfer's CPU; off by default.
    #[serde(default)]
    pub kv_checksum: bool,

    /// The config's `[tls]` section, copied here by the loader (not a key of
    /// this section); `None`: the local default.
    #[serde(skip)]
    pub tls: Option<TlsSection>,
    /// The config's `[connections]` section, copied here by the loader (not
    /// a key of this section): limits on the gRPC listener.
    #[serde(skip)]
    pub connections: ConnectionsSection,
}

fn default_tpot_budget_ms() -> u64 {
    50
}
/// A node's `kv_dtype` key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheDtype {
    /// The backend's own dtype (f32 on the CPU, bf16 on CUDA).
    #[default]
    Auto,
    /// bfloat16: CUDA's own; on the CPU half of f32's memory, and the KV a
    /// CUDA node sends (so a CPU node pairs with CUDA nodes).
    #[serde(alias = "bfloat16")]
    Bf16,
    /// FP8 e4m3 with per-(block, K/V, head) scales.
    Fp8E4m3,
}

impl KvCacheDtype {
    /// The dtype to ask the engine for (`None`: the backend's own).
    pub fn engine(self) -> Option<tandem_engine::KvDtype> {
        match self {
            KvCacheDtype::Auto => None,
            KvCacheDtype::Bf16 => Some(tandem_engine::KvDtype::Bf16),
            KvCacheDtype::Fp8E4m3 => Some(tandem_engine::KvDtype::Fp8E4m3),
        }
    }
}

fn default_prefill_id() -> String {
    "prefill-0".into()
}
fn default_decode_id() -> String {
    "decode-0".into()
}
fn loopback_any() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_prefill_blocks() -> usize {
    1024
}
fn default_decode_blocks() -> usize {
    4096
}
fn default_block_size() -> usize {
    16
}
fn default_chunk() -> usize {
    256
}
fn default_prefill_budget() -> usize {
    1024
}
fn default_kv_connections() -> usize {
    2
}
fn default_max_batch() -> usize {
    64
}
fn default_true() -> bool {
    true
}
fn default_tp() -> usize {
    1
}
fn default_local_prefill_below() -> usize {
    32
}

/// `[decode]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSection {
    /// Node id (in logs and load reports).
    #[serde(default = "default_decode_id")]
    pub id: String,
    /// Address of the internal gRPC service.
    #[serde(default = "loopback_any")]
    pub listen: SocketAddr,
    /// Address of the QUIC KV receiver.
    #[serde(default = "loopback_any")]
    pub quic_listen: SocketAddr,
    /// KV blocks of the cache.
    #[serde(default = "default_decode_blocks")]
    pub kv_blocks: usize,
    /// Element type of this node's KV cache: `auto` (the backend's own: f32
    /// on the CPU, bf16 on CUDA) or `fp8_e4m3` (half a bf16 cache's bytes per
    /// token, a quarter of f32's; CPU and CUDA backends). An fp8 decode node
    /// takes KV from any prefill node (quantizing wider KV on import); an fp8
    /// prefill node can feed only fp8 decode nodes.
    #[serde(default)]
    pub kv_dtype: KvCacheDtype,
    /// Tokens per KV block.
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Most sequences in one decode step.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Most tokens per step (decode tokens plus local prefill chunks).
    #[serde(default = "default_prefill_budget")]
    pub max_batch_tokens: usize,
    /// Prompts shorter than this are prefilled here instead of on a prefill node
    /// (conditional disaggregation). A very large value makes this a colocated engine.
    #[serde(default = "default_local_prefill_below")]
    pub local_prefill_below: usize,
    /// Tensor-parallel ranks the model is sharded over (CPU: threads); each
    /// rank receives the KV heads it owns, whatever the prefill node's TP.
    #[serde(default = "default_tp")]
    pub tp: usize,

    /// Keep computed prompt blocks for reuse by later prompts with the same
    /// prefix (the prefix cache); `false` computes every prompt in full.
    #[serde(default = "default_true")]
    pub prefix_cache: bool,
    /// Prefill a long prompt here too when shipping its KV from the prefill
    /// node (at the rate measured from that node, plus its queue) would
    /// delay its first token more than prefilling it here takes, and the
    /// running batch can absorb that (`tpot_budget_ms`).
    #[serde(default = "default_true")]
    pub link_cost_prefill: bool,
    /// The KV rate assumed from a prefill node not yet measured, in
    /// megabits per second; none: assumed fast (the prompt goes remote).
    #[serde(default)]
    pub default_link_rate_mbps: Option<f64>,
    /// The stall a local prefill may add to the running batch's steps, in
    /// milliseconds, for `link_cost_prefill`.
    #[serde(default = "default_tpot_budget_ms")]
    pub tpot_budget_ms: u64,
    /// A first token that comes from the prefill node (ahead of the KV) while
    /// `max_batch` sequences are decoding here waits for a place in the batch
    /// and goes out with the step that computes the second token, so no
    /// caller sees a gap longer than a step between its first two tokens (the
    /// wait shows in its time to first token, as on a colocated node or a
    /// vLLM decode instance); `false` sends it on arrival (an earlier first
    /// token, then the wait before the second).
    #[serde(default = "default_true")]
    pub hold_first_token: bool,
    /// The rank of this node's GPU work (CUDA stream priority) against a
    /// prefill node's on the same GPU: `normal` (the default), `high`, where
    /// a freed multiprocessor goes to a waiting decode kernel first, or `auto`,
    /// `high` for steps of at least 32 sequences and `normal` below. It counts
    /// where both nodes' kernels run side by side: one `tandem up` process, or
    /// two processes under the CUDA MPS daemon (README, "GPUs"). CUDA only.
    #[serde(default)]
    pub gpu_priority: tandem_engine::GpuPriority,

    /// The config's `[tls]` section, copied here by the loader (not a key of
    /// this section); `None`: the local default.
    #[serde(skip)]
    pub tls: Option<TlsSection>,
    /// The config's `[connections]` section, copied here by the loader (not
    /// a key of this section): limits on the gRPC listener.
    #[serde(skip)]
    pub connections: ConnectionsSection,
}

impl PrefillSection {
    /// Checks the values that parse but cannot work. [`Config::parse`] calls
    /// it; a prefill node calls it again at start for a section built in
    /// code (tests, `tandem up`'s overrides), so this is the one place the
    /// rules live.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.block_size == 0
            || self.chunk_tokens == 0
            || !self.chunk_tokens.is_multiple_of(self.block_size)
        {
            return Err(ConfigError::Invalid(format!(
                "prefill.chunk_tokens ({}) must be a positive multiple of prefill.block_size ({})",
                self.chunk_tokens, self.block_size
            )));
        }
        if self.max_batch_tokens == 0
            || self.max_queue == 0
            || self.kv_blocks == 0
            || self.kv_connections == 0
        {
            return Err(ConfigError::Invalid(
                "prefill.max_batch_tokens, max_queue, kv_blocks and kv_connections must be positive"
                    .into(),
            ));
        }
        if self.tp == 0 {
            return Err(ConfigError::Invalid("prefill.tp must be at least 1".into()));
        }
        if let Some(r) = self.max_send_rate_mbps
            && !(r.is_finite() && r > 0.0)
        {
            return Err(ConfigError::Invalid(format!(
                "prefill.max_send_rate_mbps ({r}) must be a positive number"
            )));
        }
        Ok(())
    }
}
