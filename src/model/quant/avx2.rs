//! AVX2/FMA versions of the kernels in `kernels.rs`, after llama.cpp's technique: 32 weights
//! and 32 activations meet in one `vpmaddubsw` (unsigned × signed bytes → 16-bit pairs), one
//! `vpmaddwd` widens to eight 32-bit sums, and one FMA applies the block's two scales. A
//! weight block is unpacked once and used for up to four tokens. With AVX-VNNI the two
//! integer steps are one `vpdpbusd` ([`ByteDot`]); the rest of the kernel is the same code.

use std::arch::x86_64::*;

use half::f16;

use super::kernels::ActRow;

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

/// Eight 32-bit sums, each of four products of unsigned weight bytes and signed activation
/// bytes. Both forms are exact here: a `vpmaddubsw` pair is at most 2·128·127 < 2¹⁵.
pub trait ByteDot {
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw` then `vpmaddwd` by ones.
pub struct Maddubs;
impl ByteDot for Maddubs {
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }
}

/// AVX-VNNI: one `vpdpbusd`.
pub struct VnniYmm;
impl ByteDot for VnniYmm {
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x)
    }
}

/// One f16 as f32, by the F16C instruction.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Quantizes 32 floats to bytes (`d = max|x| / 127`, round half to even); returns `d`, `Σq`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `src` and `dst` must hold 32 elements.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
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
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_dots(
    qs: &[u8],
    scale: &[f16],
    min: &[f16],
    a: &[ActRow<'_>; 4],
    group: usize,
    sums: &mut [f32; 4],
) {
    q4_dots_with::<Maddubs>(qs, scale, min, a, group, sums)
}

/// [`q4_dots`] with AVX-VNNI.
///
/// # Safety
/// As [`q4_dots`], and the CPU must have AVX-VNNI ([`vnni_available`]).
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn q4_dots_vnni(
    qs: &[u8],
    scale: &[f16],
    min: &[f16],
    a: &[ActRow<'_>; 4],
    group: usize,
    sums: &mut [f32; 4],
) {
    q4_dots_with::<VnniYmm>(qs, scale, min, a, group, sums)
}

/// The body of [`q4_dots`], inlined into a caller that has the features `D` needs.
#[inline(always)]
pub unsafe fn q4_dots_with<D: ByteDot>(
    qs: &[u8],
    scale: &[f16],
    min: &[f16],
    a: &[ActRow<'_>; 4],
    group: usize,
    sums: &mut [f32; 4],
) {
    match group {
        1 => q4_dots_n::<1, D>(qs, scale, min, a, sums),
        2 => q4_dots_n::<2, D>(qs, scale, min, a, sums),
        3 => q4_dots_n::<3, D>(qs, scale, min, a, sums),
        _ => q4_dots_n::<4, D>(qs, scale, min, a, sums),
    }
}

// Blocks are taken eight at a time so that their f16 scales are widened and multiplied by
// the activations' scales in one vector operation each, not one conversion per block.
#[inline(always)]
unsafe fn q4_dots_n<const G: usize, D: ByteDot>(
    qs: &[u8],
    scale: &[f16],
    min: &[f16],
    a: &[ActRow<'_>; 4],
    sums: &mut [f32; 4],
) {
    let nb = scale.len();
    assert!(qs.len() >= nb * 16 && a.iter().take(G).all(|r| r.qs.len() >= nb * 32));
    let low = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut min_acc = [_mm256_setzero_ps(); G];
    let mut tail = [0.0f32; G];
    let mut c = 0;
    while c < nb {
        let m = (nb - c).min(8);
        let mut combined = [[0.0f32; 8]; G];
        if m == 8 {
            let ws = _mm256_cvtph_ps(_mm_loadu_si128(scale.as_ptr().add(c) as *const __m128i));
            let wm = _mm256_cvtph_ps(_mm_loadu_si128(min.as_ptr().add(c) as *const __m128i));
            for g in 0..G {
                let d = _mm256_loadu_ps(a[g].d.as_ptr().add(c));
                _mm256_storeu_ps(combined[g].as_mut_ptr(), _mm256_mul_ps(ws, d));
                let dsum = _mm256_loadu_ps(a[g].dsum.as_ptr().add(c));
                min_acc[g] = _mm256_fmadd_ps(wm, dsum, min_acc[g]);
            }
        } else {
            for j in 0..m {
                for g in 0..G {
                    combined[g][j] = f16_to_f32(scale[c + j]) * a[g].d[c + j];
                    tail[g] += f16_to_f32(min[c + j]) * a[g].dsum[c + j];
                }
            }
        }
        for j in 0..m {
            let b = c + j;
            let raw = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
            // Low nibbles are elements 0..16, high nibbles 16..32: one 128-bit lane each.
            let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
            for g in 0..G {
                let x = _mm256_loadu_si256(a[g].qs.as_ptr().add(b * 32) as *const __m256i);
                let dot = D::dot(w, x);
                let s = _mm256_broadcast_ss(&combined[g][j]);
                acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[g]);
            }
        }
        c += m;
    }
    for g in 0..G {
        sums[g] = hsum(_mm256_add_ps(acc[g], min_acc[g])) + tail[g];
    }
}

/// Dots of one [`super::Q8Matrix`] row with `group` (1..=4) activation rows.
///
/// # Safety
/// As [`q4_dots`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_dots(
    qs: &[i8],
    scale: &[f16],
    a: &[ActRow<'_>; 4],
    group: usize,
    sums: &mut [f32; 4],
) {
    q8_dots_with::<Maddubs>(qs, scale, a, group, sums)
}

/// [`q8_dots`] with AVX-VNNI.
///
/// # Safety
/// As [`q4_dots_vnni`].
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn q8_dots_vnni(
    qs: &[i8],
    scale: &[f16],
    a: &[ActRow<'_>; 4],
    group: usize,
    sums: &mut [f32; 4],
) {
    q8_dots_with::<VnniYmm>(qs, scale, a, group, sums)
}

/// The body of [`q8_dots`], inlined into a caller that has the features `D` needs.
#[inline(always)]
pub unsafe fn q8_dots_with<D: ByteDot>(
    qs: &[i8],
    scale: &[f16],
    a: &[ActRow<'_>; 4],
    group: usize,
    sums: &mut [f32; 4],
) {
    match group {
        1 => q8_dots_n::<1, D>(qs, scale, a, sums),
        2 => q8_dots_n::<2, D>(qs, scale, a, sums),
        3 => q8_dots_n::<3, D>(qs, scale, a, sums),
        _ => q8_dots_n::<4, D>(qs, scale, a, sums),
    }
}

#[inline(always)]
unsafe fn q8_dots_n<const G: usize, D: ByteDot>(
    qs: &[i8],
    scale: &[f16],
    a: &[ActRow<'_>; 4],
    sums: &mut [f32; 4],
) {
    let nb = scale.len() / 2;
    assert!(qs.len() >= nb * 32 && a.iter().take(G).all(|r| r.qs.len() >= nb * 32));
    // Lanes 0..4 of a block's 32-bit sums cover its first group, lanes 4..8 its second.
    let halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let (pairs_lo, pairs_hi) = (
        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
    );
    let mut acc = [_mm256_setzero_ps(); G];
    let mut c = 0;
    while c < nb {
        let m = (nb - c).min(8);
        // Per group: its weight scale times the activation scale of its block.
        let mut combined = [[0.0f32; 16]; G];
        if m == 8 {
            let s = scale.as_ptr().add(2 * c);
            let ws_lo = _mm256_cvtph_ps(_mm_loadu_si128(s as *const __m128i));
            let ws_hi = _mm256_cvtph_ps(_mm_loadu_si128(s.add(8) as *const __m128i));
            for g in 0..G {
                let d = _mm256_loadu_ps(a[g].d.as_ptr().add(c));
                let (d_lo, d_hi) = (
                    _mm256_permutevar8x32_ps(d, pairs_lo),
                    _mm256_permutevar8x32_ps(d, pairs_hi),
                );
                _mm256_storeu_ps(combined[g].as_mut_ptr(), _mm256_mul_ps(ws_lo, d_lo));
                _mm256_storeu_ps(combined[g].as_mut_ptr().add(8), _mm256_mul_ps(ws_hi, d_hi));
            }
        } else {
            for j in 0..2 * m {
                for g in 0..G {
                    combined[g][j] = f16_to_f32(scale[2 * c + j]) * a[g].d[c + j / 2];
                }
            }
        }
        for j in 0..m {
            let b = c + j;
            let w = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            // vpmaddubsw wants its first operand unsigned: |w| against x carrying w's sign.
            let wabs = _mm256_sign_epi8(w, w);
            for g in 0..G {
                let x = _mm256_loadu_si256(a[g].qs.as_ptr().add(b * 32) as *const __m256i);
                let dot = D::dot(wabs, _mm256_sign_epi8(x, w));
                // Two f32 scales as one 8-byte lane: an f32 array is only 4-byte aligned, so
                // the pair is read unaligned (never through a `&f64`).
                let pair = _mm256_castpd_ps(_mm256_set1_pd(std::ptr::read_unaligned(
                    combined[g].as_ptr().add(2 * j) as *const f64,
                )));
                let s = _mm256_permutevar8x32_ps(pair, halves);
                acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[g]);
            }
        }
        c += m;
    }
    for g in 0..G {
        sums[g] = hsum(acc[g]);
    }
}

/// One token against four [`super::Q4Matrix`] rows (decode): the activation bytes are loaded
/// once for the four rows, and four independent accumulator chains hide the FMA latency that
/// one row at a time waits on.
///
/// # Safety
/// As [`q4_dots`]; the four rows must have the same number of blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_rows4(rows: [(&[u8], &[f16], &[f16]); 4], a: ActRow<'_>, out: &mut [f32; 4]) {
    q4_rows4_with::<Maddubs>(rows, a, out)
}

/// [`q4_rows4`] with AVX-VNNI.
///
/// # Safety
/// As [`q4_dots_vnni`].
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn q4_rows4_vnni(rows: [(&[u8], &[f16], &[f16]); 4], a: ActRow<'_>, out: &mut [f32; 4]) {
    q4_rows4_with::<VnniYmm>(rows, a, out)
}

#[inline(always)]
unsafe fn q4_rows4_with<D: ByteDot>(
    rows: [(&[u8], &[f16], &[f16]); 4],
    a: ActRow<'_>,
    out: &mut [f32; 4],
) {
    let nb = rows[0].1.len();
    assert!(
        a.qs.len() >= nb * 32
            && a.d.len() >= nb
            && a.dsum.len() >= nb
            && rows
                .iter()
                .all(|(q, s, m)| q.len() >= nb * 16 && s.len() >= nb && m.len() >= nb)
    );
    let low = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut min_acc = [_mm256_setzero_ps(); 4];
    let mut tail = [0.0f32; 4];
    let mut c = 0;
    while c < nb {
        let m = (nb - c).min(8);
        let mut combined = [[0.0f32; 8]; 4];
        if m == 8 {
            let d = _mm256_loadu_ps(a.d.as_ptr().add(c));
            let dsum = _mm256_loadu_ps(a.dsum.as_ptr().add(c));
            for (i, (_, scale, min)) in rows.iter().enumerate() {
                let ws = _mm256_cvtph_ps(_mm_loadu_si128(scale.as_ptr().add(c) as *const __m128i));
                let wm = _mm256_cvtph_ps(_mm_loadu_si128(min.as_ptr().add(c) as *const __m128i));
                _mm256_storeu_ps(combined[i].as_mut_ptr(), _mm256_mul_ps(ws, d));
                min_acc[i] = _mm256_fmadd_ps(wm, dsum, min_acc[i]);
            }
        } else {
            for (i, (_, scale, min)) in rows.iter().enumerate() {
                for j in 0..m {
                    combined[i][j] = f16_to_f32(scale[c + j]) * a.d[c + j];
                    tail[i] += f16_to_f32(min[c + j]) * a.dsum[c + j];
                }
            }
        }
        for j in 0..m {
            let b = c + j;
            let x = _mm256_loadu_si256(a.qs.as_ptr().add(b * 32) as *const __m256i);
            for (i, (qs, _, _)) in rows.iter().enumerate() {
                let raw = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
                let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
                let s = _mm256_broadcast_ss(&combined[i][j]);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(D::dot(w, x)), s, acc[i]);
            }
        }
        c += m;
    }
    for i in 0..4 {
        out[i] = hsum(_mm256_add_ps(acc[i], min_acc[i])) + tail[i];
    }
}

/// One token against four [`super::Q8Matrix`] rows, as [`q4_rows4`] (the optional `min` is
/// the caller's).
///
/// # Safety
/// As [`q4_rows4`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_rows4(rows: [(&[i8], &[f16]); 4], a: ActRow<'_>, out: &mut [f32; 4]) {
    q8_rows4_with::<Maddubs>(rows, a, out)
}

/// [`q8_rows4`] with AVX-VNNI.
///
/// # Safety
/// As [`q4_dots_vnni`].
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn q8_rows4_vnni(rows: [(&[i8], &[f16]); 4], a: ActRow<'_>, out: &mut [f32; 4]) {
    q8_rows4_with::<VnniYmm>(rows, a, out)
}

#[inline(always)]
unsafe fn q8_rows4_with<D: ByteDot>(rows: [(&[i8], &[f16]); 4], a: ActRow<'_>, out: &mut [f32; 4]) {
    let nb = rows[0].1.len() / 2;
    assert!(
        a.qs.len() >= nb * 32
            && a.d.len() >= nb
            && rows
                .iter()
                .all(|(q, s)| q.len() >= nb * 32 && s.len() >= 2 * nb)
    );
    // Lanes 0..4 of a block's 32-bit sums cover its first group, lanes 4..8 its second.
    let halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..nb {
        let x = _mm256_loadu_si256(a.qs.as_ptr().add(b * 32) as *const __m256i);
        let d = a.d[b];
        for (i, (qs, scale)) in rows.iter().enumerate() {
            let w = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            let dot = D::dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
            let pair = [
                f16_to_f32(scale[2 * b]) * d,
                f16_to_f32(scale[2 * b + 1]) * d,
            ];
            let s = _mm256_permutevar8x32_ps(
                _mm256_castpd_ps(_mm256_set1_pd(std::ptr::read_unaligned(
                    pair.as_ptr() as *const f64
                ))),
                halves,
            );
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[i]);
        }
    }
    for i in 0..4 {
        out[i] = hsum(acc[i]);
    }
}
