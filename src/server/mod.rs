//! Putting the subsystems together for `idlerig serve` and `idlerig mine`: the model and its
//! engine, the HTTP API, the mining stack (embedded pool or remote pools, Stratum client, CPU
//! miner) and the arbiter between them. A mining failure is logged and never takes inference
//! down.

use std::future::Future;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, ApiKeys, AppState, LoadState};
use crate::arbiter::{spawn_arbiter, ArbiterParts, DeviceGate, PolicyConfig};
use crate::config::{MineDevice, ServeArgs};
use crate::engine::load_model_reporting;
use crate::mining::Miner;
use crate::model::device_from_name;
use crate::stratum::StratumError;
use crate::telemetry::{spawn_telemetry, LiveSources, Metrics, TelemetryParts, TelemetrySnapshot};

mod mining;

use mining::cpu_miner_spec;
pub use mining::{default_threads, miner_spec, start_mining, stop_mining, MinerSpec, MiningStack};

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
    #[error("configuration: {0}")]
    Config(String),
    #[error("mining device: {0}")]
    MiningDevice(String),
    #[error("the model failed to load: {0}")]
    ModelLoad(String),
    #[error(transparent)]
    Embedding(#[from] crate::embed::EmbedError),
    #[error(transparent)]
    Usage(#[from] crate::usage::UsageError),
    #[error(transparent)]
    Batch(#[from] crate::batch::BatchError),
}

/// A started server: its address, and levers for benchmarks and tests.
pub struct RunningServer {
    pub addr: std::net::SocketAddr,
    /// Turns mining on or off at run time (`None` when mining is disabled).
    pub mining_switch: Option<watch::Sender<bool>>,
    /// The miner, for hash counts (`None` when mining is disabled).
    pub miner: Option<Arc<dyn Miner>>,
    /// Ends after the HTTP server has drained and the miner and pool session have stopped.
    pub task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

/// Runs `idlerig serve` on `listener` until `shutdown` completes, then shuts down cleanly.
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
/// background (`/health` says when it is ready, and how far it has got).
///
/// When `shutdown` completes: new requests get 503, those in flight get the grace period,
/// then the arbiter stops, the miner is pre-empted, the shares it found are submitted and
/// answered, and the pool session closes.
pub async fn start(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunningServer, ServerError> {
    // The int8 kernels' instruction set is one per process: fixed here, before any load.
    crate::model::quant::Isa::choose(args.model.cpu_isa);
    // Every chat model's file is found and its header read before anything starts.
    let mut chat = Vec::new();
    for (name, path) in args.model.models().map_err(ServerError::Config)? {
        if !path.exists() {
            return Err(ServerError::ModelMissing(path.display().to_string()));
        }
        let files = crate::model::ModelFiles::open(&path)?;
        let id = name.unwrap_or_else(|| files.model_id());
        if chat.iter().any(|c: &ChatModel| c.id == id) {
            return Err(ServerError::Config(format!(
                "two chat models are named `{id}`; name them with --model NAME=PATH"
            )));
        }
        if id.is_empty() || id == "default" {
            return Err(ServerError::Config(format!(
                "a chat model may not be named `{id}` (requests use it for the first model)"
            )));
        }
        let (load_tx, load_rx) = watch::channel(LoadState::Loading(0.0));
        let (engine_tx, engine_rx) = watch::channel(None);
        chat.push(ChatModel {
            id,
            path,
            context_length: files.config().context_length,
            load: (load_tx, load_rx),
            engine: (engine_tx, engine_rx),
        });
    }
    let device = device_from_name(&args.model.device)?;
    let (model_id, context_length) = (chat[0].id.clone(), chat[0].context_length);
    let keys = ApiKeys::parse(args.access.keys().map_err(ServerError::Config)?)
        .map_err(ServerError::Config)?;
    let keys_empty = keys.is_empty();
    if !keys_empty {
        // The names, never the keys: an unnamed key's derived name is how its owner finds it.
        let names: Vec<&str> = keys.identities().map(|k| k.name.as_str()).collect();
        tracing::info!(names = %names.join(", "), "API keys");
    }
    warn_if_exposed(&args, &keys);
    let engine_rx = chat[0].engine.1.clone();
    let engines: Vec<_> = chat.iter().map(|c| c.engine.1.clone()).collect();
    let mut state = AppState::new(model_id.clone(), chat[0].load.1.clone(), args.api_limits())
        .with_keys(keys, args.access.metrics_require_key);
    for c in &chat[1..] {
        state = state.with_chat_model(c.id.clone(), c.load.1.clone());
    }
    let mut load_watches: Vec<_> = chat.iter().map(|c| c.load.1.clone()).collect();
    if let Some(dir) = args.embedding_model_path().map_err(ServerError::Config)? {
        // Small (MiniLM: 91 MB, mapped): loaded before serving, on the CPU.
        let id = dir
            .file_name()
            .map_or_else(|| "embedding".into(), |n| n.to_string_lossy().into_owned());
        if chat.iter().any(|c| c.id == id) || id == "default" {
            return Err(ServerError::Config(format!(
                "the embedding model's name `{id}` is taken; rename a chat model with --model NAME=PATH"
            )));
        }
        let loaded = tokio::task::spawn_blocking(move || {
            crate::embed::Embedder::load(&dir, id, &candle_core::Device::Cpu)
        })
        .await
        .map_err(|e| ServerError::Config(format!("embedding model: {e}")))?;
        match loaded {
            Ok(embedder) => {
                tracing::info!(model = %embedder.id, dimensions = embedder.dimensions, "serving embeddings on /v1/embeddings");
                state = state.with_embedder(embedder);
            }
            // The operator asked for it: not serving it is an error.
            Err(e) if args.embedding_model.is_some() => return Err(e.into()),
            // The default one, found but broken (a partial download): chat goes on.
            Err(e) => {
                tracing::warn!(error = %e, "the default embedding model did not load; serving without /v1/embeddings (models/fetch repairs it)")
            }
        }
    }
    // The arbiter stops first at shutdown, the pool session last (after the last shares).
    let (arbiter_stop_tx, arbiter_stop) = watch::channel(false);
    let (pool_stop_tx, pool_stop) = watch::channel(false);
    let (snapshot_tx, snapshot_rx) = watch::channel(TelemetrySnapshot::default());

    // Mining, when enabled: its failure to start is logged, and serving goes on without it.
    let (mut mining, mut mining_switch, mut arbiter_status) = (None, None, None);
    let mut profit = None;
    let preempt_latency = crate::telemetry::prometheus::preempt_latency_histogram();
    if let Some(mut spec) = miner_spec(&args)? {
        let mut started = start_mining(&args.pool, &spec, pool_stop.clone()).await;
        if let (Err(ServerError::MiningDevice(why)), MineDevice::Auto) =
            (&started, args.mine_device)
        {
            // `auto` chose the GPU; the operator did not ask for it, so serving goes on and the
            // CPU mines instead.
            tracing::warn!(reason = %why, "the GPU miner could not start; mining on the CPU instead (--mine-device auto)");
            spec = cpu_miner_spec(&args);
            started = start_mining(&args.pool, &spec, pool_stop.clone()).await;
        }
        match started {
            Ok(stack) => {
                let gate = Arc::new(DeviceGate::new(stack.miner.preempt_flag().clone()));
                let policy = PolicyConfig {
                    mining_enabled: true,
                    idle_grace_us: args.idle_grace_ms * 1000,
                    max_duty: args.max_mining_duty.clamp(0.0, 1.0),
                    ..PolicyConfig::default()
                };
                let (switch, enabled) = watch::channel(true);
                let (profit_tx, profitable) = watch::channel(true);
                let local = stack.local_pool.is_some();
                let when = args.earnings.mine_when(local);
                profit = Some((
                    args.earnings.inputs(spec.default_watts(), !local),
                    when,
                    profit_tx,
                ));
                let parts = ArbiterParts {
                    gate: gate.clone(),
                    engines: engines.clone(),
                    miner: stack.miner.clone(),
                    pool: stack.client.clone(),
                    pool_label: stack.label.clone(),
                    local_pool: local,
                    enabled,
                    profitable,
                    preempt_latency: Some(preempt_latency.clone()),
                };
                let status = spawn_arbiter(parts, policy, arbiter_stop.clone());
                arbiter_status = Some(status.clone());
                state = state.with_arbiter(gate, status);
                tracing::info!(miner = ?spec, pool = %stack.label, grace_ms = args.idle_grace_ms, mine_when = ?when, "mining in the gaps between requests");
                mining_switch = Some(switch);
                mining = Some(stack);
            }
            // The operator named the device: not mining there is an error, not a fallback.
            Err(e @ ServerError::MiningDevice(_)) => return Err(e),
            Err(e) => tracing::error!(error = %e, "mining could not start; serving without it"),
        }
    }

    let metrics = Arc::new(Metrics::new(
        &model_id,
        context_length,
        LiveSources {
            engine: engine_rx.clone(),
            arbiter: arbiter_status.clone(),
            snapshot: snapshot_rx.clone(),
            kv_capacity_tokens: args.model.max_running.max(1) * context_length,
        },
        preempt_latency,
        crate::arbiter::PreemptFigure::of_backend(
            mining.as_ref().map_or("cpu", |m| m.miner.backend()),
        ),
        args.access.publishes_per_key_metrics(),
    ));
    let telemetry = spawn_telemetry(
        TelemetryParts {
            requests: metrics.requests.clone(),
            engine: engine_rx,
            arbiter: arbiter_status,
            mining: profit,
            history_interval: std::time::Duration::from_millis(args.history_interval_ms.max(10)),
            deferred_price_usd_per_mtok: args.earnings.deferred_price,
        },
        snapshot_tx,
        arbiter_stop.clone(),
    );
    // Usage per key, when there are keys: counted, kept, and held to the keys' quotas.
    let usage_path = match (keys_empty, args.usage_db.as_deref()) {
        (true, _) | (_, Some("none")) => None,
        (false, Some(p)) => Some(std::path::PathBuf::from(p)),
        (false, None) => Some(crate::usage::default_path()),
    };
    let mut usage_at_exit = None;
    if !keys_empty {
        let usage = crate::usage::Usage::open(usage_path.as_deref(), metrics.keys.clone())?;
        tracing::info!(db = ?usage_path, "counting usage per API key");
        usage_at_exit = Some(usage.clone());
        state = state.with_usage(usage);
    }
    let batches = open_batches(&args, usage_path.as_deref())?;
    if let Some(b) = &batches {
        state = state.with_batches(b.clone());
    }
    let batches_at_exit = batches.clone();
    state = state.with_telemetry(telemetry.clone(), metrics, snapshot_rx);

    // One after another (each load uses every core), the default model first. The first
    // reports to the telemetry (its figures are the server's); each has its own engine.
    let mut engine_cfg = args.model.engine_config();
    engine_cfg.telemetry = Some(telemetry);
    // One KV budget for the device, shared equally by the chat models.
    engine_cfg.model.kv_cache_mb /= chat.len();
    if args.model.kv_cache_mb > 0 && engine_cfg.model.kv_cache_mb == 0 {
        engine_cfg.model.kv_cache_mb = 1;
    }
    let names: Vec<String> = chat.iter().map(|c| c.id.clone()).collect();
    let loads: Vec<_> = chat
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut cfg = engine_cfg.clone();
            if i > 0 {
                cfg.telemetry = None;
            }
            (c, cfg)
        })
        .collect();
    let load_device = device.clone();
    tokio::task::spawn_blocking(move || {
        let mut failed = None;
        for (c, cfg) in loads {
            // After a failure the server stops: the rest are not loaded, and say why.
            if let Some(why) = &failed {
                let _ = c.load.0.send(LoadState::Failed(format!(
                    "not loaded: model `{why}` failed to load first"
                )));
                continue;
            }
            let (id, load_tx) = (c.id.clone(), c.load.0.clone());
            load_in_background(c.id, c.path, load_device.clone(), cfg, c.load.0, c.engine.0);
            if matches!(*load_tx.borrow(), LoadState::Failed(_)) {
                failed = Some(id);
            }
        }
    });
    let addr = listener.local_addr()?;
    tracing::info!(%addr, models = ?names, "idlerig listening; /health turns 200 once the models are loaded");
    let miner = mining.as_ref().map(|m: &MiningStack| m.miner.clone());
    // Batch lines run through the same routes as requests, as deferred work; the runner
    // stops first at shutdown (its lines in flight run again at the next start).
    let (batch_stop_tx, batch_stop) = watch::channel(false);
    if let Some(b) = &batches {
        b.start_runner(api::batch_executor(state.clone()), batch_stop);
        // Background responses the last run left unfinished run again, as batch lines do.
        api::resume_background(state.clone());
    }
    let lifecycle = state.lifecycle();
    let grace = std::time::Duration::from_secs_f64(args.shutdown_grace_s.clamp(0.0, 86_400.0));
    // A model that fails to load (or panics loading) ends the server with an error: a
    // server that can never answer is not left running, saying "loading" or "failed".
    let load_failed = async move {
        let watches = load_watches.iter_mut().map(|w| {
            Box::pin(async move {
                loop {
                    if let LoadState::Failed(e) = &*w.borrow_and_update() {
                        return e.clone();
                    }
                    if w.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            })
        });
        futures::future::select_all(watches).await.0
    };
    let failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let failure_seen = failure.clone();
    let drained = async move {
        tokio::select! {
            _ = shutdown => {}
            e = load_failed => {
                tracing::error!(error = %e, "the model failed to load; stopping");
                *failure_seen.lock().expect("failure lock") = Some(e);
            }
        }
        let _ = batch_stop_tx.send(true);
        tracing::info!(
            in_flight = lifecycle.in_flight(),
            grace_s = grace.as_secs_f64(),
            "shutting down: refusing new requests, finishing those in flight"
        );
        let cancelled = lifecycle.drain(grace).await;
        if cancelled > 0 {
            tracing::warn!(
                cancelled,
                "grace period over: cancelled the requests still in flight"
            );
        }
    };
    let task = tokio::spawn(async move {
        let result = api::serve(listener, state, drained).await;
        let _ = arbiter_stop_tx.send(true);
        if let Some(stack) = mining.take() {
            stop_mining(stack, pool_stop_tx).await;
        }
        // Every request has ended: their usage is stored, and the databases closed (the
        // batches' may be the same file), before the server says it stopped.
        if let Some(usage) = usage_at_exit {
            usage.close().await;
        }
        if let Some(b) = batches_at_exit {
            let _ = b
                .call(|store| {
                    store.close();
                    Ok(())
                })
                .await;
        }
        result?;
        match failure.lock().expect("failure lock").take() {
            Some(e) => Err(ServerError::ModelLoad(e)),
            None => Ok(()),
        }
    });
    Ok(RunningServer {
        addr,
        mining_switch,
        miner,
        task,
    })
}

/// The Files and Batches store, unless `--data-dir none`.
fn open_batches(
    args: &ServeArgs,
    usage_db: Option<&std::path::Path>,
) -> Result<Option<crate::batch::Batches>, ServerError> {
    let Some(dir) = args.batch.dir() else {
        return Ok(None);
    };
    let cfg = crate::batch::BatchConfig {
        db_path: args.batch.db_path(&dir, usage_db),
        dir,
        max_file_bytes: args.batch.batch_max_file_mb.saturating_mul(1 << 20),
        max_requests: args.batch.batch_max_requests.max(1),
        max_line_bytes: args.max_body_bytes,
        concurrency: args
            .batch
            .batch_concurrency
            .unwrap_or(args.model.max_running)
            .max(1),
        window_s: 24 * 3600,
        max_active_per_key: args.batch.batch_max_active_per_key.max(1),
        max_active: args.batch.batch_max_active.max(1),
        max_result_bytes: crate::batch::MAX_RESULT_BYTES,
        responses_retention_s: (args.batch.responses_retention_days * 86_400.0) as u64,
    };
    tracing::info!(dir = %cfg.dir.display(), db = %cfg.db_path.display(), "Files and Batches API on /v1/files and /v1/batches; stored responses on /v1/responses");
    Ok(Some(crate::batch::Batches::open(cfg)?))
}

/// A chat model the server was asked to serve: its name, file, and the channels its loading
/// reports on (the API's load state, the arbiter's and telemetry's engine counters).
struct ChatModel {
    id: String,
    path: std::path::PathBuf,
    context_length: usize,
    load: (watch::Sender<LoadState>, watch::Receiver<LoadState>),
    engine: (
        watch::Sender<Option<Arc<crate::engine::EngineStats>>>,
        watch::Receiver<Option<Arc<crate::engine::EngineStats>>>,
    ),
}

/// Loads a model as `id`, reporting progress on the terminal (every quarter) and to
/// `/health`.
fn load_in_background(
    id: String,
    path: std::path::PathBuf,
    device: candle_core::Device,
    cfg: crate::engine::EngineConfig,
    load_tx: watch::Sender<LoadState>,
    engine_tx: watch::Sender<Option<Arc<crate::engine::EngineStats>>>,
) {
    let started = std::time::Instant::now();
    let mut logged_quarter = 0;
    let mut progress = |f: f32| {
        load_tx.send_replace(LoadState::Loading(f));
        let quarter = (f * 4.0).floor() as i32;
        if quarter > logged_quarter {
            logged_quarter = quarter;
            tracing::info!(model = %id, percent = quarter * 25, "loading the model");
        }
    };
    // A panic while loading would otherwise leave `/health` at "loading" for ever.
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        load_model_reporting(&path, &device, cfg, &mut progress)
    }))
    .unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        Err(crate::model::ModelError::Metadata(format!("loading panicked: {why}")).into())
    });
    match loaded {
        Ok(mut m) => {
            // Requests name it as the operator did (`--model NAME=PATH`).
            m.id = id;
            tracing::info!(model = %m.id, context = m.context_length, secs = started.elapsed().as_secs_f32(), "model loaded");
            let _ = engine_tx.send(Some(m.stats.clone()));
            let _ = load_tx.send(LoadState::Ready(Arc::new(m)));
        }
        Err(e) => {
            tracing::error!(error = %e, "model failed to load");
            let _ = load_tx.send(LoadState::Failed(e.to_string()));
        }
    }
}

/// Binding beyond loopback without a key opens the API (and the device) to the network.
fn warn_if_exposed(args: &ServeArgs, keys: &ApiKeys) {
    if !args.host.is_loopback() && keys.is_empty() {
        tracing::warn!(host = %args.host, "listening beyond loopback WITHOUT an API key: anyone who can reach this port can use the model; set --api-key or --api-key-file");
    } else if !keys.is_empty() {
        tracing::info!(keys = keys.len(), "API keys required on /v1/*");
    }
}
