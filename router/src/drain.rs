//! Draining a router: stop admitting requests, then wait for the admitted
//! ones to finish, so that a process stopping (`tandem up` on SIGTERM)
//! loses no request it took.
//!
//! [`Drain`] is shared by the `Generate` service (gRPC and HTTP both go
//! through it): each admitted request holds an [`InFlight`] guard for its
//! whole life, and once [`Drain::stop_admitting`] was called new requests
//! are refused with UNAVAILABLE (the client retries elsewhere) and health
//! reports NOT_SERVING, while the admitted ones run to their end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// The router's drain state: whether it still admits, and how many admitted
/// requests are still running.
#[derive(Debug, Default)]
pub struct Drain {
    stopped: AtomicBool,
    in_flight: AtomicUsize,
    changed: Notify,
}

/// One admitted request, counted until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

impl Drain {
    /// A router that admits.
    pub fn new() -> Arc<Self> {
        Arc::new(Drain::default())
    }

    /// Counts a request in, or `None` once the router stopped admitting.
    pub fn enter(self: &Arc<Self>) -> Option<InFlight> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        // Checked after counting, so `wait_idle` never misses a request
        // admitted while admission stopped.
        if self.stopped.load(Ordering::Acquire) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_waiters();
            return None;
        }
        Some(InFlight(self.clone()))
    }

    /// Refuses every request from now on.
    pub fn stop_admitting(&self) {
        self.stopped.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether the router stopped admitting.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Admitted requests still running.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits until no admitted request is running, at most `timeout`;
    /// returns how many still are.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.in_flight() == 0 {
                    return;
                }
                // A missed wake-up costs at most this poll.
                let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admitted_requests_finish_and_new_ones_are_refused() {
        let drain = Drain::new();
        let a = drain.enter().unwrap();
        let b = drain.enter().unwrap();
        assert_eq!(drain.in_flight(), 2);
        drain.stop_admitting();
        assert!(drain.enter().is_none());
        assert_eq!(drain.in_flight(), 2);
        // Times out with two running.
        assert_eq!(drain.wait_idle(Duration::from_millis(20)).await, 2);
        drop(a);
        let d = drain.clone();
        let waiter = tokio::spawn(async move { d.wait_idle(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(b);
        assert_eq!(waiter.await.unwrap(), 0);
    }
}
