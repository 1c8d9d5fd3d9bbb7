//! KV events: which block hashes a node's prefix cache gained and dropped,
//! for routers that route requests to the node holding their prefix.
//!
//! The [`BlockManager`](crate::BlockManager) records every change of its
//! hash index (a block registered: *gained*; a cached block evicted:
//! *dropped*) and the node drains them after each step into its
//! [`KvEventLog`]. Each load-report stream (one per router replica, or a
//! `tandem status`) reads the log through its own [`KvCursor`]: its first
//! read is a full snapshot of the cache, later reads the events since, so a
//! router that connects late, reconnects, or falls behind the log's bounded
//! history converges on the node's cache. The log is a small struct behind
//! a mutex, held for the copy of a few hashes.

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::prefix_hash::BlockHash;

/// Events kept for readers that lag; one further behind reads a snapshot.
pub const LOG_CAPACITY: usize = 1 << 16;

/// A change of a prefix cache's hash index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvEvent {
    /// A block with this hash is cached (its KV computed and registered).
    Gained(BlockHash),
    /// The block with this hash was evicted.
    Dropped(BlockHash),
}

/// What a block manager hands the node since its last drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheChanges {
    /// The changes, in order.
    Events(Vec<KvEvent>),
    /// Too many changes piled up undrained: the whole index instead.
    Resync(Vec<BlockHash>),
}

/// One report's worth of a node's cache changes, for one reader.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvDelta {
    /// `gained` is the whole cache: the reader replaces what it knew.
    pub snapshot: bool,
    /// Hashes cached since the reader's last read (all of them in a snapshot).
    pub gained: Vec<BlockHash>,
    /// Hashes evicted since the reader's last read (none in a snapshot).
    pub dropped: Vec<BlockHash>,
}

/// A reader's position in a [`KvEventLog`]; a new one reads a snapshot first.
#[derive(Debug, Clone, Default)]
pub struct KvCursor {
    /// The sequence number of the next event to read; `None` before the first read.
    next: Option<u64>,
}

/// The node's cache as a set of hashes plus the recent events that built it.
#[derive(Debug, Default)]
pub struct KvEventLog {
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    /// The hashes cached now.
    held: HashSet<BlockHash>,
    /// Recent events; the first has sequence number `first`.
    recent: VecDeque<KvEvent>,
    first: u64,
}

impl LogState {
    fn push(&mut self, event: KvEvent) {
        if self.recent.len() == LOG_CAPACITY {
            self.recent.pop_front();
            self.first += 1;
        }
        self.recent.push_back(event);
    }

    fn end(&self) -> u64 {
        self.first + self.recent.len() as u64
    }
}

