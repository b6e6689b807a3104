//! The tiled kernels on [`Panels`] with 256-bit registers (AVX-VNNI, or AVX2 where the CPU
//! has no VNNI): a ymm holds eight rows, half a panel, so a tile is `H` half-panels × `T`
//! tokens within the 16 registers. The steps are those of `panel_avx512`: per 32-element
//! block, each weight chunk is loaded once for the tile's tokens, each token's four bytes
//! are broadcast, and the block's integer sums are scaled once per eight rows.
//!
//! Without VNNI the byte products go through `vpmaddubsw` (unsigned × signed bytes into
//! 16-bit pairs) and `vpmaddwd`. That pair must not saturate: 4-bit weights are below 16,
//! but the 8-bit ones, stored as `q + 128`, are turned back into signed bytes and multiplied
//! as `|q|` by `x` carrying q's sign (≤ 2·128·127 < 2¹⁵), as llama.cpp does. The 4-bit pairs
//! (|·| ≤ 2·15·128 = 3840) are added as 16-bit lanes through a whole block, eight of them
//! (≤ 30,720 < 2¹⁵), and widened once: 17 instructions a block and token where widening each
//! took 24.

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::panel::{PanelFormat, Panels, TokenActs, ROWS};

/// Rows in one 256-bit register.
const HALF: usize = ROWS / 2;
/// 4-bit dots one partial sum takes: a block's four chunks, low and high nibbles (fixed by the
/// block layout, not a tuning knob).
const Q4_PARTS: usize = 8;
// The 16-bit lanes of AVX2's partial sums hold `Q4_PARTS` pairs of 15 · (−128..=127).
const _: () = assert!(Q4_PARTS * 2 * 15 * 128 <= i16::MAX as usize);
/// Most tokens in one prompt tile: 4 integer and 4 float accumulators of one half-panel.
const TILE_TOKENS: usize = 4;

/// How four unsigned weight bytes meet four signed activation bytes in each 32-bit lane.
pub trait PanelDot {
    /// The 8-bit weights as the dot takes them (from `q + 128`).
    type W8: Copy;
    /// Whether [`Self::dot8`] sums `(q + 128)·x`, so that `128·Σx` must be taken off.
    const OFFSET: bool;
    /// `acc + Σ w·x` for 4-bit weights, in the dot's own partial form: at most
    /// [`Q4_PARTS`] of them (one block) from zero, then [`Self::finish4`].
    unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i) -> __m256i;
    /// The 32-bit sums of a partial 4-bit dot.
    unsafe fn finish4(acc: __m256i) -> __m256i;
    unsafe fn prep8(stored: __m256i) -> Self::W8;
    unsafe fn dot8(acc: __m256i, w: Self::W8, x: __m256i) -> __m256i;
}

/// AVX-VNNI: `vpdpbusd`; 8-bit weights go in as stored and the offset is taken off.
pub struct Vnni;
impl PanelDot for Vnni {
    type W8 = __m256i;
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    }
    #[inline(always)]
    unsafe fn finish4(acc: __m256i) -> __m256i {
        acc
    }
    #[inline(always)]
    unsafe fn prep8(stored: __m256i) -> __m256i {
        stored
    }
    #[inline(always)]
    unsafe fn dot8(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    }
}

/// AVX2: `vpmaddubsw` + `vpmaddwd`; 8-bit weights as `|q|` and the sign moved onto `x`.
pub struct Maddubs;
impl PanelDot for Maddubs {
    /// `(|q|, q)`.
    type W8 = (__m256i, __m256i);
    const OFFSET: bool = false;
    /// Sixteen 16-bit sums, each of pairs.
    #[inline(always)]
    unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x))
    }
    #[inline(always)]
    unsafe fn finish4(acc: __m256i) -> __m256i {
        _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
    }
    #[inline(always)]
    unsafe fn prep8(stored: __m256i) -> (__m256i, __m256i) {
        let q = _mm256_xor_si256(stored, _mm256_set1_epi8(-128));
        (_mm256_abs_epi8(q), q)
    }
    #[inline(always)]
    unsafe fn dot8(acc: __m256i, (abs, q): (__m256i, __m256i), x: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(abs, _mm256_sign_epi8(x, q));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// [`tiles_with`] with AVX-VNNI.
///
/// # Safety
/// The CPU must have AVX-VNNI, AVX2, FMA and F16C; as [`tiles_with`].
#[target_feature(enable = "avxvnni,avx2,fma,f16c")]
pub unsafe fn tiles_vnni(
    w: &Panels,
    panels: Range<usize>,
    tokens: &[TokenActs],
    store: impl FnMut(usize, usize, &[f32; ROWS]),
) {
    tiles_with::<Vnni>(w, panels, tokens, store)
}

/// [`tiles_with`] with AVX2.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; as [`tiles_with`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tiles_avx2(
    w: &Panels,
    panels: Range<usize>,
    tokens: &[TokenActs],
    store: impl FnMut(usize, usize, &[f32; ROWS]),
) {
    tiles_with::<Maddubs>(w, panels, tokens, store)
}

