//! Allocation of KV cache blocks: a free list with reference counts, and the
//! prefix cache.
//!
//! The block manager only does the bookkeeping; the memory itself belongs to
//! the backend's [`KvCache`](crate::kv_cache), so the cache works the same on
//! every backend (CPU, CUDA, tensor-parallel). A block is shared (reference
//! count > 1) when two sequences share a prefix. Allocation is all-or-nothing:
//! a request for more blocks than are available returns
//! [`BlockError::OutOfBlocks`] and changes nothing.
//!
//! **Prefix cache** (on with [`BlockManager::with_prefix_cache`]). A full
//! block whose KV is computed can be [`register`](BlockManager::register)ed
//! under its chained hash ([`prefix_hash`](crate::prefix_hash)). A later
//! sequence whose prompt starts with the same blocks gets them by reference
//! ([`allocate_sequence`](BlockManager::allocate_sequence)) and computes only
//! the rest. When its last reference goes, a registered block is not freed
//! but becomes *evictable*: it keeps its KV and its hash, and counts as
//! available. Allocation takes never-registered free blocks first, then
//! evicts the least recently released; a sequence releases its blocks last to
//! first, so the leaves of a chain go before the blocks they extend. A block
//! in use is never evicted. Each block is in exactly one of three states:
//! free, in use (count > 0, maybe registered), or evictable (count 0,
//! registered).
//!
//! Every change of the hash index (a block registered, a cached block
//! evicted) is also recorded as a [`KvEvent`] for the node to drain
//! ([`drain_kv_events`](BlockManager::drain_kv_events)) and publish to
//! routers ([`kv_events`](crate::kv_events)).

use std::collections::{BTreeMap, HashMap};

use crate::kv_events::{CacheChanges, KvEvent};
pub use crate::prefix_hash::BlockHash;

/// Undrained events kept per block of the cache (at least
/// [`MIN_PENDING_EVENTS`]); past that the next drain is a full resync.
const PENDING_EVENTS_PER_BLOCK: usize = 4;
/// The fewest undrained events kept.
const MIN_PENDING_EVENTS: usize = 1024;

/// Index of a block in the KV cache.
pub type BlockId = u32;

/// Errors of the block manager.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Not enough available blocks (free or evictable).
    #[error("out of KV cache blocks: {requested} requested, {free} free of {total}")]
    OutOfBlocks {
        /// Blocks asked for.
        requested: usize,
        /// Blocks available at the time.
        free: usize,
        /// Blocks in the cache.
        total: usize,
    },
    /// A block id beyond the cache, or one that is not allocated.
    #[error("block {0} is not allocated")]
    NotAllocated(BlockId),
}

/// A sequence's blocks from [`BlockManager::allocate_sequence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceBlocks {
    /// The block table: cached blocks first, then fresh ones.
    pub table: Vec<BlockId>,
    /// How many leading blocks of `table` came from the cache, KV included.
    pub cached: usize,
}

/// Free list, reference counts and prefix index of the blocks of one KV cache.
#[derive(Debug)]
pub struct BlockManager {
    /// Count 0 and not registered.
    free: Vec<BlockId>,
    refcount: Vec<u32>,
    /// A registered block's hash (`index[hash] == block`).
    hash: Vec<Option<BlockHash>>,
    index: HashMap<BlockHash, BlockId>,
    /// Registered blocks with count 0, by the tick of their release (oldest first).
    evictable: BTreeMap<u64, BlockId>,
    /// The key of each evictable block in `evictable`.
    released_at: Vec<u64>,
    tick: u64,
    caching: bool,
    evictions: u64,
    /// Index changes not yet drained.
    events: Vec<KvEvent>,
    /// More changes than `events` may hold piled up: the next drain resyncs.
    events_overflowed: bool,
}

