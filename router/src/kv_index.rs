//! The router's view of the nodes' prefix caches: block hash -> the nodes
//! holding it, built from the KV events on the nodes' load reports alone
//! (so every router replica builds its own, with no shared state).
//!
//! A report with `blocks_snapshot` replaces everything known of its node
//! (the first report of each stream, so a restarted router or a node that
//! rejoins converges); later reports add `blocks_gained` and remove
//! `blocks_dropped`. A node's entries go when it leaves the pool or its
//! load stream breaks (it may have restarted empty; its next stream starts
//! with a snapshot). Memory is bounded: a node is credited with at most as
//! many hashes as it has KV blocks (and never more than
//! [`MAX_BLOCKS_PER_NODE`]), so a corrupted stream cannot grow the index
//! without bound. Unknown hashes are harmless: a prompt never matches them.
//!
//! To score a request, the router hashes its tokens as each node does
//! (the chained hash of [`PrefixHasher`], seeded with the salt and block
//! size the node publishes) and counts the leading blocks the node holds:
//! a node reuses a cached prefix only up to its first missing block.

use std::collections::HashMap;

use tandem_engine::{BlockHash, PrefixHasher};
use tandem_proto::v1::NodeLoad;
use tracing::debug;

use crate::node_addr::NodeAddr;

/// Most hashes kept for one node, whatever its reports claim.
pub const MAX_BLOCKS_PER_NODE: usize = 1 << 20;

/// A node's small number in the index (the hash -> nodes lists hold these).
type Slot = u32;

#[derive(Debug)]
struct NodeBlocks {
    slot: Slot,
    /// Hashes credited to the node.
    held: usize,
    /// Most hashes credited to the node.
    cap: usize,
    /// How the node names its blocks (0, 0: unknown, nothing matches).
    salt: u64,
    block_size: u32,
}

/// Block hash -> nodes holding it, for every node of the pool.
#[derive(Debug, Default)]
pub struct KvIndex {
    holders: HashMap<BlockHash, Vec<Slot>>,
    nodes: HashMap<NodeAddr, NodeBlocks>,
    next_slot: Slot,
}

impl KvIndex {
    /// An empty index.
    pub fn new() -> Self {
        KvIndex::default()
    }

    /// Applies the KV events of one load report from `node`.
    pub fn apply(&mut self, node: &NodeAddr, load: &NodeLoad) {
        if load.blocks_snapshot {
            self.remove_node(node);
        }
        let cap = match load.kv_blocks_total as usize {
            0 => MAX_BLOCKS_PER_NODE,
            n => n.min(MAX_BLOCKS_PER_NODE),
        };
        let slot = match self.nodes.get_mut(node) {
            Some(n) => {
                n.cap = cap;
                n.salt = load.prefix_hash_salt;
                n.block_size = load.block_size;
                n.slot
            }
            None => {
                let slot = self.next_slot;
                self.next_slot = self.next_slot.wrapping_add(1);
                self.nodes.insert(
                    node.clone(),
                    NodeBlocks {
                        slot,
                        held: 0,
                        cap,
                        salt: load.prefix_hash_salt,
                        block_size: load.block_size,
                    },
                );
                slot
            }
        };
        let mut held = self.nodes.get(node).map_or(0, |n| n.held);
        for h in &load.blocks_dropped {
            if let Some(list) = self.holders.get_mut(h)
                && let Some(i) = list.iter().position(|&s| s == slot)
            {
                list.swap_remove(i);
                held -= 1;
                if list.is_empty() {
                    self.holders.remove(h);
                }
            }
        }
        let mut refused = 0usize;
        for &h in &load.blocks_gained {
            let list = self.holders.entry(h).or_default();
            if list.contains(&slot) {
                continue;
            }
            if held >= cap {
                refused += 1;
                if list.is_empty() {
                    self.holders.remove(&h);
                }
                continue;
            }
            list.push(slot);
            held += 1;
        }
        if refused > 0 {
            debug!(%node, refused, cap, "node claims more cached blocks than it has; ignoring the rest");
        }
        if let Some(n) = self.nodes.get_mut(node) {
            n.held = held;
        }
    }

    /// Forgets everything about `node` (it left, or its stream broke).
    pub fn remove_node(&mut self, node: &NodeAddr) {
        let Some(gone) = self.nodes.remove(node) else {
            return;
        };
        if gone.held == 0 {
            return;
        }
        self.holders.retain(|_, list| {
            list.retain(|&s| s != gone.slot);
            !list.is_empty()
        });
    }

    /// Hashes credited to `node`.
    pub fn blocks_of(&self, node: &NodeAddr) -> usize {
        self.nodes.get(node).map_or(0, |n| n.held)
    }

