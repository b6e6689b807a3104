//! gpu-check's kernel figures, on whatever launcher is at hand (CUDA, or the CPU stand-in):
//! the known nonces of two real blocks, agreement with the CPU scanner on random nonces, the
//! hashrate over full sweeps at several flag intervals, and pre-emption trials through the
//! real GPU miner with every nonce of the checked units accounted for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::mining::gpu::sweep::{Segment, Sweep};
use crate::mining::gpu::{GpuJob, GpuMiner, GpuMinerConfig, LaunchError, ScanLauncher};
use crate::mining::job::Job;
use crate::mining::sha256::{header_tail, midstate, sha256d};
use crate::mining::{Miner, PreemptFlag, WorkSource, U256};

/// How big each check is: full size on a GPU, small on the CPU stand-in.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Nonces either side of a known nonce.
    pub around_known: u64,
    pub random_nonces: u64,
    /// Nonces per sweep of the hashrate figure, and sweeps per flag interval.
    pub sweep_nonces: u64,
    pub sweeps: u32,
    pub preempt_trials: usize,
    /// Nonce space per unit of work in the pre-emption trials, and units checked in full.
    pub preempt_unit: u64,
    pub preempt_units_checked: usize,
    pub waves_per_launch: u32,
}

impl Sizes {
    pub const GPU: Sizes = Sizes {
        around_known: 1 << 20,
        random_nonces: 1 << 24,
        sweep_nonces: 1 << 32,
        sweeps: 5,
        preempt_trials: 300,
        preempt_unit: 1 << 26,
        preempt_units_checked: 8,
        waves_per_launch: 256,
    };
    pub const STAND_IN: Sizes = Sizes {
        around_known: 1 << 10,
        random_nonces: 1 << 15,
        sweep_nonces: 1 << 16,
        sweeps: 2,
        preempt_trials: 30,
        preempt_unit: 1 << 12,
        preempt_units_checked: 4,
        waves_per_launch: 16,
    };
}

/// Scans `start..start + count` to the end, launch after launch; the candidates, each once.
fn scan_range(
    launcher: &mut dyn ScanLauncher,
    job: &GpuJob,
    start: u64,
    count: u64,
    every: u32,
) -> Result<Vec<u32>, LaunchError> {
    let mut seg = Segment::new(start, count, launcher.geometry());
    let mut found = Vec::new();
    while !seg.is_done() {
        launcher.launch(&seg.launch(job, every))?;
        let result = launcher.finish()?;
        let absorbed = seg
            .absorb(&result)
            .map_err(|e| LaunchError::Driver(e.to_string()))?;
        found.extend(absorbed.candidates);
    }
    Ok(found)
}

fn known_header(name: &str) -> ([u8; 80], u32) {
    let (hex, nonce) = match name {
        "genesis" => (
            concat!(
                "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd",
                "7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4a29ab5f49ffff001d1dac2b7c"
            ),
            2_083_236_893,
        ),
        _ => (
            concat!(
                "0100000081cd02ab7e569e8bcd9317e2fe99f2de44d49ab2b8851ba4a308000000000000e320b6c2",
                "fffc8d750423db8b1eb942ae710e951ed797f7affc8892b0f1fc122bc7f5d74df2b9441a42a14695"
            ),
            2_504_433_986,
        ),
    };
    let bytes = hex::decode(hex).expect("a constant header");
    (bytes.try_into().expect("80 bytes"), nonce)
}

