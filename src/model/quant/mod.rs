//! Our own CPU kernels for quantized weights: matrix × activations where the weights are
//! 4- or 8-bit blocks and the activations are quantized to 8 bits on the fly, as llama.cpp
//! does, with AVX-512 VNNI, AVX-VNNI and AVX2/FMA paths (the best this CPU has, detected
//! once at run time) and a portable fallback. The SIMD paths read weights repacked into
//! panels of 16 rows ([`panel`]), tiles of rows × tokens held in registers.
//!
//! GGML's formats are decoded once at load time ([`unpack`]) into two layouts that the
//! kernels read without branching on the format:
//! - [`Q4Matrix`] (Q4_0, Q4_1, Q4_K): 32-element blocks of 4-bit `q`, `x = scale·q + min`;
//! - [`Q8Matrix`] (Q8_0, Q6_K): signed 8-bit `q` in 16-element groups, `x = scale·q`.
//!
//! [`Linear`] is what the model holds: our packed matrix on the CPU, or candle's `QMatMul`
//! where we have no kernel (CUDA, f32/f16 weights, other GGML types). Several matrices that
//! read the same input (Q, K and V; gate and up) are fused into one, so the input is
//! quantized once and the thread pool is woken once.

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod kernels;
pub mod panel;
#[cfg(target_arch = "x86_64")]
mod panel_avx2;
#[cfg(target_arch = "x86_64")]
mod panel_avx512;
pub mod unpack;

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor};
use half::f16;
use rayon::ThreadPool;
use thiserror::Error;

pub use kernels::{matmul, matmul_parts, matmul_parts_on, Isa, Q8Acts};
pub use panel::Panels;
pub use unpack::Unpacked;

#[derive(Debug, Error)]
pub enum QuantError {
    #[error("no kernel for GGML type {0:?}")]
    Format(GgmlDType),
    #[error("bad quantized matrix: {0}")]
    Shape(String),
}

/// 4-bit weights, `n` rows of `k` (scales in f16, as GGML keeps them: see [`unpack`]). Row `r`'s block `b` (elements `32b..32b+32`) is
/// `qs[(r·k/32 + b)·16 ..][..16]`: byte `j` holds element `j` in its low nibble and element
/// `j + 16` in its high nibble (GGML's Q4_0 order), with `scale` and `min` at the same index.
#[derive(Debug, Clone)]
pub struct Q4Matrix {
    pub n: usize,
    pub k: usize,
    pub qs: Vec<u8>,
    pub scale: Vec<f16>,
    pub min: Vec<f16>,
}

impl Q4Matrix {
    pub fn zeros(n: usize, k: usize) -> Self {
        Self {
            n,
            k,
            qs: vec![0; n * k / 2],
            scale: vec![f16::ZERO; n * k / 32],
            min: vec![f16::ZERO; n * k / 32],
        }
    }
}

/// 8-bit weights, `n` rows of `k`, row-major `qs`, one `scale` per 16 elements, and for the
/// formats that have one (Q5_1, Q5_K) a `min` per 32 elements: `x = scale·q + min`. `min` is
/// empty otherwise, and the kernels skip its term.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    pub n: usize,
    pub k: usize,
    pub qs: Vec<i8>,
    pub scale: Vec<f16>,
    pub min: Vec<f16>,
}

impl Q8Matrix {
    pub fn zeros(n: usize, k: usize) -> Self {
        Self {
            n,
            k,
            qs: vec![0; n * k],
            scale: vec![f16::ZERO; n * k / 16],
            min: Vec::new(),
        }
    }
}

impl Unpacked {
    pub fn rows(&self) -> usize {
        match self {
            Unpacked::Q4(m) => m.n,
            Unpacked::Q8(m) => m.n,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Unpacked::Q4(m) => m.k,
            Unpacked::Q8(m) => m.k,
        }
    }

    /// Several matrices of one width, side by side: each run of neighbours in one layout
    /// stacked into one matrix (see [`Self::stack`]), the runs kept in order.
    pub fn stack_runs(parts: Vec<Unpacked>) -> Result<Vec<Unpacked>, QuantError> {
        let mut runs: Vec<Unpacked> = Vec::new();
        for p in parts {
            if runs.last().is_some_and(|r| r.cols() != p.cols()) {
                return Err(QuantError::Shape(
                    "side-by-side matrices differ in width".into(),
                ));
            }
            match runs.pop() {
                Some(last) if std::mem::discriminant(&last) == std::mem::discriminant(&p) => {
                    runs.push(Self::stack(vec![last, p])?)
                }
                Some(last) => runs.extend([last, p]),
                None => runs.push(p),
            }
        }
        if runs.is_empty() {
            return Err(QuantError::Shape("nothing to stack".into()));
        }
        Ok(runs)
    }

