//! What the kernels need of AVX2 besides the tiled products (`panel_avx2`): the CPU checks
//! (AVX2 with FMA and F16C; AVX-VNNI; AVX-512 VNNI) and the quantization of activations to
//! bytes, which every SIMD set shares.

use std::arch::x86_64::*;

/// Whether this CPU runs the AVX2/FMA kernels (the result is cached by `std`).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU has AVX-VNNI (the VEX `vpdpbusd` on 256 bits) besides AVX2.
pub fn vnni_available() -> bool {
    available() && is_x86_feature_detected!("avxvnni")
}

/// Whether this CPU has the 512-bit `vpdpbusd` (AVX-512 F, BW and VNNI) besides AVX2.
pub fn avx512_vnni_available() -> bool {
    available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Quantizes every block of `x` into `acts` (sized for it): one call, so that the block
/// code is inlined, with the f16 rounding of the scales done by F16C in place. Blocks go
/// eight at a time where they can, so that their maxima, scales and sums are reduced,
/// divided and rounded as vectors: one block at a time, its two scalar divisions and the
/// horizontal steps made this quantization 3% of a 16-stream profile.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_rows(x: &[f32], acts: &mut super::acts::ActBlocks<'_>) {
    let blocks = x.len() / 32;
    assert!(
        acts.qs.len() >= blocks * 32
            && acts.d.len() >= blocks
            && acts.dsum.len() >= blocks
            && acts.gsum.len() >= 2 * blocks
    );
    let mut b = 0;
    while b + 8 <= blocks {
        quantize_eight(&x[b * 32..(b + 8) * 32], b, acts);
        b += 8;
    }
    for b in b..blocks {
        let (d, low, high) = quantize_block(&x[b * 32..], &mut acts.qs[b * 32..]);
        let scaled = [f16_round(d), f16_round(d * (low + high) as f32)];
        acts.set_block(b, low, high, scaled);
    }
}

/// Blocks `b0..b0 + 8` of `acts` from the 256 values of `x`, exactly as [`quantize_block`]
/// and [`f16_round`] do them one at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_eight(x: &[f32], b0: usize, acts: &mut super::acts::ActBlocks<'_>) {
    assert!(x.len() == 256 && acts.qs.len() >= (b0 + 8) * 32 && acts.d.len() >= b0 + 8);
    let p = x.as_ptr();
    let m: [__m256; 8] = std::array::from_fn(|j| abs_max_lanes(p.add(32 * j)));
    // Lane j: the largest |x| of block j (the maximum of exact values, in any order).
    let amax = max_of_each(m);
    let d = _mm256_div_ps(amax, _mm256_set1_ps(127.0));
    // 1/d where d > 0, else 0 (the division's infinity masked off).
    let id = _mm256_and_ps(
        _mm256_div_ps(_mm256_set1_ps(1.0), d),
        _mm256_cmp_ps::<_CMP_GT_OQ>(d, _mm256_setzero_ps()),
    );
    let mut sums = [0i32; 8];
    for (j, sum) in sums.iter_mut().enumerate() {
        let idj = _mm256_permutevar8x32_ps(id, _mm256_set1_epi32(j as i32));
        let b = b0 + j;
        let (low, high) = quantize_with(p.add(32 * j), idj, &mut acts.qs[b * 32..b * 32 + 32]);
        acts.gsum[2 * b] = low;
        acts.gsum[2 * b + 1] = high;
        *sum = low + high;
    }
    let round16 = |v: __m256| _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
    let dsum = _mm256_mul_ps(
        d,
        _mm256_cvtepi32_ps(_mm256_loadu_si256(sums.as_ptr() as *const __m256i)),
    );
    _mm256_storeu_ps(acts.d[b0..b0 + 8].as_mut_ptr(), round16(d));
    _mm256_storeu_ps(acts.dsum[b0..b0 + 8].as_mut_ptr(), round16(dsum));
}

/// The lane-wise maximum of |x| over a block's 32 values (8 lanes, 4 values each).
#[inline(always)]
unsafe fn abs_max_lanes(p: *const f32) -> __m256 {
    let sign = _mm256_set1_ps(-0.0);
    let abs = |i: usize| _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i)));
    let mut m = abs(0);
    for i in 1..4 {
        m = _mm256_max_ps(m, abs(i));
    }
    m
}

/// Lane j: the maximum of `m[j]`'s lanes (a transposing reduction).
#[inline(always)]
unsafe fn max_of_each(m: [__m256; 8]) -> __m256 {
    // Pairs: per 128-bit half, [a0∨a2, b0∨b2, a1∨a3, b1∨b3] of vectors a and b.
    let pair =
        |a: __m256, b: __m256| _mm256_max_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    let (p01, p23, p45, p67) = (
        pair(m[0], m[1]),
        pair(m[2], m[3]),
        pair(m[4], m[5]),
        pair(m[6], m[7]),
    );
    // Quads: per 128-bit half, the maximum of each of four vectors' four lanes there.
    let quad = |x: __m256, y: __m256| {
        _mm256_max_ps(
            _mm256_shuffle_ps::<0b01_00_01_00>(x, y),
            _mm256_shuffle_ps::<0b11_10_11_10>(x, y),
        )
    };
    let (q0, q1) = (quad(p01, p23), quad(p45, p67));
    // The two halves of each: vectors 0–3 in lanes 0–3, 4–7 in lanes 4–7.
    _mm256_max_ps(
        _mm256_permute2f128_ps::<0x20>(q0, q1),
        _mm256_permute2f128_ps::<0x31>(q0, q1),
    )
}

/// `v` rounded to the nearest f16 (ties to even), as `half::f16::from_f32(v).to_f32()`.
/// A function of its own, not a closure: a closure would not inherit the target features,
/// and the intrinsics would become calls.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_round(v: f32) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
        _mm_set_ss(v),
    )))
}

/// Quantizes 32 floats to bytes (`d = max|x| / 127`, round half to even); returns `d` and
/// `Σq` of the first and of the last 16.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `src` and `dst` must hold 32 elements.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32, i32) {
    // Checked in release too: an out-of-bounds load here would read or write past the slices.
    assert!(src.len() >= 32 && dst.len() >= 32);
    let m = abs_max_lanes(src.as_ptr());
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (low, high) = quantize_with(src.as_ptr(), id, &mut dst[..32]);
    (d, low, high)
}

/// Stores the 32 values at `p` times `id` (every lane), rounded half to even, as bytes in
/// `dst`; returns `Σq` of the first and of the last 16.
#[inline(always)]
unsafe fn quantize_with(p: *const f32, id: __m256, dst: &mut [i8]) -> (i32, i32) {
    assert!(dst.len() == 32);
    let round = |i: usize| {
        _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * i)), id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    };
    let (i0, i1, i2, i3) = (round(0), round(1), round(2), round(3));
    // Lanes 0..4 sum the first 16, lanes 4..8 the last 16.
    let (lo, hi) = (_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    let s = _mm256_hadd_epi32(lo, hi);
    let s = _mm256_hadd_epi32(s, s);
    // After the two hadds each 128-bit half holds [Σl, Σh, Σl, Σh] of its own lanes (the
    // low half of elements 0–3 and 8–11 of each 16, the high half the rest): their sum has
    // Σ of the first 16 in lane 0 and of the last 16 in lane 1.
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    // Packing works within 128-bit lanes; the permute puts the 32 bytes back in order.
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, packed);
    (_mm_cvtsi128_si32(s4), _mm_extract_epi32::<1>(s4))
}
