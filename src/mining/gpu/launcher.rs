//! The seam between the GPU miner and a device: a [`ScanLauncher`] owns the geometry, the
//! word the kernel polls, and one launch of `kernels/sha256d.cu`'s `sha256d_scan` at a time.
//! The miner's logic (which nonces, which resume points, which candidates count) lives above
//! it in [`super::sweep`] and [`super::miner`], so CUDA and the CPU stand-in differ only in
//! the calls that move memory and start threads.

use std::sync::Arc;

use thiserror::Error;

use super::job::GpuJob;
use crate::mining::HostWord;

/// Blocks × threads per block. In wave `k`, grid thread `t` tries offset `k × threads() + t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub blocks: u32,
    pub threads_per_block: u32,
}

impl Geometry {
    pub fn threads(&self) -> u32 {
        self.blocks * self.threads_per_block
    }
}

/// One launch: block `b` runs waves `resume[b]..end_wave` over nonces `start + off`,
/// `off ≤ last`, and reaches a checkpoint (overflow and stop-word check) every `every` waves.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    pub job: &'a GpuJob,
    pub start: u32,
    pub last: u32,
    pub end_wave: u32,
    pub resume: &'a [u32],
    pub every: u32,
}

impl Launch<'_> {
    /// Refuses a launch that a launcher with `geometry` cannot take now: another one is in
    /// flight (`busy`), or the resume points are not one per block.
    pub fn check(&self, geometry: Geometry, busy: bool) -> Result<(), LaunchError> {
        if busy {
            return Err(LaunchError::Misuse("a launch is already in flight"));
        }
        if self.resume.len() != geometry.blocks as usize {
            return Err(LaunchError::Misuse("one resume point per block"));
        }
        Ok(())
    }
}

/// What a launch left: the first wave each block did not finish, the candidates that fit in
/// the buffer, and how many the kernel found in all (more than the capacity: some were lost
/// and their waves are not counted as finished).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchResult {
    pub progress: Vec<u32>,
    pub candidates: Vec<u32>,
    pub found: u32,
}

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("compiling kernels/sha256d.cu: {0}")]
    Compile(String),
    #[error("device call failed: {0}")]
    Driver(String),
    #[error("{0}")]
    Misuse(&'static str),
}

/// A device that runs the scan kernel. One launch is in flight at most: `launch`, then
/// `poll` until it says finished (or `finish` at once, which waits), then `finish`.
pub trait ScanLauncher: Send {
    /// "cuda" or "cpu-grid".
    fn name(&self) -> &'static str;
    fn geometry(&self) -> Geometry;
    /// Candidates the buffer holds per launch: at least one wave of the whole grid, so that a
    /// relaunch after an overflow always makes progress (the miner also keeps the flag
    /// interval at most capacity ÷ threads waves).
    fn capacity(&self) -> u32;
    /// The word the kernel polls at its checkpoints; the miner's [`crate::mining::PreemptFlag`]
    /// mirrors into it.
    fn stop_word(&self) -> Arc<dyn HostWord>;
    /// Starts a launch without waiting for it.
    fn launch(&mut self, launch: &Launch<'_>) -> Result<(), LaunchError>;
    /// Whether the launch in flight has finished; never blocks.
    fn poll(&mut self) -> Result<bool, LaunchError>;
    /// Waits for the launch in flight and reads back what it left.
    fn finish(&mut self) -> Result<LaunchResult, LaunchError>;
}
