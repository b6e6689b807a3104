//! The APIs beside Chat Completions, end to end with the real default model: Anthropic's
//! Messages (whole and streamed, `count_tokens`, its error envelope), OpenAI's Responses
//! (whole and streamed; stored, continued by `previous_response_id` after a restart of the
//! server), and `/tokenize` / `/detokenize`. Greedy, so that each stream must say exactly
//! what the whole answer says, and each API what Chat Completions says for the same chat.

mod common;

use std::time::Duration;

use common::{poll_until, spawn_app_with_model, start_serve, temp_dir};
use idlerig::api::ApiLimits;
use idlerig::engine::EngineConfig;
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of France? Answer in one word.";

/// The events of a typed stream (`event:` and `data:` lines), as (name, JSON).
async fn typed_events(res: reqwest::Response) -> Vec<(String, Value)> {
    assert_eq!(res.status().as_u16(), 200);
    let text = res.text().await.unwrap();
    let mut out = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            out.push((
                std::mem::take(&mut name),
                serde_json::from_str(data).unwrap(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_tokenize_and_responses_answer_as_chat_completions_does() {
    let app = spawn_app_with_model(EngineConfig::default(), ApiLimits::default()).await;
    let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        "temperature": 0, "max_tokens": 16});
    let (status, completion) = app.post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{completion}");
    let text = completion["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let prompt_tokens = completion["usage"]["prompt_tokens"].as_u64().unwrap();

    // /tokenize renders the chat as the chat endpoint does; /detokenize gives the text back.
    let (_, tok) = app
        .post("/tokenize", json!({"messages": chat["messages"]}))
        .await;
    assert_eq!(tok["count"].as_u64(), Some(prompt_tokens), "{tok}");
    let (status, tok) = app
        .post(
            "/tokenize",
            json!({"prompt": "Paris is the capital of France."}),
        )
        .await;
    assert_eq!(status, 200, "{tok}");
    let (_, detok) = app
        .post("/detokenize", json!({"tokens": tok["tokens"]}))
        .await;
    assert_eq!(detok["prompt"], "Paris is the capital of France.");
    let (status, bad) = app.post("/detokenize", json!({"tokens": [u32::MAX]})).await;
    assert_eq!(
        (status, bad["error"]["param"].as_str()),
        (400, Some("tokens")),
        "{bad}"
    );
    let (status, _) = app.post("/tokenize", json!({})).await;
    assert_eq!(status, 400, "neither prompt nor messages");

    // Anthropic's Messages: the same answer, whole and streamed; the same prompt, counted.
    let messages = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "system": "Be brief.", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]});
    let (status, msg) = app.post("/v1/messages", messages.clone()).await;
    assert_eq!(status, 200, "{msg}");
    assert_eq!(
        msg["content"][0]["text"].as_str(),
        Some(text.as_str()),
        "{msg}"
    );
    assert_eq!(
        (msg["type"].as_str(), msg["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    let usage = &msg["usage"];
    let input = usage["input_tokens"].as_u64().unwrap()
        + usage["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!(input, prompt_tokens);
    let mut streamed = messages.clone();
    streamed["stream"] = json!(true);
    let events = typed_events(app.send("/v1/messages", &streamed).await).await;
    assert!(
        events.iter().all(|(name, e)| e["type"] == name.as_str()),
        "each event is named by its type"
    );
    let deltas: String = events
        .iter()
        .filter_map(|(_, e)| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(deltas, text);
    assert_eq!(events.first().unwrap().0, "message_start");
    assert_eq!(events.last().unwrap().0, "message_stop");
    // A stop sequence that the answer holds ends it there, and is named.
    let stop: String = text
        .trim()
        .chars()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let mut stopped = messages.clone();
    stopped["stop_sequences"] = json!([stop]);
    let (_, msg) = app.post("/v1/messages", stopped).await;
    assert_eq!(
        (msg["stop_reason"].as_str(), msg["stop_sequence"].as_str()),
        (Some("stop_sequence"), Some(stop.as_str())),
        "{msg}"
    );
    let before = msg["content"][0]["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(before) && !before.contains(&stop),
        "{before:?} {text:?}"
    );
    let (_, msg) = app.post("/v1/messages", messages.clone()).await;
    assert_eq!(
        (msg["stop_reason"].as_str(), msg["stop_sequence"].as_str()),
        (Some("end_turn"), None),
        "{msg}"
    );
    let (_, count) = app
        .post("/v1/messages/count_tokens", messages.clone())
        .await;
    assert_eq!(
        count["input_tokens"].as_u64(),
        Some(prompt_tokens),
        "{count}"
    );
    let mut no_max = messages.clone();
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let (status, err) = app.post("/v1/messages", no_max).await;
    assert_eq!(status, 400);
    assert_eq!(err["type"], "error");
    assert_eq!(
        err["error"],
        json!({"type": "invalid_request_error", "message": "`max_tokens` is required"})
    );
    assert!(
        err["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{err}"
    );

    // Responses (no data directory: answered, not stored, and it says so).
    let create = json!({"input": QUESTION, "instructions": "Be brief.", "temperature": 0, "max_output_tokens": 16});
    let (status, resp) = app.post("/v1/responses", create.clone()).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        resp["output"][0]["content"][0]["text"].as_str(),
        Some(text.as_str()),
        "{resp}"
    );
    assert_eq!(
        (
            resp["store"].as_bool(),
            resp["usage"]["input_tokens"].as_u64()
        ),
        (Some(false), Some(prompt_tokens))
    );
    let mut streamed = create.clone();
    streamed["stream"] = json!(true);
    let events = typed_events(app.send("/v1/responses", &streamed).await).await;
    let seq: Vec<u64> = events
        .iter()
        .map(|(_, e)| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seq, (0..events.len() as u64).collect::<Vec<_>>());
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text);
    let (name, last) = events.last().unwrap();
    assert!(
        name == "response.completed" || name == "response.incomplete",
        "{name}"
    );
    assert_eq!(
        last["response"]["output"],
        resp["output"]
            .as_array()
            .map(|o| {
                // Item ids differ between two responses; the rest is the same.
                let mut o = o.clone();
                for (i, item) in o.iter_mut().enumerate() {
                    item["id"] = last["response"]["output"][i]["id"].clone();
                }
                Value::Array(o)
            })
            .unwrap()
    );
    // Errors name the Responses API's own fields.
    let (status, err) = app
        .post(
            "/v1/responses",
            json!({"input": "hi", "max_output_tokens": 1_000_000}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("max_output_tokens")),
        "{err}"
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`max_output_tokens`"),
        "{err}"
    );
    let (status, err) = app
        .post(
            "/v1/responses",
            json!({"input": "hi", "previous_response_id": "resp_x"}),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("previous_response_id")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_response_is_continued_after_a_restart_and_owned_by_its_key() {
    let dir = temp_dir("responses-restart");
    let data = dir.join("data");
    let keys = dir.join("keys");
    std::fs::write(&keys, "alice:sk-alice\nbob:sk-bob\n").unwrap();
    let argv = [
        "--local-pool-port",
        "0",
        "--no-mine",
        "--data-dir",
        data.to_str().unwrap(),
        "--usage-db",
        "none",
        "--api-key-file",
        keys.to_str().unwrap(),
        "--shutdown-grace-s",
        "0",
        // Deferred work only in the gaps: an interactive stream holds a background response
        // back for as long as it runs.
        "--deferred-min-share",
        "0",
    ];
    let http = reqwest::Client::new();
    let post = |base: &str, key: &str, path: &str, body: Value| {
        let req = http
            .post(format!("{base}{path}"))
            .bearer_auth(key)
            .json(&body);
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let get = |base: &str, key: &str, path: &str| {
        let req = http.get(format!("{base}{path}")).bearer_auth(key);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let (first_id, bg_id);
    {
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        let (running, base) = start_serve(&argv, async {
            let _ = stop.await;
        })
        .await;
        let (status, first) = post(&base, "sk-alice", "/v1/responses",
            json!({"input": "My name is Ada. Remember it.", "temperature": 0, "max_output_tokens": 8})).await;
        assert_eq!(status, 200, "{first}");
        assert_eq!(first["store"], true);
        first_id = first["id"].as_str().unwrap().to_string();
        // Bob cannot see or continue Alice's response.
        let (status, _) = post(
            &base,
            "sk-bob",
            "/v1/responses",
            json!({"input": "hi", "previous_response_id": first_id, "max_output_tokens": 1}),
        )
        .await;
        assert_eq!(status, 400);
        let res = http
            .get(format!("{base}/v1/responses/{first_id}"))
            .bearer_auth("sk-bob")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 404);
        // A streamed response is kept before its last event: it can be read (and continued)
        // the moment the client has seen `response.completed`.
        let res = http
            .post(format!("{base}/v1/responses"))
            .bearer_auth("sk-alice")
            .json(&json!({"input": "Hi", "max_output_tokens": 4, "stream": true}))
            .send()
            .await
            .unwrap();
        let events = typed_events(res).await;
        let (name, last) = events.last().unwrap();
        assert!(
            name == "response.completed" || name == "response.incomplete",
            "{name}"
        );
        let streamed_id = last["response"]["id"].as_str().unwrap();
        let kept = http
            .get(format!("{base}/v1/responses/{streamed_id}"))
            .bearer_auth("sk-alice")
            .send()
            .await
            .unwrap();
        assert_eq!(kept.status().as_u16(), 200);
        // A background response the shutdown cuts short runs again at the next start.
        let _busy = common::endless_stream(&base, Some("sk-alice")).await;
        let (status, bg) = post(&base, "sk-alice", "/v1/responses",
            json!({"input": "Count.", "max_output_tokens": 400, "ignore_eos": true, "background": true})).await;
        assert_eq!(
            (status, bg["status"].as_str()),
            (200, Some("queued")),
            "{bg}"
        );
        bg_id = bg["id"].as_str().unwrap().to_string();
        poll_until(
            Duration::from_secs(120),
            "the background response to start",
            || async {
                let r = get(&base, "sk-alice", &format!("/v1/responses/{bg_id}")).await;
                (r["status"] == "in_progress").then_some(())
            },
        )
        .await;
        let _ = stop_tx.send(());
        running.task.await.unwrap().unwrap();
    }
    let (_stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    let (_running, base) = start_serve(&argv, async {
        let _ = stop.await;
    })
    .await;
    let (status, again) = post(&base, "sk-alice", "/v1/responses",
        json!({"input": "What is my name?", "previous_response_id": first_id, "temperature": 0, "max_output_tokens": 8})).await;
    assert_eq!(status, 200, "{again}");
    let (_, alone) = post(&base, "sk-alice", "/v1/responses",
        json!({"input": "What is my name?", "temperature": 0, "max_output_tokens": 1, "store": false})).await;
    let tokens = |r: &Value| r["usage"]["input_tokens"].as_u64().unwrap();
    assert!(
        tokens(&again) > tokens(&alone) + 5,
        "the stored turn is in the prompt: {again} {alone}"
    );
    let res = http
        .get(format!("{base}/v1/responses/{first_id}/input_items"))
        .bearer_auth("sk-alice")
        .send()
        .await
        .unwrap();
    let items: Value = res.json().await.unwrap();
    assert_eq!(
        items["data"][0]["content"][0]["text"], "My name is Ada. Remember it.",
        "{items}"
    );
    let done = poll_until(
        Duration::from_secs(300),
        "the resumed background response",
        || async {
            let r = get(&base, "sk-alice", &format!("/v1/responses/{bg_id}")).await;
            (r["status"] != "in_progress" && r["status"] != "queued").then_some(r)
        },
    )
    .await;
    assert_eq!(done["status"], "incomplete", "{done}");
    assert_eq!(done["usage"]["output_tokens"], 400, "{done}");
    let _ = std::fs::remove_dir_all(&dir);
}
