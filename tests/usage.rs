//! Usage per API key over real HTTP: named keys (`NAME:KEY` in the key file), requests and
//! tokens counted per key and day in SQLite, `/v1/usage` for admin keys only, Prometheus
//! counters by key name (never the key), a daily token quota answered with 429, and all of it
//! intact after the server restarts on the same database, with requests counted once each when
//! they come at once. A damaged database stops the start
//! with a message that says what to do.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::oneshot;

const ALICE: &str = "sk-alice-0123456789";
const OPS: &str = "sk-ops-9876543210";

const CAROL: &str = "sk-carol-5555555555";

async fn start(
    dir: &std::path::Path,
    extra: &[&str],
) -> (idlerig::server::RunningServer, String, oneshot::Sender<()>) {
    let keys = format!(
        "# name:key options\nalice:{ALICE} daily-tokens=60\nops:{OPS} admin\n\
         carol:{CAROL} daily-tokens=120\n"
    );
    serve_keys(dir, &keys, extra).await
}

/// A server with the key file `keys`, its usage database and data directory in `dir`.
async fn serve_keys(
    dir: &std::path::Path,
    keys: &str,
    extra: &[&str],
) -> (idlerig::server::RunningServer, String, oneshot::Sender<()>) {
    std::fs::write(dir.join("keys.txt"), keys).unwrap();
    let (keys, db, data) = (
        dir.join("keys.txt").display().to_string(),
        dir.join("usage.db").display().to_string(),
        dir.join("data").display().to_string(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let mut argv = vec![
        "--local-pool-port",
        "0",
        "--embedding-model",
        "none",
        "--api-key-file",
        &keys,
        "--usage-db",
        &db,
        "--data-dir",
        &data,
    ];
    argv.extend_from_slice(extra);
    let (running, base) = common::start_serve(&argv, async {
        let _ = stopped.await;
    })
    .await;
    (running, base, stop)
}

/// Uploads `text` as a batch input file with `key`: the status and the file object.
async fn upload(base: &str, key: &str, text: String) -> (u16, Value) {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(text.into_bytes()).file_name("in.jsonl"),
        );
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/files"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    (
        res.status().as_u16(),
        res.json().await.unwrap_or(Value::Null),
    )
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
    let dir = common::temp_dir("usage-test");
    let (running, base, stop) = start(&dir, &["--metrics-per-key"]).await;

    // Alice spends her 60 tokens a day in requests of ~14; the last one that fits gets its
    // `max_tokens` cut to what is left, and the request that finds too little left for its
    // prompt and one token gets 429 with OpenAI's `insufficient_quota`.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                      "ignore_eos": true});
    let (mut spent, mut answered, mut prompt) = (0u64, 0u64, 0u64);
    let refusal = loop {
        let (status, got) = call(&base, ALICE, "POST", "/v1/completions", Some(body.clone())).await;
        if status != 200 {
            break (status, got);
        }
        spent += got["usage"]["total_tokens"].as_u64().unwrap();
        prompt = got["usage"]["prompt_tokens"].as_u64().unwrap();
        answered += 1;
        assert!(answered < 20, "the quota never took hold");
    };
    assert!(spent <= 60, "never past the quota ({spent} tokens)");
    assert!(
        60 - spent < prompt + 1,
        "refused only once too little was left for a prompt of {prompt} ({spent} spent)"
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

    // 16 requests at once, each asking for 60 tokens, on Carol's 120 a day: each reserves
    // what it may spend when it is admitted, so together they spend at most 120 (they used
    // to spend 16 × ~66, all admitted while nothing was yet counted).
    let greedy = json!({"prompt": "The capital of France is", "max_tokens": 60,
                        "temperature": 0, "ignore_eos": true});
    let calls = (0..16).map(|_| {
        call(
            &base,
            CAROL,
            "POST",
            "/v1/completions",
            Some(greedy.clone()),
        )
    });
    let answers = futures::future::join_all(calls).await;
    let mut carol_spent = 0;
    for (status, got) in &answers {
        match status {
            200 => carol_spent += got["usage"]["total_tokens"].as_u64().unwrap(),
            429 => assert_eq!(got["error"]["code"], "insufficient_quota", "{got}"),
            other => panic!("{other}: {got}"),
        }
    }
    assert!(
        carol_spent <= 120,
        "16 requests at once spent {carol_spent} of 120"
    );
    assert!(answers.iter().any(|(s, _)| *s == 200) && answers.iter().any(|(s, _)| *s == 429));
    let (_, now) = call(&base, OPS, "GET", "/v1/usage", None).await;
    assert_eq!(
        usage_of(&now, "carol").1,
        carol_spent,
        "what was answered is what was counted"
    );

    // Prometheus counts by name (published with --metrics-per-key) and never shows a key.
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
    // Without --metrics-per-key (or --metrics-require-key) an open /metrics publishes no
    // per-key series: who uses the server, and how much, is for admin keys (/v1/usage).
    stop.send(()).unwrap();
    running.task.await.unwrap().unwrap();
    let (running, base, stop) = start(&dir, &[]).await;
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vllm:"), "{metrics}");
    assert!(
        !metrics.contains("idlerig_api_key_"),
        "per-key series on an open /metrics"
    );
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

/// Two unnamed keys; A uploads a file and spends tokens. A's line is then removed from the key
/// file and the server restarted on the same database and data directory: B must not see A's
/// file, read it, or inherit A's usage. (Unnamed keys used to be named by their line, so B
/// became `key-1`, A's name, and got all of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_unnamed_key_hands_nothing_of_it_to_another() {
    const A: &str = "sk-unnamed-aaaaaaaaaaaa";
    const B: &str = "sk-unnamed-bbbbbbbbbbbb";
    let dir = common::temp_dir("unnamed-keys");
    let line = r#"{"custom_id": "1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 2}}"#;
    let (running, base, stop) = serve_keys(&dir, &format!("{A}\n{B}\n"), &[]).await;
    let (status, file) = upload(&base, A, line.to_string()).await;
    assert_eq!(status, 200, "{file}");
    let file_id = file["id"].as_str().unwrap().to_string();
    let body = json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0});
    assert_eq!(
        call(&base, A, "POST", "/v1/completions", Some(body))
            .await
            .0,
        200
    );
    let (_, listed) = call(&base, B, "GET", "/v1/files", None).await;
    assert_eq!(
        listed["data"].as_array().unwrap().len(),
        0,
        "B never saw A's file"
    );
    stop.send(()).unwrap();
    running.task.await.unwrap().unwrap();

    // A's line is gone; B is the only key, on its own line 1.
    let (running, base, stop) = serve_keys(&dir, &format!("{B}\n"), &[]).await;
    let (status, listed) = call(&base, B, "GET", "/v1/files", None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["data"].as_array().unwrap().len(),
        0,
        "B sees none of A's files: {listed}"
    );
    let (status, got) = call(&base, B, "GET", &format!("/v1/files/{file_id}"), None).await;
    assert_eq!(status, 404, "B cannot read A's file: {got}");
    let (status, _) = call(&base, A, "GET", "/v1/files", None).await;
    assert_eq!(status, 401, "A's key is gone");
    stop.send(()).unwrap();
    running.task.await.unwrap().unwrap();
    // A's usage stays A's: the database has a row for A's name (waited for: its writer is a
    // thread of its own), none for B.
    let (a_name, b_name) = (
        idlerig::api::unnamed_key_name(A),
        idlerig::api::unnamed_key_name(B),
    );
    let names = common::poll_until(Duration::from_secs(30), "A's usage row", || async {
        let conn = rusqlite::Connection::open(dir.join("usage.db")).unwrap();
        let names: Vec<String> = conn
            .prepare("SELECT DISTINCT key FROM usage")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        names.contains(&a_name).then_some(names)
    })
    .await;
    assert!(
        names.contains(&a_name) && !names.contains(&b_name),
        "{names:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A batch's lines are held to their owner's quota as requests are: 16 lines asking for 60
/// tokens each on a 120-token day spend at most 120, and the lines that find nothing left fail
/// with `insufficient_quota` (never retried and charged again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_s_lines_spend_at_most_the_quota() {
    const DAN: &str = "sk-dan-quota-7777777";
    const ADMIN: &str = "sk-admin-quota-88888";
    let dir = common::temp_dir("batch-quota");
    let keys = format!("dan:{DAN} daily-tokens=120\nadmin:{ADMIN} admin\n");
    let (running, base, stop) = serve_keys(&dir, &keys, &[]).await;
    let lines: String = (0..16)
        .map(|i| {
            json!({"custom_id": format!("l{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"prompt": "The capital of France is", "max_tokens": 60,
                            "temperature": 0, "ignore_eos": true}})
            .to_string()
                + "\n"
        })
        .collect();
    let http = reqwest::Client::new();
    let (_, file) = upload(&base, DAN, lines).await;
    let batch: Value = http
        .post(format!("{base}/v1/batches"))
        .bearer_auth(DAN)
        .json(
            &json!({"input_file_id": file["id"], "endpoint": "/v1/completions",
                      "completion_window": "24h"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = batch["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{batch}"))
        .to_string();
    let done = common::poll_until(
        Duration::from_secs(300),
        "the batch to complete",
        || async {
            let (_, b) = call(&base, DAN, "GET", &format!("/v1/batches/{id}"), None).await;
            (b["status"] == "completed").then_some(b)
        },
    )
    .await;
    let counts = &done["request_counts"];
    assert_eq!(counts["total"], 16, "{done}");
    assert!(counts["failed"].as_u64().unwrap() >= 1, "{done}");
    let (_, usage) = call(&base, ADMIN, "GET", "/v1/usage", None).await;
    let row = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "dan")
        .unwrap_or_else(|| panic!("{usage}"))
        .clone();
    let spent = row["prompt_tokens"].as_u64().unwrap() + row["completion_tokens"].as_u64().unwrap();
    assert!(spent <= 120, "the batch spent {spent} of 120: {row}");
    assert_eq!(
        row["requests"].as_u64().unwrap(),
        counts["completed"].as_u64().unwrap(),
        "only the lines that ran were counted, once each"
    );
    let errors = http
        .get(format!(
            "{base}/v1/files/{}/content",
            done["error_file_id"].as_str().unwrap()
        ))
        .bearer_auth(DAN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(errors.contains("insufficient_quota"), "{errors}");
    stop.send(()).unwrap();
    running.task.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// A client that leaves mid-stream is charged for the tokens it was sent, not only for its
/// prompt (a choice cut short used to count none: stream a long answer, disconnect before the
/// end, and pay nothing for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_pays_for_what_it_was_sent() {
    let dir = common::temp_dir("usage-leave");
    let (running, base, stop) = start(&dir, &[]).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    let mut res = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(OPS)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Read until 10 tokens' events have come, then leave.
    let mut text = String::new();
    while text.matches("data: {").count() < 10 {
        let chunk = res.chunk().await.unwrap().expect("the stream goes on");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(res);
    let completion = common::poll_until(
        Duration::from_secs(60),
        "the request to be counted",
        || async {
            let (_, usage) = call(&base, OPS, "GET", "/v1/usage", None).await;
            let row = usage["data"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["key"] == "ops").cloned())?;
            row["completion_tokens"].as_u64()
        },
    )
    .await;
    assert!(
        (5..400).contains(&completion),
        "charged {completion} completion tokens for a stream left after 10"
    );
    stop.send(()).unwrap();
    running.task.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
