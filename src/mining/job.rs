//! From a pool's `mining.notify` job to block headers: the coinbase
//! (`coinb1 ‖ extranonce1 ‖ extranonce2 ‖ coinb2`), the merkle root from the branch list, and
//! the 80-byte header with Stratum's byte orders (prevhash as eight 4-byte words each
//! byte-swapped; version, ntime, nBits and nonce little-endian), plus BIP 310 version rolling.

use super::sha256::sha256d;
use super::MiningError;

/// A job as the pool sent it, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub job_id: String,
    /// The previous block hash in header byte order.
    pub prevhash: [u8; 32],
    pub coinb1: Vec<u8>,
    pub coinb2: Vec<u8>,
    /// Merkle branch hashes, in internal byte order (as sent).
    pub merkle_branch: Vec<[u8; 32]>,
    pub version: u32,
    pub nbits: u32,
    pub ntime: u32,
    pub clean_jobs: bool,
}

/// Decodes a hex string of exactly `N` bytes.
pub fn hex_array<const N: usize>(field: &str, s: &str) -> Result<[u8; N], MiningError> {
    let v = hex::decode(s).map_err(|e| MiningError::BadJob(format!("{field}: not hex ({e})")))?;
    v.try_into().map_err(|v: Vec<u8>| {
        MiningError::BadJob(format!("{field}: {} bytes, expected {N}", v.len()))
    })
}

/// A big-endian hex `u32` as Stratum sends version, nBits and ntime (`"1c2ac4af"`).
pub fn hex_u32(field: &str, s: &str) -> Result<u32, MiningError> {
    Ok(u32::from_be_bytes(hex_array::<4>(field, s)?))
}

/// Stratum's prevhash field to header byte order: each 4-byte word reversed.
pub fn stratum_prevhash_to_header(stratum: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, word) in stratum.chunks_exact(4).enumerate() {
        for j in 0..4 {
            out[i * 4 + j] = word[3 - j];
        }
    }
    out
}

impl Job {
    /// Decodes the fields of `mining.notify` (all hex strings as the pool sent them).
    #[allow(clippy::too_many_arguments)]
    pub fn from_notify(
        job_id: &str,
        prevhash: &str,
        coinb1: &str,
        coinb2: &str,
        merkle_branch: &[String],
        version: &str,
        nbits: &str,
        ntime: &str,
        clean_jobs: bool,
    ) -> Result<Self, MiningError> {
        Ok(Job {
            job_id: job_id.to_string(),
            prevhash: stratum_prevhash_to_header(&hex_array("prevhash", prevhash)?),
            coinb1: hex::decode(coinb1).map_err(|e| MiningError::BadJob(format!("coinb1: {e}")))?,
            coinb2: hex::decode(coinb2).map_err(|e| MiningError::BadJob(format!("coinb2: {e}")))?,
            merkle_branch: merkle_branch
                .iter()
                .enumerate()
                .map(|(i, b)| hex_array(&format!("merkle_branch[{i}]"), b))
                .collect::<Result<_, _>>()?,
            version: hex_u32("version", version)?,
            nbits: hex_u32("nbits", nbits)?,
            ntime: hex_u32("ntime", ntime)?,
            clean_jobs,
        })
    }

    /// The coinbase transaction for these extranonces.
    pub fn coinbase(&self, extranonce1: &[u8], extranonce2: &[u8]) -> Vec<u8> {
        [
            self.coinb1.as_slice(),
            extranonce1,
            extranonce2,
            self.coinb2.as_slice(),
        ]
        .concat()
    }

    /// The merkle root (internal byte order) for these extranonces.
    pub fn merkle_root(&self, extranonce1: &[u8], extranonce2: &[u8]) -> [u8; 32] {
        merkle_root(
            sha256d(&self.coinbase(extranonce1, extranonce2)),
            &self.merkle_branch,
        )
    }

    /// The header for a merkle root, ntime, version and nonce.
    pub fn header(&self, merkle_root: &[u8; 32], ntime: u32, version: u32, nonce: u32) -> [u8; 80] {
        let mut h = [0u8; 80];
        h[0..4].copy_from_slice(&version.to_le_bytes());
        h[4..36].copy_from_slice(&self.prevhash);
        h[36..68].copy_from_slice(merkle_root);
        h[68..72].copy_from_slice(&ntime.to_le_bytes());
        h[72..76].copy_from_slice(&self.nbits.to_le_bytes());
        h[76..80].copy_from_slice(&nonce.to_le_bytes());
        h
    }
}

