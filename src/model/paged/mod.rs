//! The paged KV cache (Kwon et al., "Efficient Memory Management for Large Language Model
//! Serving with PagedAttention", 2023): keys and values live in fixed-size blocks of one pool
//! sized once (`--kv-cache-mb`); each sequence holds a table of its blocks, so growing never
//! copies, sequences with a common prompt prefix share its blocks, and the pool is the only
//! memory that grows with load. [`attention`] is the fused CPU attention that reads them.

pub(crate) mod attend;
#[cfg(target_arch = "x86_64")]
mod attend_x86;
pub mod attention;
pub mod blocks;

pub use attend::AttnPath;
pub use attention::{paged_attention, paged_attention_on, AttnParams, Rope};
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

    /// Bytes one block takes across all layers, K and V (f16 each, as llama.cpp keeps
    /// them).
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_floats() * std::mem::size_of::<u16>()
    }
}

/// Writes keys and values into a [`KvPool`] from several threads: each token of a step has
/// its own position, so its own slot of its own block, and no two writes touch the same
/// element (blocks shared through the prefix cache are full and never written again).
pub(super) struct KvWriter<'a> {
    k: *mut u16,
    v: *mut u16,
    len: usize,
    geo: KvGeometry,
    layer_floats: usize,
    _pool: std::marker::PhantomData<&'a mut KvPool>,
}

// SAFETY: the writer only writes, each call to elements no other call writes (see the
// type's comment), and it borrows the pool mutably for as long as it lives.
unsafe impl Send for KvWriter<'_> {}
unsafe impl Sync for KvWriter<'_> {}

impl KvWriter<'_> {
    /// Stores one token's keys and values (`[kv_heads * dim]` each) at position `pos`. A
    /// block's keys are transposed, `[dim][slot]`, so that attention scores its 16 slots
    /// side by side; its values stay `[slot][dim]`.
    ///
    /// # Safety
    /// Two calls at once must be for different positions of the same sequence, or for
    /// different sequences (which never share a block that is still being written): two
    /// calls for one position would write the same elements.
    pub(super) unsafe fn write(
        &self,
        layer: usize,
        seq: &SeqBlocks,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let d = self.geo.head_dim;
        let (block, slot) = (seq.blocks[pos / BLOCK_TOKENS], pos % BLOCK_TOKENS);
        assert!(
            layer < self.geo.layers
                && (block as usize + 1) * self.geo.block_floats() <= self.layer_floats
        );
        assert!(k.len() == self.geo.kv_heads * d && v.len() == k.len());
        for h in 0..self.geo.kv_heads {
            let area = layer * self.layer_floats
                + ((block as usize * self.geo.kv_heads + h) * BLOCK_TOKENS) * d;
            let at = area + slot * d;
            debug_assert!(area + BLOCK_TOKENS * d <= self.len);
            let (keys, values) = (&k[h * d..(h + 1) * d], &v[h * d..(h + 1) * d]);
            for c in (0..d).step_by(F16_CHUNK) {
                let end = (c + F16_CHUNK).min(d);
                let mut bits = [0u16; F16_CHUNK];
                to_f16_slice(&keys[c..end], &mut bits[..end - c]);
                // SAFETY: the asserts above keep `area..area + 16·d` (this block's keys and
                // values for head `h`) inside the pool; this position's elements in it are
                // written by this call alone (see the comment on the type).
                unsafe {
                    for (dim, &b) in (c..end).zip(&bits) {
                        *self.k.add(area + dim * BLOCK_TOKENS + slot) = b;
                    }
                    to_f16_slice(
                        &values[c..end],
                        std::slice::from_raw_parts_mut(self.v.add(at + c), end - c),
                    );
                }
            }
        }
    }
}

/// Values converted to f16 at a time by [`to_f16_slice`].
const F16_CHUNK: usize = 64;

/// Values as f16 bits, clamped to f16's finite range (an activation past ±65504 would
/// otherwise be stored as infinity and turn the attention into NaN); NaN stays NaN. F16C
/// eight at a time where the CPU has it: `half`'s slice conversion made a call per eight
/// values, and this conversion had grown to 1.7% of a 16-stream profile.
fn to_f16_slice(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c") {
        // SAFETY: AVX and F16C were detected just above.
        unsafe { to_f16_slice_f16c(x, out) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = to_f16_bits(v);
    }
}

fn to_f16_bits(v: f32) -> u16 {
    half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_bits()
}

