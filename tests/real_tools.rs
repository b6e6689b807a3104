//! Tool calls as a real tool-tuned checkpoint writes them: Qwen2.5-Coder-0.5B-Instruct
//! (Q4_K_M, from `models/fetch qwen-coder-0.5b`), whose GGUF carries Qwen's own tool template.
//! Such a model leaves out the `<tool_call>` tags in `auto` mode and writes the bare JSON object,
//! which idlerig used to return as content (LangChain's `bind_tools` then saw no call); with a
//! named `tool_choice` it went on calling until `max_tokens`, and the markup reached `content`.
//!
//! The model is 491 MB and optional for a developer: without it these tests say so and pass,
//! unless `IDLERIG_REAL_MODELS=required` (CI sets it, after fetching the model).

mod common;

use std::sync::Arc;

use idlerig::api::{ApiLimits, LoadState};
use idlerig::engine::{load_model, EngineConfig};
use serde_json::{json, Value};

const FILE: &str = "models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// The server with the Qwen checkpoint, or `None` (said on stderr) when it is not fetched.
async fn qwen() -> Option<common::TestServer> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(FILE);
    if !path.exists() {
        let required = std::env::var("IDLERIG_REAL_MODELS").is_ok_and(|v| v == "required");
        assert!(
            !required,
            "{} is missing: run models/fetch qwen-coder-0.5b",
            path.display()
        );
        eprintln!(
            "skipped: {} is missing (models/fetch qwen-coder-0.5b)",
            path.display()
        );
        return None;
    }
    let model = tokio::task::spawn_blocking(move || {
        load_model(&path, &candle_core::Device::Cpu, EngineConfig::default())
            .expect("loading the Qwen checkpoint")
    })
    .await
    .unwrap();
    Some(common::spawn_app(LoadState::Ready(Arc::new(model)), ApiLimits::default()).await)
}

fn weather_request(choice: Value) -> Value {
    json!({
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"]}}}],
        "tool_choice": choice, "temperature": 0, "max_tokens": 100,
    })
}

/// The one call of a choice: its function's name and its arguments.
fn only_call(choice: &Value) -> (String, Value) {
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {choice}"));
    assert_eq!(calls.len(), 1, "{choice}");
    let f = &calls[0]["function"];
    let args = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
    (f["name"].as_str().unwrap().to_string(), args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_qwen_s_calls_are_read_in_auto_and_named_modes() {
    let Some(srv) = qwen().await else { return };

    // `auto` at temperature 0: whatever form the model writes its call in (bare JSON, as this
    // checkpoint does, or tagged), it is a call, and no call markup is left in `content`.
    let (status, got) = srv
        .post("/v1/chat/completions", weather_request(json!("auto")))
        .await;
    assert_eq!(status, 200, "{got}");
    let c = &got["choices"][0];
    eprintln!("auto: {}", c["message"]);
    assert_eq!(c["finish_reason"], "tool_calls", "{got}");
    let (name, args) = only_call(c);
    assert_eq!(name, "get_weather");
    assert!(
        args["city"]
            .as_str()
            .is_some_and(|city| city.contains("Oslo")),
        "{args}"
    );
    let content = c["message"]["content"].as_str().unwrap_or("");
    assert!(
        !content.contains("\"name\"") && !content.contains("tool_call"),
        "{content:?}"
    );

    // Streamed, the same call comes as tool-call deltas, never as content.
    let mut body = weather_request(json!("auto"));
    body["stream"] = json!(true);
    let (events, done) = srv.stream("/v1/chat/completions", body).await;
    assert!(done);
    let mut streamed_args = String::new();
    let mut finish = None;
    for e in &events {
        let ch = &e["choices"][0];
        assert!(
            ch["delta"]["content"]
                .as_str()
                .is_none_or(|t| !t.contains("\"name\"")),
            "call markup streamed as content: {e}"
        );
        for d in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
            streamed_args += d["function"]["arguments"].as_str().unwrap_or("");
        }
        if let Some(r) = ch["finish_reason"].as_str() {
            finish = Some(r.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(serde_json::from_str::<Value>(&streamed_args).unwrap(), args);

    // A named choice at temperature 1, five seeds: exactly one call each, and the turn ends.
    for seed in 1..=5 {
        let mut body =
            weather_request(json!({"type": "function", "function": {"name": "get_weather"}}));
        body["temperature"] = json!(1.0);
        body["seed"] = json!(seed);
        let (status, got) = srv.post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{got}");
        let c = &got["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "seed {seed}: {got}");
        let (name, args) = only_call(c);
        assert_eq!(name, "get_weather");
        assert!(args["city"].is_string(), "seed {seed}: {args}");
    }
}
