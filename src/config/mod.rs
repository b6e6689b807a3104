//! The command line: every flag also read from an `IDLERIG_*` environment variable, parsed
//! once in `main` and turned into the typed settings each subsystem is built from.

mod batch;
mod bench;
mod file;
mod operator;

pub use batch::BatchArgs;
pub use bench::*;
pub use file::{apply_config_file, effective_config_toml, ConfigError};
pub use operator::{AccessArgs, EarningsArgs, MineWhen};

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api::ApiLimits;
use crate::engine::EngineConfig;

/// Where `models/fetch` puts the default chat model, relative to the repository.
pub const DEFAULT_MODEL_RELATIVE: &str =
    "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Parser)]
#[command(
    name = "idlerig",
    version,
    about = "OpenAI-compatible LLM server that mines SHA-256d in the gaps between requests",
    long_about = "idlerig serves a language model over an OpenAI-compatible HTTP API (CPU or CUDA) and, \
                  while no request is queued or running, lends the device to a SHA-256d miner that it \
                  pre-empts the moment a request arrives."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over HTTP (OpenAI API).
    Serve(ServeArgs),
    /// Mine only (no model): the CPU miner on a Stratum pool, or on the embedded local pool.
    Mine(MineArgs),
    /// Measure speed; each benchmark prints one JSON line.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// List the models in the Hugging Face cache and Ollama's store, as `--model` takes them.
    Models,
    /// Show the configuration `serve` would run with (flags, IDLERIG_* variables and the
    /// --config file merged), secrets redacted.
    Config(ConfigArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Print the effective configuration as TOML (usable as a --config file).
    #[arg(long)]
    pub print: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Where `serve` mines between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MineDevice {
    /// Never mine.
    Off,
    /// CPU threads (SHA-NI where the CPU has it).
    Cpu,
    /// The GPU that serves (needs the `cuda` feature).
    Cuda,
    /// The device that serves: the GPU when serving on CUDA, else the CPU.
    Auto,
    /// The CUDA kernel's source run on CPU threads: the GPU miner's whole code path without
    /// a GPU (for tests and demonstrations; slower than `cpu`).
    CpuGrid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Model and engine settings shared by `serve` and the benchmarks.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Chat model to serve: a .gguf file, or a directory with config.json + *.safetensors
    /// (+ tokenizer.json); or by name from where it is already kept: `hf:ORG/REPO[:QUANT|:FILE]`
    /// from the Hugging Face cache (HF_HUB_CACHE, HF_HOME), `ollama:NAME[:TAG]` from Ollama's
    /// store (OLLAMA_MODELS); `idlerig models` lists them. Repeat it, as `NAME=PATH`, to serve
    /// several: requests choose one by their `model` (the first is the default), and each has
    /// its own engine, with an equal share of --kv-cache-mb.
    /// Default: the SmolLM2-135M-Instruct GGUF that `models/fetch` downloads.
    #[arg(
        long,
        env = "IDLERIG_MODEL",
        value_name = "[NAME=]PATH",
        value_delimiter = ','
    )]
    pub model: Vec<String>,
    /// Device to run the model on: `cpu`, or `cuda:N` (needs a build with the `cuda` feature).
    #[arg(long, env = "IDLERIG_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Requests that may wait for the engine; beyond this the server answers 429.
    #[arg(long, env = "IDLERIG_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// Deferred requests (`service_tier: flex`, batch lines) that may wait for the engine;
    /// beyond this flex requests are answered 429 `resource_unavailable`.
    #[arg(long, env = "IDLERIG_DEFERRED_QUEUE", default_value_t = 256)]
    pub deferred_queue: usize,
    /// The share of the engine's time that deferred work (flex requests, batch lines) is
    /// guaranteed while interactive requests keep it busy, from 0 (deferred work runs only in
    /// the gaps) to 0.5. Interactive requests may wait up to this share longer under load.
    #[arg(long, env = "IDLERIG_DEFERRED_MIN_SHARE", default_value_t = 0.05, value_parser = parse_share)]
    pub deferred_min_share: f64,
    /// Seconds of waiting that double deferred work's share (aging), up to half the time.
    #[arg(long, env = "IDLERIG_DEFERRED_AGING_S", default_value_t = 60.0, value_parser = parse_aging)]
    pub deferred_aging_s: f64,
    /// Sequences decoded together in one batch.
    #[arg(long, env = "IDLERIG_MAX_RUNNING", default_value_t = 32)]
    pub max_running: usize,
    /// Tokens per engine step; long prompts are pre-filled in chunks of what remains after decodes.
    #[arg(long, env = "IDLERIG_STEP_TOKEN_BUDGET", default_value_t = 512)]
    pub step_token_budget: usize,
    /// Threads for the model's matrix products on the CPU (default: every core; the miner
    /// is pre-empted whenever the model runs, so it does not compete for them).
    #[arg(long, env = "IDLERIG_THREADS")]
    pub threads: Option<usize>,
    /// Memory for the KV cache, in MiB. On the CPU: a pool of 16-token blocks shared by all
    /// sequences (and by common prompt prefixes). On CUDA: the budget of the per-sequence
    /// caches. When it runs out, the lowest-ranked sequence is paused and recomputed later,
    /// and a prompt larger than all of it is refused. 0: per-sequence caches with no limit.
    #[arg(long, env = "IDLERIG_KV_CACHE_MB", default_value_t = 1024)]
    pub kv_cache_mb: usize,
    /// KV cache layout: `auto` (paged on the CPU, dense on CUDA), `paged` (CPU only), or
    /// `dense` (per-sequence buffers under the --kv-cache-mb budget: CUDA's layout, on any
    /// device).
    #[arg(long, env = "IDLERIG_KV_LAYOUT", value_enum, default_value_t = KvLayout::Auto)]
    pub kv_layout: KvLayout,
    /// CPU kernels for quantized weights: idlerig's own (AVX-512 VNNI, AVX-VNNI or AVX2, as
    /// the CPU has them), or candle's (for comparison).
    #[arg(long, env = "IDLERIG_CPU_KERNELS", value_enum, default_value_t = CpuKernels::Idlerig)]
    pub cpu_kernels: CpuKernels,
    /// Instruction set of idlerig's CPU kernels (default: the best this CPU has, detected at
    /// start-up: avx512-vnni, then avx-vnni, then avx2, then portable): the int8 matrix
    /// products, and the attention and SwiGLU (512-bit with avx512-vnni, 256-bit with avx-vnni
    /// or avx2), which run with --cpu-kernels candle too. For comparisons; a set the CPU lacks
    /// is refused in the log and the detected one is used.
    #[arg(long, env = "IDLERIG_CPU_ISA", value_enum)]
    pub cpu_isa: Option<crate::model::quant::Isa>,
}

