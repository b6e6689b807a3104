//! A step interrupted between two layers, kept so that the same step resumes there instead of
//! starting again: the residual stream at the start of the layer it stopped before. The
//! keys and values of the layers it finished already lie in each cache past its length, and
//! stay valid while the cache is neither committed nor released: a [`StepKey`] names each
//! cache by identity and generation, so a changed batch or cache never resumes.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Tensor;

use super::cache::SeqCache;
use super::decoder::BatchItem;

/// A fresh identity for each cache made.
pub(super) fn next_cache_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What a step was: each item's cache (identity, generation, length) and tokens.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct StepKey(Vec<(u64, u64, usize, Vec<u32>)>);

impl StepKey {
    pub fn of(batch: &[BatchItem<'_>]) -> Self {
        Self(
            batch
                .iter()
                .map(|b| {
                    let c: &SeqCache = b.cache;
                    (c.id, c.generation, c.len, b.tokens.to_vec())
                })
                .collect(),
        )
    }
}

/// An interrupted step: resume `key` at `layer` with the residual `x` and its norm `h`.
pub(super) struct Suspended {
    pub key: StepKey,
    pub layer: usize,
    pub x: Tensor,
    pub h: Tensor,
}

impl Suspended {
    /// `batch`'s step, paused before `layer` with the residual `x` and its norm `h` (the
    /// caches have not grown: their lengths are the step's start).
    pub fn of(batch: &[BatchItem<'_>], layer: usize, x: Tensor, h: Tensor) -> Self {
        Self {
            key: StepKey::of(batch),
            layer,
            x,
            h,
        }
    }
}
