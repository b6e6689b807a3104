//! Decoding GGML's block formats into the two layouts our kernels read. Straight-line,
//! portable code that runs once per weight at load time; the layouts are described on
//! [`Q4Matrix`] and [`Q8Matrix`].
//!
//! Scales are kept in f16, as GGML stores them, because decoding a token reads every weight
//! once and memory bandwidth is what limits it. Q4_0, Q4_1 and Q8_0 map exactly; for the K
//! formats the product of the super-block scale and the 6- or 8-bit sub-scale is rounded to
//! f16 (relative error ≤ 2⁻¹¹, a tenth of what 8-bit activations already introduce):
//! - Q4_0: `x = d·(q − 8)` → scale `d`, min `−8d`;
//! - Q4_1: `x = d·q + m` → scale `d`, min `m`;
//! - Q4_K: per 32-element sub-block `x = d·sc·q − dmin·m` → scale `d·sc`, min `−dmin·m`;
//! - Q8_0: `x = d·q` → `q`, with `d` as the scale of both 16-element groups;
//! - Q6_K: per 16-element group `x = d·sc·(q − 32)` → `q − 32`, scale `d·sc`;
//! - Q5_0: `x = d·(q − 16)` → `q − 16`, scale `d` (5 bits fit the 8-bit layout exactly);
//! - Q5_1: `x = d·q + m` → `q`, scale `d`, and the 8-bit layout's optional `min` = `m`;
//! - Q5_K: per 32-element sub-block `x = d·sc·q − dmin·m` → `q`, scale `d·sc`, min `−dmin·m`.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{Q4Matrix, Q8Matrix, QuantError};

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Bytes of one GGML block and the elements it holds.
fn block_geometry(dtype: GgmlDType) -> Option<(usize, usize)> {
    Some(match dtype {
        GgmlDType::Q4_0 => (18, 32),
        GgmlDType::Q4_1 => (20, 32),
        GgmlDType::Q8_0 => (34, 32),
        GgmlDType::Q4K => (144, 256),
        GgmlDType::Q6K => (210, 256),
        GgmlDType::Q5_0 => (22, 32),
        GgmlDType::Q5_1 => (24, 32),
        GgmlDType::Q5K => (176, 256),
        _ => return None,
    })
}

/// Whether [`unpack`] handles `dtype`.
pub fn supported(dtype: GgmlDType) -> bool {
    block_geometry(dtype).is_some()
}

/// A decoded weight matrix, in whichever layout suits its format.
#[derive(Clone)]
pub enum Unpacked {
    Q4(Q4Matrix),
    Q8(Q8Matrix),
}