/// A share of the engine's time: a number from 0 to 0.5.
fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=crate::engine::MAX_DEFERRED_SHARE).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is outside 0..={} (interactive work keeps at least half the time)",
            crate::engine::MAX_DEFERRED_SHARE
        ))
    }
}

/// Seconds of aging: a positive number of at most a year.
fn parse_aging(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if v > 0.0 && v <= 365.0 * 86_400.0 {
        Ok(v)
    } else {
        Err(format!(
            "{v} is not a number of seconds above 0 and up to a year"
        ))
    }
}

/// How the KV cache is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvLayout {
    Auto,
    Paged,
    Dense,
}

/// Which CPU kernels run quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CpuKernels {
    Idlerig,
    Candle,
}

impl ModelArgs {
    pub fn engine_config(&self) -> EngineConfig {
        let defaults = crate::model::LoadOptions::default();
        EngineConfig {
            queue_capacity: self.queue_capacity,
            deferred_queue_capacity: self.deferred_queue,
            max_running: self.max_running.max(1),
            step_token_budget: self.step_token_budget.max(1),
            model: crate::model::LoadOptions {
                threads: self.threads.unwrap_or(defaults.threads).max(1),
                own_kernels: self.cpu_kernels == CpuKernels::Idlerig,
                kv_cache_mb: self.kv_cache_mb,
                dense_kv: self.kv_layout == KvLayout::Dense,
                dtype: None,
            },
            telemetry: None,
            deferred_min_share: self.deferred_min_share,
            deferred_aging: std::time::Duration::from_secs_f64(self.deferred_aging_s),
        }
    }

    /// The chat models to serve, each with the name `NAME=` gave it (else its store's, else
    /// its file's), the default model when none is named. `hf:` and `ollama:` names are found
    /// in their stores; the error says what is missing and how to fetch it.
    pub fn models(&self) -> Result<Vec<(Option<String>, PathBuf)>, String> {
        if self.model.is_empty() {
            return Ok(vec![(None, self.model_path()?)]);
        }
        let stores = crate::model_store::Stores::from_env();
        self.model
            .iter()
            .map(|s| in_store(&stores, model_spec(s)))
            .collect()
    }

    /// The first model's path: the flag (found in its store), else the default model under
    /// the current directory, else under the source tree this binary was built from.
    pub fn model_path(&self) -> Result<PathBuf, String> {
        if let Some(spec) = self.model.first() {
            let stores = crate::model_store::Stores::from_env();
            return Ok(in_store(&stores, model_spec(spec))?.1);
        }
        let here = PathBuf::from(DEFAULT_MODEL_RELATIVE);
        if here.exists() {
            return Ok(here);
        }
        Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL_RELATIVE))
    }
}