impl BlockManager {
    /// A manager of `total` blocks, all free, with no prefix cache.
    pub fn new(total: usize) -> Self {
        // Pop from the end: hand out low ids first, which keeps tests readable.
        let free = (0..total as BlockId).rev().collect();
        BlockManager {
            free,
            refcount: vec![0; total],
            hash: vec![None; total],
            index: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; total],
            tick: 0,
            caching: false,
            evictions: 0,
            events: Vec::new(),
            events_overflowed: false,
        }
    }

    /// A manager of `total` blocks, all free, that keeps registered blocks'
    /// KV for reuse until their space is needed.
    pub fn with_prefix_cache(total: usize) -> Self {
        BlockManager {
            caching: true,
            ..BlockManager::new(total)
        }
    }

    /// Whether the prefix cache is on.
    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks in the cache.
    pub fn total(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks available to an allocation: free ones and evictable cached ones.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Registered blocks (in use or evictable): the prefix cache's size.
    pub fn num_cached(&self) -> usize {
        self.index.len()
    }

    /// Cached blocks evicted since the start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Takes `n` available blocks, each with reference count 1; all or
    /// nothing. Free blocks go first, then the least recently used evictable ones.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, BlockError> {
        if n > self.num_free() {
            return Err(BlockError::OutOfBlocks {
                requested: n,
                free: self.num_free(),
                total: self.total(),
            });
        }
        let from_free = n.min(self.free.len());
        let mut blocks = self.free.split_off(self.free.len() - from_free);
        // The stack's top is its end: reversed, a fresh run of ids comes out
        // ascending (and a sequence released in table order goes back so that
        // it does again), so KV moves of a sequence's blocks are few long
        // copies, not one per block.
        blocks.reverse();
        while blocks.len() < n {
            let Some((_, b)) = self.evictable.pop_first() else {
                break; // unreachable: counted above
            };
            self.unregister(b);
            self.evictions += 1;
            blocks.push(b);
        }
        for &b in &blocks {
            self.refcount[b as usize] = 1;
        }
        Ok(blocks)
    }

    /// The blocks of a new sequence: `n` in all, the leading ones taken by
    /// reference from the cache as long as `prefix` (the hashes of the
    /// sequence's leading full blocks whose KV it may reuse) finds them, the
    /// rest allocated. All or nothing; a cached block it takes is not evicted
    /// to make room for the rest.
    pub fn allocate_sequence(
        &mut self,
        prefix: &[BlockHash],
        n: usize,
    ) -> Result<SequenceBlocks, BlockError> {
        self.allocate_sequence_leaving(prefix, n, 0)
    }

    /// [`allocate_sequence`](Self::allocate_sequence), refused (changing
    /// nothing) unless at least `leave` blocks stay available after it.
    pub fn allocate_sequence_leaving(
        &mut self,
        prefix: &[BlockHash],
        n: usize,
        leave: usize,
    ) -> Result<SequenceBlocks, BlockError> {
        let hits: Vec<BlockId> = if self.caching {
            prefix
                .iter()
                .take(n)
                .map_while(|h| self.index.get(h).copied())
                .collect()
        } else {
            Vec::new()
        };
        let revived = hits
            .iter()
            .filter(|&&b| self.refcount[b as usize] == 0)
            .count();
        let fresh = n - hits.len();
        let available = (self.num_free() - revived).saturating_sub(leave);
        if fresh > available {
            return Err(BlockError::OutOfBlocks {
                requested: fresh,
                free: available,
                total: self.total(),
            });
        }
        for &b in &hits {
            if self.refcount[b as usize] == 0 {
                self.evictable.remove(&self.released_at[b as usize]);
            }
            self.refcount[b as usize] += 1;
        }
        let mut table = hits;
        let cached = table.len();
        table.extend(self.allocate(fresh)?);
        Ok(SequenceBlocks { table, cached })
    }

    /// Names an in-use block's KV by `hash`, so later sequences can reuse it.
    /// Call it only once the block is full and its KV computed. Returns false
    /// (and changes nothing) when caching is off, the block is not in use or
    /// already named, or another block already holds that hash.
    pub fn register(&mut self, block: BlockId, hash: BlockHash) -> bool {
        if !self.caching
            || self.refcount(block) == 0
            || self.hash[block as usize].is_some()
            || self.index.contains_key(&hash)
        {
            return false;
        }
        self.hash[block as usize] = Some(hash);
        self.index.insert(hash, block);
        self.note(KvEvent::Gained(hash));
        true
    }

    /// Takes an evicted block's hash out of the index.
    fn unregister(&mut self, block: BlockId) {
        if let Some(h) = self.hash[block as usize].take() {
            self.index.remove(&h);
            self.note(KvEvent::Dropped(h));
        }
    }

    fn note(&mut self, event: KvEvent) {
        if self.events_overflowed {
            return;
        }
        let cap = (PENDING_EVENTS_PER_BLOCK * self.total()).max(MIN_PENDING_EVENTS);
        if self.events.len() >= cap {
            self.events = Vec::new();
            self.events_overflowed = true;
        } else {
            self.events.push(event);
        }
    }

    /// The index's changes since the last drain, in order; or, when more
    /// piled up than are kept, every hash cached now.
    pub fn drain_kv_events(&mut self) -> CacheChanges {
        if std::mem::take(&mut self.events_overflowed) {
            return CacheChanges::Resync(self.cached_hashes());
        }
        CacheChanges::Events(std::mem::take(&mut self.events))
    }

    /// The hashes of every cached block (in use or evictable).
    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        self.index.keys().copied().collect()
    }

    /// Adds a reference to each block (all must be in use; on error nothing changes).
    pub fn retain(&mut self, blocks: &[BlockId]) -> Result<(), BlockError> {
        if let Some(&b) = blocks.iter().find(|&&b| self.refcount(b) == 0) {
            return Err(BlockError::NotAllocated(b));
        }
        for &b in blocks {
            self.refcount[b as usize] += 1;
        }
        Ok(())
    }

    /// Drops a reference to each block. A block whose count reaches zero is
    /// free again, or evictable if registered; blocks are released last to
    /// first, so a chain's leaves are evicted before its root. All must be
    /// allocated (counting repeats); on error nothing changes.
    pub fn release(&mut self, blocks: &[BlockId]) -> Result<(), BlockError> {
        self.check_allocated(blocks)?;
        for &b in blocks.iter().rev() {
            let rc = &mut self.refcount[b as usize];
            *rc -= 1;
            if *rc == 0 {
                if self.hash[b as usize].is_some() {
                    self.released_at[b as usize] = self.tick;
                    self.evictable.insert(self.tick, b);
                    self.tick += 1;
                } else {
                    self.free.push(b);
                }
            }
        }
        Ok(())
    }

    /// Evicts up to `n` cached blocks not in use, least recently used first;
    /// returns how many.
    pub fn evict(&mut self, n: usize) -> usize {
        let mut done = 0;
        while done < n {
            let Some((_, b)) = self.evictable.pop_first() else {
                break;
            };
            self.unregister(b);
            self.free.push(b);
            self.evictions += 1;
            done += 1;
        }
        done
    }

    /// The reference count of a block (0 when free, evictable or out of range).
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcount.get(block as usize).copied().unwrap_or(0)
    }

    /// The hash a block is registered under, if any.
    pub fn hash_of(&self, block: BlockId) -> Option<BlockHash> {
        self.hash.get(block as usize).copied().flatten()
    }

    /// Checks the manager's invariants: every block is exactly one of free,
    /// in use or evictable; the index and the blocks' hashes agree; the
    /// eviction order names exactly the evictable blocks. For tests.
    pub fn audit(&self) -> Result<(), String> {
        let total = self.total();
        let mut seen = vec![0u8; total];
        for &b in &self.free {
            let i = b as usize;
            if i >= total {
                return Err(format!("free block {b} out of range"));
            }
            seen[i] += 1;
            if self.refcount[i] != 0 || self.hash[i].is_some() {
                return Err(format!("free block {b} is in use or registered"));
            }
        }
        for (&t, &b) in &self.evictable {
            let i = b as usize;
            seen[i] += 1;
            if self.refcount[i] != 0 || self.hash[i].is_none() || self.released_at[i] != t {
                return Err(format!(
                    "evictable block {b} is in use, unregistered or misfiled"
                ));
            }
        }
        for (i, &n) in seen.iter().enumerate() {
            let in_use = self.refcount[i] > 0;
            if n + in_use as u8 != 1 {
                return Err(format!("block {i} is in {} states", n + in_use as u8));
            }
        }
        for (i, h) in self.hash.iter().enumerate() {
            if let Some(h) = h
                && self.index.get(h) != Some(&(i as BlockId))
            {
                return Err(format!("block {i}'s hash is not indexed to it"));
            }
        }
        if self.hash.iter().flatten().count() != self.index.len() {
            return Err("the index names blocks that are not registered".into());
        }
        Ok(())
    }

    /// Checks that releasing `blocks` (with repeats) would not underflow any count.
    fn check_allocated(&self, blocks: &[BlockId]) -> Result<(), BlockError> {
        let mut uses: HashMap<BlockId, u32> = Default::default();
        for &b in blocks {
            let n = uses.entry(b).or_default();
            *n += 1;
            if *n > self.refcount(b) {
                return Err(BlockError::NotAllocated(b));
            }
        }
        Ok(())
    }
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests;
