//! Weights in panels of 16 rows for the tiled kernels (every SIMD set). A row layout puts 64
//! of one row's weights in a register, so every block of every row needs its own scale step
//! (a permute, a conversion and an FMA per token). A panel puts four weights of each of 16
//! rows in a register instead: one `vpdpbusd` against four broadcast activation bytes adds
//! to 16 rows' sums at once, each block's integer sums are scaled once for the 16 rows
//! (one conversion and one FMA), and the unpacked weights stay in registers for every
//! token of the tile. With AVX-512 VNNI prompts take 8 tokens a tile and decode 4 panels
//! (64 rows); the 256-bit sets (AVX-VNNI, AVX2: `panel_avx2`) take half-panels of 8 rows.
//!
//! The layout, per panel of 16 rows and per 32-element block (rows past `n` have zero scales
//! and mins, so whatever their bytes they sum to zero, and are never stored):
//! - 4-bit: 256 bytes, four 64-byte chunks; chunk `c` holds for row `r`, at bytes
//!   `4r..4r + 4`, elements `8c..8c + 4` in the low nibbles and `8c + 4..8c + 8` in the high
//!   ones. Then 16 f16 scales and 16 f16 mins, one per row.
//! - 8-bit: 512 bytes, eight 64-byte quads; quad `q` holds row `r`'s elements `4q..4q + 4`
//!   at bytes `4r..4r + 4`, each stored as `q + 128` (unsigned: the kernel takes
//!   `128·Σx` off again). Then 32 f16 scales (group 0's 16 rows, group 1's) and, for the
//!   formats that have them, 16 f16 mins.

use std::ops::Range;

use half::f16;

use super::kernels::{Isa, OutPtr, Q8Acts};
use super::{Q4Matrix, Q8Matrix, Unpacked};

/// Rows in one panel: the 16 f32 lanes of a zmm register.
pub const ROWS: usize = 16;
/// Most tokens in one prompt tile: 8 integer and 8 float accumulators fit in 32 registers
/// beside the weights and scales.
pub const TILE_TOKENS: usize = 8;
/// Panels in one decode tile (one token): four independent accumulator chains.
pub const DECODE_PANELS: usize = 4;

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Zeroed bytes that start on a cache line, so that each 64-byte chunk of weights is one
/// line and one aligned load.
#[derive(Clone)]
pub struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `lines` holds at least `len` initialized bytes; `Line` is plain bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, self.len) }
    }

    fn f16s(&self) -> &[f16] {
        // SAFETY: 64-byte aligned, so f16-aligned; `len` is even where f16s are stored.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f16, self.len / 2) }
    }

    fn f16s_mut(&mut self) -> &mut [f16] {
        // SAFETY: as `f16s`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f16, self.len / 2) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelFormat {
    Q4,
    Q8,
}

/// A matrix in panels of [`ROWS`] rows (see the module's layout).
#[derive(Clone)]
pub struct Panels {
    pub n: usize,
    pub k: usize,
    pub format: PanelFormat,
    pub qs: AlignedBytes,
    pub scale: AlignedBytes,
    /// Empty for 8-bit weights without mins.
    pub min: AlignedBytes,
    /// 8-bit weights whose two 16-element groups share one scale in every block (Q8_0,
    /// Q5_0, Q5_1, Q5_K; not Q6_K): a block's 32 products can be summed as integers and
    /// scaled once, which halves the float work per block.
    pub one_scale_per_block: bool,
}

impl Panels {
    pub fn panels(&self) -> usize {
        self.n.div_ceil(ROWS)
    }

    pub fn blocks(&self) -> usize {
        self.k / 32
    }

    /// Packed weight bytes of one panel-block.
    pub fn block_bytes(&self) -> usize {
        match self.format {
            PanelFormat::Q4 => 256,
            PanelFormat::Q8 => 512,
        }
    }

    /// Scales of one panel-block.
    pub fn block_scales(&self) -> usize {
        match self.format {
            PanelFormat::Q4 => ROWS,
            PanelFormat::Q8 => 2 * ROWS,
        }
    }

    pub fn has_min(&self) -> bool {
        self.min.len > 0
    }

    /// The weights of panel `p`: its packed bytes, scales and mins (empty when none).
    pub fn panel(&self, p: usize) -> (&[u8], &[f16], &[f16]) {
        let nb = self.blocks();
        let (bb, bs) = (self.block_bytes(), self.block_scales());
        let min = self.min.f16s();
        (
            &self.qs.bytes()[p * nb * bb..(p + 1) * nb * bb],
            &self.scale.f16s()[p * nb * bs..(p + 1) * nb * bs],
            min.get(p * nb * ROWS..(p + 1) * nb * ROWS).unwrap_or(&[]),
        )
    }

