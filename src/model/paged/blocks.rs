//! The KV pool's book-keeping, apart from the numbers it holds: which blocks are free, who
//! holds each block (reference counts, so sequences with a common prefix share its blocks),
//! and the prefix cache, which finds a full block by its tokens and its parent block (the one
//! holding the tokens before them). A block nobody holds keeps its contents and stays findable
//! until the allocator needs it back (least recently released first).
//!
//! Blocks nobody holds are kept in a list threaded through two arrays (each block's neighbours),
//! so a block is in it at most once, and leaves it in O(1) when a sequence takes it back: the
//! list never grows past the pool, however often the same prompt comes. The cache's hash is
//! keyed per process (an attacker cannot make two prefixes collide on purpose), and a hit is
//! confirmed against the block's own key: its tokens and its parent's identity.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// "No block": the ends of the list of blocks nobody holds.
const NIL: u32 = u32::MAX;

/// Which block a full block follows: its index and its hash. `None` is the first block.
pub type Parent = Option<(u32, u64)>;

/// What identifies a full block's contents: its tokens and its parent block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    parent: Parent,
    tokens: [u32; BLOCK_TOKENS],
}

#[derive(Debug)]
pub struct BlockAllocator {
    refs: Vec<u32>,
    /// Never-cached free blocks.
    free: Vec<u32>,
    /// Cached blocks nobody holds, least recently released first: a list threaded through
    /// `prev`/`next` (`NIL` at its ends; a block not in it points to itself in `prev`).
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    evictable_count: usize,
    /// hash → block, and each cached block's key (checked on a hit: no false sharing even if
    /// two prefixes' hashes collide).
    by_hash: HashMap<u64, u32>,
    key: Vec<Option<(u64, BlockKey)>>,
    hasher: RandomState,
}

impl BlockAllocator {
    pub fn new(blocks: usize) -> Self {
        Self {
            refs: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
            prev: (0..blocks as u32).collect(),
            next: vec![NIL; blocks],
            head: NIL,
            tail: NIL,
            evictable_count: 0,
            by_hash: HashMap::new(),
            key: vec![None; blocks],
            hasher: RandomState::new(),
        }
    }

    /// The hash of a full block of `tokens` after `parent` (0 is never one: it is kept free).
    /// The parent's block is part of it: a child registered after a private twin of a cached
    /// block does not take the place of the one after the cached block itself.
    pub fn block_hash(&self, parent: Parent, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish().max(1)
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that an allocation can still get (free, or cached and held by nobody).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable_count
    }

    /// Cached blocks held by nobody (the list's length, kept as a count).
    pub fn evictable(&self) -> usize {
        self.evictable_count
    }

    fn in_list(&self, b: u32) -> bool {
        self.prev[b as usize] != b
    }

    fn push_back(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.evictable_count += 1;
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[b as usize] = b;
        self.next[b as usize] = NIL;
        self.evictable_count -= 1;
    }

