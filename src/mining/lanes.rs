//! Message-parallel SHA-256d: one nonce per vector lane (16 with AVX-512, 8 with AVX2, 1 in the
//! portable stand-in that tests the same code everywhere). The algorithm is written once, over
//! the [`Lanes`] trait; the instruction sets differ only in the trait's few operations.
//!
//! Everything that does not depend on the nonce is done once per job ([`Prepared`]), as in the
//! GPU kernel:
//! - rounds 0–2 of the header's second block (merkle tail, ntime, nBits), and round 3 but for
//!   its `+ W3`: after it, `a` and `e` are the nonce word plus a constant, the rest constant;
//! - the message words that are constant or zero (padding, length), and every term of the
//!   schedule built only from them;
//! - round 0 of the second hash (its state is the IV) but for `+ W0`.
//!
//! And the second hash stops early: the target test needs only its last word, `H7 = IV7 + e61`,
//! which round 60 produces, so rounds 61–63 and message words 61–63 are never computed.
//!
//! With BIP 310 version rolling, headers that differ only in their version (in the first
//! block: other midstates) have the same second block, so the first hash's message schedule
//! (`W16..W63` plus `K`, about 30 of the 180 vector instructions a nonce) is computed once for
//! several of them ([`hash_h7_versions`]).

use seq_macro::seq;

use super::sha256::{round, small_sigma0, small_sigma1, t1_without_w, t2, IV, K};

/// The operations the algorithm needs on a vector of 32-bit lanes.
///
/// # Safety
/// Implementations use instructions the CPU must have; callers check that before calling
/// into a function generic over them (see each implementation's `available`).
pub(super) trait Lanes: Copy {
    const N: usize;
    unsafe fn splat(x: u32) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    /// `Ch(e, f, g) = (e ∧ f) ⊕ (¬e ∧ g)`.
    unsafe fn ch(e: Self, f: Self, g: Self) -> Self;
    /// `Maj(a, b, c)`.
    unsafe fn maj(a: Self, b: Self, c: Self) -> Self;
    unsafe fn big_sigma0(a: Self) -> Self;
    unsafe fn big_sigma1(e: Self) -> Self;
    unsafe fn small_sigma0(w: Self) -> Self;
    unsafe fn small_sigma1(w: Self) -> Self;
    /// Lane `i` holds `(base + i)` byte-swapped: the nonce as SHA-256 reads the header.
    unsafe fn nonce_words(base: u32) -> Self;
    /// Bit `i` set where lane `i`, byte-swapped, is at or below `top`.
    unsafe fn le_mask_swapped(x: Self, top: u32) -> u32;
    /// Lane values, for tests.
    #[cfg(test)]
    unsafe fn to_vec(x: Self) -> Vec<u32>;
}

/// Job constants of the message-parallel scan: the state after the nonce-free rounds of the
/// first hash, its constant message words and schedule terms, and the second hash's round 0.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// State after round 3 of the first hash's second block but for W3: `a = W3 + a4`,
    /// `e = W3 + e4`, the others as given.
    s4: [u32; 8],
    /// Constant parts of message words 16..=31 of the first hash (see [`first_hash`]).
    w1: [u32; 32],
    mid: [u32; 8],
    /// The second hash's round 0 without `W0`: `a1 = W0 + a1c`, `e1 = W0 + e1c`.
    a1c: u32,
    e1c: u32,
}

impl Prepared {
    pub fn new(mid: &[u32; 8], tail: &[u32; 3]) -> Self {
        // Rounds 0–2 take the tail; round 3 takes the nonce, which is added later.
        let mut s = *mid;
        for t in 0..3 {
            s = round(&s, K[t], tail[t]);
        }
        let t1 = t1_without_w(&s, K[3]);
        let s4 = [
            t1.wrapping_add(t2(&s)),
            s[0],
            s[1],
            s[2],
            s[3].wrapping_add(t1),
            s[4],
            s[5],
            s[6],
        ];
        let mut w1 = [0u32; 32];
        w1[..3].copy_from_slice(tail);
        w1[4] = 0x8000_0000;
        w1[15] = 640;
        // W16 and W17 are wholly constant; the others keep only their constant terms here.
        w1[16] = small_sigma0(w1[1]).wrapping_add(w1[0]);
        w1[17] = small_sigma1(w1[15])
            .wrapping_add(small_sigma0(w1[2]))
            .wrapping_add(w1[1]);
        w1[18] = small_sigma1(w1[16]).wrapping_add(w1[2]); // + σ0(W3)
        w1[19] = small_sigma1(w1[17]).wrapping_add(small_sigma0(w1[4])); // + W3
        w1[20] = w1[4]; // + σ1(W18)
        w1[22] = w1[15]; // + σ1(W20)
        w1[23] = w1[16]; // + σ1(W21)
        w1[24] = w1[17]; // + σ1(W22)
        w1[30] = small_sigma0(w1[15]); // + σ1(W28) + W23
        w1[31] = small_sigma0(w1[16]).wrapping_add(w1[15]); // + σ1(W29) + W24
        let iv = IV;
        let t1 = t1_without_w(&iv, K[0]);
        Self {
            s4,
            w1,
            mid: *mid,
            a1c: t1.wrapping_add(t2(&iv)),
            e1c: iv[3].wrapping_add(t1),
        }
    }
}

