//! The inner loop of paged attention: the query heads that share one KV head, over one
//! sequence's blocks, in three passes (every score, one softmax, then the values).
//!
//! Keys and values are f16 in the pool, widened to f32 as they are loaded. Keys are stored
//! transposed in each block (`[dim][slot]`), so a block's 16 scores are
//! computed side by side: for each dimension, one broadcast of the query's value times the
//! 16 slots' values, with no horizontal sum per key. The weights go through a vectorized
//! `exp` (our own polynomial: the library's `expf` is a call per score), and the values
//! (`[slot][dim]`) are added in rows, each row loaded once for all the query heads. The code is plain fixed-width loops, compiled
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
    /// Vector registers one value takes (the kernels size their tiles by it).
    const REGISTERS: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(x: &[f32; BLOCK_TOKENS]) -> Self;
    /// 16 f16 values (as their bits), widened.
    unsafe fn load_f16(x: &[u16; BLOCK_TOKENS]) -> Self;
    unsafe fn store(self, to: &mut [f32; BLOCK_TOKENS]);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    /// The larger of each pair of lanes (a NaN lane gives `b`'s).
    unsafe fn max(self, b: Self) -> Self;
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
    const REGISTERS: usize = 1;
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
    unsafe fn sub(self, b: Self) -> Self {
        Portable(std::array::from_fn(|j| self.0[j] - b.0[j]))
    }
    unsafe fn max(self, b: Self) -> Self {
        Portable(std::array::from_fn(|j| {
            if self.0[j] > b.0[j] {
                self.0[j]
            } else {
                b.0[j]
            }
        }))
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
/// Three passes over a job-sized buffer of scores rather than an online softmax: the scores
/// of every block, one maximum, `exp` and sum per query, then the values with every query's
/// accumulators in registers for the whole span, so that each value row is loaded and
/// widened once for all `Q` queries, and the outputs are stored once (an online softmax
/// rescales and reloads them every block).
///
/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn attend<L: Lanes16, const Q: usize>(job: &Job<'_>, out: &mut [f32]) {
    // Taken out of the thread's slot rather than borrowed in a closure: a closure would not
    // inherit the caller's target features, and the intrinsics would become calls.
    let mut buf = SCORES.take();
    let d = out.len() / Q;
    // Positions from the first block that the window reaches, padded to whole blocks.
    let span0 = job.start / BLOCK_TOKENS * BLOCK_TOKENS;
    let padded = (job.n - span0).next_multiple_of(BLOCK_TOKENS);
    // Every element is written by `scores` before it is read: no need to clear.
    buf.resize(Q * padded, 0.0);
    let (rows, _) = buf.as_chunks_mut::<BLOCK_TOKENS>();
    let per_query = padded / BLOCK_TOKENS;
    scores::<L, Q>(job, d, rows);
    let mut inv = [0.0f32; Q];
    for (qi, inv) in inv.iter_mut().enumerate() {
        let weights = &mut rows[qi * per_query..(qi + 1) * per_query];
        let sum = softmax_weights::<L>(weights, job.start - span0, job.n - span0);
        // Every query sees at least itself, so the sum is positive; a zero guard keeps a
        // malformed window from turning into NaN.
        *inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    }
    let weights: [&[[f32; BLOCK_TOKENS]]; Q] =
        std::array::from_fn(|qi| &rows[qi * per_query..(qi + 1) * per_query]);
    // Q heads × C chunks of accumulators, besides Q weights and C values, within the
    // registers: 32 zmm, or 16 ymm where a lane vector takes two.
    if L::REGISTERS > 1 {
        values::<L, Q, 1>(job, d, &weights, &inv, out);
    } else if Q <= 4 {
        values::<L, Q, 4>(job, d, &weights, &inv, out);
    } else {
        values::<L, Q, 2>(job, d, &weights, &inv, out);
    }
    SCORES.set(buf);
}

thread_local! {
    /// The scores (then weights) of the job a thread runs: `Q` rows of its padded span.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The scaled (and soft-capped) scores of every block of `job`, each query's blocks one row
/// of `out` after the other; positions outside `start..n` are −∞.
///
/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn scores<L: Lanes16, const Q: usize>(
    job: &Job<'_>,
    d: usize,
    out: &mut [[f32; BLOCK_TOKENS]],
) {
    const B: usize = BLOCK_TOKENS;
    let (keys, values) = job.pool.layer(job.layer);
    let qs: [&[f32]; Q] = std::array::from_fn(|qi| &job.q[qi * d..(qi + 1) * d]);
    let per_query = out.len() / Q;
    let first = job.start / B;
    let blocks = &job.seq.blocks[first..first + per_query];
    for (i, &block) in blocks.iter().enumerate() {
        // Blocks lie anywhere in the pool, each its own few KB: the next one's keys and
        // this one's values are fetched while this one's scores are computed.
        if let Some(&next) = blocks.get(i + 1) {
            prefetch(&keys[job.pool.at(next, job.kv_head, 0)..][..d * B]);
        }
        prefetch(&values[job.pool.at(block, job.kv_head, 0)..][..d * B]);
        let start = (first + i) * B;
        let count = (job.n - start).min(B);
        // Positions before the window's start (in its first block) weigh nothing.
        let skip = job.start.saturating_sub(start);
        let base = job.pool.at(block, job.kv_head, 0);
        let rows = as_rows(&keys[base..base + d * B]);
        // Two partial sums (even and odd dimensions) per query, for two chains.
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
        for qi in 0..Q {
            let row = &mut out[qi * per_query + i];
            s0[qi].add(s1[qi]).mul(L::splat(job.scale)).store(row);
            if let Some(c) = job.softcap {
                row.iter_mut().for_each(|x| *x = c * (*x / c).tanh());
            }
            if skip > 0 || count < B {
                for (j, x) in row.iter_mut().enumerate() {
                    if j < skip || j >= count {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// Asks for every cache line of `x` ahead of its use (a hint: it changes no result).
#[inline(always)]
fn prefetch(x: &[u16]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks(32) {
        // SAFETY: a prefetch reads nothing architecturally and never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr() as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Turns one query's scores into softmax weights (not yet divided by their sum, which it
/// returns): `e^(s − max)`, and exactly 0 outside `first..end` (the vector `exp` of −∞ is
/// ~1e−38, not 0).
///
/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn softmax_weights<L: Lanes16>(
    rows: &mut [[f32; BLOCK_TOKENS]],
    first: usize,
    end: usize,
) -> f32 {
    let mut max = L::splat(f32::NEG_INFINITY);
    for row in rows.iter() {
        max = max.max(L::load(row));
    }
    let max = L::splat(max.hmax());
    let mut sum = L::zero();
    for row in rows.iter_mut() {
        let w = L::load(row).sub(max).exp();
        w.store(row);
        sum = sum.add(w);
    }
    let (head, rest) = rows.as_flattened_mut().split_at_mut(first);
    let mut total = sum.hsum();
    for x in head.iter_mut().chain(&mut rest[end - first..]) {
        total -= *x;
        *x = 0.0;
    }
    total
}

/// `out = inv · Σ_j weight_j · value_j` for every query: `C` chunks of 16 dimensions for
/// all `Q` queries (`Q·C ≤ 16` accumulators) stay in registers across the whole span.
///
/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn values<L: Lanes16, const Q: usize, const C: usize>(
    job: &Job<'_>,
    d: usize,
    weights: &[&[[f32; BLOCK_TOKENS]]; Q],
    inv: &[f32; Q],
    out: &mut [f32],
) {
    const B: usize = BLOCK_TOKENS;
    let (_, values) = job.pool.layer(job.layer);
    let first = job.start / B;
    let blocks = &job.seq.blocks[first..first + weights[0].len()];
    let span = |i: usize| {
        let start = (first + i) * B;
        (job.start.saturating_sub(start), (job.n - start).min(B))
    };
    let chunks = d / B;
    let mut c0 = 0;
    while c0 + C <= chunks {
        value_chunks::<L, Q, C>(job, d, blocks, &span, weights, inv, out, c0);
        c0 += C;
    }
    while c0 < chunks {
        value_chunks::<L, Q, 1>(job, d, blocks, &span, weights, inv, out, c0);
        c0 += 1;
    }
    // Dimensions past the last whole chunk, one at a time.
    let done = chunks * B;
    if done < d {
        for qi in 0..Q {
            let o = &mut out[qi * d + done..(qi + 1) * d];
            o.fill(0.0);
            for (i, &block) in blocks.iter().enumerate() {
                let v = &values[job.pool.at(block, job.kv_head, 0)..][..B * d];
                let (skip, count) = span(i);
                for j in skip..count {
                    let w = weights[qi][i][j];
                    for (o, x) in o.iter_mut().zip(&v[j * d + done..(j + 1) * d]) {
                        let x = half::f16::from_bits(*x).to_f32();
                        *o = if L::FMA { w.mul_add(x, *o) } else { *o + w * x };
                    }
                }
            }
            o.iter_mut().for_each(|x| *x *= inv[qi]);
        }
    }
}

/// Chunks `c0..c0 + G` (16 dimensions each) of every query's output: `Q·G` accumulators,
/// with constant bounds so that they stay in registers.
///
/// # Safety
/// As [`dispatch`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn value_chunks<L: Lanes16, const Q: usize, const G: usize>(
    job: &Job<'_>,
    d: usize,
    blocks: &[u32],
    span: &impl Fn(usize) -> (usize, usize),
    weights: &[&[[f32; BLOCK_TOKENS]]; Q],
    inv: &[f32; Q],
    out: &mut [f32],
    c0: usize,
) {
    const B: usize = BLOCK_TOKENS;
    let (_, values) = job.pool.layer(job.layer);
    let mut acc = [[L::zero(); G]; Q];
    for (i, &block) in blocks.iter().enumerate() {
        let v = &values[job.pool.at(block, job.kv_head, 0)..][..B * d];
        if let Some(&next) = blocks.get(i + 1) {
            prefetch(&values[job.pool.at(next, job.kv_head, 0) + c0 * B..][..G * B]);
        }
        let (skip, count) = span(i);
        for j in skip..count {
            let row = as_rows(&v[j * d + c0 * B..][..G * B]);
            let mut w = [L::zero(); Q];
            for qi in 0..Q {
                w[qi] = L::splat(weights[qi][i][j]);
            }
            for c in 0..G {
                let x = L::load_f16(&row[c]);
                for qi in 0..Q {
                    acc[qi][c] = w[qi].mul_add(x, acc[qi][c]);
                }
            }
        }
    }
    for qi in 0..Q {
        let (o, _) = out[qi * d + c0 * B..(qi + 1) * d].as_chunks_mut::<B>();
        for c in 0..G {
            acc[qi][c].mul(L::splat(inv[qi])).store(&mut o[c]);
        }
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
