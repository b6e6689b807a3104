//! The HTTP layer's fast path to the device: admitting a request counts it as in flight and
//! raises the miner's pre-emption flag, two atomic operations, before the request is parsed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::engine::ServiceTier;
use crate::mining::PreemptFlag;

/// Shared by the HTTP handlers and the arbiter.
#[derive(Debug, Default)]
pub struct DeviceGate {
    preempt: PreemptFlag,
    /// By tier: interactive requests count as serving, deferred ones as deferred work.
    in_flight: [AtomicUsize; 2],
    admitted: AtomicU64,
}

/// Held by a handler until its request is in the engine's hands.
#[derive(Debug)]
pub struct AdmissionGuard {
    gate: Arc<DeviceGate>,
    tier: ServiceTier,
}

impl AdmissionGuard {
    /// The request turned out to be of `tier` (known once its body is read): it is counted
    /// there from now on. Counted in the new tier first, so it is never counted nowhere.
    pub fn set_tier(&mut self, tier: ServiceTier) {
        if tier != self.tier {
            self.gate.in_flight[tier as usize].fetch_add(1, Ordering::SeqCst);
            self.gate.in_flight[self.tier as usize].fetch_sub(1, Ordering::SeqCst);
            self.tier = tier;
        }
    }
}

impl Drop for AdmissionGuard {
    fn drop(&mut self) {
        self.gate.in_flight[self.tier as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

impl DeviceGate {
    pub fn new(preempt: PreemptFlag) -> Self {
        Self {
            preempt,
            in_flight: Default::default(),
            admitted: AtomicU64::new(0),
        }
    }

    /// A request has arrived. Counted first, flag raised second: the arbiter never sees the
    /// flag down while a request it has not counted is in flight.
    pub fn admit(self: &Arc<Self>) -> AdmissionGuard {
        // Sequentially consistent with the arbiter's look at `in_flight` after it resumes the
        // miner: either it sees this request, or this raise comes after its resume.
        self.in_flight[ServiceTier::Interactive as usize].fetch_add(1, Ordering::SeqCst);
        self.admitted.fetch_add(1, Ordering::Relaxed);
        self.preempt.raise();
        AdmissionGuard {
            gate: self.clone(),
            tier: ServiceTier::Interactive,
        }
    }

    /// Requests being parsed, validated or submitted right now, of every tier.
    pub fn in_flight(&self) -> usize {
        ServiceTier::ALL.iter().map(|&t| self.in_flight_of(t)).sum()
    }

    /// Requests of `tier` being parsed, validated or submitted right now.
    pub fn in_flight_of(&self, tier: ServiceTier) -> usize {
        self.in_flight[tier as usize].load(Ordering::SeqCst)
    }

    /// Requests admitted since start.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }
}
