//! Helpers shared by the integration tests: the default model (fetched by `models/fetch`),
//! an in-process server on a loopback port, and small HTTP helpers.
#![allow(dead_code)]

pub mod batch;

use std::path::PathBuf;
use std::sync::Arc;

use idlerig::api::{self, ApiLimits, AppState, LoadState};
use idlerig::engine::{load_model, EngineConfig, ServedModel};
use tokio::sync::watch;

/// A fresh, empty folder for one test: `idlerig-NAME-PID` in the temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("idlerig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `check` every 50 ms until it gives a value, failing the test after `limit`, saying
/// `what` was waited for: tests wait for state, never for time.
pub async fn poll_until<T, F, Fut>(limit: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub fn default_model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(idlerig::config::DEFAULT_MODEL_RELATIVE);
    assert!(
        p.exists(),
        "the default model is missing at {}: run models/fetch first",
        p.display()
    );
    p
}

pub fn load_default_model(cfg: EngineConfig) -> ServedModel {
    load_model(&default_model_path(), &candle_core::Device::Cpu, cfg)
        .expect("loading the default model")
}

/// `GET url` as JSON.
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// A running server: its base URL, and the channel that sets its model state.
pub struct TestServer {
    pub base: String,
    pub load: watch::Sender<LoadState>,
    pub client: reqwest::Client,
}

/// Starts the API on 127.0.0.1:0 with `state` and `limits`.
pub async fn spawn_app(state: LoadState, limits: ApiLimits) -> TestServer {
    spawn_app_with(state, limits, |app| app).await
}

/// As [`spawn_app`], with `extend` adding to the application state (an embedding model).
pub async fn spawn_app_with(
    state: LoadState,
    limits: ApiLimits,
    extend: impl FnOnce(AppState) -> AppState,
) -> TestServer {
    let (tx, rx) = watch::channel(state);
    let app = extend(AppState::new(
        "SmolLM2-135M-Instruct.Q4_1".into(),
        rx,
        limits,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api::serve(listener, app, std::future::pending()));
    TestServer {
        base,
        load: tx,
        client: reqwest::Client::new(),
    }
}

/// Starts the API with the real default model loaded.
pub async fn spawn_app_with_model(cfg: EngineConfig, limits: ApiLimits) -> TestServer {
    let model = tokio::task::spawn_blocking(move || load_default_model(cfg))
        .await
        .unwrap();
    spawn_app(LoadState::Ready(Arc::new(model)), limits).await
}

impl TestServer {
    /// `POST path` with a JSON body; the response as it comes (for streams read by hand).
    pub async fn send(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> serde_json::Value {
        get_json(&self.client, &format!("{}{path}", self.base)).await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, serde_json::Value) {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// A streamed request's events (the JSON of each `data:` line) and whether `[DONE]` came.
    pub async fn stream(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (Vec<serde_json::Value>, bool) {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200, "stream request failed");
        let text = res.text().await.unwrap();
        let mut events = Vec::new();
        let mut done = false;
        for line in text.lines() {
            if let Some(data) = line.strip_prefix("data: ") {
                if data == "[DONE]" {
                    done = true;
                } else {
                    events.push(serde_json::from_str(data).expect("each SSE data line is JSON"));
                }
            }
        }
        (events, done)
    }
}

/// Waits for `child` to exit, polling; kills it and fails the test past `limit` (`what` says
/// what was expected). Its standard error, when piped, is returned with the status.
pub fn wait_for_exit(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> (std::process::ExitStatus, String) {
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).unwrap();
    }
    (status, err)
}

/// A vector sent as base64 of little-endian f32 (OpenAI's `encoding_format: base64`, and the
/// committed embedding reference).
pub fn f32s_of_base64(b64: &str) -> Vec<f32> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Log-probabilities of every token from raw logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// `POST url` with a JSON body: the status and the JSON answer (null when it is not JSON).
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let res = client.post(url).json(body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(serde_json::Value::Null))
}

/// `idlerig serve` in-process with `argv` (after `idlerig serve`) on a loopback port, once
/// `/health` answers 200 (every model loaded); its base URL. `shutdown` stops it.
pub async fn start_serve(
    argv: &[&str],
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (idlerig::server::RunningServer, String) {
    use clap::Parser;
    let mut all = vec!["idlerig", "serve"];
    all.extend_from_slice(argv);
    let idlerig::config::Command::Serve(args) = idlerig::config::Cli::parse_from(all).command
    else {
        unreachable!("`serve` parses as the serve command")
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = idlerig::server::start(args, listener, shutdown)
        .await
        .expect("server starts");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let t = std::time::Instant::now();
    while http
        .get(format!("{base}/health"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(120),
            "the models did not load"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    (running, base)
}

/// A JSON array of numbers as f32 (an embedding in `float` encoding).
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// The message of an OpenAI error envelope.
pub fn error_message(v: &serde_json::Value) -> &str {
    v["error"]["message"].as_str().expect("an error envelope")
}

/// An interactive stream that goes on for thousands of tokens, read until its first token is
/// out: it holds the engine until it is dropped.
pub async fn endless_stream(base: &str, key: Option<&str>) -> impl Sized {
    use futures::StreamExt;
    let mut req = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &serde_json::json!({"messages": [{"role": "user", "content": "Tell a long story."}],
                  "max_tokens": 4000, "ignore_eos": true, "stream": true}),
        );
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let mut stream = res.bytes_stream();
    stream.next().await.unwrap().unwrap();
    stream
}
