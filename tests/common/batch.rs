//! The Files and Batches API from a client's side, for the batch tests: a server on a data
//! directory of its own, a client with or without a key, batches uploaded, polled and read back.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;

pub const CHAT: &str = "/v1/chat/completions";

/// An in-process server on `data` with `extra` flags; stopped when the sender drops.
pub async fn start(data: &std::path::Path, extra: &[&str]) -> (String, oneshot::Sender<()>) {
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
    let (_running, base) = super::start_serve(&argv, async {
        let _ = stopped.await;
    })
    .await;
    (base, stop)
}

pub struct Client {
    pub base: String,
    pub key: Option<&'static str>,
    pub http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, key: Option<&'static str>) -> Self {
        Self {
            base: base.into(),
            key,
            http: reqwest::Client::new(),
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let req = match self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn upload(&self, text: &str, purpose: &str) -> (u16, Value) {
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

    pub async fn content(&self, file_id: &str) -> String {
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
    pub async fn batch(&self, lines: &[Value], endpoint: &str) -> Value {
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
    pub async fn wait(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
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
    pub async fn results(&self, batch: &Value) -> Vec<Value> {
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

pub fn finished(b: &Value) -> bool {
    ["completed", "failed", "cancelled", "expired"].contains(&b["status"].as_str().unwrap_or(""))
}

pub fn chat_line(id: &str, content: &str, max_tokens: u32) -> Value {
    json!({"custom_id": id, "method": "POST", "url": CHAT,
           "body": {"messages": [{"role": "user", "content": content}],
                    "max_tokens": max_tokens, "temperature": 0}})
}

pub fn answer_text(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

/// A key file in `dir` with Alice, Bob and an admin (`ops`); its path.
pub fn three_keys(dir: &std::path::Path) -> String {
    let keys = dir.join("keys.txt");
    std::fs::write(
        &keys,
        "alice:sk-alice-1\nbob:sk-bob-2\nops:sk-ops-3 admin\n",
    )
    .unwrap();
    keys.display().to_string()
}
