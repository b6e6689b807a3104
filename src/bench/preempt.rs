//! `idlerig bench preempt`: what mining costs the API's users. It starts the real server
//! (model, engine, embedded pool, CPU miner, arbiter) in-process, measures its hashrate while
//! idle against the miner alone, then replays one open-loop request schedule (Poisson
//! arrivals, mixed prompt lengths) round by round, once with mining on and once with it off,
//! the order alternating, so the comparison holds on a noisy machine.

use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::infer::{synthetic_prompt, timed_stream, StreamTiming};
use crate::config::{BenchPreemptArgs, Cli, Command};
use crate::stats::quantile;

pub(super) struct Planned {
    pub at: Duration,
    pub prompt: Vec<u32>,
}

/// Open-loop schedules: `rounds` of about `requests / rounds` Poisson arrivals at `rate` per
/// second, each prompt of a length drawn from `lengths`.
pub(super) fn schedules(
    seed: u64,
    rounds: usize,
    requests: usize,
    rate: f64,
    lengths: &[usize],
) -> Vec<Vec<Planned>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let per_round = requests.div_ceil(rounds.max(1)).max(1);
    (0..rounds.max(1))
        .map(|r| {
            let mut at = Duration::ZERO;
            (0..per_round)
                .map(|i| {
                    at += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / rate);
                    let len = lengths[rng.random_range(0..lengths.len())];
                    Planned {
                        at,
                        prompt: synthetic_prompt(len, (r * per_round + i) as u64),
                    }
                })
                .collect()
        })
        .collect()
}

/// Sends `req` and reads the answer as JSON.
pub(super) async fn json_of(req: reqwest::RequestBuilder) -> Result<Value, String> {
    let res = req.send().await.map_err(|e| e.to_string())?;
    res.json().await.map_err(|e| e.to_string())
}

pub(super) async fn status(client: &reqwest::Client, base: &str) -> Result<Value, String> {
    json_of(client.get(format!("{base}/v1/status"))).await
}

