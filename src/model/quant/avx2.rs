//! AVX2/FMA versions of the kernels in `kernels.rs`, after llama.cpp's technique: 32 weights
//! and 32 activations meet in one `vpmaddubsw` (unsigned × signed bytes → 16-bit pairs), one
//! `vpmaddwd` widens to eight 32-bit sums, and one FMA applies the block's two scales. A
//! weight block is unpacked once and used for up to four tokens.

use std::arch::x86_64::*;

use super::kernels::ActRow;

/// Whether this CPU runs the AVX2/FMA kernels (the result is cached by `std`).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `Σ a[i]·b[i]`, eight at a time.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
        i += 8;
    }
    let mut sum = hsum(acc);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// Quantizes 32 floats to bytes (`d = max|x| / 127`, round half to even); returns `d`, `Σq`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `src` and `dst` must hold 32 elements.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    debug_assert!(src.len() >= 32 && dst.len() >= 32);
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
    let sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let s4 = _mm_hadd_epi32(s4, s4);
    let s4 = _mm_hadd_epi32(s4, s4);
    // Packing works within 128-bit lanes; the permute puts the 32 bytes back in order.
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, packed);
    (d, _mm_cvtsi128_si32(s4))
}

/// Dots of one [`super::Q4Matrix`] row with `group` (1..=4) activation rows.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the slices must come from one row and matching acts.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q4_dots(
    qs: &[u8],
    scale: &[f32],
    min: &[f32],
    a: &[ActRow<'_>; 4],
    group: usize,
    sums: &mut [f32; 4],
) {
    match group {
        1 => q4_dots_n::<1>(qs, scale, min, a, sums),
        2 => q4_dots_n::<2>(qs, scale, min, a, sums),
        3 => q4_dots_n::<3>(qs, scale, min, a, sums),
        _ => q4_dots_n::<4>(qs, scale, min, a, sums),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4_dots_n<const G: usize>(
    qs: &[u8],
    scale: &[f32],
    min: &[f32],
    a: &[ActRow<'_>; 4],
    sums: &mut [f32; 4],
) {
    let nb = scale.len();
    debug_assert!(qs.len() >= nb * 16 && a.iter().take(G).all(|r| r.qs.len() >= nb * 32));
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); G];
    for b in 0..nb {
        let raw = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
        // Low nibbles are elements 0..16, high nibbles 16..32: one 128-bit lane each.
        let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
        let ws = *scale.get_unchecked(b);
        for g in 0..G {
            let x = _mm256_loadu_si256(a[g].qs.as_ptr().add(b * 32) as *const __m256i);
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
            let s = _mm256_set1_ps(ws * *a[g].d.get_unchecked(b));
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[g]);
        }
    }
    for g in 0..G {
        sums[g] = hsum(acc[g]) + dot_f32(min, a[g].dsum);
    }
}

/// Dots of one [`super::Q8Matrix`] row with `group` (1..=4) activation rows.
///
/// # Safety
/// As [`q4_dots`].
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q8_dots(
    qs: &[i8],
    scale: &[f32],
    a: &[ActRow<'_>; 4],
    group: usize,
    sums: &mut [f32; 4],
) {
    match group {
        1 => q8_dots_n::<1>(qs, scale, a, sums),
        2 => q8_dots_n::<2>(qs, scale, a, sums),
        3 => q8_dots_n::<3>(qs, scale, a, sums),
        _ => q8_dots_n::<4>(qs, scale, a, sums),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q8_dots_n<const G: usize>(
    qs: &[i8],
    scale: &[f32],
    a: &[ActRow<'_>; 4],
    sums: &mut [f32; 4],
) {
    let nb = scale.len() / 2;
    debug_assert!(qs.len() >= nb * 32 && a.iter().take(G).all(|r| r.qs.len() >= nb * 32));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); G];
    for b in 0..nb {
        let w = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
        // vpmaddubsw wants its first operand unsigned: |w| against x carrying w's sign.
        let wabs = _mm256_sign_epi8(w, w);
        // Lanes 0..4 of the 32-bit sums cover group 2b, lanes 4..8 group 2b + 1.
        let ws = _mm256_set_m128(
            _mm_set1_ps(*scale.get_unchecked(2 * b + 1)),
            _mm_set1_ps(*scale.get_unchecked(2 * b)),
        );
        for g in 0..G {
            let x = _mm256_loadu_si256(a[g].qs.as_ptr().add(b * 32) as *const __m256i);
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w)), ones);
            let s = _mm256_mul_ps(ws, _mm256_set1_ps(*a[g].d.get_unchecked(b)));
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[g]);
        }
    }
    for g in 0..G {
        sums[g] = hsum(acc[g]);
    }
}