    /// Repacks a row-layout matrix into panels.
    pub fn from_rows(w: &Unpacked) -> Panels {
        match w {
            Unpacked::Q4(m) => Self::from_q4(m),
            Unpacked::Q8(m) => Self::from_q8(m),
        }
    }

    fn empty(n: usize, k: usize, format: PanelFormat, has_min: bool) -> Panels {
        let (panels, nb) = (n.div_ceil(ROWS), k / 32);
        let (bb, bs) = match format {
            PanelFormat::Q4 => (256, ROWS),
            PanelFormat::Q8 => (512, 2 * ROWS),
        };
        Panels {
            n,
            k,
            format,
            qs: AlignedBytes::zeroed(panels * nb * bb),
            scale: AlignedBytes::zeroed(panels * nb * bs * 2),
            min: AlignedBytes::zeroed(if has_min { panels * nb * ROWS * 2 } else { 0 }),
            one_scale_per_block: false,
        }
    }

    fn from_q4(m: &Q4Matrix) -> Panels {
        let mut out = Self::empty(m.n, m.k, PanelFormat::Q4, true);
        let nb = m.k / 32;
        let qs = out.qs.bytes_mut();
        for r in 0..m.n {
            let (p, i) = (r / ROWS, r % ROWS);
            for b in 0..nb {
                let src = &m.qs[(r * nb + b) * 16..][..16];
                let element = |e: usize| {
                    let byte = src[e % 16];
                    if e < 16 {
                        byte & 0x0F
                    } else {
                        byte >> 4
                    }
                };
                let dst = &mut qs[(p * nb + b) * 256..][..256];
                for c in 0..4 {
                    for j in 0..4 {
                        dst[64 * c + 4 * i + j] = element(8 * c + j) | element(8 * c + 4 + j) << 4;
                    }
                }
            }
        }
        spread_per_block(&m.scale, m.n, nb, 1, out.scale.f16s_mut());
        spread_per_block(&m.min, m.n, nb, 1, out.min.f16s_mut());
        out
    }

    fn from_q8(m: &Q8Matrix) -> Panels {
        let mut out = Self::empty(m.n, m.k, PanelFormat::Q8, !m.min.is_empty());
        let nb = m.k / 32;
        let qs = out.qs.bytes_mut();
        for r in 0..m.n {
            let (p, i) = (r / ROWS, r % ROWS);
            for b in 0..nb {
                let src = &m.qs[r * m.k + 32 * b..][..32];
                let dst = &mut qs[(p * nb + b) * 512..][..512];
                for q in 0..8 {
                    for j in 0..4 {
                        dst[64 * q + 4 * i + j] = (src[4 * q + j] as u8) ^ 0x80;
                    }
                }
            }
        }
        spread_per_block(&m.scale, m.n, nb, 2, out.scale.f16s_mut());
        out.one_scale_per_block = m.scale.chunks_exact(2).all(|g| g[0] == g[1]);
        if !m.min.is_empty() {
            spread_per_block(&m.min, m.n, nb, 1, out.min.f16s_mut());
        }
        out
    }
}

/// Row-layout values, `per` to a block of each row (`src[(r·nb + b)·per + g]`), into panel
/// order: per panel-block, value `g`'s 16 rows side by side.
fn spread_per_block(src: &[f16], n: usize, nb: usize, per: usize, dst: &mut [f16]) {
    for r in 0..n {
        let (p, i) = (r / ROWS, r % ROWS);
        for b in 0..nb {
            for g in 0..per {
                dst[((p * nb + b) * per + g) * ROWS + i] = src[(r * nb + b) * per + g];
            }
        }
    }
}

/// One token's activations as the tiled kernels read them.
#[derive(Clone, Copy)]
pub struct TokenActs {
    pub qs: *const i8,
    pub d: *const f32,
    pub dsum: *const f32,
    pub gsum: *const i32,
}

impl TokenActs {
    fn of(acts: &Q8Acts, t: usize) -> Self {
        let nb = acts.k / 32;
        Self {
            qs: acts.qs()[t * acts.k..].as_ptr(),
            d: acts.d()[t * nb..].as_ptr(),
            dsum: acts.dsum()[t * nb..].as_ptr(),
            gsum: acts.gsum()[t * 2 * nb..].as_ptr(),
        }
    }
}

