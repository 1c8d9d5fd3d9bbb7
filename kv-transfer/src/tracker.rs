//! Cross-stream progress of the transfers a receiver is taking in (sans-I/O).
//!
//! A transfer may be striped over several streams ("lanes"). The
//! [`Tracker`] counts the Layer frames the sink accepted, parks a Final frame
//! until as many Layer frames as it announces have been accepted, and
//! remembers recently ended transfers so each gets exactly one ending (a
//! delivered Final or one abort), whichever lane sees it first.
//!
//! It holds no clock, no lock and no socket: the receiver keeps it behind a
//! mutex held for a few map operations and passes the time in, so every
//! rule here is tested deterministically below.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How many ended transfer ids are remembered by default.
pub const ENDED_MEMORY: usize = 65_536;

/// A Final frame waiting for its Layer frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingFinal {
    /// Layers the sender says it sent.
    pub layers_sent: u32,
    /// Layer frames the sender says it sent, over all lanes.
    pub frames_sent: u32,
}

/// What to do with an arriving Final frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalAction {
    /// Every Layer frame is in: deliver it now (the transfer has ended).
    Deliver(PendingFinal),
    /// Layer frames are still to come: it was parked.
    Wait,
    /// The transfer had already ended: drop the frame.
    Ended,
    /// More Layer frames arrived than announced (or a second Final): the
    /// stream is malformed. Carries the frames accepted so far.
    TooManyFrames(u32),
}

#[derive(Debug)]
struct Progress {
    frames_done: u32,
    pending_final: Option<PendingFinal>,
    /// The parked Final's first token went to the sink: the Final may be
    /// delivered (so `on_final` never overtakes `on_first_token`).
    announced: bool,
    last_activity: Instant,
}

/// The progress of every open transfer, and the ids of recently ended ones.
#[derive(Debug)]
pub struct Tracker {
    open: HashMap<u64, Progress>,
    ended: HashSet<u64>,
    ended_order: VecDeque<u64>,
    ended_memory: usize,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(ENDED_MEMORY)
    }
}

impl Tracker {
    /// A tracker remembering the last `ended_memory` ended transfers.
    pub fn new(ended_memory: usize) -> Self {
        Tracker {
            open: HashMap::new(),
            ended: HashSet::new(),
            ended_order: VecDeque::new(),
            ended_memory: ended_memory.max(1),
        }
    }

    /// Transfers open (named by a frame, not ended).
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    fn mark_ended(&mut self, id: u64) {
        self.open.remove(&id);
        if self.ended.insert(id) {
            self.ended_order.push_back(id);
            if self.ended_order.len() > self.ended_memory
                && let Some(old) = self.ended_order.pop_front()
            {
                self.ended.remove(&old);
            }
        }
    }

    fn progress(&mut self, id: u64, now: Instant) -> Option<&mut Progress> {
        if self.ended.contains(&id) {
            return None;
        }
        let p = self.open.entry(id).or_insert_with(|| Progress {
            frames_done: 0,
            pending_final: None,
            announced: false,
            last_activity: now,
        });
        p.last_activity = now;
        Some(p)
    }

    /// Whether a Layer frame of `id` should go to the sink (false: the
    /// transfer has ended).
    pub fn begin_layer(&mut self, id: u64, now: Instant) -> bool {
        self.progress(id, now).is_some()
    }

    /// Counts a Layer frame the sink accepted; returns a parked Final now
    /// due (the transfer then has ended). One whose first token is not yet
    /// announced waits for [`first_token_announced`](Self::first_token_announced).
    pub fn layer_done(&mut self, id: u64, now: Instant) -> Option<PendingFinal> {
        let p = self.progress(id, now)?;
        p.frames_done += 1;
        self.due(id)
    }

    /// The first token of the Final parked for `id` went to the sink;
    /// returns the Final if it is now due (the transfer then has ended).
    pub fn first_token_announced(&mut self, id: u64) -> Option<PendingFinal> {
        self.open.get_mut(&id)?.announced = true;
        self.due(id)
    }

    fn due(&mut self, id: u64) -> Option<PendingFinal> {
        let p = self.open.get(&id)?;
        match p.pending_final {
            Some(fin) if p.announced && p.frames_done >= fin.frames_sent => {
                self.mark_ended(id);
                Some(fin)
            }
            _ => None,
        }
    }

    /// A Final frame of `id` arrived. `Wait`: the caller announces its first
    /// token, then calls [`first_token_announced`](Self::first_token_announced).
    pub fn final_arrived(&mut self, id: u64, fin: PendingFinal, now: Instant) -> FinalAction {
        let Some(p) = self.progress(id, now) else {
            return FinalAction::Ended;
        };
        if p.pending_final.is_some() || p.frames_done > fin.frames_sent {
            return FinalAction::TooManyFrames(p.frames_done);
        }
        if p.frames_done == fin.frames_sent {
            self.mark_ended(id);
            return FinalAction::Deliver(fin);
        }
        p.pending_final = Some(fin);
        FinalAction::Wait
    }

