//! The `bench` subcommands' arguments: each benchmark runs the real code paths and prints one
//! JSON line (see `crate::bench`).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::ModelArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Inference over real HTTP against an in-process server: prefill and decode speed, TTFT.
    Infer(BenchInferArgs),
    /// Hashrate of the miner on a real mainnet block template, beside a reference SHA-256d.
    Mine(BenchMineArgs),
    /// What mining costs API users: the same request schedule with mining on and off, interleaved.
    Preempt(BenchPreemptArgs),
    /// What a running batch costs interactive users: the same request schedule with a batch
    /// running and without, interleaved; the miner must wait for the batch.
    Flex(BenchFlexArgs),
    /// Deferred work and long prompts on a saturated server: closed-loop clients on a small KV
    /// pool, with flex requests beside them and without, interleaved; TTFT, flex latency, the
    /// long prompt's time and the prefix cache's hit rate.
    Saturate(BenchSaturateArgs),
    /// The GPU half in one run (scripts/gpu-check): kernel correctness, GH/s, pre-emption
    /// latency with lost and duplicate nonces counted, power. Without a GPU it runs the
    /// kernel checks on the CPU stand-in and reports `"gpu": null`.
    GpuCheck(BenchGpuCheckArgs),
    /// What constrained decoding (response_format, structured_outputs) costs per token: the
    /// grammar's mask alone, and the engine's decode time with and without it.
    Grammar(BenchGrammarArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchGrammarArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens per measurement (the mask walk, and each request's maximum).
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Requests through the engine per format, with and without the grammar.
    #[arg(long, default_value_t = 4)]
    pub requests: usize,
}

#[derive(Debug, Clone, Args)]
pub struct BenchGpuCheckArgs {
    /// The GPU to check.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// The model for the serving and speed figures (GGUF file or safetensors directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Small sizes even on a GPU (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// The part to run: `kernel` (correctness, GH/s against the ceiling, pre-emption with
    /// lost and duplicate nonces; no model needed), `serving` (CUDA against the CPU twin on
    /// the tiny model of every architecture in tests/reference/arch, and on --model), `speed`
    /// (bench infer and bench preempt on --model), or `all` of them in turn.
    #[arg(long, value_enum, default_value_t = GpuCheckSection::All)]
    pub section: GpuCheckSection,
    /// Where each part's JSON is written as soon as it is done (`gpu-check-kernel.json`, …).
    #[arg(long, env = "OUT")]
    pub out: Option<PathBuf>,
}

/// A part of `bench gpu-check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GpuCheckSection {
    Kernel,
    Serving,
    Speed,
    All,
}

