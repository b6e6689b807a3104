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
    engine_with_share(kv_cache_mb, EngineConfig::default().deferred_min_share)
}

/// As [`engine_by_hand`], with deferred work guaranteed `share` of the time.
fn engine_with_share(
    kv_cache_mb: usize,
    share: f64,
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
        deferred_min_share: share,
        ..EngineConfig::default()
    };
    let model = files
        .load_model(&candle_core::Device::Cpu, cfg.model.clone())
        .unwrap();
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let engine = super::Engine {
        model,
        tokenizer: tokenizer.clone(),
        share: super::DeferredShare::new(cfg.deferred_min_share, cfg.deferred_aging),
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
    submit_tier(
        engine,
        prompt,
        priority,
        max_tokens,
        id,
        ServiceTier::Interactive,
    )
}

fn submit_tier(
    engine: &mut super::Engine,
    prompt: Vec<u32>,
    priority: i64,
    max_tokens: usize,
    id: &str,
    tier: ServiceTier,
) -> UnboundedReceiver<SeqEvent> {
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = ValidRequest {
        tier,
        ..valid(prompt, priority, max_tokens, id)
    };
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

/// Tokens received so far, and whether the request has finished.
fn drain(rx: &mut UnboundedReceiver<SeqEvent>, tokens: &mut usize) -> bool {
    loop {
        match rx.try_recv() {
            Ok(SeqEvent::Token { .. }) => *tokens += 1,
            Ok(SeqEvent::Finished { .. }) => return true,
            Ok(SeqEvent::Failed { message }) => panic!("failed: {message}"),
            Err(_) => return false,
        }
    }
}

/// Interactive work that never lets up (long generations, another request always waiting
/// behind the running set) and a flex request: with a share the flex request is admitted and
/// finishes while the interactive work still runs; it used to wait for a gap that never came.
/// With a pool of 5 blocks that the interactive sequences have filled, the flex request's
/// owed rows take blocks from the lowest-ranked interactive sequence.
#[test]
fn deferred_work_finishes_under_steady_interactive_load() {
    for (kv_mb, share) in [(64, 0.0), (64, 0.25), (2, 0.25)] {
        let (mut e, tok) = engine_with_share(kv_mb, share);
        e.cfg.max_running = 2;
        let prompt = tok.encode("Once upon a time").unwrap();
        let _busy: Vec<_> = (0..3)
            .map(|i| submit(&mut e, prompt.clone(), 0, 4000, &format!("i{i}")))
            .collect();
        for _ in 0..400 {
            let (used, total, _) = e.model.kv_usage().unwrap();
            if kv_mb > 2 || used == total {
                break;
            }
            e.step();
        }
        let (used, total, _) = e.model.kv_usage().unwrap();
        assert!(
            kv_mb > 2 || used == total,
            "the interactive sequences fill the pool"
        );
        let preempted = e
            .stats
            .preemptions
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut flex = submit_tier(
            &mut e,
            tok.encode("The capital of France is").unwrap(),
            0,
            8,
            "flex",
            ServiceTier::Deferred,
        );
        let (mut tokens, mut done) = (0, false);
        for _ in 0..600 {
            e.step();
            e.admit();
            if drain(&mut flex, &mut tokens) {
                done = true;
                break;
            }
        }
        let interactive = e
            .running
            .iter()
            .filter(|s| s.tier == ServiceTier::Interactive);
        assert_eq!(interactive.count(), 2, "the interactive load never let up");
        let owed = e
            .stats
            .deferred_owed_steps
            .load(std::sync::atomic::Ordering::Relaxed);
        if share == 0.0 {
            assert!(
                !done && tokens == 0,
                "without a share, no gap: nothing ran ({tokens})"
            );
        } else {
            assert!(
                done,
                "{kv_mb} MiB: the flex request finished beside the load ({tokens} tokens)"
            );
            assert_eq!(tokens, 8);
            assert!(owed >= 8, "{owed} steps carried deferred rows");
        }
        if kv_mb == 2 {
            let now = e
                .stats
                .preemptions
                .load(std::sync::atomic::Ordering::Relaxed);
            assert!(
                now > preempted,
                "the flex request's blocks came from interactive work"
            );
        }
    }
}

/// A step paused between layers (as a deferred step is by an arriving interactive request)
/// keeps the layers it finished: run again, it resumes there, runs only the layers left, and
/// gives the logits an uninterrupted step gives. A step whose cache changed meanwhile starts
/// over.
#[test]
fn an_interrupted_step_resumes_at_the_layer_it_stopped_before() {
    use crate::model::BatchItem;
    let (mut e, tok) = engine_by_hand(64);
    let m = &mut e.model;
    let layers = m.config().num_layers as u64;
    let prompt = tok.encode("The capital of France is").unwrap();
    let mut fresh = m.new_cache();
    let expected = m
        .forward(&mut [BatchItem {
            tokens: &prompt,
            cache: &mut fresh,
        }])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    m.kv_release(&mut fresh);
    for stop_at in [0, 7, 2 * layers - 1] {
        let mut cache = m.new_cache();
        let asked = std::sync::atomic::AtomicU64::new(0);
        // Asked twice a layer (before attention, before the MLP): yes on call `stop_at`.
        let interrupt = || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == stop_at;
        let before = m.layers_run();
        let err = m
            .forward_interruptible(
                &mut [BatchItem {
                    tokens: &prompt,
                    cache: &mut cache,
                }],
                &interrupt,
            )
            .unwrap_err();
        assert!(
            matches!(err, crate::model::ModelError::Interrupted),
            "{err}"
        );
        assert_eq!(cache.len(), 0, "nothing is committed");
        let finished = m.layers_run() - before;
        let resumed_at = stop_at / 2;
        let before = m.layers_run();
        let got = m
            .forward(&mut [BatchItem {
                tokens: &prompt,
                cache: &mut cache,
            }])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(
            m.layers_run() - before,
            layers - resumed_at,
            "resumed at layer {resumed_at} ({finished} started before the pause)"
        );
        assert_eq!(cache.len(), prompt.len());
        let diff = expected[0]
            .iter()
            .zip(&got[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-4,
            "resumed logits differ by {diff} (stopped at {stop_at})"
        );
        m.kv_release(&mut cache);
    }
    // Paused, then the cache emptied (a pre-emption): the step starts over.
    let mut cache = m.new_cache();
    let _ = m.forward_interruptible(
        &mut [BatchItem {
            tokens: &prompt,
            cache: &mut cache,
        }],
        &|| always(),
    );
    m.kv_release(&mut cache);
    let before = m.layers_run();
    m.forward(&mut [BatchItem {
        tokens: &prompt,
        cache: &mut cache,
    }])
    .unwrap();
    assert_eq!(
        m.layers_run() - before,
        layers,
        "a released cache resumes nothing"
    );
}

/// An interrupt that stops every step at once.
fn always() -> bool {
    true
}

/// More interactive requests than the KV pool holds: each is admitted only when the pool
/// holds its prompt beside what the running ones still need, so they run in turn and none is
/// pre-empted to recompute. They used to be admitted all at once, and pre-empt each other.
#[test]
fn interactive_requests_are_admitted_as_the_pool_holds_them() {
    let (mut e, _) = engine_by_hand(2);
    let (_, total, per_block) = e.model.kv_usage().unwrap();
    assert_eq!(total * per_block, 80, "5 blocks of 16 tokens");
    // 40-token prompts and 8 tokens each: 3 blocks a request, one at a time fits.
    let prompt = |k: u32| (0..40).map(|i| 1000 + k * 97 + i * 7).collect::<Vec<u32>>();
    let mut rx: Vec<_> = (0..3)
        .map(|k| submit(&mut e, prompt(k), 0, 8, &format!("r{k}")))
        .collect();
    assert_eq!(
        (e.running.len(), e.waiting.len()),
        (1, 2),
        "one runs, two wait"
    );
    let mut finished = vec![false; 3];
    for _ in 0..200 {
        e.step();
        e.admit();
        for (k, r) in rx.iter_mut().enumerate() {
            let mut n = 0;
            finished[k] |= drain(r, &mut n);
        }
        if finished.iter().all(|&f| f) {
            break;
        }
    }
    assert_eq!(finished, [true; 3], "all three finished in turn");
    assert_eq!(
        e.stats
            .preemptions
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing was pre-empted to recompute"
    );
}
