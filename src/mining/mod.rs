//! The mining core: SHA-256d with a midstate, targets and difficulty, Stratum jobs turned
//! into headers, the CPU miner (SHA-NI, AVX-512 or AVX2, measured at start-up) and the GPU miner over a scan launcher
//! (CUDA, or the CPU stand-in that runs the same kernel source). Both sit behind [`Miner`].
//! Everything here is pure or owns only its worker threads; the pool connection lives in
//! [`crate::stratum`].

pub mod cpu;
pub mod gpu;
#[cfg(target_arch = "x86_64")]
pub mod issue_limit;
pub mod job;
mod lanes;
#[cfg(target_arch = "x86_64")]
mod lanes_x86;
mod miner;
mod preempt;
pub mod scan_path;
pub mod sha256;
#[cfg(target_arch = "x86_64")]
pub mod shani;
pub mod share_channel;
pub mod target;
pub mod work;

pub use cpu::{CpuMiner, CpuMinerConfig};
pub use job::Job;
pub use miner::{KernelChoice, Miner};
pub use preempt::{monotonic_ns, HostWord, PreemptFlag};
pub use scan_path::{ScanPath, SHARED_SCHEDULE_VERSIONS};
pub use share_channel::{share_channel, ShareReceiver, ShareSender, SHARE_CHANNEL_CAPACITY};
pub use target::{difficulty_of_hash, target_for_difficulty, U256};
pub use work::{Share, Work, WorkSource};

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MiningError {
    #[error("malformed job: {0}")]
    BadJob(String),
}
