//! Request handlers: parse the body, validate, submit to the engine, and answer either as one
//! JSON document or as a stream of server-sent events.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::engine::{FinishReason, SeqEvent, ServedModel, ServiceTier, TokenLogprob, ValidRequest};

use super::auth::KeyIdentity;
use super::bodies::ToolCall;
use super::bodies::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, Completion, CompletionChoice,
    CompletionLogprobs, EngineStatus, Health, ModelCard, ModelList, ServerStatus,
};
use super::context::RequestId;
use super::error::ApiError;
use super::generation::Generation;
use super::lifecycle::{InFlight, Watchdog};
use super::reasoning::ReasoningSplitter;
use super::stream::{sse_response, Endpoint, StreamGuards};
use super::timing::RequestTimer;
use super::validate::{validate_chat, validate_completion, ApiLimits, ResponsePlan};
use super::wire::{ChatRequest, CompletionRequest, Usage};
use super::AppState;

/// Reads the body as one JSON object.
pub(super) fn parse_json(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Value, ApiError> {
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
pub(super) fn fields<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
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

/// Creates a chat completion: one JSON document, or with `stream` a stream of server-sent
/// events (`ChatCompletionChunk`s, then `[DONE]`).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI",
    request_body = super::wire::ChatRequestDoc,
    responses(
        (status = 200, description = "The completion; with `stream`, server-sent events",
            content((ChatCompletion = "application/json"), (super::openapi::ChatEvent = "text/event-stream"))),
        (status = "4XX", description = "A bad request, a missing key, a full queue", body = super::bodies::ErrorResponse),
        (status = "5XX", description = "The model is loading or failed, the server drains, the request timed out", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    batch: Option<Extension<super::BatchCaller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let parse = |v: &Value| {
        Ok(ChatRequest {
            common: fields(v)?,
            chat: fields(v)?,
        })
    };
    let who = who.map(|Extension(w)| w);
    let caller = Caller {
        id,
        who,
        batch: batch.is_some(),
    };
    answer(state, caller, body, Endpoint::Chat, parse, validate_chat).await
}

/// Creates a legacy text completion: one JSON document, or with `stream` server-sent events
/// (`Completion` chunks, then `[DONE]`).
#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI",
    request_body = super::wire::CompletionRequestDoc,
    responses(
        (status = 200, description = "The completion; with `stream`, server-sent events",
            content((Completion = "application/json"), (super::openapi::CompletionEvent = "text/event-stream"))),
        (status = "4XX", description = "A bad request, a missing key, a full queue", body = super::bodies::ErrorResponse),
        (status = "5XX", description = "The model is loading or failed, the server drains, the request timed out", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    batch: Option<Extension<super::BatchCaller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let parse = |v: &Value| {
        Ok(CompletionRequest {
            common: fields(v)?,
            completion: fields(v)?,
        })
    };
    let who = who.map(|Extension(w)| w);
    let caller = Caller {
        id,
        who,
        batch: batch.is_some(),
    };
    answer(
        state,
        caller,
        body,
        Endpoint::Completion,
        parse,
        validate_completion,
    )
    .await
}

/// Who sent a generation request: its id, its key's owner, and whether it is deferred work
/// of the server's own (a batch line, a background response: always deferred).
pub(super) struct Caller {
    pub id: RequestId,
    pub who: Option<Arc<KeyIdentity>>,
    pub batch: bool,
}

/// Admits, parses, validates and answers one generation request. Parsing (up to
/// `--max-body-bytes` of JSON) and validation (the chat template, the tokenizer) are CPU work
/// of unbounded length for the async runtime's few threads: they run on the blocking pool.
async fn answer<R: Send + 'static>(
    state: AppState,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
    parse: impl FnOnce(&Value) -> Result<R, ApiError> + Send + 'static,
    validate: impl FnOnce(R, &ServedModel, &ApiLimits) -> Result<(ValidRequest, ResponsePlan), ApiError>
        + Send
        + 'static,
) -> Result<Response, ApiError> {
    let admitted = Admitted::enter(&state, caller)?;
    let limit = state.limits.max_body_bytes;
    let (requested, req) = off_runtime(move || {
        let v = parse_json(body, limit)?;
        Ok((requested_model(&v), parse(&v)?))
    })
    .await?;
    let gen = admitted.submit(&state, requested, req, validate).await?;
    if gen.plan.stream {
        return Ok(sse_response(endpoint, gen));
    }
    let Generation {
        mut events,
        plan,
        n,
        mut guards,
    } = gen;
    let choices = collect(&mut events, n, &mut guards.timer, &mut guards.watchdog).await?;
    Ok(match endpoint {
        Endpoint::Chat => Json(chat_body(&plan, &choices)).into_response(),
        Endpoint::Completion => Json(completion_body(&plan, &choices)).into_response(),
    })
}

/// The body's `model`, if it names one.
pub(super) fn requested_model(v: &Value) -> Option<String> {
    v.get("model").and_then(Value::as_str).map(str::to_string)
}

/// A generation request from its arrival until the engine has it: its place among those in
/// flight, the miner pre-empted for it, and (until it is known to be deferred work) its count
/// among the interactive requests on their way in, which its engine's deferred steps yield to.
pub(super) struct Admitted {
    caller: Caller,
    at: Instant,
    in_flight: InFlight,
    /// Held until the request is in the engine's hands; from then on the engine's busy flag
    /// keeps the miner off.
    gate: Option<crate::arbiter::AdmissionGuard>,
    arriving: Option<crate::engine::ArrivalGuard>,
}

impl Admitted {
    /// Admits a request (or refuses it: a spent quota, a draining server). With one chat
    /// model its engine is known before the body is read; with several, once `model` has
    /// routed it (another model's traffic never interrupts).
    pub(super) fn enter(state: &AppState, caller: Caller) -> Result<Self, ApiError> {
        let at = Instant::now();
        state.check_quota(caller.who.as_deref())?;
        let in_flight = state.lifecycle.enter()?;
        let mut gate = state.admit();
        let arriving = (!caller.batch)
            .then(|| state.only_model())
            .flatten()
            .map(|m| m.stats.arrivals.enter());
        if caller.batch {
            if let Some(g) = gate.as_mut() {
                g.set_tier(ServiceTier::Deferred);
            }
        }
        Ok(Self {
            caller,
            at,
            in_flight,
            gate,
            arriving,
        })
    }

    /// Routes the request to its model, validates it there, holds what it may spend of its
    /// key's quota, and submits it.
    pub(super) async fn submit<R: Send + 'static>(
        mut self,
        state: &AppState,
        requested: Option<String>,
        req: R,
        validate: impl FnOnce(R, &ServedModel, &ApiLimits) -> Result<(ValidRequest, ResponsePlan), ApiError>
            + Send
            + 'static,
    ) -> Result<Generation, ApiError> {
        // Routed by `model`: each chat model has an engine of its own.
        let model = state.ready_model(requested.as_deref())?;
        let batch = self.caller.batch;
        if !batch && self.arriving.is_none() {
            self.arriving = Some(model.stats.arrivals.enter());
        }
        let (m, limits) = (model.clone(), state.limits.clone());
        let (mut valid, mut plan) = off_runtime(move || validate(req, &m, &limits)).await?;
        if batch {
            (valid.tier, plan.tier) = (ServiceTier::Deferred, ServiceTier::Deferred);
        }
        // What it may spend is held against the key's quota now, before the engine sees it:
        // many requests at once cannot each find the same tokens left.
        let ask = crate::usage::QuotaAsk {
            prompt: plan.prompt_tokens as u64,
            choices: valid.n as u64,
            completion: valid.max_tokens as u64,
        };
        let quota =
            state
                .reserve_quota(self.caller.who.as_deref(), ask)?
                .map(|(hold, max_tokens)| {
                    valid.max_tokens = max_tokens as usize;
                    hold
                });
        if let Some(g) = self.gate.as_mut() {
            g.set_tier(valid.tier);
        }
        if valid.tier == ServiceTier::Deferred {
            self.arriving = None;
        }
        valid.request_id = self.caller.id.0.to_string();
        let n = valid.n;
        let timer = RequestTimer::new(state.telemetry.clone(), self.at, plan.prompt_tokens);
        let watchdog = state.watchdog(self.at, valid.tier);
        let events = model.backend.submit(valid);
        // In the engine's hands (or refused): no longer on its way.
        self.arriving = None;
        let events = events?;
        // Counted from here on: a request the engine refused (a full queue) ran nothing, and
        // its quota hold is released as it drops.
        let usage = state.usage.clone().zip(self.caller.who);
        let timer = timer.with_usage(usage, quota);
        Ok(Generation {
            events,
            plan,
            n,
            guards: StreamGuards {
                timer,
                watchdog,
                _in_flight: self.in_flight,
            },
        })
    }
}

/// Runs `f` on the blocking pool.
pub(super) async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request validation failed: {e}")))?
}

/// The model this server serves (listed while it loads, too).
#[utoipa::path(get, path = "/v1/models", tag = "OpenAI",
    responses(
        (status = 200, body = ModelList),
        (status = "4XX", description = "A missing or wrong key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: state
            .chat_ids()
            .chain(state.embedder.as_ref().map(|e| e.id.as_str()))
            .map(|id| ModelCard {
                id: id.to_string(),
                object: "model".into(),
                created: state.started_at,
                owned_by: "idlerig".into(),
            })
            .collect(),
    })
}

