//! The inner loop of paged attention: the query heads that share one KV head, over one
//! sequence's blocks, with an online softmax (one pass, rescaled when a block raises the
//! maximum).
//!
//! Keys and values are f16 in the pool, widened to f32 as they are loaded. Keys are stored
//! transposed in each block (`[dim][slot]`), so a block's 16 scores are
//! computed side by side: for each dimension, one broadcast of the query's value times the
//! 16 slots' values, with no horizontal sum per key. The 16 weights then go through one
//! vectorized `exp` (our own polynomial: the library's `expf` is a call per score), and the
//! values (`[slot][dim]`) are added in rows. The code is plain fixed-width loops, compiled
//! three times: for AVX-512 (16 lanes, one register a block), for AVX2/FMA (two), and
//! portable.

use super::{KvPool, SeqBlocks, BLOCK_TOKENS};

/// The query heads of one KV head at one position: positions `start..n` of `seq`.
pub(super) struct Job<'a> {
    pub pool: &'a KvPool,
    pub layer: usize,
    pub seq: &'a SeqBlocks,
    pub start: usize,
    pub n: usize,
    pub kv_head: usize,
    /// `queries` heads' rows of `head_dim`, one after the other.
    pub q: &'a [f32],
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// Which compilation of the kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnPath {
    Avx512,
    Avx2,
    Portable,
}

impl AttnPath {
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            AttnPath::Avx512 => is_x86_feature_detected!("avx512f") && AttnPath::Avx2.available(),
            AttnPath::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            AttnPath::Portable => true,
        };
        #[cfg(not(target_arch = "x86_64"))]
        return self == AttnPath::Portable;
    }

    /// The path that goes with the int8 kernels' instruction set (so that `--cpu-isa avx2`
    /// shows an AVX2-only CPU's whole forward pass).
    pub fn for_isa(isa: crate::model::quant::Isa) -> AttnPath {
        use crate::model::quant::Isa;
        let path = match isa {
            Isa::Avx512Vnni => AttnPath::Avx512,
            Isa::AvxVnni | Isa::Avx2 => AttnPath::Avx2,
            Isa::Portable => AttnPath::Portable,
        };
        if path.available() {
            path
        } else {
            AttnPath::Portable
        }
    }
}

