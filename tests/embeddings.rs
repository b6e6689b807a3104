//! idlerig's BERT encoder against llama.cpp's, on all-MiniLM-L6-v2: 50 varied sentences,
//! recorded by `tests/reference/make_embedding_reference.py` (how it was made is written
//! there). idlerig's tokenizer must give llama.cpp's token ids, and its embedding (mean
//! pooling and normalisation, as the model's sentence-transformers modules say) must have a
//! cosine of at least 0.9999 with llama.cpp's, each sentence on its own and all of them
//! batched together.

mod common;

use idlerig::api::{ApiLimits, LoadState};
use idlerig::embed::Embedder;
use idlerig::engine::ServiceTier;
use serde_json::{json, Value};

const ID: &str = "all-minilm-l6-v2";
const INTERACTIVE: ServiceTier = ServiceTier::Interactive;

fn minilm() -> Embedder {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2");
    Embedder::load(&dir, ID.into(), &candle_core::Device::Cpu)
        .expect("models/fetch has put all-MiniLM-L6-v2 in place")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeddings_match_llama_cpp() {
    let reference: Value =
        serde_json::from_str(include_str!("reference/minilm_embeddings.json")).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 50);
    let embedder = minilm();
    assert_eq!(embedder.dimensions, 384);
    let mut inputs = Vec::new();
    let mut wanted = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = embedder.tokenize(text).unwrap();
        let theirs: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        assert_eq!(ids, theirs, "tokens of {text:?}");
        let v = common::f32s_of_base64(case["embedding_f32_base64"].as_str().unwrap());
        inputs.push(ids);
        wanted.push(v);
    }
    // Each on its own, then all in one request (padded batches of mixed lengths).
    let mut alone = Vec::new();
    for ids in &inputs {
        alone.push(
            embedder
                .embed(vec![ids.clone()], INTERACTIVE)
                .await
                .unwrap()
                .remove(0),
        );
    }
    let batched = embedder.embed(inputs.clone(), INTERACTIVE).await.unwrap();
    let mut worst = f64::MAX;
    for (i, want) in wanted.iter().enumerate() {
        for (how, got) in [("alone", &alone[i]), ("batched", &batched[i])] {
            let c = cosine(got, want);
            worst = worst.min(c);
            assert!(
                c >= 0.9999,
                "{how} {:?}: cosine {c}",
                cases[i]["text"].as_str().unwrap()
            );
            let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
        }
    }
    eprintln!("all-MiniLM-L6-v2 vs llama.cpp: lowest cosine over 50 sentences {worst:.7}");

    // Requests sent together are batched by the encoder's thread: each still gets its own
    // vectors, in its own order.
    let calls = (0..6).map(|k| {
        let e = embedder.clone();
        let mine: Vec<Vec<u32>> = inputs.iter().skip(k).step_by(6).cloned().collect();
        tokio::spawn(async move { (k, e.embed(mine, INTERACTIVE).await.unwrap()) })
    });
    for call in futures::future::join_all(calls).await {
        let (k, vectors) = call.unwrap();
        for (n, v) in vectors.iter().enumerate() {
            let i = k + 6 * n;
            let c = cosine(v, &wanted[i]);
            assert!(c >= 0.9999, "concurrent request {k}, input {n}: cosine {c}");
        }
    }
}