    /// Ends `id`; true if it had not ended before (the caller then tells the
    /// sink, once).
    pub fn end(&mut self, id: u64) -> bool {
        if self.ended.contains(&id) {
            return false;
        }
        self.mark_ended(id);
        true
    }

    /// Ends and returns every open transfer with no frame for longer than `idle`.
    pub fn sweep(&mut self, now: Instant, idle: Duration) -> Vec<u64> {
        let stale: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_activity) > idle)
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            self.mark_ended(*id);
        }
        stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(frames_sent: u32) -> PendingFinal {
        PendingFinal {
            layers_sent: 2,
            frames_sent,
        }
    }

    #[test]
    fn a_final_after_every_layer_is_delivered_at_once() {
        let (mut t, now) = (Tracker::default(), Instant::now());
        for _ in 0..3 {
            assert!(t.begin_layer(1, now));
            assert_eq!(t.layer_done(1, now), None);
        }
        assert_eq!(
            t.final_arrived(1, fin(3), now),
            FinalAction::Deliver(fin(3))
        );
        assert_eq!(t.open_count(), 0);
        // Ended: later frames are dropped, and nobody ends it twice.
        assert!(!t.begin_layer(1, now));
        assert_eq!(t.final_arrived(1, fin(3), now), FinalAction::Ended);
        assert!(!t.end(1));
    }

    #[test]
    fn an_early_final_waits_for_the_last_layer_of_another_lane() {
        let (mut t, now) = (Tracker::default(), Instant::now());
        assert!(t.begin_layer(1, now));
        assert_eq!(t.layer_done(1, now), None);
        assert_eq!(t.final_arrived(1, fin(2), now), FinalAction::Wait);
        assert_eq!(t.first_token_announced(1), None, "a layer is missing");
        assert!(t.begin_layer(1, now));
        assert_eq!(t.layer_done(1, now), Some(fin(2)));
        assert!(!t.end(1), "delivering the final ended the transfer");
    }

    #[test]
    fn a_parked_final_is_not_delivered_before_its_first_token_is_announced() {
        // Lane A parks the Final; lane B's last layer lands before lane A
        // told the sink the first token: the Final waits for that.
        let (mut t, now) = (Tracker::default(), Instant::now());
        assert_eq!(t.final_arrived(1, fin(1), now), FinalAction::Wait);
        assert!(t.begin_layer(1, now));
        assert_eq!(t.layer_done(1, now), None);
        assert_eq!(t.first_token_announced(1), Some(fin(1)));
        assert!(!t.end(1), "delivering the final ended the transfer");
        // An announcement after the transfer ended (an abort on another
        // lane) delivers nothing.
        assert_eq!(t.final_arrived(2, fin(1), now), FinalAction::Wait);
        assert!(t.end(2));
        assert_eq!(t.first_token_announced(2), None);
    }

    #[test]
    fn more_frames_than_announced_or_two_finals_are_malformed() {
        let (mut t, now) = (Tracker::default(), Instant::now());
        for _ in 0..3 {
            t.begin_layer(1, now);
            t.layer_done(1, now);
        }
        assert_eq!(
            t.final_arrived(1, fin(2), now),
            FinalAction::TooManyFrames(3)
        );
        t.begin_layer(2, now);
        t.layer_done(2, now);
        assert_eq!(t.final_arrived(2, fin(3), now), FinalAction::Wait);
        assert_eq!(
            t.final_arrived(2, fin(3), now),
            FinalAction::TooManyFrames(1)
        );
    }

    #[test]
    fn a_transfer_ends_exactly_once() {
        let (mut t, now) = (Tracker::default(), Instant::now());
        t.begin_layer(5, now);
        assert!(t.end(5));
        assert!(!t.end(5));
        assert!(!t.begin_layer(5, now));
        assert_eq!(t.layer_done(5, now), None);
        // An id never seen can be ended too (a stream refused on its first frame).
        assert!(t.end(6));
        assert!(!t.end(6));
    }

    #[test]
    fn sweep_ends_only_transfers_idle_past_the_limit() {
        let mut t = Tracker::default();
        let start = Instant::now();
        let idle = Duration::from_secs(30);
        t.begin_layer(1, start);
        t.begin_layer(2, start);
        // Transfer 2 makes progress later; 1 does not.
        t.layer_done(2, start + Duration::from_secs(20));
        assert!(t.sweep(start + Duration::from_secs(29), idle).is_empty());
        assert_eq!(t.sweep(start + Duration::from_secs(31), idle), vec![1]);
        assert_eq!(t.open_count(), 1);
        assert!(!t.end(1), "swept transfers have ended");
        assert_eq!(t.sweep(start + Duration::from_secs(51), idle), vec![2]);
    }

    #[test]
    fn ended_ids_are_forgotten_oldest_first_past_the_memory() {
        let (mut t, now) = (Tracker::new(2), Instant::now());
        assert!(t.end(1));
        assert!(t.end(2));
        assert!(t.end(3));
        // 1 is forgotten: a frame naming it opens a new transfer.
        assert!(t.begin_layer(1, now));
        assert!(!t.begin_layer(3, now));
    }
}
