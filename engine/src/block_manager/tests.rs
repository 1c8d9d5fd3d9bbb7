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
fn a_sequence_gets_ascending_runs_of_ids_again_after_a_release() {
    // Consecutive ids make a sequence's KV one copy per run, not per block.
    let mut m = BlockManager::new(16);
    let a = m.allocate(4).unwrap();
    assert_eq!(a, vec![0, 1, 2, 3]);
    let b = m.allocate(3).unwrap();
    assert_eq!(b, vec![4, 5, 6]);
    m.release(&a).unwrap();
    assert_eq!(m.allocate(4).unwrap(), vec![0, 1, 2, 3]);
    m.release(&b).unwrap();
    assert_eq!(m.allocate(5).unwrap(), vec![4, 5, 6, 7, 8]);
}

#[test]
fn double_release_in_one_call_is_refused_whole() {
    let mut m = BlockManager::new(2);
    let a = m.allocate(1).unwrap();
    assert!(m.release(&[a[0], a[0]]).is_err());
    assert_eq!(m.refcount(a[0]), 1);
}

#[test]
fn a_sequence_that_would_leave_too_few_blocks_is_refused_whole() {
    let h = PrefixHasher::new(1, 2);
    let mut m = BlockManager::with_prefix_cache(8);
    let prompt = [1, 2, 3, 4, 5];
    let hashes = h.full_blocks(&prompt);
    let a = m.allocate_sequence(&hashes, 3).unwrap();
    for (b, h) in a.table.iter().zip(&hashes) {
        assert!(m.register(*b, *h));
    }
    m.release(&a.table).unwrap();
    // 8 available (2 of them cached). Taking both cached blocks and 3 fresh
    // ones would leave 3: refused when 4 must stay, nothing taken or evicted.
    assert_eq!(
        m.allocate_sequence_leaving(&hashes, 5, 4),
        Err(BlockError::OutOfBlocks {
            requested: 3,
            free: 2,
            total: 8
        })
    );
    assert_eq!((m.num_free(), m.num_cached()), (8, 2));
    let b = m.allocate_sequence_leaving(&hashes, 5, 3).unwrap();
    assert_eq!(b.cached, 2, "the cached blocks taken by reference");
    assert_eq!(m.num_free(), 3);
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
