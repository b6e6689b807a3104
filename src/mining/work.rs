//! Units of work and shares. A [`WorkSource`] turns the pool's current job into a stream of
//! [`Work`] units, each a header with extranonce2, ntime and version fixed (and, on request,
//! siblings that differ only in rolled version bits) and 2^32 nonces to try; a hash that meets
//! the share target becomes a [`Share`].

use super::job::{nth_version_bits, roll_version, Job};
use super::sha256::{midstate, sha256d};
use super::target::{difficulty_of_hash, meets_target, U256};

/// Everything needed to mine the pool's current job.
#[derive(Debug, Clone)]
pub struct WorkSource {
    pub job: Job,
    pub extranonce1: Vec<u8>,
    pub extranonce2_size: usize,
    pub share_target: U256,
    /// BIP 310 mask agreed with the pool (0: no version rolling).
    pub version_mask: u32,
    next_extranonce2: u64,
}

impl WorkSource {
    pub fn new(
        job: Job,
        extranonce1: Vec<u8>,
        extranonce2_size: usize,
        share_target: U256,
        version_mask: u32,
    ) -> Self {
        Self {
            job,
            extranonce1,
            extranonce2_size,
            share_target,
            version_mask,
            next_extranonce2: 0,
        }
    }

    /// Whether `other` is this same work sent again (the same job, extranonce1, extranonce2
    /// size and version mask; the share target and `clean_jobs` may differ), so that a miner
    /// can keep its place in it instead of hashing it again from the start.
    pub fn continues(&self, other: &WorkSource) -> bool {
        let same_job = {
            let (a, b) = (&self.job, &other.job);
            a.job_id == b.job_id
                && a.prevhash == b.prevhash
                && a.coinb1 == b.coinb1
                && a.coinb2 == b.coinb2
                && a.merkle_branch == b.merkle_branch
                && a.version == b.version
                && a.nbits == b.nbits
                && a.ntime == b.ntime
        };
        same_job
            && self.extranonce1 == other.extranonce1
            && self.extranonce2_size == other.extranonce2_size
            && self.version_mask == other.version_mask
    }

    /// The next unit: a new extranonce2 (little-endian counter) and so a new merkle root. When
    /// the extranonce2 space is used up the rolled version bits take over.
    pub fn next_work(&mut self, generation: u64) -> Work {
        self.next_work_versions(generation, 1)
    }

    /// As [`Self::next_work`], with up to `versions` headers in the unit that differ only in
    /// their rolled version bits (as many as the agreed mask allows; one without version
    /// rolling): a miner that hashes them together computes the first hash's message schedule
    /// once for all of them. Every (extranonce2, version) pair is handed out once, as long as
    /// one source is always asked for the same count.
    pub fn next_work_versions(&mut self, generation: u64, versions: usize) -> Work {
        let rollable = 1u64 << self.version_mask.count_ones().min(32);
        let versions = (versions.max(1) as u64).min(rollable);
        let size = self.extranonce2_size.min(8);
        let space = if size >= 8 {
            u64::MAX
        } else {
            1u64 << (8 * size)
        };
        let counter = self.next_extranonce2;
        self.next_extranonce2 = self.next_extranonce2.wrapping_add(1);
        let en2_value = counter % space;
        let rolls = counter / space;
        let mut extranonce2 = en2_value.to_le_bytes()[..size].to_vec();
        extranonce2.resize(self.extranonce2_size, 0);
        let rolled = |i: u64| {
            if self.version_mask != 0 {
                let n = rolls.wrapping_mul(versions).wrapping_add(i) as u32;
                roll_version(
                    self.job.version,
                    self.version_mask,
                    nth_version_bits(self.version_mask, n),
                )
            } else {
                self.job.version
            }
        };
        let version = rolled(0);
        let root = self.job.merkle_root(&self.extranonce1, &extranonce2);
        let header = self.job.header(&root, self.job.ntime, version, 0);
        let siblings = (1..versions)
            .map(|i| {
                let version = rolled(i);
                let header = self.job.header(&root, self.job.ntime, version, 0);
                Sibling {
                    version_bits: version & self.version_mask,
                    midstate: midstate(&header),
                    header,
                }
            })
            .collect();
        Work {
            siblings,
            generation,
            job_id: self.job.job_id.clone(),
            extranonce1: self.extranonce1.clone(),
            extranonce2,
            ntime: self.job.ntime,
            version,
            version_bits: (self.version_mask != 0).then_some(version & self.version_mask),
            midstate: midstate(&header),
            header,
            share_target: self.share_target,
            network_target: U256::from_compact(self.job.nbits),
        }
    }
}

