//! What the arbiter, the Stratum client and the benchmarks drive: a miner on some device,
//! given work, pre-empted through its [`PreemptFlag`] and resumed. The CPU miner
//! ([`super::CpuMiner`]) and the GPU miner ([`super::gpu::GpuMiner`], over any scan launcher)
//! both implement it, so nothing above `mining` knows which device mines.

use super::preempt::PreemptFlag;
use super::work::WorkSource;

pub trait Miner: Send + Sync + 'static {
    /// "cpu", or the launcher's name ("cuda", "cpu-grid").
    fn backend(&self) -> &'static str;
    /// The code that hashes, and how it was chosen (`/v1/status`).
    fn kernel(&self) -> KernelChoice {
        KernelChoice {
            name: self.backend(),
            chosen_by: "backend",
            rates_mhs: Vec::new(),
        }
    }
    /// Mines `source` from now on; work on the previous job is dropped at the next poll.
    fn set_work(&self, source: WorkSource);
    /// Stops mining until work is set again (the pool has none, or the connection is down).
    /// The work in hand is parked: set again, the same job goes on where it stopped.
    fn clear_work(&self);
    /// Lets the miner run again after a pre-emption.
    fn resume(&self);
    /// Workers (threads, or kernels in flight) still hashing: 0 once a pre-emption has been
    /// acknowledged and every share found is in the share channel.
    fn active_workers(&self) -> usize;
    /// Pre-emption latencies (flag raised → hashing stopped) measured since the last call.
    fn take_preempt_latencies(&self) -> Vec<u64>;
    /// The flag that pre-empts this miner.
    fn preempt_flag(&self) -> &PreemptFlag;
    /// Hashes since start (a nonce under each header of its unit counts once per header).
    fn hashes(&self) -> u64;
}

/// Which code a miner hashes with: for the CPU miner, the SHA-256d path its start-up
/// measurement picked, with each path's measured rate (million nonces a second, one thread).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct KernelChoice {
    pub name: &'static str,
    pub chosen_by: &'static str,
    pub rates_mhs: Vec<(&'static str, f64)>,
}
