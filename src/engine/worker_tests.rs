//! The engine thread with the real default model and injected panics (a request whose id is
//! `inject-panic:PLACE`): a panic while one sequence samples fails that sequence alone, with
//! the others of the same step finishing as if nothing happened; a panic while a request is
//! admitted fails that request, and the engine thread lives on to serve the next.

use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{
    load_model, EngineConfig, SamplingParams, SeqEvent, ServedModel, ServiceTier, ValidRequest,
};

fn model() -> ServedModel {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(crate::config::DEFAULT_MODEL_RELATIVE);
    load_model(&path, &candle_core::Device::Cpu, EngineConfig::default())
        .expect("the default model")
}

fn request(m: &ServedModel, id: &str) -> ValidRequest {
    valid(
        m.tokenizer.encode("The capital of France is").unwrap(),
        0,
        6,
        id,
    )
}

/// A greedy interactive request of `prompt`, generating `max_tokens` past any end token.
fn valid(prompt: Vec<u32>, priority: i64, max_tokens: usize, id: &str) -> ValidRequest {
    ValidRequest {
        prompt,
        max_tokens,
        n: 1,
        stop: Vec::new(),
        params: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ignore_eos: true,
        request_id: id.into(),
        priority,
        constraint: None,
        tier: ServiceTier::Interactive,
    }
}

/// Every event until the request ends: `Ok(tokens)` when it finished, `Err(message)` when it
/// failed. Blocks on the channel: the engine always ends a request one way or the other.
fn outcome(mut rx: UnboundedReceiver<SeqEvent>) -> Result<usize, String> {
    let mut tokens = 0;
    loop {
        match rx.blocking_recv() {
            Some(SeqEvent::Token { .. }) => tokens += 1,
            Some(SeqEvent::Finished { .. }) => return Ok(tokens),
            Some(SeqEvent::Failed { message }) => return Err(message),
            None => return Err("the engine dropped the request".into()),
        }
    }
}

#[test]
fn a_panic_while_sampling_fails_that_sequence_alone() {
    let m = model();
    // Submitted together, so that they share steps: the panicking one and two others.
    let a = m.backend.submit(request(&m, "a")).unwrap();
    let bad = m
        .backend
        .submit(request(&m, "inject-panic:sample"))
        .unwrap();
    let b = m.backend.submit(request(&m, "b")).unwrap();
    let failed = outcome(bad).expect_err("the injected panic fails its request");
    assert!(failed.contains("injected panic in sample"), "{failed}");
    assert_eq!(outcome(a), Ok(6), "a request beside it finishes whole");
    assert_eq!(outcome(b), Ok(6));
}

#[test]
fn a_panic_while_admitting_fails_that_request_and_the_engine_lives_on() {
    let m = model();
    let bad = m.backend.submit(request(&m, "inject-panic:admit")).unwrap();
    let failed = outcome(bad).expect_err("the injected panic fails its request");
    assert!(failed.contains("admitting"), "{failed}");
    // The engine thread is alive: the next request is served, and the engine is not left
    // looking busy.
    assert_eq!(
        outcome(m.backend.submit(request(&m, "after")).unwrap()),
        Ok(6)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while m.stats.is_busy() {
        assert!(
            std::time::Instant::now() < deadline,
            "the engine stays busy"
        );
        std::thread::yield_now();
    }
}

/// The engine driven by hand, step by step (no thread, no clock): a pool of `kv_cache_mb`.
fn engine_by_hand(
    kv_cache_mb: usize,
) -> (super::Engine, std::sync::Arc<crate::engine::TextTokenizer>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(crate::config::DEFAULT_MODEL_RELATIVE);
    let files = crate::model::ModelFiles::open(&path).unwrap();
    let tokenizer = std::sync::Arc::new(
        crate::engine::TextTokenizer::from_gguf(files.gguf_metadata().unwrap()).unwrap(),
    );
    let cfg = EngineConfig {
        model: crate::model::LoadOptions {
            kv_cache_mb,
            ..Default::default()
        },
        ..EngineConfig::default()
    };
    let model = files
        .load_model(&candle_core::Device::Cpu, cfg.model.clone())
        .unwrap();
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let engine = super::Engine {
        model,
        tokenizer: tokenizer.clone(),
        cfg,
        rx,
        running: Vec::new(),
        waiting: Default::default(),
        stats: Default::default(),
        next_order: 0,
    };
    (engine, tokenizer)
}

fn submit(
    engine: &mut super::Engine,
    prompt: Vec<u32>,
    priority: i64,
    max_tokens: usize,
    id: &str,
) -> UnboundedReceiver<SeqEvent> {
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = valid(prompt, priority, max_tokens, id);
    engine.waiting.push_back(crate::engine::Submission {
        request,
        submitted_at: std::time::Instant::now(),
        events,
    });
    engine.admit();
    rx
}

/// A higher-ranked long prompt behind a lower-ranked decoder that holds part of a small pool:
/// it takes the largest chunk that fits at once, then the decoder's blocks, and finishes its
/// prefill. It used to wait for a whole chunk that never came, and, once the decoder needed
/// the rest, be ended as "longer than the whole KV cache" though it fitted.
#[test]
fn a_higher_ranked_prompt_is_never_starved_by_lower_ranked_decoders() {
    let (mut e, _) = engine_by_hand(2);
    let (_, total, per_block) = e.model.kv_usage().unwrap();
    assert_eq!(
        (total, per_block),
        (5, 16),
        "SmolLM2's 23 KB a token: 5 blocks in 2 MiB"
    );
    let prompt = |n: u32| (0..n).map(|i| 1000 + i * 7).collect::<Vec<u32>>();
    // The decoder: 30 prompt tokens (2 blocks), generating for a long time.
    let _b = submit(&mut e, prompt(30), 0, 1000, "decoder");
    while e.running[0].generated == 0 {
        e.step();
    }
    // The long prompt, ranked first (priority -1): 64 tokens, 4 blocks; 3 are available.
    let mut a = submit(
        &mut e,
        prompt(64).into_iter().rev().collect(),
        -1,
        2,
        "long",
    );
    assert_eq!(&*e.running[0].request_id, "long", "it ranks first");
    e.step();
    assert!(
        e.running[0].cache.len() >= 32,
        "the largest chunk that fits is taken at once ({} tokens cached)",
        e.running[0].cache.len()
    );
    for _ in 0..10 {
        if e.running.first().is_none_or(|s| &*s.request_id != "long") {
            break;
        }
        e.step();
    }
    let mut tokens = 0;
    loop {
        match a.try_recv() {
            Ok(SeqEvent::Token { .. }) => tokens += 1,
            Ok(SeqEvent::Finished { .. }) => break,
            other => panic!("the long prompt did not finish: {other:?} after {tokens} tokens"),
        }
    }
    assert_eq!(tokens, 2);
    assert!(
        e.stats
            .preemptions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}
