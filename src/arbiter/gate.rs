//! The HTTP layer's fast path to the device: admitting a request counts it as in flight and
//! raises the miner's pre-emption flag, two atomic operations, before the request is parsed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::mining::PreemptFlag;

/// Shared by the HTTP handlers and the arbiter.
#[derive(Debug, Default)]
pub struct DeviceGate {
    preempt: PreemptFlag,
    in_flight: AtomicUsize,
    admitted: AtomicU64,
}

/// Held by a handler until its request is in the engine's hands.
#[derive(Debug)]
pub struct AdmissionGuard(Arc<DeviceGate>);

impl Drop for AdmissionGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl DeviceGate {
    pub fn new(preempt: PreemptFlag) -> Self {
        Self {
            preempt,
            in_flight: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
        }
    }

    /// A request has arrived. Counted first, flag raised second: the arbiter never sees the
    /// flag down while a request it has not counted is in flight.
    pub fn admit(self: &Arc<Self>) -> AdmissionGuard {
        // Sequentially consistent with the arbiter's look at `in_flight` after it resumes the
        // miner: either it sees this request, or this raise comes after its resume.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.admitted.fetch_add(1, Ordering::Relaxed);
        self.preempt.raise();
        AdmissionGuard(self.clone())
    }

    /// Requests being parsed, validated or submitted right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Requests admitted since start.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }
}
