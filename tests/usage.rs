//! Usage per API key over real HTTP: named keys (`NAME:KEY` in the key file), requests and
//! tokens counted per key and day in SQLite, `/v1/usage` for admin keys only, Prometheus
//! counters by key name (never the key), a daily token quota answered with 429, and all of it
//! intact after the server restarts on the same database, with requests counted once each when
//! they come at once. A damaged database stops the start
//! with a message that says what to do.

mod common;

use serde_json::{json, Value};
use tokio::sync::oneshot;

const ALICE: &str = "sk-alice-0123456789";
const OPS: &str = "sk-ops-9876543210";

async fn start(
    dir: &std::path::Path,
) -> (idlerig::server::RunningServer, String, oneshot::Sender<()>) {
    let keys = dir.join("keys.txt");
    std::fs::write(
        &keys,
        format!("# name:key options\nalice:{ALICE} daily-tokens=60\nops:{OPS} admin\n"),
    )
    .unwrap();
    let (db, keys) = (
        dir.join("usage.db").display().to_string(),
        keys.display().to_string(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let argv = [
        "--local-pool-port",
        "0",
        "--embedding-model",
        "none",
        "--api-key-file",
        &keys,
        "--usage-db",
        &db,
    ];
    let (running, base) = common::start_serve(&argv, async {
        let _ = stopped.await;
    })
    .await;
    (running, base, stop)
}

async fn call(
    base: &str,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let http = reqwest::Client::new();
    let url = format!("{base}{path}");
    let req = match body {
        Some(b) => http.post(url).json(&b),
        None if method == "GET" => http.get(url),
        None => unreachable!(),
    };
    let res = req.bearer_auth(key).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_counted_per_key_kept_across_a_restart_and_held_to_the_quota() {
    let dir = std::env::temp_dir().join(format!("idlerig-usage-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (running, base, stop) = start(&dir).await;

    // Alice spends her 60 tokens a day in requests of ~12; the request that finds them spent
    // gets 429 with OpenAI's `insufficient_quota`.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                      "ignore_eos": true});
    let (mut spent, mut answered) = (0u64, 0u64);
    let refusal = loop {
        let (status, got) = call(&base, ALICE, "POST", "/v1/completions", Some(body.clone())).await;
        if status != 200 {
            break (status, got);
        }
        spent += got["usage"]["total_tokens"].as_u64().unwrap();
        answered += 1;
        assert!(answered < 20, "the quota never took hold");
    };
    assert!(
        spent >= 60,
        "refused only once the quota was used ({spent} tokens)"
    );
    assert_eq!(refusal.0, 429, "{}", refusal.1);
    assert_eq!(refusal.1["error"]["code"], "insufficient_quota");
    let message = refusal.1["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("alice") && message.contains("00:00 UTC"),
        "{message}"
    );
    // The admin key is not held to Alice's quota.
    let (status, _) = call(&base, OPS, "POST", "/v1/completions", Some(body.clone())).await;
    assert_eq!(status, 200);

    // Only an admin key reads /v1/usage; rows are by key name.
    let (status, got) = call(&base, ALICE, "GET", "/v1/usage", None).await;
    assert_eq!(status, 403, "{got}");
    let usage_of = |v: &Value, key: &str| -> (u64, u64) {
        let row = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("no row for {key}: {v}"))
            .clone();
        (
            row["requests"].as_u64().unwrap(),
            row["prompt_tokens"].as_u64().unwrap() + row["completion_tokens"].as_u64().unwrap(),
        )
    };
    let (status, before) = call(&base, OPS, "GET", "/v1/usage", None).await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(usage_of(&before, "alice"), (answered, spent));
    assert_eq!(usage_of(&before, "ops").0, 1);
    let (status, got) = call(&base, OPS, "GET", "/v1/usage?start_date=yesterday", None).await;
    assert_eq!(
        (status, got["error"]["param"].as_str()),
        (400, Some("start_date"))
    );

    // Prometheus counts by name and never shows a key.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!("idlerig_api_key_requests_total{{key=\"alice\"}} {answered}");
    assert!(metrics.contains(&line), "{line} not in /metrics");
    assert!(!metrics.contains(ALICE) && !metrics.contains(OPS));

    // Restart on the same database: the totals, and Alice's spent quota, are still there.
    stop.send(()).unwrap();
    running.task.await.unwrap().unwrap();
    let (running, base, stop) = start(&dir).await;
    let (status, after) = call(&base, OPS, "GET", "/v1/usage", None).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(usage_of(&after, "alice"), usage_of(&before, "alice"));
    let (status, _) = call(&base, ALICE, "POST", "/v1/completions", Some(body.clone())).await;
    assert_eq!(status, 429, "the quota holds across the restart");
    // Requests at once: each is counted once, none lost.
    let calls = (0..6).map(|_| call(&base, OPS, "POST", "/v1/completions", Some(body.clone())));
    let answers = futures::future::join_all(calls).await;
    let tokens: u64 = answers
        .iter()
        .map(|(status, got)| {
            assert_eq!(*status, 200, "{got}");
            got["usage"]["total_tokens"].as_u64().unwrap()
        })
        .sum();
    let (_, now) = call(&base, OPS, "GET", "/v1/usage", None).await;
    let (requests, used) = usage_of(&now, "ops");
    let (requests_before, used_before) = usage_of(&after, "ops");
    assert_eq!(
        (requests, used),
        (requests_before + 6, used_before + tokens)
    );
    stop.send(()).unwrap();
    running.task.await.unwrap().unwrap();

    // A damaged database: the server does not start, and says why and what to do.
    std::fs::write(dir.join("usage.db"), b"garbage, not SQLite ".repeat(500)).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("usage.db{suffix}")));
    }
    let argv = [
        "idlerig",
        "serve",
        "--local-pool-port",
        "0",
        "--api-key",
        "x:sk-x",
        "--usage-db",
        &dir.join("usage.db").display().to_string(),
    ]
    .map(String::from);
    use clap::Parser;
    let idlerig::config::Command::Serve(args) = idlerig::config::Cli::parse_from(argv).command
    else {
        unreachable!()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = idlerig::server::start(args, listener, std::future::pending())
        .await
        .err()
        .expect("a damaged usage database stops the start")
        .to_string();
    assert!(
        err.contains("usage.db") && err.contains("move it aside"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