/// Decodes `n` rows of `k` elements stored as GGML blocks of `dtype`.
pub fn unpack(dtype: GgmlDType, bytes: &[u8], n: usize, k: usize) -> Result<Unpacked, QuantError> {
    let (block_bytes, block_elems) = block_geometry(dtype).ok_or(QuantError::Format(dtype))?;
    if k % block_elems != 0 || bytes.len() != n * k / block_elems * block_bytes {
        return Err(QuantError::Shape(format!(
            "{dtype:?} matrix of {n}×{k} in {} bytes",
            bytes.len()
        )));
    }
    let blocks = bytes.chunks_exact(block_bytes);
    Ok(match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => {
            let mut m = Q4Matrix::zeros(n, k);
            let mut sub = 0; // index of the 32-element sub-block
            for b in blocks {
                match dtype {
                    GgmlDType::Q4_0 => {
                        let d = f16_at(b, 0);
                        m.scale[sub] = f16::from_f32(d);
                        m.min[sub] = f16::from_f32(-8.0 * d);
                        m.qs[sub * 16..sub * 16 + 16].copy_from_slice(&b[2..18]);
                        sub += 1;
                    }
                    GgmlDType::Q4_1 => {
                        m.scale[sub] = f16::from_f32(f16_at(b, 0));
                        m.min[sub] = f16::from_f32(f16_at(b, 2));
                        m.qs[sub * 16..sub * 16 + 16].copy_from_slice(&b[4..20]);
                        sub += 1;
                    }
                    _ => {
                        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                        let scales = &b[4..16];
                        let qs = &b[16..144];
                        for group in 0..4 {
                            let q = &qs[group * 32..group * 32 + 32];
                            for half in 0..2 {
                                let (sc, mn) = q4k_scale_min(2 * group + half, scales);
                                m.scale[sub] = f16::from_f32(d * sc as f32);
                                m.min[sub] = f16::from_f32(-(dmin * mn as f32));
                                let nibble = |l: usize| (q[l] >> (4 * half)) & 0x0F;
                                for j in 0..16 {
                                    m.qs[sub * 16 + j] = nibble(j) | (nibble(j + 16) << 4);
                                }
                                sub += 1;
                            }
                        }
                    }
                }
            }
            Unpacked::Q4(m)
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => unpack_q5(dtype, blocks, n, k),
        _ => {
            let mut m = Q8Matrix::zeros(n, k);
            let mut group = 0; // index of the 16-element group
            for b in blocks {
                if dtype == GgmlDType::Q8_0 {
                    let d = f16_at(b, 0);
                    m.scale[group] = f16::from_f32(d);
                    m.scale[group + 1] = f16::from_f32(d);
                    for (dst, &src) in m.qs[group * 16..group * 16 + 32].iter_mut().zip(&b[2..34]) {
                        *dst = src as i8;
                    }
                    group += 2;
                    continue;
                }
                // Q6_K: 256 elements in two halves of 128; within a half, element l (0..32)
                // of each quarter takes its low 4 bits from `ql` and its high 2 from `qh`.
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                let base = group * 16;
                for half in 0..2 {
                    let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
                    for l in 0..32 {
                        let quads = [
                            (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (quarter, q) in quads.into_iter().enumerate() {
                            m.qs[base + half * 128 + quarter * 32 + l] = q as i8 - 32;
                        }
                    }
                }
                for (g, &s) in sc.iter().enumerate() {
                    m.scale[group + g] = f16::from_f32(d * (s as i8) as f32);
                }
                group += 16;
            }
            Unpacked::Q8(m)
        }
    })
}

/// The 5-bit formats, into the 8-bit layout (with a `min` for Q5_1 and Q5_K).
fn unpack_q5<'a>(
    dtype: GgmlDType,
    blocks: impl Iterator<Item = &'a [u8]>,
    n: usize,
    k: usize,
) -> Unpacked {
    let mut m = Q8Matrix::zeros(n, k);
    if dtype != GgmlDType::Q5_0 {
        m.min = vec![f16::ZERO; n * k / 32];
    }
    let mut sub = 0; // index of the 32-element sub-block
    for b in blocks {
        if dtype == GgmlDType::Q5K {
            // 256 elements: four runs of 64 share 32 bytes of `ql` (low nibbles first) and
            // take their fifth bits from `qh`, two bit planes per run.
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qh, ql) = (&b[4..16], &b[16..48], &b[48..176]);
            for run in 0..4 {
                for half in 0..2 {
                    let j = 2 * run + half;
                    let (sc, mn) = q4k_scale_min(j, scales);
                    let bit = 1u8 << j;
                    let base = sub * 32;
                    for l in 0..32 {
                        let low = (ql[run * 32 + l] >> (4 * half)) & 0x0F;
                        let high = if qh[l] & bit != 0 { 16 } else { 0 };
                        m.qs[base + l] = (low | high) as i8;
                    }
                    let scale = f16::from_f32(d * sc as f32);
                    m.scale[2 * sub] = scale;
                    m.scale[2 * sub + 1] = scale;
                    m.min[sub] = f16::from_f32(-(dmin * mn as f32));
                    sub += 1;
                }
            }
            continue;
        }
        // Q5_0 and Q5_1: 32 elements; byte j of `qs` holds elements j (low nibble) and
        // j + 16 (high), and bit j of the little-endian `qh` word is element j's fifth bit.
        let (d, rest) = (f16_at(b, 0), if dtype == GgmlDType::Q5_1 { 4 } else { 2 });
        let qh = u32::from_le_bytes([b[rest], b[rest + 1], b[rest + 2], b[rest + 3]]);
        let qs = &b[rest + 4..rest + 20];
        let offset = if dtype == GgmlDType::Q5_0 { 16 } else { 0 };
        for j in 0..16 {
            let lo = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
            let hi = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            m.qs[sub * 32 + j] = (lo as i16 - offset) as i8;
            m.qs[sub * 32 + j + 16] = (hi as i16 - offset) as i8;
        }
        m.scale[2 * sub] = f16::from_f32(d);
        m.scale[2 * sub + 1] = f16::from_f32(d);
        if dtype == GgmlDType::Q5_1 {
            m.min[sub] = f16::from_f32(f16_at(b, 2));
        }
        sub += 1;
    }
    Unpacked::Q8(m)
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block, as ggml packs them.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}
