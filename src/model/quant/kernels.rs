//! Activation quantization, the choice of instruction set, the portable dot products of the
//! row layout, and the driver that splits a matrix product across the pool: each task takes
//! a run of weight rows (whole panels of 16 where it can) and computes them for every token,
//! with the tiled panel kernels (`panel`) or, on the row layout, the portable code.

use half::f16;
use rayon::prelude::*;
use rayon::ThreadPool;

use super::{Packed, Q4Matrix, Q8Matrix, Unpacked};

/// Activations quantized to 8 bits in blocks of 32: `x ≈ d·q`, with `dsum = d·Σq` kept for
/// the `min` term of 4-bit weights.
pub struct Q8Acts {
    pub k: usize,
    pub rows: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub dsum: Vec<f32>,
    /// `Σq` of each 16 elements: the offset the tiled kernels take off, which read 8-bit
    /// weights as `q + 128` (`vpdpbusd` multiplies unsigned bytes by signed ones).
    pub gsum: Vec<i32>,
}

impl Q8Acts {
    /// Quantizes `rows` rows of `k` (a multiple of 32) values.
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        Self::quantize_on(Isa::best(), x, rows, k)
    }

    /// [`Self::quantize`] with the AVX2 code unless `isa` is [`Isa::Portable`] (every other
    /// set includes AVX2).
    pub fn quantize_on(isa: Isa, x: &[f32], rows: usize, k: usize) -> Self {
        Self::quantize_in(isa, x, rows, k, None)
    }

    /// [`Self::quantize_on`], the rows split across `pool` when there are enough of them:
    /// the quantization of a 16-stream step's activations is otherwise a serial section
    /// before every product, with the other thread idle.
    pub fn quantize_in(
        isa: Isa,
        x: &[f32],
        rows: usize,
        k: usize,
        pool: Option<&ThreadPool>,
    ) -> Self {
        let blocks = rows * k / 32;
        let mut acts = Self {
            k,
            rows,
            qs: vec![0; rows * k],
            d: vec![0.0; blocks],
            dsum: vec![0.0; blocks],
            gsum: vec![0; 2 * blocks],
        };
        let simd = isa != Isa::Portable && simd_available();
        let x = &x[..blocks * 32];
        let nb = k / 32;
        match pool {
            Some(pool) if rows >= 8 && nb > 0 && pool.current_num_threads() > 1 => {
                // Four runs of rows a thread, so that a thread slowed by the machine's other
                // work is helped by its neighbour.
                let run = rows.div_ceil(4 * pool.current_num_threads()) * nb;
                pool.install(|| {
                    x.par_chunks(run * 32)
                        .zip(acts.qs.par_chunks_mut(run * 32))
                        .zip(acts.d.par_chunks_mut(run))
                        .zip(acts.dsum.par_chunks_mut(run))
                        .zip(acts.gsum.par_chunks_mut(2 * run))
                        .for_each(|((((x, qs), d), dsum), gsum)| {
                            quantize_blocks(simd, x, ActBlocks { qs, d, dsum, gsum })
                        })
                });
            }
            _ => quantize_blocks(simd, x, acts.blocks_mut()),
        }
        acts
    }

    fn blocks_mut(&mut self) -> ActBlocks<'_> {
        ActBlocks {
            qs: &mut self.qs,
            d: &mut self.d,
            dsum: &mut self.dsum,
            gsum: &mut self.gsum,
        }
    }

    fn row(&self, r: usize) -> ActRow<'_> {
        let (k, nb) = (self.k, self.k / 32);
        ActRow {
            qs: &self.qs[r * k..(r + 1) * k],
            d: &self.d[r * nb..(r + 1) * nb],
            dsum: &self.dsum[r * nb..(r + 1) * nb],
        }
    }
}

/// A run of blocks of [`Q8Acts`] being written: a whole product's, or one task's share.
pub(super) struct ActBlocks<'a> {
    pub qs: &'a mut [i8],
    pub d: &'a mut [f32],
    pub dsum: &'a mut [f32],
    pub gsum: &'a mut [i32],
}

impl ActBlocks<'_> {
    /// Records block `b`'s sums (`low` and `high`: of its two halves) and `scaled`: its
    /// scale `d` and `d·Σq`, rounded to f16 by the caller. ggml keeps an activation block's
    /// scale and scaled sum in f16 (Q8_0/Q8_1), and so do we: this model is sensitive enough
    /// that the extra precision alone moves logits by tenths and flips greedy near-ties
    /// against llama.cpp's reference.
    #[inline(always)]
    pub(super) fn set_block(&mut self, b: usize, low: i32, high: i32, scaled: [f32; 2]) {
        self.gsum[2 * b] = low;
        self.gsum[2 * b + 1] = high;
        [self.d[b], self.dsum[b]] = scaled;
    }
}

