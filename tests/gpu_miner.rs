//! The GPU miner's host protocol, run without a GPU: the miner drives the CPU stand-in
//! launcher, which runs `kernels/sha256d.cu`'s own scan kernel on OS threads (blocks, barriers,
//! atomics and the stop word emulated). Under random pre-emptions and a candidate buffer far
//! too small, every nonce of a reduced nonce space is hashed and reported exactly once; the
//! candidates equal the portable scanner's; a segment at the top of the nonce space does not
//! wrap; extranonce2 rolls over; and a raised flag ends a launch in the middle.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idlerig::mining::gpu::sweep::Segment;
use idlerig::mining::gpu::{
    CpuGridLauncher, Geometry, GpuJob, GpuMiner, GpuMinerConfig, GpuStats, Launch, LaunchError,
    LaunchResult, ScanLauncher,
};
use idlerig::mining::job::Job;
use idlerig::mining::sha256::{header_tail, scan_portable, ScanJob};
use idlerig::mining::HostWord;
use idlerig::mining::{
    target_for_difficulty, Miner, PreemptFlag, Share, ShareReceiver, WorkSource, U256,
};
use rand::{Rng, SeedableRng};

const GRID: Geometry = Geometry {
    blocks: 4,
    threads_per_block: 8,
};

fn job(seed: u8) -> Job {
    Job {
        job_id: format!("j{seed}"),
        prevhash: [seed; 32],
        coinb1: vec![1, 2, 3, seed],
        coinb2: vec![4, 5, 6],
        merkle_branch: vec![[7; 32], [seed; 32]],
        version: 0x2000_0000,
        nbits: 0x1703_4219,
        ntime: 0x6650_0000,
        clean_jobs: true,
    }
}

fn miner(cfg: GpuMinerConfig, capacity: u32) -> (GpuMiner, Arc<GpuStats>, ShareReceiver) {
    let (tx, rx) = idlerig::mining::share_channel(1 << 20);
    let launcher = CpuGridLauncher::new(GRID, capacity).unwrap();
    let flag = PreemptFlag::default();
    flag.raise();
    let m = GpuMiner::start(Box::new(launcher), cfg, flag, tx);
    let stats = m.stats();
    (m, stats, rx)
}

/// Polls `done` until it holds; fails after a deadline that only a hung miner misses.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Raises and lowers the flag at random moments until `units` units of work are done, then
/// leaves the miner pre-empted and idle.
fn mine_with_random_preemptions(m: &GpuMiner, stats: &GpuStats, units: u64, seed: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut preemptions = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while stats.units_done.load(Ordering::SeqCst) < units {
        assert!(Instant::now() < deadline, "the miner made no progress");
        m.resume();
        // A random amount of mining, in spins rather than time: each pre-emption lands at
        // an arbitrary point of a launch, whatever the machine's speed.
        for _ in 0..rng.random_range(0..20_000) {
            std::hint::spin_loop();
        }
        m.preempt_flag().raise();
        preemptions += 1;
        if rng.random_bool(0.3) {
            wait_for("the miner to stop", || m.active_workers() == 0);
        }
    }
    m.preempt_flag().raise();
    wait_for("the miner to stop", || m.active_workers() == 0);
    preemptions
}

fn shares(rx: &mut ShareReceiver) -> Vec<Share> {
    std::iter::from_fn(|| rx.try_recv()).collect()
}

#[test]
fn every_nonce_is_hashed_and_reported_exactly_once_under_random_preemptions() {
    const SPACE: u64 = 1 << 13;
    // Every hash meets the all-ones target: each nonce the kernel hashes comes back as a
    // share, so the shares are the set of nonces hashed, with their multiplicity.
    let source = WorkSource::new(job(1), vec![9; 4], 2, U256::MAX, 0);
    // 64 slots for 8,192 candidates per unit: nearly every launch overflows and rescans.
    let cfg = GpuMinerConfig {
        waves_per_launch: 64,
        check_every: 1,
        nonce_space: SPACE,
    };
    let (m, stats, mut rx) = miner(cfg, 64);
    m.set_work(source);
    let preemptions = mine_with_random_preemptions(&m, &stats, 3, 7);
    let mut by_unit: BTreeMap<Vec<u8>, Vec<u32>> = BTreeMap::new();
    for s in shares(&mut rx) {
        by_unit
            .entry(s.extranonce2.clone())
            .or_default()
            .push(s.nonce);
    }
    let done = stats.units_done.load(Ordering::SeqCst);
    let full: Vec<_> = by_unit
        .iter()
        .filter(|(en2, _)| u16::from_le_bytes([en2[0], en2[1]]) < done as u16)
        .collect();
    assert!(full.len() as u64 >= 3, "{} full units", full.len());
    for (en2, nonces) in full {
        let mut sorted = nonces.clone();
        sorted.sort_unstable();
        let want: Vec<u32> = (0..SPACE as u32).collect();
        assert_eq!(sorted.len(), nonces.len());
        assert!(
            sorted == want,
            "unit {en2:?}: {} nonces reported, {} distinct",
            nonces.len(),
            {
                let mut d = sorted.clone();
                d.dedup();
                d.len()
            }
        );
    }
    assert!(
        stats.overflows.load(Ordering::SeqCst) > 0,
        "the buffer overflowed and was rescanned"
    );
    assert!(preemptions >= 3);
    // Hashes count each nonce once, the unit in progress included.
    assert!(m.hashes() >= 3 * SPACE);
}

