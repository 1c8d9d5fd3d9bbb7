//! Pinned host memory that KV exports land in and leave from without a copy.
//!
//! One page-locked region is carved into contiguous ranges in ring order: an
//! export takes a range at the head, the device copies a layer's blocks into
//! it on the copy stream, and the range is handed to the network as `Bytes`
//! (`Bytes::from_owner`), going back to the ring when the last clone is
//! dropped, i.e. when the transport has sent it. Ranges are returned out of
//! order but reclaimed in order (the tail only moves past returned ranges),
//! which keeps the bookkeeping a deque. A full ring makes the exporter wait:
//! that is the back-pressure from a slow link to the prefill GPU.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use cudarc::driver::{CudaEvent, PinnedHostSlice};

use super::error::DriverContext;
use crate::backend::PendingKv;
use crate::error::{EngineError, Result};

/// How long an export waits for room before giving up (a stuck transport).
const WAIT_FOR_ROOM: Duration = Duration::from_secs(60);

struct Ring {
    /// Live ranges in the order they were taken, with whether each came back.
    live: VecDeque<(Range<usize>, bool)>,
    /// Where the next range starts.
    head: usize,
}

/// The staging region and its ring of ranges.
pub(crate) struct StagingRing {
    region: PinnedHostSlice<u8>,
    base: *mut u8,
    ring: Mutex<Ring>,
    freed: Condvar,
}

// SAFETY: `base` points into `region`, which lives as long as the ring; each byte
// range is written by one device copy and read only after that copy's event, by
// whoever holds the range (exclusive until it comes back).
unsafe impl Send for StagingRing {}
unsafe impl Sync for StagingRing {}

impl StagingRing {
    /// A ring over `region`.
    pub fn new(mut region: PinnedHostSlice<u8>) -> Result<Arc<Self>> {
        let base = region.as_mut_ptr().op("pinned staging buffer")?;
        Ok(Arc::new(StagingRing {
            region,
            base,
            ring: Mutex::new(Ring {
                live: VecDeque::new(),
                head: 0,
            }),
            freed: Condvar::new(),
        }))
    }

    /// Bytes in the region.
    pub fn capacity(&self) -> usize {
        self.region.len()
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `len` contiguous bytes, waiting for earlier ranges to come back
    /// when the ring is full.
    pub fn take(&self, len: usize) -> Result<Range<usize>> {
        let cap = self.capacity();
        if len == 0 {
            return Ok(0..0);
        }
        if len > cap {
            return Err(EngineError::KvCache(format!(
                "an export of {len} bytes is larger than the {cap}-byte staging ring"
            )));
        }
        let mut ring = self.lock();
        loop {
            if let Some(r) = place(&ring, len, cap) {
                ring.head = r.end;
                ring.live.push_back((r.clone(), false));
                return Ok(r);
            }
            let (g, timeout) = self
                .freed
                .wait_timeout(ring, WAIT_FOR_ROOM)
                .unwrap_or_else(|p| p.into_inner());
            ring = g;
            if timeout.timed_out() && place(&ring, len, cap).is_none() {
                return Err(EngineError::KvCache(format!(
                    "no room in the KV staging ring for {WAIT_FOR_ROOM:?}: the transport is not sending"
                )));
            }
        }
    }

    /// Returns a range taken by [`take`](Self::take).
    pub fn give_back(&self, range: &Range<usize>) {
        if range.is_empty() {
            return;
        }
        let mut ring = self.lock();
        if let Some(e) = ring.live.iter_mut().find(|e| e.0 == *range) {
            e.1 = true;
        }
        while ring.live.front().is_some_and(|e| e.1) {
            ring.live.pop_front();
        }
        if ring.live.is_empty() {
            ring.head = 0;
        }
        drop(ring);
        self.freed.notify_all();
    }

    /// The address of `range` in host memory.
    pub fn ptr(&self, range: &Range<usize>) -> *mut u8 {
        // SAFETY: ranges handed out lie inside the region.
        unsafe { self.base.add(range.start) }
    }
}

/// Where `len` bytes fit: at the head, or wrapped to the start of the region,
/// never over a live range.
fn place(ring: &Ring, len: usize, cap: usize) -> Option<Range<usize>> {
    let Some((front, _)) = ring.live.front() else {
        return Some(0..len);
    };
    let tail = front.start;
    if ring.head > tail || (ring.head == tail && ring.live.is_empty()) {
        // Live bytes are tail..head: free are head..cap and 0..tail.
        if ring.head + len <= cap {
            return Some(ring.head..ring.head + len);
        }
        if len <= tail {
            return Some(0..len);
        }
        None
    } else {
        // Wrapped: live are tail..cap and 0..head; free is head..tail.
        (ring.head + len <= tail).then(|| ring.head..ring.head + len)
    }
}

/// A range of the ring being filled by a device copy.
pub(crate) struct PendingRange {
    pub ring: Arc<StagingRing>,
    pub range: Range<usize>,
    /// Recorded on the copy stream after the copies into `range`.
    pub done: Option<CudaEvent>,
}

impl PendingKv for PendingRange {
    fn wait(mut self: Box<Self>) -> Result<Bytes> {
        if let Some(e) = self.done.take() {
            e.synchronize().op("cuEventSynchronize (KV export)")?;
        }
        let slice = RingSlice {
            ring: self.ring.clone(),
            range: std::mem::replace(&mut self.range, 0..0),
        };
        Ok(Bytes::from_owner(slice))
    }
}

impl Drop for PendingRange {
    fn drop(&mut self) {
        if self.range.is_empty() {
            return;
        }
        // Never hand the range out again while a copy may still be writing it.
        if let Some(e) = self.done.take()
            && let Err(err) = e.synchronize()
        {
            tracing::error!("KV export copy failed: {err}");
        }
        self.ring.give_back(&self.range);
    }
}

/// Finished bytes in the ring; the range goes back when this is dropped.
struct RingSlice {
    ring: Arc<StagingRing>,
    range: Range<usize>,
}

impl AsRef<[u8]> for RingSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the copy into the range has completed (the event was waited for)
        // and nothing writes it until it is given back in `drop`.
        unsafe { std::slice::from_raw_parts(self.ring.ptr(&self.range), self.range.len()) }
    }
}

impl Drop for RingSlice {
    fn drop(&mut self) {
        self.ring.give_back(&self.range);
    }
}

#[cfg(test)]
mod tests {
    use super::{Ring, place};
    use std::collections::VecDeque;

    fn ring(live: &[(std::ops::Range<usize>, bool)], head: usize) -> Ring {
        Ring {
            live: live.iter().cloned().collect::<VecDeque<_>>(),
            head,
        }
    }

    #[test]
    fn ranges_go_at_the_head_then_wrap_but_never_over_live_bytes() {
        assert_eq!(place(&ring(&[], 0), 10, 100), Some(0..10));
        assert_eq!(place(&ring(&[(0..40, false)], 40), 50, 100), Some(40..90));
        // No room at the end, none before the tail.
        assert_eq!(place(&ring(&[(0..40, false)], 40), 70, 100), None);
        // Tail moved on: wrap to the start.
        assert_eq!(place(&ring(&[(30..90, false)], 90), 20, 100), Some(0..20));
        assert_eq!(place(&ring(&[(30..90, false)], 90), 31, 100), None);
        // Wrapped: only head..tail is free.
        let r = ring(&[(30..90, false), (0..20, false)], 20);
        assert_eq!(place(&r, 10, 100), Some(20..30));
        assert_eq!(place(&r, 11, 100), None);
    }
}
