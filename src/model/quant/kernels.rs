//! The choice of instruction set, the portable dot products of the row layout, and the
//! driver that splits a matrix product across the pool in one parallel section: threads
//! quantize pieces of the activations, then take runs of weight rows (whole panels of 16
//! where they can) and compute them for every token, with the tiled panel kernels (`panel`)
//! or, on the row layout, the portable code.

use half::f16;
use rayon::prelude::*;
use rayon::ThreadPool;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[cfg(test)]
pub use super::acts::quantize_block_portable;
use super::acts::{quantize_blocks, quantize_simd, ActsWriter};
pub use super::acts::{ActRow, Q8Acts};
use super::{Packed, Q4Matrix, Q8Matrix, Unpacked};

/// The runs of a product not yet taken, `front..back` packed in one word, taken from
/// either end.
struct RunsLeft(AtomicU64);

impl RunsLeft {
    fn new(runs: usize) -> Self {
        assert!(runs < 1 << 32, "{runs} runs");
        Self(AtomicU64::new(runs as u64))
    }

    /// The next run from the back (`from_back`) or the front; `None` when none is left.
    fn take(&self, from_back: bool) -> Option<usize> {
        let mut left = self.0.load(Ordering::Relaxed);
        loop {
            let (front, back) = (left >> 32, left & 0xFFFF_FFFF);
            if front >= back {
                return None;
            }
            let (next, run) = if from_back {
                (left - 1, back - 1)
            } else {
                (left + (1 << 32), front)
            };
            match self
                .0
                .compare_exchange_weak(left, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(run as usize),
                Err(now) => left = now,
            }
        }
    }
}

/// Counts a finished piece of work when dropped, unwinding included, so that nobody waits
/// forever on a task that panicked (the pool passes the panic on).
struct CountOnDrop<'a>(&'a AtomicUsize);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Spins until `counter` reaches `target`, yielding the CPU after a while (a thread the
/// machine took away will not finish in microseconds).
fn wait_for(counter: &AtomicUsize, target: usize) {
    let mut spins = 0u32;
    while counter.load(Ordering::Acquire) < target {
        if spins < 1 << 12 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
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
    // Not zeroed first: the tasks below write every element (each part's rows, for every
    // token), and clearing a few hundred KB per product showed up in profiles.
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Runs of rows small enough to balance two threads against a busy core (a run is taken
    // by whichever thread is free), large enough to amortize a call (and whole panels of
    // 16); the whole product runs inline when tiny.
    let work = n * k * rows;
    let threads = pool.current_num_threads();
    const RUNS_PER_THREAD: usize = 4;
    let run = if work < 1 << 18 || threads == 1 {
        n
    } else {
        (n / (threads * RUNS_PER_THREAD))
            .max(16)
            .next_multiple_of(16)
            .min(n)
    };
    let simd = quantize_simd(isa);
    let mut acts = Q8Acts::for_rows(rows, k);
    let x = &x[..rows * k / 32 * 32];
    if run == n {
        quantize_blocks(simd, x, acts.blocks_mut());
        product_run(parts, &acts, 0..n, out_ptr, n, isa);
    } else {
        // One parallel section, not two: each thread takes rows to quantize while any are
        // left, waits until all are done (microseconds), then takes runs of weight rows.
        // Each fork and join of the pool costs a few microseconds and leaves a thread idle
        // at its end, and a 16-stream step makes ~120 products.
        // A few rows (decode) are quantized before the section, in less time than a
        // hand-off would take.
        const QUANTIZE_ROWS: usize = 4;
        let pieces = if rows < 2 * QUANTIZE_ROWS {
            quantize_blocks(simd, x, acts.blocks_mut());
            0
        } else {
            rows.div_ceil(QUANTIZE_ROWS)
        };
        let writer = ActsWriter::of(&mut acts);
        let acts = &acts;
        let runs = n.div_ceil(run);
        let (next_piece, pieces_done) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let runs_left = RunsLeft::new(runs);
        let worker = |i: usize| {
            loop {
                let p = next_piece.fetch_add(1, Ordering::Relaxed);
                if p >= pieces {
                    break;
                }
                let _done = CountOnDrop(&pieces_done);
                let r = p * QUANTIZE_ROWS..((p + 1) * QUANTIZE_ROWS).min(rows);
                let nb = k / 32;
                let x = &x[r.start * nb * 32..r.end * nb * 32];
                // SAFETY: each piece of rows is taken by one thread, and nothing reads the
                // activations before every piece is counted done (`wait_for` below).
                quantize_blocks(simd, x, unsafe { writer.rows(r) });
            }
            wait_for(&pieces_done, pieces);
            // Even workers from the front, odd ones from the back: a thread's runs follow
            // each other in memory, so its prefetches run ahead into its own next run.
            while let Some(r) = runs_left.take(i % 2 == 1) {
                product_run(
                    parts,
                    acts,
                    r * run..((r + 1) * run).min(n),
                    out_ptr,
                    n,
                    isa,
                );
            }
        };
        pool.install(|| (0..threads).into_par_iter().for_each(worker));
    }
    // SAFETY: the runs covered columns `0..n`, each writing its columns of every token's
    // row; they have all returned.
    unsafe { out.set_len(rows * n) };
    out
}

/// Columns `cols` of the product (of the parts side by side), for every token.
fn product_run(
    parts: &[Packed],
    acts: &Q8Acts,
    cols: std::ops::Range<usize>,
    out: OutPtr,
    n: usize,
    isa: Isa,
) {
    // Each part's share of the run, in its own row numbers.
    let mut first = 0;
    for w in parts {
        let (lo, hi) = (cols.start.max(first), cols.end.min(first + w.rows()));
        if lo < hi {
            let rows = lo - first..hi - first;
            // SAFETY: each run of columns is taken by one thread; `out` outlives them all.
            unsafe {
                match w {
                    Packed::Rows(w) => product_rows(w, acts, rows, first, out, n),
                    Packed::Panels(w) => super::panel::product(w, acts, rows, first, out, n, isa),
                }
            };
        }
        first += w.rows();
    }
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
