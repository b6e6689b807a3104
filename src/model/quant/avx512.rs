//! AVX-512 VNNI versions of the dot products: two 32-element blocks fill one zmm register, and
//! one `vpdpbusd` multiplies their 64 unsigned weight bytes by 64 signed activation bytes and
//! sums each four into a 32-bit lane (no 16-bit saturation step, unlike `vpmaddubsw`). A
//! permute broadcasts each block's combined scale to its eight lanes for one FMA. Runs of
//! fewer than eight blocks (the end of a row) go to the AVX2 kernel.

use std::arch::x86_64::*;

use half::f16;

use super::avx2;
use super::kernels::ActRow;

/// Whether this CPU runs these kernels (and the 256-bit ones they hand tails to).
pub fn available() -> bool {
    avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Lanes 0..8 take element `2j` of a vector of block scales, lanes 8..16 element `2j + 1`.
#[inline(always)]
unsafe fn pair_index(j: i32) -> __m512i {
    let (a, b) = (2 * j, 2 * j + 1);
    _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
}

/// Lanes `4i..4i + 4` take element `4j + i` of a vector of 16-element group scales.
#[inline(always)]
unsafe fn quad_index(j: i32) -> __m512i {
    let g = 4 * j;
    _mm512_setr_epi32(
        g,
        g,
        g,
        g,
        g + 1,
        g + 1,
        g + 1,
        g + 1,
        g + 2,
        g + 2,
        g + 2,
        g + 2,
        g + 3,
        g + 3,
        g + 3,
        g + 3,
    )
}

/// Blocks `b` and `b + 1` of a [`super::Q4Matrix`] row (16 packed bytes each, at `p`) as 64
/// weight bytes: b's low nibbles (elements 0..16), b's high nibbles (16..32), then b+1's.
#[inline(always)]
unsafe fn q4_pair(p: *const u8) -> __m512i {
    let raw = _mm512_zextsi256_si512(_mm256_loadu_si256(p as *const __m256i));
    let spread = _mm512_shuffle_i64x2::<0x50>(raw, raw);
    _mm512_and_si512(
        _mm512_mask_blend_epi64(0xCC, spread, _mm512_srli_epi16::<4>(spread)),
        _mm512_set1_epi8(0x0F),
    )
}

/// Blocks `b` and `b + 1` of a [`super::Q8Matrix`] row (at `p`): the signed weights, their
/// magnitudes, and where they are negative. `vpdpbusd` wants unsigned weights, so the kernels
/// multiply |w| by x negated where w is negative (|x| ≤ 127: the negation never overflows).
#[inline(always)]
unsafe fn q8_pair(p: *const i8) -> (__m512i, __m512i, __mmask64) {
    let w = _mm512_loadu_si512(p as *const __m512i);
    (w, _mm512_abs_epi8(w), _mm512_movepi8_mask(w))
}

/// Elements `c` and `c + 1` of `v` as f32, by the F16C instruction (`half`'s conversion
/// checks the CPU on every call).
#[inline(always)]
unsafe fn f16_pair(v: &[f16], c: usize) -> (f32, f32) {
    let pair = [v[c].to_bits(), v[c + 1].to_bits(), 0, 0, 0, 0, 0, 0];
    let f = _mm_cvtph_ps(_mm_loadu_si128(pair.as_ptr() as *const __m128i));
    let mut out = [0.0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), f);
    (out[0], out[1])
}

/// Activation rows `first..first + 4` from block `c` on, for the AVX2 kernel (which takes
/// four at most).
fn rows_from<'a>(a: &[ActRow<'a>; 8], first: usize, c: usize) -> [ActRow<'a>; 4] {
    std::array::from_fn(|g| ActRow {
        qs: a[first + g].qs.get(c * 32..).unwrap_or(&[]),
        d: a[first + g].d.get(c..).unwrap_or(&[]),
        dsum: a[first + g].dsum.get(c..).unwrap_or(&[]),
    })
}

/// Dots of one [`super::Q4Matrix`] row with `group` (1..=8) activation rows: eight tokens
/// share each unpacked weight pair and each block's scales (prompts, batched decode).
///
/// # Safety
/// The CPU must have what [`available`] checks; the slices must come from one row and
/// matching acts.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4_dots(
    qs: &[u8],
    scale: &[f16],
    min: &[f16],
    a: &[ActRow<'_>; 8],
    group: usize,
    sums: &mut [f32; 8],
) {
    match group {
        1 => q4_dots_n::<1>(qs, scale, min, a, sums),
        2 => q4_dots_n::<2>(qs, scale, min, a, sums),
        3 => q4_dots_n::<3>(qs, scale, min, a, sums),
        4 => q4_dots_n::<4>(qs, scale, min, a, sums),
        5 => q4_dots_n::<5>(qs, scale, min, a, sums),
        6 => q4_dots_n::<6>(qs, scale, min, a, sums),
        7 => q4_dots_n::<7>(qs, scale, min, a, sums),
        _ => q4_dots_n::<8>(qs, scale, min, a, sums),
    }
}

