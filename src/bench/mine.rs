//! `idlerig bench mine`: the miner's hashrate on a real mainnet job (ESP-Miner's "nonce diff
//! checking 2" block template), beside a reference measured in the same run: the `sha2`
//! crate's compression function with the same midstate trick, on one thread.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::BenchMineArgs;
use crate::mining::job::Job;
use crate::mining::sha256::IV;
use crate::mining::{
    target_for_difficulty, CpuMiner, CpuMinerConfig, Miner, PreemptFlag, WorkSource,
};

fn mainnet_job() -> Job {
    Job::from_notify(
        "bench",
        "0c859545a3498373a57452fac22eb7113df2a465000543520000000000000000",
        "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4b0389130cfabe6d6d5cbab26a2599e92916edec5657a94a0708ddb970f5c45b5d12905085617eff8e",
        "31650707758de07b010000000000001cfd7038212f736c7573682f000000000379ad0c2a000000001976a9147c154ed1dc59609e3d26abb2df2ea3d587cd8c4188ac00000000",
        &[],
        "20000004",
        "1705ae3a",
        "647025b5",
        true,
    )
    .expect("a well-formed job")
}

/// Hashes per second of a straightforward midstate miner on the `sha2` crate, one thread.
fn sha2_reference(seconds: f64, header: &[u8; 80]) -> f64 {
    use sha2::digest::generic_array::GenericArray;
    let mut mid = IV;
    sha2::compress256(&mut mid, &[*GenericArray::from_slice(&header[..64])]);
    let mut block2 = [0u8; 64];
    block2[..16].copy_from_slice(&header[64..80]);
    block2[16] = 0x80;
    block2[62..64].copy_from_slice(&640u16.to_be_bytes());
    let mut block3 = [0u8; 64];
    block3[32] = 0x80;
    block3[62..64].copy_from_slice(&256u16.to_be_bytes());
    let start = Instant::now();
    let mut nonce = 0u32;
    let mut sink = 0u32;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..4096 {
            block2[12..16].copy_from_slice(&nonce.to_le_bytes());
            let mut s1 = mid;
            sha2::compress256(&mut s1, &[*GenericArray::from_slice(&block2)]);
            for (i, w) in s1.iter().enumerate() {
                block3[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            let mut s2 = IV;
            sha2::compress256(&mut s2, &[*GenericArray::from_slice(&block3)]);
            sink ^= s2[7];
            nonce = nonce.wrapping_add(1);
        }
    }
    std::hint::black_box(sink);
    nonce as f64 / start.elapsed().as_secs_f64()
}

/// Mines `source` on `threads` CPU threads for `seconds` (after a short warm-up) and returns
/// the hashes counted and the seconds measured.
fn measure(threads: usize, seconds: f64, source: WorkSource) -> (u64, f64) {
    let (tx, _rx) = crate::mining::share_channel(crate::mining::SHARE_CHANNEL_CAPACITY);
    let flag = PreemptFlag::default();
    let miner = CpuMiner::start(
        CpuMinerConfig {
            threads,
            record_ranges: false,
        },
        flag.clone(),
        tx,
    );
    miner.set_work(source);
    miner.resume();
    std::thread::sleep(Duration::from_millis(200)); // threads spun up, caches warm
    let (h0, t0) = (miner.hashes(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (h1, secs) = (miner.hashes(), t0.elapsed().as_secs_f64());
    flag.raise();
    (h1 - h0, secs)
}

/// The CPU miner's hashrate alone on `threads` threads: the yardstick of `bench preempt`.
pub fn cpu_hashrate(threads: usize, seconds: f64) -> f64 {
    let source = WorkSource::new(
        mainnet_job(),
        vec![0, 0, 0, 1],
        4,
        target_for_difficulty(1.0),
        0,
    );
    let (hashes, secs) = measure(threads, seconds, source);
    hashes as f64 / secs
}

pub fn run(args: BenchMineArgs) -> Result<serde_json::Value, String> {
    if args.backend != "cpu" {
        return Err(format!(
            "backend `{}` is not available in this build; use `cpu`",
            args.backend
        ));
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let job = mainnet_job();
    // Difficulty 1: candidates are rare, so the figure is pure hashing.
    let source = WorkSource::new(job, vec![0, 0, 0, 1], 4, target_for_difficulty(1.0), 0);
    let header = source.clone().next_work(0).header;

    let reference = sha2_reference((args.seconds / 4.0).max(0.5), &header);
    let (hashes, secs) = measure(threads, args.seconds, source);
    let rate = hashes as f64 / secs;
    Ok(json!({
        "bench": "mine",
        "backend": "cpu",
        "sha_ni": crate::mining::sha_ni_available(),
        "threads": threads,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "hashes": hashes,
        "hashrate_hs": rate.round(),
        "hashrate_per_thread_hs": (rate / threads as f64).round(),
        "ref_sha2_crate_1thread_hs": reference.round(),
        "per_thread_vs_ref": ((rate / threads as f64) / reference * 100.0).round() / 100.0,
    }))
}
