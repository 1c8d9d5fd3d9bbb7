//! The routing policies: which node of a role gets a request, from the
//! nodes' load reports and (for `kv_aware`) the prompt tokens each already
//! holds in its prefix cache ([`KvIndex`](crate::kv_index::KvIndex)). Pure
//! functions, tested without a network; [`choice`](crate::choice) holds the
//! least-loaded ranking they fall back on.
//!
//! **`kv_aware`** (the default) gives each node a cost in KV blocks of the
//! node's block size, and picks the cheapest:
//!
//! ```text
//! cost = kv_overlap_weight * (prompt blocks - blocks cached on the node)
//!      + kv_load_weight    * (queued prefill blocks + KV blocks in use + sequences running or queued)
//! ```
//!
//! The first term is the prefill the request would still need there (what
//! the cache saves); the second is the work the node already has (its
//! queued prompts, the KV its running sequences hold, one block per
//! sequence for the per-sequence cost of a step). A node whose KV in use
//! reaches `kv_overload_threshold` of its blocks is credited with no cached
//! blocks: past that, the cache no longer draws requests to a node that is
//! about to refuse them. Ties, and nodes without reports, fall back on the
//! least-loaded order; unreachable nodes always rank last.

use std::cmp::Ordering;

use tandem_cluster::{RouterSection, RoutingPolicy};

use crate::choice::NodeStatus;

/// Block size assumed for a node whose reports carry none.
const FALLBACK_BLOCK_SIZE: u64 = 16;

/// The `[router]` routing keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingConfig {
    /// The policy.
    pub policy: RoutingPolicy,
    /// Cost of each prompt block the node would still prefill.
    pub overlap_weight: f64,
    /// Cost of each block of load.
    pub load_weight: f64,
    /// Fraction of KV blocks in use past which cached blocks count for nothing.
    pub overload_threshold: f64,
    /// Requests kept at a decode node beyond its `max_batch`; `None`: no limit.
    pub decode_waiting: Option<usize>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig::from(&RouterSection::default())
    }
}

impl From<&RouterSection> for RoutingConfig {
    fn from(r: &RouterSection) -> Self {
        RoutingConfig {
            policy: r.routing,
            overlap_weight: r.kv_overlap_weight,
            load_weight: r.kv_load_weight,
            overload_threshold: r.kv_overload_threshold,
            decode_waiting: r.decode_waiting,
        }
    }
}

/// A node's `kv_aware` cost for a request of `prompt_tokens` tokens of
/// which it holds the first `cached_tokens`.
pub fn kv_cost(
    node: &NodeStatus,
    prompt_tokens: usize,
    cached_tokens: usize,
    config: &RoutingConfig,
) -> f64 {
    let Some(load) = &node.load else {
        // No report yet: idle, and nothing known cached.
        let blocks = (prompt_tokens as u64).div_ceil(FALLBACK_BLOCK_SIZE);
        return config.overlap_weight * blocks as f64;
    };
    let bs = match load.block_size {
        0 => FALLBACK_BLOCK_SIZE,
        n => u64::from(n),
    };
    let prompt_blocks = (prompt_tokens as u64).div_ceil(bs);
    let total = u64::from(load.kv_blocks_total);
    let used = total.saturating_sub(u64::from(load.kv_blocks_free));
    let cached_blocks = if is_overloaded(node, config) {
        0
    } else {
        (cached_tokens as u64 / bs).min(prompt_blocks)
    };
    let uncached = prompt_blocks - cached_blocks;
    let busy = load.queued_prefill_tokens.div_ceil(bs)
        + used
        + u64::from(load.running)
        + u64::from(load.queued);
    config.overlap_weight * uncached as f64 + config.load_weight * busy as f64
}

/// Whether a node's KV in use has reached the overload threshold.
pub fn is_overloaded(node: &NodeStatus, config: &RoutingConfig) -> bool {
    let Some(load) = &node.load else {
        return false;
    };
    let total = f64::from(load.kv_blocks_total);
    let used = total - f64::from(load.kv_blocks_free.min(load.kv_blocks_total));
    total > 0.0 && used / total >= config.overload_threshold
}

/// Indices of `nodes`, best first, by `kv_aware` cost; `least_loaded` is
/// the least-loaded order (every index once), which breaks ties.
pub fn rank_kv_aware(
    nodes: &[NodeStatus],
    least_loaded: Vec<usize>,
    prompt_tokens: usize,
    cached_tokens: &[usize],
    config: &RoutingConfig,
) -> Vec<usize> {
    let cost: Vec<f64> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let cached = cached_tokens.get(i).copied().unwrap_or(0);
            kv_cost(n, prompt_tokens, cached, config)
        })
        .collect();
    let mut order = least_loaded;
    // A stable sort: equal costs keep the least-loaded order.
    order.sort_by(|&a, &b| {
        (!nodes[a].reachable)
            .cmp(&!nodes[b].reachable)
            .then_with(|| cost[a].partial_cmp(&cost[b]).unwrap_or(Ordering::Equal))
    });
    order
}

