//! [`Lanes16`] in registers: one zmm (AVX-512) or two ymm (AVX2/FMA). The `exp` is the
//! steps of [`super::attend::exp_lanes`], lane-parallel.

use std::arch::x86_64::*;

use super::attend::{Lanes16, EXP_POLY, EXP_ROUND, LN2_HI, LN2_LO};
use super::BLOCK_TOKENS;

#[derive(Clone, Copy)]
pub(super) struct Avx512(__m512);

impl Lanes16 for Avx512 {
    const FMA: bool = true;
    const REGISTERS: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (every method): only compiled into `run_avx512`, whose caller checked
        // AVX-512F and FMA; loads and stores go through 16-element arrays.
        unsafe { Avx512(_mm512_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { Avx512(_mm512_set1_ps(x)) }
    }
    #[inline(always)]
    unsafe fn load(x: &[f32; BLOCK_TOKENS]) -> Self {
        unsafe { Avx512(_mm512_loadu_ps(x.as_ptr())) }
    }
    #[inline(always)]
    unsafe fn load_f16(x: &[u16; BLOCK_TOKENS]) -> Self {
        unsafe {
            Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(
                x.as_ptr() as *const __m256i
            )))
        }
    }
    #[inline(always)]
    unsafe fn store(self, to: &mut [f32; BLOCK_TOKENS]) {
        unsafe { _mm512_storeu_ps(to.as_mut_ptr(), self.0) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { Avx512(_mm512_add_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { Avx512(_mm512_sub_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        unsafe { Avx512(_mm512_max_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { Avx512(_mm512_mul_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        unsafe { Avx512(_mm512_div_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { Avx512(_mm512_fmadd_ps(self.0, b.0, c.0)) }
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        unsafe {
            // NaN stays NaN (maxps returns its second operand where either is NaN).
            let c = _mm512_min_ps(
                _mm512_set1_ps(88.0),
                _mm512_max_ps(_mm512_set1_ps(-87.0), self.0),
            );
            let round = _mm512_set1_ps(EXP_ROUND);
            let shifted = _mm512_fmadd_ps(c, _mm512_set1_ps(std::f32::consts::LOG2_E), round);
            let n = _mm512_sub_ps(shifted, round);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), c);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(EXP_POLY[0]);
            for coef in &EXP_POLY[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*coef));
            }
            let e = _mm512_sub_epi32(
                _mm512_castps_si512(shifted),
                _mm512_set1_epi32(EXP_ROUND.to_bits() as i32 - 127),
            );
            Avx512(_mm512_mul_ps(
                p,
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e)),
            ))
        }
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        unsafe { _mm512_reduce_max_ps(self.0) }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        unsafe { _mm512_reduce_add_ps(self.0) }
    }
}

#[derive(Clone, Copy)]
pub(super) struct Avx2(__m256, __m256);

impl Lanes16 for Avx2 {
    const FMA: bool = true;
    const REGISTERS: usize = 2;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { Avx2(_mm256_setzero_ps(), _mm256_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { Avx2(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
    }
    #[inline(always)]
    unsafe fn load(x: &[f32; BLOCK_TOKENS]) -> Self {
        unsafe {
            Avx2(
                _mm256_loadu_ps(x.as_ptr()),
                _mm256_loadu_ps(x.as_ptr().add(8)),
            )
        }
    }
    #[inline(always)]
    unsafe fn load_f16(x: &[u16; BLOCK_TOKENS]) -> Self {
        unsafe {
            let p = x.as_ptr() as *const __m128i;
            Avx2(
                _mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
            )
        }
    }
    #[inline(always)]
    unsafe fn store(self, to: &mut [f32; BLOCK_TOKENS]) {
        unsafe {
            _mm256_storeu_ps(to.as_mut_ptr(), self.0);
            _mm256_storeu_ps(to.as_mut_ptr().add(8), self.1);
        }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { Avx2(_mm256_add_ps(self.0, b.0), _mm256_add_ps(self.1, b.1)) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { Avx2(_mm256_sub_ps(self.0, b.0), _mm256_sub_ps(self.1, b.1)) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        unsafe { Avx2(_mm256_max_ps(self.0, b.0), _mm256_max_ps(self.1, b.1)) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { Avx2(_mm256_mul_ps(self.0, b.0), _mm256_mul_ps(self.1, b.1)) }
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        unsafe { Avx2(_mm256_div_ps(self.0, b.0), _mm256_div_ps(self.1, b.1)) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe {
            Avx2(
                _mm256_fmadd_ps(self.0, b.0, c.0),
                _mm256_fmadd_ps(self.1, b.1, c.1),
            )
        }
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        // SAFETY: as above.
        unsafe { Avx2(exp8(self.0), exp8(self.1)) }
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        unsafe {
            let m = _mm256_max_ps(self.0, self.1);
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
        }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        unsafe {
            let m = _mm256_add_ps(self.0, self.1);
            let m = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)))
        }
    }
}

#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // NaN stays NaN (maxps returns its second operand where either is NaN).
    let c = _mm256_min_ps(
        _mm256_set1_ps(88.0),
        _mm256_max_ps(_mm256_set1_ps(-87.0), x),
    );
    let round = _mm256_set1_ps(EXP_ROUND);
    let shifted = _mm256_fmadd_ps(c, _mm256_set1_ps(std::f32::consts::LOG2_E), round);
    let n = _mm256_sub_ps(shifted, round);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), c);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for coef in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*coef));
    }
    let e = _mm256_sub_epi32(
        _mm256_castps_si256(shifted),
        _mm256_set1_epi32(EXP_ROUND.to_bits() as i32 - 127),
    );
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
}

/// `exp` of `x` on each register path this CPU has (tests).
#[cfg(test)]
pub(super) fn exps(x: &[f32; BLOCK_TOKENS]) -> Vec<[f32; BLOCK_TOKENS]> {
    use super::attend::AttnPath;
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn on_avx512(x: &[f32; BLOCK_TOKENS]) -> [f32; BLOCK_TOKENS] {
        let mut out = [0.0; BLOCK_TOKENS];
        Avx512::load(x).exp().store(&mut out);
        out
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn on_avx2(x: &[f32; BLOCK_TOKENS]) -> [f32; BLOCK_TOKENS] {
        let mut out = [0.0; BLOCK_TOKENS];
        Avx2::load(x).exp().store(&mut out);
        out
    }
    let mut outs = Vec::new();
    if AttnPath::Avx512.available() {
        // SAFETY: checked just above.
        outs.push(unsafe { on_avx512(x) });
    }
    if AttnPath::Avx2.available() {
        // SAFETY: checked just above.
        outs.push(unsafe { on_avx2(x) });
    }
    outs
}
