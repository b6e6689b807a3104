//! The SHA-NI nonce scanner (x86-64 with the SHA extensions). Several chains of
//! `sha256rnds2` go through every round step together, so their latencies overlap instead of
//! each waiting on its own: [`LANES`] nonces for one header, and for rolled versions pairs of
//! headers × two nonces, whose first-hash message schedule (the same for every version) is
//! computed once per nonce. The final two rounds of the second hash are skipped: after round
//! 62 the F register already holds the only word the target test needs. The first two rounds
//! of the header's second block depend only on the job (merkle tail, ntime), so they run once
//! per scan, not once per nonce.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::sha256::{ScanJob, ScanOutcome, VersionsOutcome, IV, K};

/// Whether this CPU can run [`scan`].
pub fn available() -> bool {
    is_x86_feature_detected!("sha")
        && is_x86_feature_detected!("sse4.1")
        && is_x86_feature_detected!("ssse3")
}

/// SHA-256 state in the register layout `sha256rnds2` uses: (A,B,E,F) and (C,D,G,H).
#[derive(Clone, Copy)]
struct State {
    abef: __m128i,
    cdgh: __m128i,
}

#[inline(always)]
unsafe fn pack(s: &[u32; 8]) -> State {
    let [a, b, c, d, e, f, g, h] = s.map(|x| x as i32);
    State {
        abef: _mm_set_epi32(a, b, e, f),
        cdgh: _mm_set_epi32(c, d, g, h),
    }
}

/// (A..D) and (E..H) in message-word order, for hashing a digest again.
#[inline(always)]
unsafe fn unpack_words(s: State) -> (__m128i, __m128i) {
    let dcba = _mm_unpackhi_epi64(s.cdgh, s.abef);
    let hgfe = _mm_unpacklo_epi64(s.cdgh, s.abef);
    (_mm_shuffle_epi32(dcba, 0x1B), _mm_shuffle_epi32(hgfe, 0x1B))
}

#[inline(always)]
unsafe fn k(i: usize) -> __m128i {
    _mm_loadu_si128(K.as_ptr().add(4 * i) as *const __m128i)
}

/// Next four message words from the previous sixteen.
#[inline(always)]
unsafe fn schedule(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
    _mm_sha256msg2_epu32(
        _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3, w2, 4)),
        w3,
    )
}

/// Rounds 4i..4i+4 on every lane.
#[inline(always)]
unsafe fn quad<const N: usize>(s: &mut [State; N], w: &[__m128i; N], i: usize) {
    let ki = k(i);
    let mut m = [_mm_setzero_si128(); N];
    for l in 0..N {
        m[l] = _mm_add_epi32(w[l], ki);
    }
    for l in 0..N {
        s[l].cdgh = _mm_sha256rnds2_epu32(s[l].cdgh, s[l].abef, m[l]);
    }
    for l in 0..N {
        s[l].abef = _mm_sha256rnds2_epu32(s[l].abef, s[l].cdgh, _mm_shuffle_epi32(m[l], 0x0E));
    }
}

/// Rounds 4..64 (or 4..62 with `last_two == false`) of N blocks: words 0..8 per lane
/// (`w0`, `w1`), words 8..16 shared (padding and length); rounds 0..4 were run by the caller.
#[inline(always)]
unsafe fn rounds_4_to_64<const N: usize>(
    s: &mut [State; N],
    w0: [__m128i; N],
    w1: [__m128i; N],
    w2: __m128i,
    w3: __m128i,
    last_two: bool,
) {
    let (mut x0, mut x1, mut x2, mut x3) = (w0, w1, [w2; N], [w3; N]);
    quad(s, &x1, 1);
    quad(s, &x2, 2);
    quad(s, &x3, 3);
    for i in (4..12).step_by(4) {
        for l in 0..N {
            x0[l] = schedule(x0[l], x1[l], x2[l], x3[l]);
        }
        quad(s, &x0, i);
        for l in 0..N {
            x1[l] = schedule(x1[l], x2[l], x3[l], x0[l]);
        }
        quad(s, &x1, i + 1);
        for l in 0..N {
            x2[l] = schedule(x2[l], x3[l], x0[l], x1[l]);
        }
        quad(s, &x2, i + 2);
        for l in 0..N {
            x3[l] = schedule(x3[l], x0[l], x1[l], x2[l]);
        }
        quad(s, &x3, i + 3);
    }
    for l in 0..N {
        x0[l] = schedule(x0[l], x1[l], x2[l], x3[l]);
    }
    quad(s, &x0, 12);
    for l in 0..N {
        x1[l] = schedule(x1[l], x2[l], x3[l], x0[l]);
    }
    quad(s, &x1, 13);
    for l in 0..N {
        x2[l] = schedule(x2[l], x3[l], x0[l], x1[l]);
    }
    quad(s, &x2, 14);
    for l in 0..N {
        x3[l] = schedule(x3[l], x0[l], x1[l], x2[l]);
    }
    if last_two {
        quad(s, &x3, 15);
    } else {
        // Rounds 60–61 only: after round 62 the F register already holds the final h.
        let k15 = k(15);
        for l in 0..N {
            let m = _mm_add_epi32(x3[l], k15);
            s[l].cdgh = _mm_sha256rnds2_epu32(s[l].cdgh, s[l].abef, m);
        }
    }
}

