//! The paged KV cache (Kwon et al., "Efficient Memory Management for Large Language Model
//! Serving with PagedAttention", 2023): keys and values live in fixed-size blocks of one pool
//! sized once (`--kv-cache-mb`); each sequence holds a table of its blocks, so growing never
//! copies, sequences with a common prompt prefix share its blocks, and the pool is the only
//! memory that grows with load. [`attention`] is the fused CPU attention that reads them.

pub mod attention;
pub mod blocks;

pub use attention::{paged_attention, Rope};
pub use blocks::{BlockAllocator, BLOCK_TOKENS};

/// The shape of the cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    /// Floats per block per layer, for K (the same again for V).
    fn block_floats(&self) -> usize {
        self.kv_heads * BLOCK_TOKENS * self.head_dim
    }

    /// Bytes one block takes across all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_floats() * std::mem::size_of::<f32>()
    }
}

/// One sequence's blocks, in position order, and the hashes of those already registered in
/// the prefix cache (full blocks whose keys and values are computed).
#[derive(Debug, Default)]
pub struct SeqBlocks {
    pub blocks: Vec<u32>,
    pub hashes: Vec<u64>,
}

/// Keys and values for every block, per layer as `[block][kv_head][slot][dim]`, and the book-
/// keeping of who holds which block.
pub struct KvPool {
    geo: KvGeometry,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pub alloc: BlockAllocator,
}

impl KvPool {
    /// A pool of `blocks` blocks. Its memory is zeroed lazily by the OS: pages count towards
    /// the process's resident size only once a block is written.
    pub fn new(geo: KvGeometry, blocks: usize) -> Self {
        let floats = blocks * geo.block_floats();
        Self {
            geo,
            k: (0..geo.layers).map(|_| vec![0.0; floats]).collect(),
            v: (0..geo.layers).map(|_| vec![0.0; floats]).collect(),
            alloc: BlockAllocator::new(blocks),
        }
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geo
    }

    /// Tokens the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.alloc.total() * BLOCK_TOKENS
    }

    /// Index of `(block, kv_head, slot)`'s first float in a layer's K or V.
    fn at(&self, block: u32, head: usize, slot: usize) -> usize {
        ((block as usize * self.geo.kv_heads + head) * BLOCK_TOKENS + slot) * self.geo.head_dim
    }

    /// Stores one token's keys and values (`[kv_heads * dim]` each) at position `pos`.
    fn write(&mut self, layer: usize, seq: &SeqBlocks, pos: usize, k: &[f32], v: &[f32]) {
        let d = self.geo.head_dim;
        let block = seq.blocks[pos / BLOCK_TOKENS];
        for h in 0..self.geo.kv_heads {
            let at = self.at(block, h, pos % BLOCK_TOKENS);
            self.k[layer][at..at + d].copy_from_slice(&k[h * d..(h + 1) * d]);
            self.v[layer][at..at + d].copy_from_slice(&v[h * d..(h + 1) * d]);
        }
    }

    /// Gives `seq` blocks for `len` tokens. On `false` the pool is exhausted; blocks taken
    /// so far stay with the sequence.
    pub fn reserve(&mut self, seq: &mut SeqBlocks, len: usize) -> bool {
        while seq.blocks.len() * BLOCK_TOKENS < len {
            match self.alloc.allocate() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Hands every block of `seq` back.
    pub fn release(&mut self, seq: &mut SeqBlocks) {
        for b in seq.blocks.drain(..) {
            self.alloc.release(b);
        }
        seq.hashes.clear();
    }

    /// Shares the cached blocks that hold a prefix of `tokens` with an empty `seq`, and
    /// returns how many tokens they cover. The last token is never taken from the cache: its
    /// logits are needed.
    pub fn match_prefix(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) -> usize {
        debug_assert!(seq.blocks.is_empty());
        let full = tokens.len().saturating_sub(1) / BLOCK_TOKENS;
        let mut parent = 0;
        for chunk in tokens.chunks_exact(BLOCK_TOKENS).take(full) {
            let Some((b, hash)) = self.alloc.lookup(parent, chunk) else {
                break;
            };
            self.alloc.share(b);
            seq.blocks.push(b);
            seq.hashes.push(hash);
            parent = hash;
        }
        seq.blocks.len() * BLOCK_TOKENS
    }

    /// Registers the blocks that `tokens` (the sequence's tokens whose keys and values are
    /// now stored) fill completely, so later sequences can share them.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) {
        let full = tokens.len() / BLOCK_TOKENS;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(0);
            let chunk = &tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS];
            let hash = self.alloc.register(seq.blocks[i], parent, chunk);
            seq.hashes.push(hash);
        }
    }
}
