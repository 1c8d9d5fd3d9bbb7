//! The router's node-choice policy, as `[router]` keys: which policy, and
//! the weights of KV-aware scoring. Its own module so the scoring's knobs
//! are documented in one place; the scoring itself is the router's.
//!
//! ```toml
//! [router]
//! routing = "kv_aware"          # or "least_loaded", "round_robin"
//! kv_overlap_weight = 1.0       # per KV block the node would still have to prefill
//! kv_load_weight = 1.0          # per KV block of load (queued prefill, in use)
//! kv_overload_threshold = 0.9   # KV in use past which a node's cached overlap counts for nothing
//! ```

use serde::Deserialize;

use crate::config::ConfigError;

/// How the router picks a decode node and a prefill node for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPolicy {
    /// Scores each node by the prompt blocks it already holds (from the
    /// nodes' KV events) against its load; the default.
    #[default]
    KvAware,
    /// The node with the most free KV blocks (decode) or the fewest queued
    /// prompt tokens (prefill), blind to caches.
    LeastLoaded,
    /// Each reachable node in turn, blind to load and caches (for comparison).
    RoundRobin,
}

pub(crate) fn default_overlap_weight() -> f64 {
    1.0
}
pub(crate) fn default_load_weight() -> f64 {
    1.0
}
pub(crate) fn default_overload_threshold() -> f64 {
    0.9
}

/// Checks the routing keys of `[router]`.
pub(crate) fn validate(
    overlap_weight: f64,
    load_weight: f64,
    overload_threshold: f64,
) -> Result<(), ConfigError> {
    for (key, v) in [
        ("router.kv_overlap_weight", overlap_weight),
        ("router.kv_load_weight", load_weight),
    ] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(ConfigError::Invalid(format!(
                "{key} must be a non-negative number, not {v}"
            )));
        }
    }
    if !(overload_threshold > 0.0 && overload_threshold <= 1.0) {
        return Err(ConfigError::Invalid(format!(
            "router.kv_overload_threshold must be a fraction of KV blocks in (0, 1], not {overload_threshold}"
        )));
    }
    Ok(())
}
