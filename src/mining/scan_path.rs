//! Which CPU code hashes nonces: SHA-NI (two nonces interleaved, four chains with rolled
//! versions), AVX-512 (16 lanes), AVX2 (8 lanes) or portable. Which is fastest depends on the CPU (an EPYC's SHA-NI beats its
//! AVX2; a Xeon's AVX-512 beats its SHA-NI), so a short measurement at start-up, once per
//! process, runs each path this CPU has on the same job and picks the fastest. It measures
//! units of rolled versions, which the miner gets from pools that grant version rolling (most,
//! and ours); from a pool that grants none, a path that only just won could be the slower.
//! The choice is logged and shown in `/v1/status`; `--cpu-sha-path` overrides it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::lanes::Prepared;
use super::sha256::{scan_portable, ScanJob, ScanOutcome, VersionsOutcome};

/// Rolled versions of one header that the SIMD and SHA-NI paths hash together, with one
/// message schedule of the first hash for all of them (measured on the Xeon, one thread,
/// AVX-512: 1 → 27.0, 2 → 29.1, 4 → 30.3, 8 → 31.4 million headers a second; on a Zen 4
/// EPYC, SHA-NI: 28 → 35 with eight). Four and two are shared too (a pool may grant only
/// two bits, or one); other counts are taken in turn.
pub const SHARED_SCHEDULE_VERSIONS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScanPath {
    /// SHA-NI, two nonces interleaved (two headers × two with rolled versions).
    ShaNi,
    /// AVX-512, 16 nonces a vector.
    Avx512,
    /// AVX2, 8 nonces a vector.
    Avx2,
    /// Plain Rust, one nonce at a time.
    Portable,
}

impl ScanPath {
    pub const ALL: [ScanPath; 4] = [
        ScanPath::ShaNi,
        ScanPath::Avx512,
        ScanPath::Avx2,
        ScanPath::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ScanPath::ShaNi => "sha-ni",
            ScanPath::Avx512 => "avx512",
            ScanPath::Avx2 => "avx2",
            ScanPath::Portable => "portable",
        }
    }

    /// Whether this CPU runs the path.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            ScanPath::ShaNi => super::shani::available(),
            ScanPath::Avx512 => super::lanes_x86::avx512_available(),
            ScanPath::Avx2 => super::lanes_x86::avx2_available(),
            ScanPath::Portable => true,
        };
        #[cfg(not(target_arch = "x86_64"))]
        return self == ScanPath::Portable;
    }

    /// The paths this CPU runs, fastest-first by design (not by measurement).
    pub fn on_this_cpu() -> Vec<ScanPath> {
        Self::ALL.into_iter().filter(|p| p.available()).collect()
    }

    /// Runs `job` on the header with midstate `mid`. A path this CPU lacks falls back to the
    /// portable code, so a wrong choice is slow, never unsound.
    pub fn scan(self, mid: &[u32; 8], job: &ScanJob<'_>) -> ScanOutcome {
        if !self.available() {
            return scan_portable(mid, job);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: each path runs only where `available` found its instructions.
        unsafe {
            match self {
                ScanPath::ShaNi => return super::shani::scan(mid, job),
                ScanPath::Avx512 => {
                    return super::lanes_x86::scan_avx512(&Prepared::new(mid, job.tail), job)
                }
                ScanPath::Avx2 => {
                    return super::lanes_x86::scan_avx2(&Prepared::new(mid, job.tail), job)
                }
                ScanPath::Portable => {}
            }
        }
        scan_portable(mid, job)
    }

    /// Runs `job` on each header with a midstate in `mids` (one tail: versions of one header
    /// rolled under BIP 310), all over the same nonces: candidates are (index into `mids`,
    /// nonce), and `next` is where every header stopped. For [`SHARED_SCHEDULE_VERSIONS`],
    /// four or two headers, AVX-512, AVX2 and SHA-NI hash them at once with one first-hash message
    /// schedule a nonce; the portable path, and other counts, take the headers in turn,
    /// `job.poll_every` nonces at a time.
    pub fn scan_versions(self, mids: &[[u32; 8]], job: &ScanJob<'_>) -> VersionsOutcome {
        if let [mid] = mids {
            let out = self.scan(mid, job);
            return VersionsOutcome {
                candidates: out.candidates.into_iter().map(|n| (0, n)).collect(),
                next: out.next,
            };
        }
        #[cfg(target_arch = "x86_64")]
        if self != ScanPath::Portable && self.available() {
            if let Ok(mids) = <&[[u32; 8]; SHARED_SCHEDULE_VERSIONS]>::try_from(mids) {
                return self.scan_together(mids, job);
            }
            // A pool that grants only two bits of version: four headers; one bit: two.
            if let Ok(mids) = <&[[u32; 8]; 4]>::try_from(mids) {
                return self.scan_together(mids, job);
            }
            if let Ok(mids) = <&[[u32; 8]; 2]>::try_from(mids) {
                return self.scan_together(mids, job);
            }
        }
        let mut out = VersionsOutcome {
            candidates: Vec::new(),
            next: job.start,
        };
        // Whole vectors a slice, so that no slice leaves a tail to the portable code.
        let slice = job.poll_every.max(1).div_ceil(16).saturating_mul(16);
        while out.next < job.end {
            if out.next > job.start && (job.stop)(out.next) {
                break;
            }
            let end = job.end.min(out.next.saturating_add(slice));
            for (v, mid) in mids.iter().enumerate() {
                let part = self.scan(
                    mid,
                    &ScanJob::whole(job.tail, out.next, end, job.target_top),
                );
                out.candidates
                    .extend(part.candidates.into_iter().map(|n| (v, n)));
            }
            out.next = end;
        }
        out
    }

    /// [`Self::scan_versions`] on the code of `self` for `V` headers at once, sharing the
    /// first hash's schedule. `self` must be AVX-512, AVX2 or SHA-NI, and available.
    #[cfg(target_arch = "x86_64")]
    fn scan_together<const V: usize>(
        self,
        mids: &[[u32; 8]; V],
        job: &ScanJob<'_>,
    ) -> VersionsOutcome {
        let prepared = || mids.map(|mid| Prepared::new(&mid, job.tail));
        // SAFETY: the caller checked that the path is available.
        unsafe {
            match self {
                ScanPath::ShaNi => super::shani::scan_versions(mids, job),
                ScanPath::Avx512 => super::lanes_x86::scan_avx512_versions(&prepared(), mids, job),
                _ => super::lanes_x86::scan_avx2_versions(&prepared(), mids, job),
            }
        }
    }

    /// Hashes per second of this path on one thread, measured for about `budget`, on units of
    /// `headers` rolled versions of one header (1: one header alone).
    pub fn measure(self, budget: Duration, headers: usize) -> f64 {
        // Any fixed midstates and tail would do (the work is the same for every header); a
        // target nothing meets, so the count of candidates stays zero.
        let mids: Vec<[u32; 8]> = (0..headers.max(1) as u32)
            .map(|v| {
                let mut mid = super::sha256::IV;
                mid[0] ^= v;
                mid
            })
            .collect();
        let tail = [0x2a3b_4c5d, 0x6470_25b5, 0x1705_ae3a];
        let started = Instant::now();
        let (mut n, mut step) = (0u64, 1u64 << 12);
        while started.elapsed() < budget {
            let job = ScanJob::whole(&tail, n, n + step, 0);
            match mids.as_slice() {
                [mid] => drop(std::hint::black_box(self.scan(mid, &job))),
                _ => drop(std::hint::black_box(self.scan_versions(&mids, &job))),
            }
            n += step;
            step = (step * 2).min(1 << 18);
        }
        (n * mids.len() as u64) as f64 / started.elapsed().as_secs_f64()
    }
}

