//! The residual add and the RMS norm that follows it, in one pass on the CPU in f32, where
//! candle takes two ops with an output each. The norm's arithmetic is candle's exactly (the
//! same order of the sum, the same division), so outputs do not move by an ulp: the greedy
//! tests against llama.cpp and between batch shapes sit on near-ties that an ulp can flip.
//! Other devices and dtypes, and strided views, take candle's ops.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

/// `x / √(mean(x²) + ε) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let out = with_f32(x, |xs| {
        with_f32(w, |ws| {
            (ws.len() == xs.len() / rows(x)).then(|| normed(xs, ws, eps))
        })
    });
    match out.flatten().flatten() {
        Some(out) => Tensor::from_vec(out, x.shape(), x.device()),
        None => candle_nn::ops::rms_norm(x, w, eps),
    }
}

/// `(x + a, rms_norm(x + a, w))`: the new residual stream and its normed copy.
pub fn add_rms_norm(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let sum = if x.shape() == a.shape() {
        with_f32(x, |xs| {
            with_f32(a, |as_| {
                xs.iter().zip(as_).map(|(x, a)| x + a).collect::<Vec<f32>>()
            })
        })
        .flatten()
    } else {
        None
    };
    let normed = sum.as_ref().and_then(|sum| {
        with_f32(w, |ws| {
            (ws.len() == sum.len() / rows(x)).then(|| normed(sum, ws, eps))
        })
        .flatten()
    });
    match (sum, normed) {
        (Some(sum), Some(out)) => Ok((
            Tensor::from_vec(sum, x.shape(), x.device())?,
            Tensor::from_vec(out, x.shape(), x.device())?,
        )),
        _ => {
            let sum = (x + a)?;
            let out = candle_nn::ops::rms_norm(&sum, w, eps)?;
            Ok((sum, out))
        }
    }
}

/// Rows of `x`: all but its last dimension (1 for a scalar).
fn rows(x: &Tensor) -> usize {
    let dims = x.dims();
    dims[..dims.len().saturating_sub(1)]
        .iter()
        .product::<usize>()
        .max(1)
}

/// `f` of the elements of a contiguous f32 CPU tensor, read in place; `None` for anything
/// else (other devices and dtypes, strided views).
fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return None;
    }
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&data[start..end]))
}

/// Each row of `x` (rows of `w.len()`) normed and scaled by `w`, with candle's arithmetic
/// exactly (its order of the sum, `x / m · w`): the outputs are the ones candle's op gives,
/// to the bit.
fn normed(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if w.is_empty() {
        return out;
    }
    let one = |(row, o): (&[f32], &mut [f32])| {
        let sum = row.iter().map(|v| v * v).sum::<f32>();
        let m = (sum / w.len() as f32 + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = v / m * w;
        }
    };
    // The sum is a chain of dependent adds (about a microsecond a 576-wide row): with the
    // 16 rows of a 16-stream step, the rows are split across the pool the model runs in.
    if x.len() / w.len() >= 8 {
        x.par_chunks_exact(w.len())
            .zip(out.par_chunks_exact_mut(w.len()))
            .with_min_len(4)
            .for_each(one);
    } else {
        x.chunks_exact(w.len())
            .zip(out.chunks_exact_mut(w.len()))
            .for_each(one);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                    / (1 << 24) as f32
                    * 4.0
                    - 2.0
            })
            .collect()
    }

    /// Against candle's ops (and so against the plain formula), for a width with a tail
    /// that is not a multiple of 16, and 16 rows (split across threads).
    #[test]
    fn the_fused_add_and_norm_equal_candles_ops() {
        for (rows, width) in [(5usize, 576usize), (5, 69), (16, 576)] {
            let x = Tensor::from_vec(noise(rows * width, 1), (rows, width), &Device::Cpu).unwrap();
            let a = Tensor::from_vec(noise(rows * width, 2), (rows, width), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(noise(width, 3), width, &Device::Cpu).unwrap();
            let (sum, out) = add_rms_norm(&x, &a, &w, 1e-5).unwrap();
            let want_sum = (&x + &a).unwrap();
            let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).unwrap();
            let diff = |p: &Tensor, q: &Tensor| {
                (p - q)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert_eq!(diff(&sum, &want_sum), 0.0);
            assert!(
                diff(&out, &want) < 1e-5,
                "width {width}: {}",
                diff(&out, &want)
            );
            let alone = rms_norm(&want_sum, &w, 1e-5).unwrap();
            assert_eq!(diff(&alone, &out), 0.0);
        }
    }
}