    /// A block for new contents, or `None` when every block is held. A cached block nobody
    /// holds is evicted (forgotten) only here, when it is actually taken.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.head;
                if b == NIL {
                    return None;
                }
                self.unlink(b);
                if let Some((hash, _)) = self.key[b as usize].take() {
                    self.by_hash.remove(&hash);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Another holder of a block found in the cache.
    pub fn share(&mut self, b: u32) {
        if self.refs[b as usize] == 0 && self.in_list(b) {
            self.unlink(b);
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
            self.push_back(b);
        } else {
            self.free.push(b);
        }
    }

    /// The cached block holding `tokens` right after block `parent`, with its hash.
    pub fn lookup(&self, parent: Parent, tokens: &[u32]) -> Option<(u32, u64)> {
        let hash = self.block_hash(parent, tokens);
        let b = *self.by_hash.get(&hash)?;
        let (_, key) = self.key[b as usize].as_ref()?;
        (key.parent == parent && key.tokens[..] == tokens[..]).then_some((b, hash))
    }

    /// Makes a full block findable; returns its hash. A block with the same contents already
    /// cached keeps its place (this one stays private to its sequence). The parent recorded is
    /// the cached block of the parent's contents when there is one, so that a later sequence,
    /// which finds that block, finds this one after it.
    pub fn register(&mut self, b: u32, parent: Parent, tokens: &[u32]) -> u64 {
        let parent = parent.map(|(pb, ph)| match self.by_hash.get(&ph) {
            Some(&cached) => (cached, ph),
            None => (pb, ph),
        });
        let hash = self.block_hash(parent, tokens);
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
        let h0 = a.register(b0, None, &toks(0));
        let b1 = a.allocate().unwrap();
        a.register(b1, Some((b0, h0)), &toks(100));
        // Found by its tokens after the right parent only.
        assert_eq!(a.lookup(None, &toks(0)), Some((b0, h0)));
        assert_eq!(a.lookup(None, &toks(1)), None);
        assert_eq!(a.lookup(Some((b0, h0 ^ 1)), &toks(100)), None);
        a.share(b0);
        assert_eq!(a.refs(b0), 2);
        a.release(b0);
        a.release(b0);
        a.release(b1);
        // Held by nobody, still findable, and available to allocations.
        assert_eq!(a.available(), 2);
        assert!(a.lookup(None, &toks(0)).is_some());
        // A hit takes it back out of the evictable set.
        a.share(b0);
        assert_eq!(a.available(), 1);
        // Allocation evicts the other one (released least recently among those held by none).
        let b = a.allocate().unwrap();
        assert_eq!(b, b1);
        assert_eq!(
            a.lookup(Some((b0, h0)), &toks(100)),
            None,
            "evicted blocks are forgotten"
        );
        assert!(a.lookup(None, &toks(0)).is_some(), "the held one stays");
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn the_same_contents_are_cached_once() {
        let mut a = BlockAllocator::new(2);
        let (x, y) = (a.allocate().unwrap(), a.allocate().unwrap());
        a.register(x, None, &toks(0));
        a.register(y, None, &toks(0));
        assert_eq!(a.lookup(None, &toks(0)).unwrap().0, x);
        a.release(y);
        assert_eq!(
            a.allocate(),
            Some(y),
            "the duplicate went straight back to the free list"
        );
    }

    #[test]
    fn the_same_prompt_again_and_again_keeps_the_evictable_list_within_the_pool() {
        // A prompt's blocks released, found again, released again, many times over: each
        // block is in the list once at most (it used to gain a stale entry each round).
        let mut a = BlockAllocator::new(4);
        let b = a.allocate().unwrap();
        let h = a.register(b, None, &toks(0));
        a.release(b);
        for _ in 0..10_000 {
            let (hit, _) = a.lookup(None, &toks(0)).unwrap();
            a.share(hit);
            a.release(hit);
        }
        assert_eq!(a.evictable(), 1);
        let mut walked = 0;
        let mut at = a.head;
        while at != NIL {
            walked += 1;
            at = a.next[at as usize];
        }
        assert_eq!(walked, 1, "one entry for the one cached block");
        assert_eq!(a.lookup(None, &toks(0)), Some((b, h)));
    }

    #[test]
    fn a_child_matches_its_own_parent_block_not_another_with_the_same_hash() {
        // Two different parent blocks that (by a collision, forced here) share a hash: a child
        // registered after one is not found after the other.
        let mut a = BlockAllocator::new(4);
        let (p, q, c) = (
            a.allocate().unwrap(),
            a.allocate().unwrap(),
            a.allocate().unwrap(),
        );
        let collided = 0x5eed;
        a.register(c, Some((p, collided)), &toks(100));
        assert!(a.lookup(Some((p, collided)), &toks(100)).is_some());
        assert_eq!(
            a.lookup(Some((q, collided)), &toks(100)),
            None,
            "matched through the parent's hash alone"
        );
    }
}