/// Fills `out[t·n + column + r]` for every token `t` and row `r` of `rows` (rows of this
/// part). Panels cut by `rows` are computed whole and only their rows in `rows` stored.
///
/// # Safety
/// As `kernels::product_rows`: `out` holds `acts.rows × n` floats and no other thread writes
/// these columns; `isa` only where [`Isa::available`] said so.
pub(super) unsafe fn product(
    w: &Panels,
    acts: &Q8Acts,
    rows: Range<usize>,
    column: usize,
    out: OutPtr,
    n: usize,
    isa: Isa,
) {
    assert_eq!(w.k, acts.k, "panel product of mismatched widths");
    let panels = rows.start / ROWS..rows.end.div_ceil(ROWS);
    let store = |p: usize, t: usize, sums: &[f32; ROWS]| {
        let (lo, hi) = ((p * ROWS).max(rows.start), (p * ROWS + ROWS).min(rows.end));
        // SAFETY: rows `lo..hi` of this part are in the caller's columns; `t < acts.rows`.
        unsafe {
            let to = out.0.add(t * n + column + lo);
            if hi - lo == ROWS {
                // A whole panel, the common case: a fixed-size copy (two vector moves),
                // where a variable length is a call to `memmove` per panel and token.
                (to as *mut [f32; ROWS]).write_unaligned(*sums);
            } else {
                std::ptr::copy_nonoverlapping(sums.as_ptr().add(lo - p * ROWS), to, hi - lo)
            }
        };
    };
    let tokens: Vec<TokenActs> = (0..acts.rows).map(|t| TokenActs::of(acts, t)).collect();
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512Vnni => return super::panel_avx512::tiles(w, panels, &tokens, store),
        Isa::AvxVnni => return super::panel_avx2::tiles_vnni(w, panels, &tokens, store),
        Isa::Avx2 => return super::panel_avx2::tiles_avx2(w, panels, &tokens, store),
        Isa::Portable => {}
    }
    let _ = isa;
    for p in panels {
        for (t, token) in tokens.iter().enumerate() {
            store(p, t, &panel_dot_portable(w, p, *token));
        }
    }
}

/// One panel's 16 sums for one token, in plain code (the reference the tiled kernels are
/// tested against, through the row kernels' portable sums).
fn panel_dot_portable(w: &Panels, p: usize, a: TokenActs) -> [f32; ROWS] {
    let (qs, scale, min) = w.panel(p);
    let nb = w.blocks();
    // SAFETY: `TokenActs` points into one token's row of `k` activations.
    let x = unsafe { std::slice::from_raw_parts(a.qs, w.k) };
    let (d, dsum) = unsafe {
        (
            std::slice::from_raw_parts(a.d, nb),
            std::slice::from_raw_parts(a.dsum, nb),
        )
    };
    let mut out = [0.0f32; ROWS];
    for (i, sum) in out.iter_mut().enumerate() {
        for b in 0..nb {
            let x = &x[32 * b..32 * b + 32];
            match w.format {
                PanelFormat::Q4 => {
                    let bytes = &qs[b * 256..(b + 1) * 256];
                    let mut isum = 0i32;
                    for c in 0..4 {
                        for j in 0..4 {
                            let byte = bytes[64 * c + 4 * i + j];
                            isum += (byte & 0x0F) as i32 * x[8 * c + j] as i32
                                + (byte >> 4) as i32 * x[8 * c + 4 + j] as i32;
                        }
                    }
                    let (s, m) = (scale[b * ROWS + i], min[b * ROWS + i]);
                    *sum += s.to_f32() * d[b] * isum as f32 + m.to_f32() * dsum[b];
                }
                PanelFormat::Q8 => {
                    let bytes = &qs[b * 512..(b + 1) * 512];
                    for g in 0..2 {
                        let mut isum = 0i32;
                        for q in 4 * g..4 * g + 4 {
                            for j in 0..4 {
                                let wq = (bytes[64 * q + 4 * i + j] ^ 0x80) as i8;
                                isum += wq as i32 * x[4 * q + j] as i32;
                            }
                        }
                        *sum += scale[(2 * b + g) * ROWS + i].to_f32() * d[b] * isum as f32;
                    }
                    if let Some(m) = min.get(b * ROWS + i) {
                        *sum += m.to_f32() * dsum[b];
                    }
                }
            }
        }
    }
    out
}
