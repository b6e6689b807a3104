//! The Stratum client task: owns the pool connection, feeds the [`ClientSession`] state
//! machine, and carries out its actions. Reconnects with exponential back-off and jitter,
//! fails over through the configured pools, and returns to the first one once it answers.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::protocol::{parse_line, MAX_LINE_BYTES};

/// The pool's lines, framed with a maximum length: a longer line is refused while it is being
/// read, never buffered whole.
type PoolLines = FramedRead<tokio::net::tcp::OwnedReadHalf, LinesCodec>;
use super::session::{Action, ClientSession, ShareCounts};
use super::PoolUrl;
use crate::mining::{Miner, ShareReceiver};

/// Settings of the client. `Debug` hides the password.
#[derive(Clone)]
pub struct ClientConfig {
    /// Pools in order of preference.
    pub pools: Vec<PoolUrl>,
    pub user: String,
    pub password: String,
    pub version_rolling: bool,
    /// First back-off delay; doubles per failure up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Failed attempts on one pool before moving to the next.
    pub attempts_per_pool: u32,
    /// How often a backup connection checks whether the first pool is back.
    pub primary_retry: Duration,
    /// Obey `client.reconnect` to another host (the password would go there too).
    pub allow_reconnect_elsewhere: bool,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("pools", &self.pools)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new(pools: Vec<PoolUrl>, user: &str, password: &str) -> Self {
        Self {
            pools,
            user: user.into(),
            password: password.into(),
            version_rolling: true,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(60),
            attempts_per_pool: 2,
            primary_retry: Duration::from_secs(30),
            allow_reconnect_elsewhere: false,
        }
    }
}

/// Live figures of the client, readable from anywhere.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub connected: AtomicBool,
    /// Index into the pool list of the pool in use.
    pub pool_index: AtomicUsize,
    pub connections: AtomicU64,
    pub submitted: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub stale: AtomicU64,
    /// Shares found and never submitted because a bound was reached: the share channel's,
    /// the session's queue, or its submissions in flight.
    pub dropped: AtomicU64,
    /// Current share difficulty, as f64 bits.
    pub difficulty_bits: AtomicU64,
}

impl ClientStats {
    fn publish(&self, c: &ShareCounts, difficulty: f64, channel_dropped: u64) {
        self.submitted.store(c.submitted, Ordering::Relaxed);
        self.dropped
            .store(c.dropped + channel_dropped, Ordering::Relaxed);
        self.accepted.store(c.accepted, Ordering::Relaxed);
        self.rejected.store(c.rejected, Ordering::Relaxed);
        self.stale.store(c.stale, Ordering::Relaxed);
        self.difficulty_bits
            .store(difficulty.to_bits(), Ordering::Relaxed);
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn difficulty(&self) -> f64 {
        f64::from_bits(self.difficulty_bits.load(Ordering::Relaxed))
    }
}

/// Runs the client until `shutdown` turns true; shares arrive on `shares`.
pub async fn run_client(
    cfg: ClientConfig,
    sink: Arc<dyn Miner>,
    mut shares: ShareReceiver,
    stats: Arc<ClientStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    if cfg.pools.is_empty() {
        tracing::error!("no pool configured; the miner stays idle");
        return;
    }
    let mut session = ClientSession::new(&cfg.user, &cfg.password, cfg.version_rolling);
    let mut index = 0usize;
    let mut failures = 0u32;
    let mut redirect: Option<PoolUrl> = None;
    loop {
        if *shutdown.borrow() {
            report_unsent(&mut shares);
            return;
        }
        let url = redirect.take().unwrap_or_else(|| cfg.pools[index].clone());
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((url.host.as_str(), url.port)),
        );
        // Shutdown ends the attempt too: a pool that never answers cannot hold up the exit.
        let connected = tokio::select! {
            c = connect => c,
            _ = shutdown.changed() => {
                report_unsent(&mut shares);
                return;
            }
        };
        let ended = match connected {
            Ok(Ok(stream)) => {
                failures = 0;
                stats.connections.fetch_add(1, Ordering::Relaxed);
                stats.pool_index.store(index, Ordering::Relaxed);
                stats.connected.store(true, Ordering::Relaxed);
                tracing::info!(pool = %url, "connected to the pool");
                let ended = connection(
                    &cfg,
                    index,
                    stream,
                    &mut session,
                    sink.as_ref(),
                    &mut shares,
                    &stats,
                    &mut shutdown,
                )
                .await;
                stats.connected.store(false, Ordering::Relaxed);
                for a in session.on_disconnect() {
                    if let Action::ClearWork = a {
                        sink.clear_work();
                    }
                }
                stats.publish(&session.counts, session.difficulty(), shares.dropped());
                ended
            }
            Ok(Err(e)) => Ended::Failed(e.to_string()),
            Err(_) => Ended::Failed("connection timed out".into()),
        };
        match ended {
            Ended::Shutdown => return,
            Ended::Redirect(to, wait) => {
                tracing::info!(to = ?to, ?wait, "the pool asked us to reconnect");
                redirect = to;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {
                        report_unsent(&mut shares);
                        return;
                    }
                }
                continue;
            }
            Ended::BackToPrimary => {
                index = 0;
                continue;
            }
            Ended::Failed(reason) => {
                failures += 1;
                tracing::warn!(pool = %url, %reason, failures, "pool connection lost");
                if failures >= cfg.attempts_per_pool && cfg.pools.len() > 1 {
                    index = (index + 1) % cfg.pools.len();
                    failures = 0;
                    tracing::warn!(pool = %cfg.pools[index], "failing over to the next pool");
                }
            }
        }
        let backoff = cfg
            .min_backoff
            .saturating_mul(1 << failures.min(16))
            .min(cfg.max_backoff);
        let jitter = 0.5 + rand::random::<f64>();
        tokio::select! {
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            _ = shutdown.changed() => {
                report_unsent(&mut shares);
                return;
            }
        }
    }
}

