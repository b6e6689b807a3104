//! The CPU miner on real headers: the scanners find real nonces, SHA-NI agrees with the
//! portable code, pre-emption loses and repeats no nonce, and every share found re-verifies.

use std::time::{Duration, Instant};

use idlerig::mining::cpu::scan;
use idlerig::mining::job::{hex_array, Job};
use idlerig::mining::sha256::{header_tail, midstate, scan_portable, sha256d, ScanJob};
use idlerig::mining::{
    target_for_difficulty, CpuMiner, CpuMinerConfig, Miner, PreemptFlag, ScanPath, WorkSource, U256,
};
use proptest::prelude::*;

fn genesis_job() -> (Job, [u8; 32]) {
    let mut merkle = hex_array::<32>(
        "m",
        "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b",
    )
    .unwrap();
    merkle.reverse();
    let job = Job {
        job_id: "genesis".into(),
        prevhash: [0; 32],
        coinb1: vec![],
        coinb2: vec![],
        merkle_branch: vec![],
        version: 1,
        nbits: 0x1d00ffff,
        ntime: 1231006505,
        clean_jobs: true,
    };
    (job, merkle)
}

const GENESIS_NONCE: u64 = 2083236893;

#[test]
fn both_scanners_find_the_genesis_nonce() {
    let (job, merkle) = genesis_job();
    let header = job.header(&merkle, job.ntime, 1, 0);
    let (mid, tail) = (midstate(&header), header_tail(&header));
    let (start, end) = (GENESIS_NONCE - 3000, GENESIS_NONCE + 3001);
    let portable = scan_portable(&mid, &ScanJob::whole(&tail, start, end, 0));
    assert_eq!(portable.candidates, vec![GENESIS_NONCE as u32]);
    assert_eq!(portable.next, end);
    let work = idlerig::mining::Work {
        generation: 1,
        job_id: "g".into(),
        extranonce1: vec![],
        extranonce2: vec![],
        ntime: job.ntime,
        version: 1,
        version_bits: None,
        midstate: mid,
        header,
        share_target: U256::DIFF1,
        network_target: U256::from_compact(job.nbits),
        siblings: vec![],
    };
    // Every SHA-256d path this CPU has (SHA-NI, AVX-512, AVX2, portable) finds it.
    for path in ScanPath::on_this_cpu() {
        let fast = scan(&work, start, end, path, &|_| false);
        assert_eq!(
            fast.candidates,
            vec![GENESIS_NONCE as u32],
            "{}",
            path.name()
        );
    }
    let share = work
        .check(GENESIS_NONCE as u32)
        .expect("the genesis nonce meets difficulty 1");
    assert!(share.is_block);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// On random headers at an easy target (1 in 256 nonces), every SHA-256d path reports the
    /// same candidates as the portable one, and each is a real hash below the target.
    #[test]
    fn every_sha_path_agrees_with_portable(header in proptest::collection::vec(any::<u8>(), 80), start in 0u64..(1u64 << 32) - 5000, len in 1u64..3000) {
        let header: [u8; 80] = header.try_into().unwrap();
        let (mid, tail) = (midstate(&header), header_tail(&header));
        let top = 0x00ff_ffff;
        let portable = scan_portable(&mid, &ScanJob::whole(&tail, start, start + len, top));
        for &n in &portable.candidates {
            let mut h = header;
            h[76..80].copy_from_slice(&n.to_le_bytes());
            let hash = sha256d(&h);
            prop_assert!(u32::from_le_bytes(hash[28..32].try_into().unwrap()) <= top);
        }
        let work = idlerig::mining::Work {
            generation: 1, job_id: "p".into(), extranonce1: vec![], extranonce2: vec![], ntime: 0, version: 0, version_bits: None,
            midstate: mid, header, share_target: U256([u64::MAX, u64::MAX, u64::MAX, (top as u64) << 32 | 0xffff_ffff]), network_target: U256::default(), siblings: vec![],
        };
        for path in ScanPath::on_this_cpu() {
            let fast = scan(&work, start, start + len, path, &|_| false);
            prop_assert_eq!(&fast.candidates, &portable.candidates, "{}", path.name());
            prop_assert_eq!(fast.next, start + len);
        }
    }
}

fn easy_source() -> WorkSource {
    source_at(vec![1, 2, 3, 4], 0.00005)
}

/// The genesis job under `extranonce1`, at `difficulty` (0.00005: a share per ~86,000 nonces).
fn source_at(extranonce1: Vec<u8>, difficulty: f64) -> WorkSource {
    let (job, _) = genesis_job();
    WorkSource::new(job, extranonce1, 4, target_for_difficulty(difficulty), 0)
}

