//! The CPU stand-in launcher: `kernels/sha256d.cu`'s own `sha256d_scan`, compiled as C++ by
//! build.rs (`kernels/cpu_grid.cpp`), run by one OS thread per CUDA thread with a real barrier
//! per block. A launch runs on a thread of its own, so `launch` returns at once and `poll`
//! looks without waiting, as with a CUDA stream; the stop word is an ordinary atomic that the
//! kernel reads while it runs. CI drives the GPU miner through it; it is also the launcher of
//! `--mine-device cpu-grid` (a test and demonstration device, slower than the CPU miner).

use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::job::GpuJob;
use super::launcher::{Geometry, Launch, LaunchError, LaunchResult, ScanLauncher};
use crate::mining::HostWord;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn idlerig_cpu_grid_scan(
        job: *const GpuJob,
        grid: u32,
        block: u32,
        start: u32,
        last: u32,
        end_wave: u32,
        resume: *const u32,
        every: u32,
        out: *mut u32,
        cap: u32,
        stop: *const u32,
        progress: *mut u32,
    ) -> std::ffi::c_int;
}

/// The stand-in's stop word: plain memory that the emulated threads read.
#[derive(Default)]
struct StopWord(AtomicU32);

impl HostWord for StopWord {
    fn word(&self) -> &AtomicU32 {
        &self.0
    }
}

pub struct CpuGridLauncher {
    geometry: Geometry,
    capacity: u32,
    stop: Arc<StopWord>,
    in_flight: Option<JoinHandle<Result<LaunchResult, LaunchError>>>,
}

impl CpuGridLauncher {
    /// `capacity` is raised to one wave of the grid if smaller (see [`ScanLauncher::capacity`]).
    pub fn new(geometry: Geometry, capacity: u32) -> Result<Self, LaunchError> {
        if geometry.blocks == 0 || geometry.threads_per_block == 0 {
            return Err(LaunchError::Misuse("a grid needs blocks and threads"));
        }
        if geometry.blocks * geometry.threads_per_block > 4096 {
            return Err(LaunchError::Misuse(
                "the CPU stand-in runs one OS thread per CUDA thread: keep the grid under 4096",
            ));
        }
        Ok(Self {
            geometry,
            capacity: capacity.max(geometry.threads()),
            stop: Arc::default(),
            in_flight: None,
        })
    }
}

impl ScanLauncher for CpuGridLauncher {
    fn name(&self) -> &'static str {
        "cpu-grid"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn stop_word(&self) -> Arc<dyn HostWord> {
        self.stop.clone()
    }

    fn launch(&mut self, l: &Launch<'_>) -> Result<(), LaunchError> {
        l.check(self.geometry, self.in_flight.is_some())?;
        let (g, cap, stop) = (self.geometry, self.capacity, self.stop.clone());
        let (job, resume) = (*l.job, l.resume.to_vec());
        let (start, last, end_wave, every) = (l.start, l.last, l.end_wave, l.every.max(1));
        let handle = std::thread::Builder::new()
            .name("miner-cpu-grid".into())
            .spawn(move || {
                let mut out = vec![0u32; cap as usize + 1];
                let mut progress = vec![0u32; g.blocks as usize];
                // SAFETY: every pointer is valid for the call's duration with the lengths the
                // kernel uses (resume and progress: one per block; out: 1 + cap), and the stop
                // word is an atomic the C++ side only reads.
                let rc = unsafe {
                    idlerig_cpu_grid_scan(
                        &job,
                        g.blocks,
                        g.threads_per_block,
                        start,
                        last,
                        end_wave,
                        resume.as_ptr(),
                        every,
                        out.as_mut_ptr(),
                        cap,
                        stop.0.as_ptr(),
                        progress.as_mut_ptr(),
                    )
                };
                if rc != 0 {
                    return Err(LaunchError::Driver(
                        "the CPU stand-in could not create its threads".into(),
                    ));
                }
                let found = out[0];
                let kept = (found.min(cap) as usize) + 1;
                out.truncate(kept);
                out.remove(0);
                Ok(LaunchResult {
                    progress,
                    candidates: out,
                    found,
                })
            })
            .map_err(|e| LaunchError::Driver(format!("spawning the launch thread: {e}")))?;
        self.in_flight = Some(handle);
        Ok(())
    }

    fn poll(&mut self) -> Result<bool, LaunchError> {
        match &self.in_flight {
            Some(h) => Ok(h.is_finished()),
            None => Err(LaunchError::Misuse("no launch in flight")),
        }
    }

    fn finish(&mut self) -> Result<LaunchResult, LaunchError> {
        let handle = self
            .in_flight
            .take()
            .ok_or(LaunchError::Misuse("no launch in flight"))?;
        handle
            .join()
            .map_err(|_| LaunchError::Driver("the CPU stand-in's launch panicked".into()))?
    }
}

impl Drop for CpuGridLauncher {
    fn drop(&mut self) {
        if let Some(h) = self.in_flight.take() {
            // Whatever the flag says, a launch nobody will read stops at its next checkpoint.
            self.stop.0.store(1, std::sync::atomic::Ordering::SeqCst);
            let _ = h.join();
        }
    }
}
