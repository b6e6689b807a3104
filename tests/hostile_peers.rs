//! Hostile peers over real TCP. Miners against the embedded pool: an endless line is refused
//! as it arrives, a share is credited only to a worker the connection authorized, a share for a
//! job that a new extranonce1 voided is stale, a live session's extranonce1 cannot be taken
//! over, a connection that never subscribes is closed, and connections are capped per address. A pool against the client: an endless line ends
//! the connection, a tiny difficulty is raised to the floor, `client.reconnect` to another
//! host is ignored, and a pool that never answers cannot make the client remember every share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idlerig::mining::{CpuMiner, CpuMinerConfig, Miner, PreemptFlag};
use idlerig::stratum::client::{run_client, ClientConfig, ClientStats};
use idlerig::stratum::pool::{start_pool, PoolCommand, PoolConfig, PoolHandle};
use idlerig::stratum::PoolUrl;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

mod common;

const DEADLINE: Duration = Duration::from_secs(30);

async fn pool(cfg: PoolConfig) -> PoolHandle {
    start_pool(cfg).await.unwrap()
}

/// A line-oriented peer for the tests' side of a connection.
struct Peer {
    read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl Peer {
    fn new(stream: TcpStream) -> Self {
        let (r, w) = stream.into_split();
        Self {
            read: BufReader::new(r),
            write: w,
        }
    }

    async fn send(&mut self, v: Value) {
        self.write
            .write_all(format!("{v}\n").as_bytes())
            .await
            .unwrap();
    }

    /// The next message that answers `id` (notifications on the way are skipped).
    async fn answer(&mut self, id: u64) -> Value {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let mut line = String::new();
                assert!(self.read.read_line(&mut line).await.unwrap() > 0, "closed");
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["id"] == json!(id) {
                    return v;
                }
            }
        })
        .await
        .expect("an answer in time")
    }

    /// The next notification `method` (other messages on the way are skipped).
    async fn notification(&mut self, method: &str) -> Value {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let mut line = String::new();
                assert!(self.read.read_line(&mut line).await.unwrap() > 0, "closed");
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["method"] == method {
                    return v;
                }
            }
        })
        .await
        .expect("the notification in time")
    }

    /// Whether the other side closes the connection before the deadline.
    async fn closed(&mut self) -> bool {
        let mut buf = vec![0u8; 4096];
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.read.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(false)
    }
}

async fn connect(pool: &PoolHandle) -> Peer {
    Peer::new(TcpStream::connect(pool.addr).await.unwrap())
}

/// A connection subscribed and with worker `alice` authorized.
async fn authorized(pool: &PoolHandle) -> Peer {
    let mut peer = connect(pool).await;
    peer.send(json!({"id": 1, "method": "mining.subscribe", "params": ["test"]}))
        .await;
    peer.answer(1).await;
    peer.send(json!({"id": 2, "method": "mining.authorize", "params": ["alice", "x"]}))
        .await;
    assert_eq!(peer.answer(2).await["result"], true);
    peer
}

