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
    ValidRequest {
        prompt: m.tokenizer.encode("The capital of France is").unwrap(),
        max_tokens: 6,
        n: 1,
        stop: Vec::new(),
        params: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        ignore_eos: true,
        request_id: id.into(),
        priority: 0,
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
