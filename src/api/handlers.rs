//! Request handlers: parse the body, validate, submit to the engine, and answer either as one
//! JSON document or as a stream of server-sent events.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::engine::{FinishReason, SeqEvent, ServedModel, TokenLogprob, ValidRequest};

use super::context::RequestId;
use super::error::ApiError;
use super::lifecycle::{InFlight, Watchdog};
use super::stream::{sse_response, Endpoint, StreamGuards};
use super::timing::RequestTimer;
use super::validate::{validate_chat, validate_completion, ApiLimits, ResponsePlan};
use super::wire::{chat_logprob_entry, completion_logprobs, ChatRequest, CompletionRequest, Usage};
use super::AppState;

/// Reads the body as one JSON object.
fn parse_json(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body is not valid JSON: {e}")).with_code("invalid_json")
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(v)
}

/// Deserializes `T` from the body, naming the field at fault in the error (`messages[0].role`).
fn fields<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("invalid request: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("invalid `{path}`: {inner}"))
        }
    })
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let parse = |v: &Value| {
        Ok(ChatRequest {
            common: fields(v)?,
            chat: fields(v)?,
        })
    };
    answer(state, id, body, Endpoint::Chat, parse, validate_chat).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let parse = |v: &Value| {
        Ok(CompletionRequest {
            common: fields(v)?,
            completion: fields(v)?,
        })
    };
    answer(
        state,
        id,
        body,
        Endpoint::Completion,
        parse,
        validate_completion,
    )
    .await
}

/// Admits, parses, validates and answers one generation request. Parsing (up to
/// `--max-body-bytes` of JSON) and validation (the chat template, the tokenizer) are CPU work
/// of unbounded length for the async runtime's few threads: they run on the blocking pool.
async fn answer<R: Send + 'static>(
    state: AppState,
    id: RequestId,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
    parse: impl FnOnce(&Value) -> Result<R, ApiError> + Send + 'static,
    validate: impl FnOnce(R, &ServedModel, &ApiLimits) -> Result<(ValidRequest, ResponsePlan), ApiError>
        + Send
        + 'static,
) -> Result<Response, ApiError> {
    let at = Instant::now();
    let in_flight = state.lifecycle.enter()?;
    // Held until the request is in the engine's hands; from then on the engine's busy flag
    // keeps the miner off.
    let _admitted = state.admit();
    let limit = state.limits.max_body_bytes;
    let req = off_runtime(move || parse(&parse_json(body, limit)?)).await?;
    let model = state.ready_model()?;
    let (m, limits) = (model.clone(), state.limits.clone());
    let request = off_runtime(move || validate(req, &m, &limits)).await?;
    let started = Started { id, at, in_flight };
    generate(&state, &model, endpoint, request, started).await
}

/// Runs `f` on the blocking pool.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request validation failed: {e}")))?
}

/// A request from its arrival: its id, when it came, and its place among those in flight.
struct Started {
    id: RequestId,
    at: Instant,
    in_flight: InFlight,
}

/// Submits a validated request and answers it, streamed or whole.
async fn generate(
    state: &AppState,
    model: &ServedModel,
    endpoint: Endpoint,
    (mut valid, plan): (ValidRequest, ResponsePlan),
    started: Started,
) -> Result<Response, ApiError> {
    valid.request_id = started.id.0.to_string();
    let n = valid.n;
    let mut timer = RequestTimer::new(state.telemetry.clone(), started.at, plan.prompt_tokens);
    let mut watchdog = state.watchdog(started.at);
    let events = model.backend.submit(valid)?;
    if plan.stream {
        let guards = StreamGuards {
            timer,
            watchdog,
            _in_flight: started.in_flight,
        };
        return Ok(sse_response(endpoint, plan, n, events, guards));
    }
    let choices = collect(events, n, &mut timer, &mut watchdog).await?;
    let body = match endpoint {
        Endpoint::Chat => chat_body(&plan, &choices),
        Endpoint::Completion => completion_body(&plan, &choices),
    };
    Ok(Json(body).into_response())
}

pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": state.model_id, "object": "model", "created": state.started_at, "owned_by": "idlerig" }],
    }))
}

pub async fn health(State(state): State<AppState>) -> Response {
    match state.load_state() {
        super::LoadState::Ready(_) => {
            (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
        }
        super::LoadState::Loading(progress) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading", "progress": (progress * 100.0).round() / 100.0})),
        )
            .into_response(),
        super::LoadState::Failed(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "error": e})),
        )
            .into_response(),
    }
}

