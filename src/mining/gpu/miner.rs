//! The GPU miner: one thread drives a [`ScanLauncher`] launch after launch. It turns the
//! pool's work into [`GpuJob`]s, walks each unit's nonce space with a [`Sweep`], resumes every
//! block from its own count after a pre-emption, re-checks every candidate on the CPU before it
//! becomes a share, and reports how long each pre-emption took from the flag's raise to the
//! kernel's end. The launcher decides nothing; CUDA and the CPU stand-in run this same code.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::job::GpuJob;
use super::launcher::{LaunchError, LaunchResult, ScanLauncher};
use super::sweep::{Absorbed, Sweep, NONCE_SPACE};
use crate::mining::sha256::header_tail;
use crate::mining::{monotonic_ns, HostWord, Miner, PreemptFlag, ShareSender, Work, WorkSource};

/// Settings of the GPU miner.
#[derive(Debug, Clone)]
pub struct GpuMinerConfig {
    /// Full waves per launch: a launch is the longest a new job waits (a pre-emption waits
    /// only for the next checkpoint). 256 waves of an H100-sized grid are ~5 ms.
    pub waves_per_launch: u32,
    /// Waves between two looks at the stop word (the kernel's `every`): 1 stops within a wave.
    pub check_every: u32,
    /// Nonces per unit of work: 2³², less in tests that cover a whole space.
    pub nonce_space: u64,
}

impl Default for GpuMinerConfig {
    fn default() -> Self {
        Self {
            waves_per_launch: 256,
            check_every: 1,
            nonce_space: NONCE_SPACE,
        }
    }
}

/// Counters beyond the [`Miner`] interface, for benchmarks, gpu-check and tests.
#[derive(Debug, Default)]
pub struct GpuStats {
    pub launches: AtomicU64,
    /// Launches whose candidate buffer overflowed (their waves were rescanned).
    pub overflows: AtomicU64,
    /// Candidates kept from finished waves, and those that became shares.
    pub candidates: AtomicU64,
    pub shares: AtomicU64,
    /// Units of work (extranonce2 values) whose whole nonce space was hashed.
    pub units_done: AtomicU64,
    pub launch_errors: AtomicU64,
}

#[derive(Default)]
struct Assignment {
    source: Option<WorkSource>,
    /// No pool work for now: the source and the unit in hand are kept, so that the same job
    /// resumed after a reconnect goes on where it was.
    paused: bool,
    /// Bumped on every new job; the thread's unit of an older generation is dropped.
    generation: u64,
}

struct Shared {
    assignment: Mutex<Assignment>,
    wake: Condvar,
    preempt: PreemptFlag,
    stop_word: Arc<dyn HostWord>,
    hashes: AtomicU64,
    active: AtomicUsize,
    shutdown: AtomicBool,
    shares: ShareSender,
    latencies: Mutex<Vec<u64>>,
    stats: Arc<GpuStats>,
}

/// The running GPU miner. Dropping it stops its thread after the launch in flight.
pub struct GpuMiner {
    shared: Arc<Shared>,
    backend: &'static str,
    thread: Option<JoinHandle<()>>,
}

/// The unit of work the thread is on.
struct Unit {
    generation: u64,
    work: Arc<Work>,
    job: GpuJob,
    sweep: Sweep,
}

impl GpuMiner {
    /// Starts the miner's thread, idle until work is set and the flag is lowered. The flag is
    /// mirrored into the launcher's stop word from now on.
    pub fn start(
        launcher: Box<dyn ScanLauncher>,
        cfg: GpuMinerConfig,
        preempt: PreemptFlag,
        shares: ShareSender,
    ) -> Self {
        let stop_word = launcher.stop_word();
        if !preempt.mirror_to(stop_word.clone()) {
            tracing::warn!("the pre-emption flag already drives another device; the GPU kernel will stop only at launch ends");
        }
        let shared = Arc::new(Shared {
            assignment: Mutex::default(),
            wake: Condvar::new(),
            preempt,
            stop_word,
            hashes: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            shares,
            latencies: Mutex::default(),
            stats: Arc::default(),
        });
        let backend = launcher.name();
        let g = launcher.geometry();
        tracing::info!(
            backend,
            blocks = g.blocks,
            threads_per_block = g.threads_per_block,
            waves_per_launch = cfg.waves_per_launch,
            check_every = cfg.check_every,
            "GPU miner started"
        );
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("miner-{backend}"))
                .spawn(move || run(shared, launcher, cfg))
                .expect("spawning the GPU miner's thread")
        };
        Self {
            shared,
            backend,
            thread: Some(thread),
        }
    }

    pub fn stats(&self) -> Arc<GpuStats> {
        self.shared.stats.clone()
    }
}

