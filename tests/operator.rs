//! What an operator relies on, over real HTTP against `idlerig serve` in-process with the real
//! model: API keys (401), admission limits (429, 413), timeouts (504), `x-request-id`,
//! Prometheus metrics that move, the profit switch, and a clean shutdown with a stream in
//! flight (503 for new requests, the stream finishes or is cancelled past the grace period).

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use idlerig::server::RunningServer;
use serde_json::{json, Value};
use tokio::sync::oneshot;

struct Server {
    base: String,
    running: RunningServer,
    stop: Option<oneshot::Sender<()>>,
    http: reqwest::Client,
}

async fn start(flags: &[&str]) -> Server {
    let mut argv = vec!["--local-pool-port", "0"];
    argv.extend_from_slice(flags);
    let (stop, stopped) = oneshot::channel::<()>();
    let (running, base) = common::start_serve(&argv, async {
        let _ = stopped.await;
    })
    .await;
    Server {
        base,
        running,
        stop: Some(stop),
        http: reqwest::Client::new(),
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn completion(&self, key: Option<&str>, body: Value) -> reqwest::Response {
        let mut req = self.http.post(self.url("/v1/completions")).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().await.unwrap()
    }

    async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn status(&self, key: Option<&str>) -> Value {
        let mut req = self.http.get(self.url("/v1/status"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().await.unwrap().json().await.unwrap()
    }

    async fn shutdown(mut self) -> Result<(), idlerig::server::ServerError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.running.task)
            .await
            .expect("the server stops within 30 s")
            .unwrap()
    }
}

/// The value of the first sample whose line starts with `prefix` (name and labels).
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample `{prefix}` in:\n{metrics}"))
}

