//! The reasoning split and `chat_template_kwargs`, end to end with the real model behind a
//! chat template that has `<think>` (Qwen3's convention: the assistant's turn opens inside the
//! reasoning unless `enable_thinking` is false). A regex constraint makes the greedy output
//! close its reasoning and then answer, so the split is checked on real output, whole and
//! streamed.

mod common;

use std::sync::Arc;

use common::{load_default_model, spawn_app};
use idlerig::api::{ApiLimits, LoadState};
use idlerig::engine::{ChatTemplate, EngineConfig};
use serde_json::{json, Value};

const THINKING_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}";

async fn thinking_server() -> common::TestServer {
    let model = tokio::task::spawn_blocking(|| {
        let mut m = load_default_model(EngineConfig::default());
        m.template = Some(ChatTemplate::new(THINKING_TEMPLATE, None, None).unwrap());
        m
    })
    .await
    .unwrap();
    spawn_app(LoadState::Ready(Arc::new(model)), ApiLimits::default()).await
}

fn request(kwargs: Option<Value>) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Is water wet?"}],
        "temperature": 0, "max_tokens": 40,
        // The answer after the reasoning; the reasoning itself is free text that the greedy
        // model ends within the limit only if the prompt leads it there, so the test closes it
        // by the grammar below (a Lark grammar is applied as it is, reasoning included).
        "structured_outputs": {"grammar": "start: /[a-z ]{3,30}/ \"</think>\" \" \" /(Yes|No)[a-z ]{0,20}/"},
    });
    if let Some(k) = kwargs {
        body["chat_template_kwargs"] = k;
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_goes_to_both_fields_and_not_to_content_whole_and_streamed() {
    let srv = thinking_server().await;
    let (status, body) = srv.post("/v1/chat/completions", request(None)).await;
    assert_eq!(status, 200, "{body}");
    let msg = &body["choices"][0]["message"];
    let (reasoning, content) = (
        msg["reasoning_content"].as_str().unwrap(),
        msg["content"].as_str().unwrap(),
    );
    assert!(
        !reasoning.is_empty() && !reasoning.contains("think"),
        "{msg}"
    );
    assert_eq!(
        msg["reasoning"], msg["reasoning_content"],
        "both names carry it"
    );
    assert!(
        content.starts_with("Yes") || content.starts_with("No"),
        "{msg}"
    );
    assert!(!content.contains("</think>"), "{msg}");

    let mut stream_body = request(None);
    stream_body["stream"] = json!(true);
    let (events, done) = srv.stream("/v1/chat/completions", stream_body).await;
    assert!(done);
    let field = |name: &str| -> String {
        events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"][name].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(field("reasoning_content"), reasoning, "streamed reasoning");
    assert_eq!(field("reasoning"), reasoning);
    assert_eq!(field("content"), content, "streamed content");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_template_kwargs_reach_the_template() {
    let srv = thinking_server().await;
    // With thinking off the template closes the reasoning itself: the output is all answer.
    let mut body = request(Some(json!({"enable_thinking": false})));
    body["structured_outputs"] = json!({"regex": "(Yes|No)[.!]"});
    let (status, body) = srv.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{body}");
    let msg = &body["choices"][0]["message"];
    let content = msg["content"].as_str().unwrap();
    assert!(
        ["Yes.", "No.", "Yes!", "No!"].contains(&content),
        "the regex holds the answer: {msg}"
    );
    let (prompt_on, prompt_off) = {
        let (_, on) = srv.post("/v1/chat/completions", request(None)).await;
        (
            on["usage"]["prompt_tokens"].as_u64().unwrap(),
            body["usage"]["prompt_tokens"].as_u64().unwrap(),
        )
    };
    assert!(
        prompt_off > prompt_on,
        "the template added the closed reasoning to the prompt"
    );
}

/// With reasoning on, a JSON schema constrains the answer only: any reasoning up to
/// `</think>` is allowed, then nothing but a valid document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_applies_after_the_reasoning() {
    use idlerig::engine::OutputFormat;
    let model = tokio::task::spawn_blocking(|| load_default_model(EngineConfig::default()))
        .await
        .unwrap();
    let factory = model
        .grammar
        .as_ref()
        .expect("SmolLM2's tokenizer is byte-level BPE");
    let schema =
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let format = OutputFormat::JsonSchema {
        schema,
        strict: true,
    }
    .after_reasoning(true);
    let accepts = |text: &str| {
        let mut c = factory.constraint(&format).unwrap();
        let vocab = model.tokenizer.vocab_size();
        for id in model.tokenizer.encode(text).unwrap() {
            let mut row = vec![0f32; vocab];
            if c.mask(&mut row).is_err() || !row[id as usize].is_finite() {
                return false;
            }
            c.commit(id).unwrap();
        }
        true
    };
    // (The grammar's JSON is compact: `,` and `:` with no spaces.)
    assert!(accepts(
        "Let me think: {\"a\": \"not yet\"} is wrong.</think>\n{\"a\":1}"
    ));
    assert!(!accepts("No reasoning end, just {\"a\":1}</think>\nsure"));
    assert!(
        !accepts("thoughts</think>\n{\"a\":\"x\"}"),
        "the answer is held to the schema"
    );
}