/// Folds the coinbase hash up the branch: `root = sha256d(root ‖ branch[i])`.
pub fn merkle_root(coinbase_hash: [u8; 32], branch: &[[u8; 32]]) -> [u8; 32] {
    branch.iter().fold(coinbase_hash, |acc, b| {
        let mut buf = [0u8; 64];
        buf[..32].copy_from_slice(&acc);
        buf[32..].copy_from_slice(b);
        sha256d(&buf)
    })
}

/// BIP 310: the version with the bits under `mask` replaced by `bits`.
pub fn roll_version(version: u32, mask: u32, bits: u32) -> u32 {
    (version & !mask) | (bits & mask)
}

/// The `n`th distinct value of the bits under `mask` (n's bits spread over the mask's bits),
/// so a miner can walk every rolled version in order.
pub fn nth_version_bits(mask: u32, n: u32) -> u32 {
    let mut out = 0;
    let mut src = 0;
    for bit in 0..32 {
        if mask & (1 << bit) != 0 {
            if n & (1 << src) != 0 {
                out |= 1 << bit;
            }
            src += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mining::sha256::sha256d;
    use crate::mining::target::{difficulty_of_hash, meets_target, U256};

    fn display(hash: [u8; 32]) -> String {
        let mut h = hash;
        h.reverse();
        hex::encode(h)
    }

    /// Bitcoin's genesis block (height 0), fields from the block itself.
    #[test]
    fn genesis_header_hashes_to_the_genesis_hash() {
        let mut merkle = hex_array::<32>(
            "m",
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b",
        )
        .unwrap();
        merkle.reverse(); // displayed order → internal order
        let job = Job {
            job_id: "genesis".into(),
            prevhash: [0; 32],
            coinb1: vec![],
            coinb2: vec![],
            merkle_branch: vec![],
            version: 1,
            nbits: 0x1d00ffff,
            ntime: 1231006505,
            clean_jobs: true,
        };
        let header = job.header(&merkle, job.ntime, 1, 2083236893);
        let hash = sha256d(&header);
        assert_eq!(
            display(hash),
            "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f"
        );
        assert!(meets_target(&hash, &U256::from_compact(0x1d00ffff)));
    }

    /// Block 125552, the worked example of the Bitcoin wiki's "Block hashing algorithm" page.
    #[test]
    fn block_125552_header_hashes_to_its_hash() {
        let header = hex::decode(concat!(
            "01000000",
            "81cd02ab7e569e8bcd9317e2fe99f2de44d49ab2b8851ba4a308000000000000",
            "e320b6c2fffc8d750423db8b1eb942ae710e951ed797f7affc8892b0f1fc122b",
            "c7f5d74d",
            "f2b9441a",
            "42a14695"
        ))
        .unwrap();
        let hash = sha256d(&header);
        assert_eq!(
            display(hash),
            "00000000000000001e8d6829a8a21adc5d38d0a473b144b6765798e61f98bd1d"
        );
        assert!(meets_target(&hash, &U256::from_compact(0x1a44b9f2)));
    }

    /// The example exchange of the Stratum V1 docs (slush pool / Braiins): job `bf`,
    /// extranonce1 `08000002`, the miner's submit `["slush.miner1","bf","00000001","504e86ed",
    /// "b2957c02"]`, whose header hash is `000000002076870f…ab32`.
    #[test]
    fn stratum_docs_example_share_hashes_as_documented() {
        let job = Job::from_notify(
            "bf",
            "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000",
            "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008",
            "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000",
            &[],
            "00000002",
            "1c2ac4af",
            "504e86b9",
            false,
        )
        .unwrap();
        let en1 = hex::decode("08000002").unwrap();
        let en2 = hex::decode("00000001").unwrap();
        let root = job.merkle_root(&en1, &en2);
        let header = job.header(
            &root,
            hex_u32("ntime", "504e86ed").unwrap(),
            job.version,
            hex_u32("nonce", "b2957c02").unwrap(),
        );
        let hash = sha256d(&header);
        assert_eq!(
            display(hash),
            "000000002076870fe65a2b6eeed84fa892c0db924f1482243a6247d931dcab32"
        );
        assert!(difficulty_of_hash(&hash) > 1.0);
    }

    /// A mainnet job with 13 merkle branches: ESP-Miner's test "nonce diff checking 2"
    /// (components/stratum/test/test_mining.c), whose share has difficulty 683.
    #[test]
    fn mainnet_job_with_merkle_branches_gives_difficulty_683() {
        let branches: Vec<String> = [
            "2b77d9e413e8121cd7a17ff46029591051d0922bd90b2b2a38811af1cb57a2b2",
            "5c8874cef00f3a233939516950e160949ef327891c9090467cead995441d22c5",
            "2d91ff8e19ac5fa69a40081f26c5852d366d608b04d2efe0d5b65d111d0d8074",
            "0ae96f609ad2264112a0b2dfb65624bedbcea3b036a59c0173394bba3a74e887",
            "e62172e63973d69574a82828aeb5711fc5ff97946db10fc7ec32830b24df7bde",
            "adb49456453aab49549a9eb46bb26787fb538e0a5f656992275194c04651ec97",
            "a7bc56d04d2672a8683892d6c8d376c73d250a4871fdf6f57019bcc737d6d2c2",
            "d94eceb8182b4f418cd071e93ec2a8993a0898d4c93bc33d9302f60dbbd0ed10",
            "5ad7788b8c66f8f50d332b88a80077ce10e54281ca472b4ed9bbbbcb6cf99083",
            "9f9d784b33df1b3ed3edb4211afc0dc1909af9758c6f8267e469f5148ed04809",
            "48fd17affa76b23e6fb2257df30374da839d6cb264656a82e34b350722b05123",
            "c4f5ab01913fc186d550c1a28f3f3e9ffaca2016b961a6a751f8cca0089df924",
            "cff737e1d00176dd6bbfa73071adbb370f227cfb5fba186562e4060fcec877e1",
        ]
        .map(String::from)
        .to_vec();
        let job = Job::from_notify(
            "x",
            "0c859545a3498373a57452fac22eb7113df2a465000543520000000000000000",
            "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4b0389130cfabe6d6d5cbab26a2599e92916edec5657a94a0708ddb970f5c45b5d12905085617eff8e",
            "31650707758de07b010000000000001cfd7038212f736c7573682f000000000379ad0c2a000000001976a9147c154ed1dc59609e3d26abb2df2ea3d587cd8c4188ac00000000000000002c6a4c2952534b424c4f434b3ae725d3994b811572c1f345deb98b56b465ef8e153ecbbd27fa37bf1b005161380000000000000000266a24aa21a9ed63b06a7946b190a3fda1d76165b25c9b883bcc6621b040773050ee2a1bb18f1800000000",
            &branches,
            "20000004",
            "1705ae3a",
            "647025b5",
            false,
        )
        .unwrap();
        let root = job.merkle_root(
            &hex::decode("01000000").unwrap(),
            &hex::decode("00000000").unwrap(),
        );
        assert_eq!(
            hex::encode(root),
            "5bdc1968499c3393873edf8e07a1c3a50a97fc3a9d1a376bbf77087dd63778eb"
        );
        let hash = sha256d(&job.header(&root, job.ntime, job.version, 0x0a029ed1));
        assert_eq!(difficulty_of_hash(&hash) as u64, 683);
    }

    #[test]
    fn version_rolling_follows_bip_310() {
        assert_eq!(
            roll_version(0x2000_0004, 0x1fff_e000, 0xffff_ffff),
            0x3fff_e004
        );
        assert_eq!(
            roll_version(0x2000_0004, 0x1fff_e000, 0x0000_2000),
            0x2000_2004
        );
        assert_eq!(nth_version_bits(0x1fff_e000, 0), 0);
        assert_eq!(nth_version_bits(0x1fff_e000, 1), 0x2000);
        assert_eq!(nth_version_bits(0x1fff_e000, 3), 0x6000);
        assert_eq!(nth_version_bits(0x0000_0f00, 0xff), 0x0f00);
    }
}
