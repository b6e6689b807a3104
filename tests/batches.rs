//! The Files and Batches API and the flex tier over real HTTP with the default model: every
//! line of a batch answered as the same request sent interactively, bad lines in the error file,
//! cancelling, flex requests that wait for interactive work (and 429 when their queue is full),
//! mining that resumes only once the batch is done, and a batch that survives `kill -9` between
//! lines with no line lost or run twice. What the API refuses is in `batch_limits.rs`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::batch::*;
use common::temp_dir;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_every_line_as_the_same_request_would_and_bad_lines_go_to_the_error_file() {
    let dir = temp_dir("batch-answers");
    let (base, _stop) = start(&dir, &["--no-mine"]).await;
    let c = Client::new(&base, None);
    let mut lines: Vec<Value> = [
        "What is 2+2?",
        "Name a colour.",
        "Say hello.",
        "Count to five.",
    ]
    .iter()
    .enumerate()
    .map(|(i, q)| chat_line(&format!("q{i}"), q, 12))
    .collect();
    let mut hot = chat_line("too-hot", "x", 4);
    hot["body"]["temperature"] = json!(9);
    let mut elsewhere = chat_line("no-such-model", "x", 4);
    elsewhere["body"]["model"] = json!("gpt-9");
    lines.insert(1, hot);
    lines.push(elsewhere);
    let batch = c.batch(&lines, CHAT).await;
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["request_counts"]["total"], 6);
    assert_eq!(batch["metadata"]["job"], "test");

    let done = c
        .wait(
            batch["id"].as_str().unwrap(),
            "the batch completes",
            finished,
        )
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 6, "completed": 4, "failed": 2})
    );
    assert!(done["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(done["usage"]["output_tokens"], 4 * 12, "{done}");
    for at in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[at].as_u64().is_some(), "{at}: {done}");
    }

    let results = c.results(&done).await;
    assert_eq!(results.len(), 6);
    for line in &lines {
        let id = line["custom_id"].as_str().unwrap();
        let got: Vec<&Value> = results.iter().filter(|r| r["custom_id"] == id).collect();
        assert_eq!(got.len(), 1, "{id} once: {results:?}");
        let response = &got[0]["response"];
        match id {
            "too-hot" => {
                assert_eq!(response["status_code"], 400);
                assert_eq!(response["body"]["error"]["param"], "temperature");
            }
            "no-such-model" => {
                assert_eq!(response["status_code"], 404);
                assert_eq!(response["body"]["error"]["code"], "model_not_found");
            }
            _ => {
                assert_eq!(response["status_code"], 200);
                assert_eq!(response["body"]["service_tier"], "flex");
                assert!(response["request_id"].as_str().unwrap().starts_with("req-"));
                // The same body, sent interactively, says the same (greedy decoding).
                let (status, direct) = c.post(CHAT, line["body"].clone()).await;
                assert_eq!(status, 200);
                assert_eq!(direct["service_tier"], "default");
                assert_eq!(answer_text(&response["body"]), answer_text(&direct), "{id}");
            }
        }
    }
    // The output file keeps the input's order.
    let output = c.content(done["output_file_id"].as_str().unwrap()).await;
    let order: Vec<String> = output
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].to_string())
        .collect();
    assert_eq!(order, [r#""q0""#, r#""q1""#, r#""q2""#, r#""q3""#]);

    let (_, listed) = c.get("/v1/batches?limit=5").await;
    assert_eq!(listed["data"][0]["id"], done["id"]);
    assert_eq!(listed["has_more"], false);
    let (_, outputs) = c.get("/v1/files?purpose=batch_output").await;
    assert_eq!(outputs["data"].as_array().unwrap().len(), 2, "{outputs}");
    let (status, _) = c
        .get(&format!(
            "/v1/files/{}",
            done["output_file_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_keeps_what_finished_and_lists_every_other_line_as_cancelled() {
    let dir = temp_dir("batch-cancel");
    let (base, _stop) = start(&dir, &["--no-mine", "--batch-concurrency", "1"]).await;
    let c = Client::new(&base, None);
    let lines: Vec<Value> = (0..6)
        .map(|i| chat_line(&format!("l{i}"), "Tell a story.", 48))
        .collect();
    let batch = c.batch(&lines, CHAT).await;
    let id = batch["id"].as_str().unwrap();
    let (status, cancelling) = c.post(&format!("/v1/batches/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200, "{cancelling}");
    assert!(["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap()));
    let done = c.wait(id, "the batch is cancelled", finished).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["cancelled_at"].as_u64().is_some());
    let results = c.results(&done).await;
    assert_eq!(results.len(), 6, "every line once: {results:?}");
    let ran = results
        .iter()
        .filter(|r| r["response"]["status_code"] == 200)
        .count();
    let unrun = results
        .iter()
        .filter(|r| r["error"]["code"] == "batch_cancelled" && r["response"].is_null())
        .count();
    assert_eq!(ran + unrun, 6, "{results:?}");
    assert_eq!(done["request_counts"]["completed"], ran as u64);
    for i in 0..6 {
        let id = format!("l{i}");
        assert_eq!(
            results
                .iter()
                .filter(|r| r["custom_id"] == id.as_str())
                .count(),
            1
        );
    }
    let (status, e) = c.post(&format!("/v1/batches/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200, "cancelling twice is harmless: {e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flex_requests_wait_for_interactive_work_and_a_full_flex_queue_answers_429() {
    let dir = temp_dir("flex");
    // With no guaranteed share, deferred work runs only in the gaps.
    let (base, _stop) = start(
        &dir,
        &[
            "--no-mine",
            "--max-running",
            "1",
            "--deferred-queue",
            "1",
            "--deferred-min-share",
            "0",
        ],
    )
    .await;
    let c = Client::new(&base, None);
    let (status, e) = c
        .post(
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "service_tier": "turbo"}),
        )
        .await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("service_tier")),
        "{e}"
    );

    // An interactive stream holds the device; it is read until its first token is out.
    let stream = common::endless_stream(&base, None).await;

    let flex_body = json!({"messages": [{"role": "user", "content": "Say yes."}],
                           "max_tokens": 4, "service_tier": "flex"});
    let (b2, body) = (base.clone(), flex_body.clone());
    let waiting = tokio::spawn(async move {
        common::post_json(&reqwest::Client::new(), &format!("{b2}{CHAT}"), &body).await
    });
    // It waits in the flex queue: it cannot run beside the interactive stream.
    let t = Instant::now();
    loop {
        let (_, s) = c.get("/v1/status").await;
        if s["engine"]["waiting_by_tier"]["flex"] == 1 {
            assert_eq!(s["engine"]["running_by_tier"]["default"], 1, "{s}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the flex request never queued: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, e) = c.post(CHAT, flex_body.clone()).await;
    assert_eq!(status, 429, "{e}");
    assert_eq!(e["error"]["code"], "resource_unavailable");
    assert!(
        !waiting.is_finished(),
        "flex work never runs beside interactive work"
    );

    drop(stream); // the interactive request ends; the flex one runs
    let (status, answer) = waiting.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["service_tier"], "flex");
    let mut streamed = flex_body.clone();
    streamed["stream"] = json!(true);
    let res = reqwest::Client::new()
        .post(format!("{base}{CHAT}"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = res.text().await.unwrap();
    assert!(events.contains(r#""service_tier":"flex""#), "{events}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With its guaranteed share (the default), a flex request finishes while an interactive
/// stream that never ends holds the engine; with none (above) it waits for the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flex_request_finishes_beside_interactive_work_with_its_share() {
    let dir = temp_dir("flex-share");
    let (base, _stop) = start(&dir, &["--no-mine", "--max-running", "1"]).await;
    let c = Client::new(&base, None);
    let stream = common::endless_stream(&base, None).await;
    let (status, answer) = c
        .post(
            CHAT,
            json!({"messages": [{"role": "user", "content": "Say yes."}],
                   "max_tokens": 4, "ignore_eos": true, "service_tier": "flex"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
    let (_, s) = c.get("/v1/status").await;
    assert_eq!(
        s["engine"]["running_by_tier"]["default"], 1,
        "the interactive stream still runs: {s}"
    );
    assert!(
        s["engine"]["deferred_owed_steps"].as_u64() >= Some(4),
        "{s}"
    );
    drop(stream);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_miner_gets_the_device_only_once_the_batch_is_done() {
    let dir = temp_dir("batch-mining");
    // A long grace period: the short gaps between batch lines never let the miner in.
    let (base, _stop) = start(
        &dir,
        &[
            "--mine-threads",
            "1",
            "--idle-grace-ms",
            "1500",
            "--batch-concurrency",
            "2",
        ],
    )
    .await;
    let c = Client::new(&base, None);
    let phase = || async { c.get("/v1/status").await.1 };
    let wait_mining = |what: &'static str| async move {
        let t = Instant::now();
        loop {
            let s = phase().await;
            if s["mining"]["phase"] == "mining" {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{what}: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_mining("the idle server mines").await;
    let lines: Vec<Value> = (0..8)
        .map(|i| chat_line(&format!("m{i}"), "Tell a story.", 40))
        .collect();
    let batch = c.batch(&lines, CHAT).await;
    let id = batch["id"].as_str().unwrap();
    c.wait(id, "a first line finishes", |b| {
        b["request_counts"]["completed"].as_u64() > Some(0) || finished(b)
    })
    .await;
    let (mut samples, t) = (0, Instant::now());
    loop {
        let (s, (_, b)) = (phase().await, c.get(&format!("/v1/batches/{id}")).await);
        if finished(&b) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the batch never finished: {b}"
        );
        assert_ne!(
            s["mining"]["phase"], "mining",
            "mining while the batch runs: {s} {b}"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = wait_mining("mining resumes after the batch").await;
    assert!(
        s["mining"]["device_time_s"]["deferred"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    assert!(
        s["telemetry"]["deferred"]["tokens"].as_u64().unwrap() > 0,
        "{s}"
    );
    assert!(samples > 0, "the batch ran too briefly to be watched");
    eprintln!("{samples} samples while the batch ran, none mining");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The binary on `data` and a port of its own choosing, logging JSON to `log`.
fn spawn_server(data: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_idlerig"))
        .args([
            "serve",
            "--port",
            "0",
            "--local-pool-port",
            "0",
            "--no-mine",
        ])
        .args(["--embedding-model", "none", "--log-format", "json"])
        .args(["--batch-concurrency", "1", "--model"])
        .arg(common::default_model_path())
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The server's base URL (from its "listening" log line) once it is healthy.
async fn wait_healthy(log: &std::path::Path, child: &mut std::process::Child) -> String {
    let t = Instant::now();
    let mut base = None;
    loop {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the server did not start"
        );
        if base.is_none() {
            base = std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|l| {
                    l["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("idlerig listening"))
                })
                .find_map(|l| l["fields"]["addr"].as_str().map(|a| format!("http://{a}")))
                .filter(|b| !b.ends_with(":0"));
        }
        if let Some(b) = &base {
            if reqwest::get(format!("{b}/health"))
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return b.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_killed_between_lines_resumes_with_no_line_lost_or_run_twice() {
    let dir = temp_dir("batch-restart");
    let (data, log1, log2) = (
        dir.join("data"),
        dir.join("first.log"),
        dir.join("second.log"),
    );
    let mut first = spawn_server(&data, &log1);
    let base = wait_healthy(&log1, &mut first).await;
    let c = Client::new(&base, None);
    let lines: Vec<Value> = (0..8)
        .map(|i| chat_line(&format!("k{i}"), &format!("Write line {i} of a poem."), 24))
        .collect();
    let batch = c.batch(&lines, CHAT).await;
    let id = batch["id"].as_str().unwrap().to_string();
    c.wait(&id, "two lines finish", |b| {
        b["request_counts"]["completed"].as_u64() >= Some(2)
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no shutdown, a line may be half done
    first.wait().unwrap();

    let mut second = spawn_server(&data, &log2);
    let base = wait_healthy(&log2, &mut second).await;
    let c = Client::new(&base, None);
    let done = c
        .wait(&id, "the batch completes after the restart", finished)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 8, "completed": 8, "failed": 0})
    );

    // The restarted server found some lines done and ran exactly the others.
    let log = std::fs::read_to_string(&log2).unwrap();
    let resumed: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "resuming a batch after a restart")
        .unwrap_or_else(|| panic!("no resume line in:\n{log}"));
    let found_done = resumed["fields"]["done"].as_u64().unwrap();
    assert!((2..8).contains(&found_done), "{resumed}");
    let (_, status) = c.get("/v1/status").await;
    assert_eq!(
        status["batch_lines"]["succeeded"],
        8 - found_done,
        "{status}"
    );

    let results = c.results(&done).await;
    assert_eq!(results.len(), 8);
    for line in &lines {
        let got: Vec<&Value> = results
            .iter()
            .filter(|r| r["custom_id"] == line["custom_id"])
            .collect();
        assert_eq!(got.len(), 1, "{}: {results:?}", line["custom_id"]);
        let (status, direct) = c.post(CHAT, line["body"].clone()).await;
        assert_eq!(status, 200);
        assert_eq!(
            answer_text(&got[0]["response"]["body"]),
            answer_text(&direct)
        );
    }
    second.kill().unwrap();
    second.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_batch_database_stops_the_start_with_what_to_do() {
    let dir = temp_dir("batch-corrupt");
    std::fs::write(dir.join("batches.db"), vec![0x5a; 8192]).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_idlerig"))
        .args([
            "serve",
            "--port",
            "0",
            "--local-pool-port",
            "0",
            "--no-mine",
        ])
        .args(["--embedding-model", "none", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err) = common::wait_for_exit(
        &mut child,
        Duration::from_secs(60),
        "a corrupt database stops the server",
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("batches.db") && err.contains("move it aside"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