#[test]
fn candidates_equal_the_portable_scanners() {
    const SPACE: u64 = 1 << 16;
    // Difficulty 2^-28: one nonce in ~16 passes, a few thousand candidates per unit.
    let target = target_for_difficulty(1.0 / f64::from(1u32 << 28));
    let source = WorkSource::new(job(2), vec![1, 2, 3, 4], 4, target, 0);
    let cfg = GpuMinerConfig {
        waves_per_launch: 256,
        check_every: 4,
        nonce_space: SPACE,
    };
    let (m, stats, mut rx) = miner(cfg, 256);
    m.set_work(source.clone());
    mine_with_random_preemptions(&m, &stats, 2, 11);
    let got: BTreeSet<u32> = shares(&mut rx)
        .into_iter()
        .filter(|s| s.extranonce2 == vec![0, 0, 0, 0])
        .map(|s| s.nonce)
        .collect();
    let mut reference = source;
    let work = reference.next_work(1);
    let tail = header_tail(&work.header);
    let portable = scan_portable(
        &work.midstate,
        &ScanJob::whole(&tail, 0, SPACE, work.share_target.top_u32()),
    );
    let want: BTreeSet<u32> = portable
        .candidates
        .into_iter()
        .filter(|&n| work.check(n).is_some())
        .collect();
    assert!(want.len() > 1000, "{} shares expected", want.len());
    assert_eq!(got, want);
}

#[test]
fn a_segment_at_the_top_of_the_nonce_space_does_not_wrap() {
    let mut launcher = CpuGridLauncher::new(GRID, 4096).unwrap();
    let start = (1u64 << 32) - 100;
    // 100 nonces take 4 waves of 32 threads; 28 of those threads would pass 2^32.
    let mut seg = Segment::new(start, 100, GRID);
    let job = GpuJob::new(&[1; 8], &[2, 3, 4], u32::MAX);
    launcher.launch(&seg.launch(&job, 1)).unwrap();
    let result = launcher.finish().unwrap();
    let absorbed = seg.absorb(&result).unwrap();
    assert!(seg.is_done());
    assert_eq!(absorbed.hashed, 100);
    let want: Vec<u32> = (start as u32..=u32::MAX).collect();
    assert_eq!(absorbed.candidates, want);
    assert_eq!(result.found, 100, "no thread past the end hashed");
}

#[test]
fn extranonce2_rolls_over_into_version_bits() {
    // A one-byte extranonce2 is spent after 256 units of 64 nonces each.
    let source = WorkSource::new(job(3), vec![5; 4], 1, U256::MAX, 0x1fff_e000);
    let cfg = GpuMinerConfig {
        waves_per_launch: 2,
        check_every: 1,
        nonce_space: 64,
    };
    let (m, stats, mut rx) = miner(cfg, 4096);
    m.set_work(source);
    m.resume();
    wait_for("260 units", || {
        stats.units_done.load(Ordering::SeqCst) >= 260
    });
    m.preempt_flag().raise();
    wait_for("the miner to stop", || m.active_workers() == 0);
    let all = shares(&mut rx);
    let mut seen = BTreeMap::<(u8, Option<u32>), usize>::new();
    for s in &all {
        *seen.entry((s.extranonce2[0], s.version_bits)).or_default() += 1;
    }
    let en2: BTreeSet<u8> = seen.keys().map(|k| k.0).collect();
    assert_eq!(en2.len(), 256, "every extranonce2 value was used");
    let versions: BTreeSet<Option<u32>> = seen.keys().map(|k| k.1).collect();
    assert!(versions.len() >= 2, "rolled versions: {versions:?}");
    assert!(
        seen.values().all(|&n| n <= 64),
        "no (extranonce2, version) unit was mined twice"
    );
}

