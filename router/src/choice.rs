//! Which node gets a request: pure ranking functions over the nodes' last
//! load reports, so the policy is tested without a network.
//!
//! A node with no report yet counts as idle (it just joined); a node whose
//! report stream failed ranks after every reachable node but stays a last
//! resort, since a failed stream does not prove the node is down.

use std::cmp::Reverse;

use tandem_proto::v1::NodeLoad;

/// What the router knows about one node's load.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// The last load report, if any arrived.
    pub load: Option<NodeLoad>,
    /// False while the node's load stream is failing.
    pub reachable: bool,
}

impl Default for NodeStatus {
    fn default() -> Self {
        NodeStatus {
            load: None,
            reachable: true,
        }
    }
}

/// Indices of decode nodes, best first: reachable, most free KV blocks, then
/// fewest sequences running or queued. Ties keep the input order.
pub fn rank_decode(nodes: &[NodeStatus]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| {
        let n = &nodes[i];
        let (free, busy) = match &n.load {
            Some(l) => (l.kv_blocks_free, u64::from(l.running) + u64::from(l.queued)),
            None => (u32::MAX, 0),
        };
        (!n.reachable, Reverse(free), busy)
    });
    order
}

/// Indices of prefill nodes, best first: reachable, fewest queued prompt
/// tokens, then fewest queued and running requests. Ties keep the input order.
pub fn rank_prefill(nodes: &[NodeStatus]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| {
        let n = &nodes[i];
        let (tokens, queued, running) = match &n.load {
            Some(l) => (l.queued_prefill_tokens, l.queued, l.running),
            None => (0, 0, 0),
        };
        (!n.reachable, tokens, queued, running)
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(free: u32, running: u32, queued: u32) -> NodeStatus {
        NodeStatus {
            load: Some(NodeLoad {
                kv_blocks_free: free,
                kv_blocks_total: 100,
                running,
                queued,
                ..Default::default()
            }),
            reachable: true,
        }
    }

    fn prefill(tokens: u64, queued: u32) -> NodeStatus {
        NodeStatus {
            load: Some(NodeLoad {
                queued_prefill_tokens: tokens,
                queued,
                ..Default::default()
            }),
            reachable: true,
        }
    }

    #[test]
    fn decode_prefers_free_blocks_then_fewer_sequences() {
        let nodes = [decode(10, 0, 0), decode(50, 9, 9), decode(50, 1, 2)];
        assert_eq!(rank_decode(&nodes), vec![2, 1, 0]);
    }

    #[test]
    fn decode_without_report_is_idle_and_unreachable_is_last() {
        let mut down = decode(99, 0, 0);
        down.reachable = false;
        let nodes = [decode(10, 0, 0), down, NodeStatus::default()];
        assert_eq!(rank_decode(&nodes), vec![2, 0, 1]);
    }

    #[test]
    fn prefill_prefers_fewer_queued_tokens_then_fewer_queued() {
        let nodes = [prefill(500, 1), prefill(100, 5), prefill(100, 2)];
        assert_eq!(rank_prefill(&nodes), vec![2, 1, 0]);
    }

    #[test]
    fn prefill_without_report_is_idle_and_unreachable_is_last() {
        let mut down = prefill(0, 0);
        down.reachable = false;
        let nodes = [down, prefill(7, 0), NodeStatus::default()];
        assert_eq!(rank_prefill(&nodes), vec![2, 1, 0]);
    }

    #[test]
    fn empty_pools_rank_nothing() {
        assert!(rank_decode(&[]).is_empty());
        assert!(rank_prefill(&[]).is_empty());
    }
}
