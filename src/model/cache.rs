//! A sequence's keys and values, in one of two layouts. On the CPU they live in blocks of the
//! model's paged pool ([`super::paged`]). On CUDA (and in the CPU twin of that path, `--kv-layout
//! dense`) each sequence has dense per-layer buffers, grown in place by a quarter at a time,
//! and a [`DenseBudget`] admits only what `--kv-cache-mb` holds: the engine's reservations,
//! pre-emptions and refusals then work as with the paged pool, and a full GPU means a request
//! waits or is refused, never an out-of-memory error.

use candle_core::Tensor;

use super::paged::{SeqBlocks, BLOCK_TOKENS};

/// Dense capacity grows in steps of this many tokens (at least), so a decoding sequence
/// copies its cache O(log n) times, not once per token.
const DENSE_STEP: usize = 64;

/// Keys and values of one sequence for every layer.
pub struct SeqCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(super) len: usize,
    pub(super) paged: SeqBlocks,
    /// Dense layout under a budget: tokens of capacity reserved for this sequence.
    pub(super) reserved: usize,
    /// Identity and generation (bumped when the cache is emptied): an interrupted step
    /// resumes only on the same cache of the same generation (see `suspend`).
    pub(super) id: u64,
    pub(super) generation: u64,
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            paged: SeqBlocks::default(),
            reserved: 0,
            id: super::suspend::next_cache_id(),
            generation: 0,
        }
    }

    /// Tokens already in the cache: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the cache holds any KV memory (computed entries, reserved blocks or capacity).
    pub fn holds_blocks(&self) -> bool {
        self.len > 0 || !self.paged.blocks.is_empty() || self.reserved > 0
    }

    /// Appends `k`, `v` (`[kv_heads, t, head_dim]`) to layer `layer` and returns that layer's
    /// whole cache, the new entries included, as views of the buffers (no copy).
    pub(super) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let needed = self.len + k.dim(1)?;
        let capacity = self.layers[layer]
            .as_ref()
            .map_or(0, |(ck, _)| ck.dim(1).unwrap_or(0));
        if needed > capacity {
            // Under a budget the reservation says how big; without one, double.
            let new_cap = if self.reserved >= needed {
                self.reserved
            } else {
                needed.max(capacity * 2).max(DENSE_STEP)
            };
            let (h, _, d) = k.dims3()?;
            let grow = |old: Option<&Tensor>| -> candle_core::Result<Tensor> {
                let fresh = Tensor::zeros((h, new_cap, d), k.dtype(), k.device())?;
                if let (Some(old), true) = (old, self.len > 0) {
                    fresh.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(fresh)
            };
            let old = self.layers[layer].as_ref();
            let grown = (grow(old.map(|(k, _)| k))?, grow(old.map(|(_, v)| v))?);
            self.layers[layer] = Some(grown);
        }
        let (ck, cv) = self.layers[layer].as_ref().expect("allocated above");
        ck.slice_set(&k.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((ck.narrow(1, 0, needed)?, cv.narrow(1, 0, needed)?))
    }

    /// Marks `t` more tokens as cached, once every layer has appended them.
    pub(super) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// The dense layout's admission budget, in tokens of capacity across all sequences.
#[derive(Debug)]
pub struct DenseBudget {
    total: usize,
    used: usize,
    context_length: usize,
}

impl DenseBudget {
    /// `mib` of memory at `bytes_per_token` (every layer's K and V), in whole 16-token blocks
    /// so that the figures read like the paged pool's.
    pub fn new(mib: usize, bytes_per_token: usize, context_length: usize) -> Self {
        let tokens = (mib << 20) / bytes_per_token.max(1);
        Self {
            total: tokens / BLOCK_TOKENS * BLOCK_TOKENS,
            used: 0,
            context_length,
        }
    }

    /// Makes room for `len` tokens in `cache`: a quarter more than asked (at least
    /// [`DENSE_STEP`]) when the budget allows, else exactly what is asked; `false` when even
    /// that does not fit.
    pub fn reserve(&mut self, cache: &mut SeqCache, len: usize) -> bool {
        if len <= cache.reserved {
            return true;
        }
        let roomy = (len.max(cache.reserved + cache.reserved / 4))
            .next_multiple_of(DENSE_STEP)
            .min(self.context_length.max(len));
        let tight = len
            .next_multiple_of(BLOCK_TOKENS)
            .min(self.context_length.max(len));
        for want in [roomy, tight] {
            let more = want - cache.reserved;
            if self.used + more <= self.total {
                self.used += more;
                cache.reserved = want;
                return true;
            }
        }
        false
    }

    /// Gives back everything `cache` holds.
    pub fn release(&mut self, cache: &mut SeqCache) {
        self.used -= cache.reserved.min(self.used);
        cache.reserved = 0;
    }

    /// (blocks used, blocks in all) in 16-token blocks.
    pub fn usage(&self) -> (usize, usize) {
        (self.used.div_ceil(BLOCK_TOKENS), self.total / BLOCK_TOKENS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_what_fits_and_gets_everything_back() {
        // 1 MiB at 4 KiB a token: 256 tokens.
        let mut b = DenseBudget::new(1, 4096, 4096);
        let (mut x, mut y) = (SeqCache::new(1), SeqCache::new(1));
        assert!(b.reserve(&mut x, 10));
        assert_eq!(x.reserved, 64, "a roomy first step");
        assert!(b.reserve(&mut x, 64), "within what it holds");
        assert!(b.reserve(&mut x, 150));
        assert_eq!(x.reserved, 192);
        assert!(b.reserve(&mut y, 60));
        assert!(
            !b.reserve(&mut y, 100),
            "192 + 112 tokens do not fit in 256"
        );
        assert!(y.holds_blocks());
        assert_eq!(b.usage(), (16, 16));
        b.release(&mut x);
        assert!(b.reserve(&mut y, 100));
        b.release(&mut y);
        assert_eq!(b.usage(), (0, 16));
        // Never beyond the context window, even when roomy.
        let mut c = DenseBudget::new(1, 4096, 100);
        let mut z = SeqCache::new(1);
        assert!(c.reserve(&mut z, 90));
        assert_eq!(z.reserved, 100);
    }
}
