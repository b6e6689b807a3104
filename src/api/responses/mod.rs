//! OpenAI's Responses API (`/v1/responses`) as a translator at the edge: the request (and the
//! stored conversation it continues) is read into the internal chat request ([`translate`]),
//! admitted, validated, counted and generated exactly as a chat completion, and the choice's
//! output is written as a Response object or its typed event stream ([`writer`]).
//!
//! With `store` (the default) a response is kept in the batch store's database, owned by the
//! creating key, so that `previous_response_id` continues it, also after a restart, until
//! `--responses-retention-days` have passed. A `background` response is kept at once as
//! `queued` and runs as deferred work, after interactive requests and before the miner
//! ([`background`]); it is polled, cancelled, and run again after a restart.

mod background;
pub mod routes;
mod translate;
mod writer;

pub use background::{resume_background, BackgroundRuns};
pub use routes::{cancel, delete, input_items, retrieve};

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::Response;
use serde_json::{json, Value};

use crate::batch::{Batches, StoredResponse};
use crate::engine::ServiceTier;

use super::auth::KeyIdentity;
use super::context::RequestId;
use super::error::ApiError;
use super::generation::{answer_one, BeforeEnd, Generation};
use super::handlers::{now_unix, off_runtime, parse_json, requested_model, Admitted, Caller};
use super::validate::validate_chat;
use super::wire::ChatRequest;
use super::AppState;
use writer::ResponseWriter;

/// The chat fields a Responses request names otherwise.
const FIELD_NAMES: &[(&str, &str)] = &[
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
    ("response_format", "text.format"),
];

/// The chat validation, its errors in this API's field names.
pub(super) fn validate(
    chat: ChatRequest,
    model: &crate::engine::ServedModel,
    limits: &super::ApiLimits,
) -> Result<(crate::engine::ValidRequest, super::validate::ResponsePlan), ApiError> {
    validate_chat(chat, model, limits).map_err(|e| e.renamed(FIELD_NAMES))
}

/// One create request, read: what to run and how to keep it.
struct Turn {
    id: String,
    request: Value,
    owner: Option<String>,
    store: bool,
    background: bool,
    previous: Option<String>,
    /// This turn's input items, with ids.
    input: Vec<Value>,
    chat: ChatRequest,
}

/// Responses created before this are expired.
fn cutoff(b: &Batches) -> u64 {
    now_unix().saturating_sub(b.cfg.responses_retention_s)
}

fn flag(v: &Value, field: &str, default: bool) -> Result<bool, ApiError> {
    Ok(super::body_fields::opt_bool(v, field)?.unwrap_or(default))
}

/// Reads a create request: its options, the stored conversation it continues, its input.
async fn read_turn(
    state: &AppState,
    id: String,
    request: Value,
    who: Option<&KeyIdentity>,
) -> Result<Turn, ApiError> {
    let mut store = flag(&request, "store", true)?;
    let background = flag(&request, "background", false)?;
    let stream = flag(&request, "stream", false)?;
    let previous = match request.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(p.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "previous_response_id",
                "`previous_response_id` must be a string",
            ))
        }
    };
    if background && !store {
        return Err(ApiError::invalid(
            "background",
            "a `background` response must be stored (`store` true)",
        ));
    }
    if background && stream {
        return Err(ApiError::invalid(
            "stream",
            "a `background` response is not streamed here: poll `GET /v1/responses/{id}`",
        ));
    }
    let batches = state.batches.as_ref();
    if batches.is_none() && (previous.is_some() || background) {
        let field = if background {
            "background"
        } else {
            "previous_response_id"
        };
        return Err(ApiError::invalid(
            field,
            "this server keeps no responses (started with --data-dir none)",
        ));
    }
    // Without a data directory nothing is kept, and the response says so (`store: false`).
    store &= batches.is_some();
    let (viewer, owner) = super::files::viewer_and_owner(who);
    let history = match (&previous, batches) {
        (Some(p), Some(b)) => {
            let (p, at) = (p.clone(), cutoff(b));
            b.call(move |s| s.conversation(&p, &viewer, at)).await?
        }
        _ => Vec::new(),
    };
    let (input, chat) = off_runtime({
        let request = request.clone();
        move || {
            let input = translate::read_input(&request)?;
            let chat = translate::to_chat(&request, &history, &input)?;
            Ok((input, chat))
        }
    })
    .await?;
    Ok(Turn {
        id,
        request,
        owner,
        store,
        background,
        previous,
        input,
        chat,
    })
}

