//! Requests waiting at the router for room at a decode node, served in
//! arrival order.
//!
//! A request that finds every decode node's batch and waiting room full
//! (`router.decode_waiting`) joins the queue; only the request at its head
//! looks for room again, when it is woken: by a request ending at a decode
//! node, by a decode node's load report, or by the request before it leaving
//! the head (it found room, so there may be more). A request every decode
//! node refused for KV blocks joins it too, and keeps its place through its
//! next tries: at the head it asks again when a request ends at a decode node
//! (at least every few milliseconds), and the others wait for it to be
//! admitted instead of each asking the full nodes.
//! A newcomer joins behind the waiting ones instead of taking room they wait
//! for. A request that stops waiting (its client went away, its deadline
//! passed) leaves its place on drop.
//!
//! The price of the order: a head waiting for one node (a later sample of an
//! `n` > 1 request is pinned to the node holding its prompt's KV) holds back
//! the requests behind it while another node may have room, for as long as
//! that node takes to finish a request.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use metrics::Gauge;
use tandem_telemetry::names;
use tokio::sync::Notify;

/// The queue.
#[derive(Debug)]
pub struct DecodeQueue {
    inner: Mutex<Inner>,
    /// `tandem_queue_depth{role="router",queue="decode_room"}`.
    depth: Gauge,
}

impl Default for DecodeQueue {
    fn default() -> Self {
        DecodeQueue {
            inner: Mutex::default(),
            depth: metrics::gauge!(names::QUEUE_DEPTH, names::ROLE => "router", names::QUEUE => "decode_room"),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_ticket: u64,
    /// Tickets in arrival order, each with what wakes its holder.
    waiting: VecDeque<(u64, Arc<Notify>)>,
}

/// A request's place in the queue; leaves it on drop.
#[derive(Debug)]
pub struct Place<'a> {
    queue: &'a DecodeQueue,
    ticket: u64,
    wake: Arc<Notify>,
}

impl DecodeQueue {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether requests are waiting (a newcomer then joins behind them).
    pub fn is_empty(&self) -> bool {
        self.lock().waiting.is_empty()
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Joins at the back.
    pub fn join(&self) -> Place<'_> {
        let mut inner = self.lock();
        let ticket = inner.next_ticket;
        inner.next_ticket += 1;
        let wake = Arc::new(Notify::new());
        inner.waiting.push_back((ticket, wake.clone()));
        self.depth.increment(1.0);
        Place {
            queue: self,
            ticket,
            wake,
        }
    }

    /// Tells the request at the head to look for room again (a wake while it
    /// is not waiting is kept for its next wait).
    pub fn wake_head(&self) {
        if let Some((_, wake)) = self.lock().waiting.front() {
            wake.notify_one();
        }
    }
}

impl Place<'_> {
    /// Whether this request is the one to look for room.
    pub fn is_head(&self) -> bool {
        self.queue
            .lock()
            .waiting
            .front()
            .is_some_and(|(t, _)| *t == self.ticket)
    }

    /// Waits until woken (see [`DecodeQueue::wake_head`]).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut inner = self.queue.lock();
        let was_head = inner
            .waiting
            .front()
            .is_some_and(|(t, _)| *t == self.ticket);
        inner.waiting.retain(|(t, _)| *t != self.ticket);
        self.queue.depth.decrement(1.0);
        if was_head && let Some((_, next)) = inner.waiting.front() {
            // The head left (it found room, or gave up): the next one looks.
            next.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_head_is_woken_and_leaving_it_wakes_the_next_in_arrival_order() {
        let q = DecodeQueue::default();
        assert!(q.is_empty());
        let first = q.join();
        let second = q.join();
        let third = q.join();
        assert_eq!(q.len(), 3);
        assert!(first.is_head() && !second.is_head() && !third.is_head());
        // A wake before the head waits is kept for it.
        q.wake_head();
        tokio::time::timeout(Duration::from_secs(1), first.woken())
            .await
            .expect("the head woken");
        // The second is not woken by a wake of the head.
        q.wake_head();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), second.woken())
                .await
                .is_err()
        );
        // A waiter behind the head leaving changes nothing for the head.
        drop(third);
        assert!(first.is_head());
        // The head leaving wakes the next.
        drop(first);
        assert!(second.is_head());
        tokio::time::timeout(Duration::from_secs(1), second.woken())
            .await
            .expect("the new head woken");
        drop(second);
        assert!(q.is_empty());
        q.wake_head();
    }
}
