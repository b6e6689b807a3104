//! Fused causal attention over the paged cache, on the CPU: rotary embeddings, storing the new
//! keys and values in their blocks (a row a task), and each query head's softmax-weighted sum
//! over its sequence's blocks (`attend`), all in one call per layer. It replaces ~20 small candle operations per sequence and layer, which cost
//! more than their arithmetic at decode time.

use rayon::prelude::*;

use super::attend::{self, AttnPath, Job};
use super::{KvPool, SeqBlocks};
pub use crate::model::rope::Rope;

/// What differs between one layer's attention and another's besides the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    /// The factor on Q·K.
    pub scale: f32,
    /// `c·tanh(s / c)` on the scaled scores.
    pub softcap: Option<f32>,
    /// Keys a query sees, itself included: positions `p − window < j ≤ p`.
    pub window: Option<usize>,
}

/// One sequence's part of a step: its blocks (already reserved for `pos + tokens`), the
/// position of its first new token, and how many new tokens (rows) it has.
pub struct PagedItem<'a> {
    pub blocks: &'a SeqBlocks,
    pub pos: usize,
    pub tokens: usize,
}

/// Attention of one layer for a batch. `qkv` holds each new token's row of Q, K and V
/// (`[(heads + 2 kv_heads) * dim]`, before the rotary embedding), sequences one after the
/// other; returns `[rows, heads * dim]`.
pub fn paged_attention(
    pool: &mut KvPool,
    layer: usize,
    rope: &Rope,
    params: AttnParams,
    items: &[PagedItem<'_>],
    qkv: &mut [f32],
) -> Vec<f32> {
    let path = AttnPath::for_isa(crate::model::quant::Isa::best());
    paged_attention_on(path, pool, layer, rope, params, items, qkv)
}

/// [`paged_attention`] with the kernel compiled for `path` (tests run each). A path this CPU
/// lacks is run as the portable one, as `matmul_parts_on` does: a safe function must never
/// execute an instruction the CPU does not have.
pub fn paged_attention_on(
    path: AttnPath,
    pool: &mut KvPool,
    layer: usize,
    rope: &Rope,
    params: AttnParams,
    items: &[PagedItem<'_>],
    qkv: &mut [f32],
) -> Vec<f32> {
    let path = if path.available() {
        path
    } else {
        AttnPath::Portable
    };
    let g = pool.geometry();
    let d = g.head_dim;
    let width = (g.heads + 2 * g.kv_heads) * d;
    let rows: Vec<(usize, usize)> = items
        .iter()
        .enumerate()
        .flat_map(|(s, item)| (item.pos..item.pos + item.tokens).map(move |pos| (s, pos)))
        .collect();
    // Rotate Q and K and store K, V, a row a task: each row writes its own slot, and a
    // row's keys are spread over its block's cache lines (keys are stored transposed), so
    // the writes wait on memory more than they compute, and two threads overlap the waits.
    {
        let writer = pool.writer();
        let store = |(row, &(s, pos)): (&mut [f32], &(usize, usize))| {
            for h in 0..g.heads + g.kv_heads {
                rope.apply(&mut row[h * d..(h + 1) * d], pos);
            }
            let (k, v) = row[g.heads * d..].split_at(g.kv_heads * d);
            // SAFETY: each row is one position of its sequence, and each batch item has its
            // own block table (prefix sharing gives only full blocks, never written again).
            unsafe { writer.write(layer, items[s].blocks, pos, k, v) };
        };
        let qkv = &mut qkv[..rows.len() * width];
        if rows.len() >= 4 {
            qkv.par_chunks_mut(width)
                .zip(rows.par_iter())
                .for_each(store);
        } else {
            qkv.chunks_mut(width).zip(&rows).for_each(store);
        }
    }
    let mut out = vec![0.0f32; rows.len() * g.heads * d];
    let pool = &*pool;
    let qkv = &*qkv;
    let group = g.heads / g.kv_heads;
    // Prompts: each task takes every query head of one KV head (they share the keys and
    // values read). Decode of a few sequences: one head a task, so both threads have work.
    let per_task = if rows.len() * g.kv_heads >= 16 && group <= 8 {
        group
    } else {
        1
    };
    let heads_per_row = g.heads / per_task;
    let job_at = |c: usize| {
        let (row, h) = (c / heads_per_row, c % heads_per_row * per_task);
        let (s, pos) = rows[row];
        let n = pos + 1;
        Job {
            pool,
            layer,
            seq: items[s].blocks,
            // A window shows at least the query's own position.
            start: params.window.map_or(0, |w| n.saturating_sub(w.max(1))),
            n,
            kv_head: h / group,
            q: &qkv[row * width + h * d..row * width + (h + per_task) * d],
            scale: params.scale,
            softcap: params.softcap,
        }
    };
    let one = |(c, o): (usize, &mut [f32])| attend::run(path, &job_at(c), per_task, o);
    // Work in position-heads; below this a thread hand-off costs more than it saves.
    let seen = |p: usize| params.window.map_or(p + 1, |w| (p + 1).min(w));
    let work: usize = rows.iter().map(|&(_, p)| seen(p)).sum::<usize>() * g.heads;
    if work >= 4 * 1024 {
        out.par_chunks_mut(d * per_task)
            .enumerate()
            .with_min_len(2)
            .for_each(one);
    } else {
        out.chunks_mut(d * per_task).enumerate().for_each(one);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{KvGeometry, KvPool, SeqBlocks, BLOCK_TOKENS};
    use super::*;
    use crate::model::config::RopeConfig;

    fn rope_cfg(interleaved: bool) -> RopeConfig {
        RopeConfig {
            theta: 10_000.0,
            interleaved,
            position_scale: 1.0,
            freq_factors: None,
            mscale: 1.0,
        }
    }
    use candle_core::{Device, Tensor};

    const GEO: KvGeometry = KvGeometry {
        layers: 2,
        heads: 6,
        kv_heads: 2,
        head_dim: 64,
    };

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn rope_matches_candles_rope_in_both_layouts() {
        for interleaved in [true, false] {
            let rope = Rope::new(&rope_cfg(interleaved), 64, 300);
            let x = noise(64, 3);
            for pos in [0usize, 1, 17, 299] {
                let mut ours = x.clone();
                rope.apply(&mut ours, pos);
                let t = Tensor::from_vec(x.clone(), (1, 1, 1, 64), &Device::Cpu).unwrap();
                let cos = Tensor::from_vec(
                    rope.cos[pos * 32..(pos + 1) * 32].to_vec(),
                    (1, 32),
                    &Device::Cpu,
                )
                .unwrap();
                let sin = Tensor::from_vec(
                    rope.sin[pos * 32..(pos + 1) * 32].to_vec(),
                    (1, 32),
                    &Device::Cpu,
                )
                .unwrap();
                let theirs = if interleaved {
                    candle_nn::rotary_emb::rope_i(&t, &cos, &sin)
                } else {
                    candle_nn::rotary_emb::rope(&t, &cos, &sin)
                }
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
                let d = ours
                    .iter()
                    .zip(&theirs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(d < 1e-5, "interleaved {interleaved} pos {pos}: {d}");
            }
        }
    }

    /// Straightforward causal attention in f64 over whole (already rotated) K and V: the
    /// query at position `n − 1` over the keys its window shows it.
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        n: usize,
        params: AttnParams,
    ) -> Vec<f64> {
        let d = q.len();
        let first = params.window.map_or(0, |w| n.saturating_sub(w));
        let scores: Vec<f64> = (first..n)
            .map(|j| {
                let s = q
                    .iter()
                    .zip(&keys[j])
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    * f64::from(params.scale);
                match params.softcap {
                    Some(c) => f64::from(c) * (s / f64::from(c)).tanh(),
                    None => s,
                }
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = w.iter().sum();
        (0..d)
            .map(|x| {
                (first..n)
                    .map(|j| w[j - first] * f64::from(values[j][x]))
                    .sum::<f64>()
                    / total
            })
            .collect()
    }

    #[test]
    fn paged_attention_equals_plain_attention_across_blocks_batches_and_layers() {
        let plain = AttnParams {
            scale: 1.0 / (GEO.head_dim as f32).sqrt(),
            softcap: None,
            window: None,
        };
        check_against_reference(plain);
    }

    /// Gemma's windowed layers (a window that ends inside a block and spans several) and
    /// Gemma 2's soft-capped scores, with a scale other than 1/√d.
    #[test]
    fn windowed_and_soft_capped_attention_equals_plain_attention() {
        for window in [1usize, 5, 20, 33] {
            check_against_reference(AttnParams {
                scale: 0.3,
                softcap: Some(2.5),
                window: Some(window),
            });
        }
    }

    const PATHS: [AttnPath; 3] = [AttnPath::Avx512, AttnPath::Avx2, AttnPath::Portable];

    fn check_against_reference(params: AttnParams) {
        check_geometry_against_reference(GEO, params);
    }

    /// A head size that leaves a tail after the kernels' 16-float chunks, and one query head
    /// per KV head.
    #[test]
    fn odd_head_sizes_equal_plain_attention() {
        // 80 and 96: groups of four 16-float chunks with one or two left over; 40 and 18: a
        // tail after the chunks.
        for head_dim in [80, 96, 40, 18] {
            let geo = KvGeometry {
                layers: 2,
                heads: 4,
                kv_heads: 4,
                head_dim,
            };
            for window in [None, Some(7)] {
                check_geometry_against_reference(
                    geo,
                    AttnParams {
                        scale: 0.2,
                        softcap: None,
                        window,
                    },
                );
            }
        }
    }

    /// Eight query heads to a KV head (the kernel's largest group, accumulators for two
    /// chunks at a time), with head sizes that leave a chunk and a tail over, a window and
    /// soft-capping.
    #[test]
    fn eight_query_heads_a_kv_head_equal_plain_attention() {
        for head_dim in [80, 18] {
            let geo = KvGeometry {
                layers: 1,
                heads: 8,
                kv_heads: 1,
                head_dim,
            };
            for (window, softcap) in [(None, None), (Some(21), Some(3.0))] {
                check_geometry_against_reference(
                    geo,
                    AttnParams {
                        scale: 0.25,
                        softcap,
                        window,
                    },
                );
            }
        }
    }

    fn check_geometry_against_reference(g: KvGeometry, params: AttnParams) {
        let (d, width) = (g.head_dim, (g.heads + 2 * g.kv_heads) * g.head_dim);
        let rope = Rope::new(&rope_cfg(false), d, 256);
        let mut pool = KvPool::new(g, 32);
        let mut seqs = [SeqBlocks::default(), SeqBlocks::default()];
        // Per sequence, layer and KV head: every rotated key and value so far.
        let mut keys = vec![vec![vec![Vec::<Vec<f32>>::new(); g.kv_heads]; 2]; 2];
        let mut values = keys.clone();
        let mut seed = 1;
        // Steps: prompts of 37 and 5 tokens, then a mixed step, then decodes.
        for (t0, t1) in [(37usize, 0usize), (1, 5), (1, 1), (20, 1), (1, 1)] {
            let counts = [t0, t1];
            for (s, &t) in counts.iter().enumerate() {
                let len = keys[s][0][0].len() + t;
                assert!(pool.reserve(&mut seqs[s], len));
            }
            for layer in 0..g.layers {
                let rows = t0 + t1;
                let pristine = noise(rows * width, seed);
                seed += 1;
                let items: Vec<PagedItem<'_>> = (0..2)
                    .filter(|&s| counts[s] > 0)
                    .map(|s| PagedItem {
                        blocks: &seqs[s],
                        pos: keys[s][layer][0].len(),
                        tokens: counts[s],
                    })
                    .collect();
                // Each kernel path on the same step (each stores the same keys and values);
                // one this CPU lacks runs as the portable path (it used to fault).
                let outs: Vec<(AttnPath, Vec<f32>)> = PATHS
                    .into_iter()
                    .map(|path| {
                        let mut qkv = pristine.clone();
                        let out = paged_attention_on(
                            path, &mut pool, layer, &rope, params, &items, &mut qkv,
                        );
                        (path, out)
                    })
                    .collect();
                let mut row = 0;
                for s in 0..2 {
                    for i in 0..counts[s] {
                        let pos = keys[s][layer][0].len();
                        let r = &pristine[row * width..(row + 1) * width];
                        for h in 0..g.kv_heads {
                            // The pool keeps f16: the reference gets the same rounding.
                            let f16 = |x: &f32| half::f16::from_f32(*x).to_f32();
                            let mut k = r[(g.heads + h) * d..(g.heads + h + 1) * d].to_vec();
                            rope.apply(&mut k, pos);
                            keys[s][layer][h].push(k.iter().map(f16).collect());
                            let v = (g.heads + g.kv_heads + h) * d;
                            values[s][layer][h].push(r[v..v + d].iter().map(f16).collect());
                        }
                        for h in 0..g.heads {
                            let mut q = r[h * d..(h + 1) * d].to_vec();
                            rope.apply(&mut q, pos);
                            let kv = h / (g.heads / g.kv_heads);
                            let want = reference(
                                &q,
                                &keys[s][layer][kv],
                                &values[s][layer][kv],
                                pos + 1,
                                params,
                            );
                            for (path, out) in &outs {
                                let at = (row * g.heads + h) * d;
                                let err = out[at..at + d]
                                    .iter()
                                    .zip(&want)
                                    .map(|(a, b)| (f64::from(*a) - b).abs())
                                    .fold(0.0, f64::max);
                                assert!(err < 1e-5, "{path:?} seq {s} token {i} head {h}: {err}");
                            }
                        }
                        row += 1;
                        let _ = i;
                    }
                }
            }
        }
        assert_eq!(
            seqs[0].blocks.len(),
            (37 + 1 + 1 + 20 + 1usize).div_ceil(BLOCK_TOKENS)
        );
    }
}