/// Double SHA-256 of N headers (nonces `n..n+N`); returns each final H7 word.
#[inline(always)]
unsafe fn hash_lanes<const N: usize>(
    mid: State,
    after2: State,
    tail: &[u32; 3],
    k01: __m128i,
    n: u32,
) -> [u32; N] {
    let (t0, t1, t2) = (tail[0] as i32, tail[1] as i32, tail[2] as i32);
    let mut w0 = [_mm_setzero_si128(); N];
    for (l, w) in w0.iter_mut().enumerate() {
        *w = _mm_set_epi32(n.wrapping_add(l as u32).swap_bytes() as i32, t2, t1, t0);
    }
    let pad1 = _mm_set_epi32(0, 0, 0, 0x8000_0000u32 as i32);
    let zero = _mm_setzero_si128();

    // First hash, block 2. Rounds 0–1 (merkle tail, ntime) were run once: `after2`. Rounds
    // 2–3 take nBits and the nonce.
    let mut s = [after2; N];
    for l in 0..N {
        let m = _mm_shuffle_epi32(_mm_add_epi32(w0[l], k01), 0x0E);
        s[l].abef = _mm_sha256rnds2_epu32(s[l].abef, s[l].cdgh, m);
    }
    rounds_4_to_64(
        &mut s,
        w0,
        [pad1; N],
        zero,
        _mm_set_epi32(640, 0, 0, 0),
        true,
    );

    second_hash_h7(&s, |_| mid)
}

/// The second hash of N chains whose first hash ended in state `s[c]` after the second block,
/// `mid(c)` being chain `c`'s midstate: returns each final H7 word.
#[inline(always)]
unsafe fn second_hash_h7<const N: usize>(s: &[State; N], mid: impl Fn(usize) -> State) -> [u32; N] {
    // The 32-byte digest, padded.
    let zero = _mm_setzero_si128();
    let pad1 = _mm_set_epi32(0, 0, 0, 0x8000_0000u32 as i32);
    let (mut lo, mut hi) = ([zero; N], [zero; N]);
    for c in 0..N {
        let m = mid(c);
        let st = State {
            abef: _mm_add_epi32(s[c].abef, m.abef),
            cdgh: _mm_add_epi32(s[c].cdgh, m.cdgh),
        };
        (lo[c], hi[c]) = unpack_words(st);
    }
    let mut s2 = [pack(&IV); N];
    quad(&mut s2, &lo, 0);
    rounds_4_to_64(&mut s2, lo, hi, pad1, _mm_set_epi32(256, 0, 0, 0), false);
    // `sha256rnds2` returns the new (A,B,E,F), so the registers swap roles every call: after
    // rounds 60–61 the one named `cdgh` holds (A,B,E,F) of round 62, whose F (lane 0) is
    // E of round 61, which is h after round 64.
    let mut out = [0u32; N];
    for c in 0..N {
        out[c] = (_mm_cvtsi128_si32(s2[c].cdgh) as u32).wrapping_add(IV[7]);
    }
    out
}

/// The first hash's second block for `NN` nonces, as every rolled version of the header uses
/// it: each four rounds' message words plus K, with the high pair (the second
/// `sha256rnds2`'s operand) beside them, computed once whatever the number of versions.
struct FirstSchedule<const NN: usize> {
    /// `[quad][lane]`: W + K of rounds 4i..4i+4, which the first `sha256rnds2` of a quad
    /// reads in its low pair, and in `hi` the high pair moved low for the second. (`lo[0]`
    /// is never read: rounds 0–1 run once per scan, in [`header_states`].)
    lo: [[__m128i; NN]; 16],
    hi: [[__m128i; NN]; 16],
}

