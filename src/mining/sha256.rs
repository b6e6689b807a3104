//! SHA-256 as mining needs it: the raw compression function (for the midstate of a header's
//! first 64 bytes), double SHA-256 of arbitrary bytes (coinbase, merkle nodes, headers), and the
//! portable nonce scanner that the SHA-NI one must agree with.

use sha2::{Digest, Sha256};

pub const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

pub const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// Σ0, Σ1 (rounds) and σ0, σ1 (message schedule) of FIPS 180-4.
#[inline(always)]
pub(crate) fn big_sigma0(a: u32) -> u32 {
    a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22)
}
#[inline(always)]
pub(crate) fn big_sigma1(e: u32) -> u32 {
    e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25)
}
#[inline(always)]
pub(crate) fn small_sigma0(w: u32) -> u32 {
    w.rotate_right(7) ^ w.rotate_right(18) ^ (w >> 3)
}
#[inline(always)]
pub(crate) fn small_sigma1(w: u32) -> u32 {
    w.rotate_right(17) ^ w.rotate_right(19) ^ (w >> 10)
}

/// A round's T1 without its message word: `h + Σ1(e) + Ch(e, f, g) + k`.
#[inline(always)]
pub(crate) fn t1_without_w(s: &[u32; 8], k: u32) -> u32 {
    let [_, _, _, _, e, f, g, h] = *s;
    h.wrapping_add(big_sigma1(e))
        .wrapping_add((e & f) ^ (!e & g))
        .wrapping_add(k)
}

/// A round's T2: `Σ0(a) + Maj(a, b, c)`.
#[inline(always)]
pub(crate) fn t2(s: &[u32; 8]) -> u32 {
    let [a, b, c, ..] = *s;
    big_sigma0(a).wrapping_add((a & b) ^ (a & c) ^ (b & c))
}

/// One round with constant `k` and message word `w`.
#[inline(always)]
pub(crate) fn round(s: &[u32; 8], k: u32, w: u32) -> [u32; 8] {
    let t1 = t1_without_w(s, k).wrapping_add(w);
    let [a, b, c, d, e, f, g, _] = *s;
    [t1.wrapping_add(t2(s)), a, b, c, d.wrapping_add(t1), e, f, g]
}

/// One SHA-256 compression of a 16-word block (words already big-endian decoded).
pub fn compress(state: &[u32; 8], block: &[u32; 16]) -> [u32; 8] {
    let mut w = [0u32; 64];
    w[..16].copy_from_slice(block);
    for t in 16..64 {
        w[t] = w[t - 16]
            .wrapping_add(small_sigma0(w[t - 15]))
            .wrapping_add(w[t - 7])
            .wrapping_add(small_sigma1(w[t - 2]));
    }
    let mut s = *state;
    for t in 0..64 {
        s = round(&s, K[t], w[t]);
    }
    std::array::from_fn(|i| state[i].wrapping_add(s[i]))
}

/// Big-endian words of a 64-byte block.
pub fn block_words(bytes: &[u8]) -> [u32; 16] {
    std::array::from_fn(|i| {
        u32::from_be_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("64-byte block"))
    })
}

/// SHA-256 state after the first 64 bytes of an 80-byte header: the part no nonce changes.
pub fn midstate(header: &[u8; 80]) -> [u32; 8] {
    compress(&IV, &block_words(&header[..64]))
}

/// SHA-256(SHA-256(data)), as Bitcoin hashes transactions, merkle nodes and headers.
pub fn sha256d(data: &[u8]) -> [u8; 32] {
    Sha256::digest(Sha256::digest(data)).into()
}

/// The three words of a header's second block that do not change with the nonce: the last 4
/// bytes of the merkle root, ntime and nBits (big-endian decoded, as SHA-256 reads them).
pub fn header_tail(header: &[u8; 80]) -> [u32; 3] {
    std::array::from_fn(|i| {
        u32::from_be_bytes(header[64 + i * 4..68 + i * 4].try_into().expect("4 bytes"))
    })
}

/// Double SHA-256 of a header from its midstate, tail and nonce, as the 8 state words of the
/// second hash (digest byte order: word `i` is digest bytes `4i..4i+4`, big-endian).
pub fn hash_header_words(mid: &[u32; 8], tail: &[u32; 3], nonce: u32) -> [u32; 8] {
    let mut b2 = [0u32; 16];
    b2[..3].copy_from_slice(tail);
    b2[3] = nonce.swap_bytes(); // the header holds the nonce little-endian
    b2[4] = 0x8000_0000;
    b2[15] = 640;
    let h1 = compress(mid, &b2);
    let mut b3 = [0u32; 16];
    b3[..8].copy_from_slice(&h1);
    b3[8] = 0x8000_0000;
    b3[15] = 256;
    compress(&IV, &b3)
}