/// # Safety
/// The CPU must have AVX and F16C; `out` must be as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn to_f16_slice_f16c(x: &[f32], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let (lo, hi) = (_mm256_set1_ps(-65504.0), _mm256_set1_ps(65504.0));
    let mut i = 0;
    while i + 8 <= x.len() {
        // max/min return their second operand when either is NaN: NaN passes through.
        let v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(x.as_ptr().add(i))));
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
        i += 8;
    }
    for j in i..x.len() {
        out[j] = to_f16_bits(x[j]);
    }
}

/// One sequence's blocks, in position order, and the hashes of those already registered in
/// the prefix cache (full blocks whose keys and values are computed).
#[derive(Debug, Default)]
pub struct SeqBlocks {
    pub blocks: Vec<u32>,
    pub hashes: Vec<u64>,
}

/// Keys and values for every block, in f16, as `[layer][block][kv_head]` areas (K:
/// `[dim][slot]`, V: `[slot][dim]`), and the bookkeeping of who holds which block. Half
/// precision halves what attention reads per position (and what the pool holds), as
/// llama.cpp's default f16 cache does; the products are taken in f32.
pub struct KvPool {
    geo: KvGeometry,
    /// One allocation each for K and V: a large zeroed allocation is mapped fresh from the
    /// OS, so its pages become resident only when written (per-layer vectors of a few MB
    /// could come from the heap and be cleared, all of them resident at once). The f16
    /// values are kept as their bits: `vec![0u16; n]` is such a zeroed allocation, where
    /// `vec![f16::ZERO; n]` would write every page.
    k: Vec<u16>,
    v: Vec<u16>,
    layer_floats: usize,
    pub alloc: BlockAllocator,
}

impl KvPool {
    /// A pool of `blocks` blocks. Its memory is zeroed lazily by the OS: pages count towards
    /// the process's resident size only once a block is written.
    pub fn new(geo: KvGeometry, blocks: usize) -> Self {
        let layer_floats = blocks * geo.block_floats();
        Self {
            geo,
            k: vec![0; geo.layers * layer_floats],
            v: vec![0; geo.layers * layer_floats],
            layer_floats,
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

    /// One layer's keys and values.
    fn layer(&self, layer: usize) -> (&[u16], &[u16]) {
        let r = layer * self.layer_floats..(layer + 1) * self.layer_floats;
        (&self.k[r.clone()], &self.v[r])
    }

    /// Index of `(block, kv_head, slot)`'s first float in a layer's V (and of the
    /// `(block, kv_head)` area in K when `slot` is 0).
    fn at(&self, block: u32, head: usize, slot: usize) -> usize {
        ((block as usize * self.geo.kv_heads + head) * BLOCK_TOKENS + slot) * self.geo.head_dim
    }

    /// Stores one token's keys and values (`[kv_heads * dim]` each) at position `pos`.
    #[cfg(test)]
    fn write(&mut self, layer: usize, seq: &SeqBlocks, pos: usize, k: &[f32], v: &[f32]) {
        // SAFETY: one call at a time (the pool is borrowed mutably).
        unsafe { self.writer().write(layer, seq, pos, k, v) };
    }

    /// A handle through which the rows of one step store their keys and values from several
    /// threads at once. Holding it borrows the pool mutably, so nothing reads the pool
    /// meanwhile.
    fn writer(&mut self) -> KvWriter<'_> {
        KvWriter {
            k: self.k.as_mut_ptr(),
            v: self.v.as_mut_ptr(),
            len: self.k.len(),
            geo: self.geo,
            layer_floats: self.layer_floats,
            _pool: std::marker::PhantomData,
        }
    }

    /// Gives `seq` blocks for `len` tokens, all or none: on `false` the pool is exhausted and
    /// `seq` holds what it held before.
    ///
    /// What is available (free, and cached blocks nobody holds) is counted first, and a cached
    /// block is evicted only once the whole reservation is known to fit: a reservation that
    /// fails leaves the prefix cache as it found it.
    pub fn reserve(&mut self, seq: &mut SeqBlocks, len: usize) -> bool {
        let needed = len.div_ceil(BLOCK_TOKENS).saturating_sub(seq.blocks.len());
        if needed > self.alloc.available() {
            return false;
        }
        for _ in 0..needed {
            let b = self
                .alloc
                .allocate()
                .expect("counted as available just above, on the same thread");
            seq.blocks.push(b);
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
        if !seq.blocks.is_empty() {
            return 0; // its blocks already stand for positions from 0
        }
        let full = tokens.len().saturating_sub(1) / BLOCK_TOKENS;
        let mut parent = None;
        for chunk in tokens.chunks_exact(BLOCK_TOKENS).take(full) {
            let Some((b, hash)) = self.alloc.lookup(parent, chunk) else {
                break;
            };
            self.alloc.share(b);
            seq.blocks.push(b);
            seq.hashes.push(hash);
            parent = Some((b, hash));
        }
        seq.blocks.len() * BLOCK_TOKENS
    }

    /// Registers the blocks that `tokens` (the sequence's tokens whose keys and values are
    /// now stored) fill completely, so later sequences can share them.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) {
        let full = tokens.len() / BLOCK_TOKENS;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = i.checked_sub(1).map(|p| (seq.blocks[p], seq.hashes[p]));
            let chunk = &tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS];
            let hash = self.alloc.register(seq.blocks[i], parent, chunk);
            seq.hashes.push(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: KvGeometry = KvGeometry {
        layers: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 8,
    };

    /// The f16 conversion rounds as `half` does, after the clamp, on the F16C path and its
    /// scalar tail.
    #[test]
    fn f16_conversion_equals_halfs_rounding_clamped() {
        // Every exponent, with random mantissas and signs: subnormals, ties, values past
        // f16's range, infinities and NaN; a length that leaves a tail after the eights.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let x: Vec<f32> = (0..4099)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let exp = (i % 256) as u32;
                f32::from_bits(((state >> 32) as u32 & 0x807F_FFFF) | (exp << 23))
            })
            .collect();
        let mut got = vec![0u16; x.len()];
        to_f16_slice(&x, &mut got);
        for (&v, &g) in x.iter().zip(&got) {
            let want = half::f16::from_f32(v.clamp(-65504.0, 65504.0));
            if v.is_nan() {
                assert!(half::f16::from_bits(g).is_nan(), "{v}");
            } else {
                assert_eq!(g, want.to_bits(), "{v:e}");
            }
        }
    }

