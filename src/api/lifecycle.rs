//! The HTTP side of shutting down, and the per-request limits in time. On SIGTERM the server
//! first stops admitting (new requests get 503 while the socket stays open), lets requests in
//! flight finish within the grace period, and then cancels what is left; every request also
//! has a deadline. A [`Watchdog`] ends a request's wait for the engine on either.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::error::ApiError;
use crate::engine::SeqEvent;

/// Whether the server admits requests, and how many are in flight.
#[derive(Debug)]
pub struct Lifecycle {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    cancel: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            cancel: watch::channel(false).0,
        }
    }
}

/// Held for as long as a request is being answered (to the end of its stream).
#[derive(Debug)]
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lifecycle {
    /// Admits a request, or refuses it with 503 while draining. Counted before the check, so
    /// a request admitted during `begin_drain` is always waited for.
    pub fn enter(self: &Arc<Self>) -> Result<InFlight, ApiError> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.clone());
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::shutting_down());
        }
        Ok(guard)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops admitting, waits up to `grace` for the requests in flight, then cancels the rest
    /// and gives them a moment to send their last event. Returns how many were cancelled.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + grace;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.in_flight();
        if left > 0 {
            self.cancel.send_replace(true);
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.in_flight() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        left
    }

    /// Ends a request's wait at `started + timeout`, or when the grace period runs out.
    pub fn watchdog(&self, started: Instant, timeout: Duration) -> Watchdog {
        Watchdog {
            deadline: tokio::time::Instant::from_std(started + timeout),
            timeout,
            cancel: self.cancel.subscribe(),
        }
    }
}

/// One request's deadline and the shutdown's cancel signal.
#[derive(Debug)]
pub struct Watchdog {
    deadline: tokio::time::Instant,
    timeout: Duration,
    cancel: watch::Receiver<bool>,
}

impl Watchdog {
    /// The engine's next event for this request; an error once the deadline passes or the
    /// server cancels it. `Ok(None)`: the engine dropped the request.
    pub async fn next(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<SeqEvent>,
    ) -> Result<Option<SeqEvent>, ApiError> {
        let cancelled = async {
            if self.cancel.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            ev = events.recv() => Ok(ev),
            _ = tokio::time::sleep_until(self.deadline) => {
                tracing::warn!(timeout_s = self.timeout.as_secs_f64(), "request timed out; cancelling its generation");
                Err(ApiError::timeout(self.timeout))
            }
            _ = cancelled => Err(ApiError::shutting_down()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn draining_refuses_new_requests_and_waits_for_those_in_flight() {
        let lc = Arc::new(Lifecycle::default());
        let held = lc.enter().unwrap();
        let drain = tokio::spawn({
            let lc = lc.clone();
            async move { lc.drain(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = lc.enter().unwrap_err();
        assert_eq!(refused.status.as_u16(), 503);
        assert!(!drain.is_finished(), "waits for the request in flight");
        drop(held);
        assert_eq!(drain.await.unwrap(), 0, "nothing had to be cancelled");
        assert_eq!(lc.in_flight(), 0);
    }

    #[tokio::test]
    async fn past_the_grace_period_requests_are_cancelled() {
        let lc = Arc::new(Lifecycle::default());
        let held = lc.enter().unwrap();
        let (_tx, mut rx) = mpsc::unbounded_channel();
        let mut dog = lc.watchdog(Instant::now(), Duration::from_secs(60));
        let waiter = tokio::spawn(async move {
            let r = dog.next(&mut rx).await;
            drop(held);
            r
        });
        assert_eq!(lc.drain(Duration::from_millis(100)).await, 1);
        let err = waiter.await.unwrap().unwrap_err();
        assert_eq!(err.code, Some("shutting_down"));
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_times_out() {
        let lc = Lifecycle::default();
        let (_tx, mut rx) = mpsc::unbounded_channel();
        let mut dog = lc.watchdog(Instant::now(), Duration::from_millis(50));
        let err = dog.next(&mut rx).await.unwrap_err();
        assert_eq!((err.status.as_u16(), err.code), (504, Some("timeout")));
    }
}