/// Digest bytes from the final state words.
pub fn words_to_digest(words: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, w) in words.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// What a scan found and how far it got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Nonces whose hash's top 32 bits are at or below the target's: candidates, re-checked
    /// against the full target by the caller.
    pub candidates: Vec<u32>,
    /// The first nonce not hashed; the range `[start, next)` is done.
    pub next: u64,
}

/// What one scan is asked to do, the same for every scanner: hash nonces `start..end` (end
/// exclusive, up to 2^32) of the header whose second block begins with `tail`; report as
/// candidates the nonces whose hash's top word is at or below `target_top`; ask `stop(n)`
/// every `poll_every` nonces (rounded to whole batches), `n` being the first nonce not yet
/// hashed, and end there when it says so.
#[derive(Clone, Copy)]
pub struct ScanJob<'a> {
    pub tail: &'a [u32; 3],
    pub start: u64,
    pub end: u64,
    pub target_top: u32,
    pub poll_every: u64,
    pub stop: &'a dyn Fn(u64) -> bool,
}

impl<'a> ScanJob<'a> {
    /// All of `start..end`, never stopped.
    pub fn whole(tail: &'a [u32; 3], start: u64, end: u64, target_top: u32) -> Self {
        Self {
            tail,
            start,
            end,
            target_top,
            poll_every: u64::MAX,
            stop: &never,
        }
    }
}

fn never(_: u64) -> bool {
    false
}

/// What a scan of several headers over the same nonces found: candidates as (index of the
/// header, nonce), and how far it got (the same for every header).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionsOutcome {
    pub candidates: Vec<(usize, u32)>,
    pub next: u64,
}

/// The driver every vector scanner shares: hashes `job`'s range `lanes` nonces at a time with
/// `batch` (given the first nonce, it returns a bit per lane whose hash's top word is at or
/// below the target's), polls `stop` as `job` asks, and leaves a tail shorter than a batch to
/// the portable code. `next` is exactly where it stopped: nothing is lost or hashed twice.
#[inline(always)]
pub(crate) fn scan_in_batches(
    mid: &[u32; 8],
    job: &ScanJob<'_>,
    lanes: u64,
    mut batch: impl FnMut(u32) -> u32,
) -> ScanOutcome {
    let mut candidates = Vec::new();
    let next = scan_versions_in_batches(
        &[*mid],
        job,
        lanes,
        #[inline(always)]
        |n| [batch(n)],
        |_, nonce| candidates.push(nonce),
    );
    ScanOutcome { candidates, next }
}

/// [`scan_in_batches`] for `V` headers with midstates `mids` and one tail, all over the same
/// nonces: `batch` returns each header's bits, and `found(header, nonce)` takes every
/// candidate. Returns the first nonce not hashed (for every header).
#[inline(always)]
pub(crate) fn scan_versions_in_batches<const V: usize>(
    mids: &[[u32; 8]; V],
    job: &ScanJob<'_>,
    lanes: u64,
    mut batch: impl FnMut(u32) -> [u32; V],
    mut found: impl FnMut(usize, u32),
) -> u64 {
    let (start, end) = (job.start, job.end);
    let poll = (job.poll_every / lanes).max(1) * lanes;
    let mut n = start;
    while n + lanes <= end {
        if n > start && (n - start) % poll == 0 && (job.stop)(n) {
            return n;
        }
        let hits = batch(n as u32);
        for (v, mut bits) in hits.into_iter().enumerate() {
            while bits != 0 {
                found(v, n as u32 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        n += lanes;
    }
    if n < end {
        for (v, mid) in mids.iter().enumerate() {
            let rest = scan_portable(mid, &ScanJob::whole(job.tail, n, end, job.target_top));
            rest.candidates
                .into_iter()
                .for_each(|nonce| found(v, nonce));
        }
        n = end;
    }
    n
}

/// Runs `job` with the portable code.
pub fn scan_portable(mid: &[u32; 8], job: &ScanJob<'_>) -> ScanOutcome {
    let start = job.start;
    let mut out = ScanOutcome {
        candidates: Vec::new(),
        next: start,
    };
    let mut n = start;
    while n < job.end {
        if (n - start) % job.poll_every == 0 && n > start && (job.stop)(n) {
            break;
        }
        let h = hash_header_words(mid, job.tail, n as u32);
        if h[7].swap_bytes() <= job.target_top {
            out.candidates.push(n as u32);
        }
        n += 1;
    }
    out.next = n;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_agrees_with_the_sha2_crate() {
        let data: Vec<u8> = (0..80u8).collect();
        let mut padded = data.clone();
        padded.push(0x80);
        padded.resize(120, 0);
        padded.extend_from_slice(&(80u64 * 8).to_be_bytes());
        let s = compress(
            &compress(&IV, &block_words(&padded[..64])),
            &block_words(&padded[64..]),
        );
        let want: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!(words_to_digest(&s), want);
    }
}
