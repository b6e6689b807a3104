//! The Files and Batches API and the flex tier over real HTTP with the default model: every
//! line of a batch answered as the same request sent interactively, bad lines in the error file,
//! refused uploads naming their lines, keys that see only their own batches, cancelling, flex
//! requests that wait for interactive work (and 429 when their queue is full), mining that
//! resumes only once the batch is done, and a batch that survives `kill -9` between lines with
//! no line lost or run twice; the caps on unfinished batches (429) and the bounds on form fields.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;

const CHAT: &str = "/v1/chat/completions";

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("idlerig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An in-process server on `data` with `extra` flags; stopped when the sender drops.
async fn start(data: &std::path::Path, extra: &[&str]) -> (String, oneshot::Sender<()>) {
    let data = data.display().to_string();
    let mut argv = vec![
        "--local-pool-port",
        "0",
        "--embedding-model",
        "none",
        "--usage-db",
        "none",
        "--data-dir",
        &data,
    ];
    argv.extend_from_slice(extra);
    let (stop, stopped) = oneshot::channel::<()>();
    let (_running, base) = common::start_serve(&argv, async {
        let _ = stopped.await;
    })
    .await;
    (base, stop)
}

struct Client {
    base: String,
    key: Option<&'static str>,
    http: reqwest::Client,
}

impl Client {
    fn new(base: &str, key: Option<&'static str>) -> Self {
        Self {
            base: base.into(),
            key,
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let req = match self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn upload(&self, text: &str, purpose: &str) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .text("purpose", purpose.to_string())
            .part(
                "file",
                reqwest::multipart::Part::bytes(text.as_bytes().to_vec()).file_name("in.jsonl"),
            );
        self.send(
            self.http
                .post(format!("{}/v1/files", self.base))
                .multipart(form),
        )
        .await
    }

    async fn content(&self, file_id: &str) -> String {
        let req = self
            .http
            .get(format!("{}/v1/files/{file_id}/content", self.base));
        let req = match self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200, "content of {file_id}");
        res.text().await.unwrap()
    }

    /// Uploads `lines` and starts a batch on `endpoint`; the batch object.
    async fn batch(&self, lines: &[Value], endpoint: &str) -> Value {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let (status, file) = self.upload(&text, "batch").await;
        assert_eq!(status, 200, "{file}");
        let (status, batch) = self
            .post(
                "/v1/batches",
                json!({"input_file_id": file["id"], "endpoint": endpoint,
                       "completion_window": "24h", "metadata": {"job": "test"}}),
            )
            .await;
        assert_eq!(status, 200, "{batch}");
        batch
    }

    /// Polls the batch until `done` holds (or fails the test after two minutes).
    async fn wait(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let (status, b) = self.get(&format!("/v1/batches/{id}")).await;
            assert_eq!(status, 200, "{b}");
            if done(&b) {
                return b;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "{what}: {b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The lines of the batch's output and error files, by `custom_id`.
    async fn results(&self, batch: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        for f in ["output_file_id", "error_file_id"] {
            if let Some(id) = batch[f].as_str() {
                for line in self.content(id).await.lines() {
                    out.push(serde_json::from_str::<Value>(line).unwrap());
                }
            }
        }
        out
    }
}

fn finished(b: &Value) -> bool {
    ["completed", "failed", "cancelled", "expired"].contains(&b["status"].as_str().unwrap_or(""))
}

fn chat_line(id: &str, content: &str, max_tokens: u32) -> Value {
    json!({"custom_id": id, "method": "POST", "url": CHAT,
           "body": {"messages": [{"role": "user", "content": content}],
                    "max_tokens": max_tokens, "temperature": 0}})
}

fn answer_text(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

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
async fn faulty_uploads_and_batch_requests_are_refused_saying_what_is_wrong() {
    let dir = temp_dir("batch-faults");
    let (base, _stop) = start(&dir, &["--no-mine"]).await;
    let c = Client::new(&base, None);
    let good = chat_line("a", "hi", 4).to_string();
    let bad = format!("{good}\n{{\"custom_id\":\"b\"}}\nnot json\n{good}\n");
    let (status, e) = c.upload(&bad, "batch").await;
    assert_eq!(status, 400, "{e}");
    let msg = common::error_message(&e);
    for want in [
        "line 2: `method` is missing",
        "line 3: not a JSON object",
        "line 4: `custom_id` `a` is used twice",
    ] {
        assert!(msg.contains(want), "{want}: {msg}");
    }
    assert_eq!(e["error"]["param"], "file");
    let (status, e) = c.upload(&good, "fine-tune").await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("purpose")),
        "{e}"
    );
    let (status, e) = c.upload("", "batch").await;
    assert_eq!(status, 400, "{e}");
    assert!(common::error_message(&e).contains("no requests"), "{e}");

    let (status, file) = c.upload(&good, "batch").await;
    assert_eq!(status, 200, "{file}");
    for (body, param) in [
        (
            json!({"input_file_id": "file-nope", "endpoint": CHAT, "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": file["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "1h"}),
            "completion_window",
        ),
        (
            json!({"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h", "metadata": {"k": 1}}),
            "metadata",
        ),
    ] {
        let (status, e) = c.post("/v1/batches", body.clone()).await;
        assert_eq!(
            (status, e["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {e}"
        );
    }
    let (status, e) = c.post("/v1/batches", json!({"endpoint": CHAT})).await;
    assert_eq!(status, 400, "{e}");
    let (status, _) = c.get("/v1/batches/batch_nope").await;
    assert_eq!(status, 404);
    let (status, e) = c.get("/v1/files?limit=0").await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("limit")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_sees_only_its_own_files_and_batches_and_its_lines_count_to_it() {
    let dir = temp_dir("batch-keys");
    let keys = dir.join("keys.txt");
    std::fs::write(
        &keys,
        "alice:sk-alice-1\nbob:sk-bob-2\nops:sk-ops-3 admin\n",
    )
    .unwrap();
    let keys = keys.display().to_string();
    let (base, _stop) = start(&dir, &["--no-mine", "--api-key-file", &keys]).await;
    let (alice, bob, ops) = (
        Client::new(&base, Some("sk-alice-1")),
        Client::new(&base, Some("sk-bob-2")),
        Client::new(&base, Some("sk-ops-3")),
    );
    let (status, _) = Client::new(&base, None).get("/v1/batches").await;
    assert_eq!(status, 401);
    let batch = alice
        .batch(&[chat_line("a", "hi", 3), chat_line("b", "yo", 3)], CHAT)
        .await;
    let (id, file) = (
        batch["id"].as_str().unwrap(),
        batch["input_file_id"].as_str().unwrap(),
    );
    assert_eq!(bob.get(&format!("/v1/batches/{id}")).await.0, 404);
    assert_eq!(bob.get(&format!("/v1/files/{file}")).await.0, 404);
    assert_eq!(bob.get("/v1/batches").await.1["data"], json!([]));
    let (status, e) = bob
        .post(
            "/v1/batches",
            json!({"input_file_id": file, "endpoint": CHAT, "completion_window": "24h"}),
        )
        .await;
    assert_eq!(status, 400, "bob cannot run alice's file: {e}");
    assert_eq!(ops.get(&format!("/v1/batches/{id}")).await.0, 200);

    let done = alice.wait(id, "alice's batch completes", finished).await;
    assert_eq!(done["request_counts"]["completed"], 2, "{done}");
    // The lines ran as alice: her usage counts them.
    let (_, usage) = ops.get("/v1/usage").await;
    let alice_usage = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "alice")
        .cloned()
        .unwrap_or_default();
    assert_eq!(alice_usage["completion_tokens"], 6, "{usage}");

    let http = reqwest::Client::new();
    let delete = |who: &'static str| {
        http.delete(format!("{base}/v1/files/{file}"))
            .bearer_auth(who)
            .send()
    };
    assert_eq!(delete("sk-bob-2").await.unwrap().status(), 404);
    let res = delete("sk-alice-1").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["deleted"], true);
    assert_eq!(alice.get(&format!("/v1/files/{file}")).await.0, 404);
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
    let (base, _stop) = start(
        &dir,
        &["--no-mine", "--max-running", "1", "--deferred-queue", "1"],
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
    let stream = reqwest::Client::new()
        .post(format!("{base}{CHAT}"))
        .json(
            &json!({"messages": [{"role": "user", "content": "Tell a long story."}],
                      "max_tokens": 4000, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut stream = stream.bytes_stream();
    use futures::StreamExt;
    stream.next().await.unwrap().unwrap();

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_batches_past_the_caps_are_refused_with_429() {
    let dir = temp_dir("batch-caps");
    let keys = dir.join("keys.txt");
    std::fs::write(
        &keys,
        "alice:sk-alice-1\nbob:sk-bob-2\nops:sk-ops-3 admin\n",
    )
    .unwrap();
    let keys = keys.display().to_string();
    // No room for deferred work: no line ever runs, so the batches stay unfinished for as
    // long as the test needs them (each line is "not now", again and again).
    let (base, _stop) = start(
        &dir,
        &[
            "--no-mine",
            "--api-key-file",
            &keys,
            "--deferred-queue",
            "0",
            "--batch-max-active-per-key",
            "1",
            "--batch-max-active",
            "2",
        ],
    )
    .await;
    let (alice, bob, ops) = (
        Client::new(&base, Some("sk-alice-1")),
        Client::new(&base, Some("sk-bob-2")),
        Client::new(&base, Some("sk-ops-3")),
    );
    let line = [chat_line("a", "hi", 3)];
    let first = alice.batch(&line, CHAT).await;
    let first = first["id"].as_str().unwrap();
    async fn another(c: &Client) -> (u16, Value) {
        let text = format!("{}\n", chat_line("a", "hi", 3));
        let (status, file) = c.upload(&text, "batch").await;
        assert_eq!(status, 200, "{file}");
        c.post(
            "/v1/batches",
            json!({"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h"}),
        )
        .await
    }
    let (status, e) = another(&alice).await;
    assert_eq!(status, 429, "{e}");
    assert_eq!(e["error"]["code"], "batch_limit_exceeded", "{e}");
    assert!(
        common::error_message(&e).contains("--batch-max-active-per-key 1"),
        "{e}"
    );
    let (status, b) = another(&bob).await;
    assert_eq!(status, 200, "bob has a key's room of his own: {b}");
    let (status, e) = another(&ops).await;
    assert_eq!(status, 429, "{e}");
    assert!(
        common::error_message(&e).contains("--batch-max-active 2"),
        "{e}"
    );
    // A finished (here: cancelled) batch no longer counts.
    let (status, _) = alice
        .post(&format!("/v1/batches/{first}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    let done = alice.wait(first, "the batch is cancelled", finished).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let (status, b) = another(&alice).await;
    assert_eq!(status, 200, "{b}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_fields_other_than_the_file_are_read_within_bounds() {
    let dir = temp_dir("batch-form");
    let (base, _stop) = start(&dir, &["--no-mine"]).await;
    let c = Client::new(&base, None);
    let good = format!("{}\n", chat_line("a", "hi", 4));
    let long = format!("batch{}", " ".repeat(1 << 20));
    let (status, e) = c.upload(&good, &long).await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("purpose"))
    );
    let msg = common::error_message(&e);
    assert!(
        msg.contains("longer than 64 bytes") && msg.len() < 200,
        "{}",
        &msg[..msg.len().min(300)]
    );
    let form = |extra: usize| {
        reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .text("expires_after", "x".repeat(extra))
            .part(
                "file",
                reqwest::multipart::Part::bytes(good.clone().into_bytes()).file_name("in.jsonl"),
            )
    };
    let url = format!("{base}/v1/files");
    let (status, e) = c.send(c.http.post(&url).multipart(form(2 << 20))).await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("expires_after")),
        "{e}"
    );
    let (status, file) = c.send(c.http.post(&url).multipart(form(100))).await;
    assert_eq!(status, 200, "a small unused field is ignored: {file}");
    let _ = std::fs::remove_dir_all(&dir);
}