/// One round: `[a..h] → [T1 + T2, a, b, c, d + T1, e, f, g]`. Inlined into straight-line
/// code, the shift is only a renaming of registers.
#[inline(always)]
unsafe fn step<L: Lanes>(s: [L; 8], kw: L) -> [L; 8] {
    let [a, b, c, d, e, f, g, h] = s;
    let t1 = L::add(L::add(h, kw), L::add(L::big_sigma1(e), L::ch(e, f, g)));
    let t2 = L::add(L::big_sigma0(a), L::maj(a, b, c));
    [L::add(t1, t2), a, b, c, L::add(d, t1), e, f, g]
}

/// `W[t] = σ1(W[t−2]) + W[t−7] + σ0(W[t−15]) + W[t−16]`.
#[inline(always)]
unsafe fn expand<L: Lanes>(w: &[L; 64], t: usize) -> L {
    L::add(
        L::add(L::small_sigma1(w[t - 2]), w[t - 7]),
        L::add(L::small_sigma0(w[t - 15]), w[t - 16]),
    )
}

/// The first hash's message words 0..=31 for nonces `base..` (`W3`, the nonce words, also
/// alone); the rest are left zero.
#[inline(always)]
unsafe fn first_words<L: Lanes>(p: &Prepared, base: u32) -> (L, [L; 64]) {
    let c = |x: u32| L::splat(x);
    let w3 = L::nonce_words(base);
    let zero = c(0);
    let mut w = [zero; 64];
    for t in 0..16 {
        w[t] = c(p.w1[t]);
    }
    w[3] = w3;
    // The words whose terms are partly constant (zeros of the padding dropped).
    w[16] = c(p.w1[16]);
    w[17] = c(p.w1[17]);
    w[18] = L::add(c(p.w1[18]), L::small_sigma0(w3));
    w[19] = L::add(c(p.w1[19]), w3);
    w[20] = L::add(c(p.w1[20]), L::small_sigma1(w[18]));
    w[21] = L::small_sigma1(w[19]);
    w[22] = L::add(c(p.w1[22]), L::small_sigma1(w[20]));
    w[23] = L::add(c(p.w1[23]), L::small_sigma1(w[21]));
    w[24] = L::add(c(p.w1[24]), L::small_sigma1(w[22]));
    for t in 25..30 {
        w[t] = L::add(L::small_sigma1(w[t - 2]), w[t - 7]);
    }
    w[30] = L::add(L::add(c(p.w1[30]), L::small_sigma1(w[28])), w[23]);
    w[31] = L::add(L::add(c(p.w1[31]), L::small_sigma1(w[29])), w[24]);
    (w3, w)
}

/// The first hash's state after round 15: from the prepared state after round 3 (the
/// nonce words added), rounds 4..=15, whose message words are constant.
#[inline(always)]
unsafe fn first_state_16<L: Lanes>(p: &Prepared, w3: L) -> [L; 8] {
    let c = |x: u32| L::splat(x);
    let s4 = p.s4;
    let mut s = [
        L::add(w3, c(s4[0])),
        c(s4[1]),
        c(s4[2]),
        c(s4[3]),
        L::add(w3, c(s4[4])),
        c(s4[5]),
        c(s4[6]),
        c(s4[7]),
    ];
    // Written out with constant indices (no loops), so that the message words are values in
    // registers, not an array in memory.
    seq!(T in 4..16 {
        s = step(s, c(K[T].wrapping_add(p.w1[T])));
    });
    s
}

