//! Every SHA-256d path this CPU has against the portable scanner: the final word of each
//! lane's hash, and the candidates of ranges with odd starts, ends and lengths (tails shorter
//! than a vector), at an easy target so that candidates are many. On a CPU without AVX-512
//! (the EPYC machines) the AVX-512 path is skipped and says so; the generic lane code is still
//! checked there through its one-lane portable form.

use super::super::lanes::{hash_h7, Lanes, Portable, Prepared};
use super::super::sha256::{hash_header_words, header_tail, midstate, scan_portable, ScanJob};
use super::*;

/// A mainnet header (block 125552) with its nonce field zeroed: the nonce is what we vary.
fn header() -> [u8; 80] {
    let mut h: [u8; 80] = hex::decode(concat!(
        "01000000",
        "81cd02ab7e569e8bcd9317e2fe99f2de44d49ab2b8851ba4a308000000000000",
        "e320b6c2fffc8d750423db8b1eb942ae710e951ed797f7affc8892b0f1fc122b",
        "c7f5d74d",
        "f2b9441a",
        "42a14695"
    ))
    .unwrap()
    .try_into()
    .unwrap();
    h[76..].fill(0);
    h
}

/// `H7` of `base..base + n` from each vector path this CPU has, by name.
fn lane_h7s(p: &Prepared, base: u32) -> Vec<(&'static str, Vec<u32>)> {
    // SAFETY (all three): each runs only where its instructions were detected.
    let mut out = vec![("lanes-portable", unsafe {
        vec![Portable::to_vec(hash_h7::<Portable>(p, base))[0]]
    })];
    #[cfg(target_arch = "x86_64")]
    {
        use super::super::lanes_x86::{avx2_available, avx512_available, probe};
        if avx2_available() {
            out.push(("avx2", unsafe { probe::h7_avx2(p, base) }));
        }
        if avx512_available() {
            out.push(("avx512", unsafe { probe::h7_avx512(p, base) }));
        } else {
            eprintln!("this CPU has no AVX-512: the 16-lane path was not checked here");
        }
    }
    out
}

#[test]
fn every_lane_path_computes_the_same_final_word_as_the_portable_hash() {
    let h = header();
    let (mid, tail) = (midstate(&h), header_tail(&h));
    let p = Prepared::new(&mid, &tail);
    // The block's own nonce, zero, and bases whose lanes wrap past 2^32.
    for base in [0x9546_a142u32, 0, 1, 0xffff_fff8, 0xffff_fff0, 0x1234_5677] {
        for (name, h7s) in lane_h7s(&p, base) {
            for (i, h7) in h7s.iter().enumerate() {
                let nonce = base.wrapping_add(i as u32);
                let want = hash_header_words(&mid, &tail, nonce)[7];
                assert_eq!(*h7, want, "{name}, nonce {nonce:#x}");
            }
        }
    }
}

#[test]
fn the_block_nonce_hashes_below_its_target_on_every_path() {
    // Block 125552's nonce, 0x9546a142 as the header stores it little-endian.
    let h = header();
    let (mid, tail) = (midstate(&h), header_tail(&h));
    let nonce = u32::from_le_bytes([0x42, 0xa1, 0x46, 0x95]) as u64;
    for path in ScanPath::on_this_cpu() {
        // Difficulty 1's top word is 0: only hashes with 32 leading zero bits are candidates.
        let out = path.scan(&mid, &ScanJob::whole(&tail, nonce - 37, nonce + 41, 0));
        assert_eq!(out.candidates, vec![nonce as u32], "{}", path.name());
        assert_eq!(out.next, nonce + 41);
    }
}

#[test]
fn every_path_finds_the_portable_candidates_over_odd_ranges() {
    let h = header();
    let (mid, tail) = (midstate(&h), header_tail(&h));
    // One nonce in 16 is a candidate at this target.
    let top = 0x0fff_ffff;
    let end = 1u64 << 32;
    let ranges = [
        (0, 1000),
        (3, 1003),
        (5, 6),
        (7, 7),
        (17, 33),
        (100, 115),
        (end - 37, end),
        (end - 16, end),
        (12_345, 12_345 + 4099),
    ];
    for path in ScanPath::on_this_cpu() {
        for &(start, stop_at) in &ranges {
            let job = ScanJob::whole(&tail, start, stop_at, top);
            let (want, got) = (scan_portable(&mid, &job), path.scan(&mid, &job));
            assert_eq!(got, want, "{} over {start}..{stop_at}", path.name());
        }
    }
}

