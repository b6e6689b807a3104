//! The Stratum client against the embedded pool over TCP, with the real CPU miner: shares are
//! accepted, and the client recovers from every disruption the pool can throw at it without
//! submitting anything stale or duplicated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idlerig::mining::{CpuMiner, CpuMinerConfig, Miner, PreemptFlag};
use idlerig::stratum::client::{run_client, ClientConfig, ClientStats};
use idlerig::stratum::pool::{start_pool, PoolCommand, PoolConfig, PoolHandle};
use idlerig::stratum::PoolUrl;
use tokio::sync::watch;

struct Rig {
    pool: PoolHandle,
    stats: Arc<ClientStats>,
    _miner: Arc<CpuMiner>,
    _stop: watch::Sender<bool>,
}

async fn rig(pools: Vec<PoolUrl>, pool: PoolHandle) -> Rig {
    let (tx, rx) = idlerig::mining::share_channel(idlerig::mining::SHARE_CHANNEL_CAPACITY);
    let miner = Arc::new(CpuMiner::start(
        CpuMinerConfig {
            threads: 2,
            record_ranges: false,
            path: None,
        },
        PreemptFlag::default(),
        tx,
    ));
    miner.resume();
    let stats = Arc::new(ClientStats::default());
    let (stop, stop_rx) = watch::channel(false);
    let mut cfg = ClientConfig::new(pools, "test.worker", "secret-pass");
    cfg.min_backoff = Duration::from_millis(50);
    cfg.primary_retry = Duration::from_millis(500);
    tokio::spawn(run_client(cfg, miner.clone(), rx, stats.clone(), stop_rx));
    Rig {
        pool,
        stats,
        _miner: miner,
        _stop: stop,
    }
}

fn local(pool: &PoolHandle) -> PoolUrl {
    PoolUrl {
        host: "127.0.0.1".into(),
        port: pool.addr.port(),
    }
}

async fn pool_with(difficulty: f64) -> PoolHandle {
    start_pool(PoolConfig {
        difficulty,
        vardiff: false,
        job_interval: Duration::from_secs(2),
        jobs_per_block: 3,
        ..PoolConfig::default()
    })
    .await
    .unwrap()
}

/// Polls `done` until it holds; past `limit` the test fails with `failure()`.
async fn wait_until(limit: Duration, done: impl Fn() -> bool, failure: impl Fn() -> String) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "{}", failure());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the pool has accepted `more` shares beyond what it had.
async fn accepted_more(rig: &Rig, more: u64, what: &str) {
    let start = rig.pool.stats.accepted();
    wait_until(
        Duration::from_secs(60),
        || rig.pool.stats.accepted() >= start + more,
        || {
            format!(
                "no shares accepted after {what} ({} accepted in all)",
                rig.pool.stats.accepted()
            )
        },
    )
    .await;
}

/// Shares a pool may reject as stale in a run: one found and sent in the moment the pool's
/// clean job is on its way to the client can only be stale (Stratum cannot avoid it; a few
/// per block change at the most). Any more means the client submits for jobs it knows ended.
const STALE_IN_FLIGHT: u64 = 2;