impl<const NN: usize> FirstSchedule<NN> {
    /// Nonces `n..n + NN` after the job's `tail`.
    #[inline(always)]
    unsafe fn new(tail: &[u32; 3], n: u32) -> Self {
        let (t0, t1, t2) = (tail[0] as i32, tail[1] as i32, tail[2] as i32);
        let mut x0 = [_mm_setzero_si128(); NN];
        for (l, w) in x0.iter_mut().enumerate() {
            *w = _mm_set_epi32(n.wrapping_add(l as u32).swap_bytes() as i32, t2, t1, t0);
        }
        let mut x1 = [_mm_set_epi32(0, 0, 0, 0x8000_0000u32 as i32); NN];
        let mut x2 = [_mm_setzero_si128(); NN];
        let mut x3 = [_mm_set_epi32(640, 0, 0, 0); NN];
        let mut out = Self {
            lo: [[_mm_setzero_si128(); NN]; 16],
            hi: [[_mm_setzero_si128(); NN]; 16],
        };
        let mut put = |i: usize, x: &[__m128i; NN]| {
            for l in 0..NN {
                let m = _mm_add_epi32(x[l], k(i));
                out.lo[i][l] = m;
                out.hi[i][l] = _mm_shuffle_epi32(m, 0x0E);
            }
        };
        put(0, &x0);
        put(1, &x1);
        put(2, &x2);
        put(3, &x3);
        for i in (4..16).step_by(4) {
            for l in 0..NN {
                x0[l] = schedule(x0[l], x1[l], x2[l], x3[l]);
            }
            put(i, &x0);
            for l in 0..NN {
                x1[l] = schedule(x1[l], x2[l], x3[l], x0[l]);
            }
            put(i + 1, &x1);
            for l in 0..NN {
                x2[l] = schedule(x2[l], x3[l], x0[l], x1[l]);
            }
            put(i + 2, &x2);
            for l in 0..NN {
                x3[l] = schedule(x3[l], x0[l], x1[l], x2[l]);
            }
            put(i + 3, &x3);
        }
        out
    }
}

/// Double SHA-256 of `G` headers (rolled versions: midstates `mid`, and `after2` their states
/// after rounds 0–1 of the second block) × `NN` nonces, in `C` = `G`·`NN` independent chains
/// (chain `c` is header `c / NN`, nonce `c % NN`) whose `sha256rnds2` latencies overlap.
/// Returns each chain's final H7 word.
#[inline(always)]
unsafe fn hash_chains<const G: usize, const NN: usize, const C: usize>(
    mid: &[State; G],
    after2: &[State; G],
    first: &FirstSchedule<NN>,
) -> [u32; C] {
    debug_assert_eq!(C, G * NN);
    // First hash, block 2: rounds 2–3 (nBits, the nonce), then the shared schedule.
    let mut s: [State; C] = std::array::from_fn(|c| after2[c / NN]);
    for (c, st) in s.iter_mut().enumerate() {
        st.abef = _mm_sha256rnds2_epu32(st.abef, st.cdgh, first.hi[0][c % NN]);
    }
    for i in 1..16 {
        for (c, st) in s.iter_mut().enumerate() {
            st.cdgh = _mm_sha256rnds2_epu32(st.cdgh, st.abef, first.lo[i][c % NN]);
        }
        for (c, st) in s.iter_mut().enumerate() {
            st.abef = _mm_sha256rnds2_epu32(st.abef, st.cdgh, first.hi[i][c % NN]);
        }
    }
    second_hash_h7(&s, |c| mid[c / NN])
}

/// Nonces hashed together by one header alone: two chains of `sha256rnds2`, each nonce's
/// schedule computed between its rounds. (Measured on a Zen 4 EPYC, one thread: 28 MH/s,
/// against 27–28 with three or four and 22 with the schedule computed first, as the rolled
/// versions take it.)
const LANES: usize = 2;

/// Runs `job` two nonces at a time.
///
/// # Safety
/// The CPU must support SHA-NI, SSSE3 and SSE4.1 ([`available`]).
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
pub unsafe fn scan(mid_words: &[u32; 8], job: &ScanJob<'_>) -> ScanOutcome {
    let out = scan_interleaved::<1>(&[*mid_words], job);
    ScanOutcome {
        candidates: out.candidates.into_iter().map(|(_, n)| n).collect(),
        next: out.next,
    }
}