/// Shares that cannot be submitted because the pool is unreachable at shutdown are counted
/// and logged (one line), never dropped silently.
fn report_unsent(shares: &mut ShareReceiver) {
    let mut unsent = 0u64;
    let mut blocks = 0u64;
    while let Some(share) = shares.try_recv() {
        unsent += 1;
        if share.is_block {
            blocks += 1;
            tracing::error!(job = %share.job_id, nonce = format!("{:08x}", share.nonce), "a BLOCK was not submitted: no pool connection at shutdown");
        }
    }
    if unsent > 0 {
        tracing::warn!(
            unsent,
            blocks,
            "shares not submitted: no pool connection at shutdown"
        );
    }
}

enum Ended {
    Failed(String),
    Redirect(Option<PoolUrl>, Duration),
    BackToPrimary,
    Shutdown,
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    cfg: &ClientConfig,
    index: usize,
    stream: TcpStream,
    session: &mut ClientSession,
    sink: &dyn Miner,
    shares: &mut ShareReceiver,
    stats: &ClientStats,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
    let mut actions = session.on_connect();
    let mut probe = tokio::time::interval(cfg.primary_retry);
    probe.tick().await;
    loop {
        for action in actions.drain(..) {
            match action {
                Action::Send(line) => {
                    if let Err(e) = write.write_all(line.as_bytes()).await {
                        return Ended::Failed(format!("write: {e}"));
                    }
                }
                Action::SetWork(source) => sink.set_work(source),
                Action::ClearWork => sink.clear_work(),
                Action::Reconnect { host, port, wait } => {
                    let current = &cfg.pools[index];
                    let to = PoolUrl {
                        host: host.unwrap_or_else(|| current.host.clone()),
                        port: port.unwrap_or(current.port),
                    };
                    // The worker's password goes wherever we connect: another host only when
                    // the operator allows it.
                    if to.host != current.host && !cfg.allow_reconnect_elsewhere {
                        tracing::warn!(from = %current, to = %to, "ignoring the pool's client.reconnect to another host (allow it with --allow-reconnect-elsewhere)");
                        continue;
                    }
                    // Shares sent while the pool was asking us to go are answered on this
                    // connection: leaving first would submit them again after the reconnect,
                    // as duplicates of shares the pool accepted.
                    await_answers(session, &mut lines, Duration::from_secs(2)).await;
                    return Ended::Redirect(Some(to), wait);
                }
            }
        }
        stats.publish(&session.counts, session.difficulty(), shares.dropped());
        tokio::select! {
            line = lines.next() => match line {
                Some(Ok(line)) => match parse_line(&line) {
                    Ok(msg) => actions = session.on_message(msg),
                    // A pool that sends garbage is logged, not obeyed; the session goes on.
                    Err(e) => tracing::warn!(error = %e, "unreadable line from the pool"),
                },
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    tracing::warn!(limit = MAX_LINE_BYTES, "the pool sent a line over the size limit; disconnecting");
                    return Ended::Failed("line over the size limit".into());
                }
                None => return Ended::Failed("the pool closed the connection".into()),
                Some(Err(e)) => return Ended::Failed(format!("read: {e}")),
            },
            Some(share) = shares.recv() => {
                if share.is_block {
                    tracing::warn!(job = %share.job_id, "submitting a share that meets the network target (a block)");
                }
                actions = session.on_share(share);
            }
            _ = probe.tick(), if index != 0 => {
                let primary = &cfg.pools[0];
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect((primary.host.as_str(), primary.port))).await {
                    tracing::info!(pool = %primary, "the first pool is back; returning to it");
                    return Ended::BackToPrimary;
                }
            }
            _ = shutdown.changed() => {
                flush_shares(session, shares, &mut write, &mut lines, stats).await;
                return Ended::Shutdown;
            }
        }
    }
}

/// Reads the pool's lines until every submission has its answer, or `limit` passes. Only the
/// answers matter: new jobs are not mined (the connection is ending).
async fn await_answers(session: &mut ClientSession, lines: &mut PoolLines, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while session.pending_submits() > 0 {
        match tokio::time::timeout_at(deadline, lines.next()).await {
            Ok(Some(Ok(line))) => {
                if let Ok(msg) = parse_line(&line) {
                    let _ = session.on_message(msg);
                }
            }
            _ => break,
        }
    }
}

/// At shutdown: submits the shares the miner found before it stopped and waits (up to 5 s)
/// for the pool's answers to every submission still open, so that nothing found is lost.
async fn flush_shares(
    session: &mut ClientSession,
    shares: &mut ShareReceiver,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    lines: &mut PoolLines,
    stats: &ClientStats,
) {
    let mut found = 0;
    while let Some(share) = shares.try_recv() {
        found += 1;
        for action in session.on_share(share) {
            if let Action::Send(line) = action {
                if write.write_all(line.as_bytes()).await.is_err() {
                    tracing::warn!("the pool connection failed while submitting the last shares");
                    return;
                }
            }
        }
    }
    let open = session.pending_submits();
    await_answers(session, lines, Duration::from_secs(5)).await;
    stats.publish(&session.counts, session.difficulty(), shares.dropped());
    let unanswered = session.pending_submits();
    if unanswered > 0 {
        tracing::warn!(
            unanswered,
            "closing the pool session with shares the pool has not answered"
        );
    }
    tracing::info!(
        found_at_stop = found,
        awaited = open,
        accepted = session.counts.accepted,
        "pool session closed"
    );
}