/// The arbiter's figures: device time split, pre-emption latency, hashrate, shares, pool.
pub async fn status(State(state): State<AppState>) -> Json<Value> {
    let engine = match state.load_state() {
        super::LoadState::Ready(m) => json!({
            "running": m.stats.running(),
            "generated_tokens": m.stats.generated_tokens(),
            "prefilled_tokens": m.stats.prefilled_tokens.load(std::sync::atomic::Ordering::Relaxed),
            "kv_blocks_used": m.stats.kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed),
            "kv_blocks_total": m.stats.kv_blocks_total.load(std::sync::atomic::Ordering::Relaxed),
            "kv_preemptions": m.stats.preemptions.load(std::sync::atomic::Ordering::Relaxed),
            "busy": m.stats.is_busy(),
        }),
        _ => Value::Null,
    };
    let mining = match &state.status {
        Some(rx) => serde_json::to_value(&*rx.borrow()).unwrap_or(Value::Null),
        None => json!({"mining_enabled": false}),
    };
    let telemetry = state
        .snapshot
        .as_ref()
        .map(|rx| serde_json::to_value(&*rx.borrow()).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    Json(json!({
        "model": state.model_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": now_unix().saturating_sub(state.started_at),
        "draining": state.lifecycle.is_draining(),
        "requests_in_flight": state.lifecycle.in_flight(),
        "engine": engine,
        "mining": mining,
        "telemetry": telemetry,
    }))
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(m) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::telemetry::prometheus::CONTENT_TYPE,
            )],
            m.encode(),
        )
            .into_response(),
        None => ApiError::not_found("metrics are not enabled on this server").into_response(),
    }
}

pub async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such endpoint; see /v1/chat/completions, /v1/completions, /v1/models, /health",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// One choice, gathered from the engine's events.
#[derive(Debug, Default)]
pub(crate) struct CollectedChoice {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

async fn collect(
    mut events: tokio::sync::mpsc::UnboundedReceiver<SeqEvent>,
    n: usize,
    timer: &mut RequestTimer,
    watchdog: &mut Watchdog,
) -> Result<Vec<CollectedChoice>, ApiError> {
    let mut choices: Vec<CollectedChoice> = (0..n).map(|_| CollectedChoice::default()).collect();
    let mut open = n;
    while open > 0 {
        let event = watchdog
            .next(&mut events)
            .await
            .inspect_err(|_| timer.aborted())?;
        if let Some(e) = &event {
            timer.observe(e);
        }
        match event {
            Some(SeqEvent::Token {
                choice,
                text,
                logprob,
            }) => {
                let c = &mut choices[choice];
                c.text.push_str(&text);
                c.logprobs.extend(logprob);
            }
            Some(SeqEvent::Finished {
                choice,
                reason,
                completion_tokens,
                cached_tokens,
            }) => {
                choices[choice].cached_tokens = cached_tokens;
                choices[choice].finish_reason = Some(reason);
                choices[choice].completion_tokens = completion_tokens;
                open -= 1;
            }
            Some(SeqEvent::Failed { message }) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("the engine dropped the request")),
        }
    }
    Ok(choices)
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

fn usage_of(plan: &ResponsePlan, choices: &[CollectedChoice]) -> Usage {
    Usage::new(
        plan.prompt_tokens,
        choices.iter().map(|c| c.completion_tokens).sum(),
        choices.iter().map(|c| c.cached_tokens).max().unwrap_or(0),
    )
}

fn chat_body(plan: &ResponsePlan, choices: &[CollectedChoice]) -> Value {
    json!({
        "id": response_id("chatcmpl"),
        "object": "chat.completion",
        "created": now_unix(),
        "model": plan.model,
        "choices": choices.iter().enumerate().map(|(i, c)| json!({
            "index": i,
            "message": { "role": "assistant", "content": c.text },
            "logprobs": if plan.logprobs { json!({"content": c.logprobs.iter().map(chat_logprob_entry).collect::<Vec<_>>()}) } else { Value::Null },
            "finish_reason": c.finish_reason.map(FinishReason::as_str),
        })).collect::<Vec<_>>(),
        "usage": usage_of(plan, choices),
    })
}

fn completion_body(plan: &ResponsePlan, choices: &[CollectedChoice]) -> Value {
    json!({
        "id": response_id("cmpl"),
        "object": "text_completion",
        "created": now_unix(),
        "model": plan.model,
        "choices": choices.iter().enumerate().map(|(i, c)| json!({
            "index": i,
            "text": c.text,
            "logprobs": if plan.logprobs { completion_logprobs(&c.logprobs, 0) } else { Value::Null },
            "finish_reason": c.finish_reason.map(FinishReason::as_str),
        })).collect::<Vec<_>>(),
        "usage": usage_of(plan, choices),
    })
}
