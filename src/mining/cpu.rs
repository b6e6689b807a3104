//! The CPU miner: worker threads take disjoint chunks of the current work's nonce space from a
//! dispatcher, hash them under every header of the unit (eight rolled versions where the pool
//! grants version rolling) with the path measured fastest, and poll a pre-emption flag every
//! [`POLL_NONCES`] hashes (~40 µs at 25 MH/s). A pre-empted worker hands the unhashed rest of
//! its chunk back, so on resume every nonce is hashed exactly once under each header.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::miner::KernelChoice;
use super::miner::Miner;
use super::preempt::{monotonic_ns, PreemptFlag};
use super::scan_path::{choose, PathChoice, ScanPath, SHARED_SCHEDULE_VERSIONS};
use super::sha256::{header_tail, ScanJob, ScanOutcome, VersionsOutcome};
use super::share_channel::ShareSender;
use super::work::{Work, WorkSource};

/// Hashes between two looks at the pre-emption flag (nonces × the unit's headers).
pub const POLL_NONCES: u64 = 1024;
/// Nonces a worker takes at a time: small enough that a new job reaches every worker
/// within milliseconds, large enough that the dispatcher's lock is rarely touched.
const CHUNK_NONCES: u64 = 1 << 18;
const NONCE_SPACE: u64 = 1 << 32;

/// Settings of the CPU miner.
#[derive(Debug, Clone)]
pub struct CpuMinerConfig {
    pub threads: usize,
    /// Keep a log of every hashed range (tests use it to prove coverage).
    pub record_ranges: bool,
    /// The SHA-256d code to run; `None` measures each this CPU has and takes the fastest.
    pub path: Option<ScanPath>,
}

/// Work handed out and handed back. Guarded by a std mutex (not an actor) because workers
/// are OS threads that take a chunk every few milliseconds and must never wait on an async
/// task; the lock is held only to pop or push a range.
#[derive(Default)]
struct Dispatch {
    source: Option<WorkSource>,
    work: Option<Arc<Work>>,
    cursor: u64,
    returned: Vec<(u64, u64)>,
    /// Names the nonce space `work` covers: a new unit, job or extranonce1 changes it; a new
    /// share target alone does not, so ranges handed back across a retarget are kept.
    unit: u64,
    /// No pool work for now (disconnected): nothing is handed out, but the work, cursor and
    /// ranges stay, so that the same job resumed after a reconnect goes on where it was.
    paused: bool,
    generation: u64,
    recorded: Vec<(u64, u64, u64)>,
    /// Time from raising the flag to the last worker stopping, per pre-emption.
    preempt_latencies_ns: Vec<u64>,
}

impl Dispatch {
    fn next_chunk(&mut self) -> Option<Chunk> {
        if self.paused {
            return None;
        }
        let source = self.source.as_mut()?;
        if self.work.is_none() || (self.cursor >= NONCE_SPACE && self.returned.is_empty()) {
            // With version rolling, each unit is several versions of one header, hashed
            // together over the same nonces.
            self.work = Some(Arc::new(
                source.next_work_versions(self.generation, SHARED_SCHEDULE_VERSIONS),
            ));
            self.cursor = 0;
            self.unit += 1;
        }
        let work = self.work.clone().expect("set above");
        let (start, end) = match self.returned.pop() {
            Some(range) => range,
            None => {
                let start = self.cursor;
                self.cursor = (start + CHUNK_NONCES).min(NONCE_SPACE);
                (start, self.cursor)
            }
        };
        Some(Chunk {
            work,
            unit: self.unit,
            start,
            end,
        })
    }

    /// Drops the work in hand: what comes next is another nonce space.
    fn forget_work(&mut self, generation: u64) {
        self.generation = generation;
        self.work = None;
        self.returned.clear();
        self.unit += 1;
    }
}

/// A range of one unit's nonces, handed to a worker.
struct Chunk {
    work: Arc<Work>,
    unit: u64,
    start: u64,
    end: u64,
}

struct Shared {
    dispatch: Mutex<Dispatch>,
    wake: Condvar,
    preempt: PreemptFlag,
    /// Bumped on every new job: workers on an older one stop at their next poll.
    generation: AtomicU64,
    hashes: AtomicU64,
    /// Workers hashing, or (for an instant, under the dispatch lock) about to take a chunk:
    /// a worker counts itself before it reads the pre-emption flag. 0 means the miner has
    /// yielded the CPU; more than 0 does not prove that it hashes.
    active: AtomicUsize,
    shutdown: AtomicBool,
    shares: ShareSender,
    record_ranges: bool,
}

/// The running CPU miner. Dropping it stops the workers.
pub struct CpuMiner {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    choice: PathChoice,
}