/// The digest: the state after round 63 plus the midstate.
#[inline(always)]
unsafe fn first_digest<L: Lanes>(p: &Prepared, s: [L; 8]) -> [L; 8] {
    let mut out = s;
    for i in 0..8 {
        out[i] = L::add(s[i], L::splat(p.mid[i]));
    }
    out
}

/// The first hash of `L::N` headers (nonces `base..`): the 8 words of its digest. With one
/// header nothing is shared, so each message word from 32 on is expanded just before its
/// round, where it is used, rather than all first as [`first_schedule`] does.
#[inline(always)]
unsafe fn first_hash<L: Lanes>(p: &Prepared, base: u32) -> [L; 8] {
    let (w3, mut w) = first_words::<L>(p, base);
    let mut s = first_state_16(p, w3);
    seq!(T in 16..64 {
        if T >= 32 {
            w[T] = expand(&w, T);
        }
        s = step(s, L::add(w[T], L::splat(K[T])));
    });
    first_digest(p, s)
}

/// The nonce-dependent part of the first hash's message schedule for nonces `base..`: `W3`
/// and `W[t] + K[t]` for rounds 16..=63. It depends only on the header's tail, so headers
/// that differ only before it (rolled versions: other midstates) share it.
#[inline(always)]
unsafe fn first_schedule<L: Lanes>(p: &Prepared, base: u32) -> (L, [L; 64]) {
    let (w3, mut w) = first_words::<L>(p, base);
    seq!(T in 32..64 {
        w[T] = expand(&w, T);
    });
    let mut wk = w;
    seq!(T in 16..64 {
        wk[T] = L::add(w[T], L::splat(K[T]));
    });
    (w3, wk)
}

/// The first hash's rounds 4..=63 for one midstate, given the shared schedule: the 8 words
/// of its digest.
#[inline(always)]
unsafe fn first_rounds<L: Lanes>(p: &Prepared, w3: L, wk: &[L; 64]) -> [L; 8] {
    let mut s = first_state_16(p, w3);
    seq!(T in 16..64 {
        s = step(s, wk[T]);
    });
    first_digest(p, s)
}

/// The last word of the second hash, `H7` (before byte order), of the first hash's digests.
#[inline(always)]
unsafe fn second_hash_h7<L: Lanes>(p: &Prepared, d: [L; 8]) -> L {
    let c = |x: u32| L::splat(x);
    let mut w = [c(0); 64];
    w[..8].copy_from_slice(&d);
    w[8] = c(0x8000_0000);
    w[15] = c(256);
    let (s1_15, s0_8, s0_15) = (
        small_sigma1(256),
        small_sigma0(0x8000_0000),
        small_sigma0(256),
    );
    // W9..W14 are zero: their terms are dropped.
    w[16] = L::add(L::small_sigma0(w[1]), w[0]);
    w[17] = L::add(c(s1_15), L::add(L::small_sigma0(w[2]), w[1]));
    for t in 18..22 {
        w[t] = L::add(
            L::small_sigma1(w[t - 2]),
            L::add(L::small_sigma0(w[t - 15]), w[t - 16]),
        );
    }
    w[22] = L::add(
        L::add(L::small_sigma1(w[20]), c(256)),
        L::add(L::small_sigma0(w[7]), w[6]),
    );
    w[23] = L::add(L::add(L::small_sigma1(w[21]), w[16]), L::add(c(s0_8), w[7]));
    w[24] = L::add(L::add(L::small_sigma1(w[22]), w[17]), c(0x8000_0000));
    for t in 25..30 {
        w[t] = L::add(L::small_sigma1(w[t - 2]), w[t - 7]);
    }
    w[30] = L::add(L::add(L::small_sigma1(w[28]), w[23]), c(s0_15));
    w[31] = L::add(
        L::add(L::small_sigma1(w[29]), w[24]),
        L::add(L::small_sigma0(w[16]), c(256)),
    );
    let iv = IV;
    let mut s = [
        L::add(w[0], c(p.a1c)),
        c(iv[0]),
        c(iv[1]),
        c(iv[2]),
        L::add(w[0], c(p.e1c)),
        c(iv[4]),
        c(iv[5]),
        c(iv[6]),
    ];
    seq!(T in 1..60 {
        if T >= 32 {
            w[T] = expand(&w, T);
        }
        s = step(s, L::add(w[T], c(K[T])));
    });
    w[60] = expand(&w, 60);
    // Round 60, its new `e` only: `e61 = d + T1`, and `H7 = IV7 + e61`.
    let [_, _, _, d, e, f, g, h] = s;
    let t1 = L::add(
        L::add(h, L::add(w[60], c(K[60]))),
        L::add(L::big_sigma1(e), L::ch(e, f, g)),
    );
    L::add(L::add(d, t1), c(iv[7]))
}

