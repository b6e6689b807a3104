//! `idlerig bench mine`: the miner's hashrate on a real mainnet job (ESP-Miner's "nonce diff
//! checking 2" block template), beside references measured in the same run: the `sha2`
//! crate's compression function with the same midstate trick, on one thread, and, with
//! `--compare-cpuminer PATH`, an operator-provided cpuminer-opt in its benchmark mode on the
//! same number of threads. Each SHA-256d path this CPU has is also measured alone on one
//! thread, so the start-up pick can be checked against a longer measurement.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::BenchMineArgs;
use crate::mining::job::Job;
use crate::mining::sha256::IV;
use crate::mining::{
    target_for_difficulty, CpuMiner, CpuMinerConfig, KernelChoice, Miner, PreemptFlag, ScanPath,
    WorkSource,
};
use crate::stratum::session::VERSION_ROLLING_MASK as ROLLING_MASK;

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

/// Mines `source` on `threads` CPU threads with `path` (`None`: the start-up pick) for
/// `seconds` (after a short warm-up) and returns the hashes counted and the seconds measured.
fn measure(
    threads: usize,
    seconds: f64,
    source: WorkSource,
    path: Option<ScanPath>,
) -> (u64, f64, KernelChoice) {
    let (tx, _rx) = crate::mining::share_channel(crate::mining::SHARE_CHANNEL_CAPACITY);
    let flag = PreemptFlag::default();
    let miner = CpuMiner::start(
        CpuMinerConfig {
            threads,
            record_ranges: false,
            path,
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
    (h1 - h0, secs, miner.kernel())
}

/// The CPU miner's hashrate alone on `threads` threads: the yardstick of `bench preempt`.
/// With version rolling, as the server under that bench mines (its client asks the embedded
/// pool for it, and gets it), so that both count the same work.
pub fn cpu_hashrate(threads: usize, seconds: f64) -> f64 {
    let source = WorkSource::new(
        mainnet_job(),
        vec![0, 0, 0, 1],
        4,
        target_for_difficulty(1.0),
        ROLLING_MASK,
    );
    let (hashes, secs, _) = measure(threads, seconds, source, None);
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
    // Every path alone on one thread, then the miner on all threads with the path it picks.
    let per_path: serde_json::Map<String, serde_json::Value> = ScanPath::on_this_cpu()
        .into_iter()
        .map(|p| {
            let (h, s, _) = measure(1, (args.seconds / 4.0).max(0.5), source.clone(), Some(p));
            (p.name().to_string(), json!((h as f64 / s).round()))
        })
        .collect();
    let (hashes, secs, kernel) = measure(threads, args.seconds, source, args.cpu_sha_path);
    let rate = hashes as f64 / secs;
    let per_thread = rate / threads as f64;
    let mhz = cpu_mhz();
    let mut out = json!({
        "bench": "mine",
        "backend": "cpu",
        "cpu": cpu_model(),
        "kernel": kernel,
        "threads": threads,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "hashes": hashes,
        "hashrate_hs": rate.round(),
        "hashrate_per_thread_hs": per_thread.round(),
        "path_1thread_hs": per_path,
        "ref_sha2_crate_1thread_hs": reference.round(),
        "per_thread_vs_ref": round2(per_thread / reference),
        // The machine's limit in the terms of the issue: SHA-256 rounds per cycle, at the
        // clock /proc/cpuinfo reports (a VM's nominal clock; turbo makes the true figure lower).
        "cpu_mhz": mhz,
        "rounds_per_cycle_per_thread": mhz.map(|m| round2(per_thread * 128.0 / (m * 1e6))),
    });
    // The AVX-512 scanner's limit on this core: instructions per nonce against instructions
    // a second (see `mining::issue_limit`), the scanner measured in slices between the
    // loop's.
    #[cfg(target_arch = "x86_64")]
    let limit = crate::mining::issue_limit::avx512(std::time::Duration::from_millis(900));
    #[cfg(not(target_arch = "x86_64"))]
    let limit: Option<()> = None;
    #[cfg(target_arch = "x86_64")]
    if let Some(l) = &limit {
        out["avx512_issue_limit"] = json!({
            "vector_ops_per_nonce": round2(l.vector_ops_per_nonce),
            "zmm_ops_per_s_1thread": l.vector_ops_per_s.round(),
            "limit_1thread_hs": l.limit_hs.round(),
            "avx512_1thread_hs": l.scanner_hs.round(),
            "avx512_1thread_of_limit": round2(l.of_limit),
        });
    }
    if let Some(cpuminer) = &args.compare_cpuminer {
        let theirs = cpuminer_rate(cpuminer, threads, args.seconds)?;
        out["ref_cpuminer_hs"] = json!(theirs.round());
        out["ref_cpuminer"] = json!(format!(
            "{} -a sha256d --benchmark -t {threads}",
            cpuminer.display()
        ));
        out["vs_cpuminer"] = json!(round2(rate / theirs));
        // How far the limit itself is from cpuminer-opt's rate: code at 100% of it would be
        // this many times as fast (the ceiling of `vs_cpuminer` at our instruction count).
        #[cfg(target_arch = "x86_64")]
        if let Some(l) = &limit {
            let theirs_per_thread = theirs / threads as f64;
            out["avx512_issue_limit"]["limit_vs_cpuminer_per_thread"] =
                json!(round2(l.limit_hs / theirs_per_thread));
        }
    }
    // The same with version rolling, at the mask our client asks pools for (BIP 310's
    // suggestion, and what ours grants): each unit is
    // several versions of one header, sharing the first hash's message schedule.
    let rolling = WorkSource::new(
        mainnet_job(),
        vec![0, 0, 0, 1],
        4,
        target_for_difficulty(1.0),
        ROLLING_MASK,
    );
    let (hashes, secs, _) = measure(threads, args.seconds, rolling, args.cpu_sha_path);
    let rolled = hashes as f64 / secs;
    out["version_rolling"] = json!({
        "mask": format!("{ROLLING_MASK:08x}"),
        "headers_per_unit": crate::mining::SHARED_SCHEDULE_VERSIONS,
        "hashrate_hs": rolled.round(),
        "hashrate_per_thread_hs": (rolled / threads as f64).round(),
        "vs_without": round2(rolled / rate),
    });
    #[cfg(target_arch = "x86_64")]
    if let Some(l) = &limit {
        let per_header = crate::mining::issue_limit::ops_per_header_rolled();
        out["version_rolling"]["vector_ops_per_header"] = json!(round2(per_header));
        out["version_rolling"]["limit_1thread_hs"] =
            json!((l.vector_ops_per_s / per_header).round());
    }
    if let Some(theirs) = out["ref_cpuminer_hs"].as_f64() {
        out["version_rolling"]["vs_cpuminer"] = json!(round2(rolled / theirs));
    }
    let _ = &limit;
    Ok(out)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn cpuinfo_field(name: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn cpu_model() -> Option<String> {
    cpuinfo_field("model name")
}

fn cpu_mhz() -> Option<f64> {
    cpuinfo_field("cpu MHz")?.parse().ok()
}

/// cpuminer-opt's own figure for SHA-256d on `threads` threads, from its benchmark mode (no
/// pool) run for twice `seconds` plus its 5-second warm-up report (see [`parse_cpuminer_rate`]).
fn cpuminer_rate(binary: &std::path::Path, threads: usize, seconds: f64) -> Result<f64, String> {
    use std::process::{Command, Stdio};
    let limit = (2.0 * seconds).ceil() as u64 + 6;
    // cpuminer-opt logs to stderr; both streams go to one file so its lines stay in order.
    let log_path = std::env::temp_dir().join(format!(
        "idlerig-cpuminer-{}-{}.log",
        std::process::id(),
        crate::batch::random_id("log")
    ));
    let opened = std::fs::File::create(&log_path).and_then(|f| Ok((f.try_clone()?, f)));
    let (out, err) = opened.map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = Command::new(binary)
        .args(["-a", "sha256d", "--benchmark", "-t"])
        .arg(threads.to_string())
        .arg(format!("--time-limit={limit}"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("running {}: {e}", binary.display()))?;
    // Its own time limit ends it; one that ignores the flag is stopped 30 s later.
    let deadline = Instant::now() + Duration::from_secs(limit + 30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&log_path);
                return Err(format!(
                    "{} did not exit after --time-limit={limit}",
                    binary.display()
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", binary.display())),
        }
    };
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let tail = || text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
    if !status.success() {
        return Err(format!(
            "{} failed ({status}); last lines: {}",
            binary.display(),
            tail()
        ));
    }
    parse_cpuminer_rate(&text).ok_or_else(|| {
        format!(
            "{} printed no hashrate; last lines: {}",
            binary.display(),
            tail()
        )
    })
}

/// The hashrate in a cpuminer-opt benchmark log: the median of its periodic "Total:" lines
/// but the first (which covers its start-up), else its closing "Benchmark:" figure.
pub fn parse_cpuminer_rate(log: &str) -> Option<f64> {
    let clean = strip_ansi(log);
    let figure = |line: &str, key: &str| {
        let rest = &line[line.find(key)? + key.len()..];
        let mut words = rest.split_whitespace();
        let value: f64 = words.next()?.trim_end_matches(',').parse().ok()?;
        let unit = words.next()?.trim_end_matches(',');
        let scale = match unit.trim_end_matches("H/s").trim_end_matches("h/s") {
            "" => 1.0,
            "k" | "K" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            _ => return None,
        };
        Some(value * scale)
    };
    let mut totals: Vec<f64> = clean
        .lines()
        .filter_map(|l| figure(l, "Total:"))
        .skip(1)
        .collect();
    if !totals.is_empty() {
        totals.sort_by(f64::total_cmp);
        return Some(totals[totals.len() / 2]);
    }
    clean
        .lines()
        .rev()
        .find_map(|l| figure(l, "Benchmark:").or_else(|| figure(l, "Total:")))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_cpuminer_rate;

    /// Lines as cpuminer-opt 26.1 printed them here in benchmark mode (colours on): the first
    /// "Total:" covers its start-up and is left out; the median of the rest is the figure.
    #[test]
    fn cpuminer_opt_benchmark_output_is_read() {
        let log = "[2026-11-29 16:06:03] 1 of 2 miner threads started using 'sha256d' algorithm\n\
                   [2026-11-29 16:06:09] \u{1b}[01;37mTotal: 22.40 MH/s, Temp: 0C, Freq: 0.000/0.000 GHz\u{1b}[0m\n\
                   [2026-11-29 16:06:13] \u{1b}[01;37mTotal: 24.79 MH/s, Temp: 0C, Freq: 0.000/0.000 GHz\u{1b}[0m\n\
                   [2026-11-29 16:06:18] \u{1b}[01;37mTotal: 24.77 MH/s, Temp: 0C, Freq: 0.000/0.000 GHz\u{1b}[0m\n\
                   [2026-11-29 16:06:23] \u{1b}[01;37mTotal: 24.59 MH/s, Temp: 0C, Freq: 0.000/0.000 GHz\u{1b}[0m\n\
                   [2026-11-29 16:06:23] \u{1b}[01;37mBenchmark: 24.49 MH/s\u{1b}[0m\n";
        assert_eq!(parse_cpuminer_rate(log), Some(24.77e6));
        let short = "[..] Total: 812.5 kH/s, Temp: 40C\n[..] Benchmark: 815.1 kH/s\n";
        assert_eq!(parse_cpuminer_rate(short), Some(815.1e3));
        assert_eq!(
            parse_cpuminer_rate("[..] Stratum connection failed\n"),
            None
        );
    }
}
