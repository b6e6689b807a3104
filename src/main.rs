//! The `idlerig` binary: parses the command line, starts the subsystems and supervises them.
//! The only place that uses `anyhow`.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;

use idlerig::api::{self, AppState, LoadState};
use idlerig::config::{BenchCommand, Cli, Command, LogFormat, ServeArgs};
use idlerig::engine::load_model;
use idlerig::model::device_from_name;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve(a) => a.log_format,
        Command::Bench(_) => LogFormat::Text,
    };
    init_logging(log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
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