/// Every tile of `panels` × `tokens`, panels outer (as in `panel_avx512::tiles`), each
/// panel's 16 sums per token handed to `store(panel, token, sums)`.
///
/// # Safety
/// Inlined into a caller with the features `D` needs; `tokens` point into activations of
/// `w.k` per token.
#[inline(always)]
unsafe fn tiles_with<D: PanelDot>(
    w: &Panels,
    panels: Range<usize>,
    tokens: &[TokenActs],
    mut store: impl FnMut(usize, usize, &[f32; ROWS]),
) {
    let mut sums = [[0.0f32; ROWS]; TILE_TOKENS];
    if tokens.len() == 1 {
        // Decode: both halves of two panels, four independent chains.
        let a = [tokens[0]; TILE_TOKENS];
        let mut p = panels.start;
        while p + 2 <= panels.end {
            half_tiles::<D, 4, 1>(
                w,
                [2 * p, 2 * p + 1, 2 * p + 2, 2 * p + 3],
                &a,
                |h, _, v| {
                    let (panel, half) = (h / 2, h % 2);
                    sums[panel - p][HALF * half..HALF * (half + 1)].copy_from_slice(v);
                },
            );
            store(p, 0, &sums[0]);
            store(p + 1, 0, &sums[1]);
            p += 2;
        }
        if p < panels.end {
            half_tiles::<D, 2, 1>(w, [2 * p, 2 * p + 1], &a, |h, _, v| {
                sums[0][HALF * (h % 2)..HALF * (h % 2 + 1)].copy_from_slice(v);
            });
            store(p, 0, &sums[0]);
        }
        return;
    }
    for p in panels {
        for (g, group) in tokens.chunks(TILE_TOKENS).enumerate() {
            let a: [TokenActs; TILE_TOKENS] =
                std::array::from_fn(|i| group[i.min(group.len() - 1)]);
            for half in 0..2 {
                let mut put = |_: usize, t: usize, v: &[f32; HALF]| {
                    sums[t][HALF * half..HALF * (half + 1)].copy_from_slice(v);
                };
                let h = [2 * p + half];
                match group.len() {
                    1 => half_tiles::<D, 1, 1>(w, h, &a, &mut put),
                    2 => half_tiles::<D, 1, 2>(w, h, &a, &mut put),
                    3 => half_tiles::<D, 1, 3>(w, h, &a, &mut put),
                    _ => half_tiles::<D, 1, 4>(w, h, &a, &mut put),
                }
            }
            for (t, s) in sums.iter().take(group.len()).enumerate() {
                store(p, g * TILE_TOKENS + t, s);
            }
        }
    }
}

/// Half-panels `halves` (half `h` is rows `8h..8h + 8`: panel `h / 2`, half `h % 2`)
/// against tokens `0..T`, each one's eight sums per token handed to `put(h, t, sums)`.
#[inline(always)]
unsafe fn half_tiles<D: PanelDot, const H: usize, const T: usize>(
    w: &Panels,
    halves: [usize; H],
    a: &[TokenActs; TILE_TOKENS],
    mut put: impl FnMut(usize, usize, &[f32; HALF]),
) {
    let acc = match w.format {
        PanelFormat::Q4 => q4_tile::<D, H, T>(w, halves, a),
        PanelFormat::Q8 => q8_tile::<D, H, T>(w, halves, a),
    };
    let mut v = [0.0f32; HALF];
    for (i, row) in acc.iter().enumerate() {
        for (t, sums) in row.iter().enumerate() {
            _mm256_storeu_ps(v.as_mut_ptr(), *sums);
            put(halves[i], t, &v);
        }
    }
}

/// Four activation bytes of a token, broadcast to all eight lanes.
#[inline(always)]
unsafe fn quad(x: *const i8) -> __m256i {
    _mm256_set1_epi32((x as *const i32).read_unaligned())
}

#[inline(always)]
unsafe fn scales8(s: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(s as *const __m128i))
}

/// How far ahead 4-bit weights are fetched.
pub(super) const Q4_AHEAD: usize = 1024;
/// How far ahead 8-bit weights are fetched: a byte of them feeds half the arithmetic of a
/// 4-bit byte (with AVX-512, 64 bytes are one `vpdpbusd` a token against two), so the same
/// time ahead is more bytes. Chosen by measurement over 75 MB of 8-bit panels: 4 KB ahead
/// was 13–17% faster than 1 KB at 8 and 16 tokens, the same at one.
pub(super) const Q8_AHEAD: usize = 4096;

/// Asks for the weights `AHEAD` bytes ahead of `at` (the rest of this panel, then the next
/// one, which follows it in memory): the hardware prefetcher alone left the loads waiting.
/// Shared with `panel_avx512`.
#[inline(always)]
pub(super) unsafe fn prefetch_ahead<const AHEAD: usize>(at: *const u8) {
    // A prefetch never faults, so it may point past the matrix's end.
    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(AHEAD) as *const i8);
}