/// The known nonce of a real block, found at target 0 (top 32 bits of the hash zero) among
/// the nonces around it, and nothing that the full hash does not confirm.
pub fn known_block(launcher: &mut dyn ScanLauncher, name: &str, around: u64) -> Value {
    let (header, nonce) = known_header(name);
    let job = GpuJob::new(&midstate(&header), &header_tail(&header), 0);
    let start = u64::from(nonce).saturating_sub(around);
    let count = (2 * around + 1).min((1 << 32) - start);
    match scan_range(launcher, &job, start, count, 1) {
        Ok(found) => {
            let confirmed = found.iter().all(|&n| {
                let mut h = header;
                h[76..80].copy_from_slice(&n.to_le_bytes());
                sha256d(&h)[28..32] == [0; 4]
            });
            json!({"nonce": nonce, "scanned": count, "found": found,
                   "ok": found.contains(&nonce) && confirmed})
        }
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

/// The kernel's candidates equal the CPU scanner's over `count` nonces of a random header,
/// at a target that passes one nonce in 256.
pub fn random_agreement(launcher: &mut dyn ScanLauncher, count: u64) -> Value {
    let header: [u8; 80] = std::array::from_fn(|i| (i as u8).wrapping_mul(97).wrapping_add(13));
    let (mid, tail) = (midstate(&header), header_tail(&header));
    let target_hi = 0x00FF_FFFF;
    let job = GpuJob::new(&mid, &tail, target_hi);
    let start = 0x1234_5678u64;
    let gpu = match scan_range(launcher, &job, start, count, 1) {
        Ok(c) => c,
        Err(e) => return json!({"equal": false, "error": e.to_string()}),
    };
    let chunk = 1 << 16;
    let mut cpu: Vec<u32> = (0..count.div_ceil(chunk))
        .into_par_iter()
        .flat_map_iter(|i| {
            let a = start + i * chunk;
            let b = (a + chunk).min(start + count);
            let job = crate::mining::sha256::ScanJob::whole(&tail, a, b, target_hi);
            crate::mining::sha256::scan_portable(&mid, &job).candidates
        })
        .collect();
    cpu.sort_unstable();
    json!({"nonces": count, "candidates_gpu": gpu.len(), "candidates_cpu": cpu.len(),
           "equal": gpu == cpu})
}

/// Hashes per second over `sweeps` full sweeps of `sweep_nonces`, at flag interval `every`.
pub fn hashrate(launcher: &mut dyn ScanLauncher, sizes: &Sizes, every: u32) -> Value {
    let job = GpuJob::new(&[7; 8], &[1, 2, 3], 0);
    let t = Instant::now();
    let mut hashed = 0u64;
    for _ in 0..sizes.sweeps {
        let mut sweep = Sweep::new(
            sizes.sweep_nonces,
            sizes.waves_per_launch,
            launcher.geometry(),
        );
        while let Some(seg) = sweep.segment() {
            let step = launcher
                .launch(&seg.launch(&job, every))
                .and_then(|_| launcher.finish())
                .and_then(|r| {
                    seg.absorb(&r)
                        .map_err(|e| LaunchError::Driver(e.to_string()))
                });
            match step {
                Ok(a) => hashed += a.hashed,
                Err(e) => return json!({"every": every, "error": e.to_string()}),
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    json!({"every": every, "nonces": hashed, "seconds": secs, "ghs": hashed as f64 / secs / 1e9})
}

/// Pre-emption through the real GPU miner: `trials` times, mine for a random while, raise
/// the flag and wait for the kernel to be gone. Then every unit of work done in full is
/// compared nonce for nonce with the CPU: shares the CPU finds that the miner did not
/// (lost), and shares the miner reported more than once (duplicates).
pub fn preempt(launcher: Box<dyn ScanLauncher>, sizes: &Sizes) -> Value {
    // One nonce in 4096 is a share, so a unit's shares stand for its nonces.
    let target = U256::from_f64(U256::MAX.to_f64() / 4096.0);
    let job = Job {
        job_id: "gpu-check".into(),
        prevhash: [3; 32],
        coinb1: vec![1, 2, 3],
        coinb2: vec![4, 5],
        merkle_branch: vec![[6; 32]],
        version: 0x2000_0000,
        nbits: 0x1703_4219,
        ntime: 0x6650_0000,
        clean_jobs: true,
    };
    let source = WorkSource::new(job, vec![1, 2, 3, 4], 4, target, 0);
    // Room for every share of the units checked (one nonce in 4096, with margin): shares of
    // the first units come first, so the channel keeps all that the check compares.
    let expected = (sizes.preempt_units_checked as u64 + 2) * (sizes.preempt_unit / 4096);
    let (tx, mut rx) = crate::mining::share_channel((2 * expected) as usize);
    let flag = PreemptFlag::default();
    flag.raise();
    let cfg = GpuMinerConfig {
        waves_per_launch: sizes.waves_per_launch,
        check_every: 1,
        nonce_space: sizes.preempt_unit,
    };
    let miner = GpuMiner::start(launcher, cfg, flag, tx);
    let stats = miner.stats();
    miner.set_work(source.clone());
    let mut rng_state = 0x2545_F491_4F6C_DD1Du64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut trials = 0;
    while trials < sizes.preempt_trials && Instant::now() < deadline {
        miner.resume();
        let launches = stats.launches.load(Ordering::SeqCst);
        // Wait for a launch to be in flight, then a random 0–2 ms into it.
        while miner.active_workers() == 0 && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let spin = Instant::now() + Duration::from_micros(rng_state % 2000);
        while Instant::now() < spin && stats.launches.load(Ordering::SeqCst) == launches {
            std::hint::spin_loop();
        }
        miner.preempt_flag().raise();
        while miner.active_workers() > 0 && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        trials += 1;
    }
    // Finish enough whole units to check, without pre-emptions.
    miner.resume();
    let units = sizes.preempt_units_checked as u64;
    while stats.units_done.load(Ordering::SeqCst) < units && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    miner.preempt_flag().raise();
    while miner.active_workers() > 0 {
        std::thread::yield_now();
    }
    let latencies: Vec<f64> = miner
        .take_preempt_latencies()
        .into_iter()
        .map(|ns| ns as f64 / 1e3)
        .collect();
    let mut by_unit: BTreeMap<Vec<u8>, Vec<u32>> = BTreeMap::new();
    let shares_dropped = rx.dropped();
    for s in std::iter::from_fn(|| rx.try_recv()) {
        by_unit.entry(s.extranonce2).or_default().push(s.nonce);
    }
    let done = stats.units_done.load(Ordering::SeqCst).min(units);
    let (mut lost, mut duplicates, mut shares_checked) = (0usize, 0usize, 0usize);
    let mut reference = source;
    for generation in 0..done {
        let work = reference.next_work(generation);
        let want: BTreeSet<u32> = (0..sizes.preempt_unit.div_ceil(1 << 16))
            .into_par_iter()
            .flat_map_iter(|i| {
                let a = i << 16;
                let b = (a + (1 << 16)).min(sizes.preempt_unit);
                crate::mining::cpu::scan(
                    &work,
                    a,
                    b,
                    crate::mining::ScanPath::on_this_cpu()[0],
                    &|_| false,
                )
                .candidates
            })
            .filter(|&n| work.check(n).is_some())
            .collect();
        let got = by_unit.remove(&work.extranonce2).unwrap_or_default();
        let distinct: BTreeSet<u32> = got.iter().copied().collect();
        duplicates += got.len() - distinct.len();
        lost += want.difference(&distinct).count();
        shares_checked += want.len();
    }
    let q = |p| crate::stats::quantile(&latencies, p);
    json!({
        "trials": trials,
        "measured": latencies.len(),
        "p50_us": q(0.5), "p99_us": q(0.99),
        "max_us": latencies.iter().copied().fold(0.0, f64::max),
        "units_checked": done, "shares_checked": shares_checked, "shares_dropped": shares_dropped,
        "lost": lost, "duplicates": duplicates,
        "overflows": stats.overflows.load(Ordering::SeqCst),
        "launch_errors": stats.launch_errors.load(Ordering::SeqCst),
    })
}