/// `H7` of the double hashes of nonces `base..base + L::N`.
#[inline(always)]
pub(super) unsafe fn hash_h7<L: Lanes>(p: &Prepared, base: u32) -> L {
    second_hash_h7(p, first_hash::<L>(p, base))
}

/// `H7` of nonces `base..base + L::N` under each of `V` midstates that share one tail
/// (`ps[v].w1` all equal: headers that differ only in their rolled version bits). The first
/// hash's schedule is computed once for all of them.
#[inline(always)]
pub(super) unsafe fn hash_h7_versions<L: Lanes, const V: usize>(
    ps: &[Prepared; V],
    base: u32,
) -> [L; V] {
    let (w3, wk) = first_schedule::<L>(&ps[0], base);
    let mut out = [L::splat(0); V];
    for v in 0..V {
        out[v] = second_hash_h7(&ps[v], first_rounds(&ps[v], w3, &wk));
    }
    out
}

/// Runs `job` like [`super::sha256::scan_portable`], `L::N` nonces at a time.
#[inline(always)]
pub(super) unsafe fn scan<L: Lanes>(
    p: &Prepared,
    job: &super::sha256::ScanJob<'_>,
) -> super::sha256::ScanOutcome {
    super::sha256::scan_in_batches(
        &p.mid,
        job,
        L::N as u64,
        #[inline(always)]
        |n| L::le_mask_swapped(hash_h7::<L>(p, n), job.target_top),
    )
}

/// Runs `job` on the `V` headers with midstates `mids` (prepared as `ps`; one tail), all
/// over the same nonces, `L::N` nonces at a time with one message schedule for all `V`.
#[inline(always)]
pub(super) unsafe fn scan_versions<L: Lanes, const V: usize>(
    ps: &[Prepared; V],
    mids: &[[u32; 8]; V],
    job: &super::sha256::ScanJob<'_>,
) -> super::sha256::VersionsOutcome {
    let mut candidates = Vec::new();
    let next = super::sha256::scan_versions_in_batches(
        mids,
        job,
        L::N as u64,
        #[inline(always)]
        |n| {
            let h7 = hash_h7_versions::<L, V>(ps, n);
            let mut bits = [0; V];
            for v in 0..V {
                bits[v] = L::le_mask_swapped(h7[v], job.target_top);
            }
            bits
        },
        |v, nonce| candidates.push((v, nonce)),
    );
    super::sha256::VersionsOutcome { candidates, next }
}

/// One lane of plain `u32`: the algorithm above, runnable and testable on any CPU.
#[cfg(test)]
#[derive(Clone, Copy)]
pub(super) struct Portable(u32);

#[cfg(test)]
impl Lanes for Portable {
    const N: usize = 1;
    unsafe fn splat(x: u32) -> Self {
        Portable(x)
    }
    unsafe fn add(a: Self, b: Self) -> Self {
        Portable(a.0.wrapping_add(b.0))
    }
    unsafe fn ch(e: Self, f: Self, g: Self) -> Self {
        Portable((e.0 & f.0) ^ (!e.0 & g.0))
    }
    unsafe fn maj(a: Self, b: Self, c: Self) -> Self {
        Portable((a.0 & b.0) ^ (a.0 & c.0) ^ (b.0 & c.0))
    }
    unsafe fn big_sigma0(a: Self) -> Self {
        Portable(super::sha256::big_sigma0(a.0))
    }
    unsafe fn big_sigma1(e: Self) -> Self {
        Portable(super::sha256::big_sigma1(e.0))
    }
    unsafe fn small_sigma0(w: Self) -> Self {
        Portable(small_sigma0(w.0))
    }
    unsafe fn small_sigma1(w: Self) -> Self {
        Portable(small_sigma1(w.0))
    }
    unsafe fn nonce_words(base: u32) -> Self {
        Portable(base.swap_bytes())
    }
    unsafe fn le_mask_swapped(x: Self, top: u32) -> u32 {
        u32::from(x.0.swap_bytes() <= top)
    }
    #[cfg(test)]
    unsafe fn to_vec(x: Self) -> Vec<u32> {
        vec![x.0]
    }
}
