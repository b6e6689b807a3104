//! The KV pool's book-keeping, apart from the numbers it holds: which blocks are free, who
//! holds each block (reference counts, so sequences with a common prefix share its blocks),
//! and the prefix cache, which finds a full block by the hash of its tokens and of every
//! token before it. A block nobody holds keeps its contents and stays findable until the
//! allocator needs it back (least recently released first).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// What identifies a full block's contents: its tokens and its parent's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    parent: u64,
    tokens: [u32; BLOCK_TOKENS],
}

/// The hash of a full block given its parent's hash (0 for the first block).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    // 0 is reserved for "no parent".
    h.finish().max(1)
}

#[derive(Debug)]
pub struct BlockAllocator {
    refs: Vec<u32>,
    /// Never-cached free blocks.
    free: Vec<u32>,
    /// Cached blocks nobody holds, least recently released first, with the stamp they were
    /// released at (an entry whose stamp no longer matches is stale and skipped).
    evictable: VecDeque<(u32, u64)>,
    released_at: Vec<u64>,
    stamp: u64,
    /// hash → block, and each cached block's key (checked on a hit: no false sharing even if
    /// two prefixes' hashes collide).
    by_hash: HashMap<u64, u32>,
    key: Vec<Option<(u64, BlockKey)>>,
    evictable_count: usize,
}

impl BlockAllocator {
    pub fn new(blocks: usize) -> Self {
        Self {
            refs: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
            evictable: VecDeque::new(),
            released_at: vec![0; blocks],
            stamp: 0,
            by_hash: HashMap::new(),
            key: vec![None; blocks],
            evictable_count: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that an allocation can still get (free, or cached and held by nobody).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable_count
    }

    /// A block for new contents, or `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => loop {
                let (b, stamp) = self.evictable.pop_front()?;
                if self.refs[b as usize] == 0 && self.released_at[b as usize] == stamp {
                    self.evictable_count -= 1;
                    if let Some((hash, _)) = self.key[b as usize].take() {
                        self.by_hash.remove(&hash);
                    }
                    break b;
                }
            },
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Another holder of a block found in the cache.
    pub fn share(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            self.evictable_count -= 1;
        }
        self.refs[b as usize] += 1;
    }

    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than held");
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        if self.key[b as usize].is_some() {
            self.stamp += 1;
            self.released_at[b as usize] = self.stamp;
            self.evictable.push_back((b, self.stamp));
            self.evictable_count += 1;
        } else {
            self.free.push(b);
        }
    }

    /// The cached block holding `tokens` after the prefix whose hash is `parent`.
    pub fn lookup(&self, parent: u64, tokens: &[u32]) -> Option<(u32, u64)> {
        let hash = block_hash(parent, tokens);
        let b = *self.by_hash.get(&hash)?;
        let (_, key) = self.key[b as usize].as_ref()?;
        (key.parent == parent && key.tokens[..] == tokens[..]).then_some((b, hash))
    }

    /// Makes a full block findable; returns its hash. A block with the same contents already
    /// cached keeps its place (this one stays private to its sequence).
    pub fn register(&mut self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        let hash = block_hash(parent, tokens);
        if self.key[b as usize].is_none() && !self.by_hash.contains_key(&hash) {
            let mut t = [0u32; BLOCK_TOKENS];
            t.copy_from_slice(tokens);
            self.by_hash.insert(hash, b);
            self.key[b as usize] = Some((hash, BlockKey { parent, tokens: t }));
        }
        hash
    }

    pub fn refs(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(start: u32) -> Vec<u32> {
        (start..start + BLOCK_TOKENS as u32).collect()
    }

    #[test]
    fn blocks_are_allocated_until_none_is_left_and_come_back_when_released() {
        let mut a = BlockAllocator::new(3);
        let got: Vec<u32> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(a.allocate(), None);
        assert_eq!(a.available(), 0);
        a.release(got[1]);
        assert_eq!(a.available(), 1);
        assert_eq!(a.allocate(), Some(got[1]));
    }

    #[test]
    fn a_cached_block_is_found_shared_and_evicted_only_when_needed() {
        let mut a = BlockAllocator::new(2);
        let b0 = a.allocate().unwrap();
        let h0 = a.register(b0, 0, &toks(0));
        let b1 = a.allocate().unwrap();
        a.register(b1, h0, &toks(100));
        // Found by its tokens after the right parent only.
        assert_eq!(a.lookup(0, &toks(0)), Some((b0, h0)));
        assert_eq!(a.lookup(0, &toks(1)), None);
        assert_eq!(a.lookup(h0 ^ 1, &toks(100)), None);
        a.share(b0);
        assert_eq!(a.refs(b0), 2);
        a.release(b0);
        a.release(b0);
        a.release(b1);
        // Held by nobody, still findable, and available to allocations.
        assert_eq!(a.available(), 2);
        assert!(a.lookup(0, &toks(0)).is_some());
        // A hit takes it back out of the evictable set.
        a.share(b0);
        assert_eq!(a.available(), 1);
        // Allocation evicts the other one (released least recently among those held by none).
        let b = a.allocate().unwrap();
        assert_eq!(b, b1);
        assert_eq!(
            a.lookup(h0, &toks(100)),
            None,
            "evicted blocks are forgotten"
        );
        assert!(a.lookup(0, &toks(0)).is_some(), "the held one stays");
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn the_same_contents_are_cached_once() {
        let mut a = BlockAllocator::new(2);
        let (x, y) = (a.allocate().unwrap(), a.allocate().unwrap());
        a.register(x, 0, &toks(0));
        a.register(y, 0, &toks(0));
        assert_eq!(a.lookup(0, &toks(0)).unwrap().0, x);
        a.release(y);
        assert_eq!(
            a.allocate(),
            Some(y),
            "the duplicate went straight back to the free list"
        );
    }
}
