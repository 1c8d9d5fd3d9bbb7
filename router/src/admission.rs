//! Bounded admission: at most `max_running` requests in flight, at most
//! `max_queue` waiting for a slot, and a refusal past that.
//!
//! A request holds its [`Admitted`] permit for its whole life; dropping it
//! (the request finished, failed, or its client went away) lets the next
//! waiter in. Waiters are served in arrival order (tokio's semaphore is fair).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::Gauge;
use tandem_telemetry::names;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::RouterError;

/// A request's slot among the running ones; released on drop.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

/// The admission gate.
#[derive(Debug)]
pub struct Admission {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    /// `tandem_queue_depth{role="router",queue="admission"}`.
    depth: Gauge,
}

/// Counts a waiter for as long as it waits, cancellation included.
struct Waiting<'a>(&'a Admission);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.depth.decrement(1.0);
    }
}

impl Admission {
    /// A gate letting `max_running` requests run and `max_queue` wait.
    pub fn new(max_running: usize, max_queue: usize) -> Self {
        Admission {
            running: Arc::new(Semaphore::new(max_running.min(Semaphore::MAX_PERMITS))),
            waiting: AtomicUsize::new(0),
            max_queue,
            depth: metrics::gauge!(names::QUEUE_DEPTH, names::ROLE => "router", names::QUEUE => "admission"),
        }
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Waits for a slot until `deadline`. Refuses at once with
    /// [`RouterError::QueueFull`] when `max_queue` requests already wait.
    pub async fn admit(&self, deadline: Instant, timeout_s: f64) -> Result<Admitted, RouterError> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(Admitted { _permit: permit });
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(RouterError::QueueFull {
                max_queue: self.max_queue,
            });
        }
        self.depth.increment(1.0);
        let _waiting = Waiting(self);
        match tokio::time::timeout_at(deadline, self.running.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            Ok(Err(_closed)) => Err(RouterError::ShuttingDown),
            Err(_elapsed) => Err(RouterError::DeadlineExceeded { timeout_s }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tonic::Code;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn runs_queues_then_refuses() {
        let gate = Arc::new(Admission::new(2, 1));
        let a = gate.admit(far(), 60.0).await.unwrap();
        let _b = gate.admit(far(), 60.0).await.unwrap();

        // The third waits in the queue...
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.admit(far(), 60.0).await.map(|_| ()) });
        while gate.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // ...and the fourth finds the queue full.
        let err = gate.admit(far(), 60.0).await.unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("queue is full"), "{status:?}");

        // A finished request lets the waiter in.
        drop(a);
        waiter.await.unwrap().unwrap();
        assert_eq!(gate.waiting(), 0);
    }

    #[tokio::test]
    async fn waiting_past_the_deadline_fails_and_leaves_the_queue() {
        let gate = Admission::new(1, 4);
        let _a = gate.admit(far(), 60.0).await.unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        let err = gate.admit(soon, 0.02).await.unwrap_err();
        assert!(matches!(err, RouterError::DeadlineExceeded { .. }));
        assert_eq!(gate.waiting(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let gate = Admission::new(1, 1);
        let _a = gate.admit(far(), 60.0).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(10), gate.admit(far(), 60.0)).await;
        assert!(r.is_err());
        assert_eq!(gate.waiting(), 0);
        // The queue has room again.
        let r = tokio::time::timeout(Duration::from_millis(10), gate.admit(far(), 60.0)).await;
        assert!(r.is_err(), "waits rather than being refused");
    }
}