#[inline(always)]
unsafe fn q4_dots_n<const G: usize>(
    qs: &[u8],
    scale: &[f16],
    min: &[f16],
    a: &[ActRow<'_>; 8],
    sums: &mut [f32; 8],
) {
    let nb = scale.len();
    assert!(
        qs.len() >= nb * 16
            && min.len() >= nb
            && a.iter()
                .take(G)
                .all(|r| r.qs.len() >= nb * 32 && r.d.len() >= nb && r.dsum.len() >= nb)
    );
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); G];
    let mut min_acc = [_mm256_setzero_ps(); G];
    let mut c = 0;
    while c + 8 <= nb {
        let ws = _mm256_cvtph_ps(_mm_loadu_si128(scale.as_ptr().add(c) as *const __m128i));
        let wm = _mm256_cvtph_ps(_mm_loadu_si128(min.as_ptr().add(c) as *const __m128i));
        let mut comb = [_mm512_setzero_ps(); G];
        for g in 0..G {
            let d = _mm256_loadu_ps(a[g].d.as_ptr().add(c));
            comb[g] = _mm512_castps256_ps512(_mm256_mul_ps(ws, d));
            let dsum = _mm256_loadu_ps(a[g].dsum.as_ptr().add(c));
            min_acc[g] = _mm256_fmadd_ps(wm, dsum, min_acc[g]);
        }
        for j in 0..4 {
            let b = c + 2 * j;
            let w = q4_pair(qs.as_ptr().add(b * 16));
            let idx = pair_index(j as i32);
            for g in 0..G {
                let x = _mm512_loadu_si512(a[g].qs.as_ptr().add(b * 32) as *const __m512i);
                let dot = _mm512_dpbusd_epi32(zero, w, x);
                let s = _mm512_permutexvar_ps(idx, comb[g]);
                acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[g]);
            }
        }
        c += 8;
    }
    // Pairs left (a row of 18 blocks, k = 576, has one after two runs of eight): scales
    // one pair at a time.
    let mut tail = [0.0f32; 8];
    while c + 2 <= nb {
        let w = q4_pair(qs.as_ptr().add(c * 16));
        let (s0, s1) = (f16_pair(scale, c), f16_pair(min, c));
        let ((s0, s1), (m0, m1)) = ((s0.0, s0.1), (s1.0, s1.1));
        for g in 0..G {
            let x = _mm512_loadu_si512(a[g].qs.as_ptr().add(c * 32) as *const __m512i);
            let dot = _mm512_dpbusd_epi32(zero, w, x);
            let s = _mm512_mask_blend_ps(
                0xFF00,
                _mm512_set1_ps(s0 * a[g].d[c]),
                _mm512_set1_ps(s1 * a[g].d[c + 1]),
            );
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[g]);
            tail[g] += m0 * a[g].dsum[c] + m1 * a[g].dsum[c + 1];
        }
        c += 2;
    }
    if c < nb {
        // The last, odd block: four tokens at a time by the AVX2 kernel.
        for first in (0..G).step_by(4) {
            let mut last = [0.0f32; 4];
            let n = (G - first).min(4);
            avx2::q4_dots_with::<avx2::Maddubs>(
                &qs[c * 16..],
                &scale[c..],
                &min[c..],
                &rows_from(a, first, c),
                n,
                &mut last,
            );
            for g in 0..n {
                tail[first + g] += last[g];
            }
        }
    }
    for g in 0..G {
        sums[g] = _mm512_reduce_add_ps(acc[g]) + avx2::hsum(min_acc[g]) + tail[g];
    }
}

/// Dots of one [`super::Q8Matrix`] row with `group` (1..=8) activation rows.
///
/// # Safety
/// As [`q4_dots`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q8_dots(
    qs: &[i8],
    scale: &[f16],
    a: &[ActRow<'_>; 8],
    group: usize,
    sums: &mut [f32; 8],
) {
    match group {
        1 => q8_dots_n::<1>(qs, scale, a, sums),
        2 => q8_dots_n::<2>(qs, scale, a, sums),
        3 => q8_dots_n::<3>(qs, scale, a, sums),
        4 => q8_dots_n::<4>(qs, scale, a, sums),
        5 => q8_dots_n::<5>(qs, scale, a, sums),
        6 => q8_dots_n::<6>(qs, scale, a, sums),
        7 => q8_dots_n::<7>(qs, scale, a, sums),
        _ => q8_dots_n::<8>(qs, scale, a, sums),
    }
}