fn assert_clean(rig: &Rig) {
    let p = &rig.pool.stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(
        p.rejected_stale.load(Relaxed) <= STALE_IN_FLIGHT,
        "the client submitted {} stale shares",
        p.rejected_stale.load(Relaxed)
    );
    assert_eq!(
        p.rejected_duplicate.load(Relaxed),
        0,
        "the client submitted a duplicate"
    );
    assert_eq!(
        p.rejected_low_difficulty.load(Relaxed),
        0,
        "the client submitted a share below the target"
    );
    assert_eq!(
        p.rejected_other.load(Relaxed),
        0,
        "the pool rejected a share as malformed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_recovers_from_every_disruption_without_stale_or_duplicate_shares() {
    let pool = pool_with(0.002).await;
    let url = local(&pool);
    let rig = rig(vec![url], pool).await;
    accepted_more(&rig, 3, "connecting").await;
    assert_clean(&rig);

    rig.pool.command(PoolCommand::DropConnections);
    accepted_more(&rig, 2, "the pool dropped the connection").await;
    assert!(
        rig.stats
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2,
        "the client reconnected"
    );

    rig.pool.command(PoolCommand::SendGarbage);
    accepted_more(&rig, 2, "a garbage line").await;

    for _ in 0..3 {
        rig.pool.command(PoolCommand::NewBlock);
        accepted_more(&rig, 1, "clean_jobs").await;
    }

    rig.pool.command(PoolCommand::SetDifficulty(0.004));
    // The pool takes commands on its own task: wait until the client works at the new
    // difficulty, then for shares found at it.
    wait_until(
        Duration::from_secs(30),
        || rig.stats.difficulty() == 0.004,
        || {
            format!(
                "the client still works at difficulty {}",
                rig.stats.difficulty()
            )
        },
    )
    .await;
    accepted_more(&rig, 2, "a difficulty change").await;

    rig.pool.command(PoolCommand::NewExtranonce);
    accepted_more(&rig, 2, "a new extranonce1").await;

    rig.pool.command(PoolCommand::Reconnect { wait_secs: 0 });
    accepted_more(&rig, 2, "client.reconnect").await;

    assert_clean(&rig);
    // Every submitted share got an answer that the client counted, and all were accepted.
    // Mining goes on, so a rejection may be on its way back: wait until the two agree.
    let s = &rig.stats;
    use std::sync::atomic::Ordering::Relaxed;
    wait_until(
        Duration::from_secs(30),
        || s.rejected.load(Relaxed) == rig.pool.stats.rejected(),
        || {
            format!(
                "the client counted {} rejections, the pool {}",
                s.rejected.load(Relaxed),
                rig.pool.stats.rejected()
            )
        },
    )
    .await;
    assert!(
        s.accepted() >= 14 && s.accepted() <= rig.pool.stats.accepted(),
        "client {} / pool {}",
        s.accepted(),
        rig.pool.stats.accepted()
    );
    eprintln!(
        "pool accepted {}, client submitted {}, accepted {}, stale (kept back) {}, connections {}",
        rig.pool.stats.accepted(),
        s.submitted.load(Relaxed),
        s.accepted(),
        s.stale.load(Relaxed),
        s.connections.load(Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fails_over_and_returns_to_the_first_pool() {
    // The first pool's port is free: nothing listens there yet.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let first_port = probe.local_addr().unwrap().port();
    drop(probe);
    let backup = pool_with(0.002).await;
    let first = PoolUrl {
        host: "127.0.0.1".into(),
        port: first_port,
    };
    let rig = rig(vec![first, local(&backup)], backup).await;
    accepted_more(&rig, 2, "failing over to the backup").await;
    assert_eq!(
        rig.stats
            .pool_index
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // The first pool comes up: the client goes back to it.
    let primary = start_pool(PoolConfig {
        bind: std::net::SocketAddr::from(([127, 0, 0, 1], first_port)),
        difficulty: 0.002,
        vardiff: false,
        ..PoolConfig::default()
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(60),
        || primary.stats.accepted() >= 2,
        || "the client did not return to the first pool".into(),
    )
    .await;
    assert_eq!(
        rig.stats
            .pool_index
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_clean(&rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vardiff_raises_an_easy_difficulty() {
    let pool = start_pool(PoolConfig {
        difficulty: 0.0005,
        vardiff: true,
        target_share_secs: 0.5,
        ..PoolConfig::default()
    })
    .await
    .unwrap();
    let url = local(&pool);
    let rig = rig(vec![url], pool).await;
    wait_until(
        Duration::from_secs(90),
        || rig.stats.difficulty() > 0.0005,
        || {
            format!(
                "vardiff never raised the difficulty ({})",
                rig.stats.difficulty()
            )
        },
    )
    .await;
    accepted_more(&rig, 2, "a vardiff change").await;
    assert_clean(&rig);
}

/// At shutdown a share the miner found just before it stopped is submitted, and the client
/// waits for the pool's answer before it closes the session. One thread: the share and the
/// stop signal are both waiting when the client task next runs, whichever it looks at first.
#[tokio::test(flavor = "current_thread")]
async fn a_share_pending_at_shutdown_is_submitted_and_answered() {
    let pool = pool_with(0.002).await;
    let (found_tx, mut found) =
        idlerig::mining::share_channel(idlerig::mining::SHARE_CHANNEL_CAPACITY);
    let miner = Arc::new(CpuMiner::start(
        CpuMinerConfig {
            threads: 2,
            record_ranges: false,
            path: None,
        },
        PreemptFlag::default(),
        found_tx,
    ));
    miner.resume();
    let (client_tx, client_rx) =
        idlerig::mining::share_channel(idlerig::mining::SHARE_CHANNEL_CAPACITY);
    let stats = Arc::new(ClientStats::default());
    let (stop, stop_rx) = watch::channel(false);
    let cfg = ClientConfig::new(vec![local(&pool)], "test.worker", "x");
    let client = tokio::spawn(run_client(
        cfg,
        miner.clone(),
        client_rx,
        stats.clone(),
        stop_rx,
    ));
    let share = tokio::time::timeout(Duration::from_secs(60), found.recv())
        .await
        .expect("the miner finds a share")
        .unwrap();
    miner.preempt_flag().raise();
    // No await between the two: the client sees both at once.
    assert!(client_tx.send(share));
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("the client closes within 10 s")
        .unwrap();
    assert_eq!(
        stats.submitted.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(stats.accepted(), 1, "the answer was awaited before closing");
    assert_eq!(pool.stats.accepted(), 1);
}
