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
        let available = self.num_free() - revived;
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocate_release_roundtrip() {
        let mut m = BlockManager::new(4);
        let a = m.allocate(3).unwrap();
        assert_eq!(m.num_free(), 1);
        assert_eq!(
            m.allocate(2),
            Err(BlockError::OutOfBlocks {
                requested: 2,
                free: 1,
                total: 4
            })
        );
        assert_eq!(m.num_free(), 1, "a failed allocation takes nothing");
        m.retain(&a[..1]).unwrap();
        m.release(&a).unwrap();
        assert_eq!(m.num_free(), 3, "the retained block stays allocated");
        m.release(&a[..1]).unwrap();
        assert_eq!(m.num_free(), 4);
        assert_eq!(m.release(&a[..1]), Err(BlockError::NotAllocated(a[0])));
        assert_eq!(m.release(&[99]), Err(BlockError::NotAllocated(99)));
    }

    #[test]
    fn double_release_in_one_call_is_refused_whole() {
        let mut m = BlockManager::new(2);
        let a = m.allocate(1).unwrap();
        assert!(m.release(&[a[0], a[0]]).is_err());
        assert_eq!(m.refcount(a[0]), 1);
    }

    use crate::kv_events::{CacheChanges, KvEvent};
    use crate::prefix_hash::PrefixHasher;

    #[test]
    fn equal_prefixes_share_blocks_and_released_ones_stay_cached() {
        let h = PrefixHasher::new(1, 2);
        let mut m = BlockManager::with_prefix_cache(6);
        let prompt = [1, 2, 3, 4, 5];
        let hashes = h.full_blocks(&prompt);
        let a = m.allocate_sequence(&hashes, 3).unwrap();
        assert_eq!(a.cached, 0);
        for (b, h) in a.table.iter().zip(&hashes) {
            assert!(m.register(*b, *h));
        }
        // A second sequence while the first runs: shares both full blocks.
        let b = m.allocate_sequence(&hashes, 3).unwrap();
        assert_eq!(b.cached, 2);
        assert_eq!(b.table[..2], a.table[..2]);
        assert_ne!(b.table[2], a.table[2], "the partial block is not shared");
        assert_eq!(m.refcount(a.table[0]), 2);
        m.release(&a.table).unwrap();
        m.release(&b.table).unwrap();
        assert_eq!(m.num_free(), 6, "cached blocks count as available");
        assert_eq!(m.num_cached(), 2);
        // A later sequence extending the prompt still finds them.
        let longer = h.full_blocks(&[1, 2, 3, 4, 5, 6]);
        let c = m.allocate_sequence(&longer, 3).unwrap();
        assert_eq!((c.cached, &c.table[..2]), (2, &a.table[..2]));
        m.audit().unwrap();
    }

    #[test]
    fn allocation_evicts_leaves_first_and_never_a_block_in_use() {
        let h = PrefixHasher::new(1, 1);
        let mut m = BlockManager::with_prefix_cache(4);
        let hashes = h.full_blocks(&[7, 8, 9]);
        let a = m.allocate_sequence(&hashes, 3).unwrap();
        for (b, h) in a.table.iter().zip(&hashes) {
            m.register(*b, *h);
        }
        m.release(&a.table).unwrap();
        // One free block, then the leaf (last block of the chain) goes first.
        let x = m.allocate(2).unwrap();
        assert_eq!(m.evictions(), 1);
        assert!(x.contains(&a.table[2]));
        assert_eq!(m.num_cached(), 2);
        // The first two blocks are taken by a sequence; nothing else can be evicted.
        assert!(
            m.allocate_sequence(&hashes, 3).is_err(),
            "its two cached blocks are no room for its third"
        );
        let b = m.allocate_sequence(&hashes, 2).unwrap();
        assert_eq!(b.cached, 2);
        assert_eq!(m.num_free(), 0);
        assert!(matches!(m.allocate(1), Err(BlockError::OutOfBlocks { .. })));
        assert_eq!(m.refcount(a.table[0]), 1);
        m.audit().unwrap();
    }

    #[test]
    fn a_failed_sequence_allocation_changes_nothing() {
        let h = PrefixHasher::new(1, 1);
        let mut m = BlockManager::with_prefix_cache(3);
        let hashes = h.full_blocks(&[1, 2]);
        let a = m.allocate_sequence(&hashes, 2).unwrap();
        m.register(a.table[0], hashes[0]);
        m.release(&a.table).unwrap();
        // Needs 1 cached + 3 fresh, but only 2 others are available: the cached
        // block must not be counted as room for the fresh ones.
        let before = (m.num_free(), m.num_cached(), m.evictions());
        assert!(m.allocate_sequence(&hashes, 4).is_err());
        assert_eq!((m.num_free(), m.num_cached(), m.evictions()), before);
        m.audit().unwrap();
    }

    #[test]
    fn index_changes_are_drained_as_events_and_overflow_resyncs() {
        let h = PrefixHasher::new(1, 1);
        let mut m = BlockManager::with_prefix_cache(2);
        let hashes = h.full_blocks(&[1, 2]);
        let a = m.allocate_sequence(&hashes, 2).unwrap();
        m.register(a.table[0], hashes[0]);
        m.register(a.table[1], hashes[1]);
        assert_eq!(
            m.drain_kv_events(),
            CacheChanges::Events(vec![KvEvent::Gained(hashes[0]), KvEvent::Gained(hashes[1])])
        );
        m.release(&a.table).unwrap();
        assert_eq!(
            m.drain_kv_events(),
            CacheChanges::Events(vec![]),
            "released, still cached"
        );
        m.evict(1);
        assert_eq!(
            m.drain_kv_events(),
            CacheChanges::Events(vec![KvEvent::Dropped(hashes[1])]),
            "the leaf goes first"
        );
        // Undrained changes past the cap turn into one resync.
        for i in 0..MIN_PENDING_EVENTS as u32 + 1 {
            let t = m.allocate(1).unwrap();
            let hash = h.full_blocks(&[1000 + i])[0];
            m.register(t[0], hash);
            m.release(&t).unwrap();
        }
        let CacheChanges::Resync(now) = m.drain_kv_events() else {
            panic!("expected a resync");
        };
        let mut expected = m.cached_hashes();
        expected.sort();
        let mut now = now;
        now.sort();
        assert_eq!(now, expected);
        assert_eq!(m.drain_kv_events(), CacheChanges::Events(vec![]));
    }

    #[test]
    fn without_the_cache_nothing_is_kept() {
        let h = PrefixHasher::new(1, 1);
        let mut m = BlockManager::new(2);
        let hashes = h.full_blocks(&[1]);
        let a = m.allocate_sequence(&hashes, 1).unwrap();
        assert!(!m.register(a.table[0], hashes[0]));
        m.release(&a.table).unwrap();
        assert_eq!(m.allocate_sequence(&hashes, 1).unwrap().cached, 0);
        assert_eq!(m.num_cached(), 0);
    }

    #[derive(Debug, Clone)]
    enum CacheOp {
        /// A sequence of `len` tokens from prompt family `family`.
        Start {
            family: u8,
            len: usize,
            extra: usize,
        },
        /// Allocate more blocks for a live sequence (decode growth).
        Extend(usize, usize),
        /// Finish or cancel a live sequence.
        Free(usize),
        Evict(usize),
    }

    struct Seq {
        table: Vec<BlockId>,
        hashes: Vec<BlockHash>,
    }

    proptest! {
        /// Random sequences of allocate/extend/free/evict over a small cache
        /// with shared prefixes: reference counts equal the live tables' uses,
        /// a block in use keeps its hash (never evicted), cached hits hold
        /// the right prefix, and the index stays consistent.
        #[test]
        fn prefix_cache_invariants_hold(ops in proptest::collection::vec(
            prop_oneof![
                (0u8..3, 1usize..12, 0usize..3).prop_map(|(family, len, extra)| CacheOp::Start { family, len, extra }),
                (0usize..8, 1usize..3).prop_map(|(i, n)| CacheOp::Extend(i, n)),
                (0usize..8).prop_map(CacheOp::Free),
                (0usize..4).prop_map(CacheOp::Evict),
            ], 0..150)) {
            let total = 12;
            let bs = 2;
            let h = PrefixHasher::new(9, bs);
            let mut m = BlockManager::with_prefix_cache(total);
            let mut live: Vec<Seq> = Vec::new();
            // The cache as a router sees it, from the drained events alone.
            let mut mirror: std::collections::HashSet<BlockHash> = Default::default();
            for op in ops {
                match op {
                    CacheOp::Start { family, len, extra } => {
                        // Families share their first tokens, then diverge.
                        let tokens: Vec<u32> = (0..len as u32)
                            .map(|i| if i < 4 { i } else { family as u32 * 100 + i })
                            .collect();
                        let hashes = h.full_blocks(&tokens);
                        let n = blocks_for(len, bs) + extra;
                        let before = m.num_free();
                        match m.allocate_sequence(&hashes, n) {
                            Ok(s) => {
                                for (&b, &hash) in s.table.iter().zip(&hashes).take(s.cached) {
                                    prop_assert_eq!(m.hash_of(b), Some(hash));
                                }
                                // "Compute" the prompt, then name its full blocks.
                                for (b, hash) in s.table.iter().zip(&hashes) {
                                    m.register(*b, *hash);
                                }
                                live.push(Seq { table: s.table, hashes });
                            }
                            Err(BlockError::OutOfBlocks { requested, free, .. }) => {
                                // Refused only when the fresh blocks truly do not fit.
                                prop_assert!(requested > free && free <= before);
                            }
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    CacheOp::Extend(i, n) if !live.is_empty() => {
                        let i = i % live.len();
                        if let Ok(more) = m.allocate(n) {
                            live[i].table.extend(more);
                        } else {
                            prop_assert!(n > m.num_free());
                        }
                    }
                    CacheOp::Free(i) if !live.is_empty() => {
                        let s = live.swap_remove(i % live.len());
                        m.release(&s.table).unwrap();
                        // A double free is refused.
                        if let Some(&b) = s.table.first()
                            && m.refcount(b) == 0
                        {
                            prop_assert!(m.release(&s.table[..1]).is_err());
                        }
                    }
                    CacheOp::Evict(n) => {
                        m.evict(n);
                    }
                    _ => {}
                }
                if let Err(e) = m.audit() {
                    prop_assert!(false, "{}", e);
                }
                match m.drain_kv_events() {
                    CacheChanges::Events(events) => {
                        for e in events {
                            match e {
                                KvEvent::Gained(h) => prop_assert!(mirror.insert(h), "gained twice"),
                                KvEvent::Dropped(h) => prop_assert!(mirror.remove(&h), "dropped unheld"),
                            }
                        }
                    }
                    CacheChanges::Resync(hashes) => mirror = hashes.into_iter().collect(),
                }
                let cached: std::collections::HashSet<BlockHash> = m.cached_hashes().into_iter().collect();
                prop_assert_eq!(&mirror, &cached, "the events replay to the index");
                let mut uses = vec![0u32; total];
                for s in &live {
                    for (i, &b) in s.table.iter().enumerate() {
                        uses[b as usize] += 1;
                        // A block in use is never evicted and re-registered under another hash.
                        if let Some(hash) = m.hash_of(b) {
                            prop_assert_eq!(Some(hash), s.hashes.get(i).copied());
                        }
                    }
                }
                for (b, &n) in uses.iter().enumerate() {
                    prop_assert_eq!(m.refcount(b as BlockId), n);
                }
                let in_use = uses.iter().filter(|&&u| u > 0).count();
                prop_assert_eq!(m.num_free() + in_use, total);
            }
            for s in live.drain(..) {
                m.release(&s.table).unwrap();
            }
            prop_assert_eq!(m.num_free(), total, "everything is available after a drain");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize),
        Retain(usize),
        Release(usize),
    }

    proptest! {
        /// Whatever the sequence of operations, every block is either free or held,
        /// never both, and the counts add up.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(
            prop_oneof![
                (0usize..6).prop_map(Op::Alloc),
                (0usize..32).prop_map(Op::Retain),
                (0usize..32).prop_map(Op::Release),
            ], 0..200)) {
            let total = 16;
            let mut m = BlockManager::new(total);
            let mut held: Vec<BlockId> = Vec::new(); // one entry per reference
            for op in ops {
                match op {
                    Op::Alloc(n) => match m.allocate(n) {
                        Ok(bs) => held.extend(bs),
                        Err(BlockError::OutOfBlocks { free, .. }) => prop_assert!(n > free),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    },
                    Op::Retain(i) if !held.is_empty() => {
                        let b = held[i % held.len()];
                        m.retain(&[b]).unwrap();
                        held.push(b);
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let b = held.swap_remove(i % held.len());
                        m.release(&[b]).unwrap();
                    }
                    _ => {}
                }
                let distinct: std::collections::HashSet<_> = held.iter().copied().collect();
                prop_assert_eq!(m.num_free() + distinct.len(), total);
                for b in 0..total as BlockId {
                    let refs = held.iter().filter(|&&h| h == b).count() as u32;
                    prop_assert_eq!(m.refcount(b), refs);
                }
            }
        }
    }
}