impl CpuMiner {
    /// Starts `cfg.threads` workers, idle until work is set and the flag is lowered.
    pub fn start(cfg: CpuMinerConfig, preempt: PreemptFlag, shares: ShareSender) -> Self {
        let shared = Arc::new(Shared {
            dispatch: Mutex::new(Dispatch::default()),
            wake: Condvar::new(),
            preempt,
            generation: AtomicU64::new(0),
            hashes: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            shares,
            record_ranges: cfg.record_ranges,
        });
        let choice = choose(cfg.path);
        let path = choice.path;
        let workers = (0..cfg.threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("miner-cpu-{i}"))
                    .spawn(move || worker(shared, path))
                    .expect("spawning a miner thread")
            })
            .collect();
        tracing::info!(
            threads = cfg.threads,
            path = path.name(),
            chosen_by = choice.chosen_by,
            "CPU miner started"
        );
        Self {
            shared,
            workers,
            choice,
        }
    }

    /// The dispatcher's cursor and the ranges handed back, for coverage checks.
    pub fn pending_ranges(&self) -> (u64, Vec<(u64, u64)>) {
        let d = self.shared.dispatch.lock().expect("dispatch lock");
        (d.cursor, d.returned.clone())
    }

    /// Every range hashed so far as (generation, start, end), when `record_ranges` is on.
    pub fn recorded_ranges(&self) -> Vec<(u64, u64, u64)> {
        self.shared
            .dispatch
            .lock()
            .expect("dispatch lock")
            .recorded
            .clone()
    }
}

impl Miner for CpuMiner {
    fn backend(&self) -> &'static str {
        "cpu"
    }

    fn kernel(&self) -> KernelChoice {
        KernelChoice {
            name: self.choice.path.name(),
            chosen_by: self.choice.chosen_by,
            rates_mhs: self
                .choice
                .rates_mhs
                .iter()
                .map(|(p, r)| (p.name(), *r))
                .collect(),
        }
    }

    /// Mines `source` from now on; work on the previous job is dropped at the next poll. The
    /// same job sent again (a pool re-sends it after `set_difficulty`) keeps the miner's place
    /// and takes only the new share target.
    fn set_work(&self, source: WorkSource) {
        let mut d = self
            .shared
            .dispatch
            .lock()
            .expect("dispatch lock poisoned only if a worker panicked");
        let same_work = d.source.as_ref().is_some_and(|c| c.continues(&source));
        let same_target = d.source.as_ref().map(|c| c.share_target) == Some(source.share_target);
        if same_work && same_target && !d.paused {
            return; // nothing changed: the workers go on undisturbed
        }
        let generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        d.paused = false;
        match d.source.as_mut() {
            Some(current) if same_work => {
                current.share_target = source.share_target;
                // Workers stop at their next poll and hand back the rest of their range,
                // which is then hashed at the new target; the cursor stays where it was.
                d.generation = generation;
                d.work = d
                    .work
                    .as_ref()
                    .map(|w| Arc::new(w.retargeted(source.share_target, generation)));
            }
            _ => {
                d.forget_work(generation);
                d.source = Some(source);
            }
        }
        drop(d);
        self.shared.wake.notify_all();
    }

    /// Stops mining until new work comes (the pool has none, or the connection is down).
    /// The work in hand is parked, not forgotten: a pool that resumes the session sends the
    /// same job again, and the miner then goes on where it stopped instead of hashing it again.
    fn clear_work(&self) {
        let mut d = self.shared.dispatch.lock().expect("dispatch lock");
        // Workers stop at their next poll and hand their ranges back to the parked work.
        d.generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        d.paused = true;
    }

    /// Lets the workers run again after a pre-emption.
    fn resume(&self) {
        self.shared.preempt.lower();
        let _guard = self.shared.dispatch.lock().expect("dispatch lock");
        self.shared.wake.notify_all();
    }

    /// Workers still hashing (or about to look for a chunk): 0 once a pre-emption has been
    /// acknowledged by all of them.
    fn active_workers(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Pre-emption latencies (flag raised → every worker stopped) measured since the last call.
    fn take_preempt_latencies(&self) -> Vec<u64> {
        std::mem::take(
            &mut self
                .shared
                .dispatch
                .lock()
                .expect("dispatch lock")
                .preempt_latencies_ns,
        )
    }

    /// The flag that pre-empts this miner.
    fn preempt_flag(&self) -> &PreemptFlag {
        &self.shared.preempt
    }

    /// Hashes since start (nonces × the headers of their units).
    fn hashes(&self) -> u64 {
        self.shared.hashes.load(Ordering::Relaxed)
    }
}

