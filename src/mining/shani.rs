//! The SHA-NI nonce scanner (x86-64 with the SHA extensions): [`LANES`] nonces go through every
//! round step together, so their dependency chains of `sha256rnds2` overlap instead of waiting
//! on each other's latency. The final two rounds of the second hash are skipped: after round 62
//! the F register already holds the only word the target test needs. The first two rounds of the header's second block depend only on the
//! job (merkle tail, ntime), so they run once per scan, not once per nonce.

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

    // Second hash: the 32-byte digest, padded.
    let iv = pack(&IV);
    let (mut lo, mut hi) = ([zero; N], [zero; N]);
    for l in 0..N {
        let st = State {
            abef: _mm_add_epi32(s[l].abef, mid.abef),
            cdgh: _mm_add_epi32(s[l].cdgh, mid.cdgh),
        };
        (lo[l], hi[l]) = unpack_words(st);
    }
    let mut s2 = [iv; N];
    quad(&mut s2, &lo, 0);
    rounds_4_to_64(&mut s2, lo, hi, pad1, _mm_set_epi32(256, 0, 0, 0), false);
    // `sha256rnds2` returns the new (A,B,E,F), so the registers swap roles every call: after
    // rounds 60–61 the one named `cdgh` holds (A,B,E,F) of round 62, whose F (lane 0) is
    // E of round 61, which is h after round 64.
    let mut out = [0u32; N];
    for l in 0..N {
        out[l] = (_mm_cvtsi128_si32(s2[l].cdgh) as u32).wrapping_add(IV[7]);
    }
    out
}

/// Nonces hashed together.
const LANES: usize = 2;

/// Runs `job` two nonces at a time.
///
/// # Safety
/// The CPU must support SHA-NI, SSSE3 and SSE4.1 ([`available`]).
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
pub unsafe fn scan(mid_words: &[u32; 8], job: &ScanJob<'_>) -> ScanOutcome {
    let out = scan_versions::<1>(&[*mid_words], job);
    ScanOutcome {
        candidates: out.candidates.into_iter().map(|(_, n)| n).collect(),
        next: out.next,
    }
}

/// Runs `job` on the `V` headers with midstates `mids` (one tail: rolled versions), two
/// nonces at a time under each in turn, so that all stop at the same nonce. (Nothing of the
/// schedule is shared: `sha256msg1`/`sha256msg2` make it a small part of the work here.)
///
/// # Safety
/// The CPU must support SHA-NI, SSSE3 and SSE4.1 ([`available`]).
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
pub unsafe fn scan_versions<const V: usize>(
    mids: &[[u32; 8]; V],
    job: &ScanJob<'_>,
) -> VersionsOutcome {
    let (tail, target_top) = (job.tail, job.target_top);
    // Rounds 0–1 of the second block use only the merkle tail and ntime.
    let (t0, t1, t2) = (tail[0] as i32, tail[1] as i32, tail[2] as i32);
    let k01 = k(0);
    let first = _mm_add_epi32(_mm_set_epi32(0, t2, t1, t0), k01);
    let mut states = [(pack(&IV), pack(&IV)); V];
    for v in 0..V {
        let mid = pack(&mids[v]);
        let after2 = State {
            abef: mid.abef,
            cdgh: _mm_sha256rnds2_epu32(mid.cdgh, mid.abef, first),
        };
        states[v] = (mid, after2);
    }
    let mut candidates = Vec::new();
    let next = super::sha256::scan_versions_in_batches(
        mids,
        job,
        LANES as u64,
        #[inline(always)]
        |n| {
            let mut hits = [0u32; V];
            for v in 0..V {
                let (mid, after2) = states[v];
                let h = hash_lanes::<LANES>(mid, after2, tail, k01, n);
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
