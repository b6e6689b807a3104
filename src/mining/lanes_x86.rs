//! The [`Lanes`] operations on x86-64: AVX-512 (16 nonces a vector; native rotates, and
//! `vpternlogd` for Ch, Maj and three-way XOR in one instruction each) and AVX2 (8 nonces;
//! rotates as two shifts and an OR). The entry points carry the `target_feature`s, so the
//! generic scanner is compiled for each instruction set with everything inlined into it.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::lanes::{self, Lanes, Prepared};
use super::sha256::{ScanJob, ScanOutcome, VersionsOutcome};

/// Byte order reversal within each 32-bit lane, for `vpshufb` (the same in every 128 bits).
const BSWAP: [i8; 16] = [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12];

#[derive(Clone, Copy)]
pub(super) struct Avx512(__m512i);

pub fn avx512_available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

impl Avx512 {
    #[inline(always)]
    unsafe fn xor3(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
        _mm512_ternarylogic_epi32::<0x96>(a, b, c)
    }
}

impl Lanes for Avx512 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn splat(x: u32) -> Self {
        Avx512(_mm512_set1_epi32(x as i32))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Avx512(_mm512_add_epi32(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn ch(e: Self, f: Self, g: Self) -> Self {
        // Truth table of `e ? f : g` over (e, f, g) as bits (7..0) of the immediate.
        Avx512(_mm512_ternarylogic_epi32::<0xCA>(e.0, f.0, g.0))
    }
    #[inline(always)]
    unsafe fn maj(a: Self, b: Self, c: Self) -> Self {
        Avx512(_mm512_ternarylogic_epi32::<0xE8>(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn big_sigma0(a: Self) -> Self {
        let x = a.0;
        Avx512(Self::xor3(
            _mm512_ror_epi32::<2>(x),
            _mm512_ror_epi32::<13>(x),
            _mm512_ror_epi32::<22>(x),
        ))
    }
    #[inline(always)]
    unsafe fn big_sigma1(e: Self) -> Self {
        let x = e.0;
        Avx512(Self::xor3(
            _mm512_ror_epi32::<6>(x),
            _mm512_ror_epi32::<11>(x),
            _mm512_ror_epi32::<25>(x),
        ))
    }
    #[inline(always)]
    unsafe fn small_sigma0(w: Self) -> Self {
        let x = w.0;
        Avx512(Self::xor3(
            _mm512_ror_epi32::<7>(x),
            _mm512_ror_epi32::<18>(x),
            _mm512_srli_epi32::<3>(x),
        ))
    }
    #[inline(always)]
    unsafe fn small_sigma1(w: Self) -> Self {
        let x = w.0;
        Avx512(Self::xor3(
            _mm512_ror_epi32::<17>(x),
            _mm512_ror_epi32::<19>(x),
            _mm512_srli_epi32::<10>(x),
        ))
    }
    #[inline(always)]
    unsafe fn nonce_words(base: u32) -> Self {
        let n = _mm512_add_epi32(
            _mm512_set1_epi32(base as i32),
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        );
        let mask = _mm512_broadcast_i32x4(_mm_loadu_si128(BSWAP.as_ptr() as *const __m128i));
        Avx512(_mm512_shuffle_epi8(n, mask))
    }
    #[inline(always)]
    unsafe fn le_mask_swapped(x: Self, top: u32) -> u32 {
        let mask = _mm512_broadcast_i32x4(_mm_loadu_si128(BSWAP.as_ptr() as *const __m128i));
        let v = _mm512_shuffle_epi8(x.0, mask);
        u32::from(_mm512_cmple_epu32_mask(v, _mm512_set1_epi32(top as i32)))
    }
    #[cfg(test)]
    unsafe fn to_vec(x: Self) -> Vec<u32> {
        std::mem::transmute::<__m512i, [u32; 16]>(x.0).to_vec()
    }
}

/// [`lanes::scan`] with AVX-512.
///
/// # Safety
/// The CPU must have AVX-512 F and BW ([`avx512_available`]).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn scan_avx512(p: &Prepared, job: &ScanJob<'_>) -> ScanOutcome {
    lanes::scan::<Avx512>(p, job)
}

/// [`lanes::scan_versions`] with AVX-512: `V` rolled versions of one header.
///
/// # Safety
/// The CPU must have AVX-512 F and BW ([`avx512_available`]).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn scan_avx512_versions<const V: usize>(
    ps: &[Prepared; V],
    mids: &[[u32; 8]; V],
    job: &ScanJob<'_>,
) -> VersionsOutcome {
    lanes::scan_versions::<Avx512, V>(ps, mids, job)
}

#[derive(Clone, Copy)]
pub(super) struct Avx2(__m256i);

pub fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
}

/// Rotate right by `$r` (`$l` = 32 − `$r`): AVX2 has no rotate instruction.
macro_rules! ror256 {
    ($x:expr, $r:literal, $l:literal) => {
        _mm256_or_si256(_mm256_srli_epi32::<$r>($x), _mm256_slli_epi32::<$l>($x))
    };
}

impl Avx2 {
    #[inline(always)]
    unsafe fn xor3(a: __m256i, b: __m256i, c: __m256i) -> __m256i {
        _mm256_xor_si256(_mm256_xor_si256(a, b), c)
    }
}

impl Lanes for Avx2 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn splat(x: u32) -> Self {
        Avx2(_mm256_set1_epi32(x as i32))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Avx2(_mm256_add_epi32(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn ch(e: Self, f: Self, g: Self) -> Self {
        // g ⊕ (e ∧ (f ⊕ g)): three operations, no NOT.
        Avx2(_mm256_xor_si256(
            g.0,
            _mm256_and_si256(e.0, _mm256_xor_si256(f.0, g.0)),
        ))
    }
    #[inline(always)]
    unsafe fn maj(a: Self, b: Self, c: Self) -> Self {
        // (a ∧ b) ∨ (c ∧ (a ∨ b))
        Avx2(_mm256_or_si256(
            _mm256_and_si256(a.0, b.0),
            _mm256_and_si256(c.0, _mm256_or_si256(a.0, b.0)),
        ))
    }
    #[inline(always)]
    unsafe fn big_sigma0(a: Self) -> Self {
        let x = a.0;
        Avx2(Self::xor3(
            ror256!(x, 2, 30),
            ror256!(x, 13, 19),
            ror256!(x, 22, 10),
        ))
    }
    #[inline(always)]
    unsafe fn big_sigma1(e: Self) -> Self {
        let x = e.0;
        Avx2(Self::xor3(
            ror256!(x, 6, 26),
            ror256!(x, 11, 21),
            ror256!(x, 25, 7),
        ))
    }
    #[inline(always)]
    unsafe fn small_sigma0(w: Self) -> Self {
        let x = w.0;
        Avx2(Self::xor3(
            ror256!(x, 7, 25),
            ror256!(x, 18, 14),
            _mm256_srli_epi32::<3>(x),
        ))
    }
    #[inline(always)]
    unsafe fn small_sigma1(w: Self) -> Self {
        let x = w.0;
        Avx2(Self::xor3(
            ror256!(x, 17, 15),
            ror256!(x, 19, 13),
            _mm256_srli_epi32::<10>(x),
        ))
    }
    #[inline(always)]
    unsafe fn nonce_words(base: u32) -> Self {
        let n = _mm256_add_epi32(
            _mm256_set1_epi32(base as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        let mask = _mm256_broadcastsi128_si256(_mm_loadu_si128(BSWAP.as_ptr() as *const __m128i));
        Avx2(_mm256_shuffle_epi8(n, mask))
    }
    #[inline(always)]
    unsafe fn le_mask_swapped(x: Self, top: u32) -> u32 {
        let mask = _mm256_broadcastsi128_si256(_mm_loadu_si128(BSWAP.as_ptr() as *const __m128i));
        let v = _mm256_shuffle_epi8(x.0, mask);
        // Unsigned v ≤ top exactly where min(v, top) = v.
        let le = _mm256_cmpeq_epi32(_mm256_min_epu32(v, _mm256_set1_epi32(top as i32)), v);
        _mm256_movemask_ps(_mm256_castsi256_ps(le)) as u32
    }
    #[cfg(test)]
    unsafe fn to_vec(x: Self) -> Vec<u32> {
        std::mem::transmute::<__m256i, [u32; 8]>(x.0).to_vec()
    }
}

/// [`lanes::scan`] with AVX2.
///
/// # Safety
/// The CPU must have AVX2 ([`avx2_available`]).
#[target_feature(enable = "avx2")]
pub unsafe fn scan_avx2(p: &Prepared, job: &ScanJob<'_>) -> ScanOutcome {
    lanes::scan::<Avx2>(p, job)
}

/// [`lanes::scan_versions`] with AVX2: `V` rolled versions of one header.
///
/// # Safety
/// The CPU must have AVX2 ([`avx2_available`]).
#[target_feature(enable = "avx2")]
pub unsafe fn scan_avx2_versions<const V: usize>(
    ps: &[Prepared; V],
    mids: &[[u32; 8]; V],
    job: &ScanJob<'_>,
) -> VersionsOutcome {
    lanes::scan_versions::<Avx2, V>(ps, mids, job)
}

/// `H7` of nonces `base..base + N` on each path, for tests.
#[cfg(test)]
pub(super) mod probe {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn h7_avx512(p: &Prepared, base: u32) -> Vec<u32> {
        Avx512::to_vec(lanes::hash_h7::<Avx512>(p, base))
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn h7_avx2(p: &Prepared, base: u32) -> Vec<u32> {
        Avx2::to_vec(lanes::hash_h7::<Avx2>(p, base))
    }
}
