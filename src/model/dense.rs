//! Attention over dense per-sequence caches, in candle operations: the layout CUDA serves
//! with (and its CPU twin, `--kv-layout dense`). Per sequence: rotate Q and K, append K and V
//! to the sequence's cache, and attend over views of it under the step's mask. The paged
//! cache's body is [`super::paged::attention`]; both take the same [`AttnParams`].

use candle_core::{DType, Device, Tensor};

use super::cache::SeqCache;
use super::paged::AttnParams;
use super::rope::Rope;

/// A [`Rope`]'s tables as tensors in the activations' type (rotation needs both in one).
pub struct RopeTensors {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl RopeTensors {
    pub fn new(rope: &Rope, device: &Device, dtype: DType) -> candle_core::Result<Self> {
        let shape = (rope.positions(), rope.half);
        Ok(Self {
            cos: Tensor::from_slice(&rope.cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_slice(&rope.sin, shape, device)?.to_dtype(dtype)?,
            interleaved: rope.interleaved,
        })
    }

    /// Rotates `x` (`[1, heads, t, head_dim]`) whose first token sits at `pos`.
    fn apply(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(x, &cos, &sin)
        }
    }
}

/// The mask of `t` new tokens at positions `pos..pos + t` over `pos + t` cached ones,
/// `[t, pos + t]` of 0 and −∞: the future is hidden, and with a window so is every key at
/// `window` or more positions behind the query. Built on `device` from two index vectors (not
/// a `t × n` host buffer), once per step and sequence; `None` when nothing is hidden (one
/// token that sees everything).
pub fn attention_mask(
    t: usize,
    pos: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let n = pos + t;
    let windowed = window.is_some_and(|w| n > w);
    if t <= 1 && !windowed {
        return Ok(None);
    }
    let rows = Tensor::arange(pos as u32, n as u32, device)?.reshape((t, 1))?;
    let cols = Tensor::arange(0u32, n as u32, device)?.reshape((1, n))?;
    let mut hidden = cols.broadcast_gt(&rows)?;
    if let (Some(w), true) = (window, windowed) {
        // col + w <= row: the key lies `w` or more positions behind.
        let behind = (cols.broadcast_add(&Tensor::new(w as u32, device)?)?).broadcast_le(&rows)?;
        hidden = (hidden + behind)?.clamp(0u8, 1u8)?;
    }
    let neg = Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as((t, n))?;
    let zero = Tensor::zeros((t, n), DType::F32, device)?;
    Ok(Some(hidden.where_cond(&neg, &zero)?))
}

/// The shape of one layer's heads.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

/// One layer's attention for a batch: `q`, `k`, `v` are `[tokens, heads · dim]` for all
/// sequences, each item's rows in turn (`tokens[i]` of them, its cache at `caches[i]`), and
/// `masks` hold each item's mask for this layer's kind. Returns `[tokens, heads · dim]`.
#[allow(clippy::too_many_arguments)]
pub fn dense_attention(
    layer: usize,
    heads: Heads,
    params: AttnParams,
    rope: &RopeTensors,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    items: &mut [(usize, &mut SeqCache)],
    masks: &[Option<Tensor>],
) -> candle_core::Result<Tensor> {
    let mut outputs = Vec::with_capacity(items.len());
    let mut row = 0;
    for ((t, cache), mask) in items.iter_mut().zip(masks) {
        let (t, pos) = (*t, cache.len());
        let split = |m: &Tensor, h: usize| -> candle_core::Result<Tensor> {
            m.narrow(0, row, t)?
                .reshape((1, t, h, heads.dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let qs = rope.apply(&split(q, heads.q)?, pos)?;
        let ks = rope.apply(&split(k, heads.kv)?, pos)?;
        let vs = split(v, heads.kv)?;
        let (ck, cv) = cache.append(layer, &ks.squeeze(0)?, &vs.squeeze(0)?)?;
        outputs.push(attend(
            heads,
            params,
            &qs.squeeze(0)?,
            &ck,
            &cv,
            mask.as_ref(),
        )?);
        row += t;
    }
    if outputs.len() == 1 {
        Ok(outputs.pop().expect("one"))
    } else {
        Tensor::cat(&outputs, 0)
    }
}

/// Attention of `q` (`[heads, t, d]`) over the cache (`[kv_heads, pos + t, d]`, views into
/// the sequence's buffers: neither K nor V is copied). Query heads sharing a KV head are
/// folded into its rows, so grouped-query attention needs no copy of K or V per query head.
fn attend(
    heads: Heads,
    params: AttnParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let t = q.dim(1)?;
    let groups = heads.q / heads.kv;
    let kv_len = k.dim(1)?;
    let q = q.reshape((heads.kv, groups * t, heads.dim))?;
    let mut scores = (q.matmul(&k.t()?)? * f64::from(params.scale))?;
    if let Some(c) = params.softcap {
        scores = ((scores / f64::from(c))?.tanh()? * f64::from(c))?;
    }
    let scores = match mask {
        Some(mask) => scores
            .reshape((heads.kv, groups, t, kv_len))?
            .broadcast_add(&mask.to_dtype(scores.dtype())?)?
            .reshape((heads.kv, groups * t, kv_len))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(v)?; // [kv_heads, groups * t, d]
    out.reshape((heads.q, t, heads.dim))?
        .transpose(0, 1)?
        .reshape((t, heads.q * heads.dim))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_hides_the_future_and_what_lies_beyond_the_window() {
        for window in [None, Some(1), Some(2), Some(4), Some(100)] {
            let (t, pos) = (3, 2);
            let m = attention_mask(t, pos, window, &Device::Cpu)
                .unwrap()
                .unwrap();
            for (i, row) in m.to_vec2::<f32>().unwrap().iter().enumerate() {
                let p = pos + i;
                for (j, &x) in row.iter().enumerate() {
                    let hidden = j > p || window.is_some_and(|w| p - j >= w);
                    assert_eq!(x == f32::NEG_INFINITY, hidden, "{window:?} ({i}, {j})");
                }
            }
        }
        assert!(attention_mask(1, 9, None, &Device::Cpu).unwrap().is_none());
        assert!(attention_mask(1, 9, Some(10), &Device::Cpu)
            .unwrap()
            .is_none());
        let one = attention_mask(1, 9, Some(4), &Device::Cpu)
            .unwrap()
            .expect("a decoded token past the window hides the oldest keys");
        let row = one.to_vec2::<f32>().unwrap().remove(0);
        assert_eq!(row.iter().filter(|x| x.is_finite()).count(), 4);
    }
}
