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
/// code is inlined, with the f16 rounding of the scales done by F16C in place.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_rows(x: &[f32], acts: &mut super::acts::ActBlocks<'_>) {
    let blocks = x.len() / 32;
    assert!(
        acts.qs.len() >= blocks * 32 && acts.d.len() >= blocks && acts.gsum.len() >= 2 * blocks
    );
    for b in 0..blocks {
        let (d, low, high) = quantize_block(&x[b * 32..], &mut acts.qs[b * 32..]);
        let scaled = [f16_round(d), f16_round(d * (low + high) as f32)];
        acts.set_block(b, low, high, scaled);
    }
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
    let p = src.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for x in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let round = |x: __m256| {
        _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(x, id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    };
    let (i0, i1, i2, i3) = (round(v[0]), round(v[1]), round(v[2]), round(v[3]));
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
    (d, _mm_cvtsi128_si32(s4), _mm_extract_epi32::<1>(s4))
}
