//! `idlerig bench infer`: starts the server in-process on a loopback port with the real model
//! and drives it over HTTP with streaming completions of a fixed prompt and output length,
//! `concurrency` at a time. Time to first token is measured at the client, as users feel it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;

use crate::api::{self, ApiLimits, AppState, LoadState};
use crate::config::BenchInferArgs;
use crate::engine::load_model;
use crate::model::device_from_name;

use super::llama_cpp::LlamaCppRef;
use crate::stats::quantile;

/// Client-side timings of one streamed request.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    pub ttft: Duration,
    pub total: Duration,
    pub tokens: usize,
    /// The prompt's tokens, and those of them the prefix cache held (from the usage chunk,
    /// when the request asked for one).
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS`, `VmHWM`), in MiB;
/// `None` off Linux.
fn proc_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Deterministic prompt of `len` token ids, different for each `seed` (so no two requests
/// share a prefix a cache could exploit).
pub fn synthetic_prompt(len: usize, seed: u64) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Ordinary vocabulary ids, clear of the special tokens at the start.
            200 + ((x >> 33) % 20_000) as u32
        })
        .collect()
}

/// Sends one streaming completion and times it; every token is one SSE event.
pub async fn timed_stream(
    client: &reqwest::Client,
    base: &str,
    prompt: &[u32],
    gen_tokens: usize,
) -> Result<StreamTiming, String> {
    let body = json!({
        "prompt": prompt, "max_tokens": gen_tokens, "temperature": 0, "stream": true, "ignore_eos": true,
    });
    timed_stream_of(client, base, &body).await
}

/// Sends the streaming completion `body` and times it; with `stream_options.include_usage`
/// the prompt's cached tokens are read from the usage chunk.
pub async fn timed_stream_of(
    client: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> Result<StreamTiming, String> {
    let start = Instant::now();
    let res = client
        .post(format!("{base}/v1/completions"))
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !res.status().is_success() {
        return Err(format!(
            "HTTP {}: {}",
            res.status(),
            res.text().await.unwrap_or_default()
        ));
    }
    let mut stream = res.bytes_stream();
    let mut buf = Vec::new();
    let mut ttft = None;
    let (mut tokens, mut prompt_tokens, mut cached_tokens) = (0, 0, 0);
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                let total = start.elapsed();
                return Ok(StreamTiming {
                    ttft: ttft.unwrap_or(total),
                    total,
                    tokens,
                    prompt_tokens,
                    cached_tokens,
                });
            }
            let v: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
            let choice = &v["choices"][0];
            if choice.is_object() && choice["finish_reason"].is_null() {
                tokens += 1;
                ttft.get_or_insert_with(|| start.elapsed());
            }
        }
    }
    Err("stream ended without [DONE]".into())
}

pub async fn run(args: BenchInferArgs) -> Result<serde_json::Value, String> {
    // As `serve` does: the int8 kernels' instruction set is fixed before the model loads.
    let isa = crate::model::quant::Isa::choose(args.model.cpu_isa);
    let device = device_from_name(&args.model.device).map_err(|e| e.to_string())?;
    let path = args.model.model_path()?;
    let mut engine_cfg = args.model.engine_config();
    engine_cfg.max_running = engine_cfg.max_running.max(args.concurrency);
    let threads = engine_cfg.model.threads;
    let model = tokio::task::spawn_blocking(move || load_model(&path, &device, engine_cfg))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let (_tx, rx) = watch::channel(LoadState::Ready(Arc::new(model)));
    let state = AppState::new("bench".into(), rx, ApiLimits::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let base = format!(
        "http://{}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let server = tokio::spawn(api::serve(listener, state, std::future::pending()));

    let client = reqwest::Client::new();
    // Warm-up: first-touch allocations and page faults are not what we measure.
    timed_stream(
        &client,
        &base,
        &synthetic_prompt(args.prompt_tokens, u64::MAX),
        4,
    )
    .await?;
    let rss_before = proc_status_mb("VmRSS");
    let mut reference = if args.compare_llama_cpp {
        let (path, threads) = (args.model.model_path()?, threads);
        let mut r =
            tokio::task::block_in_place(|| LlamaCppRef::start(&args.scripts_dir, &path, threads))?;
        let warm = synthetic_prompt(args.prompt_tokens, u64::MAX);
        tokio::task::block_in_place(|| r.run(&warm, 4))?;
        Some(r)
    } else {
        None
    };

    // The schedule runs in rounds; with a reference, each idlerig round is followed by
    // llama.cpp on the same prompts (one at a time), so both see the same machine state.
    let total = args.requests.unwrap_or((args.concurrency * 4).max(4));
    let rounds = args.rounds.clamp(1, total);
    let mut timings = Vec::new();
    let mut ref_timings = Vec::new();
    let mut batch1_timings = Vec::new();
    let mut wall = 0.0;
    for round in 0..rounds {
        let (first, end) = (round * total / rounds, (round + 1) * total / rounds);
        let started = Instant::now();
        let concurrency = args.concurrency;
        timings.extend(idlerig_phase(&client, &base, &args, concurrency, first..end).await?);
        wall += started.elapsed().as_secs_f64();
        if args.compare_batch1 {
            // Prompts of their own (no prefix to share with the round's), one at a time.
            let alone = BATCH1_SEED + first..BATCH1_SEED + (first + 2).min(end);
            batch1_timings.extend(idlerig_phase(&client, &base, &args, 1, alone).await?);
        }
        if let Some(r) = reference.as_mut() {
            for i in first..end {
                let prompt = synthetic_prompt(args.prompt_tokens, i as u64);
                ref_timings.push(tokio::task::block_in_place(|| {
                    r.run(&prompt, args.gen_tokens)
                })?);
            }
        }
    }
    server.abort();

    let ours = Speeds::of(&timings, args.prompt_tokens);
    let ttft_ms: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64() * 1e3).collect();
    let generated: usize = timings.iter().map(|t| t.tokens).sum();
    let mut out = json!({
        "bench": "infer",
        "device": args.model.device,
        "kernels": format!("{:?}", args.model.cpu_kernels).to_lowercase(),
        "int8_isa": isa.name(),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "concurrency": args.concurrency,
        "requests": timings.len(),
        "prefill_tok_s": round2(ours.prefill),
        "decode_tok_s": round2(ours.decode),
        "throughput_tok_s": round2(generated as f64 / wall),
        "ttft_ms_p50": round2(quantile(&ttft_ms, 0.5)),
        "ttft_ms_p99": round2(quantile(&ttft_ms, 0.99)),
        "threads": threads,
        // Resident memory of this process (llama.cpp's child is not in it): after the
        // warm-up, and at its highest. Only the KV pool should grow with load.
        "kv_cache_mb": args.model.kv_cache_mb,
        "rss_mb_after_warmup": rss_before.map(round2),
        "rss_mb_end": proc_status_mb("VmRSS").map(round2),
        "rss_mb_peak": proc_status_mb("VmHWM").map(round2),
    });
    if args.compare_batch1 {
        let batch1 = Speeds::of(&batch1_timings, args.prompt_tokens);
        out["batch1_requests"] = json!(batch1_timings.len());
        out["batch1_decode_tok_s"] = json!(round2(batch1.decode));
        // Null where batch-1 decode had nothing to time (one generated token).
        out["throughput_vs_batch1"] = if batch1.decode > 0.0 {
            json!(round2(generated as f64 / wall / batch1.decode))
        } else {
            json!(null)
        };
    }
    if reference.is_some() {
        let theirs = Speeds::of(&ref_timings, args.prompt_tokens);
        out["reference"] =
            json!("llama.cpp (llama-cpp-python 0.3.36), batch 1, same prompts, interleaved");
        out["reference_build"] = reference
            .as_ref()
            .map_or(json!(null), |r| r.build().clone());
        out["ref_prefill_tok_s"] = json!(round2(theirs.prefill));
        out["ref_decode_tok_s"] = json!(round2(theirs.decode));
        out["prefill_ratio"] = json!(round2(ours.prefill / theirs.prefill));
        out["decode_ratio"] = json!(round2(ours.decode / theirs.decode));
    }
    Ok(out)
}

/// Where the batch-1 comparison's prompt seeds start: clear of the schedule's.
const BATCH1_SEED: usize = usize::MAX / 2;

/// Requests `indices` (prompt seeds) against idlerig, `concurrency` in flight at once.
async fn idlerig_phase(
    client: &reqwest::Client,
    base: &str,
    args: &BenchInferArgs,
    concurrency: usize,
    indices: std::ops::Range<usize>,
) -> Result<Vec<StreamTiming>, String> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(indices.start));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (client, base, next) = (client.clone(), base.to_string(), next.clone());
            let (p, g, end) = (args.prompt_tokens, args.gen_tokens, indices.end);
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= end {
                        return Ok::<_, String>(out);
                    }
                    out.push(
                        timed_stream(&client, &base, &synthetic_prompt(p, i as u64), g).await?,
                    );
                }
            })
        })
        .collect();
    let mut timings = Vec::new();
    for w in workers {
        timings.extend(w.await.map_err(|e| e.to_string())??);
    }
    Ok(timings)
}

/// Median prefill speed (prompt tokens over time to first token) and decode speed (the
/// tokens after the first over the time after it) of a set of requests.
struct Speeds {
    prefill: f64,
    decode: f64,
}

impl Speeds {
    fn of(timings: &[StreamTiming], prompt_tokens: usize) -> Self {
        let prefill: Vec<f64> = timings
            .iter()
            .map(|t| prompt_tokens as f64 / t.ttft.as_secs_f64())
            .collect();
        let decode: Vec<f64> = timings
            .iter()
            .filter(|t| t.tokens > 1)
            .map(|t| (t.tokens - 1) as f64 / (t.total - t.ttft).as_secs_f64())
            .collect();
        Self {
            prefill: quantile(&prefill, 0.5),
            decode: quantile(&decode, 0.5),
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