/// Indices of `nodes` in turn: the reachable ones in input order, rotated
/// by `turn`, then the unreachable ones.
pub fn rank_round_robin(nodes: &[NodeStatus], turn: usize) -> Vec<usize> {
    let (mut up, down): (Vec<usize>, Vec<usize>) =
        (0..nodes.len()).partition(|&i| nodes[i].reachable);
    if !up.is_empty() {
        let k = turn % up.len();
        up.rotate_left(k);
    }
    up.extend(down);
    up
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::v1::NodeLoad;

    fn node(free: u32, running: u32, queued_tokens: u64) -> NodeStatus {
        NodeStatus {
            load: Some(NodeLoad {
                kv_blocks_total: 100,
                kv_blocks_free: free,
                running,
                queued_prefill_tokens: queued_tokens,
                block_size: 16,
                ..Default::default()
            }),
            reachable: true,
        }
    }

    #[test]
    fn the_node_holding_the_prefix_wins_at_equal_load() {
        let config = RoutingConfig::default();
        let nodes = [node(90, 1, 0), node(90, 1, 0)];
        // 640 prompt tokens = 40 blocks; node 1 holds 512 of them.
        let order = rank_kv_aware(&nodes, vec![0, 1], 640, &[0, 512], &config);
        assert_eq!(order, vec![1, 0]);
        assert_eq!(kv_cost(&nodes[1], 640, 512, &config), 8.0 + 11.0);
        // And still against a little more load.
        let nodes = [node(90, 1, 0), node(80, 3, 0)];
        assert_eq!(
            rank_kv_aware(&nodes, vec![0, 1], 640, &[0, 512], &config),
            vec![1, 0]
        );
    }

    #[test]
    fn load_outweighs_a_small_overlap_and_weights_shift_the_balance() {
        let config = RoutingConfig::default();
        // Node 1 holds 2 blocks but has 20 blocks of prefill queued.
        let nodes = [node(90, 1, 0), node(90, 1, 320)];
        assert_eq!(
            rank_kv_aware(&nodes, vec![0, 1], 640, &[0, 32], &config),
            vec![0, 1]
        );
        let cache_first = RoutingConfig {
            overlap_weight: 20.0,
            ..config
        };
        assert_eq!(
            rank_kv_aware(&nodes, vec![0, 1], 640, &[0, 32], &cache_first),
            vec![1, 0]
        );
    }

    #[test]
    fn past_the_overload_threshold_overlap_no_longer_wins() {
        let config = RoutingConfig {
            overload_threshold: 0.9,
            load_weight: 0.0,
            ..RoutingConfig::default()
        };
        // Even with load weighing nothing, the full node's cache is ignored.
        let nodes = [node(50, 0, 0), node(5, 0, 0)];
        assert!(is_overloaded(&nodes[1], &config));
        assert_eq!(
            rank_kv_aware(&nodes, vec![0, 1], 640, &[0, 640], &config),
            vec![0, 1]
        );
        let under = [node(50, 0, 0), node(11, 0, 0)];
        assert!(!is_overloaded(&under[1], &config));
        assert_eq!(
            rank_kv_aware(&under, vec![0, 1], 640, &[0, 640], &config),
            vec![1, 0]
        );
    }

    #[test]
    fn unreachable_nodes_rank_last_whatever_they_hold() {
        let config = RoutingConfig::default();
        let mut down = node(100, 0, 0);
        down.reachable = false;
        let nodes = [down, node(10, 5, 1000), NodeStatus::default()];
        let order = rank_kv_aware(&nodes, vec![2, 1, 0], 64, &[64, 0, 0], &config);
        assert_eq!(order, vec![2, 1, 0]);
        // Missing or short overlap lists and empty prompts are fine.
        assert_eq!(
            rank_kv_aware(&nodes, vec![2, 1, 0], 0, &[], &config),
            vec![2, 1, 0]
        );
    }

    #[test]
    fn ties_keep_the_least_loaded_order() {
        let config = RoutingConfig::default();
        let nodes = [node(90, 0, 0), node(90, 0, 0), node(90, 0, 0)];
        assert_eq!(
            rank_kv_aware(&nodes, vec![2, 0, 1], 100, &[0, 0, 0], &config),
            vec![2, 0, 1]
        );
    }

    #[test]
    fn round_robin_rotates_over_reachable_nodes() {
        let mut down = node(100, 0, 0);
        down.reachable = false;
        let nodes = [node(1, 0, 0), down, node(1, 0, 0)];
        assert_eq!(rank_round_robin(&nodes, 0), vec![0, 2, 1]);
        assert_eq!(rank_round_robin(&nodes, 1), vec![2, 0, 1]);
        assert_eq!(rank_round_robin(&nodes, 2), vec![0, 2, 1]);
        assert!(rank_round_robin(&[], 5).is_empty());
    }
}