fn prompt(tokens: usize) -> Value {
    json!({"prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "ignore_eos": true})
}

/// Polls `/v1/status` until the engine's figures satisfy `ready`, failing past 30 s.
async fn engine_until(srv: &Server, what: &str, ready: impl Fn(&Value) -> bool) {
    let t = Instant::now();
    loop {
        let s = srv.status(None).await;
        if ready(&s["engine"]) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: {s}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_v1_and_requests_carry_their_id() {
    let dir = std::env::temp_dir().join(format!("idlerig-keys-{}", std::process::id()));
    std::fs::write(&dir, "# keys of the lab\n\nsk-from-file\n").unwrap();
    let srv = start(&[
        "--no-mine",
        "--api-key",
        "sk-from-flag",
        "--api-key-file",
        dir.to_str().unwrap(),
        "--usage-db",
        "none",
        "--max-body-bytes",
        "2000",
    ])
    .await;

    // No key, a wrong key, a key in the wrong scheme: 401 in OpenAI's envelope.
    for auth in [None, Some("Bearer sk-wrong"), Some("Basic sk-from-flag")] {
        let mut req = srv.http.get(srv.url("/v1/models"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{auth:?}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let res = srv.completion(None, prompt(2)).await;
    assert_eq!(res.status(), 401);

    // Both keys work; the client's request id comes back and a missing one is made up.
    for key in ["sk-from-flag", "sk-from-file"] {
        let res = srv
            .http
            .post(srv.url("/v1/completions"))
            .bearer_auth(key)
            .header("x-request-id", "lab-req-42")
            .json(&prompt(2))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{key}");
        assert_eq!(res.headers()["x-request-id"], "lab-req-42");
    }
    let res = srv.completion(Some("sk-from-flag"), prompt(1)).await;
    let made_up = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(
        made_up.starts_with("req-") && made_up.len() > 10,
        "{made_up}"
    );

    // 413 past the body limit, with a key (the key is checked first, the body then).
    let big = json!({"prompt": "x".repeat(4000), "max_tokens": 1});
    let res = srv.completion(Some("sk-from-file"), big).await;
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");

    // Health, metrics and the dashboard page stay open; the status needs the key.
    for open in ["/health", "/metrics", "/"] {
        let res = srv.http.get(srv.url(open)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{open}");
    }
    let res = srv.http.get(srv.url("/v1/status")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let status = srv.status(Some("sk-from-flag")).await;
    assert_eq!(status["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert!(
        !status.to_string().contains("sk-from"),
        "no key in the status"
    );
    srv.shutdown().await.unwrap();
    let _ = std::fs::remove_file(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_a_slow_request_504() {
    // The default request timeout (10 minutes): the queue's steps wait for state, however
    // long a busy machine takes over them.
    let srv = start(&["--no-mine", "--max-running", "1", "--queue-capacity", "1"]).await;
    // One runs (a stream held open), one waits; every other is refused at once with
    // Retry-After. Each step waits for the engine's state, not for time to pass.
    let mut long = prompt(8000);
    long["stream"] = json!(true);
    let running = srv.completion(None, long).await;
    assert_eq!(running.status(), 200);
    engine_until(&srv, "the stream running", |e| e["running"] == 1).await;
    let waiting = srv.completion(None, prompt(12));
    let refused = async {
        engine_until(&srv, "a request waiting", |e| {
            e["waiting_by_tier"]["default"] == 1
        })
        .await;
        let mut codes = Vec::new();
        for _ in 0..3 {
            let res = srv.completion(None, prompt(12)).await;
            codes.push(res.status().as_u16());
            if res.status() == 429 {
                assert_eq!(res.headers()["retry-after"], "1");
                let body: Value = res.json().await.unwrap();
                assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
            }
        }
        // The running stream goes away (cancelled); the waiting request runs.
        drop(running);
        codes
    };
    let (waited, codes) = tokio::join!(waiting, refused);
    assert_eq!(codes, [429, 429, 429]);
    assert_eq!(waited.status(), 200);
    srv.shutdown().await.unwrap();

    let srv = start(&["--no-mine", "--request-timeout-s", "5"]).await;

    // Longer than the timeout (8000 tokens in 5 s would be 1,600 tok/s): 504 whole, an
    // error event on a stream; both cancel the work.
    let res = srv.completion(None, prompt(8000)).await;
    assert_eq!(res.status(), 504);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    let mut stream_body = prompt(8000);
    stream_body["stream"] = json!(true);
    let text = srv
        .completion(None, stream_body)
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("\"code\":\"timeout\""), "{text}");
    assert!(!text.contains("[DONE]"));
    let t = Instant::now();
    loop {
        let s = srv.status(None).await;
        if s["engine"]["running"] == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "generation not cancelled: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_use_vllm_names_and_move() {
    let srv = start(&["--mine-threads", "1", "--idle-grace-ms", "50"]).await;
    let before = srv.metrics().await;
    for name in [
        "# TYPE vllm:time_to_first_token_seconds histogram",
        "# TYPE vllm:e2e_request_latency_seconds histogram",
        "# TYPE vllm:request_queue_time_seconds histogram",
        "# TYPE vllm:inter_token_latency_seconds histogram",
        "# TYPE vllm:num_requests_running gauge",
        "# TYPE vllm:num_requests_waiting gauge",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        "# TYPE vllm:generation_tokens_total counter",
        "# TYPE idlerig_mining_hashes_total counter",
        "# TYPE idlerig_mining_shares_total counter",
        "# TYPE idlerig_device_seconds_total counter",
        "# TYPE idlerig_cpu_miner_stop_seconds histogram",
        "# TYPE idlerig_pool_connected gauge",
        "# TYPE idlerig_earnings_net_usd_per_day gauge",
    ] {
        assert!(before.contains(name), "missing `{name}` in:\n{before}");
    }
    let model = "model_name=\"SmolLM2-135M-Instruct.Q4_1\"";
    let e2e = |m: &str| {
        sample(
            m,
            &format!("vllm:e2e_request_latency_seconds_count{{{model}}}"),
        )
    };
    let tokens = |m: &str| sample(m, "vllm:generation_tokens_total");
    // The device's time for requests: serving, or pre-empting (a request is waiting for the
    // device). With the CPU miner under SCHED_IDLE on a busy machine, a short burst of
    // requests can be served entirely before the starved miner acknowledges the pre-emption.
    let serving = |m: &str| {
        sample(m, "idlerig_device_seconds_total{state=\"serving\"}")
            + sample(m, "idlerig_device_seconds_total{state=\"preempting\"}")
    };
    let length = format!("vllm:request_success_total{{{model},finished_reason=\"length\"}}");
    let ttft_count = format!("vllm:time_to_first_token_seconds_count{{{model}}}");
    // Wait until the miner hashes, so that a request has something to pre-empt.
    let t = Instant::now();
    while sample(&srv.metrics().await, "idlerig_mining_hashes_total") <= 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the miner never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        assert_eq!(srv.completion(None, prompt(8)).await.status(), 200);
    }
    let mut stream = prompt(8);
    stream["stream"] = json!(true);
    let _ = srv.completion(None, stream).await.text().await.unwrap();
    // The telemetry task observes asynchronously, and the idle-priority miner acknowledges a
    // pre-emption (its latency) only once a core is free: wait for both.
    let t = Instant::now();
    let after = loop {
        let m = srv.metrics().await;
        // Every figure below that another task publishes (the arbiter every 100 ms, the
        // telemetry task as it hears) is waited for, not assumed.
        // The telemetry task counts a request's e2e latency, then its first token, then
        // its success: all three are waited for.
        if e2e(&m) >= e2e(&before) + 4.0
            && sample(&m, &ttft_count) >= 4.0
            && sample(&m, &length) >= 4.0
            && sample(&m, "idlerig_cpu_miner_stop_seconds_count") >= 1.0
            && sample(&m, "idlerig_preemptions_total") >= 1.0
            && serving(&m) > 0.0
            && sample(&m, "idlerig_mining_hashes_total") > 0.0
        {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "requests or the pre-emption not counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(tokens(&after) >= tokens(&before) + 32.0);
    assert_eq!(sample(&after, &length), 4.0);
    assert_eq!(sample(&after, &ttft_count), 4.0);
    assert!(
        sample(
            &after,
            &format!("vllm:inter_token_latency_seconds_count{{{model}}}")
        ) >= 28.0
    );
    assert!(
        sample(
            &after,
            &format!("vllm:request_queue_time_seconds_count{{{model}}}")
        ) >= 4.0
    );
    assert!(sample(&after, "idlerig_http_responses_total{code=\"200\"}") >= 4.0);
    assert!(sample(&after, "idlerig_mining_hashes_total") > 0.0);
    assert!(serving(&after) > 0.0);
    assert!(sample(&after, "idlerig_preemptions_total") >= 1.0);
    assert!(sample(&after, "idlerig_cpu_miner_stop_seconds_count") >= 1.0);
    assert_eq!(
        sample(&after, "idlerig_earnings_payout_usd_per_day"),
        0.0,
        "the embedded pool pays nothing"
    );
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profit_switch_stops_mining_that_does_not_pay() {
    // The embedded pool pays nothing, so with `profitable` mining stops after its probe.
    let srv = start(&[
        "--mine-threads",
        "1",
        "--mine-when",
        "profitable",
        "--idle-grace-ms",
        "20",
    ])
    .await;
    let t = Instant::now();
    let stopped = loop {
        let s = srv.status(None).await;
        if s["telemetry"]["profit_switch_on"] == false {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "profit switch never acted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mined = stopped["mining"]["device_time_s"]["mining"]
        .as_f64()
        .unwrap();
    assert!(
        mined >= idlerig::telemetry::PROFIT_PROBE_S,
        "decided after the probe: {stopped}"
    );
    let e = &stopped["telemetry"]["earnings"];
    assert!(e["net_usd_day"].as_f64().unwrap() < 0.0, "{e}");
    assert!(
        e["revenue_usd_day"].as_f64().unwrap() > 0.0,
        "a paying pool would pay a little: {e}"
    );
    assert_eq!(stopped["telemetry"]["mine_when"], "profitable");
    // From then on the miner stays off: once it has stopped (the arbiter's own state, with
    // the hashes counted up to then), the count does not move.
    let t = Instant::now();
    let h0 = loop {
        let s = srv.status(None).await;
        if s["mining"]["phase"] == "not_mining" && s["mining"]["mining_enabled"] == false {
            break s["mining"]["hashes"].as_u64().unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "miner never stopped: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = srv.status(None).await;
    assert_eq!(s["mining"]["hashes"].as_u64().unwrap(), h0, "{s}");
    assert_eq!(s["mining"]["mining_enabled"], false);
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_requests_and_finishes_the_stream_in_flight() {
    let srv = start(&["--mine-threads", "1", "--shutdown-grace-s", "60"]).await;
    let mut body = prompt(120);
    body["stream"] = json!(true);
    let res = srv.completion(None, body.clone()).await;
    assert_eq!(res.status(), 200);
    let mut chunks = res.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    let (base, http) = (srv.base.clone(), srv.http.clone());
    let stopping = tokio::spawn(srv.shutdown());
    // Draining begins on another task: a request the server would refuse as invalid (and
    // never run) shows when, turning from 400 to 503.
    let t = Instant::now();
    loop {
        let res = http
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": 5}))
            .send()
            .await
            .unwrap();
        if res.status() == 503 {
            break;
        }
        assert_eq!(res.status(), 400);
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never began draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While draining the socket stays open and new requests are refused with 503.
    let res = http
        .post(format!("{base}/v1/completions"))
        .json(&prompt(2))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "shutting_down");
    // The stream in flight runs to its end.
    let mut rest = String::new();
    while let Some(c) = chunks.next().await {
        rest.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    stopping.await.unwrap().expect("a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_grace_period_a_stream_is_cancelled_and_the_server_still_exits() {
    let srv = start(&["--no-mine", "--shutdown-grace-s", "0.5"]).await;
    let mut body = prompt(4000);
    body["stream"] = json!(true);
    let res = srv.completion(None, body).await;
    let mut chunks = res.bytes_stream();
    let _ = chunks.next().await.unwrap().unwrap();
    let t = Instant::now();
    let stopping = tokio::spawn(srv.shutdown());
    let mut rest = String::new();
    while let Some(c) = chunks.next().await {
        rest.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    assert!(rest.contains("\"code\":\"shutting_down\""), "{rest}");
    stopping.await.unwrap().expect("a clean exit");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