/// `/v1/embeddings` as OpenAI's clients use it, served while the chat model is still loading
/// (the two are independent): each input form, both encodings, usage, and a clear 4xx for
/// every input it refuses, including a model on the wrong endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embeddings_endpoint_answers_and_refuses_as_openai_does() {
    let reference: Value =
        serde_json::from_str(include_str!("reference/minilm_embeddings.json")).unwrap();
    let case = &reference["cases"][0];
    let text = case["text"].as_str().unwrap();
    let want = common::f32s_of_base64(case["embedding_f32_base64"].as_str().unwrap());
    let embedder = minilm();
    let server = common::spawn_app_with(LoadState::Loading(0.5), ApiLimits::default(), |app| {
        app.with_embedder(embedder)
    })
    .await;

    let (status, body) = server
        .post("/v1/embeddings", json!({"input": text, "model": ID}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], ID);
    assert_eq!(body["data"][0]["object"], "embedding");
    assert_eq!(body["data"][0]["index"], 0);
    let one = common::floats(&body["data"][0]["embedding"]);
    assert_eq!(one.len(), 384);
    assert!(cosine(&one, &want) >= 0.9999);
    let n_tokens = case["tokens"].as_array().unwrap().len();
    assert_eq!(body["usage"]["prompt_tokens"], n_tokens);
    assert_eq!(body["usage"]["total_tokens"], n_tokens);

    // Several texts keep their order; base64 carries the same vectors; token ids (without
    // [CLS]/[SEP], which idlerig adds) embed as their text does.
    let texts = ["first sentence", text, "a third one"];
    let (status, floats_body) = server.post("/v1/embeddings", json!({"input": texts})).await;
    assert_eq!(status, 200, "{floats_body}");
    let (status, b64_body) = server
        .post(
            "/v1/embeddings",
            json!({"input": texts, "encoding_format": "base64", "dimensions": 384}),
        )
        .await;
    assert_eq!(status, 200, "{b64_body}");
    for i in 0..3 {
        assert_eq!(floats_body["data"][i]["index"], i);
        let f = common::floats(&floats_body["data"][i]["embedding"]);
        let b = common::f32s_of_base64(b64_body["data"][i]["embedding"].as_str().unwrap());
        assert_eq!(f, b, "input {i}: float and base64 agree");
    }
    assert!(cosine(&common::floats(&floats_body["data"][1]["embedding"]), &want) >= 0.9999);
    let ids: Vec<u64> = serde_json::from_value(case["tokens"].clone()).unwrap();
    let inner = &ids[1..ids.len() - 1];
    for input in [json!(inner), json!([inner, inner])] {
        let (status, body) = server.post("/v1/embeddings", json!({"input": input})).await;
        assert_eq!(status, 200, "{body}");
        assert!(cosine(&common::floats(&body["data"][0]["embedding"]), &want) >= 0.9999);
    }

    // Refusals: status, the parameter, and words that say what to do.
    let long = "word ".repeat(300);
    for (body, code, param, words) in [
        (
            json!({"input": text, "dimensions": 128}),
            400,
            "dimensions",
            "does not support `dimensions`",
        ),
        (
            json!({"input": text, "encoding_format": "int8"}),
            400,
            "encoding_format",
            "base64",
        ),
        (json!({"input": ""}), 400, "input", "empty"),
        (json!({"input": []}), 400, "input", "1 to 2048"),
        (json!({"input": [[]]}), 400, "input[0]", "empty"),
        (
            json!({"input": [5, 99999]}),
            400,
            "input",
            "outside the vocabulary",
        ),
        (json!({"input": long}), 400, "input", "nothing is truncated"),
        (
            json!({"input": text, "model": "SmolLM2-135M-Instruct.Q4_1"}),
            400,
            "model",
            "chat model",
        ),
        (
            json!({"input": text, "model": "nope"}),
            404,
            "model",
            "does not exist",
        ),
        (json!({"input": 7.5}), 400, "input", ""),
    ] {
        let (status, got) = server.post("/v1/embeddings", body.clone()).await;
        assert_eq!(status, code, "{body} -> {got}");
        assert_eq!(got["error"]["param"], param, "{body} -> {got}");
        let message = common::error_message(&got);
        assert!(message.contains(words), "{body} -> {message}");
    }
    let (status, got) = server
        .post(
            "/v1/chat/completions",
            json!({"model": ID, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 400, "{got}");
    assert!(common::error_message(&got).contains("/v1/embeddings"));

    let models = server.get("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["SmolLM2-135M-Instruct.Q4_1", ID]);
}

/// Without an embedding model the route says so (404, and the flag to start one with).
#[tokio::test]
async fn without_an_embedding_model_the_route_says_how_to_serve_one() {
    let server = common::spawn_app(LoadState::Loading(0.0), ApiLimits::default()).await;
    let (status, got) = server
        .post("/v1/embeddings", json!({"input": "hello"}))
        .await;
    assert_eq!(status, 404, "{got}");
    assert!(common::error_message(&got).contains("--embedding-model"));
}

/// A batch's embedding line is deferred work: an interactive request sent while a deferred
/// one of many inputs is being encoded is answered before it, after one forward pass at most
/// (the deferred one used to hold the encoder to its end). Waits on state, not on time: the
/// interactive request goes in once the deferred one has started, and the deferred one has
/// dozens of passes still to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_embeddings_overtake_a_deferred_batch_line() {
    let embedder = minilm();
    let long = embedder
        .tokenize(&"the quick brown fox jumps over the lazy dog ".repeat(20))
        .unwrap();
    // 45 inputs of ~180 tokens per pass: 360 inputs are 8 passes.
    let deferred_inputs = vec![long.clone(); 360];
    let e = embedder.clone();
    let before = embedder.passes();
    let deferred =
        tokio::spawn(async move { e.embed(deferred_inputs, ServiceTier::Deferred).await });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while embedder.passes() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the deferred request never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let short = embedder.tokenize("an interactive request").unwrap();
    let interactive = embedder.embed(vec![short], INTERACTIVE).await.unwrap();
    assert_eq!(interactive.len(), 1);
    assert!(
        !deferred.is_finished(),
        "the interactive request was answered first, with the deferred one still running \
         ({} passes so far)",
        embedder.passes() - before
    );
    let vectors = deferred.await.unwrap().unwrap();
    assert_eq!(vectors.len(), 360);
    assert!(vectors.iter().all(|v| v.len() == 384));
}