    /// For each of `nodes`, the leading tokens of `tokens` whose KV it holds
    /// (whole blocks; 0 for a node the index does not know), for a request
    /// with `cache_salt` (empty: none).
    pub fn cached_tokens(
        &self,
        tokens: &[u32],
        cache_salt: &str,
        nodes: &[&NodeAddr],
    ) -> Vec<usize> {
        // Nodes of one model share salt and block size: hash once per pair.
        let mut hashed: HashMap<(u64, u32), Vec<BlockHash>> = HashMap::new();
        nodes
            .iter()
            .map(|addr| {
                let Some(n) = self.nodes.get(*addr) else {
                    return 0;
                };
                if n.held == 0 || n.block_size == 0 {
                    return 0;
                }
                let hashes = hashed.entry((n.salt, n.block_size)).or_insert_with(|| {
                    PrefixHasher::new(n.salt, n.block_size as usize)
                        .with_cache_salt(cache_salt)
                        .full_blocks(tokens)
                });
                let blocks = hashes
                    .iter()
                    .take_while(|h| self.holders.get(*h).is_some_and(|l| l.contains(&n.slot)))
                    .count();
                blocks * n.block_size as usize
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: u64 = 42;
    const BS: u32 = 4;

    fn addr(s: &str) -> NodeAddr {
        NodeAddr::from(s)
    }

    fn report(snapshot: bool, gained: Vec<u64>, dropped: Vec<u64>) -> NodeLoad {
        NodeLoad {
            kv_blocks_total: 100,
            block_size: BS,
            prefix_hash_salt: SALT,
            blocks_snapshot: snapshot,
            blocks_gained: gained,
            blocks_dropped: dropped,
            ..Default::default()
        }
    }

    fn hashes(tokens: &[u32]) -> Vec<u64> {
        PrefixHasher::new(SALT, BS as usize).full_blocks(tokens)
    }

    #[test]
    fn overlap_counts_leading_blocks_each_node_holds() {
        let prompt: Vec<u32> = (0..14).collect(); // 3 full blocks, 2 tokens over
        let h = hashes(&prompt);
        let (a, b, c) = (addr("http://a"), addr("http://b"), addr("http://c"));
        let mut index = KvIndex::new();
        index.apply(&a, &report(true, h.clone(), vec![]));
        // b holds blocks 0 and 2 but not 1: only block 0 is reusable.
        index.apply(&b, &report(true, vec![h[0], h[2]], vec![]));
        assert_eq!(
            index.cached_tokens(&prompt, "", &[&a, &b, &c]),
            vec![12, 4, 0]
        );
        // a drops its last block; b gains block 1.
        index.apply(&a, &report(false, vec![], vec![h[2]]));
        index.apply(&b, &report(false, vec![h[1]], vec![]));
        assert_eq!(index.cached_tokens(&prompt, "", &[&a, &b]), vec![8, 12]);
        // Another salt (another model) matches nothing.
        let other = NodeLoad {
            prefix_hash_salt: SALT + 1,
            ..report(true, h.clone(), vec![])
        };
        index.apply(&c, &other);
        assert_eq!(index.cached_tokens(&prompt, "", &[&c]), vec![0]);
    }

    #[test]
    fn a_cache_salt_matches_only_blocks_named_with_it() {
        let prompt: Vec<u32> = (0..8).collect();
        let salted = |salt: &str| {
            PrefixHasher::new(SALT, BS as usize)
                .with_cache_salt(salt)
                .full_blocks(&prompt)
        };
        let (a, b) = (addr("http://a"), addr("http://b"));
        let mut index = KvIndex::new();
        index.apply(&a, &report(true, hashes(&prompt), vec![]));
        index.apply(&b, &report(true, salted("t1"), vec![]));
        assert_eq!(index.cached_tokens(&prompt, "", &[&a, &b]), vec![8, 0]);
        assert_eq!(index.cached_tokens(&prompt, "t1", &[&a, &b]), vec![0, 8]);
        assert_eq!(index.cached_tokens(&prompt, "t2", &[&a, &b]), vec![0, 0]);
    }

    #[test]
    fn a_snapshot_replaces_and_removal_forgets() {
        let prompt: Vec<u32> = (0..8).collect();
        let h = hashes(&prompt);
        let a = addr("http://a");
        let mut index = KvIndex::new();
        index.apply(&a, &report(true, h.clone(), vec![]));
        assert_eq!(index.blocks_of(&a), 2);
        // The node restarted empty: its snapshot is empty.
        index.apply(&a, &report(true, vec![], vec![]));
        assert_eq!(index.cached_tokens(&prompt, "", &[&a]), vec![0]);
        assert!(index.holders.is_empty());
        index.apply(&a, &report(false, h.clone(), vec![]));
        index.remove_node(&a);
        assert_eq!(index.cached_tokens(&prompt, "", &[&a]), vec![0]);
        assert!(index.holders.is_empty() && index.nodes.is_empty());
    }

    #[test]
    fn garbage_events_are_bounded_and_harmless() {
        let a = addr("http://a");
        let mut index = KvIndex::new();
        // More hashes than the node has blocks, repeats, drops of unknown hashes.
        let load = NodeLoad {
            kv_blocks_total: 10,
            ..report(
                false,
                (0..1000).chain(0..5).collect(),
                (5000..5010).collect(),
            )
        };
        index.apply(&a, &load);
        assert_eq!(index.blocks_of(&a), 10);
        assert_eq!(index.holders.len(), 10);
        // Drop what was never held, twice: counts never underflow.
        index.apply(&a, &report(false, vec![], vec![0, 0, 77_777]));
        assert_eq!(index.blocks_of(&a), 9);
        // Unknown salt and block size 0: nothing matches, nothing panics.
        let zero = NodeLoad {
            block_size: 0,
            ..report(false, vec![1, 2], vec![])
        };
        index.apply(&a, &zero);
        assert_eq!(index.cached_tokens(&[1, 2, 3, 4], "", &[&a]), vec![0]);
        assert_eq!(index.cached_tokens(&[], "", &[&a]), vec![0]);
    }
}