/// Runs `scan` over nonces 11..100,011 of `tail` at `top`, polled every `poll_every` nonces
/// by a `stop` that says yes the third time; returns its result and the nonce `stop` was
/// told then.
fn stopped_at_third_poll<R>(
    tail: &[u32; 3],
    top: u32,
    poll_every: u64,
    scan: impl FnOnce(&ScanJob<'_>) -> R,
) -> (R, u64) {
    let (polls, asked_at) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let stop = |n| {
        asked_at.set(n);
        polls.set(polls.get() + 1);
        polls.get() >= 3
    };
    let job = ScanJob {
        poll_every,
        stop: &stop,
        ..ScanJob::whole(tail, 11, 100_011, top)
    };
    (scan(&job), asked_at.get())
}

#[test]
fn a_stopped_scan_reports_exactly_what_it_hashed() {
    let h = header();
    let (mid, tail) = (midstate(&h), header_tail(&h));
    let top = 0x0fff_ffff;
    for path in ScanPath::on_this_cpu() {
        let (out, asked_at) = stopped_at_third_poll(&tail, top, 1000, |job| path.scan(&mid, job));
        assert!(
            out.next > 11 && out.next < 100_011,
            "{} stopped at {}",
            path.name(),
            out.next
        );
        // `stop` was told where the scan stood when it said yes.
        assert_eq!(out.next, asked_at, "{}", path.name());
        let want = scan_portable(&mid, &ScanJob::whole(&tail, 11, out.next, top));
        assert_eq!(out.candidates, want.candidates, "{}", path.name());
    }
}

#[test]
fn a_forced_path_is_taken_and_the_measured_choice_is_one_this_cpu_has() {
    let forced = choose(Some(ScanPath::Portable));
    assert_eq!(forced.path, ScanPath::Portable);
    assert_eq!(forced.chosen_by, "--cpu-sha-path");
    let measured = measured_choice();
    assert!(measured.path.available());
    assert_eq!(measured.rates_mhs.len(), ScanPath::on_this_cpu().len());
    assert!(measured.rates_mhs.iter().all(|(_, r)| *r > 0.0));
}

/// Block 125552's header under `n` rolled versions (BIP 310's bits): their midstates, and
/// the tail they share.
fn rolled_midstates(n: usize) -> (Vec<[u32; 8]>, [u32; 3]) {
    let h = header();
    let mids = (0..n as u32)
        .map(|i| {
            let mut v = h;
            let version = u32::from_le_bytes(h[..4].try_into().unwrap()) ^ (i << 13);
            v[..4].copy_from_slice(&version.to_le_bytes());
            midstate(&v)
        })
        .collect();
    (mids, header_tail(&h))
}

/// What each header alone gives the portable scanner, as (header, nonce).
fn portable_versions(mids: &[[u32; 8]], job: &ScanJob<'_>) -> Vec<(usize, u32)> {
    let mut want: Vec<(usize, u32)> = mids
        .iter()
        .enumerate()
        .flat_map(|(v, mid)| {
            let out = scan_portable(mid, job);
            out.candidates.into_iter().map(move |n| (v, n))
        })
        .collect();
    want.sort_unstable();
    want
}

#[test]
fn rolled_versions_scanned_together_find_what_each_finds_alone() {
    let top = 0x0fff_ffff;
    let end = 1u64 << 32;
    // The shared-schedule counts (8, 4, 2), and counts that take the headers in turn.
    for count in [SHARED_SCHEDULE_VERSIONS, 4, 3, 2, 1] {
        let (mids, tail) = rolled_midstates(count);
        for path in ScanPath::on_this_cpu() {
            for (start, stop_at) in [(0, 1000), (3, 1003), (5, 6), (7, 7), (end - 37, end)] {
                let job = ScanJob::whole(&tail, start, stop_at, top);
                let mut got = path.scan_versions(&mids, &job);
                got.candidates.sort_unstable();
                assert_eq!(got.next, stop_at, "{} ×{count}", path.name());
                assert_eq!(
                    got.candidates,
                    portable_versions(&mids, &job),
                    "{} ×{count} over {start}..{stop_at}",
                    path.name()
                );
            }
        }
    }
}

#[test]
fn a_stopped_scan_of_rolled_versions_hashed_every_one_to_where_it_stopped() {
    let top = 0x0fff_ffff;
    for count in [SHARED_SCHEDULE_VERSIONS, 4, 3, 2] {
        let (mids, tail) = rolled_midstates(count);
        for path in ScanPath::on_this_cpu() {
            let (mut out, asked_at) =
                stopped_at_third_poll(&tail, top, 256, |job| path.scan_versions(&mids, job));
            assert!(
                out.next > 11 && out.next < 100_011,
                "{} ×{count}",
                path.name()
            );
            assert_eq!(out.next, asked_at, "{} ×{count}", path.name());
            out.candidates.sort_unstable();
            let want = portable_versions(&mids, &ScanJob::whole(&tail, 11, out.next, top));
            assert_eq!(out.candidates, want, "{} ×{count}", path.name());
        }
    }
}
