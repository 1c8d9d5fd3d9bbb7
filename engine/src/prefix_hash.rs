//! Identity of a full KV block for the prefix cache: a chained hash.
//!
//! Block `i` of a sequence is named by `h(h(block i-1), tokens of block i)`,
//! the chain starting from a salt that stands for everything else the KV
//! depends on (the model's shape and weights' identity, the KV dtype, the
//! block size). Two sequences get equal hashes for block `i` exactly when
//! they agree on every token up to the end of that block (up to hash
//! collisions of xxh3-64), so a block found by its hash holds the right KV
//! for any sequence with that prefix. Only full blocks are named: a partial
//! last block is still being written and is never shared.

use xxhash_rust::xxh3::xxh3_64;

use crate::config::ModelConfig;
use crate::kv_cache::KvLayout;

/// The chained hash naming a full block.
pub type BlockHash = u64;

/// Hashes a sequence's full blocks for one model and cache layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixHasher {
    salt: u64,
    block_size: usize,
}

impl PrefixHasher {
    /// A hasher with an explicit salt (equal salts mean interchangeable KV).
    pub fn new(salt: u64, block_size: usize) -> Self {
        PrefixHasher {
            salt,
            block_size: block_size.max(1),
        }
    }

    /// The hasher of a model's KV: the salt covers the model's shape, its
    /// special tokens and the cache's dtype and geometry. (The model
    /// fingerprint of the design notes, with weight digests, will replace
    /// the shape here once it exists; within one node the model is fixed.)
    pub fn for_model(config: &ModelConfig, layout: &KvLayout) -> Self {
        let identity = format!(
            "{config:?}|{:?}|{}|{}|{}",
            layout.dtype, layout.block_size, layout.num_kv_heads, layout.head_dim
        );
        PrefixHasher::new(xxh3_64(identity.as_bytes()), layout.block_size)
    }

    /// The hasher for a request with vLLM's `cache_salt`: its chain starts
    /// from this hasher's salt mixed with the request's, so its blocks are
    /// found only by requests with the same salt, and never by one without.
    /// An empty salt is none (the request shares the cache).
    pub fn with_cache_salt(self, cache_salt: &str) -> Self {
        if cache_salt.is_empty() {
            return self;
        }
        let mut buf = Vec::with_capacity(8 + cache_salt.len());
        buf.extend_from_slice(&self.salt.to_le_bytes());
        buf.extend_from_slice(cache_salt.as_bytes());
        PrefixHasher {
            salt: xxh3_64(&buf),
            block_size: self.block_size,
        }
    }

    /// The salt the chain starts from: what a router needs, with the block
    /// size, to name a prompt's blocks as this node does.
    pub fn salt(&self) -> u64 {
        self.salt
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The hashes of the full blocks of `tokens`, in order (a trailing
    /// partial block has none).
    pub fn full_blocks(&self, tokens: &[u32]) -> Vec<BlockHash> {
        let mut parent = self.salt;
        let mut buf = Vec::with_capacity(8 + 4 * self.block_size);
        tokens
            .chunks_exact(self.block_size)
            .map(|block| {
                buf.clear();
                buf.extend_from_slice(&parent.to_le_bytes());
                for t in block {
                    buf.extend_from_slice(&t.to_le_bytes());
                }
                parent = xxh3_64(&buf);
                parent
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_share_hashes_and_the_chain_carries_history() {
        let h = PrefixHasher::new(7, 4);
        let a = h.full_blocks(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(a.len(), 2, "the partial block has no hash");
        let b = h.full_blocks(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(a, b);
        let c = h.full_blocks(&[0, 2, 3, 4, 5, 6, 7, 8]);
        assert_ne!(a[0], c[0]);
        assert_ne!(a[1], c[1], "the second block differs through its parent");
        let other_salt = PrefixHasher::new(8, 4).full_blocks(&[1, 2, 3, 4]);
        assert_ne!(a[0], other_salt[0]);
    }

    #[test]
    fn a_cache_salt_separates_the_chains_of_equal_prompts() {
        let h = PrefixHasher::new(7, 4);
        let tokens = [1, 2, 3, 4, 5, 6, 7, 8];
        let plain = h.full_blocks(&tokens);
        let a = h.with_cache_salt("tenant-a").full_blocks(&tokens);
        let b = h.with_cache_salt("tenant-b").full_blocks(&tokens);
        assert_eq!(a, h.with_cache_salt("tenant-a").full_blocks(&tokens));
        for (x, y) in [(&a, &plain), (&b, &plain), (&a, &b)] {
            assert!(x.iter().all(|hash| !y.contains(hash)), "{x:?} {y:?}");
        }
        assert_eq!(h.with_cache_salt(""), h, "an empty salt is none");
        assert_eq!(h.with_cache_salt("s").block_size(), 4);
    }
}
