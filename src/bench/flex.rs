//! `idlerig bench flex`: what a running batch costs interactive users, and who gets the gaps.
//! It starts the real server (model, engine, batch runner, embedded pool, CPU miner, arbiter)
//! in-process and replays one open-loop request schedule round by round, once with a batch
//! running and once without, the order alternating so that the comparison holds on a noisy
//! machine. Each batch then runs to completion, and the arbiter's phase is sampled throughout:
//! the miner must get the device only once the batch is done.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::infer::{synthetic_prompt, StreamTiming};
use super::preempt::{json_of, run_schedule, schedules, start_loaded, status, Planned};
use crate::config::BenchFlexArgs;
use crate::stats::quantile;

/// Uploads a batch of `lines` completions of `tokens` each and starts it; its id.
async fn start_batch(
    client: &reqwest::Client,
    base: &str,
    lines: usize,
    tokens: usize,
    seed: u64,
) -> Result<String, String> {
    let text: String = (0..lines)
        .map(|i| {
            let body = json!({"prompt": synthetic_prompt(48, 2 << 40 | (seed * 1000 + i as u64)),
                              "max_tokens": tokens, "temperature": 0, "ignore_eos": true});
            json!({"custom_id": format!("l{i}"), "method": "POST",
                   "url": "/v1/completions", "body": body})
            .to_string()
                + "\n"
        })
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(text.into_bytes()).file_name("bench.jsonl"),
        );
    let file = json_of(client.post(format!("{base}/v1/files")).multipart(form)).await?;
    let batch = json_of(client.post(format!("{base}/v1/batches")).json(
        &json!({"input_file_id": file["id"], "endpoint": "/v1/completions",
                "completion_window": "24h"}),
    ))
    .await?;
    batch["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("the batch was not created: {batch} (file: {file})"))
}

/// Samples the batch and the arbiter until the batch is done: (the batch, samples taken,
/// samples that found the miner running while the batch was not done).
async fn follow_batch(
    client: &reqwest::Client,
    base: &str,
    id: &str,
) -> Result<(Value, usize, usize), String> {
    let (mut samples, mut mining) = (0, 0);
    let t = Instant::now();
    loop {
        let b = json_of(client.get(format!("{base}/v1/batches/{id}"))).await?;
        if ["completed", "failed", "cancelled", "expired"]
            .contains(&b["status"].as_str().unwrap_or(""))
        {
            return Ok((b, samples, mining));
        }
        let s = status(client, base).await?;
        samples += 1;
        // The first samples may predate the runner's first line (status is published every
        // 100 ms); once a line has finished, the batch has the device.
        if b["request_counts"]["completed"].as_u64() > Some(0) && s["mining"]["phase"] == "mining" {
            mining += 1;
        }
        if t.elapsed() > Duration::from_secs(3600) {
            return Err(format!("the batch did not finish in an hour: {b}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(args: BenchFlexArgs) -> Result<Value, String> {
    let data = std::env::temp_dir().join(format!("idlerig-bench-flex-{}", std::process::id()));
    let mut flags: Vec<String> = ["--embedding-model", "none", "--data-dir"]
        .map(String::from)
        .into();
    flags.push(data.display().to_string());
    let (_server, base) = start_loaded(flags, args.model.as_deref()).await?;
    let client = reqwest::Client::new();
    let rounds = schedules(
        args.seed,
        args.rounds,
        args.requests,
        args.rate,
        &args.prompt_tokens,
    );
    let (mut with_batch, mut baseline) = (Vec::<StreamTiming>::new(), Vec::new());
    let (mut samples, mut mining_during, mut lines_done, mut batch_secs) = (0, 0, 0, 0.0);
    let mut resumed_after = Vec::new();
    let s0 = status(&client, &base).await?;
    for (r, plan) in rounds.iter().enumerate() {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for batch_on in order {
            if !batch_on {
                baseline.extend(run_schedule(&client, &base, plan, args.gen_tokens).await?);
                continue;
            }
            // The same arrivals and lengths with prompts of their own: a replayed prompt would
            // find its prefix cached, and the second mode of a round would look faster.
            let plan: Vec<Planned> = plan
                .iter()
                .enumerate()
                .map(|(i, p)| Planned {
                    at: p.at,
                    prompt: synthetic_prompt(p.prompt.len(), 1 << 40 | (r * 1000 + i) as u64),
                })
                .collect();
            let started = Instant::now();
            let id = start_batch(
                &client,
                &base,
                args.batch_lines,
                args.batch_tokens,
                r as u64,
            )
            .await?;
            with_batch.extend(run_schedule(&client, &base, &plan, args.gen_tokens).await?);
            let (b, n, m) = follow_batch(&client, &base, &id).await?;
            batch_secs += started.elapsed().as_secs_f64();
            if b["status"] != "completed" {
                return Err(format!("the batch did not complete: {b}"));
            }
            lines_done += b["request_counts"]["completed"].as_u64().unwrap_or(0);
            (samples, mining_during) = (samples + n, mining_during + m);
            // Then the miner gets the gaps back.
            let done = Instant::now();
            loop {
                if status(&client, &base).await?["mining"]["phase"] == "mining" {
                    resumed_after.push(done.elapsed().as_secs_f64());
                    break;
                }
                if done.elapsed() > Duration::from_secs(30) {
                    return Err("the miner did not resume after the batch".into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let s1 = status(&client, &base).await?;
    let _ = std::fs::remove_dir_all(&data);
    let ttft = |t: &[StreamTiming], p: f64| {
        let v: Vec<f64> = t.iter().map(|t| t.ttft.as_secs_f64() * 1e3).collect();
        quantile(&v, p)
    };
    let dt = |k: &str| {
        s1["mining"]["device_time_s"][k].as_f64().unwrap_or(0.0)
            - s0["mining"]["device_time_s"][k].as_f64().unwrap_or(0.0)
    };
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(json!({
        "bench": "flex",
        "requests_per_mode": with_batch.len(),
        "rate_rps": args.rate,
        "batch_lines": lines_done,
        "batch_tokens_per_line": args.batch_tokens,
        "batch_lines_per_s": r2(lines_done as f64 / batch_secs.max(1e-9)),
        "ttft_ms_p50_with_batch": r2(ttft(&with_batch, 0.5)),
        "ttft_ms_p50_baseline": r2(ttft(&baseline, 0.5)),
        "ttft_ms_p99_with_batch": r2(ttft(&with_batch, 0.99)),
        "ttft_ms_p99_baseline": r2(ttft(&baseline, 0.99)),
        "ttft_ratio_p99": r3(ttft(&with_batch, 0.99) / ttft(&baseline, 0.99)),
        "ttft_ratio_p50": r3(ttft(&with_batch, 0.5) / ttft(&baseline, 0.5)),
        "deferred_interruptions": s1["engine"]["deferred_interruptions"],
        "status_samples_during_batches": samples,
        "mining_samples_during_batches": mining_during,
        "mining_resumed_after_batch_s": resumed_after.iter().map(|&s| r3(s)).collect::<Vec<_>>(),
        "device_s": {"serving": r2(dt("serving")), "deferred": r2(dt("deferred")),
                     "mining": r2(dt("mining")), "idle": r2(dt("idle"))},
        "deferred_value": s1["telemetry"]["deferred"],
        "mining_revenue_usd_day": s1["telemetry"]["earnings"]["revenue_usd_day"],
    }))
}