/// Runs `job` on the `V` headers with midstates `mids` (one tail: rolled versions), a few
/// nonces at a time for all of them, so that all stop at the same nonce. The first hash's
/// message schedule of each nonce is computed once for every version, and the headers go
/// through in pairs, whose four chains of `sha256rnds2` (two headers × two nonces) overlap
/// their latencies (an odd count goes as one header does, in turn). Measured on a Zen 4 EPYC,
/// one thread, eight versions: 35 MH/s a header in pairs, 33 one header × four nonces, 29
/// in fours (`sha256rnds2` reaches only xmm0–15, which hold the state of only so many
/// chains), 28 taking the headers in turn with no sharing.
///
/// # Safety
/// The CPU must support SHA-NI, SSSE3 and SSE4.1 ([`available`]).
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
pub unsafe fn scan_versions<const V: usize>(
    mids: &[[u32; 8]; V],
    job: &ScanJob<'_>,
) -> VersionsOutcome {
    if V % 2 == 0 {
        scan_grouped::<V, 2, 2, 4>(mids, job)
    } else {
        scan_interleaved::<V>(mids, job)
    }
}

/// Each header's midstate, and its state after rounds 0–1 of the second block, which use only
/// the merkle tail and ntime: run once per scan, not once per nonce.
#[inline(always)]
unsafe fn header_states<const V: usize>(
    mids: &[[u32; 8]; V],
    tail: &[u32; 3],
) -> ([State; V], [State; V]) {
    let (t0, t1, t2) = (tail[0] as i32, tail[1] as i32, tail[2] as i32);
    let first01 = _mm_add_epi32(_mm_set_epi32(0, t2, t1, t0), k(0));
    let mid: [State; V] = std::array::from_fn(|v| pack(&mids[v]));
    let after2 = std::array::from_fn(|v| State {
        abef: mid[v].abef,
        cdgh: _mm_sha256rnds2_epu32(mid[v].cdgh, mid[v].abef, first01),
    });
    (mid, after2)
}

/// [`scan_versions`] with a shared schedule: the headers in groups of `G` (`V % G == 0`),
/// `NONCES` nonces a batch, `C` = `G`·`NONCES` chains a group.
#[inline(always)]
unsafe fn scan_grouped<const V: usize, const G: usize, const NONCES: usize, const C: usize>(
    mids: &[[u32; 8]; V],
    job: &ScanJob<'_>,
) -> VersionsOutcome {
    assert!(V % G == 0 && C == G * NONCES);
    let (tail, target_top) = (job.tail, job.target_top);
    let (mid, after2) = header_states(mids, tail);
    let mut candidates = Vec::new();
    let next = super::sha256::scan_versions_in_batches(
        mids,
        job,
        NONCES as u64,
        #[inline(always)]
        |n| {
            let first = FirstSchedule::<NONCES>::new(tail, n);
            let mut hits = [0u32; V];
            for g in (0..V).step_by(G) {
                let group_mid: &[State; G] = mid[g..g + G].try_into().unwrap();
                let group_after2: &[State; G] = after2[g..g + G].try_into().unwrap();
                let h = hash_chains::<G, NONCES, C>(group_mid, group_after2, &first);
                for (c, h7) in h.iter().enumerate() {
                    hits[g + c / NONCES] |=
                        u32::from(h7.swap_bytes() <= target_top) << (c % NONCES);
                }
            }
            hits
        },
        |v, nonce| candidates.push((v, nonce)),
    );
    VersionsOutcome { candidates, next }
}

/// [`scan_versions`] with nothing shared: [`LANES`] nonces a batch under each header in turn.
#[inline(always)]
unsafe fn scan_interleaved<const V: usize>(
    mids: &[[u32; 8]; V],
    job: &ScanJob<'_>,
) -> VersionsOutcome {
    let (tail, target_top) = (job.tail, job.target_top);
    let (mid, after2) = header_states(mids, tail);
    let k01 = k(0);
    let mut candidates = Vec::new();
    let next = super::sha256::scan_versions_in_batches(
        mids,
        job,
        LANES as u64,
        #[inline(always)]
        |n| {
            let mut hits = [0u32; V];
            for v in 0..V {
                let h = hash_lanes::<LANES>(mid[v], after2[v], tail, k01, n);
                for (l, h7) in h.iter().enumerate() {
                    hits[v] |= u32::from(h7.swap_bytes() <= target_top) << l;
                }
            }
            hits
        },
        |v, nonce| candidates.push((v, nonce)),
    );
    VersionsOutcome { candidates, next }
}