#[inline(always)]
unsafe fn q8_dots_n<const G: usize>(
    qs: &[i8],
    scale: &[f16],
    a: &[ActRow<'_>; 8],
    sums: &mut [f32; 8],
) {
    let nb = scale.len() / 2;
    assert!(
        qs.len() >= nb * 32
            && a.iter()
                .take(G)
                .all(|r| r.qs.len() >= nb * 32 && r.d.len() >= nb)
    );
    let zero = _mm512_setzero_si512();
    // Each block's activation scale twice, once for each of its two 16-element groups.
    let pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let mut acc = [_mm512_setzero_ps(); G];
    let mut c = 0;
    while c + 8 <= nb {
        let ws = _mm512_cvtph_ps(_mm256_loadu_si256(
            scale.as_ptr().add(2 * c) as *const __m256i
        ));
        let mut comb = [_mm512_setzero_ps(); G];
        for g in 0..G {
            let d = _mm512_castps256_ps512(_mm256_loadu_ps(a[g].d.as_ptr().add(c)));
            comb[g] = _mm512_mul_ps(ws, _mm512_permutexvar_ps(pairs, d));
        }
        for j in 0..4 {
            let b = c + 2 * j;
            let (_, wabs, negative) = q8_pair(qs.as_ptr().add(b * 32));
            let idx = quad_index(j as i32);
            for g in 0..G {
                let x = _mm512_loadu_si512(a[g].qs.as_ptr().add(b * 32) as *const __m512i);
                let xs = _mm512_mask_sub_epi8(x, negative, zero, x);
                let dot = _mm512_dpbusd_epi32(zero, wabs, xs);
                let s = _mm512_permutexvar_ps(idx, comb[g]);
                acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[g]);
            }
        }
        c += 8;
    }
    // Pairs left, one at a time: their four group scales spread to four lanes each.
    while c + 2 <= nb {
        let (_, wabs, negative) = q8_pair(qs.as_ptr().add(c * 32));
        let ws = _mm_cvtph_ps(_mm_loadl_epi64(scale.as_ptr().add(2 * c) as *const __m128i));
        for g in 0..G {
            let (d0, d1) = (a[g].d[c], a[g].d[c + 1]);
            let comb = _mm_mul_ps(ws, _mm_setr_ps(d0, d0, d1, d1));
            let s = _mm512_permutexvar_ps(quad_index(0), _mm512_castps128_ps512(comb));
            let x = _mm512_loadu_si512(a[g].qs.as_ptr().add(c * 32) as *const __m512i);
            let xs = _mm512_mask_sub_epi8(x, negative, zero, x);
            let dot = _mm512_dpbusd_epi32(zero, wabs, xs);
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[g]);
        }
        c += 2;
    }
    let mut tail = [0.0f32; 8];
    if c < nb {
        for first in (0..G).step_by(4) {
            let mut last = [0.0f32; 4];
            let n = (G - first).min(4);
            avx2::q8_dots_with::<avx2::Maddubs>(
                &qs[c * 32..],
                &scale[2 * c..],
                &rows_from(a, first, c),
                n,
                &mut last,
            );
            tail[first..first + n].copy_from_slice(&last[..n]);
        }
    }
    for g in 0..G {
        sums[g] = _mm512_reduce_add_ps(acc[g]) + tail[g];
    }
}

