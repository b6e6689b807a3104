//! `idlerig bench saturate`: deferred work and long prompts on a server that interactive
//! clients keep saturated. It starts the real server in-process with a small KV pool and runs
//! closed-loop clients (each sends its next request as soon as the last ends) on prompts
//! that share a hot prefix, in phases of equal length: a baseline phase with only those
//! clients and a long prompt, and a phase with flex requests of a few tokens sent one after
//! another beside them, the order alternating round by round so the comparison holds on a
//! noisy machine. It prints the clients' TTFT in both, how long each flex request and each
//! long prompt took, and the prefix cache's hit rate on the clients' prompts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::infer::{synthetic_prompt, timed_stream_of, StreamTiming};
use super::preempt::{json_of, start_loaded, status};
use crate::config::BenchSaturateArgs;
use crate::stats::quantile;

/// What one phase measured.
#[derive(Default)]
struct Phase {
    clients: Vec<StreamTiming>,
    long: Vec<StreamTiming>,
    flex_secs: Vec<f64>,
    /// The KV pool's fill, sampled through `/v1/status`: samples, and those at 90% or more.
    pool_samples: usize,
    pool_full_samples: usize,
    /// Sequences pre-empted for KV blocks during the phase.
    preemptions: u64,
}

/// Samples the KV pool's fill until `end`: (samples, samples at 90% or more).
async fn pool_fill(client: reqwest::Client, base: String, end: Instant) -> (usize, usize) {
    let (mut n, mut full) = (0, 0);
    while Instant::now() < end {
        if let Ok(s) = status(&client, &base).await {
            let (used, total) = (
                &s["engine"]["kv_blocks_used"],
                &s["engine"]["kv_blocks_total"],
            );
            if let (Some(u), Some(t)) = (used.as_u64(), total.as_u64()) {
                n += 1;
                full += usize::from(u * 10 >= t * 9);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (n, full)
}

/// One client's requests until `end`: the hot prefix, then a tail of its own.
async fn client_loop(
    client: reqwest::Client,
    base: String,
    args: Arc<BenchSaturateArgs>,
    hot: Vec<u32>,
    seed: u64,
    end: Instant,
) -> Result<Vec<StreamTiming>, String> {
    let mut out = Vec::new();
    let mut n = 0u64;
    while Instant::now() < end {
        let mut prompt = hot.clone();
        prompt.extend(synthetic_prompt(args.tail_tokens, seed << 20 | n));
        n += 1;
        let body = json!({"prompt": prompt, "max_tokens": args.gen_tokens, "temperature": 0,
                          "ignore_eos": true, "stream": true,
                          "stream_options": {"include_usage": true}});
        out.push(timed_stream_of(&client, &base, &body).await?);
    }
    Ok(out)
}

/// Flex requests one after another until `end` (the last one is waited for): how long each
/// took. A flex request that fails or takes longer than `limit` ends the bench.
async fn flex_loop(
    client: reqwest::Client,
    base: String,
    args: Arc<BenchSaturateArgs>,
    seed: u64,
    end: Instant,
) -> Result<Vec<f64>, String> {
    let mut out = Vec::new();
    let mut n = 0u64;
    while Instant::now() < end {
        let prompt = synthetic_prompt(args.flex_prompt_tokens, seed << 20 | n);
        n += 1;
        let body = json!({"prompt": prompt, "max_tokens": args.flex_tokens, "temperature": 0,
                          "ignore_eos": true, "service_tier": "flex"});
        let t = Instant::now();
        let limit = Duration::from_secs_f64(args.flex_limit_s);
        let req = client.post(format!("{base}/v1/completions")).json(&body);
        let v = tokio::time::timeout(limit, json_of(req))
            .await
            .map_err(|_| format!("a flex request did not finish in {} s", args.flex_limit_s))??;
        let got = v["usage"]["completion_tokens"].as_u64();
        if got != Some(args.flex_tokens as u64) {
            return Err(format!("a flex request did not complete: {v}"));
        }
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

async fn phase(
    client: &reqwest::Client,
    base: &str,
    args: &Arc<BenchSaturateArgs>,
    hot: &[u32],
    seed: u64,
    with_flex: bool,
) -> Result<Phase, String> {
    let preempted = |s: &Value| s["engine"]["kv_preemptions"].as_u64().unwrap_or(0);
    let before = preempted(&status(client, base).await?);
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let (client, base, args) = (client.clone(), base.to_string(), args.clone());
            let seed = seed << 8 | c as u64;
            tokio::spawn(client_loop(client, base, args, hot.to_vec(), seed, end))
        })
        .collect();
    let flex = with_flex.then(|| {
        let (client, base, args) = (client.clone(), base.to_string(), args.clone());
        tokio::spawn(flex_loop(client, base, args, seed << 8 | 0xff, end))
    });
    let fill = tokio::spawn(pool_fill(client.clone(), base.to_string(), end));
    // One long prompt a phase (unless 0), of its own tokens (nothing cached), beside the
    // clients.
    let mut p = Phase::default();
    if args.long_prompt_tokens > 0 {
        let body = json!({"prompt": synthetic_prompt(args.long_prompt_tokens, seed << 8 | 0xfe),
                          "max_tokens": args.gen_tokens, "temperature": 0, "ignore_eos": true,
                          "stream": true});
        p.long.push(timed_stream_of(client, base, &body).await?);
    }
    for c in clients {
        p.clients.extend(c.await.map_err(|e| e.to_string())??);
    }
    if let Some(f) = flex {
        p.flex_secs = f.await.map_err(|e| e.to_string())??;
    }
    (p.pool_samples, p.pool_full_samples) = fill.await.map_err(|e| e.to_string())?;
    p.preemptions = preempted(&status(client, base).await?) - before;
    Ok(p)
}

pub async fn run(args: BenchSaturateArgs) -> Result<Value, String> {
    let mut flags: Vec<String> = ["--embedding-model", "none", "--data-dir", "none"]
        .map(String::from)
        .into();
    flags.extend([
        "--kv-cache-mb".into(),
        args.kv_cache_mb.to_string(),
        "--deferred-min-share".into(),
        args.deferred_min_share.to_string(),
    ]);
    let (_server, base) = start_loaded(flags, args.model.as_deref()).await?;
    let client = reqwest::Client::new();
    let args = Arc::new(args);
    let hot = synthetic_prompt(args.hot_prefix_tokens, args.seed << 32);
    // A phase unmeasured first: the first measured phase finds the caches and the allocator
    // as the others do.
    let warmup = Arc::new(BenchSaturateArgs {
        seconds: args.warmup_s,
        ..(*args).clone()
    });
    if warmup.seconds > 0.0 {
        phase(
            &client,
            &base,
            &warmup,
            &hot,
            args.seed << 16 | 0xffff,
            true,
        )
        .await?;
    }
    let (mut baseline, mut flex) = (Phase::default(), Phase::default());
    let s0 = status(&client, &base).await?;
    for r in 0..args.rounds.max(1) {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_flex in order {
            let seed = (args.seed << 16) + (r as u64) * 2 + with_flex as u64;
            let p = phase(&client, &base, &args, &hot, seed, with_flex).await?;
            let into = if with_flex { &mut flex } else { &mut baseline };
            into.clients.extend(p.clients);
            into.long.extend(p.long);
            into.flex_secs.extend(p.flex_secs);
            into.pool_samples += p.pool_samples;
            into.pool_full_samples += p.pool_full_samples;
            into.preemptions += p.preemptions;
        }
    }
    let s1 = status(&client, &base).await?;
    let ms = |t: &[StreamTiming], q: f64, f: fn(&StreamTiming) -> Duration| {
        let v: Vec<f64> = t.iter().map(|t| f(t).as_secs_f64() * 1e3).collect();
        quantile(&v, q)
    };
    let ttft = |t: &StreamTiming| t.ttft;
    let total = |t: &StreamTiming| t.total;
    // Of the hot prefix's tokens, the share the prefix cache held (the rest of each prompt
    // is its own, never cached).
    let hot_tokens = args.hot_prefix_tokens as u64;
    let hit_rate = |t: &[StreamTiming]| {
        let hot: u64 = t.iter().map(|t| t.prompt_tokens.min(hot_tokens)).sum();
        let hit: u64 = t.iter().map(|t| t.cached_tokens.min(hot_tokens)).sum();
        hit as f64 / hot.max(1) as f64
    };
    let delta = |k: &str| {
        s1["engine"][k].as_u64().unwrap_or(0) as i64 - s0["engine"][k].as_u64().unwrap_or(0) as i64
    };
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let mode = |p: &Phase| {
        json!({
            "requests": p.clients.len(),
            "ttft_ms_p50": r2(ms(&p.clients, 0.5, ttft)),
            "ttft_ms_p99": r2(ms(&p.clients, 0.99, ttft)),
            "latency_ms_p50": r2(ms(&p.clients, 0.5, total)),
            "hot_prefix_hit_rate": r3(hit_rate(&p.clients)),
            "kv_preemptions": p.preemptions,
            "kv_pool_90pct_full_of_samples": r3(p.pool_full_samples as f64 / p.pool_samples.max(1) as f64),
            "long_prompt_s": p.long.iter().map(|t| r2(t.total.as_secs_f64())).collect::<Vec<_>>(),
        })
    };
    let flex_secs = &flex.flex_secs;
    Ok(json!({
        "bench": "saturate",
        "clients": args.clients,
        "kv_cache_mb": args.kv_cache_mb,
        "phase_s": args.seconds,
        "rounds": args.rounds,
        "deferred_min_share": args.deferred_min_share,
        "prompt": {"hot_prefix_tokens": args.hot_prefix_tokens, "tail_tokens": args.tail_tokens,
                   "gen_tokens": args.gen_tokens, "long_prompt_tokens": args.long_prompt_tokens},
        "baseline": mode(&baseline),
        "with_flex": mode(&flex),
        "ttft_ratio_p99": r3(ms(&flex.clients, 0.99, ttft) / ms(&baseline.clients, 0.99, ttft)),
        "ttft_ratio_p50": r3(ms(&flex.clients, 0.5, ttft) / ms(&baseline.clients, 0.5, ttft)),
        "flex": {"tokens": args.flex_tokens, "prompt_tokens": args.flex_prompt_tokens,
                 "completed": flex_secs.len(),
                 "first_s": flex_secs.first().map(|&s| r2(s)),
                 "s_p50": r2(quantile(flex_secs, 0.5)), "s_max": r2(flex_secs.iter().cloned().fold(0.0, f64::max))},
        "engine": {"kv_blocks_total": s1["engine"]["kv_blocks_total"],
                   "preemptions": delta("kv_preemptions"),
                   "deferred_owed_steps": delta("deferred_owed_steps"),
                   "deferred_interruptions": delta("deferred_interruptions")},
    }))
}