/// A header to scan: everything fixed but the nonce.
#[derive(Debug, Clone)]
pub struct Work {
    /// Changes whenever the job or difficulty changes; work of an older generation is stale.
    pub generation: u64,
    pub job_id: String,
    pub extranonce1: Vec<u8>,
    pub extranonce2: Vec<u8>,
    pub ntime: u32,
    pub version: u32,
    /// The rolled bits to submit (`Some` when version rolling was negotiated).
    pub version_bits: Option<u32>,
    pub midstate: [u32; 8],
    /// The header with nonce 0.
    pub header: [u8; 80],
    pub share_target: U256,
    pub network_target: U256,
    /// The same header under other rolled versions, to be hashed over the same nonces (see
    /// [`WorkSource::next_work_versions`]); empty without version rolling. Header `i + 1`
    /// of the unit, where `header` is header 0.
    pub siblings: Vec<Sibling>,
}

/// One more rolled version of a unit's header.
#[derive(Debug, Clone)]
pub struct Sibling {
    pub version_bits: u32,
    pub midstate: [u32; 8],
    /// The header with nonce 0.
    pub header: [u8; 80],
}

impl Work {
    /// Headers in the unit: `header` and its siblings.
    pub fn headers(&self) -> usize {
        1 + self.siblings.len()
    }

    /// The midstates of every header of the unit, `header`'s first.
    pub fn midstates(&self) -> Vec<[u32; 8]> {
        std::iter::once(self.midstate)
            .chain(self.siblings.iter().map(|s| s.midstate))
            .collect()
    }

    /// The same header at another share target, under `generation`.
    pub fn retargeted(&self, share_target: U256, generation: u64) -> Work {
        Work {
            share_target,
            generation,
            ..self.clone()
        }
    }

    /// Re-hashes `nonce` in full (whatever backend found it) and returns the share if it
    /// meets the share target.
    pub fn check(&self, nonce: u32) -> Option<Share> {
        self.check_header(0, nonce)
    }

    /// [`Self::check`] for header `which` of the unit (0: `header`; `i`: sibling `i − 1`).
    pub fn check_header(&self, which: usize, nonce: u32) -> Option<Share> {
        let (mut header, version_bits) = match which.checked_sub(1) {
            None => (self.header, self.version_bits),
            Some(i) => {
                let s = self.siblings.get(i)?;
                (s.header, Some(s.version_bits))
            }
        };
        header[76..80].copy_from_slice(&nonce.to_le_bytes());
        let hash = sha256d(&header);
        if !meets_target(&hash, &self.share_target) {
            return None;
        }
        Some(Share {
            generation: self.generation,
            job_id: self.job_id.clone(),
            extranonce1: self.extranonce1.clone(),
            extranonce2: self.extranonce2.clone(),
            ntime: self.ntime,
            nonce,
            version_bits,
            difficulty: difficulty_of_hash(&hash),
            is_block: meets_target(&hash, &self.network_target),
            hash,
        })
    }
}

