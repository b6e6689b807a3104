//! Activations quantized to 8 bits for the integer kernels: ggml's Q8 blocks of 32 (`x ≈
//! d·q`, with `d·Σq` for the `min` term of 4-bit weights, both rounded to f16 as ggml does),
//! the SIMD and portable quantizers, and the views through which the tasks of a product
//! each write their own rows.

use std::cell::Cell;

use super::kernels::Isa;

/// Activations quantized to 8 bits in blocks of 32: `x ≈ d·q`, with `dsum = d·Σq` kept for
/// the `min` term of 4-bit weights. The buffers may be longer than the activations (they
/// are reused, see [`SPARE`]): read them through the accessors.
pub struct Q8Acts {
    pub k: usize,
    pub rows: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    dsum: Vec<f32>,
    /// `Σq` of each 16 elements: the offset the tiled kernels take off, which read 8-bit
    /// weights as `q + 128` (`vpdpbusd` multiplies unsigned bytes by signed ones).
    gsum: Vec<i32>,
}

/// The buffers of this thread's last activations, kept whole for its next product: a
/// zeroed allocation per product (~120 a 16-stream step) showed in profiles as `memset`.
/// A thread-local scratch rather than a buffer passed down: products are called through
/// candle's custom-op interface, which has no place for one.
#[derive(Default)]
struct Spare {
    qs: Vec<i8>,
    d: Vec<f32>,
    dsum: Vec<f32>,
    gsum: Vec<i32>,
}

thread_local! {
    static SPARE: Cell<Option<Spare>> = const { Cell::new(None) };
}

/// Buffers larger than this many activation bytes (long prompts) are freed, not kept.
const SPARE_MAX_BYTES: usize = 1 << 20;

/// `v`, at least `n` long (grown with zeros; never shortened, its values unspecified).
fn at_least<T: Copy + Default>(mut v: Vec<T>, n: usize) -> Vec<T> {
    if v.len() < n {
        v.resize(n, T::default());
    }
    v
}

impl Drop for Q8Acts {
    fn drop(&mut self) {
        if self.qs.len() > SPARE_MAX_BYTES {
            return;
        }
        let spare = Spare {
            qs: std::mem::take(&mut self.qs),
            d: std::mem::take(&mut self.d),
            dsum: std::mem::take(&mut self.dsum),
            gsum: std::mem::take(&mut self.gsum),
        };
        // During the thread's teardown the buffers are simply freed.
        let _ = SPARE.try_with(|c| c.set(Some(spare)));
    }
}

impl Q8Acts {
    /// Quantizes `rows` rows of `k` (a multiple of 32) values.
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        Self::quantize_on(Isa::best(), x, rows, k)
    }

    /// [`Self::quantize`] with the AVX2 code unless `isa` is [`Isa::Portable`] (every other
    /// set includes AVX2).
    pub fn quantize_on(isa: Isa, x: &[f32], rows: usize, k: usize) -> Self {
        let mut acts = Self::for_rows(rows, k);
        quantize_blocks(
            quantize_simd(isa),
            &x[..rows * k / 32 * 32],
            acts.blocks_mut(),
        );
        acts
    }

    /// Buffers for `rows` rows of `k`, their contents unspecified (zeros or an earlier
    /// product's values): every caller overwrites all of them. They come from this thread's
    /// last activations where it has some (see [`SPARE`]).
    pub(super) fn for_rows(rows: usize, k: usize) -> Self {
        let blocks = rows * k / 32;
        let spare = SPARE
            .try_with(Cell::take)
            .ok()
            .flatten()
            .unwrap_or_default();
        Self {
            k,
            rows,
            qs: at_least(spare.qs, rows * k),
            d: at_least(spare.d, blocks),
            dsum: at_least(spare.dsum, blocks),
            gsum: at_least(spare.gsum, 2 * blocks),
        }
    }

    fn blocks(&self) -> usize {
        self.rows * self.k / 32
    }

    /// The quantized values, `rows × k`.
    pub fn qs(&self) -> &[i8] {
        &self.qs[..self.rows * self.k]
    }

    /// Each block's scale `d`.
    pub fn d(&self) -> &[f32] {
        &self.d[..self.blocks()]
    }

    /// Each block's `d·Σq`.
    pub fn dsum(&self) -> &[f32] {
        &self.dsum[..self.blocks()]
    }

    /// `Σq` of each half block.
    pub fn gsum(&self) -> &[i32] {
        &self.gsum[..2 * self.blocks()]
    }

    pub(super) fn blocks_mut(&mut self) -> ActBlocks<'_> {
        let (n, blocks) = (self.rows * self.k, self.blocks());
        ActBlocks {
            qs: &mut self.qs[..n],
            d: &mut self.d[..blocks],
            dsum: &mut self.dsum[..blocks],
            gsum: &mut self.gsum[..2 * blocks],
        }
    }

    pub(super) fn row(&self, r: usize) -> ActRow<'_> {
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
pub(super) fn quantize_blocks(simd: bool, x: &[f32], mut out: ActBlocks<'_>) {
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

/// Whether activations are quantized with the AVX2 code for `isa`.
pub(super) fn quantize_simd(isa: Isa) -> bool {
    isa != Isa::Portable && simd_available()
}

/// The buffers of a [`Q8Acts`] as raw pointers, so that the tasks of a product can each
/// quantize their own rows while the others run.
#[derive(Clone, Copy)]
pub(super) struct ActsWriter {
    qs: *mut i8,
    d: *mut f32,
    dsum: *mut f32,
    gsum: *mut i32,
    k: usize,
    rows: usize,
}

// SAFETY: the writer hands out disjoint rows (see `rows`), each written by one task.
unsafe impl Send for ActsWriter {}
unsafe impl Sync for ActsWriter {}

impl ActsWriter {
    pub(super) fn of(acts: &mut Q8Acts) -> Self {
        Self {
            qs: acts.qs.as_mut_ptr(),
            d: acts.d.as_mut_ptr(),
            dsum: acts.dsum.as_mut_ptr(),
            gsum: acts.gsum.as_mut_ptr(),
            k: acts.k,
            rows: acts.rows,
        }
    }

    /// The blocks of rows `r`.
    ///
    /// # Safety
    /// No other call may be given any of these rows, and nothing may read them (the
    /// [`Q8Acts`] included) until the returned value is dropped.
    pub(super) unsafe fn rows(&self, r: std::ops::Range<usize>) -> ActBlocks<'_> {
        assert!(r.start <= r.end && r.end <= self.rows);
        let (k, nb, n) = (self.k, self.k / 32, r.end - r.start);
        // SAFETY: inside the buffers (`r` within `rows`), disjoint from every other call's.
        unsafe {
            ActBlocks {
                qs: std::slice::from_raw_parts_mut(self.qs.add(r.start * k), n * k),
                d: std::slice::from_raw_parts_mut(self.d.add(r.start * nb), n * nb),
                dsum: std::slice::from_raw_parts_mut(self.dsum.add(r.start * nb), n * nb),
                gsum: std::slice::from_raw_parts_mut(self.gsum.add(2 * r.start * nb), 2 * n * nb),
            }
        }
    }
}

/// Whether the AVX2/FMA/F16C kernels run here; asked once per product, not per row.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
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