impl Drop for CpuMiner {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Puts the calling thread in Linux's `SCHED_IDLE` class (or, failing that, at nice 19): the
/// kernel then runs it only when no ordinary thread wants the core, so a miner thread can
/// never delay the HTTP or engine threads by a time slice, whatever the flag says.
fn yield_to_everything_else() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on the calling thread with a valid, initialised parameter.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        }
    }
}

fn worker(shared: Arc<Shared>, path: ScanPath) {
    yield_to_everything_else();
    loop {
        // Wait, without spinning, until there is work and no pre-emption.
        let Chunk {
            work,
            unit,
            start,
            end,
        } = {
            let mut d = shared.dispatch.lock().expect("dispatch lock");
            loop {
                if shared.shutdown.load(Ordering::Acquire) {
                    return;
                }
                // Counted active before the flag is read (both sequentially consistent), as
                // the GPU miner does: a pauser that raises the flag and then sees no worker
                // active can be sure none is about to start hashing.
                shared.active.fetch_add(1, Ordering::SeqCst);
                if !shared.preempt.is_raised() {
                    if let Some(chunk) = d.next_chunk() {
                        break chunk;
                    }
                }
                shared.active.fetch_sub(1, Ordering::SeqCst);
                d = shared
                    .wake
                    .wait_timeout(d, Duration::from_millis(100))
                    .expect("dispatch lock")
                    .0;
            }
        };
        // Hashes are counted at every poll, not once a chunk, so the rate on the dashboard
        // moves even when a starved worker takes long over a chunk. Each nonce is hashed
        // under every header of the unit.
        let counted = std::cell::Cell::new(start);
        let headers = work.headers() as u64;
        let stop = |n: u64| {
            shared
                .hashes
                .fetch_add((n - counted.replace(n)) * headers, Ordering::Relaxed);
            shared.preempt.is_raised()
                || shared.generation.load(Ordering::Acquire) != work.generation
        };
        let outcome = scan_unit(&work, start, end, path, &stop);
        let done = outcome.next;
        shared
            .hashes
            .fetch_add((done - counted.get()) * headers, Ordering::Relaxed);
        for (which, nonce) in outcome.candidates {
            if let Some(share) = work.check_header(which, nonce) {
                if share.is_block {
                    tracing::warn!(job = %share.job_id, nonce = format!("{:08x}", nonce), hash = %hex::encode(share.hash.iter().rev().copied().collect::<Vec<u8>>()), "BLOCK FOUND: this hash meets the network target");
                }
                // A share that cannot be queued is counted and logged by the channel.
                shared.shares.send(share);
            }
        }
        {
            let mut d = shared.dispatch.lock().expect("dispatch lock");
            if shared.record_ranges && done > start {
                d.recorded.push((work.generation, start, done));
            }
            // An unfinished range of the unit in hand goes back to be resumed exactly there.
            if done < end && d.unit == unit && d.work.is_some() {
                d.returned.push((done, end));
            }
            // The last worker to stop under a raised flag records how long stopping took,
            // also when its chunk happened to end just then: every pause that found the
            // miner hashing gets a latency.
            let was_last = shared.active.fetch_sub(1, Ordering::SeqCst) == 1;
            if was_last && shared.preempt.is_raised() {
                let latency = monotonic_ns().saturating_sub(shared.preempt.raised_at_ns());
                if d.preempt_latencies_ns.len() < 100_000 {
                    d.preempt_latencies_ns.push(latency);
                }
            }
        }
    }
}

/// Scans `start..end` of every header of `work` (its rolled siblings too) with the code of
/// `path`. The pre-emption poll comes as often in time as for one header.
pub fn scan_unit(
    work: &Work,
    start: u64,
    end: u64,
    path: ScanPath,
    stop: &dyn Fn(u64) -> bool,
) -> VersionsOutcome {
    with_job(work, start, end, work.headers(), stop, |job| {
        path.scan_versions(&work.midstates(), job)
    })
}

/// Scans `start..end` of `work`'s first header with the code of `path`.
pub fn scan(
    work: &Work,
    start: u64,
    end: u64,
    path: ScanPath,
    stop: &dyn Fn(u64) -> bool,
) -> ScanOutcome {
    with_job(work, start, end, 1, stop, |job| {
        path.scan(&work.midstate, job)
    })
}

/// Runs `scan` on the job of `start..end` of `work`, polling every [`POLL_NONCES`] hashes
/// across its `headers`.
fn with_job<R>(
    work: &Work,
    start: u64,
    end: u64,
    headers: usize,
    stop: &dyn Fn(u64) -> bool,
    scan: impl FnOnce(&ScanJob<'_>) -> R,
) -> R {
    let tail = header_tail(&work.header);
    scan(&ScanJob {
        tail: &tail,
        start,
        end,
        target_top: work.share_target.top_u32(),
        poll_every: (POLL_NONCES / headers as u64).max(16),
        stop,
    })
}