/// A hash that meets the pool's share target, ready to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub generation: u64,
    pub job_id: String,
    /// The extranonce1 the share was mined under: a share is void once the pool changes it.
    pub extranonce1: Vec<u8>,
    pub extranonce2: Vec<u8>,
    pub ntime: u32,
    pub nonce: u32,
    pub version_bits: Option<u32>,
    pub hash: [u8; 32],
    pub difficulty: f64,
    /// The hash also meets the network target: a block.
    pub is_block: bool,
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A job with a coinbase around the extranonces and one branch of the merkle tree.
    fn source(extranonce2_size: usize, mask: u32) -> WorkSource {
        let job = Job {
            job_id: "j".into(),
            prevhash: [7; 32],
            coinb1: vec![1; 42],
            coinb2: vec![2; 50],
            merkle_branch: vec![[3; 32]],
            version: 0x2000_0000,
            nbits: 0x1703_4219,
            ntime: 0x6745_0000,
            clean_jobs: true,
        };
        WorkSource::new(job, vec![1, 2, 3, 4], extranonce2_size, U256::MAX, mask)
    }

    /// (extranonce2, version) of every header of a unit.
    fn pairs(w: &Work) -> Vec<(Vec<u8>, u32)> {
        let version = |h: &[u8; 80]| u32::from_le_bytes(h[..4].try_into().unwrap());
        std::iter::once(&w.header)
            .chain(w.siblings.iter().map(|s| &s.header))
            .map(|h| (w.extranonce2.clone(), version(h)))
            .collect()
    }

    #[test]
    fn a_unit_holds_rolled_versions_of_one_header_and_no_pair_comes_twice() {
        let mask = 0x1fff_e000;
        // One byte of extranonce2: the counter wraps after 256 units, and the versions go on.
        let mut s = source(1, mask);
        let mut seen = HashSet::new();
        for unit in 0..300 {
            let w = s.next_work_versions(unit, 8);
            assert_eq!(w.headers(), 8);
            assert_eq!(w.midstates().len(), 8);
            for sib in &w.siblings {
                // Only the version differs, and only under the mask.
                assert_eq!(sib.header[4..], w.header[4..]);
                let (a, b) = (
                    u32::from_le_bytes(w.header[..4].try_into().unwrap()),
                    u32::from_le_bytes(sib.header[..4].try_into().unwrap()),
                );
                assert_ne!(a, b);
                assert_eq!((a ^ b) & !mask, 0);
                assert_eq!(sib.version_bits, b & mask);
                assert_eq!(sib.midstate, crate::mining::sha256::midstate(&sib.header));
            }
            for pair in pairs(&w) {
                assert!(seen.insert(pair.clone()), "unit {unit} repeats {pair:?}");
            }
        }
    }

    #[test]
    fn the_count_of_versions_follows_the_mask() {
        assert_eq!(source(4, 0).next_work_versions(0, 8).headers(), 1);
        assert_eq!(source(4, 0b11 << 13).next_work_versions(0, 8).headers(), 4);
        let (mut one, mut plain) = (source(4, 0x1fff_e000), source(4, 0x1fff_e000));
        let (a, b) = (one.next_work_versions(0, 1), plain.next_work(0));
        assert_eq!((a.headers(), a.header), (1, b.header));
    }

    #[test]
    fn a_share_of_a_sibling_carries_its_version_bits() {
        let mut s = source(4, 0x1fff_e000);
        s.share_target = U256::MAX; // every hash is a share
        let w = s.next_work_versions(0, 8);
        for which in 0..w.headers() {
            let share = w
                .check_header(which, 12345)
                .expect("every hash meets U256::MAX");
            let mut header = if which == 0 {
                w.header
            } else {
                w.siblings[which - 1].header
            };
            header[76..].copy_from_slice(&12345u32.to_le_bytes());
            assert_eq!(share.hash, sha256d(&header));
            let version = u32::from_le_bytes(header[..4].try_into().unwrap());
            assert_eq!(share.version_bits, Some(version & 0x1fff_e000));
        }
        assert!(w.check_header(8, 12345).is_none());
    }
}
