//! The arbiter owns the device's schedule: it alone decides whether the miner runs. Inference
//! always wins. The policy is a pure state machine ([`policy`]); the shell ([`shell`]) feeds
//! it events from the engine, the HTTP layer, the miner and the pool, and carries out its
//! actions. The HTTP layer's fast path raises the miner's pre-emption flag itself, the moment a
//! request arrives, through a [`DeviceGate`].

mod gate;
pub mod policy;
mod shell;

pub use gate::{AdmissionGuard, DeviceGate};
pub use policy::PolicyConfig;
pub use shell::{spawn_arbiter, ArbiterParts, ArbiterStatus, PreemptFigure};