#[derive(Debug, Clone, Args)]
pub struct BenchPreemptArgs {
    /// Model to serve (default: the SmolLM2 GGUF from models/).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device to serve on: `cpu` (the CPU miner mines the gaps) or `cuda:N` (the GPU miner).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Mean request arrivals per second (Poisson, open loop).
    #[arg(long, default_value_t = 0.5)]
    pub rate: f64,
    /// Requests per mode (mining on / off).
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    /// Rounds the schedule is split into; each runs with mining on and off, order alternating.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Prompt lengths to draw from, in tokens.
    #[arg(long, value_delimiter = ',', default_value = "16,64,128")]
    pub prompt_tokens: Vec<usize>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Seconds of idle measured for the idle hashrate.
    #[arg(long, default_value_t = 3.0)]
    pub idle_seconds: f64,
    #[arg(long, default_value_t = 100)]
    pub idle_grace_ms: u64,
    /// CPU mining threads (default: as `serve`, every core but one).
    #[arg(long)]
    pub mine_threads: Option<usize>,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Print one JSON line (always the case; accepted for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BenchFlexArgs {
    /// Model to serve (default: the SmolLM2 GGUF from models/).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Mean interactive request arrivals per second (Poisson, open loop).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Interactive requests per mode (with a batch running / without).
    #[arg(long, default_value_t = 24)]
    pub requests: usize,
    /// Rounds the schedule is split into; each runs with and without a batch, order alternating.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Interactive prompt lengths to draw from, in tokens.
    #[arg(long, value_delimiter = ',', default_value = "16,64,128")]
    pub prompt_tokens: Vec<usize>,
    /// Tokens generated per interactive request.
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Lines of each round's batch (48-token prompts).
    #[arg(long, default_value_t = 32)]
    pub batch_lines: usize,
    /// Tokens generated per batch line.
    #[arg(long, default_value_t = 64)]
    pub batch_tokens: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

#[derive(Debug, Clone, Args)]
pub struct BenchSaturateArgs {
    /// Model to serve (default: the SmolLM2 GGUF from models/).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Closed-loop interactive clients.
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    /// The server's KV cache, in MiB (small, so that the clients fill it).
    #[arg(long, default_value_t = 48)]
    pub kv_cache_mb: usize,
    /// The server's --deferred-min-share.
    #[arg(long, default_value_t = 0.05)]
    pub deferred_min_share: f64,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 15.0)]
    pub seconds: f64,
    /// Seconds of an unmeasured phase first.
    #[arg(long, default_value_t = 5.0)]
    pub warmup_s: f64,
    /// Rounds; each runs a baseline phase and a flex phase, the order alternating.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// The prefix every client's prompt starts with, in tokens.
    #[arg(long, default_value_t = 64)]
    pub hot_prefix_tokens: usize,
    /// Tokens of each prompt after the hot prefix, its own (with the defaults, 20 clients
    /// need more of the pool than it has).
    #[arg(long, default_value_t = 96)]
    pub tail_tokens: usize,
    /// Tokens generated per client request and per long prompt.
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// The long prompt sent once a phase beside the clients, in tokens (0: none).
    #[arg(long, default_value_t = 1200)]
    pub long_prompt_tokens: usize,
    /// Tokens each flex request generates.
    #[arg(long, default_value_t = 16)]
    pub flex_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub flex_prompt_tokens: usize,
    /// A flex request that takes longer than this fails the bench.
    #[arg(long, default_value_t = 180.0)]
    pub flex_limit_s: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

#[derive(Debug, Clone, Args)]
pub struct BenchMineArgs {
    /// Mining backend: `cpu` (CUDA comes with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// How long to measure.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The miner's SHA-256d code (default: measured at start-up, as `serve` does).
    #[arg(long, value_enum)]
    pub cpu_sha_path: Option<crate::mining::ScanPath>,
    /// Also run this cpuminer-opt binary (`-a sha256d --benchmark`, same threads) and print
    /// its rate and the ratio (`vs_cpuminer`). idlerig ships none: build or bring your own.
    #[arg(long, value_name = "PATH")]
    pub compare_cpuminer: Option<std::path::PathBuf>,
    /// Print one JSON line (the output is always one JSON line; accepted for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BenchInferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated per request (end-of-generation tokens are ignored so every request runs this long).
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Requests in all (default: 4 × concurrency, at least 4).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Rounds the requests are split into; with a reference, each idlerig round is followed
    /// by the reference on the same prompts.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Also run the same prompts through llama.cpp (llama-cpp-python, built once per CPU for
    /// this machine, less AMX, into ~/.cache/idlerig/refvenv-* by scripts/llama-cpp-setup) and
    /// print both and their ratios.
    #[arg(long)]
    pub compare_llama_cpp: bool,
    /// With --concurrency above 1: after each round, also run two of its requests alone
    /// (batch 1, other prompts of the same length) and print `batch1_decode_tok_s` and
    /// `throughput_vs_batch1`, the aggregate throughput over batch-1 decode, both from
    /// this run.
    #[arg(long)]
    pub compare_batch1: bool,
    /// Where scripts/llama-cpp-setup and llama-cpp-ref.py are (default: ./scripts, the
    /// working tree's, when run from the repository root).
    #[arg(long, env = "IDLERIG_SCRIPTS_DIR", default_value = "scripts")]
    pub scripts_dir: std::path::PathBuf,
    /// Print one JSON line (the default output is also one JSON line; the flag is accepted for scripts).
    #[arg(long)]
    pub json: bool,
}
