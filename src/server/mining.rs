//! The mining stack `serve` and `mine` start: which device mines (`--mine-device`), the
//! miner on it, the embedded pool or the remote pools, the Stratum client, and the orderly
//! stop that submits every share found before the session closes.

use std::sync::Arc;

use tokio::sync::watch;

use super::ServerError;
use crate::config::{MineDevice, PoolArgs, ServeArgs};
use crate::mining::gpu::{CpuGridLauncher, Geometry, GpuMiner, GpuMinerConfig, ScanLauncher};
use crate::mining::{CpuMiner, CpuMinerConfig, Miner, PreemptFlag};
use crate::stratum::client::{run_client, ClientConfig, ClientStats};
use crate::stratum::pool::{start_pool, PoolConfig, PoolHandle};
use crate::stratum::PoolUrl;

/// The device the miner runs on, chosen from `--mine-device` and `--device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MinerSpec {
    /// CPU threads, on `path` (`None`: the fastest, measured at start-up).
    Cpu {
        threads: usize,
        path: Option<crate::mining::ScanPath>,
    },
    /// The CUDA scan kernel on GPU `ordinal` (the GPU that serves).
    Cuda { ordinal: usize },
    /// The CUDA kernel's source on CPU threads: the GPU miner's code path without a GPU.
    CpuGrid { geometry: Geometry },
}

impl MinerSpec {
    /// The stand-in's grid: 2 blocks of 16 threads, enough for barriers and atomics to race.
    pub fn cpu_grid() -> Self {
        MinerSpec::CpuGrid {
            geometry: Geometry {
                blocks: 2,
                threads_per_block: 16,
            },
        }
    }

    /// Watts assumed for the earnings estimate when `--mining-watts` is not given: 10 W a CPU
    /// thread; for a GPU its board power limit (NVML), else 350 W.
    pub fn default_watts(&self) -> f64 {
        match self {
            MinerSpec::Cpu { threads, .. } => 10.0 * *threads as f64,
            MinerSpec::Cuda { ordinal } => {
                let (watts, source) = crate::mining::gpu::power::mining_watts(*ordinal);
                tracing::info!(watts, source, "GPU mining power for the earnings estimate");
                watts
            }
            MinerSpec::CpuGrid { geometry } => {
                10.0 * (geometry.threads() as usize).min(default_threads()) as f64
            }
        }
    }

    /// Starts the miner, idle until resumed.
    pub fn start(
        &self,
        flag: PreemptFlag,
        shares: crate::mining::ShareSender,
    ) -> Result<Arc<dyn Miner>, ServerError> {
        let gpu = |launcher: Box<dyn ScanLauncher>| -> Arc<dyn Miner> {
            Arc::new(GpuMiner::start(
                launcher,
                GpuMinerConfig::default(),
                flag.clone(),
                shares.clone(),
            ))
        };
        Ok(match self {
            MinerSpec::Cpu { threads, path } => Arc::new(CpuMiner::start(
                CpuMinerConfig {
                    threads: *threads,
                    record_ranges: false,
                    path: *path,
                },
                flag,
                shares,
            )),
            MinerSpec::CpuGrid { geometry } => gpu(Box::new(
                CpuGridLauncher::new(*geometry, 4096)
                    .map_err(|e| ServerError::MiningDevice(e.to_string()))?,
            )),
            #[cfg(feature = "cuda")]
            MinerSpec::Cuda { ordinal } => gpu(Box::new(
                crate::mining::gpu::cuda::CudaLauncher::new(*ordinal, Default::default())
                    .map_err(|e| ServerError::MiningDevice(format!("GPU {ordinal}: {e}")))?,
            )),
            #[cfg(not(feature = "cuda"))]
            MinerSpec::Cuda { .. } => {
                let _ = gpu;
                return Err(ServerError::MiningDevice(
                    "--mine-device cuda needs a build with CUDA support (cargo build --release --features cuda) and an NVIDIA GPU".into(),
                ));
            }
        })
    }
}

/// The miner, its pool connection and (without `--pool`) the embedded pool.
pub struct MiningStack {
    pub miner: Arc<dyn Miner>,
    pub client: Arc<ClientStats>,
    pub local_pool: Option<PoolHandle>,
    /// The pool in use, for logs and status (never the password).
    pub label: String,
    /// The Stratum client; it ends after the pool stop signal, once the last shares are in.
    pub client_task: tokio::task::JoinHandle<()>,
}

/// Starts the miner (idle until the arbiter or the caller resumes it), then the embedded pool
/// when `pool.pools` is empty, and the Stratum client.
pub async fn start_mining(
    pool: &PoolArgs,
    spec: &MinerSpec,
    shutdown: watch::Receiver<bool>,
) -> Result<MiningStack, ServerError> {
    let (share_tx, share_rx) = crate::mining::share_channel(crate::mining::SHARE_CHANNEL_CAPACITY);
    let flag = PreemptFlag::default();
    flag.raise(); // idle until resumed
    let miner = spec.start(flag, share_tx)?;
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
    let client = Arc::new(ClientStats::default());
    let client_task = tokio::spawn(run_client(
        ClientConfig {
            allow_reconnect_elsewhere: pool.allow_reconnect_elsewhere,
            ..ClientConfig::new(pools, &pool.user, &pool.password)
        },
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
        client_task,
    })
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Pre-empts the miner, waits for its workers to stop (so every share they found is in the
/// channel), then lets the Stratum client submit those shares and close the session.
pub async fn stop_mining(stack: MiningStack, pool_stop: watch::Sender<bool>) {
    stack.miner.preempt_flag().raise();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while stack.miner.active_workers() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let _ = pool_stop.send(true);
    if tokio::time::timeout(std::time::Duration::from_secs(10), stack.client_task)
        .await
        .is_err()
    {
        tracing::warn!("the pool session did not close within 10 s");
    }
    tracing::info!(
        accepted = stack.client.accepted(),
        "miner stopped and pool session closed"
    );
}

/// The CPU miner `serve` runs. One core is left free by default: with every core mining,
/// SCHED_IDLE still keeps the miner off the CPU while inference runs, but a pre-empted worker
/// cannot acknowledge until a core frees up (measured on 2 cores: 54 ms p50 with 2 threads,
/// 17 µs with 1).
pub(super) fn cpu_miner_spec(args: &ServeArgs) -> MinerSpec {
    MinerSpec::Cpu {
        threads: args
            .mine_threads
            .unwrap_or_else(|| default_threads().saturating_sub(1))
            .max(1),
        path: args.cpu_sha_path,
    }
}

/// The miner to start, or `None` when mining is off. `auto` mines on the GPU that serves, else
/// on the CPU.
pub fn miner_spec(args: &ServeArgs) -> Result<Option<MinerSpec>, ServerError> {
    if args.no_mine {
        return Ok(None);
    }
    let cpu = || cpu_miner_spec(args);
    let serving_gpu = crate::model::cuda_ordinal(&args.model.device)
        .map_err(|e| ServerError::Config(e.to_string()))?;
    Ok(match args.mine_device {
        MineDevice::Off => None,
        MineDevice::Cpu => Some(cpu()),
        MineDevice::Auto => Some(match serving_gpu {
            Some(ordinal) => MinerSpec::Cuda { ordinal },
            None => cpu(),
        }),
        MineDevice::Cuda => Some(MinerSpec::Cuda {
            ordinal: serving_gpu.unwrap_or(0),
        }),
        MineDevice::CpuGrid => Some(MinerSpec::cpu_grid()),
    })
}