/// The weight bytes, scales and mins of half-panel `h`, from its panel's.
#[inline(always)]
fn half_panel(w: &Panels, h: usize) -> (&[u8], &[f16], &[f16]) {
    w.panel(h / 2)
}

#[inline(always)]
unsafe fn q4_tile<D: PanelDot, const H: usize, const T: usize>(
    w: &Panels,
    halves: [usize; H],
    a: &[TokenActs; TILE_TOKENS],
) -> [[__m256; T]; H] {
    let nb = w.blocks();
    let parts: [(&[u8], &[f16], &[f16]); H] = std::array::from_fn(|i| half_panel(w, halves[i]));
    assert!(parts
        .iter()
        .all(|(q, s, m)| q.len() == nb * 256 && s.len() == nb * ROWS && m.len() == nb * ROWS));
    let offset: [usize; H] = std::array::from_fn(|i| HALF * (halves[i] % 2));
    let nibble = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); T]; H];
    for b in 0..nb {
        // `Q4_PARTS` dots into each partial sum, then `finish4`.
        let mut dot = [[_mm256_setzero_si256(); T]; H];
        for c in 0..Q4_PARTS / 2 {
            for i in 0..H {
                let at = parts[i].0.as_ptr().add(b * 256 + 64 * c + 4 * offset[i]);
                prefetch_ahead::<Q4_AHEAD>(at);
                let raw = _mm256_loadu_si256(at as *const __m256i);
                let lo = _mm256_and_si256(raw, nibble);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
                for t in 0..T {
                    let x = a[t].qs.add(32 * b + 8 * c);
                    dot[i][t] = D::dot4(dot[i][t], lo, quad(x));
                    dot[i][t] = D::dot4(dot[i][t], hi, quad(x.add(4)));
                }
            }
        }
        for i in 0..H {
            let scale = scales8(parts[i].1.as_ptr().add(b * ROWS + offset[i]));
            let min = scales8(parts[i].2.as_ptr().add(b * ROWS + offset[i]));
            for t in 0..T {
                let sd = _mm256_mul_ps(scale, _mm256_set1_ps(*a[t].d.add(b)));
                let idot = D::finish4(dot[i][t]);
                acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), sd, acc[i][t]);
                acc[i][t] = _mm256_fmadd_ps(min, _mm256_set1_ps(*a[t].dsum.add(b)), acc[i][t]);
            }
        }
    }
    acc
}

#[inline(always)]
unsafe fn q8_tile<D: PanelDot, const H: usize, const T: usize>(
    w: &Panels,
    halves: [usize; H],
    a: &[TokenActs; TILE_TOKENS],
) -> [[__m256; T]; H] {
    let nb = w.blocks();
    let has_min = w.has_min();
    let parts: [(&[u8], &[f16], &[f16]); H] = std::array::from_fn(|i| half_panel(w, halves[i]));
    assert!(parts.iter().all(|(q, s, m)| q.len() == nb * 512
        && s.len() == nb * 2 * ROWS
        && (!has_min || m.len() == nb * ROWS)));
    let offset: [usize; H] = std::array::from_fn(|i| HALF * (halves[i] % 2));
    let mut acc = [[_mm256_setzero_ps(); T]; H];
    for b in 0..nb {
        for g in 0..2 {
            let mut dot = [[_mm256_setzero_si256(); T]; H];
            for q in 4 * g..4 * g + 4 {
                for i in 0..H {
                    let at = parts[i].0.as_ptr().add(b * 512 + 64 * q + 4 * offset[i]);
                    prefetch_ahead::<Q8_AHEAD>(at);
                    let wq = D::prep8(_mm256_loadu_si256(at as *const __m256i));
                    for t in 0..T {
                        dot[i][t] = D::dot8(dot[i][t], wq, quad(a[t].qs.add(32 * b + 4 * q)));
                    }
                }
            }
            for i in 0..H {
                let scale = scales8(parts[i].1.as_ptr().add((2 * b + g) * ROWS + offset[i]));
                for t in 0..T {
                    let mut idot = dot[i][t];
                    if D::OFFSET {
                        // Stored as q + 128: take 128·Σx off.
                        let offset = _mm256_set1_epi32(*a[t].gsum.add(2 * b + g) << 7);
                        idot = _mm256_sub_epi32(idot, offset);
                    }
                    let sd = _mm256_mul_ps(scale, _mm256_set1_ps(*a[t].d.add(b)));
                    acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot), sd, acc[i][t]);
                }
            }
        }
        if has_min {
            for i in 0..H {
                let min = scales8(parts[i].2.as_ptr().add(b * ROWS + offset[i]));
                for t in 0..T {
                    acc[i][t] = _mm256_fmadd_ps(min, _mm256_set1_ps(*a[t].dsum.add(b)), acc[i][t]);
                }
            }
        }
    }
    acc
}