/// Ready (200) once the model is loaded; 503 while it loads or after it failed.
#[utoipa::path(get, path = "/health", tag = "Operations",
    responses(
        (status = 200, description = "The model is loaded", body = Health),
        (status = 503, description = "Loading, or failed", body = Health),
        (status = "4XX", description = "Not found, or a method not allowed", body = super::bodies::ErrorResponse)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let (code, health) = match state.load_state() {
        super::LoadState::Ready(_) => (StatusCode::OK, Health::of("ok")),
        super::LoadState::Loading(progress) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Health {
                progress: Some((progress * 100.0).round() / 100.0),
                ..Health::of("loading")
            },
        ),
        super::LoadState::Failed(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Health {
                error: Some(e),
                ..Health::of("failed")
            },
        ),
    };
    (code, Json(health)).into_response()
}

/// The arbiter's figures: device time split, pre-emption latency, hashrate, shares, pool.
#[utoipa::path(get, path = "/v1/status", tag = "Operations",
    responses(
        (status = 200, body = ServerStatus),
        (status = "4XX", description = "A missing or wrong key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn status(State(state): State<AppState>) -> Json<ServerStatus> {
    use std::sync::atomic::Ordering::Relaxed;
    let engine = match state.load_state() {
        super::LoadState::Ready(m) => Some(EngineStatus {
            running: m.stats.running(),
            generated_tokens: m.stats.generated_tokens(),
            prefilled_tokens: m.stats.prefilled_tokens.load(Relaxed),
            kv_blocks_used: m.stats.kv_blocks_used.load(Relaxed),
            kv_blocks_total: m.stats.kv_blocks_total.load(Relaxed),
            kv_preemptions: m.stats.preemptions.load(Relaxed),
            busy: m.stats.is_busy(),
            deferred_interruptions: m.stats.deferred_interruptions.load(Relaxed),
            deferred_owed_steps: m.stats.deferred_owed_steps.load(Relaxed),
            running_by_tier: ServiceTier::ALL
                .iter()
                .map(|&t| {
                    (
                        t.as_str(),
                        m.stats.running_by_tier[t as usize].load(Relaxed),
                    )
                })
                .collect(),
            waiting_by_tier: ServiceTier::ALL
                .iter()
                .map(|&t| {
                    let w = m.stats.waiting_by_tier[t as usize].load(Relaxed)
                        + m.stats.in_channel[t as usize].load(Relaxed);
                    (t.as_str(), w)
                })
                .collect(),
        }),
        _ => None,
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
    Json(ServerStatus {
        model: state.model_id.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: now_unix().saturating_sub(state.started_at),
        draining: state.lifecycle.is_draining(),
        requests_in_flight: state.lifecycle.in_flight(),
        engine,
        mining,
        telemetry,
        batch_lines: state.batches.as_ref().map(|b| super::bodies::BatchLines {
            succeeded: b.lines_done[0].load(Relaxed),
            failed: b.lines_done[1].load(Relaxed),
        }),
    })
}

/// Prometheus text exposition (vLLM's `vllm:` names and idlerig's own).
#[utoipa::path(get, path = "/metrics", tag = "Operations",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = "4XX", description = "Metrics are off, or a key is required", body = super::bodies::ErrorResponse)))]
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
    events: &mut tokio::sync::mpsc::UnboundedReceiver<SeqEvent>,
    n: usize,
    timer: &mut RequestTimer,
    watchdog: &mut Watchdog,
) -> Result<Vec<CollectedChoice>, ApiError> {
    let mut choices: Vec<CollectedChoice> = (0..n).map(|_| CollectedChoice::default()).collect();
    let mut open = n;
    while open > 0 {
        let event = watchdog
            .next(events)
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
                ..
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

fn chat_body(plan: &ResponsePlan, choices: &[CollectedChoice]) -> ChatCompletion {
    ChatCompletion {
        id: response_id("chatcmpl"),
        object: "chat.completion".into(),
        created: now_unix(),
        model: plan.model.clone(),
        service_tier: plan.tier.as_str(),
        choices: choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (reasoning, content) = match plan.reasoning {
                    Some(inside) => ReasoningSplitter::split_all(inside, &c.text),
                    None => (String::new(), c.text.clone()),
                };
                // Calls are read from the answer, after any reasoning.
                let (content, calls) = match &plan.tool_calls {
                    Some(reader) => reader.parse(&content),
                    None => (content, Vec::new()),
                };
                let reasoning = Some(reasoning).filter(|r| !r.is_empty());
                let made_calls = !calls.is_empty();
                ChatChoice {
                    index: i,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: Some(content).filter(|c| !(made_calls && c.is_empty())),
                        tool_calls: made_calls.then(|| {
                            calls
                                .into_iter()
                                .map(|c| ToolCall::new(c.name, c.arguments))
                                .collect()
                        }),
                        reasoning_content: reasoning.clone(),
                        reasoning,
                    },
                    logprobs: plan.logprobs.then(|| ChatLogprobs::of(&c.logprobs)),
                    finish_reason: c
                        .finish_reason
                        .map(|r| super::tools::finish_reason(r, made_calls).into()),
                }
            })
            .collect(),
        usage: usage_of(plan, choices),
    }
}

fn completion_body(plan: &ResponsePlan, choices: &[CollectedChoice]) -> Completion {
    Completion {
        id: response_id("cmpl"),
        object: "text_completion".into(),
        created: now_unix(),
        model: plan.model.clone(),
        service_tier: plan.tier.as_str(),
        choices: choices
            .iter()
            .enumerate()
            .map(|(i, c)| CompletionChoice {
                index: i,
                text: c.text.clone(),
                logprobs: plan
                    .logprobs
                    .then(|| CompletionLogprobs::of(&c.logprobs, 0)),
                finish_reason: c.finish_reason.map(|r| r.as_str().into()),
            })
            .collect(),
        usage: Some(Some(usage_of(plan, choices))),
    }
}
