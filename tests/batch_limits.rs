//! What the Files and Batches API refuses, and to whom, over real HTTP with the default model:
//! faulty uploads and batch requests named by their line or field, keys that see only their
//! own files and batches, the caps on unfinished batches (429), and the bounds on form fields.

mod common;

use common::batch::*;
use common::temp_dir;
use serde_json::{json, Value};

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
    let keys = three_keys(&dir);
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
async fn unfinished_batches_past_the_caps_are_refused_with_429() {
    let dir = temp_dir("batch-caps");
    let keys = three_keys(&dir);
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
