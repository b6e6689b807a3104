//! The `idlerig` binary: parses the command line, starts the subsystems and supervises them.
//! The only place that uses `anyhow`.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;

use idlerig::api::{self, AppState, LoadState};
use idlerig::config::{BenchCommand, Cli, Command, LogFormat, MineArgs, ServeArgs};
use idlerig::engine::load_model;
use idlerig::model::device_from_name;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve(a) => a.log_format,
        Command::Bench(_) | Command::Mine(_) => LogFormat::Text,
    };
    init_logging(log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Mine(args) => mine(args).await,
            Command::Bench(BenchCommand::Mine(args)) => {
                let line = idlerig::bench::mine::run(args).map_err(anyhow::Error::msg)?;
                println!("{line}");
                Ok(())
            }
            Command::Bench(BenchCommand::Infer(args)) => {
                let line = idlerig::bench::infer::run(args)
                    .await
                    .map_err(anyhow::Error::msg)?;
                println!("{line}");
                Ok(())
            }
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let path = args.model.model_path();
    if !path.exists() {
        anyhow::bail!(
            "model not found at {}; fetch the default models with `models/fetch`, or pass --model PATH",
            path.display()
        );
    }
    let device = device_from_name(&args.model.device)?;
    let listener = tokio::net::TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let model_id = idlerig::model::ModelFiles::open(&path)?.model_id();
    let (load_tx, load_rx) = watch::channel(LoadState::Loading);
    let state = AppState::new(model_id.clone(), load_rx, args.api_limits());

    // The server answers /health (503) while the weights load.
    let engine_cfg = args.model.engine_config();
    let loader = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match load_model(&path, &device, engine_cfg) {
            Ok(m) => {
                tracing::info!(model = %m.id, context = m.context_length, secs = started.elapsed().as_secs_f32(), "model loaded");
                let _ = load_tx.send(LoadState::Ready(Arc::new(m)));
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "model failed to load");
                let _ = load_tx.send(LoadState::Failed(e.to_string()));
                false
            }
        }
    });
    tracing::info!(%addr, model = %model_id, "idlerig listening; /health turns 200 once the model is loaded");
    let server = tokio::spawn(api::serve(listener, state, shutdown_signal()));
    if !loader.await.context("model loader")? {
        anyhow::bail!("the model failed to load; see the log above");
    }
    server
        .await
        .context("HTTP server task")?
        .context("HTTP server")?;
    tracing::info!("idlerig stopped");
    Ok(())
}

async fn mine(args: MineArgs) -> anyhow::Result<()> {
    use idlerig::mining::{CpuMiner, CpuMinerConfig, PreemptFlag};
    use idlerig::stratum::client::{run_client, ClientConfig, ClientStats};
    use idlerig::stratum::pool::{start_pool, PoolConfig};
    use idlerig::stratum::PoolUrl;
    use std::sync::atomic::Ordering::Relaxed;

    let mut local_pool = None;
    let pools = if args.pool.pools.is_empty() {
        let cfg = PoolConfig {
            bind: std::net::SocketAddr::from(([127, 0, 0, 1], args.pool.local_pool_port)),
            difficulty: args.pool.local_pool_difficulty,
            ..PoolConfig::default()
        };
        let pool = start_pool(cfg).await.with_context(|| {
            format!(
                "starting the embedded pool on port {}",
                args.pool.local_pool_port
            )
        })?;
        tracing::warn!(addr = %pool.addr, "no --pool given: mining on the embedded local pool, which PAYS NOTHING (a demo and test pool)");
        let url = PoolUrl {
            host: "127.0.0.1".into(),
            port: pool.addr.port(),
        };
        local_pool = Some(pool);
        vec![url]
    } else {
        args.pool
            .pools
            .iter()
            .map(|p| PoolUrl::parse(p))
            .collect::<Result<Vec<_>, _>>()?
    };
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let (share_tx, share_rx) = tokio::sync::mpsc::unbounded_channel();
    let miner = Arc::new(CpuMiner::start(
        CpuMinerConfig {
            threads,
            record_ranges: false,
        },
        PreemptFlag::default(),
        share_tx,
    ));
    miner.resume();
    let stats = Arc::new(ClientStats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let client = tokio::spawn(run_client(
        ClientConfig::new(pools, &args.pool.user, &args.pool.password),
        miner.clone(),
        share_rx,
        stats.clone(),
        stop_rx,
    ));
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.tick().await;
    let (mut last_hashes, mut last_t) = (miner.hashes(), std::time::Instant::now());
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                let (h, t) = (miner.hashes(), std::time::Instant::now());
                let rate = (h - last_hashes) as f64 / (t - last_t).as_secs_f64();
                (last_hashes, last_t) = (h, t);
                tracing::info!(
                    hashrate_mhs = format!("{:.2}", rate / 1e6),
                    connected = stats.connected.load(Relaxed),
                    difficulty = stats.difficulty(),
                    accepted = stats.accepted(),
                    rejected = stats.rejected.load(Relaxed),
                    stale = stats.stale.load(Relaxed),
                    "mining"
                );
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = client.await;
    drop(local_pool);
    tracing::info!(
        accepted = stats.accepted(),
        rejected = stats.rejected.load(Relaxed),
        "miner stopped"
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received; finishing open requests");
}
