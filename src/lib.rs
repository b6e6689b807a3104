//! idlerig: an OpenAI-compatible LLM inference server that mines SHA-256d in the gaps
//! between requests.
//!
//! # Layout
//! - [`api`]: the HTTP surface (axum): OpenAI wire types, validation into
//!   [`engine::ValidRequest`], SSE streaming, and the one `ApiError` that renders the OpenAI
//!   error envelope.
//! - [`engine`]: the engine thread that owns the model and KV caches and batches sequences;
//!   tokenizer, chat template, sampling, stop strings.
//! - [`model`]: our own decoder on candle (Llama, Qwen2/3, Phi-3, Gemma 2/3), loaded from GGUF
//!   or safetensors.
//! - [`model_store`]: models by name from the Hugging Face cache and Ollama's store.
//! - [`embed`]: embedding models (a BERT encoder with sentence-transformers pooling) for
//!   `/v1/embeddings`, batched on a thread of their own.
//! - [`mining`]: SHA-256d, block headers and targets, the CPU miner, and the GPU miner over a
//!   scan launcher (CUDA, or the CPU stand-in that runs the same kernel source).
//! - [`arbiter`]: who has the device now; inference always wins.
//! - [`telemetry`]: the figures over time, the earnings estimate and the profit switch.
//! - [`log_limit`]: rate-limited log lines for events a peer can repeat at will.
//! - [`stats`]: quantiles shared by the benchmarks, the telemetry and the arbiter.
//! - [`stratum`]: the Stratum V1 protocol (sans-IO), the client task and the embedded pool.
//! - [`usage`]: requests and tokens per API key and day, in SQLite, with daily quotas.
//! - [`batch`]: OpenAI's Files and Batches: uploads, batches kept in SQLite across restarts,
//!   and the runner that feeds their lines to the engine as deferred work.
//! - [`sqlite`]: opening the embedded databases (WAL, integrity check, schema).
//! - [`config`]: the typed configuration each subsystem is built from.

pub mod api;
pub mod arbiter;
pub mod batch;
pub mod bench;
pub mod config;
pub mod embed;
pub mod engine;
pub mod log_limit;
pub mod mining;
pub mod model;
pub mod model_store;
pub mod server;
pub mod sqlite;
pub mod stats;
pub mod stratum;
pub mod telemetry;
pub mod usage;
