//! Pinned host memory that KV imports are staged in, used as a ring.
//!
//! An import copies a frame into the next free range and queues its copy to
//! the GPU on the copy stream without waiting for it: the range stays in
//! flight, with the event that marks the copy's end, until a later take needs
//! its bytes, and only then is that event waited for. The engine thread so
//! pays each frame's host copy, not a round trip to the GPU per frame (on a GPU
//! shared with another process such a round trip cost about a time slice:
//! ~0.8 ms a frame, 128 frames per 4k-token prompt of an 8B model).

use std::collections::VecDeque;
use std::ops::Range;

/// Ranges of a buffer of `capacity` bytes handed out in ring order, each with
/// what marks the end of its use (`E`: a CUDA event).
pub(crate) struct CopyRing<E> {
    capacity: usize,
    /// Where the next range starts.
    head: usize,
    /// Ranges possibly still in use, oldest first.
    in_flight: VecDeque<(Range<usize>, E)>,
}

impl<E> CopyRing<E> {
    /// An empty ring over `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        CopyRing {
            capacity,
            head: 0,
            in_flight: VecDeque::new(),
        }
    }

    /// A range of `len` bytes (at most the capacity) free to write: at the head,
    /// or at the start when the head has too little room left. Every in-flight
    /// range it overlaps is waited for (`wait`, oldest first) and forgotten.
    pub fn take<Err>(
        &mut self,
        len: usize,
        mut wait: impl FnMut(E) -> Result<(), Err>,
    ) -> Result<Range<usize>, Err> {
        debug_assert!(len <= self.capacity);
        let start = if self.head + len <= self.capacity {
            self.head
        } else {
            0
        };
        let range = start..start + len;
        let mut kept = VecDeque::with_capacity(self.in_flight.len());
        while let Some((r, e)) = self.in_flight.pop_front() {
            if r.start < range.end && range.start < r.end {
                wait(e)?;
            } else {
                kept.push_back((r, e));
            }
        }
        self.in_flight = kept;
        self.head = range.end;
        Ok(range)
    }

    /// `range` (from [`take`](Self::take)) is in use until `done`.
    pub fn in_flight(&mut self, range: Range<usize>, done: E) {
        self.in_flight.push_back((range, done));
    }

    /// Waits for every range still in use.
    pub fn drain<Err>(&mut self, mut wait: impl FnMut(E) -> Result<(), Err>) -> Result<(), Err> {
        while let Some((_, e)) = self.in_flight.pop_front() {
            wait(e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::CopyRing;

    fn take(ring: &mut CopyRing<u32>, len: usize, waited: &mut Vec<u32>) -> std::ops::Range<usize> {
        ring.take::<()>(len, |e| {
            waited.push(e);
            Ok(())
        })
        .unwrap_or(0..0)
    }

    #[test]
    fn ranges_follow_each_other_and_wrap_when_the_end_is_short() {
        let mut ring = CopyRing::new(10);
        let mut waited = Vec::new();
        let a = take(&mut ring, 4, &mut waited);
        ring.in_flight(a.clone(), 1);
        let b = take(&mut ring, 4, &mut waited);
        ring.in_flight(b.clone(), 2);
        assert_eq!((a, b), (0..4, 4..8));
        assert!(waited.is_empty(), "nothing overlapped yet");
        // 2 bytes left at the end: the next 4 start over at 0, after copy 1.
        let c = take(&mut ring, 4, &mut waited);
        ring.in_flight(c.clone(), 3);
        assert_eq!(c, 0..4);
        assert_eq!(waited, [1]);
        // 4..9 overlaps copy 2 (4..8) only.
        let d = take(&mut ring, 5, &mut waited);
        assert_eq!(d, 4..9);
        assert_eq!(waited, [1, 2]);
    }

    #[test]
    fn the_whole_ring_waits_for_everything_and_drain_empties_it() {
        let mut ring = CopyRing::new(8);
        let mut waited = Vec::new();
        for e in 0..4 {
            let r = take(&mut ring, 2, &mut waited);
            ring.in_flight(r, e);
        }
        assert!(waited.is_empty());
        let all = take(&mut ring, 8, &mut waited);
        assert_eq!(all, 0..8);
        assert_eq!(waited, [0, 1, 2, 3]);
        ring.in_flight(all, 9);
        ring.drain::<()>(|e| {
            waited.push(e);
            Ok(())
        })
        .unwrap_or(());
        assert_eq!(waited, [0, 1, 2, 3, 9]);
        // The head is at the end: the next range starts over, with nothing to wait for.
        assert_eq!(take(&mut ring, 1, &mut waited), 0..1);
        assert_eq!(waited.len(), 5);
    }
}