/// A model spec's path found in its store (`hf:`, `ollama:`), named by the store unless
/// `NAME=` named it; a plain path as it is.
fn in_store(
    stores: &crate::model_store::Stores,
    (name, path): (Option<String>, PathBuf),
) -> Result<(Option<String>, PathBuf), String> {
    match stores.resolve(&path.to_string_lossy()) {
        None => Ok((name, path)),
        Some(Ok(found)) => Ok((Some(name.unwrap_or(found.name)), found.path)),
        Some(Err(e)) => Err(e.to_string()),
    }
}

/// Where `models/fetch` puts the default embedding model, relative to the repository.
pub const DEFAULT_EMBEDDING_MODEL_RELATIVE: &str = "models/all-minilm-l6-v2";

/// `NAME=PATH` or `PATH` (what precedes a `=` is a name only when it is not itself part of a
/// path: a file whose name holds `=` is taken whole).
fn model_spec(spec: &str) -> (Option<String>, PathBuf) {
    match spec.split_once('=') {
        Some((name, path))
            if !name.is_empty()
                && !name.contains(['/', '\\'])
                && !std::path::Path::new(spec).exists() =>
        {
            (Some(name.to_string()), PathBuf::from(path))
        }
        _ => (None, PathBuf::from(spec)),
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file of settings: keys are the long flag names (`port = 8080`, `api-key = ["k1"]`).
    /// Flags and IDLERIG_* variables override it.
    #[arg(long, env = "IDLERIG_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Embedding model served on /v1/embeddings beside the chat model: a sentence-transformers
    /// directory (BERT: config.json, model.safetensors, tokenizer.json), run on the CPU.
    /// Default: all-MiniLM-L6-v2 from `models/fetch`, when it is there. `none`: no embeddings.
    #[arg(long, env = "IDLERIG_EMBEDDING_MODEL")]
    pub embedding_model: Option<String>,
    /// SQLite file where requests and tokens per API key and day are kept (WAL mode; it
    /// survives restarts; GET /v1/usage shows it to admin keys). Default, when API keys are
    /// configured: idlerig-usage.db in the working directory. `none`: counters and quotas in
    /// memory only.
    #[arg(long, env = "IDLERIG_USAGE_DB")]
    pub usage_db: Option<String>,
    /// Address to listen on. The default accepts only local clients.
    #[arg(long, env = "IDLERIG_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, env = "IDLERIG_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, env = "IDLERIG_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Largest `n` (choices per request).
    #[arg(long, env = "IDLERIG_MAX_N", default_value_t = 8)]
    pub max_n: usize,
    /// Largest `max_tokens` a request may ask for (default: the model's context window).
    #[arg(long, env = "IDLERIG_MAX_TOKENS")]
    pub max_tokens: Option<usize>,
    /// Lowest `priority` a request may ask for (lower runs first; vLLM's convention).
    #[arg(long, env = "IDLERIG_MIN_PRIORITY", default_value_t = -100, allow_hyphen_values = true)]
    pub min_priority: i64,
    /// Highest `priority` a request may ask for.
    #[arg(
        long,
        env = "IDLERIG_MAX_PRIORITY",
        default_value_t = 100,
        allow_hyphen_values = true
    )]
    pub max_priority: i64,
    /// Seconds a request may take, queue and generation together; a longer one is ended
    /// (504, or an error event on a stream) and its generation cancelled.
    #[arg(long, env = "IDLERIG_REQUEST_TIMEOUT_S", default_value_t = 600.0)]
    pub request_timeout_s: f64,
    /// Seconds that requests in flight get to finish after SIGTERM/SIGINT (new ones get 503)
    /// before they are cancelled and the server exits.
    #[arg(long, env = "IDLERIG_SHUTDOWN_GRACE_S", default_value_t = 30.0)]
    pub shutdown_grace_s: f64,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub earnings: EarningsArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Milliseconds between the dashboard's history samples (the last hour is kept).
    #[arg(
        long,
        env = "IDLERIG_HISTORY_INTERVAL_MS",
        default_value_t = 5000,
        hide = true
    )]
    pub history_interval_ms: u64,
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, env = "IDLERIG_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Where to mine between requests.
    #[arg(long, env = "IDLERIG_MINE_DEVICE", value_enum, default_value = "auto")]
    pub mine_device: MineDevice,
    /// Serve only; never mine (same as --mine-device off).
    #[arg(long, env = "IDLERIG_NO_MINE")]
    pub no_mine: bool,
    /// Milliseconds the engine must be idle before mining resumes (see docs/src/mining.md for why 100).
    #[arg(long, env = "IDLERIG_IDLE_GRACE_MS", default_value_t = 100)]
    pub idle_grace_ms: u64,
    /// Largest fraction of wall time spent mining (0–1), for operators who cap power or heat.
    #[arg(long, env = "IDLERIG_MAX_MINING_DUTY", default_value_t = 1.0)]
    pub max_mining_duty: f64,
    /// CPU mining threads (default: every core but one, so that a pre-empted miner can always
    /// stop within microseconds; they run at SCHED_IDLE and yield to inference either way).
    #[arg(long, env = "IDLERIG_MINE_THREADS")]
    pub mine_threads: Option<usize>,
    /// The CPU miner's SHA-256d code. By default a start-up measurement (about 0.1 s) runs
    /// each one this CPU has and takes the fastest; the choice and the rates are logged and
    /// shown in /v1/status.
    #[arg(long, env = "IDLERIG_CPU_SHA_PATH", value_enum)]
    pub cpu_sha_path: Option<crate::mining::ScanPath>,
}