impl KvEventLog {
    /// An empty log.
    pub fn new() -> Self {
        KvEventLog::default()
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // The state is consistent between statements: a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a block manager's changes.
    pub fn record(&self, changes: CacheChanges) {
        let mut s = self.lock();
        match changes {
            CacheChanges::Events(events) => {
                for e in events {
                    let changed = match e {
                        KvEvent::Gained(h) => s.held.insert(h),
                        KvEvent::Dropped(h) => s.held.remove(&h),
                    };
                    if changed {
                        s.push(e);
                    }
                }
            }
            CacheChanges::Resync(hashes) => {
                // Every reader starts over from a snapshot.
                s.held = hashes.into_iter().collect();
                s.first = s.end() + 1;
                s.recent.clear();
            }
        }
    }

    /// The changes since `cursor`'s last read (a snapshot on its first read
    /// or when it fell behind the log's history), and moves it to the end.
    pub fn read(&self, cursor: &mut KvCursor) -> KvDelta {
        let s = self.lock();
        let end = s.end();
        let delta = match cursor.next {
            Some(next) if next >= s.first && next <= end => {
                // Net changes: a hash touched since `next` is gained or
                // dropped as it stands now, so a reader may apply the two
                // lists in either order.
                let mut touched = HashSet::new();
                let mut delta = KvDelta::default();
                for e in s.recent.iter().skip((next - s.first) as usize) {
                    let (KvEvent::Gained(h) | KvEvent::Dropped(h)) = *e;
                    if touched.insert(h) {
                        if s.held.contains(&h) {
                            delta.gained.push(h);
                        } else {
                            delta.dropped.push(h);
                        }
                    }
                }
                delta
            }
            _ => KvDelta {
                snapshot: true,
                gained: s.held.iter().copied().collect(),
                dropped: Vec::new(),
            },
        };
        cursor.next = Some(end);
        delta
    }

    /// Hashes cached now.
    pub fn len(&self) -> usize {
        self.lock().held.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader's view, built from deltas alone.
    fn apply(view: &mut HashSet<BlockHash>, d: KvDelta) {
        if d.snapshot {
            view.clear();
        }
        view.extend(d.gained);
        for h in d.dropped {
            view.remove(&h);
        }
    }

    #[test]
    fn first_read_is_a_snapshot_then_deltas() {
        let log = KvEventLog::new();
        log.record(CacheChanges::Events(vec![
            KvEvent::Gained(1),
            KvEvent::Gained(2),
        ]));
        let mut c = KvCursor::default();
        let d = log.read(&mut c);
        assert!(d.snapshot);
        let mut view = HashSet::new();
        apply(&mut view, d);
        assert_eq!(view, HashSet::from([1, 2]));
        log.record(CacheChanges::Events(vec![
            KvEvent::Dropped(1),
            KvEvent::Gained(3),
        ]));
        let d = log.read(&mut c);
        assert!(!d.snapshot);
        assert_eq!((d.gained.clone(), d.dropped.clone()), (vec![3], vec![1]));
        apply(&mut view, d);
        assert_eq!(view, HashSet::from([2, 3]));
        assert_eq!(log.read(&mut c), KvDelta::default(), "nothing new");
        // A second reader gets its own snapshot.
        let mut other = KvCursor::default();
        let d = log.read(&mut other);
        assert!(d.snapshot);
        assert_eq!(d.gained.len(), 2);
    }

    #[test]
    fn a_resync_or_a_lagging_reader_gets_a_snapshot() {
        let log = KvEventLog::new();
        let mut c = KvCursor::default();
        log.read(&mut c);
        log.record(CacheChanges::Events(vec![KvEvent::Gained(5)]));
        log.record(CacheChanges::Resync(vec![7, 8]));
        let d = log.read(&mut c);
        assert!(d.snapshot);
        let mut got = d.gained;
        got.sort();
        assert_eq!(got, vec![7, 8]);

        let mut lagging = KvCursor::default();
        log.read(&mut lagging);
        let many: Vec<KvEvent> = (100..100 + LOG_CAPACITY as u64 + 5)
            .map(KvEvent::Gained)
            .collect();
        log.record(CacheChanges::Events(many));
        let d = log.read(&mut lagging);
        assert!(d.snapshot, "its events fell out of the history");
        assert_eq!(d.gained.len(), LOG_CAPACITY + 7);
    }

    #[test]
    fn a_delta_holds_net_changes() {
        let log = KvEventLog::new();
        log.record(CacheChanges::Events(vec![KvEvent::Gained(1)]));
        let mut c = KvCursor::default();
        log.read(&mut c);
        // Dropped then gained again, gained then dropped: each once, as it ends.
        log.record(CacheChanges::Events(vec![
            KvEvent::Dropped(1),
            KvEvent::Gained(2),
            KvEvent::Gained(1),
            KvEvent::Dropped(2),
        ]));
        let d = log.read(&mut c);
        assert_eq!((d.gained, d.dropped), (vec![1], vec![2]));
    }

    #[test]
    fn repeated_events_change_nothing() {
        let log = KvEventLog::new();
        let mut c = KvCursor::default();
        log.read(&mut c);
        log.record(CacheChanges::Events(vec![
            KvEvent::Gained(1),
            KvEvent::Gained(1),
            KvEvent::Dropped(9),
        ]));
        let d = log.read(&mut c);
        assert_eq!((d.gained, d.dropped), (vec![1], vec![]));
        assert_eq!(log.len(), 1);
    }
}
