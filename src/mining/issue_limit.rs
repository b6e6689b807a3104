//! The machine's limit for the AVX-512 nonce scanner, measured rather than assumed, for
//! `bench mine`. The scanner is bound by how many vector instructions a core issues, not by
//! latency or memory, so its limit is the quotient of two measured figures:
//! - the vector instructions the algorithm issues per nonce, counted by running the generic
//!   scanner ([`super::lanes`]) over a lane type that counts what each operation costs on
//!   AVX-512 (work on job constants only is free: the compiler folds or hoists it);
//! - the 512-bit integer instructions a second this core issues, from a timed loop of
//!   independent `vpaddd`s (on Intel server cores they run on the same two ports, 0 and 5,
//!   as every instruction of the scanner; rotates and shifts are port 0 only, which the mix
//!   does not saturate).
//!
//! Their quotient is the most nonces a second any code with this instruction count can reach
//! on this core, whatever its scheduling; the bench prints the scanner's rate as a fraction of
//! it, and cpuminer-opt's rate beside it.

#![cfg(target_arch = "x86_64")]

use std::cell::Cell;
use std::time::{Duration, Instant};

use super::lanes::{hash_h7, hash_h7_versions, Lanes, Prepared};
use super::scan_path::SHARED_SCHEDULE_VERSIONS;
use super::sha256::{big_sigma0, big_sigma1, small_sigma0, small_sigma1};

/// The two figures, their quotient, and the AVX-512 scanner's rate measured beside it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct IssueLimit {
    /// AVX-512 instructions per nonce (per 16-nonce vector, divided by 16).
    pub vector_ops_per_nonce: f64,
    /// 512-bit integer instructions a second on one thread, measured (median of slices).
    pub vector_ops_per_s: f64,
    /// Their quotient: the most nonces a second on one thread at this instruction count.
    pub limit_hs: f64,
    /// The AVX-512 scanner on one thread (median of the slices between the loop's).
    pub scanner_hs: f64,
    /// The scanner's rate over the limit: the median over pairs of adjacent slices.
    pub of_limit: f64,
}

/// Slices of each measurement, alternated.
const SLICES: usize = 9;

