//! The paged KV cache with the real model: the fused paged attention gives the dense path's
//! logits; sequences batched at different positions give the tokens they give alone; prefix
//! cache hits are reported and change nothing; when the pool runs out the newest sequences
//! are pre-empted and recomputed with unchanged output; cancelled requests free their blocks;
//! priorities order admission.

mod common;

use std::time::{Duration, Instant};

use candle_core::Device;
use futures::StreamExt;
use idlerig::api::ApiLimits;
use idlerig::engine::EngineConfig;
use idlerig::model::{BatchItem, Decoder, LoadOptions, ModelFiles};
use serde_json::{json, Value};

fn load(kv_cache_mb: usize) -> Decoder {
    ModelFiles::open(&common::default_model_path())
        .unwrap()
        .load_model(
            &Device::Cpu,
            LoadOptions {
                kv_cache_mb,
                ..Default::default()
            },
        )
        .unwrap()
}

/// The fused kernel equals plain attention to 1e-5 (its unit test); through the model,
/// activations are quantized to 8 bits before every product, so float-level differences
/// flip a few roundings. Compared as log-probabilities of the dense path's 20 most likely
/// tokens (a shift common to all logits means nothing), they differ by about 0.1 on average;
/// a wiring fault moves them by whole units (pairing query heads with the wrong KV head was
/// seen to give a mean of 13.9) and changes the top token.
fn assert_close(dense: &[f32], paged: &[f32], what: &str) {
    let log_softmax = |v: &[f32]| {
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = v.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
        v.iter().map(|x| x - lse).collect::<Vec<f32>>()
    };
    let (d, p) = (log_softmax(dense), log_softmax(paged));
    let mut top: Vec<usize> = (0..d.len()).collect();
    top.sort_by(|&a, &b| d[b].total_cmp(&d[a]));
    let diffs: Vec<f32> = top[..20].iter().map(|&i| (d[i] - p[i]).abs()).collect();
    let mean = diffs.iter().sum::<f32>() / 20.0;
    let max = diffs.iter().copied().fold(0.0, f32::max);
    assert!(
        mean < 0.2 && max < 0.6,
        "{what}: |Δlogprob| of the top 20: mean {mean} max {max}"
    );
    let paged_top = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
    let margin = d[top[0]] - d[top[1]];
    assert!(
        paged_top == top[0] || margin < 0.5,
        "{what}: top token {} vs {paged_top} (margin {margin})",
        top[0]
    );
}

#[test]
fn paged_attention_matches_the_dense_path_in_batches_at_different_positions() {
    let (mut dense, mut paged) = (load(0), load(64));
    assert!(dense.kv_usage().is_none() && paged.kv_usage().is_some());
    let text = common::load_default_model(EngineConfig::default()).tokenizer;
    // 73 tokens of real text: blocks of 16 and a partial one.
    let a = text
        .encode(&"The quick brown fox jumps over the lazy dog while the farmer watches. ".repeat(6))
        .unwrap()[..73]
        .to_vec();
    let b = text.encode("Water boils at one hundred degrees").unwrap()[..5].to_vec();
    let (mut da, mut db, mut pa, mut pb) = (
        dense.new_cache(),
        dense.new_cache(),
        paged.new_cache(),
        paged.new_cache(),
    );
    // Prefill of one, then both in one step at different positions, then decode steps.
    let run = |m: &mut Decoder, items: &mut [BatchItem<'_>]| {
        m.forward(items).unwrap().to_vec2::<f32>().unwrap()
    };
    let x = run(
        &mut dense,
        &mut [BatchItem {
            tokens: &a[..40],
            cache: &mut da,
        }],
    );
    let y = run(
        &mut paged,
        &mut [BatchItem {
            tokens: &a[..40],
            cache: &mut pa,
        }],
    );
    assert_close(&x[0], &y[0], "prefill");
    for step in 0..6 {
        let next = [a[40 + step]];
        let x = run(
            &mut dense,
            &mut [
                BatchItem {
                    tokens: &next,
                    cache: &mut da,
                },
                BatchItem {
                    tokens: if step == 0 { &b } else { &b[..1] },
                    cache: &mut db,
                },
            ],
        );
        let y = run(
            &mut paged,
            &mut [
                BatchItem {
                    tokens: &next,
                    cache: &mut pa,
                },
                BatchItem {
                    tokens: if step == 0 { &b } else { &b[..1] },
                    cache: &mut pb,
                },
            ],
        );
        for r in 0..2 {
            assert_close(&x[r], &y[r], &format!("step {step} row {r}"));
        }
    }
    assert_eq!(pa.len(), 46);
    paged.kv_release(&mut pa);
    paged.kv_release(&mut pb);
    assert_eq!(paged.kv_usage().unwrap().0, 0, "every block came back");
}