/// Quantizes every block of `x` into `out` (sized for them).
fn quantize_blocks(simd: bool, x: &[f32], mut out: ActBlocks<'_>) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2, FMA and F16C were detected at run time (`simd_available`).
        unsafe { super::avx2::quantize_rows(x, &mut out) };
        return;
    }
    let _ = simd;
    for b in 0..x.len() / 32 {
        let src = &x[b * 32..b * 32 + 32];
        let dst = &mut out.qs[b * 32..b * 32 + 32];
        let (d, sum) = quantize_block_portable(src, dst);
        let low: i32 = dst[..16].iter().map(|&q| q as i32).sum();
        let scaled = [f16_round(d), f16_round(d * sum as f32)];
        out.set_block(b, low, sum - low, scaled);
    }
}

/// Whether the AVX2/FMA/F16C kernels run here; asked once per product, not per row.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The instruction set the dot products use: the best this CPU has, found once. Each is
/// checked against the portable code by the tests, on whichever of them the CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Isa {
    /// 512-bit `vpdpbusd`: a register holds four weights of each of 16 rows.
    Avx512Vnni,
    /// 256-bit VEX `vpdpbusd`.
    AvxVnni,
    /// `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2, Isa::Portable];

    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            Isa::Avx512Vnni => super::avx2::avx512_vnni_available(),
            Isa::AvxVnni => super::avx2::vnni_available(),
            Isa::Avx2 => super::avx2::available(),
            Isa::Portable => true,
        };
        #[cfg(not(target_arch = "x86_64"))]
        return self == Isa::Portable;
    }

    /// The set the kernels run with: fixed by [`Self::choose`], or on first use the first
    /// available of [`Self::ALL`].
    pub fn best() -> Isa {
        Self::choose(None)
    }

    /// Fixes the process's set: `forced` where the CPU has it, else the best it has. Only the
    /// first call decides; a later, different request is logged and ignored.
    pub fn choose(forced: Option<Isa>) -> Isa {
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        let chosen = *CHOSEN.get_or_init(|| {
            let best = Self::ALL
                .into_iter()
                .find(|i| i.available())
                .unwrap_or(Isa::Portable);
            let isa = match forced {
                Some(f) if f.available() => f,
                Some(f) => {
                    tracing::warn!(
                        asked = f.name(),
                        using = best.name(),
                        "this CPU lacks the instructions of --cpu-isa"
                    );
                    best
                }
                None => best,
            };
            tracing::info!(kernels = isa.name(), "int8 matmul kernels");
            isa
        });
        if forced.is_some_and(|f| f != chosen && f.available()) {
            tracing::warn!(
                asked = ?forced,
                using = chosen.name(),
                "the int8 kernels were already fixed for this process"
            );
        }
        chosen
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// One token's quantized activations.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub dsum: &'a [f32],
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Rounds 32 values to `d·q` with `d = max|x| / 127`; returns `d` and `Σq`.
pub fn quantize_block_portable(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, &v) in dst.iter_mut().zip(src) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// `Σ_b (scale_b·d_b·⟨q_w, q_a⟩_b + min_b·dsum_b)` over one row of a [`Q4Matrix`].
pub fn q4_dot_portable(qs: &[u8], scale: &[f16], min: &[f16], a: ActRow<'_>) -> f32 {
    let mut sum = 0.0f32;
    for b in 0..scale.len() {
        let w = &qs[b * 16..b * 16 + 16];
        let x = &a.qs[b * 32..b * 32 + 32];
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (w[j] & 0x0F) as i32 * x[j] as i32 + (w[j] >> 4) as i32 * x[j + 16] as i32;
        }
        sum += scale[b].to_f32() * a.d[b] * isum as f32 + min[b].to_f32() * a.dsum[b];
    }
    sum
}

/// `Σ_g scale_g·d_{g/2}·⟨q_w, q_a⟩_g` over one row of a [`Q8Matrix`].
pub fn q8_dot_portable(qs: &[i8], scale: &[f16], a: ActRow<'_>) -> f32 {
    let mut sum = 0.0f32;
    for g in 0..scale.len() {
        let isum: i32 = qs[g * 16..g * 16 + 16]
            .iter()
            .zip(&a.qs[g * 16..g * 16 + 16])
            .map(|(&w, &x)| w as i32 * x as i32)
            .sum();
        sum += scale[g].to_f32() * a.d[g / 2] * isum as f32;
    }
    sum
}

/// `x` (`rows × k`, row-major) times `wᵀ`: `rows × n`.
pub fn matmul(w: &Packed, x: &[f32], rows: usize, pool: &ThreadPool) -> Vec<f32> {
    matmul_parts(std::slice::from_ref(w), x, rows, pool)
}

/// `x` times several matrices of one width side by side (layouts may differ: a Q4_K_M file
/// stores Q as Q4_K and V as Q6_K), the activations quantized once for all of them.
pub fn matmul_parts(parts: &[Packed], x: &[f32], rows: usize, pool: &ThreadPool) -> Vec<f32> {
    matmul_parts_on(Isa::best(), parts, x, rows, pool)
}

