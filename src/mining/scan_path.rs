//! Which CPU code hashes nonces: SHA-NI (two nonces interleaved), AVX-512 (16 lanes), AVX2
//! (8 lanes) or portable. Which is fastest depends on the CPU (an EPYC's SHA-NI beats its
//! AVX2; a Xeon's AVX-512 beats its SHA-NI), so a short measurement at start-up, once per
//! process, runs each path this CPU has on the same job and picks the fastest. The choice is
//! logged and shown in `/v1/status`; `--cpu-sha-path` overrides it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::lanes::Prepared;
use super::sha256::{scan_portable, ScanJob, ScanOutcome, VersionsOutcome};

/// Rolled versions of one header that the vector paths hash together, with one message
/// schedule of the first hash for all of them (measured on the Xeon, one thread, AVX-512:
/// 1 → 27.0, 2 → 29.1, 4 → 30.3, 8 → 31.4 million headers a second).
pub const SHARED_SCHEDULE_VERSIONS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScanPath {
    /// SHA-NI, two nonces interleaved.
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
    /// nonce), and `next` is where every header stopped. AVX-512 and AVX2 hash
    /// [`SHARED_SCHEDULE_VERSIONS`] of them at once with one first-hash message schedule; the
    /// other paths, and other counts, take the headers in turn, `job.poll_every` nonces at a
    /// time.
    pub fn scan_versions(self, mids: &[[u32; 8]], job: &ScanJob<'_>) -> VersionsOutcome {
        if let [mid] = mids {
            let out = self.scan(mid, job);
            return VersionsOutcome {
                candidates: out.candidates.into_iter().map(|n| (0, n)).collect(),
                next: out.next,
            };
        }
        #[cfg(target_arch = "x86_64")]
        if let (Ok(mids), true) = (
            <&[[u32; 8]; SHARED_SCHEDULE_VERSIONS]>::try_from(mids),
            matches!(self, ScanPath::Avx512 | ScanPath::Avx2) && self.available(),
        ) {
            let ps = mids.map(|mid| Prepared::new(&mid, job.tail));
            // SAFETY: `available` found the path's instructions.
            return unsafe {
                match self {
                    ScanPath::Avx512 => super::lanes_x86::scan_avx512_versions(&ps, mids, job),
                    _ => super::lanes_x86::scan_avx2_versions(&ps, mids, job),
                }
            };
        }
        let mut out = VersionsOutcome {
            candidates: Vec::new(),
            next: job.start,
        };
        let slice = job.poll_every.max(1);
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

    /// Nonces per second of this path on one thread, measured for about `budget`.
    pub fn measure(self, budget: Duration) -> f64 {
        // A real header's midstate and tail (any fixed values would do: the work is the same
        // for every header); a target nothing meets, so the count of candidates stays zero.
        let mid = super::sha256::IV;
        let tail = [0x2a3b_4c5d, 0x6470_25b5, 0x1705_ae3a];
        let started = Instant::now();
        let (mut n, mut step) = (0u64, 1u64 << 12);
        while started.elapsed() < budget {
            let out = self.scan(&mid, &ScanJob::whole(&tail, n, n + step, 0));
            std::hint::black_box(out);
            n += step;
            step = (step * 2).min(1 << 18);
        }
        n as f64 / started.elapsed().as_secs_f64()
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
            .map(|p| (p, p.measure(Duration::from_millis(25))))
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