    /// The rows of several matrices of one layout and width, stacked: one matrix whose
    /// output is theirs side by side.
    pub fn stack(parts: Vec<Unpacked>) -> Result<Unpacked, QuantError> {
        let mut parts = parts.into_iter();
        let mut acc = parts
            .next()
            .ok_or_else(|| QuantError::Shape("nothing to stack".into()))?;
        for p in parts {
            match (&mut acc, p) {
                (Unpacked::Q4(a), Unpacked::Q4(b)) if a.k == b.k => {
                    a.n += b.n;
                    a.qs.extend(b.qs);
                    a.scale.extend(b.scale);
                    a.min.extend(b.min);
                }
                (Unpacked::Q8(a), Unpacked::Q8(b)) if a.k == b.k => {
                    // One part with a min and one without: the other's mins are zero.
                    match (a.min.is_empty(), b.min.is_empty()) {
                        (true, false) => a.min = vec![f16::ZERO; a.n * a.k / 32],
                        (false, true) => a.min.resize(a.min.len() + b.n * b.k / 32, f16::ZERO),
                        _ => {}
                    }
                    a.n += b.n;
                    a.qs.extend(b.qs);
                    a.scale.extend(b.scale);
                    a.min.extend(b.min);
                }
                _ => return Err(QuantError::Shape("stacked matrices differ".into())),
            }
        }
        Ok(acc)
    }

    /// Every weight as f32 (tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            Unpacked::Q4(m) => (0..m.n * m.k)
                .map(|i| {
                    let (b, j) = (i / 32, i % 32);
                    let byte = m.qs[b * 16 + j % 16];
                    let q = if j < 16 { byte & 0x0F } else { byte >> 4 };
                    m.scale[b].to_f32() * q as f32 + m.min[b].to_f32()
                })
                .collect(),
            Unpacked::Q8(m) => (0..m.n * m.k)
                .map(|i| {
                    let min = m.min.get(i / 32).map_or(0.0, |v| v.to_f32());
                    m.scale[i / 16].to_f32() * m.qs[i] as f32 + min
                })
                .collect(),
        }
    }
}

/// A matrix as the kernels read it: in panels of 16 rows (the tiled kernels of every SIMD
/// set; see [`panel`]), or in rows (the portable code, where the CPU has no AVX2).
#[derive(Clone)]
pub enum Packed {
    Rows(Unpacked),
    Panels(Panels),
}

impl Packed {
    /// `w` in the layout that `isa`'s kernels read.
    pub fn for_isa(w: Unpacked, isa: Isa) -> Packed {
        if isa != Isa::Portable && isa.available() {
            Packed::Panels(Panels::from_rows(&w))
        } else {
            Packed::Rows(w)
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Packed::Rows(w) => w.rows(),
            Packed::Panels(p) => p.n,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Packed::Rows(w) => w.cols(),
            Packed::Panels(p) => p.k,
        }
    }
}

/// A weight matrix used as `y = x · Wᵀ`.
pub enum Linear {
    /// Our kernels, on the CPU, with the pool that splits rows across threads: one matrix, or
    /// several side by side where their layouts differ.
    Packed {
        parts: Vec<Packed>,
        pool: Arc<ThreadPool>,
    },
    /// candle's matmul; several parts are run one after another and concatenated.
    Candle(Vec<QMatMul>),
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Packed { parts, pool } => x.contiguous()?.apply_op1_no_bwd(&PackedMatmulOp {
                parts,
                pool: pool.as_ref(),
            }),
            Linear::Candle(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                if outs.len() == 1 {
                    Ok(outs.into_iter().next().expect("one"))
                } else {
                    Tensor::cat(&outs, candle_core::D::Minus1)
                }
            }
        }
    }
}

/// The candle op that runs our kernel on an f32 CPU tensor `[.., k]` → `[.., n]`.
struct PackedMatmulOp<'a> {
    parts: &'a [Packed],
    pool: &'a ThreadPool,
}

impl CustomOp1 for PackedMatmulOp<'_> {
    fn name(&self) -> &'static str {
        "idlerig-packed-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let k = self.parts[0].cols();
        let n: usize = self.parts.iter().map(Packed::rows).sum();
        let dims = layout.shape().dims();
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!(
                "packed matmul takes f32 activations, got {:?}",
                storage.dtype()
            );
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed matmul takes contiguous activations");
        };
        if dims.last() != Some(&k) {
            candle_core::bail!("packed matmul: input {dims:?} does not end in {k}");
        }
        let x = &data[start..end];
        let rows = x.len() / k;
        let out = matmul_parts(self.parts, x, rows, self.pool);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = n;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests;
