//! One `idlerig serve` with two chat models (`--model NAME=PATH`, twice) and the embedding
//! model beside them, each answering correctly through the same port:
//! - SmolLM2 (the default, named `smol`) completes "The capital of France is" with Paris;
//! - the tiny Qwen3 test model (named `tiny`) continues a prompt of token ids with the token
//!   llama.cpp picked there (from `tests/reference/arch_reference.json`);
//! - all-MiniLM-L6-v2 embeds a sentence as llama.cpp's BERT does.
//!
//! Requests are routed by `model`; a model on the wrong endpoint, or one not served, gets a
//! clear 4xx, and `/v1/models` lists all three.

mod common;

use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chat_models_and_the_embedding_model_answer_through_one_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let smol = format!(
        "smol={}",
        root.join(idlerig::config::DEFAULT_MODEL_RELATIVE).display()
    );
    let tiny = format!(
        "tiny={}",
        root.join("tests/reference/arch/qwen3.gguf").display()
    );
    let argv = [
        "--local-pool-port",
        "0",
        "--kv-cache-mb",
        "64",
        "--model",
        &smol,
        "--model",
        &tiny,
    ];
    // Ready only once both chat models have loaded.
    let (_running, base) = common::start_serve(&argv, std::future::pending()).await;
    let http = reqwest::Client::new();
    let post = |path: &'static str, body: Value| {
        let (http, url) = (http.clone(), format!("{base}{path}"));
        async move { common::post_json(&http, &url, &body).await }
    };

    let models = common::get_json(&http, &format!("{base}/v1/models")).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smol", "tiny", "all-minilm-l6-v2"]);

    // The default model (no `model`) and the same by name.
    for model in [None, Some("smol")] {
        let mut body =
            json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 4});
        if let Some(m) = model {
            body["model"] = json!(m);
        }
        let (status, got) = post("/v1/completions", body).await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["model"], "smol");
        let text = got["choices"][0]["text"].as_str().unwrap();
        assert!(text.contains("Paris"), "{text}");
    }

    // The tiny model continues its reference sequence as llama.cpp did, wherever llama.cpp
    // was sure of its token.
    let reference: Value =
        serde_json::from_str(include_str!("reference/arch_reference.json")).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(reference["tokens"].clone()).unwrap();
    let positions = reference["models"]["qwen3"]["positions"]
        .as_array()
        .unwrap();
    let mut checked = 0;
    for p in 8..tokens.len() {
        let r = &positions[p];
        // Where llama.cpp is sure, and its token's text is unique: a printable ASCII byte
        // (ids 0–93 of GPT-2's byte alphabet) or a merge (256–315); tokens are compared by
        // the text the server shows for them.
        let top = r["top"][0].as_u64().unwrap();
        if r["margin"].as_f64().unwrap() < 1.0 || !(top < 94 || (256..316).contains(&top)) {
            continue;
        }
        let (status, got) = post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": &tokens[..=p], "max_tokens": 1, "temperature": 0,
                   "logprobs": 1, "ignore_eos": true}),
        )
        .await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["model"], "tiny");
        let top = got["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .expect("the top token");
        let ours = top.keys().next().unwrap().clone();
        let theirs = r["top"][0].as_u64().unwrap();
        let (_, want) = tokenize_one(&http, &base, theirs).await;
        assert_eq!(ours, want, "position {p}");
        checked += 1;
        if checked == 4 {
            break;
        }
    }
    assert_eq!(checked, 4, "enough positions where llama.cpp is sure");

    // The embedding model, and each model on its wrong endpoint.
    let reference: Value =
        serde_json::from_str(include_str!("reference/minilm_embeddings.json")).unwrap();
    let case = &reference["cases"][3];
    let (status, got) = post(
        "/v1/embeddings",
        json!({"model": "all-minilm-l6-v2", "input": case["text"]}),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    let want = common::f32s_of_base64(case["embedding_f32_base64"].as_str().unwrap());
    let got = common::floats(&got["data"][0]["embedding"]);
    let cos: f32 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
    assert!(cos >= 0.9999, "cosine {cos}");

    let (status, got) = post(
        "/v1/chat/completions",
        json!({"model": "all-minilm-l6-v2", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 400, "{got}");
    assert!(common::error_message(&got).contains("/v1/embeddings"));
    let (status, got) = post("/v1/embeddings", json!({"model": "tiny", "input": "hi"})).await;
    assert_eq!(status, 400, "{got}");
    assert!(common::error_message(&got).contains("chat model"));
    let (status, got) = post(
        "/v1/chat/completions",
        json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404, "{got}");
    let message = common::error_message(&got);
    assert!(
        message.contains("smol") && message.contains("tiny"),
        "{message}"
    );
}

/// The text the tiny model's `logprobs` show for token `id`: the completion of that single
/// token, decoded by the server (the keys of `top_logprobs` are token texts).
async fn tokenize_one(http: &reqwest::Client, base: &str, id: u64) -> (u64, String) {
    // The byte-level vocabulary's token `id` decodes to its text; ask the server to echo it
    // through a one-token generation forced by logit bias.
    let body = json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0,
                      "logit_bias": {id.to_string(): 100}, "logprobs": 1, "ignore_eos": true});
    let (_, r) = common::post_json(http, &format!("{base}/v1/completions"), &body).await;
    let text = r["choices"][0]["logprobs"]["tokens"][0]
        .as_str()
        .expect("the forced token")
        .to_string();
    (id, text)
}