/// [`matmul_parts`] with the kernels of `isa` (tests run each; one the CPU lacks is
/// replaced by the portable code). Panels take the tiled kernels of `isa` (their portable
/// code with [`Isa::Portable`]); rows take the portable code.
pub fn matmul_parts_on(
    isa: Isa,
    parts: &[Packed],
    x: &[f32],
    rows: usize,
    pool: &ThreadPool,
) -> Vec<f32> {
    let isa = if isa.available() { isa } else { Isa::Portable };
    let k = parts[0].cols();
    // The kernels read `k` activations a token through raw pointers: every part must be
    // that wide, and `x` hold `rows` of them.
    assert!(
        parts.iter().all(|p| p.cols() == k) && x.len() == rows * k,
        "matrix product of mismatched widths"
    );
    let n: usize = parts.iter().map(Packed::rows).sum();
    let acts = Q8Acts::quantize_in(isa, x, rows, k, Some(pool));
    // Not zeroed first: the tasks below write every element (each part's rows, for every
    // token), and clearing a few hundred KB per product showed up in profiles.
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Runs of rows small enough to balance two threads against a busy core, large enough
    // that waking a worker pays for itself (and whole panels of 16); the whole product runs
    // inline when tiny.
    let work = n * k * rows;
    let threads = pool.current_num_threads();
    let run = if work < 1 << 18 || threads == 1 {
        n
    } else {
        (n / (threads * 4)).max(16).next_multiple_of(16).min(n)
    };
    let task = |chunk: usize| {
        let start = chunk * run;
        let end = (start + run).min(n);
        // Each part's share of the run, in its own row numbers.
        let mut first = 0;
        for w in parts {
            let (lo, hi) = (start.max(first), end.min(first + w.rows()));
            if lo < hi {
                let rows = lo - first..hi - first;
                // SAFETY: tasks write disjoint columns `lo..hi` of `out`, which outlives them.
                unsafe {
                    match w {
                        Packed::Rows(w) => product_rows(w, &acts, rows, first, out_ptr, n),
                        Packed::Panels(w) => {
                            super::panel::product(w, &acts, rows, first, out_ptr, n, isa)
                        }
                    }
                };
            }
            first += w.rows();
        }
    };
    if run == n {
        task(0);
    } else {
        pool.install(|| (0..n.div_ceil(run)).into_par_iter().for_each(task));
    }
    // SAFETY: the tasks covered columns `0..n` (runs of `run`), each writing its columns
    // of every token's row; they have all returned.
    unsafe { out.set_len(rows * n) };
    out
}

#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: shared only with tasks that write disjoint elements, joined before `out` is read.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Fills `out[t·n + column + r]` for every token `t` and weight row `r` in `rows_range`, with
/// the portable dot products: the row layout's only kernels (every SIMD set reads panels).
///
/// # Safety
/// `out` must point to `acts.rows × n` floats, and no other thread may write those columns.
unsafe fn product_rows(
    w: &Unpacked,
    acts: &Q8Acts,
    rows_range: std::ops::Range<usize>,
    column: usize,
    out: OutPtr,
    n: usize,
) {
    for t in 0..acts.rows {
        let a = acts.row(t);
        for r in rows_range.clone() {
            let sum = match w {
                Unpacked::Q4(m) => {
                    let (qs, scale, min) = q4_row(m, r);
                    q4_dot_portable(qs, scale, min, a)
                }
                Unpacked::Q8(m) => {
                    let (qs, scale) = q8_row(m, r);
                    q8_dot_portable(qs, scale, a) + min_term(q8_row_min(m, r), a)
                }
            };
            *out.0.add(t * n + column + r) = sum;
        }
    }
}

pub fn q4_row(m: &Q4Matrix, r: usize) -> (&[u8], &[f16], &[f16]) {
    let nb = m.k / 32;
    (
        &m.qs[r * nb * 16..(r + 1) * nb * 16],
        &m.scale[r * nb..(r + 1) * nb],
        &m.min[r * nb..(r + 1) * nb],
    )
}

/// `Σ_b min_b·dsum_b`: the offset of the formats whose 8-bit layout has a `min`.
pub fn min_term(min: &[f16], a: ActRow<'_>) -> f32 {
    min.iter().zip(a.dsum).map(|(m, s)| m.to_f32() * s).sum()
}

/// Row `r`'s mins (empty slice when the matrix has none).
pub fn q8_row_min(m: &Q8Matrix, r: usize) -> &[f16] {
    let nb = m.k / 32;
    m.min.get(r * nb..(r + 1) * nb).unwrap_or(&[])
}

pub fn q8_row(m: &Q8Matrix, r: usize) -> (&[i8], &[f16]) {
    let ng = m.k / 16;
    (
        &m.qs[r * m.k..(r + 1) * m.k],
        &m.scale[r * ng..(r + 1) * ng],
    )
}