impl Miner for GpuMiner {
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// The same job sent again (a pool re-sends it after `set_difficulty`) keeps the miner's
    /// place: the unit in hand and its sweep stay, and the next launch takes the new target.
    fn set_work(&self, source: WorkSource) {
        let mut a = self.shared.assignment.lock().expect("assignment lock");
        a.paused = false;
        match a.source.as_mut() {
            Some(current) if current.continues(&source) => {
                current.share_target = source.share_target;
            }
            _ => {
                a.source = Some(source);
                a.generation += 1;
            }
        }
        drop(a);
        self.shared.wake.notify_all();
    }

    /// Parks the work: the launch in flight ends as usual, and no other starts until work
    /// is set again; the same job then goes on where it was.
    fn clear_work(&self) {
        let mut a = self.shared.assignment.lock().expect("assignment lock");
        a.paused = true;
    }

    fn resume(&self) {
        self.shared.preempt.lower();
        let _guard = self.shared.assignment.lock().expect("assignment lock");
        self.shared.wake.notify_all();
    }

    fn active_workers(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    fn take_preempt_latencies(&self) -> Vec<u64> {
        std::mem::take(&mut self.shared.latencies.lock().expect("latency lock"))
    }

    fn preempt_flag(&self) -> &PreemptFlag {
        &self.shared.preempt
    }

    fn hashes(&self) -> u64 {
        self.shared.hashes.load(Ordering::Relaxed)
    }
}

impl Drop for GpuMiner {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.stop_word.word().store(1, Ordering::SeqCst);
        // Under the lock, so the thread cannot miss the wake-up between its look and its wait.
        let _guard = self.shared.assignment.lock().expect("assignment lock");
        self.shared.wake.notify_all();
        drop(_guard);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until there is work and no pre-emption, then returns the unit to launch on, with
/// `active` already counted. `active` is set first and the flag looked at again after: a raise
/// either sees `active` at 1 (and waits for the launch to end) or is seen here.
fn next_unit(
    shared: &Shared,
    unit: &mut Option<Unit>,
    cfg: &GpuMinerConfig,
    launcher: &dyn ScanLauncher,
) -> bool {
    let mut a = shared.assignment.lock().expect("assignment lock");
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            return false;
        }
        if !shared.preempt.is_raised() {
            if unit.as_ref().is_some_and(|u| u.generation != a.generation) {
                *unit = None;
            }
            let generation = a.generation;
            let paused = a.paused;
            if let Some(source) = a.source.as_mut().filter(|_| !paused) {
                if let Some(u) = unit.as_mut() {
                    if u.work.share_target != source.share_target {
                        // A retarget: same nonce space, the sweep goes on where it was.
                        u.work = Arc::new(u.work.retargeted(source.share_target, generation));
                        u.job = gpu_job(&u.work);
                    }
                }
                if unit.as_mut().is_none_or(|u| u.sweep.segment().is_none()) {
                    if unit.is_some() {
                        shared.stats.units_done.fetch_add(1, Ordering::Relaxed);
                    }
                    let work = source.next_work(generation);
                    *unit = Some(Unit {
                        generation,
                        job: gpu_job(&work),
                        work: Arc::new(work),
                        sweep: Sweep::new(
                            cfg.nonce_space,
                            cfg.waves_per_launch,
                            launcher.geometry(),
                        ),
                    });
                }
                shared.active.store(1, Ordering::SeqCst);
                if !shared.preempt.is_raised() {
                    return true;
                }
                shared.active.store(0, Ordering::SeqCst);
            }
        }
        a = shared
            .wake
            .wait_timeout(a, Duration::from_millis(100))
            .expect("assignment lock")
            .0;
    }
}

/// The kernel's view of `work`: its midstate, header tail and the target's top word.
fn gpu_job(work: &Work) -> GpuJob {
    GpuJob::new(
        &work.midstate,
        &header_tail(&work.header),
        work.share_target.top_u32(),
    )
}

/// Counts the thread as idle when dropped, also when a launch panics: the arbiter would
/// otherwise wait for it for ever.
struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