/// `idlerig serve --local-pool-port 0` with `flags`, in-process on a loopback port: the
/// running server and its base URL.
pub(super) async fn start_server(
    flags: Vec<String>,
) -> Result<(crate::server::RunningServer, String), String> {
    let mut argv: Vec<String> = ["idlerig", "serve", "--local-pool-port", "0"]
        .map(String::from)
        .into();
    argv.extend(flags);
    let Command::Serve(serve_args) = Cli::parse_from(argv).command else {
        unreachable!("parsed a serve command")
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let server = crate::server::start(serve_args, listener, std::future::pending())
        .await
        .map_err(|e| e.to_string())?;
    let base = format!("http://{}", server.addr);
    Ok((server, base))
}

/// [`start_server`] with `flags` and `--model MODEL` when given, once its model has loaded.
pub(super) async fn start_loaded(
    mut flags: Vec<String>,
    model: Option<&std::path::Path>,
) -> Result<(crate::server::RunningServer, String), String> {
    if let Some(m) = model {
        flags.extend(["--model".into(), m.display().to_string()]);
    }
    let (server, base) = start_server(flags).await?;
    let client = reqwest::Client::new();
    let ready = Instant::now();
    while !status(&client, &base).await?["engine"].is_object() {
        if ready.elapsed() > Duration::from_secs(120) {
            return Err("the model did not load".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((server, base))
}

pub(super) async fn run_schedule(
    client: &reqwest::Client,
    base: &str,
    plan: &[Planned],
    gen: usize,
) -> Result<Vec<StreamTiming>, String> {
    let start = Instant::now();
    let tasks: Vec<_> = plan
        .iter()
        .map(|p| {
            let (client, base, prompt, at) =
                (client.clone(), base.to_string(), p.prompt.clone(), p.at);
            tokio::spawn(async move {
                tokio::time::sleep_until((start + at).into()).await;
                timed_stream(&client, &base, &prompt, gen).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

fn decode_rates(t: &[StreamTiming]) -> Vec<f64> {
    t.iter()
        .filter(|t| t.tokens > 1)
        .map(|t| (t.tokens - 1) as f64 / (t.total - t.ttft).as_secs_f64())
        .collect()
}

pub async fn run(args: BenchPreemptArgs) -> Result<Value, String> {
    // As `serve` does: every core but one.
    let threads = args
        .mine_threads
        .unwrap_or_else(|| crate::server::default_threads().saturating_sub(1).max(1));
    let on_gpu = args.device != "cpu";
    // The CPU miner alone, as the yardstick for the server's idle hashrate (on a GPU the
    // idle hashrate is reported without one).
    let reference = if on_gpu {
        f64::NAN
    } else {
        tokio::task::spawn_blocking(move || super::mine::cpu_hashrate(threads, 3.0))
            .await
            .map_err(|e| e.to_string())?
    };

    let mut argv: Vec<String> = Vec::new();
    argv.extend([
        "--idle-grace-ms".into(),
        args.idle_grace_ms.to_string(),
        "--mine-threads".into(),
        threads.to_string(),
        // `--mine-device auto`: the GPU miner when serving on CUDA.
        "--device".into(),
        args.device.clone(),
    ]);
    if let Some(m) = &args.model {
        argv.extend(["--model".into(), m.display().to_string()]);
    }
    let (server, base) = start_server(argv).await?;
    let switch = server.mining_switch.clone().ok_or("mining did not start")?;
    let miner = server.miner.clone().ok_or("mining did not start")?;
    let client = reqwest::Client::new();
    let ready = Instant::now();
    loop {
        let s = status(&client, &base).await?;
        if s["engine"].is_object() && s["mining"]["phase"] == "mining" {
            break;
        }
        if ready.elapsed() > Duration::from_secs(60) {
            return Err(format!("server not ready: {s}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    timed_stream(&client, &base, &synthetic_prompt(32, u64::MAX), 4).await?; // warm-up
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Idle: how much of the time is mined, and at what rate.
    let s0 = status(&client, &base).await?;
    let (h0, t0) = (miner.hashes(), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(args.idle_seconds)).await;
    let (h1, t1) = (miner.hashes(), Instant::now());
    tokio::time::sleep(Duration::from_millis(150)).await; // next status snapshot
    let s1 = status(&client, &base).await?;
    let idle_rate = (h1 - h0) as f64 / (t1 - t0).as_secs_f64();
    let dt = |k: &str| {
        s1["mining"]["device_time_s"][k].as_f64().unwrap_or(0.0)
            - s0["mining"]["device_time_s"][k].as_f64().unwrap_or(0.0)
    };
    let mining_share = dt("mining") / (dt("mining") + dt("idle") + dt("preempting")).max(1e-9);

    // One schedule, replayed with mining on and off, round by round.
    let rounds = schedules(
        args.seed,
        args.rounds,
        args.requests,
        args.rate,
        &args.prompt_tokens,
    );
    let (mut with_mining, mut baseline) = (Vec::new(), Vec::new());
    for (r, plan) in rounds.iter().enumerate() {
        for mining_on in if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let _ = switch.send(mining_on);
            tokio::time::sleep(Duration::from_millis(args.idle_grace_ms + 300)).await;
            let timings = run_schedule(&client, &base, plan, args.gen_tokens).await?;
            if mining_on {
                with_mining.extend(timings)
            } else {
                baseline.extend(timings)
            }
        }
    }
    let _ = switch.send(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let end = status(&client, &base).await?;
    let ttft = |t: &[StreamTiming]| {
        t.iter()
            .map(|t| t.ttft.as_secs_f64() * 1e3)
            .collect::<Vec<_>>()
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (ttft_m, ttft_b) = (
        quantile(&ttft(&with_mining), 0.99),
        quantile(&ttft(&baseline), 0.99),
    );
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(json!({
        "bench": "preempt",
        "device": args.device,
        "miner": end["mining"]["backend"],
        "mine_threads": (!on_gpu).then_some(threads),
        "requests_per_mode": with_mining.len(),
        "rate_rps": args.rate,
        "preemptions": end["mining"]["preemptions"],
        // What the figures below measure: the GPU's pre-emption latency, or the CPU miner's
        // stop, which inference does not wait for (TTFT's ratio is the harm to inference).
        "preempt_measures": end["mining"]["preempt_measures"],
        "preempt_us_p50": end["mining"]["preempt_us_p50"],
        "preempt_us_p99": end["mining"]["preempt_us_p99"],
        "preempt_us_max": end["mining"]["preempt_us_max"],
        "ttft_ms_p99_mining": r2(ttft_m),
        "ttft_ms_p99_baseline": r2(ttft_b),
        "ttft_ratio_p99": r3(ttft_m / ttft_b),
        "tok_s_mining": r2(mean(&decode_rates(&with_mining))),
        "tok_s_baseline": r2(mean(&decode_rates(&baseline))),
        "tok_s_ratio": r3(mean(&decode_rates(&with_mining)) / mean(&decode_rates(&baseline))),
        "idle_hashrate_hs": idle_rate.round(),
        "ref_miner_alone_hs": reference.round(),
        "idle_hashrate_ratio": r3(idle_rate / reference),
        "mining_share_of_idle": r3(mining_share),
    }))
}