/// Runs `job` for `queries` heads (1..=8) into `out` (`queries × head_dim`).
pub(super) fn run(path: AttnPath, job: &Job<'_>, queries: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match path {
        // SAFETY (both): `available` checked the CPU's features when the path was chosen.
        AttnPath::Avx512 => return unsafe { run_avx512(job, queries, out) },
        AttnPath::Avx2 => return unsafe { run_avx2(job, queries, out) },
        AttnPath::Portable => {}
    }
    let _ = path;
    // SAFETY: the portable lanes are plain arrays.
    unsafe { dispatch::<Portable>(job, queries, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_avx512(job: &Job<'_>, queries: usize, out: &mut [f32]) {
    dispatch::<super::attend_x86::Avx512>(job, queries, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(job: &Job<'_>, queries: usize, out: &mut [f32]) {
    dispatch::<super::attend_x86::Avx2>(job, queries, out)
}

/// # Safety
/// The CPU must have the features `L` needs (its caller's `#[target_feature]`).
#[inline(always)]
unsafe fn dispatch<L: Lanes16>(job: &Job<'_>, queries: usize, out: &mut [f32]) {
    assert!((1..=8).contains(&queries), "{queries} query heads a task");
    match queries {
        1 => attend::<L, 1>(job, out),
        2 => attend::<L, 2>(job, out),
        3 => attend::<L, 3>(job, out),
        4 => attend::<L, 4>(job, out),
        5 => attend::<L, 5>(job, out),
        6 => attend::<L, 6>(job, out),
        7 => attend::<L, 7>(job, out),
        _ => attend::<L, 8>(job, out),
    }
}

/// Sixteen f32 lanes (one block's slots): one zmm register, two ymm, or an array. Every
/// method is `#[inline(always)]`, so that it compiles into its caller's target features.
/// The methods are `unsafe`: the register types need the CPU features that their callers'
/// `#[target_feature]` functions were checked for.
pub(super) trait Lanes16: Copy {
    /// Whether `f32::mul_add` is an instruction here (elsewhere it is a library call).
    const FMA: bool;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(x: &[f32; BLOCK_TOKENS]) -> Self;
    /// 16 f16 values (as their bits), widened.
    unsafe fn load_f16(x: &[u16; BLOCK_TOKENS]) -> Self;
    unsafe fn store(self, to: &mut [f32; BLOCK_TOKENS]);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn div(self, b: Self) -> Self;
    /// `self·b + c`.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// `eˣ` lane by lane (see [`exp_lanes`]).
    unsafe fn exp(self) -> Self;
    /// The largest lane.
    unsafe fn hmax(self) -> f32;
    /// The sum of the lanes.
    unsafe fn hsum(self) -> f32;
}

/// The plain-code lanes.
#[derive(Clone, Copy)]
pub(super) struct Portable([f32; BLOCK_TOKENS]);

impl Lanes16 for Portable {
    const FMA: bool = false;
    unsafe fn zero() -> Self {
        Portable([0.0; BLOCK_TOKENS])
    }
    unsafe fn splat(x: f32) -> Self {
        Portable([x; BLOCK_TOKENS])
    }
    unsafe fn load(x: &[f32; BLOCK_TOKENS]) -> Self {
        Portable(*x)
    }
    unsafe fn load_f16(x: &[u16; BLOCK_TOKENS]) -> Self {
        Portable(x.map(|h| half::f16::from_bits(h).to_f32()))
    }
    unsafe fn store(self, to: &mut [f32; BLOCK_TOKENS]) {
        *to = self.0;
    }
    unsafe fn add(self, b: Self) -> Self {
        Portable(std::array::from_fn(|j| self.0[j] + b.0[j]))
    }
    unsafe fn mul(self, b: Self) -> Self {
        Portable(std::array::from_fn(|j| self.0[j] * b.0[j]))
    }
    unsafe fn div(self, b: Self) -> Self {
        Portable(std::array::from_fn(|j| self.0[j] / b.0[j]))
    }
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|j| self.0[j] * b.0[j] + c.0[j]))
    }
    unsafe fn exp(mut self) -> Self {
        exp_lanes::<false>(&mut self.0);
        self
    }
    unsafe fn hmax(self) -> f32 {
        self.0
            .iter()
            .fold(f32::NEG_INFINITY, |m, x| if *x > m { *x } else { m })
    }
    unsafe fn hsum(self) -> f32 {
        self.0.iter().sum()
    }
}

/// `out = silu(gate) · up` element by element (SwiGLU, `silu(g) = g / (1 + e^−g)`), with
/// the vector `exp` of the attention kernel: candle's `silu` calls the library's `expf` per
/// element, and its narrow and multiply copy the halves around.
pub fn silu_mul(path: AttnPath, gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match path {
        // SAFETY (both): `available` checked the CPU's features when the path was chosen.
        AttnPath::Avx512 => return unsafe { silu_mul_avx512(gate, up, out) },
        AttnPath::Avx2 => return unsafe { silu_mul_avx2(gate, up, out) },
        AttnPath::Portable => {}
    }
    let _ = path;
    // SAFETY: the portable lanes are plain arrays.
    unsafe { silu_mul_on::<Portable>(gate, up, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_on::<super::attend_x86::Avx512>(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_on::<super::attend_x86::Avx2>(gate, up, out)
}

/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn silu_mul_on<L: Lanes16>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    const B: usize = BLOCK_TOKENS;
    let (g16, g_tail) = gate.as_chunks::<B>();
    let (u16, u_tail) = up.as_chunks::<B>();
    let (o16, o_tail) = out.as_chunks_mut::<B>();
    for ((g, u), o) in g16.iter().zip(u16).zip(o16.iter_mut()) {
        let g = L::load(g);
        let denominator = g.mul(L::splat(-1.0)).exp().add(L::splat(1.0));
        g.div(denominator).mul(L::load(u)).store(o);
    }
    for ((g, u), o) in g_tail.iter().zip(u_tail).zip(o_tail.iter_mut()) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `Q` query heads against the blocks of `job`: softmax-weighted sums of the values.
///
/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn attend<L: Lanes16, const Q: usize>(job: &Job<'_>, out: &mut [f32]) {
    const B: usize = BLOCK_TOKENS;
    let Job {
        pool,
        layer,
        seq,
        start: first,
        n,
        kv_head,
        q,
        scale,
        softcap,
    } = *job;
    let d = out.len() / Q;
    let (keys, values) = pool.layer(layer);
    let qs: [&[f32]; Q] = std::array::from_fn(|qi| &q[qi * d..(qi + 1) * d]);
    let mut max = [f32::NEG_INFINITY; Q];
    let mut sum = [0.0f32; Q];
    out.fill(0.0);
    for (bi, &block) in seq.blocks.iter().enumerate().skip(first / B) {
        let start = bi * B;
        if start >= n {
            break;
        }
        let count = (n - start).min(B);
        // Positions before the window's start (in its first block) weigh nothing.
        let skip = first.saturating_sub(start);
        let base = pool.at(block, kv_head, 0);
        let rows = as_rows(&keys[base..base + d * B]);
        let v = &values[base..base + B * d];
        // Scores: two partial sums (even and odd dimensions) per query, for two chains.
        let mut s0 = [L::zero(); Q];
        let mut s1 = [L::zero(); Q];
        let mut pairs = rows.chunks_exact(2);
        for (dim, pair) in (&mut pairs).enumerate() {
            let (k0, k1) = (L::load_f16(&pair[0]), L::load_f16(&pair[1]));
            for qi in 0..Q {
                s0[qi] = L::splat(qs[qi][2 * dim]).mul_add(k0, s0[qi]);
                s1[qi] = L::splat(qs[qi][2 * dim + 1]).mul_add(k1, s1[qi]);
            }
        }
        if let [k0] = pairs.remainder() {
            for qi in 0..Q {
                s0[qi] = L::splat(qs[qi][d - 1]).mul_add(L::load_f16(k0), s0[qi]);
            }
        }
        let partial = skip > 0 || count < B;
        for qi in 0..Q {
            let mut p = [0.0f32; B];
            let mut scores = s0[qi].add(s1[qi]).mul(L::splat(scale));
            if softcap.is_some() || partial {
                scores.store(&mut p);
                if let Some(c) = softcap {
                    p.iter_mut().for_each(|x| *x = c * (*x / c).tanh());
                }
                for (j, x) in p.iter_mut().enumerate() {
                    if j < skip || j >= count {
                        *x = f32::NEG_INFINITY;
                    }
                }
                scores = L::load(&p);
            }
            let block_max = scores.hmax();
            let o = &mut out[qi * d..(qi + 1) * d];
            if block_max > max[qi] {
                // exp(-inf) is 0: the first block rescales an empty sum.
                let correction = (max[qi] - block_max).exp();
                sum[qi] *= correction;
                o.iter_mut().for_each(|x| *x *= correction);
                max[qi] = block_max;
            }
            let weights = scores.add(L::splat(-max[qi])).exp();
            weights.store(&mut p);
            if partial {
                for (j, x) in p.iter_mut().enumerate() {
                    if j < skip || j >= count {
                        *x = 0.0;
                    }
                }
                sum[qi] += L::load(&p).hsum();
            } else {
                sum[qi] += weights.hsum();
            }
            // The values, 16 dimensions a register: each output chunk is loaded and stored
            // once per block, not once per position.
            // Four chunks (64 dimensions) at a time make four independent chains.
            let (chunks, tail) = o.as_chunks_mut::<B>();
            let (quads, single) = chunks.as_chunks_mut::<4>();
            for (c4, quad) in quads.iter_mut().enumerate() {
                let mut acc: [L; 4] = std::array::from_fn(|i| L::load(&quad[i]));
                for j in skip..count {
                    let w = L::splat(p[j]);
                    let row = as_rows(&v[j * d + c4 * 4 * B..][..4 * B]);
                    for i in 0..4 {
                        acc[i] = w.mul_add(L::load_f16(&row[i]), acc[i]);
                    }
                }
                for i in 0..4 {
                    acc[i].store(&mut quad[i]);
                }
            }
            let first = quads.len() * 4;
            for (c, chunk) in single.iter_mut().enumerate() {
                let mut acc = L::load(chunk);
                for j in skip..count {
                    let row = as_rows(&v[j * d + (first + c) * B..][..B]);
                    acc = L::splat(p[j]).mul_add(L::load_f16(&row[0]), acc);
                }
                acc.store(chunk);
            }
            let done = d - tail.len();
            for j in skip..count {
                for (o, x) in tail.iter_mut().zip(&v[j * d + done..(j + 1) * d]) {
                    let x = half::f16::from_bits(*x).to_f32();
                    *o = if L::FMA {
                        p[j].mul_add(x, *o)
                    } else {
                        *o + p[j] * x
                    };
                }
            }
        }
    }
    for qi in 0..Q {
        // Every query sees at least itself, so the sum is positive; a zero guard keeps a
        // malformed window from turning into NaN.
        let inv = if sum[qi] > 0.0 { 1.0 / sum[qi] } else { 0.0 };
        out[qi * d..(qi + 1) * d].iter_mut().for_each(|o| *o *= inv);
    }
}

/// A block's transposed keys as rows of 16 (one per dimension).
#[inline(always)]
fn as_rows(kt: &[u16]) -> &[[u16; BLOCK_TOKENS]] {
    let (rows, rest) = kt.as_chunks::<BLOCK_TOKENS>();
    debug_assert!(rest.is_empty());
    rows
}

/// 1.5·2²³: adding it rounds an f32 to an integer, which lands in the low mantissa bits.
pub(super) const EXP_ROUND: f32 = 12_582_912.0;
pub(super) const LN2_HI: f32 = 0.693_145_75;
pub(super) const LN2_LO: f32 = 1.428_606_8e-6;
/// `e^r` on `|r| ≤ ln2/2`, highest power first (Taylor to degree 6, relative error ~1e−7).
pub(super) const EXP_POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `eˣ` of 16 values, for x clamped to [−87, 88] (−∞ and anything below −87 give about
/// 1e−38, which attention zeroes where it masks; SwiGLU's `e^−g` may be large): `2ⁿ·e^r` with `n = round(x·log₂e)`, `|r| ≤ ln2/2`, and
/// [`EXP_POLY`] for `e^r`. The vector lanes compute the same steps.
#[inline(always)]
pub(super) fn exp_lanes<const FMA: bool>(x: &mut [f32; BLOCK_TOKENS]) {
    let fma = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    for v in x.iter_mut() {
        let c = v.clamp(-87.0, 88.0);
        let shifted = c * std::f32::consts::LOG2_E + EXP_ROUND;
        let n = shifted - EXP_ROUND;
        let r = fma(-n, LN2_LO, fma(-n, LN2_HI, c));
        let mut p = EXP_POLY[0];
        for coef in &EXP_POLY[1..] {
            p = fma(p, r, *coef);
        }
        let e = (shifted.to_bits() as i32).wrapping_sub(EXP_ROUND.to_bits() as i32);
        *v = p * f32::from_bits(((e + 127) << 23) as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vector_exp_matches_the_library_exp_on_every_path() {
        let xs: Vec<f32> = (0..16 * 200)
            .map(|i| -(i as f32) * 0.0271 - 1e-3 * (i % 7) as f32)
            .chain([0.0, -0.5, -1e-9, -86.9, -87.5, -200.0, f32::NEG_INFINITY])
            .chain([1e-9, 0.5, 1.0, 10.0, 50.0, 87.9])
            .collect();
        for chunk in xs.chunks(16) {
            let mut a = [0.0f32; 16];
            a[..chunk.len()].copy_from_slice(chunk);
            let mut outs = vec![a, a];
            exp_lanes::<true>(&mut outs[0]);
            exp_lanes::<false>(&mut outs[1]);
            #[cfg(target_arch = "x86_64")]
            outs.extend(super::super::attend_x86::exps(&a));
            for (i, &x) in a.iter().enumerate() {
                let want = (x as f64).exp();
                for got in outs.iter().map(|o| o[i]) {
                    let err = (got as f64 - want).abs();
                    assert!(err <= 3e-7 * want + 1e-37, "exp({x}) = {got}, want {want}");
                }
            }
        }
    }
}
