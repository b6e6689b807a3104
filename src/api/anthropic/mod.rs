//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) as a translator at
//! the edge: the request is read into the internal chat request ([`translate`]), validated,
//! admitted, counted and generated exactly as a chat completion, and the one choice's output
//! is written as a `Message` or Anthropic's event stream ([`writer`]). Errors on these routes
//! leave in Anthropic's envelope ([`anthropic_errors`]); keys are accepted as `x-api-key` too.

mod translate;
mod writer;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::auth::KeyIdentity;
use super::context::RequestId;
use super::error::ApiError;
use super::generation::answer_one;
use super::handlers::{off_runtime, parse_json, requested_model, Admitted, Caller};
use super::validate::validate_chat;
use super::AppState;

use writer::Message;

/// The body of `/v1/messages`, for the OpenAPI document (the handler reads it as JSON and
/// [`translate`]s it).
#[derive(serde::Deserialize, ToSchema)]
#[schema(as = MessagesRequest)]
#[allow(dead_code)] // read by the schema only
pub struct MessagesRequestDoc {
    pub model: Option<String>,
    #[schema(minimum = 1)]
    pub max_tokens: i64,
    #[schema(min_items = 1)]
    pub messages: Vec<AnthropicMessageDoc>,
    /// A string, or a list of `text` blocks.
    pub system: Option<String>,
    pub stop_sequences: Option<Vec<String>>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub temperature: Option<f32>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    #[schema(minimum = 1)]
    pub top_k: Option<i64>,
    pub stream: Option<bool>,
    /// Custom tools: `name`, `description`, `input_schema`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name"?, "disable_parallel_tool_use"?}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// `{"type": "enabled" | "disabled"}`: a `<think>` template's switch.
    #[schema(value_type = Option<Object>)]
    pub thinking: Option<Value>,
}

/// A message of a Messages request.
#[derive(serde::Deserialize, ToSchema)]
#[allow(dead_code)] // read by the schema only
pub struct AnthropicMessageDoc {
    /// `user` or `assistant`.
    pub role: String,
    /// A string, or a list of `text`, `tool_use` and `tool_result` blocks.
    pub content: String,
}

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// Anthropic's error envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnthropicError {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    pub error: AnthropicErrorDetail,
    pub request_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnthropicErrorDetail {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// The chat fields a Messages request names otherwise.
const FIELD_NAMES: &[(&str, &str)] = &[
    ("max_completion_tokens", "max_tokens"),
    ("messages", "messages"),
    ("stop", "stop_sequences"),
    ("response_format", "output_config.format"),
];

fn validate(
    chat: super::wire::ChatRequest,
    model: &crate::engine::ServedModel,
    limits: &super::ApiLimits,
) -> Result<(crate::engine::ValidRequest, super::validate::ResponsePlan), ApiError> {
    validate_chat(chat, model, limits).map_err(|e| e.renamed(FIELD_NAMES))
}

/// Middleware on the Anthropic routes: every answer carries Anthropic's `request-id` header,
/// and an error (from the handler, the key check, the body limit) leaves in Anthropic's
/// envelope, with its request id, the same status and headers.
pub async fn anthropic_errors(req: Request, next: Next) -> Response {
    let id = req.extensions().get::<RequestId>().map(|r| r.0.to_string());
    let mut res = next.run(req).await;
    if let Some(v) = id
        .as_deref()
        .and_then(|i| axum::http::HeaderValue::from_str(i).ok())
    {
        res.headers_mut().insert("request-id", v);
    }
    let status = res.status();
    if status.is_success() {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    let body = AnthropicError {
        kind: "error".into(),
        error: AnthropicErrorDetail {
            kind: error_type(status).into(),
            message,
        },
        request_id: id,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    (parts, Json(body)).into_response()
}

/// Creates a message: one JSON `Message`, or with `stream` Anthropic's server-sent events.
#[utoipa::path(post, path = "/v1/messages", tag = "Anthropic",
    request_body = MessagesRequestDoc,
    responses(
        (status = 200, description = "The message; with `stream`, server-sent events",
            content((Message = "application/json"), (super::openapi::AnthropicEvent = "text/event-stream"))),
        (status = "4XX", description = "A bad request, a missing key, a full queue", body = AnthropicError),
        (status = "5XX", description = "The model is loading or failed, the server drains, the request timed out", body = AnthropicError)),
    security(("bearer" = []), ("x-api-key" = [])))]
pub async fn messages(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = Caller {
        id,
        who: who.map(|Extension(w)| w),
        batch: false,
    };
    let admitted = Admitted::enter(&state, caller)?;
    let limit = state.limits.max_body_bytes;
    let (requested, chat) = off_runtime(move || {
        let v = parse_json(body, limit)?;
        Ok((requested_model(&v), translate::to_chat(&v, false)?))
    })
    .await?;
    let gen = admitted.submit(&state, requested, chat, validate).await?;
    let w = writer::MessageWriter::new(gen.plan.model.clone(), gen.plan.prompt_tokens);
    answer_one(gen, w, None, |w| json!(w.message())).await
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCount {
    pub input_tokens: usize,
}

/// Counts a Messages request's input tokens, as the model's chat template renders them.
#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "Anthropic",
    request_body(content = MessagesRequestDoc, description = "A Messages request; `max_tokens` may be left out"),
    responses(
        (status = 200, body = TokenCount),
        (status = "4XX", description = "A bad request, a missing key", body = AnthropicError),
        (status = "5XX", description = "The model is loading or failed", body = AnthropicError)),
    security(("bearer" = []), ("x-api-key" = [])))]
pub async fn count_tokens(
    State(state): State<AppState>,
    _who: Option<Extension<Arc<KeyIdentity>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenCount>, ApiError> {
    let limit = state.limits.max_body_bytes;
    let (requested, mut chat) = off_runtime(move || {
        let v = parse_json(body, limit)?;
        Ok((requested_model(&v), translate::to_chat(&v, true)?))
    })
    .await?;
    let model = state.ready_model(requested.as_deref())?;
    let limits = state.limits.clone();
    // Counting generates nothing: one token of room is enough.
    chat.common.max_tokens = Some(1);
    let (valid, _) = off_runtime(move || validate(chat, &model, &limits)).await?;
    Ok(Json(TokenCount {
        input_tokens: valid.prompt.len(),
    }))
}

/// The body of a mid-stream `error` event.
pub fn error_event(e: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": error_type(e.status), "message": e.message}})
}
