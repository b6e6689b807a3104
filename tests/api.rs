//! The OpenAI API end to end: the real server on a loopback port with the real SmolLM2.

mod common;

use std::time::Duration;

use common::{spawn_app, spawn_app_with_model, TestServer};
use futures::StreamExt;
use idlerig::api::{ApiLimits, LoadState};
use idlerig::engine::EngineConfig;
use serde_json::{json, Value};

async fn app() -> TestServer {
    spawn_app_with_model(EngineConfig::default(), ApiLimits::default()).await
}

fn chat(content: &str) -> Value {
    json!({ "model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24 })
}

fn stream_text(events: &[Value], choice: usize) -> String {
    events
        .iter()
        .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["index"] == choice)
        .filter_map(|c| {
            c["delta"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .map(str::to_string)
        })
        .collect()
}

fn assert_error(
    status: u16,
    body: &Value,
    want_status: u16,
    want_param: Option<&str>,
    mentions: &str,
) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().unwrap().contains(mentions),
        "message should mention {mentions:?}: {body}"
    );
    assert!(
        e["type"].is_string() && e.get("code").is_some(),
        "envelope: {body}"
    );
    assert_eq!(e["param"].as_str(), want_param, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_the_model_is_loaded() {
    let srv = spawn_app(LoadState::Loading(0.0), ApiLimits::default()).await;
    srv.load.send(LoadState::Loading(0.4)).unwrap();
    let res = srv
        .client
        .get(format!("{}/health", srv.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "loading");
    assert!(
        (body["progress"].as_f64().unwrap() - 0.4).abs() < 1e-6,
        "{body}"
    );
    let (status, body) = srv.post("/v1/chat/completions", chat("hi")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "model_loading");
    let model = tokio::task::spawn_blocking(|| common::load_default_model(EngineConfig::default()))
        .await
        .unwrap();
    srv.load
        .send(LoadState::Ready(std::sync::Arc::new(model)))
        .unwrap();
    let res = srv
        .client
        .get(format!("{}/health", srv.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let models = srv.get("/v1/models").await;
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_chat_is_deterministic_and_streaming_gives_the_same_text() {
    let srv = app().await;
    let (s1, a) = srv
        .post(
            "/v1/chat/completions",
            chat("What is the capital of France?"),
        )
        .await;
    let (s2, b) = srv
        .post(
            "/v1/chat/completions",
            chat("What is the capital of France?"),
        )
        .await;
    assert_eq!((s1, s2), (200, 200), "{a}");
    let text = a["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    assert_eq!(
        text,
        b["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    // 37 prompt tokens: the default system prompt, the question and the template's markers.
    assert_eq!(
        a["usage"],
        json!({"prompt_tokens": 37, "completion_tokens": 24, "total_tokens": 61,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );
    // The same prompt again: its two full 16-token blocks come from the prefix cache.
    assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], 32);

    let mut req = chat("What is the capital of France?");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (events, done) = srv.stream("/v1/chat/completions", req).await;
    assert!(done, "stream ends with [DONE]");
    assert_eq!(stream_text(&events, 0), text);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let finish: Vec<&Value> = events
        .iter()
        .filter(|e| !e["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], b["usage"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_stream_and_non_stream_agree_and_stop_at_eos() {
    let srv = app().await;
    let body = json!({"prompt": "<|im_start|>user\nSay only the word yes.<|im_end|>\n<|im_start|>assistant\n", "max_tokens": 50, "temperature": 0});
    let (status, full) = srv.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["object"], "text_completion");
    let text = full["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        full["choices"][0]["finish_reason"], "stop",
        "the model ends its turn before 50 tokens: {full}"
    );
    assert!(
        !text.contains("<|im_end|>"),
        "the end-of-turn token is not emitted"
    );
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (events, done) = srv.stream("/v1/completions", sbody).await;
    assert!(done);
    assert_eq!(stream_text(&events, 0), text);
    // Token ids are accepted as a prompt too.
    let (status, by_ids) = srv
        .post(
            "/v1/completions",
            json!({"prompt": [504, 3575, 282, 4649, 314], "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{by_ids}");
    assert_eq!(by_ids["usage"]["prompt_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_text_and_are_never_emitted() {
    let srv = app().await;
    let mut req = chat("Count from one to twenty in words, separated by commas.");
    req["max_tokens"] = json!(60);
    let (_, free) = srv.post("/v1/chat/completions", req.clone()).await;
    let text = free["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // A stop string taken from the middle of the greedy output.
    let mid = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[mid..].chars().take(3).collect();
    let before = &text[..text.find(&stop).unwrap()];
    req["stop"] = json!([stop, "never-appears"]);
    let (_, stopped) = srv.post("/v1/chat/completions", req.clone()).await;
    assert_eq!(
        stopped["choices"][0]["message"]["content"], before,
        "stop {stop:?} in {text:?}"
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    req["stream"] = json!(true);
    let (events, _) = srv.stream("/v1/chat/completions", req).await;
    assert_eq!(stream_text(&events, 0), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_and_seeds_are_reproducible() {
    let srv = app().await;
    let req = |seed: i64| json!({"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 1.0, "top_p": 0.95, "n": 3, "seed": seed, "max_tokens": 16});
    let (status, a) = srv.post("/v1/chat/completions", req(42)).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = srv.post("/v1/chat/completions", req(42)).await;
    let (_, c) = srv.post("/v1/chat/completions", req(43)).await;
    let texts = |v: &Value| {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b), "same seed, same request: same output");
    assert_ne!(texts(&a), texts(&c), "another seed: other output");
    assert!(
        texts(&a)[0] != texts(&a)[1] || texts(&a)[1] != texts(&a)[2],
        "choices of one request differ"
    );
    let sum: u64 = a["choices"].as_array().unwrap().len() as u64 * 16;
    assert_eq!(a["usage"]["completion_tokens"].as_u64().unwrap(), sum);
    let mut streamed = req(42);
    streamed["stream"] = json!(true);
    let (events, _) = srv.stream("/v1/chat/completions", streamed).await;
    assert_eq!(
        (0..3).map(|i| stream_text(&events, i)).collect::<Vec<_>>(),
        texts(&a),
        "streaming samples the same"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_reported_in_both_formats() {
    let srv = app().await;
    let mut req = chat("Name a colour.");
    req["max_tokens"] = json!(5);
    req["logprobs"] = json!(true);
    req["top_logprobs"] = json!(3);
    let (status, body) = srv.post("/v1/chat/completions", req).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 5);
    for entry in content {
        let lp = entry["logprob"].as_f64().unwrap();
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(entry["token"], top[0]["token"]);
        assert!(lp <= 0.0 && (lp - top[0]["logprob"].as_f64().unwrap()).abs() < 1e-6);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }
    let joined: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        joined,
        body["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let (_, legacy) = srv
        .post(
            "/v1/completions",
            json!({"prompt": "The sky is", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
        )
        .await;
    let lp = &legacy["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_and_penalties_change_the_output() {
    let model = std::sync::Arc::new(
        tokio::task::spawn_blocking(|| common::load_default_model(EngineConfig::default()))
            .await
            .unwrap(),
    );
    let tokenizer = model.tokenizer.clone();
    let srv = spawn_app(LoadState::Ready(model), ApiLimits::default()).await;
    let prompt = "The capital of France is";
    let greedy = |extra: Value| {
        let mut body = json!({"prompt": prompt, "max_tokens": 3, "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let (_, plain) = srv.post("/v1/completions", greedy(json!({}))).await;
    let plain_text = plain["choices"][0]["text"].as_str().unwrap().to_string();
    // +100 on one token makes it the only choice.
    let banana = tokenizer.encode(" banana").unwrap();
    assert_eq!(banana.len(), 1);
    let (_, forced) = srv
        .post(
            "/v1/completions",
            greedy(json!({"logit_bias": {banana[0].to_string(): 100}})),
        )
        .await;
    assert_eq!(forced["choices"][0]["text"], " banana banana banana");
    // -100 on the greedy first token bans it.
    let first = tokenizer.encode(&plain_text).unwrap()[0];
    let (_, banned) = srv
        .post(
            "/v1/completions",
            greedy(json!({"logit_bias": {first.to_string(): -100}})),
        )
        .await;
    let banned_text = banned["choices"][0]["text"].as_str().unwrap();
    assert!(
        !banned_text.starts_with(&tokenizer.decode(&[first])),
        "{banned_text:?} still starts with the banned token"
    );

    let base = chat("Write one sentence about cats.");
    let (_, plain) = srv.post("/v1/chat/completions", base.clone()).await;
    for (name, value) in [
        ("frequency_penalty", 2.0),
        ("presence_penalty", 2.0),
        ("repetition_penalty", 1.5),
    ] {
        let mut req = base.clone();
        req[name] = json!(value);
        let (status, out) = srv.post("/v1/chat/completions", req).await;
        assert_eq!(status, 200, "{out}");
        assert_ne!(
            out["choices"][0]["message"]["content"], plain["choices"][0]["message"]["content"],
            "{name} changes greedy output"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let limits = ApiLimits {
        max_body_bytes: 64 * 1024,
        max_n: 4,
        max_tokens: Some(1000),
        ..ApiLimits::default()
    };
    let srv = spawn_app_with_model(EngineConfig::default(), limits).await;
    let p = "/v1/chat/completions";
    let (s, b) = srv.post_raw(p, "{\"messages\": [").await;
    assert_error(s, &b, 400, None, "not valid JSON");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
        )
        .await;
    assert_error(s, &b, 400, Some("temperature"), "temperature");
    let (s, b) = srv.post(p, json!({"messages": "hi"})).await;
    assert_error(s, &b, 400, Some("messages"), "messages");
    let (s, b) = srv
        .post(p, json!({"messages": [{"role": "user", "content": 7}]}))
        .await;
    assert_error(s, &b, 400, Some("messages[0].content"), "content");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
        )
        .await;
    assert_error(s, &b, 400, Some("messages[0].role"), "wizard");
    let (s, b) = srv
        .post(
            p,
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_error(s, &b, 404, Some("model"), "gpt-9");
    assert_eq!(b["error"]["code"], "model_not_found");
    let (s, b) = srv.post(p, json!({"messages": []})).await;
    assert_error(s, &b, 400, Some("messages"), "at least one");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}),
        )
        .await;
    assert_error(s, &b, 400, Some("max_tokens"), "between 1 and 1000");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
        )
        .await;
    assert_error(s, &b, 400, Some("max_tokens"), "max_tokens");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 5}),
        )
        .await;
    assert_error(s, &b, 400, Some("n"), "between 1 and 4");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}),
        )
        .await;
    assert_error(s, &b, 400, Some("top_p"), "top_p");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}}),
        )
        .await;
    assert_error(s, &b, 400, Some("logit_bias"), "abc");
    // An operator-set range bounds `priority` (default -100..=100): i64::MIN would otherwise
    // put one client ahead of everyone for good.
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "priority": i64::MIN}),
        )
        .await;
    assert_error(s, &b, 400, Some("priority"), "priority");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["x".repeat(300)]}),
        )
        .await;
    assert_error(s, &b, 400, Some("stop"), "256 bytes");
    let (s, b) = srv
        .post(
            p,
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}),
        )
        .await;
    assert_error(s, &b, 400, Some("top_logprobs"), "logprobs");
    let (s, b) = srv.post(p, json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]})).await;
    assert_error(s, &b, 400, Some("tools[0].function"), "needs a `function`");
    let (s, b) = srv.post(p, json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})).await;
    assert_error(s, &b, 400, Some("messages[0].content[0].type"), "image_url");
    // A prompt longer than the 8192-token context window (body under the size limit).
    let long = "hello ".repeat(9000);
    let (s, b) = srv.post("/v1/completions", json!({"prompt": long})).await;
    assert_error(s, &b, 400, Some("messages"), "context window");
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let (s, b) = srv
        .post(
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 900, "n": 1}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = srv
        .post("/v1/completions", json!({"prompt": [999999]}))
        .await;
    assert_error(s, &b, 400, Some("prompt"), "outside the vocabulary");
    let (s, b) = srv.post("/v1/completions", json!({"max_tokens": 3})).await;
    assert_error(s, &b, 400, Some("prompt"), "required");
    // Body over the limit.
    let big = json!({"prompt": "x".repeat(100 * 1024)}).to_string();
    let (s, b) = srv.post_raw("/v1/completions", big).await;
    assert_error(s, &b, 413, None, "limit");
    // Unknown route and wrong method.
    let res = srv
        .client
        .get(format!("{}/v1/nothing", srv.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 404);
    let b: Value = res.json().await.unwrap();
    assert!(b["error"]["message"].is_string());
    let res = srv
        .client
        .get(format!("{}/v1/chat/completions", srv.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_stops_its_generation() {
    let model = tokio::task::spawn_blocking(|| common::load_default_model(EngineConfig::default()))
        .await
        .unwrap();
    let stats = model.stats.clone();
    let srv = spawn_app(
        LoadState::Ready(std::sync::Arc::new(model)),
        ApiLimits::default(),
    )
    .await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "stream": true, "ignore_eos": true});
    let res = srv.send("/v1/completions", &body).await;
    let mut stream = res.bytes_stream();
    let mut seen = 0;
    while seen < 5 {
        stream.next().await.unwrap().unwrap();
        seen += 1;
    }
    assert_eq!(stats.running(), 1, "the generation is running");
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats.running() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the generation did not stop after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let generated = stats.generated_tokens();
    assert!(
        generated < 1000,
        "stopped early, after {generated} of 4000 tokens"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stats.generated_tokens(),
        generated,
        "nothing is generated after the stop"
    );
}
