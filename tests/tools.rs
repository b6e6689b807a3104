//! Tool calling end to end with the real default model. SmolLM2's template knows no tools, so
//! the server describes them in a system message and reads Hermes-style calls; `required` and
//! a named function force a valid call through the grammar, whatever the model's skill. The
//! calls' arguments are checked against the functions' schemas, whole and streamed, and the
//! streamed deltas must reassemble into the same calls.

mod common;

use common::spawn_app_with_model;
use idlerig::api::ApiLimits;
use idlerig::engine::EngineConfig;
use serde_json::{json, Value};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}},
                "required": ["tz"], "additionalProperties": false}}},
    ])
}

fn request(choice: Value, parallel: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": tools(), "tool_choice": choice, "parallel_tool_calls": parallel,
        "temperature": 0, "max_tokens": 120,
    })
}

/// Each call names a tool and its arguments hold exactly that tool's required keys, typed.
fn check_calls(calls: &[(String, Value)]) {
    assert!(!calls.is_empty());
    for (name, args) in calls {
        let obj = args.as_object().unwrap_or_else(|| panic!("{name}: {args}"));
        match name.as_str() {
            "get_weather" => {
                assert!(
                    obj["city"]
                        .as_str()
                        .is_some_and(|c| c.chars().count() <= 20),
                    "{args}"
                );
                assert!(
                    ["celsius", "fahrenheit"].contains(&obj["unit"].as_str().unwrap()),
                    "{args}"
                );
                assert_eq!(obj.len(), 2, "{args}");
            }
            "get_time" => {
                assert!(obj["tz"].is_string() && obj.len() == 1, "{args}");
            }
            other => panic!("a call to an unknown function {other}"),
        }
    }
}

fn calls_of(message: &Value) -> Vec<(String, Value)> {
    message["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {message}"))
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function");
            assert!(c["id"].as_str().is_some_and(|id| id.starts_with("call_")));
            let args = c["function"]["arguments"].as_str().unwrap();
            (
                c["function"]["name"].as_str().unwrap().to_string(),
                serde_json::from_str(args).unwrap(),
            )
        })
        .collect()
}

/// The calls a stream's deltas add up to: the first delta of each carries its id and name,
/// the arguments' fragments concatenate into JSON.
fn streamed_calls(events: &[Value]) -> (Vec<(String, Value)>, Option<String>) {
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = None;
    for e in events {
        let Some(c) = e["choices"].get(0) else {
            continue;
        };
        if let Some(r) = c["finish_reason"].as_str() {
            finish = Some(r.to_string());
        }
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert!(
                    d["id"].is_string(),
                    "the first delta of a call has its id: {d}"
                );
                calls.push((
                    d["function"]["name"].as_str().expect("and its name").into(),
                    String::new(),
                ));
            }
            calls[i].1 += d["function"]["arguments"].as_str().unwrap_or("");
        }
    }
    let calls = calls
        .into_iter()
        .map(|(n, a)| {
            (
                n,
                serde_json::from_str(&a).unwrap_or_else(|e| panic!("arguments {a:?}: {e}")),
            )
        })
        .collect();
    (calls, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_choices_give_valid_calls_whole_and_streamed() {
    let srv = spawn_app_with_model(EngineConfig::default(), ApiLimits::default()).await;
    for (choice, parallel) in [
        (json!("required"), true),
        (json!("required"), false),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            false,
        ),
    ] {
        let (status, body) = srv
            .post("/v1/chat/completions", request(choice.clone(), parallel))
            .await;
        assert_eq!(status, 200, "{body}");
        let c = &body["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{body}");
        let calls = calls_of(&c["message"]);
        check_calls(&calls);
        if !parallel {
            assert_eq!(calls.len(), 1, "parallel_tool_calls: false gives one call");
        }
        if choice.is_object() {
            assert!(calls.iter().all(|(n, _)| n == "get_time"), "{calls:?}");
        }
        let mut body = request(choice, parallel);
        body["stream"] = json!(true);
        let (events, done) = srv.stream("/v1/chat/completions", body).await;
        assert!(done);
        let (streamed, finish) = streamed_calls(&events);
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        assert_eq!(
            streamed, calls,
            "the streamed calls equal the whole ones (greedy)"
        );
    }
}

