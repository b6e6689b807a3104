//! What the host computes once per job for the CUDA scan kernel (`kernels/sha256d.cu`):
//! everything of the header's double hash that no nonce changes. The layout of [`GpuJob`] is
//! the kernel's `struct Job`; `tests/sha256d_kernel.rs` checks the two agree by running the
//! kernel's per-nonce function, compiled as C++, against [`crate::mining::sha256::hash_header_words`].

use crate::mining::sha256::{round, small_sigma0, small_sigma1, t1_without_w, t2, K};

/// The kernel's `struct Job`, word for word.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuJob {
    pub mid: [u32; 8],
    /// Block 2's state after rounds 0..2.
    pub st: [u32; 8],
    /// Round 3's T1 without the nonce word, and its T2.
    pub t1_base: u32,
    pub t2_3: u32,
    pub w16: u32,
    pub w17: u32,
    /// W18 without σ0(W3), W19 without W3.
    pub w18_base: u32,
    pub w19_base: u32,
    /// A candidate's hash has its top 32 bits (as the little-endian number Bitcoin compares)
    /// at most this: the target's top word.
    pub target_hi: u32,
}

impl GpuJob {
    /// From a header's midstate, its second block's fixed words (see
    /// [`crate::mining::sha256::header_tail`]) and the share target's top word.
    pub fn new(mid: &[u32; 8], tail: &[u32; 3], target_hi: u32) -> Self {
        let mut s = *mid;
        for (i, w) in tail.iter().enumerate() {
            s = round(&s, K[i], *w);
        }
        let w16 = small_sigma0(tail[1]).wrapping_add(tail[0]);
        let w17 = small_sigma1(640)
            .wrapping_add(small_sigma0(tail[2]))
            .wrapping_add(tail[1]);
        Self {
            mid: *mid,
            st: s,
            t1_base: t1_without_w(&s, K[3]),
            t2_3: t2(&s),
            w16,
            w17,
            w18_base: small_sigma1(w16).wrapping_add(tail[2]),
            w19_base: small_sigma1(w17).wrapping_add(small_sigma0(0x8000_0000)),
            target_hi,
        }
    }

    /// The job as the kernel's words, in field order.
    pub fn words(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(23);
        v.extend_from_slice(&self.mid);
        v.extend_from_slice(&self.st);
        v.extend_from_slice(&[
            self.t1_base,
            self.t2_3,
            self.w16,
            self.w17,
            self.w18_base,
            self.w19_base,
            self.target_hi,
        ]);
        v
    }
}