    /// Keys (transposed) and values land where attention reads them, rounded to f16 and
    /// clamped to its finite range, for a head size that is not a whole number of chunks.
    #[test]
    fn writes_store_clamped_f16_in_both_layouts() {
        let geo = KvGeometry {
            layers: 2,
            heads: 2,
            kv_heads: 2,
            head_dim: 70,
        };
        let mut pool = KvPool::new(geo, 2);
        let mut seq = SeqBlocks::default();
        assert!(pool.reserve(&mut seq, 20));
        let k: Vec<f32> = (0..140).map(|i| (i as f32 - 70.0) * 0.37).collect();
        let mut v: Vec<f32> = k.iter().map(|x| x * -3.1).collect();
        (v[3], v[80], v[139]) = (1e9, -7e4, f32::INFINITY);
        pool.write(1, &seq, 17, &k, &v);
        let f16 = |x: f32| half::f16::from_f32(x.clamp(-65504.0, 65504.0)).to_bits();
        let (keys, values) = pool.layer(1);
        for h in 0..2 {
            let area = pool.at(seq.blocks[1], h, 0);
            for dim in 0..70 {
                assert_eq!(keys[area + dim * BLOCK_TOKENS + 1], f16(k[h * 70 + dim]));
                assert_eq!(values[area + 70 + dim], f16(v[h * 70 + dim]));
            }
        }
        assert_eq!(
            values[pool.at(seq.blocks[1], 0, 1) + 3],
            half::f16::MAX.to_bits()
        );
        assert_eq!(
            values[pool.at(seq.blocks[1], 1, 1) + 69],
            half::f16::MAX.to_bits()
        );
        // Layer 0 is untouched.
        assert!(pool.layer(0).0.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_failed_reservation_takes_nothing_and_prefixes_map_from_position_zero() {
        let mut pool = KvPool::new(GEO, 4);
        let (mut a, mut b) = (SeqBlocks::default(), SeqBlocks::default());
        assert!(pool.reserve(&mut a, 40)); // 3 blocks
        assert!(!pool.reserve(&mut b, 40), "only one block is left");
        assert!(b.blocks.is_empty(), "a failed reservation keeps nothing");
        assert_eq!(pool.alloc.available(), 1);
        let tokens: Vec<u32> = (0..40).collect();
        pool.commit(&mut a, &tokens);
        assert_eq!(a.hashes.len(), 2, "two full blocks registered");
        // A sequence with the same prefix shares both full blocks; one that already holds
        // blocks is left alone (its blocks stand for positions from 0).
        assert_eq!(pool.match_prefix(&mut b, &tokens), 32);
        assert_eq!(b.blocks, a.blocks[..2]);
        let mut c = SeqBlocks::default();
        assert!(pool.reserve(&mut c, 1));
        assert_eq!(pool.match_prefix(&mut c, &tokens), 0);
        assert_eq!(c.blocks.len(), 1);
        pool.release(&mut a);
        pool.release(&mut b);
        pool.release(&mut c);
        assert_eq!(pool.alloc.available(), 4);
    }

    #[test]
    fn a_failed_reservation_leaves_every_cached_block_findable() {
        // Two full blocks cached and held by nobody, one block held, one free: a reservation
        // of four blocks cannot succeed, and must not evict the cached ones on its way to
        // failing (it used to take the free one, then both cached ones, then give up).
        let mut pool = KvPool::new(GEO, 4);
        let tokens: Vec<u32> = (0..33).collect();
        let (mut a, mut held) = (SeqBlocks::default(), SeqBlocks::default());
        assert!(pool.reserve(&mut a, 32));
        pool.commit(&mut a, &tokens[..32]);
        pool.release(&mut a);
        assert!(pool.reserve(&mut held, 1));
        assert_eq!(pool.alloc.available(), 3);
        let mut big = SeqBlocks::default();
        assert!(!pool.reserve(&mut big, 4 * BLOCK_TOKENS));
        assert!(big.blocks.is_empty());
        let mut again = SeqBlocks::default();
        assert_eq!(
            pool.match_prefix(&mut again, &tokens),
            32,
            "both cached blocks are still found"
        );
    }

    /// Sequences come and go at random with shared prefixes; each block's slots record the
    /// token written there, and every sequence must read back exactly its own tokens.
    #[test]
    fn random_sequences_always_read_back_their_own_tokens() {
        let blocks = 12;
        let mut pool = KvPool::new(GEO, blocks);
        let mut content = vec![[u32::MAX; BLOCK_TOKENS]; blocks];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        // (tokens, blocks, computed length)
        let mut seqs: Vec<(Vec<u32>, SeqBlocks, usize)> = Vec::new();
        for _ in 0..5000 {
            match rnd(4) {
                0 if seqs.len() < 6 => {
                    // A new sequence: one of three prefixes, then its own tokens.
                    let p = rnd(3) as u32;
                    let mut t: Vec<u32> = (0..rnd(40) as u32).map(|i| p * 1000 + i).collect();
                    t.extend((0..1 + rnd(20)).map(|_| 5000 + rnd(1000) as u32));
                    let mut b = SeqBlocks::default();
                    let hit = pool.match_prefix(&mut b, &t);
                    seqs.push((t, b, hit));
                }
                1 if !seqs.is_empty() => {
                    let (_, mut b, _) = seqs.swap_remove(rnd(seqs.len() as u64) as usize);
                    pool.release(&mut b);
                }
                _ if !seqs.is_empty() => {
                    // A step for one sequence: compute a chunk (growing its tokens when done).
                    let i = rnd(seqs.len() as u64) as usize;
                    let (t, b, len) = &mut seqs[i];
                    if *len == t.len() {
                        t.push(9000 + rnd(1000) as u32);
                    }
                    let want = (1 + rnd(20) as usize).min(t.len() - *len);
                    if !pool.reserve(b, *len + want) {
                        // Pre-empt: free everything, start again from the prefix cache.
                        pool.release(b);
                        *len = pool.match_prefix(b, t);
                        continue;
                    }
                    for pos in *len..*len + want {
                        content[b.blocks[pos / BLOCK_TOKENS] as usize][pos % BLOCK_TOKENS] = t[pos];
                    }
                    *len += want;
                    pool.commit(b, &t[..*len]);
                }
                _ => {}
            }
            for (t, b, len) in &seqs {
                for pos in 0..*len {
                    let got = content[b.blocks[pos / BLOCK_TOKENS] as usize][pos % BLOCK_TOKENS];
                    assert_eq!(
                        got, t[pos],
                        "position {pos} of a sequence reads another's token"
                    );
                }
            }
        }
    }
}
