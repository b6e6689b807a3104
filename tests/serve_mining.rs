//! `idlerig serve` with the miner, end to end: the real model, the embedded pool, a miner and
//! the arbiter in one process. Shares are accepted while the server is idle, no hash is counted
//! while a streaming request runs, and mining resumes after it. It runs twice: with the CPU
//! miner, and with the GPU miner on the CPU stand-in launcher (`--mine-device cpu-grid`, the
//! CUDA kernel's source on CPU threads), which is the GPU serve path less the driver calls.

use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use idlerig::config::{Cli, Command};
use serde_json::{json, Value};

mod common;

async fn status(client: &reqwest::Client, base: &str) -> Value {
    common::get_json(client, &format!("{base}/v1/status")).await
}

async fn wait_for(
    client: &reqwest::Client,
    base: &str,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let s = status(client, base).await;
        if cond(&s) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cpu_miner_mines_while_idle_stops_while_serving_and_resumes() {
    mines_while_idle_stops_while_serving_and_resumes(&["--mine-threads", "2"], "cpu").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_miner_on_the_stand_in_mines_while_idle_stops_while_serving_and_resumes() {
    mines_while_idle_stops_while_serving_and_resumes(&["--mine-device", "cpu-grid"], "cpu-grid")
        .await;
}

async fn mines_while_idle_stops_while_serving_and_resumes(miner_args: &[&str], backend: &str) {
    let mut argv = vec![
        "idlerig",
        "serve",
        "--local-pool-port",
        "0",
        // Long enough that the look just after the stream ends is surely inside it, on a
        // busy machine too.
        "--idle-grace-ms",
        "3000",
    ];
    argv.extend_from_slice(miner_args);
    let cli = Cli::parse_from(argv);
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(idlerig::server::serve(
        args,
        listener,
        std::future::pending(),
    ));
    let client = reqwest::Client::new();

    let s = wait_for(&client, &base, "shares while idle", |s| {
        s["mining"]["shares_accepted"].as_u64() >= Some(2)
    })
    .await;
    // The code that hashes is named: on the CPU, the SHA-256d path measured fastest at
    // start-up, with the rate of every path this CPU has.
    let kernel = &s["mining"]["kernel"];
    if backend == "cpu" {
        let names = ["sha-ni", "avx512", "avx2", "portable"];
        assert!(
            names.contains(&kernel["name"].as_str().unwrap_or("")),
            "{kernel}"
        );
        assert_eq!(kernel["chosen_by"], "measured", "{kernel}");
        let rates = kernel["rates_mhs"].as_array().expect("rates");
        assert!(rates.iter().any(|r| r[0] == kernel["name"]), "{kernel}");
    } else {
        assert_eq!(kernel["name"], backend, "{kernel}");
    }
    assert_eq!(
        s["mining"]["pool_pays"], false,
        "the embedded pool is labelled as paying nothing"
    );
    assert_eq!(s["mining"]["shares_rejected"], 0);
    assert_eq!(s["mining"]["backend"], backend);

    // A streaming request: the miner must stop and stay stopped until it ends.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "stream": true, "ignore_eos": true});
    let res = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = res.bytes_stream();
    stream.next().await.unwrap().unwrap();
    // The status is published every 100 ms: wait for a snapshot taken after the pre-emption.
    let during = wait_for(&client, &base, "the pre-emption", |s| {
        s["mining"]["phase"] == "not_mining" && s["mining"]["preemptions"].as_u64() >= Some(1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let hashes_during = status(&client, &base).await["mining"]["hashes"]
        .as_u64()
        .unwrap();
    let mut chunks = 1;
    while let Some(c) = stream.next().await {
        c.unwrap();
        chunks += 1;
    }
    assert!(chunks > 10, "the stream ran ({chunks} chunks)");
    let after = status(&client, &base).await;
    assert_eq!(
        after["mining"]["hashes"].as_u64().unwrap(),
        hashes_during,
        "no hash was counted while the request ran"
    );
    assert_eq!(
        after["mining"]["phase"], "not_mining",
        "still inside the 3 s grace period"
    );

    // After the grace period, mining resumes and more shares are accepted.
    let accepted = after["mining"]["shares_accepted"].as_u64().unwrap();
    let resumed = wait_for(&client, &base, "mining to resume", |s| {
        s["mining"]["phase"] == "mining" && s["mining"]["hashes"].as_u64() > Some(hashes_during)
    })
    .await;
    wait_for(&client, &base, "shares after resuming", |s| {
        s["mining"]["shares_accepted"].as_u64() > Some(accepted)
    })
    .await;
    let t = &resumed["mining"]["device_time_s"];
    assert!(
        t["serving"].as_f64().unwrap() > 0.0 && t["mining"].as_f64().unwrap() > 0.0,
        "{t}"
    );
    eprintln!(
        "pre-emption: {} µs (p50 of {} so far); device time {t}",
        during["mining"]["preempt_us_p50"], during["mining"]["preemptions"]
    );
}