/// The start-up measurement: every path this CPU has, its rate, and the one picked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathChoice {
    pub path: ScanPath,
    /// Nonces per second on one thread, per path measured (million, rounded to 0.01).
    pub rates_mhs: Vec<(ScanPath, f64)>,
    /// "measured" or "--cpu-sha-path".
    pub chosen_by: &'static str,
}

/// The fastest path on this CPU, measured once per process (about 25 ms a path).
pub fn measured_choice() -> &'static PathChoice {
    static CHOICE: OnceLock<PathChoice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let rates: Vec<(ScanPath, f64)> = ScanPath::on_this_cpu()
            .into_iter()
            // Units of rolled versions, as the miner asks pools for: what the paths gain from
            // them differs (on a Zen 4 EPYC AVX-512 gains 8%, SHA-NI 25%).
            .map(|p| (p, p.measure(Duration::from_millis(25), SHARED_SCHEDULE_VERSIONS)))
            .collect();
        let path = rates
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(ScanPath::Portable, |r| r.0);
        let choice = PathChoice {
            path,
            rates_mhs: rates
                .into_iter()
                .map(|(p, r)| (p, (r / 1e4).round() / 100.0))
                .collect(),
            chosen_by: "measured",
        };
        tracing::info!(
            path = path.name(),
            rates_mhs = ?choice.rates_mhs.iter().map(|(p, r)| format!("{}={r}", p.name())).collect::<Vec<_>>(),
            "CPU SHA-256d path picked by a start-up measurement"
        );
        choice
    })
}

/// The path to mine with: `forced` where given (and available), else the measured fastest.
pub fn choose(forced: Option<ScanPath>) -> PathChoice {
    match forced {
        Some(p) if p.available() => PathChoice {
            path: p,
            rates_mhs: Vec::new(),
            chosen_by: "--cpu-sha-path",
        },
        Some(p) => {
            tracing::warn!(
                path = p.name(),
                "this CPU lacks the instructions of --cpu-sha-path; measuring the others"
            );
            measured_choice().clone()
        }
        None => measured_choice().clone(),
    }
}

#[cfg(test)]
mod tests;
