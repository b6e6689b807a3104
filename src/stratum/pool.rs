//! The embedded local pool: a real Stratum V1 server on loopback that pays nothing. It builds
//! jobs from a synthetic block template (a valid BIP 34 coinbase split around the extranonces,
//! merkle branches over made-up transactions, ntime updates, a new block every so often),
//! gives each connection its own extranonce1, validates every share by recomputing its header
//! hash, and answers with the standard error codes. Any Stratum miner can connect to it.
//!
//! The template task owns the jobs and broadcasts them; each connection's task owns its
//! session. The only shared state is the pool-wide counters and the set of submitted shares.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use super::protocol::Notify;
use crate::mining::job::Job;
use crate::mining::sha256::sha256d;

/// Settings of the embedded pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub bind: SocketAddr,
    /// Starting share difficulty of each connection.
    pub difficulty: f64,
    /// Adjust each connection's difficulty towards one share every `target_share_secs`.
    pub vardiff: bool,
    pub target_share_secs: f64,
    pub min_difficulty: f64,
    /// A new job (fresh ntime) this often; every `jobs_per_block`th one is a new block with
    /// `clean_jobs`.
    pub job_interval: Duration,
    pub jobs_per_block: u32,
    pub extranonce2_size: usize,
    /// Version bits miners may roll (BIP 310).
    pub version_mask: u32,
    /// The network target's compact form (a realistic mainnet value by default).
    pub nbits: u32,
    /// Connections at once, in all and from one address; more are refused.
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// A connection that has not subscribed by then is closed.
    pub subscribe_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            difficulty: 0.001,
            vardiff: true,
            target_share_secs: 5.0,
            min_difficulty: 1e-6,
            job_interval: Duration::from_secs(30),
            jobs_per_block: 20,
            extranonce2_size: 4,
            version_mask: 0x1fff_e000,
            nbits: 0x1703_1abe,
            max_connections: 256,
            max_connections_per_address: 32,
            subscribe_timeout: Duration::from_secs(30),
        }
    }
}

/// Pool-wide counters.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub accepted: AtomicU64,
    pub rejected_stale: AtomicU64,
    pub rejected_duplicate: AtomicU64,
    pub rejected_low_difficulty: AtomicU64,
    pub rejected_other: AtomicU64,
    pub blocks: AtomicU64,
    pub connections: AtomicUsize,
    /// Sum of the difficulty of accepted shares (work done, in difficulty-1 units).
    pub accepted_work_milli: AtomicU64,
}

impl PoolStats {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected_stale.load(Ordering::Relaxed)
            + self.rejected_duplicate.load(Ordering::Relaxed)
            + self.rejected_low_difficulty.load(Ordering::Relaxed)
            + self.rejected_other.load(Ordering::Relaxed)
    }
}

/// Commands to every connected session (operators' and tests' levers).
#[derive(Debug, Clone)]
pub enum PoolCommand {
    /// A new block: a job with `clean_jobs`; earlier jobs become stale.
    NewBlock,
    SetDifficulty(f64),
    /// New extranonce1 for every session (`mining.set_extranonce`).
    NewExtranonce,
    /// Ask clients to reconnect (`client.reconnect`) to this pool after `wait` seconds.
    Reconnect {
        wait_secs: u64,
    },
    /// Send a line that is not JSON.
    SendGarbage,
    /// Close every connection.
    DropConnections,
}

/// A running pool.
pub struct PoolHandle {
    pub addr: SocketAddr,
    pub stats: Arc<PoolStats>,
    commands: broadcast::Sender<PoolCommand>,
    block: tokio::sync::mpsc::UnboundedSender<()>,
    _shutdown: watch::Sender<bool>,
}