fn run(shared: Arc<Shared>, mut launcher: Box<dyn ScanLauncher>, mut cfg: GpuMinerConfig) {
    // A block may find at most `every` waves of candidates before it checks for overflow:
    // with the buffer holding that much for the whole grid, a relaunch always progresses.
    let threads = launcher.geometry().threads().max(1);
    cfg.check_every = cfg
        .check_every
        .clamp(1, (launcher.capacity() / threads).max(1));
    let mut unit: Option<Unit> = None;
    let mut failures = 0u32;
    while next_unit(&shared, &mut unit, &cfg, launcher.as_ref()) {
        let _active = ActiveGuard(&shared.active);
        let u = unit.as_mut().expect("next_unit set it");
        let segment = u
            .sweep
            .segment()
            .expect("next_unit left a segment to launch");
        // A raise that came while the word was being lowered leaves it raised; a word left
        // raised by a job change or drop is lowered here, since the flag is down.
        shared.preempt.sync_device();
        let outcome = launch_and_wait(
            &shared,
            launcher.as_mut(),
            &segment.launch(&u.job, cfg.check_every),
        )
        .and_then(|result| {
            segment
                .absorb(&result)
                .map_err(|e| LaunchError::Driver(e.to_string()))
        });
        let ended_ns = monotonic_ns();
        shared.stats.launches.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(absorbed) => {
                failures = 0;
                let unfinished = !segment.is_done();
                deliver(&shared, &u.work, absorbed);
                if unfinished && shared.preempt.is_raised() {
                    let latency = ended_ns.saturating_sub(shared.preempt.raised_at_ns());
                    let mut l = shared.latencies.lock().expect("latency lock");
                    if l.len() < 100_000 {
                        l.push(latency);
                    }
                }
            }
            Err(e) => {
                failures += 1;
                shared.stats.launch_errors.fetch_add(1, Ordering::Relaxed);
                // The segment is unchanged: its waves are launched again, nothing is lost.
                if failures <= 3 || failures.is_power_of_two() {
                    tracing::error!(error = %e, failures, "GPU scan launch failed; retrying");
                }
            }
        }
        drop(_active);
        if failures > 0 {
            // Back off (up to a second) without holding up shutdown.
            let wait = Duration::from_millis(10u64 << failures.min(7));
            let a = shared.assignment.lock().expect("assignment lock");
            let _ = shared.wake.wait_timeout(a, wait);
        }
    }
}

/// Starts one launch and waits for it: spinning politely while a pre-emption is pending (the
/// kernel ends within a wave, and every microsecond of waiting is counted as latency), and
/// in 200 µs naps otherwise.
fn launch_and_wait(
    shared: &Shared,
    launcher: &mut dyn ScanLauncher,
    launch: &super::launcher::Launch<'_>,
) -> Result<LaunchResult, LaunchError> {
    launcher.launch(launch)?;
    loop {
        match launcher.poll() {
            Ok(true) => break,
            Ok(false) if shared.preempt.is_raised() || shared.shutdown.load(Ordering::Relaxed) => {
                std::thread::yield_now()
            }
            Ok(false) => std::thread::sleep(Duration::from_micros(200)),
            Err(e) => {
                // Nothing of this launch is trusted; `finish` still ends it, so the launcher
                // can take the next.
                let _ = launcher.finish();
                return Err(e);
            }
        }
    }
    launcher.finish()
}

/// Re-checks every candidate in full on the CPU and sends the shares.
fn deliver(shared: &Shared, work: &Work, absorbed: Absorbed) {
    shared.hashes.fetch_add(absorbed.hashed, Ordering::Relaxed);
    if absorbed.overflowed {
        shared.stats.overflows.fetch_add(1, Ordering::Relaxed);
    }
    let stats = &shared.stats;
    stats
        .candidates
        .fetch_add(absorbed.candidates.len() as u64, Ordering::Relaxed);
    for nonce in absorbed.candidates {
        // The kernel compares the top 32 bits only: a candidate whose top word equals the
        // target's may still miss it, and only the full hash decides.
        if let Some(share) = work.check(nonce) {
            if share.is_block {
                tracing::warn!(job = %share.job_id, nonce = format!("{nonce:08x}"), "BLOCK FOUND: this hash meets the network target");
            }
            stats.shares.fetch_add(1, Ordering::Relaxed);
            // A share that cannot be queued is counted and logged by the channel.
            shared.shares.send(share);
        }
    }
}