/// Two workers mining [`easy_source`] and logging every range they hash.
fn recording_miner() -> (CpuMiner, PreemptFlag, idlerig::mining::ShareReceiver) {
    recording_miner_of(easy_source())
}

/// Two workers mining `source` and logging every range they hash.
fn recording_miner_of(
    source: WorkSource,
) -> (CpuMiner, PreemptFlag, idlerig::mining::ShareReceiver) {
    let flag = PreemptFlag::default();
    let (tx, rx) = idlerig::mining::share_channel(1 << 20);
    let miner = CpuMiner::start(
        CpuMinerConfig {
            threads: 2,
            record_ranges: true,
            path: None,
        },
        flag.clone(),
        tx,
    );
    miner.set_work(source);
    miner.resume();
    (miner, flag, rx)
}

fn wait_idle(miner: &CpuMiner) -> Duration {
    let t = Instant::now();
    while miner.active_workers() > 0 {
        assert!(
            // Miner threads run at SCHED_IDLE: under load they may wait long for a core
            // before they can acknowledge; this only checks that they do stop.
            t.elapsed() < Duration::from_secs(30),
            "the miner did not yield after pre-emption"
        );
        std::thread::yield_now();
    }
    t.elapsed()
}

/// With the miner stopped: the recorded ranges (of every generation) and the ranges handed
/// back cover exactly `[0, cursor)` of the first unit, with no gap and no overlap. Returns the
/// nonces hashed.
fn assert_each_nonce_hashed_once(miner: &CpuMiner) -> u64 {
    assert_each_nonce_hashed_once_under(miner, 1)
}

/// [`assert_each_nonce_hashed_once`] for units of `headers` headers (rolled versions), each
/// nonce hashed under every one.
fn assert_each_nonce_hashed_once_under(miner: &CpuMiner, headers: u64) -> u64 {
    let (cursor, returned) = miner.pending_ranges();
    let mut ranges: Vec<(u64, u64)> = miner
        .recorded_ranges()
        .into_iter()
        .map(|(_, a, b)| (a, b))
        .collect();
    let hashed: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    assert_eq!(
        hashed * headers,
        miner.hashes(),
        "every counted hash is in a recorded range"
    );
    ranges.extend(returned);
    ranges.sort();
    let mut expect = 0;
    for (a, b) in &ranges {
        assert_eq!(*a, expect, "gap or overlap at nonce {expect}: {ranges:?}");
        expect = *b;
    }
    assert_eq!(
        expect, cursor,
        "hashed + handed-back ranges cover exactly [0, cursor)"
    );
    hashed
}

/// Pre-empts `miner` at least 12 times and until it has counted `hashes`, each time
/// checking that it stops; leaves it stopped.
fn pre_empt_repeatedly(miner: &CpuMiner, flag: &PreemptFlag, hashes: u64) {
    // The idle-priority miner may get little CPU while other tests run, so the count, not
    // the time, decides when to stop.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut cycles = 0;
    while cycles < 12 || miner.hashes() < hashes {
        assert!(
            Instant::now() < deadline,
            "the miner counted only {} hashes in 2 minutes",
            miner.hashes()
        );
        cycles += 1;
        std::thread::sleep(Duration::from_millis(15));
        flag.raise();
        wait_idle(miner);
        let before = miner.hashes();
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(miner.hashes(), before, "no hashing while pre-empted");
        miner.resume();
    }
    flag.raise();
    wait_idle(miner);
}

#[test]
fn pre_emption_loses_and_repeats_no_nonce() {
    let (miner, flag, mut rx) = recording_miner();
    pre_empt_repeatedly(&miner, &flag, 3_000_000);
    let hashed = assert_each_nonce_hashed_once(&miner);
    assert!(hashed > 100_000, "the miner hashed ({hashed})");
    // Shares found along the way all re-verify at the share target.
    let shares: Vec<_> = std::iter::from_fn(|| rx.try_recv()).collect();
    assert!(
        !shares.is_empty(),
        "at difficulty 0.00005 a share comes every ~86,000 hashes; hashed {hashed}"
    );
    for s in shares {
        assert!(s.difficulty >= 0.00005, "{s:?}");
    }
}