impl PoolHandle {
    pub fn command(&self, cmd: PoolCommand) {
        if matches!(cmd, PoolCommand::NewBlock) {
            let _ = self.block.send(());
        } else {
            let _ = self.commands.send(cmd);
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct PoolJob {
    pub(super) notify: Notify,
    pub(super) job: Job,
}

pub(super) struct Shared {
    pub(super) cfg: PoolConfig,
    pub(super) stats: Arc<PoolStats>,
    /// Every accepted share's identity, so a share is accepted once across reconnects.
    /// A std mutex: held for one insert, never across an await.
    pub(super) submitted: Mutex<SubmittedShares>,
    pub(super) next_extranonce1: AtomicU64,
    /// Session id → extranonce1, so a reconnecting miner keeps its extranonce1 (and its work).
    pub(super) sessions: Mutex<HashMap<String, Vec<u8>>>,
    /// Session ids a live connection holds: those cannot be resumed (taken over) by another.
    pub(super) live_sessions: Mutex<HashSet<String>>,
    /// Open connections by address.
    pub(super) open: Mutex<HashMap<std::net::IpAddr, usize>>,
}

/// A submitted share's identity: extranonce1, job, extranonce2, ntime, nonce, version.
pub(super) type ShareId = (Vec<u8>, String, Vec<u8>, u32, u32, u32);

/// Blocks whose shares are remembered: the current one and the one before (a share for an
/// older block is refused as stale before it gets here).
const REMEMBERED_BLOCKS: usize = 2;
/// Accepted shares remembered per block: 8 bytes each, 16 MiB at most over both blocks.
/// Vardiff keeps an honest miner far below; past it shares are refused until the next block.
pub(super) const MAX_SHARES_PER_BLOCK: usize = 1 << 20;

/// The accepted shares, by the block (previous hash) they build on, each as a 64-bit keyed
/// hash of its identity (the key is random per pool, so no miner can aim for a collision). A
/// new block forgets the oldest, so the set lasts as long as the pool without growing for ever.
#[derive(Default)]
pub(super) struct SubmittedShares {
    blocks: std::collections::VecDeque<([u8; 32], HashSet<u64>)>,
    hasher: std::collections::hash_map::RandomState,
}

/// Why a share cannot be recorded.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NotRecorded {
    Duplicate,
    /// This block's bound is reached.
    Full,
}

impl SubmittedShares {
    pub(super) fn insert(&mut self, prevhash: [u8; 32], id: &ShareId) -> Result<(), NotRecorded> {
        use std::hash::BuildHasher;
        let i = match self.blocks.iter().position(|(p, _)| *p == prevhash) {
            Some(i) => i,
            None => {
                if self.blocks.len() >= REMEMBERED_BLOCKS {
                    self.blocks.pop_front();
                }
                self.blocks.push_back((prevhash, HashSet::new()));
                self.blocks.len() - 1
            }
        };
        let digest = self.hasher.hash_one(id);
        let block = &mut self.blocks[i].1;
        if block.contains(&digest) {
            return Err(NotRecorded::Duplicate);
        }
        if block.len() >= MAX_SHARES_PER_BLOCK {
            return Err(NotRecorded::Full);
        }
        block.insert(digest);
        Ok(())
    }

    /// Shares remembered, over every block kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.blocks.iter().map(|(_, s)| s.len()).sum()
    }
}

/// One open connection's place in the caps; given back when the session ends.
pub(super) struct ConnectionSlot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl ConnectionSlot {
    /// A place for a connection from `ip`, or `None` past a cap.
    fn take(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<Self> {
        let mut open = shared.open.lock().expect("open lock");
        let total: usize = open.values().sum();
        let here = open.get(&ip).copied().unwrap_or(0);
        if total >= shared.cfg.max_connections || here >= shared.cfg.max_connections_per_address {
            return None;
        }
        *open.entry(ip).or_default() += 1;
        Some(Self {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().expect("open lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Starts the pool on `cfg.bind`; it runs until the handle is dropped.
pub async fn start_pool(cfg: PoolConfig) -> std::io::Result<PoolHandle> {
    let listener = TcpListener::bind(cfg.bind).await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(PoolStats::default());
    let (commands, _) = broadcast::channel(64);
    let (jobs_tx, jobs_rx) = watch::channel::<Option<Arc<PoolJob>>>(None);
    let (block_tx, block_rx) = tokio::sync::mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        stats: stats.clone(),
        submitted: Mutex::default(),
        next_extranonce1: AtomicU64::new(1),
        sessions: Mutex::new(HashMap::new()),
        live_sessions: Mutex::new(HashSet::new()),
        open: Mutex::new(HashMap::new()),
    });
    tokio::spawn(template_task(
        cfg.clone(),
        jobs_tx,
        block_rx,
        shutdown_rx.clone(),
    ));
    let cmds = commands.clone();
    let mut stop = shutdown_rx;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                conn = listener.accept() => match conn {
                    Ok((stream, peer)) => match ConnectionSlot::take(&shared, peer.ip()) {
                        Some(slot) => {
                            tokio::spawn(super::pool_session::run_session(stream, peer, slot, shared.clone(), jobs_rx.clone(), cmds.subscribe()));
                        }
                        None => tracing::info!(%peer, "pool: connection refused (too many connections)"),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "pool: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    tracing::info!(%addr, "embedded Stratum pool listening (local, pays nothing)");
    Ok(PoolHandle {
        addr,
        stats,
        commands,
        block: block_tx,
        _shutdown: shutdown_tx,
    })
}

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

/// Builds the job of block `height`, revision `rev` (ntime refresh).
pub(super) fn make_job(
    cfg: &PoolConfig,
    height: u32,
    prevhash_stratum: &[u8; 32],
    txids: &[[u8; 32]],
    rev: u32,
    clean: bool,
) -> PoolJob {
    // Coinbase input script: BIP 34 height, a tag, then extranonce1 ‖ extranonce2.
    let mut script_head = vec![0x03];
    script_head.extend_from_slice(&height.to_le_bytes()[..3]);
    let tag = b"/idlerig local pool/";
    script_head.push(tag.len() as u8);
    script_head.extend_from_slice(tag);
    let script_len = script_head.len() + 4 + cfg.extranonce2_size;
    let mut coinb1 = hex::decode(
        "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff",
    )
    .expect("hex");
    coinb1.push(script_len as u8);
    coinb1.extend_from_slice(&script_head);
    // Sequence, one output of 3.125 BTC to OP_TRUE, lock time.
    let mut coinb2 = hex::decode("ffffffff01").expect("hex");
    coinb2.extend_from_slice(&312_500_000u64.to_le_bytes());
    coinb2.extend_from_slice(&[0x01, 0x51, 0, 0, 0, 0]);
    let branch = merkle_branch(txids);
    let notify = Notify {
        job_id: format!("{height:x}{rev:04x}"),
        prevhash: hex::encode(prevhash_stratum),
        coinb1: hex::encode(coinb1),
        coinb2: hex::encode(coinb2),
        merkle_branch: branch.iter().map(hex::encode).collect(),
        version: "20000000".into(),
        nbits: format!("{:08x}", cfg.nbits),
        ntime: format!("{:08x}", unix_now()),
        clean_jobs: clean,
    };
    let job = notify.to_job().expect("the pool's own job is well-formed");
    PoolJob { notify, job }
}

/// The merkle branch of the coinbase (position 0) over `txids` (positions 1..).
pub fn merkle_branch(txids: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let mut branch = Vec::new();
    let mut level: Vec<[u8; 32]> = txids.to_vec();
    while !level.is_empty() {
        branch.push(level[0]);
        level = level[1..]
            .chunks(2)
            .map(|pair| {
                let mut buf = [0u8; 64];
                buf[..32].copy_from_slice(&pair[0]);
                buf[32..].copy_from_slice(pair.get(1).unwrap_or(&pair[0]));
                sha256d(&buf)
            })
            .collect();
    }
    branch
}

async fn template_task(
    cfg: PoolConfig,
    jobs: watch::Sender<Option<Arc<PoolJob>>>,
    mut new_block: tokio::sync::mpsc::UnboundedReceiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut height = 900_000u32;
    let mut rev = 0u32;
    let new_block_data = |h: u32| {
        let prev: [u8; 32] = rand::random();
        let txids: Vec<[u8; 32]> = (0..(3 + h % 5)).map(|_| rand::random()).collect();
        (prev, txids)
    };
    let (mut prev, mut txids) = new_block_data(height);
    let _ = jobs.send(Some(Arc::new(make_job(
        &cfg, height, &prev, &txids, rev, true,
    ))));
    let mut tick = tokio::time::interval(cfg.job_interval);
    tick.tick().await;
    loop {
        let forced = tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => false,
            Some(()) = new_block.recv() => true,
        };
        rev += 1;
        let clean = forced || rev % cfg.jobs_per_block.max(1) == 0;
        if clean {
            height += 1;
            (prev, txids) = new_block_data(height);
        }
        let _ = jobs.send(Some(Arc::new(make_job(
            &cfg, height, &prev, &txids, rev, clean,
        ))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(nonce: u32) -> ShareId {
        (vec![1], "job".into(), vec![0; 4], 0, nonce, 0)
    }

    #[test]
    fn accepted_shares_are_remembered_for_two_blocks_and_no_longer() {
        let mut s = SubmittedShares::default();
        assert_eq!(s.insert([1; 32], &id(1)), Ok(()));
        assert_eq!(s.insert([1; 32], &id(1)), Err(NotRecorded::Duplicate));
        assert_eq!(s.insert([2; 32], &id(1)), Ok(()), "another block");
        assert_eq!(
            s.insert([1; 32], &id(1)),
            Err(NotRecorded::Duplicate),
            "the block before is still remembered"
        );
        for block in 3..100u8 {
            for n in 0..10 {
                assert_eq!(s.insert([block; 32], &id(n)), Ok(()));
            }
        }
        assert_eq!(s.len(), 20, "only the last two blocks' shares are kept");
    }
}
