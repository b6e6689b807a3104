//! Putting the subsystems together for `idlerig serve` and `idlerig mine`: the model and its
//! engine, the HTTP API, the mining stack (embedded pool or remote pools, Stratum client, CPU
//! miner) and the arbiter between them. A mining failure is logged and never takes inference
//! down.

use std::future::Future;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState, LoadState};
use crate::arbiter::{spawn_arbiter, ArbiterParts, DeviceGate, PolicyConfig};
use crate::config::{MineDevice, PoolArgs, ServeArgs};
use crate::engine::load_model;
use crate::mining::{CpuMiner, CpuMinerConfig, PreemptFlag};
use crate::model::device_from_name;
use crate::stratum::client::{run_client, ClientConfig, ClientStats};
use crate::stratum::pool::{start_pool, PoolConfig, PoolHandle};
use crate::stratum::{PoolUrl, StratumError};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("model not found at {0}; fetch the default models with `models/fetch`, or pass --model PATH")]
    ModelMissing(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Stratum(#[from] StratumError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// The miner, its pool connection and (without `--pool`) the embedded pool.
pub struct MiningStack {
    pub miner: Arc<CpuMiner>,
    pub client: Arc<ClientStats>,
    pub local_pool: Option<PoolHandle>,
    /// The pool in use, for logs and status (never the password).
    pub label: String,
}

/// Starts the embedded pool when `pool.pools` is empty, then the CPU miner (idle until the
/// arbiter or the caller resumes it) and the Stratum client.
pub async fn start_mining(
    pool: &PoolArgs,
    threads: usize,
    shutdown: watch::Receiver<bool>,
) -> Result<MiningStack, ServerError> {
    let mut local_pool = None;
    let pools = if pool.pools.is_empty() {
        let cfg = PoolConfig {
            bind: std::net::SocketAddr::from(([127, 0, 0, 1], pool.local_pool_port)),
            difficulty: pool.local_pool_difficulty,
            ..PoolConfig::default()
        };
        let handle = start_pool(cfg).await?;
        tracing::warn!(addr = %handle.addr, "no --pool given: mining on the embedded local pool, which PAYS NOTHING (a demo and test pool)");
        let url = PoolUrl {
            host: "127.0.0.1".into(),
            port: handle.addr.port(),
        };
        local_pool = Some(handle);
        vec![url]
    } else {
        pool.pools
            .iter()
            .map(|p| PoolUrl::parse(p))
            .collect::<Result<Vec<_>, _>>()?
    };
    let label = pools
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let (share_tx, share_rx) = tokio::sync::mpsc::unbounded_channel();
    let flag = PreemptFlag::default();
    flag.raise(); // idle until resumed
    let miner = Arc::new(CpuMiner::start(
        CpuMinerConfig {
            threads,
            record_ranges: false,
        },
        flag,
        share_tx,
    ));
    let client = Arc::new(ClientStats::default());
    tokio::spawn(run_client(
        ClientConfig::new(pools, &pool.user, &pool.password),
        miner.clone(),
        share_rx,
        client.clone(),
        shutdown,
    ));
    Ok(MiningStack {
        miner,
        client,
        local_pool,
        label,
    })
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A started server: its address, and levers for benchmarks and tests.
pub struct RunningServer {
    pub addr: std::net::SocketAddr,
    /// Turns mining on or off at run time (`None` when mining is disabled).
    pub mining_switch: Option<watch::Sender<bool>>,
    /// The miner, for hash counts (`None` when mining is disabled).
    pub miner: Option<Arc<CpuMiner>>,
    /// Ends with the HTTP server.
    pub task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

/// Runs `idlerig serve` on `listener` until `shutdown` completes.
pub async fn serve(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let running = start(args, listener, shutdown).await?;
    running
        .task
        .await
        .unwrap_or_else(|e| Err(ServerError::Http(std::io::Error::other(e))))
}

/// Starts everything `idlerig serve` runs and returns at once; the model loads in the
/// background (`/health` says when it is ready).
pub async fn start(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunningServer, ServerError> {
    let path = args.model.model_path();
    if !path.exists() {
        return Err(ServerError::ModelMissing(path.display().to_string()));
    }
    let device = device_from_name(&args.model.device)?;
    let model_id = crate::model::ModelFiles::open(&path)?.model_id();
    let (load_tx, load_rx) = watch::channel(LoadState::Loading);
    let (engine_tx, engine_rx) = watch::channel(None);
    let mut state = AppState::new(model_id.clone(), load_rx, args.api_limits());
    let (stop_tx, stop_rx) = watch::channel(false);

    // Mining, when enabled: its failure to start is logged, and serving goes on without it.
    let (mut mining, mut mining_switch) = (None, None);
    if let Some(threads) = mining_threads(&args) {
        match start_mining(&args.pool, threads, stop_rx.clone()).await {
            Ok(stack) => {
                let gate = Arc::new(DeviceGate::new(stack.miner.preempt_flag().clone()));
                let policy = PolicyConfig {
                    mining_enabled: true,
                    idle_grace_us: args.idle_grace_ms * 1000,
                    max_duty: args.max_mining_duty.clamp(0.0, 1.0),
                    ..PolicyConfig::default()
                };
                let (switch, enabled) = watch::channel(true);
                let parts = ArbiterParts {
                    gate: gate.clone(),
                    engine: engine_rx,
                    miner: stack.miner.clone(),
                    pool: stack.client.clone(),
                    pool_label: stack.label.clone(),
                    local_pool: stack.local_pool.is_some(),
                    enabled,
                };
                let status = spawn_arbiter(parts, policy, stop_rx.clone());
                state = state.with_arbiter(gate, status);
                tracing::info!(threads, pool = %stack.label, grace_ms = args.idle_grace_ms, "mining in the gaps between requests");
                mining_switch = Some(switch);
                mining = Some(stack);
            }
            Err(e) => tracing::error!(error = %e, "mining could not start; serving without it"),
        }
    }

    let engine_cfg = args.model.engine_config();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match load_model(&path, &device, engine_cfg) {
            Ok(m) => {
                tracing::info!(model = %m.id, context = m.context_length, secs = started.elapsed().as_secs_f32(), "model loaded");
                let _ = engine_tx.send(Some(m.stats.clone()));
                let _ = load_tx.send(LoadState::Ready(Arc::new(m)));
            }
            Err(e) => {
                tracing::error!(error = %e, "model failed to load");
                let _ = load_tx.send(LoadState::Failed(e.to_string()));
            }
        }
    });
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %model_id, "idlerig listening; /health turns 200 once the model is loaded");
    let miner = mining.as_ref().map(|m: &MiningStack| m.miner.clone());
    let task = tokio::spawn(async move {
        let result = api::serve(listener, state, shutdown).await;
        let _ = stop_tx.send(true);
        drop(mining); // stops the embedded pool and, with the last handle, the miner
        Ok(result?)
    });
    Ok(RunningServer {
        addr,
        mining_switch,
        miner,
        task,
    })
}

/// CPU threads to mine with, or `None` when mining is off.
fn mining_threads(args: &ServeArgs) -> Option<usize> {
    if args.no_mine {
        return None;
    }
    match args.mine_device {
        MineDevice::Off => None,
        // One core is left free by default: with every core mining, SCHED_IDLE still keeps the
        // miner off the CPU while inference runs, but a pre-empted worker cannot acknowledge
        // until a core frees up (measured on 2 cores: 54 ms p50 with 2 threads, 17 µs with 1).
        MineDevice::Cpu | MineDevice::Auto => Some(
            args.mine_threads
                .unwrap_or_else(|| default_threads().saturating_sub(1))
                .max(1),
        ),
        MineDevice::Cuda => {
            tracing::error!(
                "--mine-device cuda needs a build with the `cuda` feature and a GPU; not mining"
            );
            None
        }
    }
}