#[tokio::test]
async fn the_pool_refuses_an_endless_line_as_it_arrives() {
    let p = pool(PoolConfig::default()).await;
    let mut peer = connect(&p).await;
    // 4 MiB with no newline, in 64 KiB pieces: the pool must hang up, not buffer it all.
    let chunk = vec![b'a'; 64 << 10];
    let mut sent = 0;
    for _ in 0..64 {
        if peer.write.write_all(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    assert!(
        peer.closed().await,
        "the pool kept a connection after {sent} bytes without a newline"
    );
}

#[tokio::test]
async fn a_share_is_credited_only_to_a_worker_the_connection_authorized() {
    let p = pool(PoolConfig::default()).await;
    let mut peer = authorized(&p).await;
    peer.send(json!({"id": 3, "method": "mining.submit",
        "params": ["mallory", "1", "00000000", "66500000", "00000000"]}))
        .await;
    let a = peer.answer(3).await;
    assert!(
        a["error"]
            .to_string()
            .contains("not authorized on this connection"),
        "{a}"
    );
    assert_eq!(p.stats.accepted(), 0);
}

/// A share found under the old extranonce1 and sent after the pool changed it names a job
/// the change voided: it is refused as stale (21). Were the job re-sent under its old id, the
/// share would be rebuilt with the new extranonce1 and refused as "low difficulty" (23),
/// blaming the miner for the pool's change.
#[tokio::test]
async fn a_share_for_a_job_voided_by_a_new_extranonce1_is_stale() {
    let p = pool(PoolConfig::default()).await;
    let mut peer = authorized(&p).await;
    let old = peer.notification("mining.notify").await["params"].clone();
    p.command(PoolCommand::NewExtranonce);
    peer.notification("mining.set_extranonce").await;
    let fresh = peer.notification("mining.notify").await["params"].clone();
    assert_eq!(
        fresh[8], true,
        "the job after a new extranonce1 is clean: {fresh}"
    );
    assert_ne!(fresh[0], old[0], "re-sent under the old job id");
    peer.send(json!({"id": 3, "method": "mining.submit",
        "params": ["alice", old[0], "00000000", old[7], "00000000"]}))
        .await;
    let a = peer.answer(3).await;
    assert_eq!(a["error"][0], 21, "{a}");
    assert_eq!(
        p.stats
            .rejected_low_difficulty
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_live_sessions_extranonce1_cannot_be_taken_over() {
    let p = pool(PoolConfig::default()).await;
    let mut a = connect(&p).await;
    a.send(json!({"id": 1, "method": "mining.subscribe", "params": ["a"]}))
        .await;
    let ra = a.answer(1).await;
    let (sid, en1) = (ra["result"][0][0][1].clone(), ra["result"][1].clone());
    let mut b = connect(&p).await;
    b.send(json!({"id": 1, "method": "mining.subscribe", "params": ["b", sid]}))
        .await;
    let rb = b.answer(1).await;
    assert_ne!(
        rb["result"][1], en1,
        "the second connection got the first one's extranonce1"
    );
    assert_ne!(rb["result"][0][0][1], sid);
}

#[tokio::test]
async fn a_connection_that_never_subscribes_is_closed() {
    let p = pool(PoolConfig {
        subscribe_timeout: Duration::from_secs(1),
        ..PoolConfig::default()
    })
    .await;
    let mut peer = connect(&p).await;
    assert!(peer.closed().await);
}

#[tokio::test]
async fn connections_are_capped_per_address() {
    let p = pool(PoolConfig {
        max_connections_per_address: 2,
        ..PoolConfig::default()
    })
    .await;
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut peer = connect(&p).await;
        peer.send(json!({"id": 1, "method": "mining.subscribe", "params": ["x"]}))
            .await;
        peer.answer(1).await;
        kept.push(peer);
    }
    let mut third = connect(&p).await;
    assert!(
        third.closed().await,
        "a third connection from one address was kept"
    );
}

/// A fake pool: the client connects to it; the test plays the pool's side.
async fn client_against_fake_pool() -> (
    Peer,
    Arc<ClientStats>,
    Arc<CpuMiner>,
    tokio::sync::watch::Sender<bool>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = PoolUrl {
        host: "127.0.0.1".into(),
        port: listener.local_addr().unwrap().port(),
    };
    let (tx, rx) = idlerig::mining::share_channel(idlerig::mining::SHARE_CHANNEL_CAPACITY);
    let miner = Arc::new(CpuMiner::start(
        CpuMinerConfig {
            threads: 1,
            record_ranges: false,
            path: None,
        },
        PreemptFlag::default(),
        tx,
    ));
    miner.resume();
    let stats = Arc::new(ClientStats::default());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut cfg = ClientConfig::new(vec![url], "w", "secret");
    cfg.version_rolling = false;
    tokio::spawn(run_client(cfg, miner.clone(), rx, stats.clone(), stop_rx));
    let (stream, _) = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .unwrap()
        .unwrap();
    (Peer::new(stream), stats, miner, stop)
}

/// Plays subscribe and authorize; returns after both are answered.
async fn handshake(pool: &mut Peer) {
    for _ in 0..2 {
        let mut line = String::new();
        tokio::time::timeout(DEADLINE, pool.read.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        let result = match v["method"].as_str().unwrap() {
            "mining.subscribe" => json!([[["mining.notify", "s1"]], "01020304", 4]),
            _ => json!(true),
        };
        pool.send(json!({"id": v["id"], "result": result, "error": null}))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_hangs_up_on_an_endless_line() {
    let (mut pool, _stats, _miner, _stop) = client_against_fake_pool().await;
    handshake(&mut pool).await;
    let chunk = vec![b'{'; 64 << 10];
    for _ in 0..64 {
        if pool.write.write_all(&chunk).await.is_err() {
            break;
        }
    }
    assert!(
        pool.closed().await,
        "the client kept reading a line without end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_raises_a_tiny_difficulty_to_the_floor_and_ignores_reconnects_elsewhere() {
    let (mut pool, stats, _miner, _stop) = client_against_fake_pool().await;
    handshake(&mut pool).await;
    pool.send(json!({"id": null, "method": "mining.set_difficulty", "params": [1e-300]}))
        .await;
    // Moved elsewhere, the client would take its password to evil.example and drop this
    // connection; it must answer the next request here instead.
    pool.send(
        json!({"id": null, "method": "client.reconnect", "params": ["evil.example", 3333, 0]}),
    )
    .await;
    pool.send(json!({"id": 77, "method": "client.get_version", "params": []}))
        .await;
    let answer = pool.answer(77).await;
    assert!(
        answer["result"]
            .as_str()
            .is_some_and(|v| v.contains("idlerig")),
        "{answer}"
    );
    let t = Instant::now();
    while stats.difficulty() != idlerig::stratum::session::MIN_SHARE_DIFFICULTY {
        assert!(t.elapsed() < DEADLINE, "difficulty {}", stats.difficulty());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first job of the Stratum spec's example exchange.
const NOTIFY_PARAMS: &str = r#"["bf", "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000", "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008", "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000", [], "00000002", "1c2ac4af", "504e86b9", true]"#;

/// A pool that sets the lowest difficulty it can and then never answers a submission: the
/// client stops at its bound of submissions in flight and counts the rest as dropped, instead
/// of remembering every share it ever sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_never_answers_cannot_make_the_client_remember_every_share() {
    use idlerig::stratum::session::MAX_SUBMITS_IN_FLIGHT;
    let (mut pool, stats, _miner, _stop) = client_against_fake_pool().await;
    handshake(&mut pool).await;
    pool.send(json!({"id": null, "method": "mining.set_difficulty", "params": [1e-300]}))
        .await;
    let params: Value = serde_json::from_str(NOTIFY_PARAMS).unwrap();
    pool.send(json!({"id": null, "method": "mining.notify", "params": params}))
        .await;
    // Read every line the client sends and count its submissions; answer none.
    let submits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = submits.clone();
    let mut read = pool.read;
    let reader = tokio::spawn(async move {
        let mut line = String::new();
        while read.read_line(&mut line).await.is_ok_and(|n| n > 0) {
            if line.contains("mining.submit") {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            line.clear();
        }
    });
    // At the floor (1e-5) one miner thread finds a share every ~430,000 hashes: the bound is
    // reached in seconds on an idle machine, in minutes on a busy one.
    let t = Instant::now();
    while stats.dropped.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "no share was dropped; {} submitted",
            stats.submitted.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    while submits.load(std::sync::atomic::Ordering::SeqCst) < MAX_SUBMITS_IN_FLIGHT as u64 {
        assert!(t.elapsed() < DEADLINE, "the submissions did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stats.submitted.load(std::sync::atomic::Ordering::SeqCst),
        MAX_SUBMITS_IN_FLIGHT as u64,
        "exactly the bound is in flight"
    );
    reader.abort();
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// `idlerig mine` against a pool that sends an endless line and then nothing at all: its
/// memory stays small, and SIGTERM ends it within 10 s although the pool never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mine_stays_small_and_stops_on_sigterm_whatever_the_pool_does() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idlerig"))
        .args(["mine", "--threads", "1", "--pool"])
        .arg(format!("stratum+tcp://127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // First connection: 256 MiB without a newline (the client must hang up long before).
    let (first, _) = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (_r, mut w) = first.into_split();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..256 {
        if w.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let rss = rss_mib(pid);
    assert!(
        rss < 256,
        "idlerig mine grew to {rss} MiB on an endless line"
    );
    // Later connections are accepted and never answered: a silent pool.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t = Instant::now();
    let (status, _) = common::wait_for_exit(
        &mut child,
        Duration::from_secs(10),
        "idlerig mine should stop after SIGTERM",
    );
    silent.abort();
    assert!(status.success(), "{status}");
    eprintln!("RSS {rss} MiB; stopped {:?} after SIGTERM", t.elapsed());
}
