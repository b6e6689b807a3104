//! What the host computes once per job for the CUDA scan kernel (`kernels/sha256d.cu`):
//! everything of the header's double hash that no nonce changes. The layout of [`GpuJob`] is
//! the kernel's `struct Job`; `tests/sha256d_kernel.rs` checks the two agree by running the
//! kernel's per-nonce function, compiled as C++, against [`super::sha256::hash_header_words`].

use super::sha256::K;

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

fn big_s0(a: u32) -> u32 {
    a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22)
}
fn big_s1(e: u32) -> u32 {
    e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25)
}
fn small_s0(w: u32) -> u32 {
    w.rotate_right(7) ^ w.rotate_right(18) ^ (w >> 3)
}
fn small_s1(w: u32) -> u32 {
    w.rotate_right(17) ^ w.rotate_right(19) ^ (w >> 10)
}
fn ch(e: u32, f: u32, g: u32) -> u32 {
    (e & f) ^ (!e & g)
}
fn maj(a: u32, b: u32, c: u32) -> u32 {
    (a & b) | (c & (a | b))
}

impl GpuJob {
    /// From a header's midstate, its second block's fixed words (see
    /// [`super::sha256::header_tail`]) and the share target's top word.
    pub fn new(mid: &[u32; 8], tail: &[u32; 3], target_hi: u32) -> Self {
        let mut s = *mid;
        for (i, w) in tail.iter().enumerate() {
            let [a, b, c, d, e, f, g, h] = s;
            let t1 = h
                .wrapping_add(big_s1(e))
                .wrapping_add(ch(e, f, g))
                .wrapping_add(K[i])
                .wrapping_add(*w);
            let t2 = big_s0(a).wrapping_add(maj(a, b, c));
            s = [t1.wrapping_add(t2), a, b, c, d.wrapping_add(t1), e, f, g];
        }
        let [a, b, c, _, e, f, g, h] = s;
        let w16 = small_s0(tail[1]).wrapping_add(tail[0]);
        let w17 = small_s1(640)
            .wrapping_add(small_s0(tail[2]))
            .wrapping_add(tail[1]);
        Self {
            mid: *mid,
            st: s,
            t1_base: h
                .wrapping_add(big_s1(e))
                .wrapping_add(ch(e, f, g))
                .wrapping_add(K[3]),
            t2_3: big_s0(a).wrapping_add(maj(a, b, c)),
            w16,
            w17,
            w18_base: small_s1(w16).wrapping_add(tail[2]),
            w19_base: small_s1(w17).wrapping_add(small_s0(0x8000_0000)),
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
