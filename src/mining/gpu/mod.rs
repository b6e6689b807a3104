//! The GPU miner and its device seam. [`launcher::ScanLauncher`] is the device: CUDA
//! ([`cuda`], NVRTC-compiled `kernels/sha256d.cu` with a host-mapped stop word) or the CPU
//! stand-in ([`cpu_grid`], the same kernel source compiled as C++ and run on OS threads).
//! Everything else, the nonce bookkeeping ([`sweep`]), the miner thread ([`miner`]) and the
//! per-job precomputation ([`job`]), is shared and runs in CI on the stand-in.

pub mod cpu_grid;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod job;
pub mod launcher;
pub mod miner;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod power;
pub mod sweep;

pub use cpu_grid::CpuGridLauncher;
pub use job::GpuJob;
pub use launcher::{Geometry, Launch, LaunchError, LaunchResult, ScanLauncher};
pub use miner::{GpuMiner, GpuMinerConfig, GpuStats};
