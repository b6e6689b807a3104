//! Units of work and shares. A [`WorkSource`] turns the pool's current job into a stream of
//! [`Work`] units, each a header with extranonce2, ntime and version fixed and 2^32 nonces to
//! try; a hash that meets the share target becomes a [`Share`].

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
        let version = if self.version_mask != 0 {
            roll_version(
                self.job.version,
                self.version_mask,
                nth_version_bits(self.version_mask, rolls as u32),
            )
        } else {
            self.job.version
        };
        let root = self.job.merkle_root(&self.extranonce1, &extranonce2);
        let header = self.job.header(&root, self.job.ntime, version, 0);
        Work {
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
}

impl Work {
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
        let mut header = self.header;
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
            version_bits: self.version_bits,
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