/// With version rolling, each unit is eight versions of one header hashed together: across
/// pre-emptions every nonce is hashed once under each, and the shares the miner sent are
/// exactly those of the recorded ranges, version by version.
#[test]
fn pre_emption_loses_no_nonce_of_any_rolled_version() {
    let mut source = easy_source();
    source.version_mask = 0x1fff_e000;
    let unit = source
        .clone()
        .next_work_versions(1, idlerig::mining::SHARED_SCHEDULE_VERSIONS);
    assert_eq!(unit.headers(), 8);
    let (miner, flag, mut rx) = recording_miner_of(source);
    pre_empt_repeatedly(&miner, &flag, 8 * 1_000_000);
    let hashed = assert_each_nonce_hashed_once_under(&miner, 8);
    assert!(hashed > 10_000, "the miner hashed ({hashed})");
    let (tail, top) = (header_tail(&unit.header), unit.share_target.top_u32());
    let mut want = Vec::new();
    for (_, start, end) in miner.recorded_ranges() {
        for (which, mid) in unit.midstates().iter().enumerate() {
            let job = ScanJob::whole(&tail, start, end, top);
            let found = ScanPath::on_this_cpu()[0].scan(mid, &job);
            want.extend(
                found
                    .candidates
                    .into_iter()
                    .filter_map(|n| unit.check_header(which, n)),
            );
        }
    }
    let key = |s: &idlerig::mining::Share| (s.version_bits, s.nonce);
    let mut got: Vec<_> = std::iter::from_fn(|| rx.try_recv())
        .map(|s| key(&s))
        .collect();
    let mut want: Vec<_> = want.iter().map(key).collect();
    (got.sort_unstable(), want.sort_unstable());
    assert_eq!(got, want);
    assert!(
        got.iter().filter(|(bits, _)| *bits != Some(0)).count() > 0,
        "shares of rolled versions among {} found",
        got.len()
    );
}

#[test]
fn a_new_job_replaces_the_old_one_at_once() {
    let (miner, flag, _rx) = recording_miner();
    // Waits for state, not time: the idle-priority workers may get little CPU on a busy machine.
    let hashed_in = |generation: u64| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !miner.recorded_ranges().iter().any(|r| r.0 == generation) {
            assert!(
                Instant::now() < deadline,
                "generation {generation} was never mined"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    hashed_in(1);
    // Another extranonce1: another nonce space, so the miner must drop the old one.
    miner.set_work(source_at(vec![9, 9, 9, 9], 0.00005));
    hashed_in(2);
    flag.raise();
    wait_idle(&miner);
    let ranges = miner.recorded_ranges();
    let generations: std::collections::BTreeSet<u64> = ranges.iter().map(|r| r.0).collect();
    assert_eq!(
        generations.len(),
        2,
        "both jobs were mined: {generations:?}"
    );
    // Once the new job's first range is recorded, no range of the old one starts after it.
    let first_new = ranges.iter().position(|r| r.0 == 2).unwrap();
    let old_after = ranges[first_new..].iter().filter(|r| r.0 == 1).count();
    assert!(
        old_after <= 1,
        "the old job kept being mined after the new one started ({old_after} ranges)"
    );
}

/// A pool re-sends the job it is on after `set_difficulty` (with `clean_jobs=false`), or
/// resumes the session with it after a reconnect: the miner keeps its place instead of hashing
/// the job again from nonce 0, and what it finds from then on meets the new difficulty. The
/// same job at the same difficulty changes nothing.
#[test]
fn the_same_job_sent_again_keeps_the_miners_place() {
    let (miner, flag, mut rx) = recording_miner();
    let ranges_of = |generation: u64| {
        miner
            .recorded_ranges()
            .iter()
            .filter(|r| r.0 == generation)
            .count()
    };
    let wait_for_ranges = |generation: u64, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while ranges_of(generation) < n {
            assert!(
                Instant::now() < deadline,
                "generation {generation} was never mined"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for_ranges(1, 4);
    miner.set_work(easy_source());
    wait_for_ranges(1, 6);
    assert_eq!(
        ranges_of(2),
        0,
        "the same work at the same target is not restarted"
    );
    let harder = 0.0002;
    miner.set_work(source_at(vec![1, 2, 3, 4], harder));
    wait_for_ranges(2, 4);
    // A reconnect: the work is cleared, then the pool resumes the session with the same job.
    miner.clear_work();
    miner.set_work(source_at(vec![1, 2, 3, 4], harder));
    wait_for_ranges(4, 4);
    flag.raise();
    wait_idle(&miner);
    // Restarted from 0, the second pass would overlap the first.
    assert_each_nonce_hashed_once(&miner);
    let shares: Vec<_> = std::iter::from_fn(|| rx.try_recv()).collect();
    for s in shares.iter().filter(|s| s.generation >= 2) {
        assert!(
            s.difficulty >= harder,
            "a share below the new difficulty: {s:?}"
        );
    }
}
