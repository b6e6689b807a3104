//! Targets and difficulty. A block hash is compared as a 256-bit little-endian integer (the
//! digest's bytes reversed give the familiar `0000…` display form): a hash meets a target when
//! it is not above it. Difficulty 1 is the target `0x00000000FFFF0000…0000`.

use std::cmp::Ordering;

/// A 256-bit unsigned integer, four 64-bit limbs, least significant first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct U256(pub [u64; 4]);

impl U256 {
    pub const MAX: U256 = U256([u64::MAX; 4]);

    /// The difficulty-1 target, `0xFFFF × 2^208`.
    pub const DIFF1: U256 = U256([0, 0, 0, 0x0000_0000_FFFF_0000]);

    /// A hash digest (as SHA-256 writes it) read as a little-endian number.
    pub fn from_le_bytes(b: &[u8; 32]) -> Self {
        let limb = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        U256([limb(0), limb(1), limb(2), limb(3)])
    }

    pub fn to_le_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, l) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
        }
        out
    }

    /// The display form: big-endian hex, as block explorers print hashes.
    pub fn to_hex_be(self) -> String {
        let mut b = self.to_le_bytes();
        b.reverse();
        hex::encode(b)
    }

    /// The target a compact `nBits` field encodes (mantissa × 256^(exponent − 3)).
    pub fn from_compact(bits: u32) -> Self {
        let exponent = (bits >> 24) as i32;
        let mantissa = (bits & 0x007f_ffff) as u64;
        if bits & 0x0080_0000 != 0 || mantissa == 0 {
            return U256::default(); // negative or zero: no hash meets it
        }
        let shift = 8 * (exponent - 3);
        if shift >= 0 {
            U256([mantissa, 0, 0, 0]).shl(shift as u32)
        } else {
            U256([mantissa >> (-shift as u32).min(63), 0, 0, 0])
        }
    }

    fn shl(self, s: u32) -> Self {
        if s >= 256 {
            return U256::default();
        }
        let (words, bits) = ((s / 64) as usize, s % 64);
        let mut out = [0u64; 4];
        for i in (words..4).rev() {
            out[i] = self.0[i - words] << bits;
            if bits > 0 && i > words {
                out[i] |= self.0[i - words - 1] >> (64 - bits);
            }
        }
        U256(out)
    }

    /// The nearest `f64` (enough for difficulty figures).
    pub fn to_f64(self) -> f64 {
        self.0
            .iter()
            .rev()
            .fold(0.0, |acc, &l| acc * 18446744073709551616.0 + l as f64)
    }

    /// `x` rounded down, saturating at [`U256::MAX`].
    pub fn from_f64(x: f64) -> Self {
        if !(x >= 1.0) {
            return U256::default();
        }
        if x >= 2f64.powi(256) {
            return U256::MAX;
        }
        let bits = x.to_bits();
        let exp = ((bits >> 52) & 0x7ff) as i32 - 1075;
        let mantissa = (bits & ((1 << 52) - 1)) | (1 << 52);
        if exp >= 0 {
            U256([mantissa, 0, 0, 0]).shl(exp as u32)
        } else {
            U256([mantissa >> (-exp) as u32, 0, 0, 0])
        }
    }

    /// The most significant 32 bits: what the miner's early test compares first.
    pub fn top_u32(self) -> u32 {
        (self.0[3] >> 32) as u32
    }
}

impl Ord for U256 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.iter().rev().cmp(other.0.iter().rev())
    }
}

impl PartialOrd for U256 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The share target for a pool difficulty: `DIFF1 / difficulty` (difficulty may be below 1).
pub fn target_for_difficulty(difficulty: f64) -> U256 {
    if !(difficulty > 0.0) {
        return U256::MAX;
    }
    U256::from_f64(U256::DIFF1.to_f64() / difficulty)
}

/// The difficulty a hash achieves: `DIFF1 / hash`.
pub fn difficulty_of_hash(hash: &[u8; 32]) -> f64 {
    let h = U256::from_le_bytes(hash).to_f64();
    if h == 0.0 {
        f64::INFINITY
    } else {
        U256::DIFF1.to_f64() / h
    }
}

/// Whether `hash` (a digest as SHA-256 writes it) meets `target`.
pub fn meets_target(hash: &[u8; 32], target: &U256) -> bool {
    U256::from_le_bytes(hash) <= *target
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_targets_decode() {
        // Genesis nBits 0x1d00ffff is the difficulty-1 target.
        assert_eq!(U256::from_compact(0x1d00ffff), U256::DIFF1);
        // Block 125552: nBits 0x1a44b9f2.
        assert_eq!(
            U256::from_compact(0x1a44b9f2).to_hex_be(),
            "00000000000044b9f20000000000000000000000000000000000000000000000"
        );
    }

    #[test]
    fn difficulty_and_target_round_trip() {
        assert_eq!(target_for_difficulty(1.0), U256::DIFF1);
        let t = target_for_difficulty(1024.0);
        assert_eq!(
            t.to_hex_be(),
            "00000000003fffc0000000000000000000000000000000000000000000000000"
        );
        let easy = target_for_difficulty(0.001);
        assert!(easy > U256::DIFF1);
        assert!((U256::DIFF1.to_f64() / easy.to_f64() - 0.001).abs() < 1e-12);
        assert_eq!(target_for_difficulty(0.0), U256::MAX);
    }

    #[test]
    fn ordering_is_numeric() {
        let a = U256([5, 0, 0, 1]);
        let b = U256([0, 0, 0, 2]);
        assert!(a < b && b > a && a == a);
    }
}