/// A deferred step abandoned between layers (an interactive request arrived) leaves every
/// cache as it was: run again, it gives exactly the logits of a step never interrupted, on
/// both layouts.
#[test]
fn an_interrupted_step_changes_no_cache_and_runs_again_to_the_same_logits() {
    let tokens: Vec<u32> = (100..140).collect();
    for kv_cache_mb in [0, 64] {
        let (mut m, mut clean) = (load(kv_cache_mb), load(kv_cache_mb));
        let (mut c, mut reference) = (m.new_cache(), clean.new_cache());
        for (model, cache) in [(&mut m, &mut c), (&mut clean, &mut reference)] {
            model
                .forward(&mut [BatchItem {
                    tokens: &tokens[..24],
                    cache,
                }])
                .unwrap();
        }
        // Asked before every layer: yes at the third, so two layers have written keys.
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let interrupt = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2;
        let err = m
            .forward_interruptible(
                &mut [BatchItem {
                    tokens: &tokens[24..],
                    cache: &mut c,
                }],
                &interrupt,
            )
            .unwrap_err();
        assert!(
            matches!(err, idlerig::model::ModelError::Interrupted),
            "{err}"
        );
        assert_eq!(c.len(), 24, "the cache did not grow");
        let step = |model: &mut Decoder, cache| {
            model
                .forward(&mut [BatchItem {
                    tokens: &tokens[24..],
                    cache,
                }])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let (again, never) = (step(&mut m, &mut c), step(&mut clean, &mut reference));
        assert_eq!(again, never, "kv_cache_mb {kv_cache_mb}");
        assert_eq!(c.len(), 40);
    }
}

#[test]
fn a_pool_too_small_for_the_sequence_is_an_error_not_a_panic() {
    let mut m = load(1); // two blocks of 16 tokens (f16 keys and values)
    let blocks = m.kv_usage().unwrap().1;
    assert_eq!(blocks, 2);
    let mut c = m.new_cache();
    let tokens: Vec<u32> = (1..(blocks * 16 + 4) as u32).collect();
    let err = m
        .forward(&mut [BatchItem {
            tokens: &tokens,
            cache: &mut c,
        }])
        .unwrap_err();
    assert!(err.to_string().contains("KV cache is full"), "{err}");
}

async fn server(kv_cache_mb: usize, max_running: usize) -> common::TestServer {
    let mut cfg = EngineConfig {
        max_running,
        ..EngineConfig::default()
    };
    cfg.model.kv_cache_mb = kv_cache_mb;
    common::spawn_app_with_model(cfg, ApiLimits::default()).await
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

async fn engine(srv: &common::TestServer) -> Value {
    srv.get("/v1/status").await["engine"].clone()
}

/// The engine's figures once it has nothing left to do (it publishes them after the last
/// sequence has left, a moment after its client got the final event).
async fn idle_engine(srv: &common::TestServer) -> Value {
    let t = Instant::now();
    loop {
        let e = engine(srv).await;
        if e["busy"] == false && e["running"] == 0 {
            return e;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "engine still busy: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const PROMPTS: [&str; 4] = [
    "The history of the printing press begins",
    "In a small village by the sea, an old fisherman",
    "Photosynthesis is the process by which",
    "The rules of chess are simple: each player",
];

/// Each prompt's greedy text when it runs alone.
async fn alone(srv: &common::TestServer, tokens: usize) -> Vec<String> {
    let mut out = Vec::new();
    for p in PROMPTS {
        let (s, b) = srv.post("/v1/completions", completion(p, tokens)).await;
        assert_eq!(s, 200, "{b}");
        out.push(b["choices"][0]["text"].as_str().unwrap().to_string());
    }
    out
}

/// The same prompts sent together: each is sent once the one before it has its first event
/// (it has joined the batch), so they join the running batch at different positions, each
/// while the others still run. Ordered by what the server sent, not by timing.
async fn together(srv: &common::TestServer, tokens: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    for p in PROMPTS {
        let mut body = completion(p, tokens);
        body["stream"] = json!(true);
        let res = srv.send("/v1/completions", &body).await;
        assert_eq!(res.status(), 200);
        let mut chunks = res.bytes_stream();
        let first = chunks.next().await.expect("a first event").unwrap();
        bodies.push((first.to_vec(), chunks));
    }
    let mut texts = Vec::new();
    for (mut body, mut chunks) in bodies {
        while let Some(c) = chunks.next().await {
            body.extend_from_slice(&c.unwrap());
        }
        let body = String::from_utf8(body).unwrap();
        let mut text = String::new();
        for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if data != "[DONE]" {
                let event: Value = serde_json::from_str(data).unwrap();
                text.push_str(event["choices"][0]["text"].as_str().unwrap_or(""));
            }
        }
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        texts.push(text);
    }
    texts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_sequences_give_the_tokens_they_give_alone() {
    let srv = server(1024, 8).await;
    let solo = alone(&srv, 24).await;
    let batched = together(&srv, 24).await;
    assert_eq!(solo, batched);
    assert_eq!(idle_engine(&srv).await["kv_preemptions"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_pre_empts_and_recomputes_without_changing_the_output() {
    // 3 MiB hold 8 blocks of 16 tokens (360 KiB each, f16): enough for any one of these
    // sequences (~10 prompt tokens + 40 generated = 4 blocks), not for four at once.
    exhausted_cache_pre_empts_and_recomputes(server(3, 8).await, 40).await;
}

/// The same with CUDA's layout (dense per-sequence caches under a 6 MiB budget, 128 tokens).
/// A sequence reserves 64 tokens at first, so a third waits while two run; 60 generated
/// tokens take each past 64, and growing the first needs the second's room: it is pre-empted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_dense_budget_pre_empts_and_recomputes_without_changing_the_output() {
    let mut cfg = EngineConfig {
        max_running: 8,
        ..EngineConfig::default()
    };
    cfg.model.kv_cache_mb = 6;
    cfg.model.dense_kv = true;
    cfg.model.own_kernels = false;
    exhausted_cache_pre_empts_and_recomputes(
        common::spawn_app_with_model(cfg, Default::default()).await,
        60,
    )
    .await;
}

async fn exhausted_cache_pre_empts_and_recomputes(srv: common::TestServer, tokens: usize) {
    assert_eq!(engine(&srv).await["kv_blocks_total"], 8);
    let solo = alone(&srv, tokens).await;
    let batched = together(&srv, tokens).await;
    assert_eq!(solo, batched);
    let e = idle_engine(&srv).await;
    assert!(e["kv_preemptions"].as_u64().unwrap() > 0, "{e}");
    assert_eq!(e["kv_blocks_used"], 0, "{e}");
    // A prompt longer than the whole pool is refused up front.
    let long = "word ".repeat(200);
    let (s, b) = srv.post("/v1/completions", completion(&long, 4)).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "context_length_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_served_from_the_cache_and_reported() {
    let srv = server(1024, 8).await;
    let system = "You are a careful assistant for a small lab. Answer briefly, cite no sources, \
                  and say so when you do not know. Keep units in SI. Never invent data.";
    let chat = |q: &str| {
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
               "max_tokens": 12, "temperature": 0})
    };
    let (s, first) = srv
        .post("/v1/chat/completions", chat("What is a volt?"))
        .await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    // The same conversation again: everything but the last partial block comes from the cache.
    let (_, again) = srv
        .post("/v1/chat/completions", chat("What is a volt?"))
        .await;
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= prompt_tokens - 16 && cached < prompt_tokens,
        "{cached} of {prompt_tokens}"
    );
    assert_eq!(
        again["choices"][0]["message"],
        first["choices"][0]["message"]
    );
    // Another question after the same system prompt shares the system prompt's blocks.
    let (_, other) = srv
        .post("/v1/chat/completions", chat("What is an ampere?"))
        .await;
    let cached = other["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 32, "{other}");
    // Streams report it in the usage chunk too.
    let mut body = chat("What is a volt?");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (events, done) = srv.stream("/v1/chat/completions", body).await;
    assert!(done);
    let usage = &events.last().unwrap()["usage"];
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{usage}"
    );
    assert_eq!(idle_engine(&srv).await["kv_blocks_used"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_gives_its_blocks_back() {
    let srv = server(1024, 8).await;
    let mut body = completion("Once upon a time", 4000);
    body["stream"] = json!(true);
    let res = srv.send("/v1/completions", &body).await;
    let mut chunks = res.bytes_stream();
    for _ in 0..20 {
        chunks.next().await.unwrap().unwrap();
    }
    let held = engine(&srv).await["kv_blocks_used"].as_u64().unwrap();
    assert!(held >= 2, "a running sequence holds blocks: {held}");
    drop(chunks);
    let t = Instant::now();
    loop {
        let e = engine(&srv).await;
        if e["kv_blocks_used"] == 0 && e["running"] == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "blocks not freed: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the engine until `ready` holds of its status (10 s at most).
async fn engine_until(srv: &common::TestServer, what: &str, ready: impl Fn(&Value) -> bool) {
    let t = Instant::now();
    loop {
        let e = engine(srv).await;
        if ready(&e) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: {e}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One sequence runs (a stream held open); a low- and then a high-priority request queue
/// behind it, each seen waiting before the next is sent; when the stream is dropped the
/// high-priority one is admitted first. Ordered by the engine's state, not by timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_request_is_admitted_first() {
    let srv = &server(1024, 1).await;
    let mut body = completion(PROMPTS[3], 4000);
    body["stream"] = json!(true);
    let mut running = srv.send("/v1/completions", &body).await.bytes_stream();
    running.next().await.unwrap().unwrap();
    let waiting = |n: u64| move |e: &Value| e["waiting_by_tier"]["default"] == n;
    let send = move |prompt: &'static str, priority: i64| async move {
        let mut body = completion(prompt, 8);
        body["priority"] = json!(priority);
        let (s, b) = srv.post("/v1/completions", body).await;
        assert_eq!(s, 200, "{b}");
        Instant::now()
    };
    let low = send(PROMPTS[1], 10);
    let high = async move {
        engine_until(srv, "the low-priority request waits", waiting(1)).await;
        send(PROMPTS[2], -10).await
    };
    let release = async move {
        engine_until(srv, "both requests wait behind the stream", waiting(2)).await;
        drop(running);
    };
    let (low, high, ()) = tokio::join!(low, high, release);
    assert!(
        high < low,
        "the priority -10 request finished after the priority 10 one"
    );
}
