//! The `idlerig` binary: parses the command line, starts the subsystems and supervises them.
//! The only place that uses `anyhow`.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use tokio::sync::watch;

use idlerig::config::{BenchCommand, Cli, Command, LogFormat, MineArgs, ServeArgs};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line for the operator, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // A --config file becomes IDLERIG_* variables (those not already set) before parsing, so
    // flags win over the environment, and the environment over the file.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = idlerig::config::apply_config_file(&argv, &Cli::command()) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    // Built after the file is applied: clap reads each flag's variable when it builds.
    let command = Cli::command();
    let matches = command.clone().get_matches_from(&argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let log_format = match &cli.command {
        Command::Serve(a) => a.log_format,
        Command::Models => {
            print!(
                "{}",
                idlerig::model_store::listing(&idlerig::model_store::Stores::from_env())
            );
            return Ok(());
        }
        Command::Config(args) => {
            let (_, sub) = matches.subcommand().expect("a subcommand was parsed");
            let config = command
                .find_subcommand("config")
                .expect("the CLI has a config command");
            if !args.print {
                eprintln!("`idlerig config` needs --print (see `idlerig config --help`)");
                std::process::exit(2);
            }
            print!("{}", idlerig::config::effective_config_toml(config, sub));
            return Ok(());
        }
        Command::Bench(_) | Command::Mine(_) => LogFormat::Text,
    };
    init_logging(log_format);
    // candle asks for its thread count on every f32 matmul, and without this variable that
    // means parsing /proc/cpuinfo each time (milliseconds per token on a small model).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: no other thread exists yet (the runtime is started below).
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Config(_) | Command::Models => Ok(()),
            Command::Mine(args) => mine(args).await,
            Command::Bench(bench) => {
                // Every benchmark prints one JSON line of figures.
                let line = match bench {
                    BenchCommand::Infer(args) => idlerig::bench::infer::run(args).await,
                    BenchCommand::Mine(args) => idlerig::bench::mine::run(args),
                    BenchCommand::Preempt(args) => idlerig::bench::preempt::run(args).await,
                    BenchCommand::Flex(args) => idlerig::bench::flex::run(args).await,
                    BenchCommand::Saturate(args) => idlerig::bench::saturate::run(args).await,
                    BenchCommand::GpuCheck(args) => idlerig::bench::gpu_check::run(args).await,
                    BenchCommand::Grammar(args) => idlerig::bench::grammar::run(args).await,
                }
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
    let listener = tokio::net::TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    idlerig::server::serve(args, listener, shutdown_signal()).await?;
    tracing::info!("idlerig stopped");
    Ok(())
}

async fn mine(args: MineArgs) -> anyhow::Result<()> {
    use idlerig::config::MineDevice;
    use idlerig::server::MinerSpec;
    use std::sync::atomic::Ordering::Relaxed;
    let spec = match args.device {
        MineDevice::Cpu | MineDevice::Auto => MinerSpec::Cpu {
            threads: args
                .threads
                .unwrap_or_else(idlerig::server::default_threads),
            path: args.cpu_sha_path,
        },
        MineDevice::Cuda => MinerSpec::Cuda { ordinal: args.gpu },
        MineDevice::CpuGrid => MinerSpec::cpu_grid(),
        MineDevice::Off => anyhow::bail!("`idlerig mine --device off` has nothing to do"),
    };
    // Installed before anything starts, so that SIGTERM during start-up stops cleanly.
    let shutdown = shutdown_signal();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stack = idlerig::server::start_mining(&args.pool, &spec, stop_rx).await?;
    stack.miner.resume();
    let (miner, stats) = (stack.miner.clone(), stack.client.clone());
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.tick().await;
    let (mut last_hashes, mut last_t) = (miner.hashes(), std::time::Instant::now());
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
    // Stops the workers, submits what they found, and closes the pool session.
    idlerig::server::stop_mining(stack, stop_tx).await;
    tracing::info!(
        accepted = stats.accepted(),
        rejected = stats.rejected.load(Relaxed),
        "miner stopped"
    );
    Ok(())
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled: a signal that arrives while the miner or the model is still
/// starting is then a clean shutdown, not the default action (the process killed at once).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (int, term) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! { _ = wait(int) => {}, _ = wait(term) => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received; finishing open requests");
    }
}