#[test]
fn a_raised_flag_ends_a_launch_in_the_middle() {
    // One launch would take the whole 2^32 space: only the stop word can end it early.
    let source = WorkSource::new(job(4), vec![1; 4], 4, target_for_difficulty(1.0), 0);
    let cfg = GpuMinerConfig {
        waves_per_launch: u32::MAX / 32,
        ..GpuMinerConfig::default()
    };
    let (m, stats, _rx) = miner(cfg, 4096);
    m.set_work(source);
    m.resume();
    wait_for("a launch", || {
        stats.launches.load(Ordering::SeqCst) == 0 && m.active_workers() == 1
    });
    m.preempt_flag().raise();
    wait_for("the kernel to stop", || m.active_workers() == 0);
    assert_eq!(stats.launches.load(Ordering::SeqCst), 1);
    let latencies = m.take_preempt_latencies();
    assert_eq!(latencies.len(), 1, "one pre-emption measured");
    let hashed = m.hashes();
    assert!(hashed < 1 << 32, "the launch ended early ({hashed} nonces)");
    // Resumed, the same segment goes on (its blocks from their own counts), not a new unit.
    m.resume();
    wait_for("a second launch", || m.active_workers() == 1);
    m.preempt_flag().raise();
    wait_for("the kernel to stop", || m.active_workers() == 0);
    assert_eq!(stats.launches.load(Ordering::SeqCst), 2);
    assert_eq!(stats.units_done.load(Ordering::SeqCst), 0);
    assert!(m.hashes() >= hashed);
}

/// The stand-in launcher, held at the start of each launch until the test grants it: the
/// test then knows exactly which launches ran before it acted.
struct Stepped {
    inner: CpuGridLauncher,
    granted: Arc<AtomicU64>,
    started: Arc<AtomicU64>,
}

impl ScanLauncher for Stepped {
    fn name(&self) -> &'static str {
        "stepped"
    }
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn capacity(&self) -> u32 {
        self.inner.capacity()
    }
    fn stop_word(&self) -> Arc<dyn HostWord> {
        self.inner.stop_word()
    }
    fn launch(&mut self, launch: &Launch<'_>) -> Result<(), LaunchError> {
        let n = self.started.fetch_add(1, Ordering::SeqCst);
        while self.granted.load(Ordering::SeqCst) <= n {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inner.launch(launch)
    }
    fn poll(&mut self) -> Result<bool, LaunchError> {
        self.inner.poll()
    }
    fn finish(&mut self) -> Result<LaunchResult, LaunchError> {
        self.inner.finish()
    }
}

/// A pool re-sends its job after `set_difficulty`, and resumes the session with it after a
/// reconnect: the GPU miner keeps the unit in hand and its sweep, so no nonce of it is hashed
/// twice. (Restarted, the launches before the re-send
/// would be hashed again, and their nonces reported twice.)
#[test]
fn the_same_job_sent_again_keeps_the_gpu_miners_place() {
    const SPACE: u64 = 1 << 13; // four launches of 64 waves of the 32-thread grid
    let (granted, started) = (Arc::new(AtomicU64::new(2)), Arc::new(AtomicU64::new(0)));
    let launcher = Stepped {
        inner: CpuGridLauncher::new(GRID, 4096).unwrap(),
        granted: granted.clone(),
        started: started.clone(),
    };
    let (tx, mut rx) = idlerig::mining::share_channel(1 << 20);
    let cfg = GpuMinerConfig {
        waves_per_launch: 64,
        check_every: 1,
        nonce_space: SPACE,
    };
    let m = GpuMiner::start(Box::new(launcher), cfg, PreemptFlag::default(), tx);
    let stats = m.stats();
    // Every hash meets both targets: each nonce hashed is reported.
    let easy = U256::MAX;
    let mut almost = U256::MAX;
    almost.0[0] -= 1;
    m.set_work(WorkSource::new(job(3), vec![9; 4], 2, easy, 0));
    m.resume();
    // Two launches ran; the third waits, prepared under the old target.
    wait_for("the third launch", || started.load(Ordering::SeqCst) == 3);
    assert_eq!(stats.launches.load(Ordering::SeqCst), 2);
    m.set_work(WorkSource::new(job(3), vec![9; 4], 2, almost, 0));
    // And a reconnect that resumes the session: cleared, then the same job again.
    m.clear_work();
    m.set_work(WorkSource::new(job(3), vec![9; 4], 2, almost, 0));
    granted.store(u64::MAX, Ordering::SeqCst);
    wait_for("the first unit", || {
        stats.units_done.load(Ordering::SeqCst) >= 1
    });
    m.preempt_flag().raise();
    wait_for("the miner to stop", || m.active_workers() == 0);
    let mut first_unit: Vec<u32> = shares(&mut rx)
        .into_iter()
        .filter(|s| s.extranonce2 == [0, 0])
        .map(|s| s.nonce)
        .collect();
    let reported = first_unit.len();
    first_unit.sort_unstable();
    first_unit.dedup();
    assert_eq!(
        (reported, first_unit.len()),
        (SPACE as usize, SPACE as usize),
        "each nonce of the unit in hand is hashed once across the re-send"
    );
}
