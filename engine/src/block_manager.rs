//! Allocation of KV cache blocks: a free list with reference counts.
//!
//! The block manager only does the bookkeeping; the memory itself belongs to
//! the backend's [`KvCache`](crate::kv_cache). A block is shared (reference
//! count > 1) when, e.g., two sequences share a prefix. Allocation is
//! all-or-nothing: a request for more blocks than are free returns
//! [`BlockError::OutOfBlocks`] and changes nothing.

/// Index of a block in the KV cache.
pub type BlockId = u32;

/// Errors of the block manager.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Not enough free blocks.
    #[error("out of KV cache blocks: {requested} requested, {free} free of {total}")]
    OutOfBlocks {
        /// Blocks asked for.
        requested: usize,
        /// Blocks free at the time.
        free: usize,
        /// Blocks in the cache.
        total: usize,
    },
    /// A block id beyond the cache, or one that is not allocated.
    #[error("block {0} is not allocated")]
    NotAllocated(BlockId),
}

/// Free list and reference counts of the blocks of one KV cache.
#[derive(Debug)]
pub struct BlockManager {
    free: Vec<BlockId>,
    refcount: Vec<u32>,
}

impl BlockManager {
    /// A manager of `total` blocks, all free.
    pub fn new(total: usize) -> Self {
        // Pop from the end: hand out low ids first, which keeps tests readable.
        let free = (0..total as BlockId).rev().collect();
        BlockManager {
            free,
            refcount: vec![0; total],
        }
    }

    /// Blocks in the cache.
    pub fn total(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks not allocated.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` free blocks, each with reference count 1; all or nothing.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, BlockError> {
        if n > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                requested: n,
                free: self.free.len(),
                total: self.total(),
            });
        }
        let blocks = self.free.split_off(self.free.len() - n);
        for &b in &blocks {
            self.refcount[b as usize] = 1;
        }
        Ok(blocks)
    }

    /// Adds a reference to each block (all must be allocated; on error nothing changes).
    pub fn retain(&mut self, blocks: &[BlockId]) -> Result<(), BlockError> {
        self.check_allocated(blocks)?;
        for &b in blocks {
            self.refcount[b as usize] += 1;
        }
        Ok(())
    }

    /// Drops a reference to each block; a block whose count reaches zero is free again.
    /// All must be allocated (counting repeats); on error nothing changes.
    pub fn release(&mut self, blocks: &[BlockId]) -> Result<(), BlockError> {
        self.check_allocated(blocks)?;
        for &b in blocks {
            let rc = &mut self.refcount[b as usize];
            *rc -= 1;
            if *rc == 0 {
                self.free.push(b);
            }
        }
        Ok(())
    }

    /// The reference count of a block (0 when free or out of range).
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcount.get(block as usize).copied().unwrap_or(0)
    }

    /// Checks that releasing `blocks` (with repeats) would not underflow any count.
    fn check_allocated(&self, blocks: &[BlockId]) -> Result<(), BlockError> {
        let mut uses: std::collections::HashMap<BlockId, u32> = Default::default();
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