/// A named `tool_choice` is exactly one call, whatever the sampling: at temperature 1 over
/// five seeds (with `parallel_tool_calls` left at its default, true), SmolLM2 used to write
/// 0 to 3 calls and run into `max_tokens` with the markup as content. Now each seed gives one
/// call to the named function, `finish_reason: "tool_calls"`, and no content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_choice_is_exactly_one_call_over_five_seeds() {
    let srv = spawn_app_with_model(EngineConfig::default(), ApiLimits::default()).await;
    for seed in 1..=5 {
        let mut body = request(
            json!({"type": "function", "function": {"name": "get_weather"}}),
            true,
        );
        body.as_object_mut().unwrap().remove("parallel_tool_calls");
        body["temperature"] = json!(1.0);
        body["seed"] = json!(seed);
        body["max_tokens"] = json!(200);
        let (status, got) = srv.post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{got}");
        let c = &got["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "seed {seed}: {got}");
        let calls = calls_of(&c["message"]);
        assert_eq!(calls.len(), 1, "seed {seed}: {calls:?}");
        assert_eq!(calls[0].0, "get_weather");
        check_calls(&calls);
        let content = c["message"]["content"].as_str().unwrap_or("");
        assert!(
            !content.contains("tool_call"),
            "seed {seed}: markup in content: {content:?}"
        );
    }
}

/// A call that `max_tokens` cuts is dropped: `finish_reason: "length"`, and its markup never
/// reaches `content`, whole or streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_by_max_tokens_leaves_no_markup_in_content() {
    let srv = spawn_app_with_model(EngineConfig::default(), ApiLimits::default()).await;
    let mut body = request(json!("required"), true);
    body["max_tokens"] = json!(12);
    let (status, got) = srv.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{got}");
    let c = &got["choices"][0];
    assert_eq!(c["finish_reason"], "length", "{got}");
    let content = c["message"]["content"].as_str().unwrap_or("");
    assert!(
        !content.contains("tool_call") && !content.contains("\"name\""),
        "{content:?}"
    );
    body["stream"] = json!(true);
    let (events, done) = srv.stream("/v1/chat/completions", body).await;
    assert!(done);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!streamed.contains("tool_call"), "{streamed:?}");
    let (_, finish) = streamed_calls(&events);
    assert_eq!(finish.as_deref(), Some("length"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_conversations_render_and_bad_tools_name_their_field() {
    let srv = spawn_app_with_model(EngineConfig::default(), ApiLimits::default()).await;
    // A whole exchange: the call, the tool's answer, then the model's reply.
    let body = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
        ],
        "tools": tools(), "tool_choice": "none", "temperature": 0, "max_tokens": 16,
    });
    let (status, body) = srv.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["choices"][0]["message"].get("tool_calls").is_none(),
        "none: no calls read"
    );
    for (tools, choice, param) in [
        (
            json!([{"type": "function", "function": {"name": "bad name"}}]),
            json!("auto"),
            "tools[0].function.name",
        ),
        (
            tools(),
            json!({"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
        ),
        (tools(), json!("always"), "tool_choice"),
    ] {
        let (status, body) = srv
            .post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": choice}))
            .await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}"
        );
    }
}

/// A template that renders tools gets them, and an assistant's earlier call with its arguments
/// as an object (what templates print), and the `tool` message's id: the template below
/// refuses the request (a 400 with its message) unless each is there in that shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_receives_tools_calls_and_tool_messages_in_its_shape() {
    use idlerig::api::LoadState;
    use idlerig::engine::ChatTemplate;
    const TEMPLATE: &str = "{% if tools is not defined or tools[0].function.name != 'get_weather' %}{{ raise_exception('no tools') }}{% endif %}<tools>{{ tools | tojson }}</tools>{% for m in messages %}{% if m.tool_calls is defined %}{% if m.tool_calls[0].function.arguments.city != 'Paris' %}{{ raise_exception('arguments are not an object') }}{% endif %}<tool_call>{{ m.tool_calls[0].function | tojson }}</tool_call>{% elif m.role == 'tool' %}{% if m.tool_call_id != 'call_1' %}{{ raise_exception('no tool_call_id') }}{% endif %}<tool_response>{{ m.content }}</tool_response>{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n";
    let model = tokio::task::spawn_blocking(|| {
        let mut m = common::load_default_model(EngineConfig::default());
        m.template = Some(ChatTemplate::new(TEMPLATE, None, None).unwrap());
        m
    })
    .await
    .unwrap();
    let srv = common::spawn_app(
        LoadState::Ready(std::sync::Arc::new(model)),
        ApiLimits::default(),
    )
    .await;
    let body = |args: &str| {
        json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": args}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
            ],
            "tools": tools(), "temperature": 0, "max_tokens": 8,
        })
    };
    let (status, answer) = srv
        .post(
            "/v1/chat/completions",
            body("{\"city\": \"Paris\", \"unit\": \"celsius\"}"),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = srv
        .post(
            "/v1/chat/completions",
            body("{\"city\": \"Lyon\", \"unit\": \"celsius\"}"),
        )
        .await;
    assert_eq!(status, 400, "the template saw the arguments: {answer}");
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("arguments are not an object"));
}