/// Measures both figures and the scanner, for about `budget` in all; `None` where the CPU
/// lacks AVX-512. The timed loop and the scanner run in alternating slices, and the
/// fraction is taken pair by pair: a VM's speed can change by half within seconds, and a
/// limit and a rate measured at different moments would not be comparable.
pub fn avx512(budget: Duration) -> Option<IssueLimit> {
    if !super::lanes_x86::avx512_available() {
        return None;
    }
    let per_nonce = ops_per_vector() as f64 / 16.0;
    let slice = budget / (2 * SLICES as u32);
    let (mut ops, mut scans, mut fractions) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SLICES {
        // SAFETY: AVX-512 F was detected above.
        let o = unsafe { zmm_adds_per_second(slice) };
        let h = super::ScanPath::Avx512.measure(slice, 1);
        fractions.push(h * per_nonce / o);
        (ops.push(o), scans.push(h));
    }
    let ops_per_s = median(&mut ops);
    Some(IssueLimit {
        vector_ops_per_nonce: per_nonce,
        vector_ops_per_s: ops_per_s,
        limit_hs: ops_per_s / per_nonce,
        scanner_hs: median(&mut scans),
        of_limit: median(&mut fractions),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

thread_local! {
    static OPS: Cell<u64> = const { Cell::new(0) };
}

/// A lane that computes like the portable one and counts the AVX-512 instructions of each
/// operation ([`super::lanes_x86::Avx512`]'s code), unless every input is a job constant.
#[derive(Clone, Copy)]
pub(super) struct Counted {
    v: u32,
    /// Derived from job constants only (splats): folded or hoisted, so free in the loop.
    constant: bool,
}

impl Counted {
    #[cfg(test)]
    fn value(self) -> u32 {
        self.v
    }

    /// `f` of the inputs' values, costing `cost` instructions unless all are constants.
    fn op(inputs: &[Counted], cost: u64, v: u32) -> Counted {
        let constant = inputs.iter().all(|x| x.constant);
        if !constant {
            OPS.with(|n| n.set(n.get() + cost));
        }
        Counted { v, constant }
    }
}

impl Lanes for Counted {
    const N: usize = 1;
    unsafe fn splat(x: u32) -> Self {
        // A broadcast from memory folds into the instruction that reads it.
        Counted {
            v: x,
            constant: true,
        }
    }
    unsafe fn add(a: Self, b: Self) -> Self {
        Self::op(&[a, b], 1, a.v.wrapping_add(b.v))
    }
    unsafe fn ch(e: Self, f: Self, g: Self) -> Self {
        // One `vpternlogd`.
        Self::op(&[e, f, g], 1, (e.v & f.v) ^ (!e.v & g.v))
    }
    unsafe fn maj(a: Self, b: Self, c: Self) -> Self {
        Self::op(&[a, b, c], 1, (a.v & b.v) ^ (a.v & c.v) ^ (b.v & c.v))
    }
    unsafe fn big_sigma0(a: Self) -> Self {
        // Three `vprord`, one `vpternlogd`.
        Self::op(&[a], 4, big_sigma0(a.v))
    }
    unsafe fn big_sigma1(e: Self) -> Self {
        Self::op(&[e], 4, big_sigma1(e.v))
    }
    unsafe fn small_sigma0(w: Self) -> Self {
        // Two `vprord`, a `vpsrld`, a `vpternlogd`.
        Self::op(&[w], 4, small_sigma0(w.v))
    }
    unsafe fn small_sigma1(w: Self) -> Self {
        Self::op(&[w], 4, small_sigma1(w.v))
    }
    unsafe fn nonce_words(base: u32) -> Self {
        // `vpaddd` of the lane offsets, `vpshufb` for the byte order.
        OPS.with(|n| n.set(n.get() + 2));
        Counted {
            v: base.swap_bytes(),
            constant: false,
        }
    }
    unsafe fn le_mask_swapped(x: Self, top: u32) -> u32 {
        // `vpshufb` and `vpcmpud`.
        OPS.with(|n| n.set(n.get() + 2));
        u32::from(x.v.swap_bytes() <= top)
    }
    #[cfg(test)]
    unsafe fn to_vec(x: Self) -> Vec<u32> {
        vec![x.v]
    }
}

/// AVX-512 instructions the scanner issues per 16-nonce vector: one pass of the generic
/// code over [`Counted`] lanes, with the target test.
pub(super) fn ops_per_vector() -> u64 {
    let tail = [0x2a3b_4c5d, 0x6470_25b5, 0x1705_ae3a];
    let p = Prepared::new(&super::sha256::IV, &tail);
    OPS.with(|n| n.set(0));
    // SAFETY: `Counted` uses no instructions the CPU might lack.
    unsafe {
        let h7 = hash_h7::<Counted>(&p, 0);
        std::hint::black_box(Counted::le_mask_swapped(h7, 0));
    }
    OPS.with(|n| n.get())
}

/// AVX-512 instructions per header when [`SHARED_SCHEDULE_VERSIONS`] rolled versions share
/// the first hash's message schedule (per 16-nonce vector and header, divided by 16).
pub fn ops_per_header_rolled() -> f64 {
    const V: usize = SHARED_SCHEDULE_VERSIONS;
    let tail = [0x2a3b_4c5d, 0x6470_25b5, 0x1705_ae3a];
    let ps: [Prepared; V] = std::array::from_fn(|v| {
        let mut mid = super::sha256::IV;
        mid[0] ^= v as u32;
        Prepared::new(&mid, &tail)
    });
    OPS.with(|n| n.set(0));
    // SAFETY: `Counted` uses no instructions the CPU might lack.
    unsafe {
        for h7 in hash_h7_versions::<Counted, V>(&ps, 0) {
            std::hint::black_box(Counted::le_mask_swapped(h7, 0));
        }
    }
    OPS.with(|n| n.get()) as f64 / (16 * V) as f64
}

/// 512-bit adds a second on this thread, for about `budget`: sixteen a loop turn over eight
/// independent chains (latency 1, so two ports stay busy).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn zmm_adds_per_second(budget: Duration) -> f64 {
    const TURNS: u64 = 1 << 18;
    let started = Instant::now();
    let mut adds = 0u64;
    while started.elapsed() < budget || adds == 0 {
        std::arch::asm!(
            "2:",
            ".rept 2",
            "vpaddd zmm0, zmm0, zmm8",
            "vpaddd zmm1, zmm1, zmm8",
            "vpaddd zmm2, zmm2, zmm8",
            "vpaddd zmm3, zmm3, zmm8",
            "vpaddd zmm4, zmm4, zmm8",
            "vpaddd zmm5, zmm5, zmm8",
            "vpaddd zmm6, zmm6, zmm8",
            "vpaddd zmm7, zmm7, zmm8",
            ".endr",
            "dec {turns}",
            "jnz 2b",
            turns = inout(reg) TURNS => _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
            out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
            out("zmm8") _,
            options(nostack, nomem),
        );
        adds += 16 * TURNS;
    }
    adds as f64 / started.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mining::sha256::{hash_header_words, IV};

    /// The counted run is the scanner's algorithm: its H7 is the real double hash's, for
    /// several nonces of a job.
    #[test]
    fn counted_lanes_hash_like_the_reference() {
        let tail = [0x2a3b_4c5d, 0x6470_25b5, 0x1705_ae3a];
        let p = Prepared::new(&IV, &tail);
        for nonce in [0u32, 1, 0xdead_beef, u32::MAX] {
            // SAFETY: `Counted` uses no special instructions.
            let got = unsafe { hash_h7::<Counted>(&p, nonce) }.value();
            assert_eq!(
                got,
                hash_header_words(&IV, &tail, nonce)[7],
                "nonce {nonce:#x}"
            );
        }
    }

    /// Versions that share a schedule: each header's H7 is still its own double hash, and the
    /// count per header is lower than alone by the schedule's share, which is what is shared.
    #[test]
    fn rolled_versions_share_the_schedule_and_hash_like_the_reference() {
        let tail = [0x2a3b_4c5d, 0x6470_25b5, 0x1705_ae3a];
        let mids: [[u32; 8]; 3] = std::array::from_fn(|v| {
            let mut mid = IV;
            mid[3] = mid[3].wrapping_add(v as u32 * 0x9e37_79b9);
            mid
        });
        let ps = mids.map(|m| Prepared::new(&m, &tail));
        for nonce in [0u32, 7, 0xdead_beef] {
            // SAFETY: `Counted` uses no special instructions.
            let got = unsafe { hash_h7_versions::<Counted, 3>(&ps, nonce) };
            for (v, h7) in got.iter().enumerate() {
                assert_eq!(h7.value(), hash_header_words(&mids[v], &tail, nonce)[7]);
            }
        }
        let (alone, rolled) = (ops_per_vector() as f64 / 16.0, ops_per_header_rolled());
        // The schedule of 48 words (about 30 instructions a nonce) is shared by 8.
        assert!(
            rolled < alone - 20.0 && rolled > alone - 35.0,
            "{rolled} vs {alone}"
        );
    }

    /// The count leaves out the work hoisted per job: it is well under two whole
    /// compressions (64 rounds of 17 instructions and 48 message words of 11, twice), and
    /// above the rounds the second hash cannot skip.
    #[test]
    fn the_count_is_of_the_hoisted_algorithm() {
        let n = ops_per_vector();
        let whole = 2 * (64 * 17 + 48 * 11);
        assert!(n < whole - 200, "{n} of {whole}");
        assert!(n > 2 * 57 * 16, "{n}");
    }

    #[test]
    fn the_issue_rate_is_measured_where_avx512_runs() {
        match avx512(Duration::from_millis(20)) {
            Some(l) => {
                assert!(l.vector_ops_per_s > 0.0 && l.limit_hs > 0.0 && l.scanner_hs > 0.0);
                assert!(l.of_limit > 0.0);
                assert_eq!(l.vector_ops_per_nonce, ops_per_vector() as f64 / 16.0);
            }
            None => assert!(!super::super::lanes_x86::avx512_available()),
        }
    }
}
