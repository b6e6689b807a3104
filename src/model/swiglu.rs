//! SwiGLU in one pass on the CPU: the MLP's fused gate-and-up product `[rows, 2·inter]` in,
//! `silu(gate) · up` `[rows, inter]` out. It replaces candle's narrow, `silu` (a library
//! `expf` per element) and multiply, which copied the halves around.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::paged::attend::{silu_mul, AttnPath};

/// The candle op; `inter` is the width of each half.
pub struct SwiGlu {
    pub inter: usize,
    pub path: AttnPath,
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "idlerig-swiglu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("swiglu takes f32, got {:?}", storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("swiglu takes a contiguous input");
        };
        let dims = layout.shape().dims();
        let inter = self.inter;
        if dims.last() != Some(&(2 * inter)) || inter == 0 {
            candle_core::bail!("swiglu: input {dims:?} does not end in 2×{inter}");
        }
        let x = &data[start..end];
        let mut out = vec![0.0f32; x.len() / 2];
        let row = |(o, x): (&mut [f32], &[f32])| {
            let (gate, up) = x.split_at(inter);
            silu_mul(self.path, gate, up, o);
        };
        // Prompts and many streams: rows across the pool the caller runs in (a 16-stream
        // step's rows inline were a serial section, the other thread idle); a few rows are
        // cheaper inline.
        if out.len() / inter >= 8 {
            out.par_chunks_mut(inter)
                .zip(x.par_chunks(2 * inter))
                .with_min_len(2)
                .for_each(row);
        } else {
            out.chunks_mut(inter).zip(x.chunks(2 * inter)).for_each(row);
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = inter;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Every path against candle's `silu(gate) · up`, over values that reach both tails of
    /// the sigmoid, at a width that leaves a tail after the 16-lane chunks.
    #[test]
    fn swiglu_equals_candles_silu_times_up_on_every_path() {
        let (rows, inter) = (3, 37);
        let x: Vec<f32> = (0..rows * 2 * inter)
            .map(|i| ((i * 7919) % 401) as f32 / 4.0 - 50.0)
            .collect();
        let t = Tensor::from_vec(x, (rows, 2 * inter), &Device::Cpu).unwrap();
        let gate = t.narrow(1, 0, inter).unwrap();
        let up = t.narrow(1, inter, inter).unwrap();
        let want = (candle_nn::ops::silu(&gate).unwrap() * up)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for path in [AttnPath::Avx512, AttnPath::Avx2, AttnPath::Portable] {
            if !path.available() {
                continue;
            }
            let got = t
                .apply_op1_no_bwd(&SwiGlu { inter, path })
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{path:?} element {i}: {g} vs {w}"
                );
            }
        }
    }
}