/// One token against four [`super::Q4Matrix`] rows (decode): the activation bytes are loaded
/// once for the four, and four independent accumulators keep the FMA latency hidden, where
/// one row at a time waits on its single accumulator chain.
///
/// # Safety
/// As [`q4_dots`]; every row must have the same even number of blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4_rows4(rows: [(&[u8], &[f16], &[f16]); 4], a: ActRow<'_>, out: &mut [f32; 4]) {
    let nb = rows[0].1.len();
    assert!(
        nb % 2 == 0
            && a.qs.len() >= nb * 32
            && a.d.len() >= nb
            && a.dsum.len() >= nb
            && rows
                .iter()
                .all(|(q, s, m)| q.len() >= nb * 16 && s.len() >= nb && m.len() >= nb)
    );
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut min_acc = [_mm256_setzero_ps(); 4];
    let runs = nb / 8 * 8;
    for c in (0..runs).step_by(8) {
        let d = _mm256_loadu_ps(a.d.as_ptr().add(c));
        let dsum = _mm256_loadu_ps(a.dsum.as_ptr().add(c));
        let mut comb = [_mm512_setzero_ps(); 4];
        for (i, (_, scale, min)) in rows.iter().enumerate() {
            let ws = _mm256_cvtph_ps(_mm_loadu_si128(scale.as_ptr().add(c) as *const __m128i));
            let wm = _mm256_cvtph_ps(_mm_loadu_si128(min.as_ptr().add(c) as *const __m128i));
            comb[i] = _mm512_castps256_ps512(_mm256_mul_ps(ws, d));
            min_acc[i] = _mm256_fmadd_ps(wm, dsum, min_acc[i]);
        }
        for j in 0..4 {
            let b = c + 2 * j;
            let x = _mm512_loadu_si512(a.qs.as_ptr().add(b * 32) as *const __m512i);
            let idx = pair_index(j as i32);
            for (i, (qs, _, _)) in rows.iter().enumerate() {
                let dot = _mm512_dpbusd_epi32(zero, q4_pair(qs.as_ptr().add(b * 16)), x);
                let s = _mm512_permutexvar_ps(idx, comb[i]);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i]);
            }
        }
    }
    let mut tail = [0.0f32; 4];
    for c in (runs..nb).step_by(2) {
        let x = _mm512_loadu_si512(a.qs.as_ptr().add(c * 32) as *const __m512i);
        let (d0, d1) = (a.d[c], a.d[c + 1]);
        for (i, (qs, scale, min)) in rows.iter().enumerate() {
            let dot = _mm512_dpbusd_epi32(zero, q4_pair(qs.as_ptr().add(c * 16)), x);
            let ((s0, s1), (m0, m1)) = (f16_pair(scale, c), f16_pair(min, c));
            let s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0 * d0), _mm512_set1_ps(s1 * d1));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i]);
            tail[i] += m0 * a.dsum[c] + m1 * a.dsum[c + 1];
        }
    }
    for i in 0..4 {
        out[i] = _mm512_reduce_add_ps(acc[i]) + avx2::hsum(min_acc[i]) + tail[i];
    }
}

/// [`q4_rows4`] for [`super::Q8Matrix`] rows (without their optional `min`, which the caller
/// adds).
///
/// # Safety
/// As [`q4_rows4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q8_rows4(rows: [(&[i8], &[f16]); 4], a: ActRow<'_>, out: &mut [f32; 4]) {
    let nb = rows[0].1.len() / 2;
    assert!(
        nb % 2 == 0
            && a.qs.len() >= nb * 32
            && a.d.len() >= nb
            && rows
                .iter()
                .all(|(q, s)| q.len() >= nb * 32 && s.len() >= 2 * nb)
    );
    let zero = _mm512_setzero_si512();
    let pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let mut acc = [_mm512_setzero_ps(); 4];
    let runs = nb / 8 * 8;
    for c in (0..runs).step_by(8) {
        let d = _mm512_castps256_ps512(_mm256_loadu_ps(a.d.as_ptr().add(c)));
        let dd = _mm512_permutexvar_ps(pairs, d);
        let mut comb = [_mm512_setzero_ps(); 4];
        for (i, (_, scale)) in rows.iter().enumerate() {
            let ws = _mm512_cvtph_ps(_mm256_loadu_si256(
                scale.as_ptr().add(2 * c) as *const __m256i
            ));
            comb[i] = _mm512_mul_ps(ws, dd);
        }
        for j in 0..4 {
            let b = c + 2 * j;
            let x = _mm512_loadu_si512(a.qs.as_ptr().add(b * 32) as *const __m512i);
            let idx = quad_index(j as i32);
            for (i, (qs, _)) in rows.iter().enumerate() {
                let (_, wabs, negative) = q8_pair(qs.as_ptr().add(b * 32));
                let xs = _mm512_mask_sub_epi8(x, negative, zero, x);
                let dot = _mm512_dpbusd_epi32(zero, wabs, xs);
                let s = _mm512_permutexvar_ps(idx, comb[i]);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i]);
            }
        }
    }
    for c in (runs..nb).step_by(2) {
        let x = _mm512_loadu_si512(a.qs.as_ptr().add(c * 32) as *const __m512i);
        let (d0, d1) = (a.d[c], a.d[c + 1]);
        let dd = _mm_setr_ps(d0, d0, d1, d1);
        for (i, (qs, scale)) in rows.iter().enumerate() {
            let (_, wabs, negative) = q8_pair(qs.as_ptr().add(c * 32));
            let ws = _mm_cvtph_ps(_mm_loadl_epi64(scale.as_ptr().add(2 * c) as *const __m128i));
            let comb = _mm512_castps128_ps512(_mm_mul_ps(ws, dd));
            let s = _mm512_permutexvar_ps(quad_index(0), comb);
            let xs = _mm512_mask_sub_epi8(x, negative, zero, x);
            let dot = _mm512_dpbusd_epi32(zero, wabs, xs);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i]);
        }
    }
    for i in 0..4 {
        out[i] = _mm512_reduce_add_ps(acc[i]);
    }
}