/// The Response object as created: the request's settings echoed, no output yet.
fn base_object(turn: &Turn, model: &str, tier: ServiceTier, status: &str) -> Value {
    let v = &turn.request;
    let or = |field: &str, default: Value| {
        v.get(field)
            .filter(|x| !x.is_null())
            .cloned()
            .unwrap_or(default)
    };
    json!({
        "id": turn.id, "object": "response", "created_at": now_unix(), "status": status,
        "background": turn.background, "error": null, "incomplete_details": null,
        "instructions": or("instructions", Value::Null),
        "max_output_tokens": or("max_output_tokens", Value::Null),
        "metadata": or("metadata", json!({})), "model": model, "output": [],
        "parallel_tool_calls": or("parallel_tool_calls", json!(true)),
        "previous_response_id": turn.previous,
        "reasoning": or("reasoning", json!({"effort": null, "summary": null})),
        "service_tier": tier.as_str(), "store": turn.store,
        "temperature": or("temperature", json!(1.0)),
        "text": or("text", json!({"format": {"type": "text"}})),
        "tool_choice": or("tool_choice", json!("auto")), "tools": or("tools", json!([])),
        "top_p": or("top_p", json!(1.0)), "truncation": or("truncation", json!("disabled")),
        "usage": null, "user": or("user", Value::Null),
    })
}

/// The row that keeps a turn.
fn stored(turn: &Turn, response: Value) -> StoredResponse {
    StoredResponse {
        id: turn.id.clone(),
        owner: turn.owner.clone(),
        previous_response_id: turn.previous.clone(),
        request: turn.request.clone(),
        input_items: turn.input.clone(),
        response,
    }
}

/// Keeps the finished response of a stored turn; a failure to keep it is logged (the client
/// has its answer).
async fn keep(state: &AppState, row: StoredResponse) {
    let Some(b) = state.batches.as_ref() else {
        return;
    };
    let at = cutoff(b);
    if let Err(e) = b.call(move |s| s.put_response(&row, at)).await {
        tracing::error!(error = %e, "a response could not be stored");
    }
}

/// `metadata`: at most 16 string pairs, as on batches.
fn check_metadata(v: &Value) -> Result<(), ApiError> {
    super::batches::check_metadata(&v.get("metadata").cloned())
}

/// Creates a response: one Response object, or with `stream` its typed events; with
/// `background`, a `queued` Response at once.
#[utoipa::path(post, path = "/v1/responses", tag = "OpenAI",
    request_body = routes::ResponsesRequestDoc,
    responses(
        (status = 200, description = "The response; with `stream`, server-sent events",
            content((routes::ResponseObject = "application/json"), (super::openapi::ResponseEvent = "text/event-stream"))),
        (status = "4XX", description = "A bad request, an unknown previous response, a missing key, a full queue", body = super::bodies::ErrorResponse),
        (status = "5XX", description = "The model is loading or failed, the server drains, the request timed out", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = who.map(|Extension(w)| w);
    let caller = Caller {
        id: rid,
        who: who.clone(),
        batch: false,
    };
    let admitted = Admitted::enter(&state, caller)?;
    let limit = state.limits.max_body_bytes;
    let v = off_runtime(move || parse_json(body, limit)).await?;
    check_metadata(&v)?;
    let id = translate::item_id("resp");
    let turn = read_turn(&state, id, v, who.as_deref()).await?;
    let requested = requested_model(&turn.request);
    if turn.background {
        // The miner and the deferred steps need not yield to a request that only queues.
        drop(admitted);
        return background::start(&state, turn, requested).await;
    }
    let gen = admitted
        .submit(&state, requested, turn.chat.clone(), validate)
        .await?;
    Ok(answer(state, turn, gen).await?)
}

/// Answers a submitted turn, streamed or whole, and keeps it (when stored) before its last
/// event goes out.
async fn answer(state: AppState, turn: Turn, gen: Generation) -> Result<Response, ApiError> {
    let base = base_object(&turn, &gen.plan.model, gen.plan.tier, "in_progress");
    let keep_it = turn.store.then(|| {
        Box::new(move |w: &ResponseWriter| {
            let row = stored(&turn, w.response().clone());
            Box::pin(async move { keep(&state, row).await })
                as futures::future::BoxFuture<'static, ()>
        }) as BeforeEnd<ResponseWriter>
    });
    answer_one(gen, ResponseWriter::new(base), keep_it, |w| {
        w.response().clone()
    })
    .await
}