impl ServeArgs {
    /// The embedding model to serve: the flag's path (which must exist), none with `none`,
    /// else the default one where `models/fetch` put it (under the current directory or the
    /// source tree), or none when it is not there.
    pub fn embedding_model_path(&self) -> Result<Option<PathBuf>, String> {
        match self.embedding_model.as_deref() {
            Some("none") => Ok(None),
            Some(p) => {
                let path = PathBuf::from(p);
                if path.is_dir() {
                    Ok(Some(path))
                } else {
                    Err(format!(
                        "--embedding-model {p}: no such directory (a sentence-transformers model, or `none`)"
                    ))
                }
            }
            None => Ok([
                PathBuf::from(DEFAULT_EMBEDDING_MODEL_RELATIVE),
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_EMBEDDING_MODEL_RELATIVE),
            ]
            .into_iter()
            .find(|p| p.join("model.safetensors").exists())),
        }
    }

    pub fn api_limits(&self) -> ApiLimits {
        ApiLimits {
            max_body_bytes: self.max_body_bytes,
            max_n: self.max_n.max(1),
            max_tokens: self.max_tokens,
            request_timeout: std::time::Duration::from_secs_f64(
                self.request_timeout_s.clamp(0.001, 1e9),
            ),
            priority_range: (
                self.min_priority.min(self.max_priority),
                self.max_priority.max(self.min_priority),
            ),
            ..ApiLimits::default()
        }
    }
}

/// Where to mine and as whom.
#[derive(Clone, Args)]
pub struct PoolArgs {
    /// Stratum pool, `stratum+tcp://host:port`; repeat for fail-over, in order of preference.
    /// Without one, idlerig starts its embedded local pool (a real Stratum server that pays nothing).
    #[arg(long = "pool", env = "IDLERIG_POOL", value_delimiter = ',')]
    pub pools: Vec<String>,
    /// Worker name sent to the pool (usually `account.worker`).
    #[arg(long, env = "IDLERIG_USER", default_value = "idlerig")]
    pub user: String,
    /// Worker password (never logged).
    #[arg(
        long = "pass",
        env = "IDLERIG_PASS",
        default_value = "x",
        hide_env_values = true
    )]
    pub password: String,
    /// Port of the embedded pool on 127.0.0.1 (when no --pool is given); other miners may connect to it.
    #[arg(long, env = "IDLERIG_LOCAL_POOL_PORT", default_value_t = 3333)]
    pub local_pool_port: u16,
    /// Starting share difficulty of the embedded pool (it adjusts towards a share every 5 s).
    #[arg(long, env = "IDLERIG_LOCAL_POOL_DIFFICULTY", default_value_t = 0.001)]
    pub local_pool_difficulty: f64,
    /// Obey a pool's `client.reconnect` to another host. Off by default: the worker name and
    /// password would go to whatever host the pool names.
    #[arg(long, env = "IDLERIG_ALLOW_RECONNECT_ELSEWHERE")]
    pub allow_reconnect_elsewhere: bool,
}

impl std::fmt::Debug for PoolArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolArgs")
            .field("pools", &self.pools)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Args)]
pub struct MineArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    /// CPU mining threads (default: every core).
    #[arg(long, env = "IDLERIG_MINE_THREADS")]
    pub threads: Option<usize>,
    /// The SHA-256d code (default: measured at start-up, the fastest this CPU has).
    #[arg(long, value_enum)]
    pub cpu_sha_path: Option<crate::mining::ScanPath>,
    /// Where to mine: `cpu`, `cuda` (the GPU given by --gpu; needs a CUDA build), or
    /// `cpu-grid` (the CUDA kernel's source on CPU threads, for tests).
    #[arg(long, env = "IDLERIG_MINE_DEVICE", value_enum, default_value = "cpu")]
    pub device: MineDevice,
    /// The GPU to mine on with `--device cuda`.
    #[arg(long, env = "IDLERIG_GPU", default_value_t = 0)]
    pub gpu: usize,
}
