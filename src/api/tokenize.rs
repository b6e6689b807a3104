//! vLLM's `/tokenize` and `/detokenize`: a prompt (or chat messages, through the model's
//! template exactly as a chat request renders them) to the model's token ids, and back.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::KeyIdentity;
use super::error::ApiError;
use super::handlers::{fields, off_runtime, parse_json};
use super::validate::validate_chat;
use super::wire::{ChatRequest, CommonParams};
use super::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    /// Text to tokenize as it is; or send `messages`.
    pub prompt: Option<String>,
    /// Chat messages, rendered by the model's chat template with the generation prompt, as
    /// `/v1/chat/completions` renders them (with `tools`, when given).
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Value>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// Add the model's special tokens (its BOS) to a `prompt`; default true. A chat template
    /// writes its own.
    pub add_special_tokens: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    /// The model's context window.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Each token as text (vLLM sends it only when asked; always null here).
    #[schema(value_type = Option<Vec<String>>)]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// Token ids of a prompt, or of chat messages as the model's template renders them.
#[utoipa::path(post, path = "/tokenize", tag = "Tokens",
    request_body = TokenizeRequest,
    responses(
        (status = 200, body = TokenizeResponse),
        (status = "4XX", description = "Neither or both of `prompt` and `messages`, a missing key", body = super::bodies::ErrorResponse),
        (status = "5XX", description = "The model is loading or failed", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn tokenize(
    State(state): State<AppState>,
    _who: Option<Extension<Arc<KeyIdentity>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let limit = state.limits.max_body_bytes;
    let req: TokenizeRequest = off_runtime(move || fields(&parse_json(body, limit)?)).await?;
    let model = state.ready_model(req.model.as_deref())?;
    let limits = state.limits.clone();
    let m = model.clone();
    let tokens = off_runtime(move || match (req.prompt, req.messages) {
        (Some(text), None) => {
            let mut ids = m.tokenizer.encode(&text).map_err(ApiError::internal)?;
            let bos_added = m
                .tokenizer
                .bos_text()
                .is_some_and(|bos| !text.starts_with(&bos))
                && m.tokenizer.encode("").is_ok_and(|e| !e.is_empty());
            if !req.add_special_tokens.unwrap_or(true) && bos_added && !ids.is_empty() {
                ids.remove(0);
            }
            Ok(ids)
        }
        (None, Some(messages)) => {
            let chat = ChatRequest {
                common: CommonParams {
                    model: Some(m.id.clone()),
                    max_tokens: Some(1),
                    ..CommonParams::default()
                },
                chat: fields(&serde_json::json!({"messages": messages, "tools": req.tools}))?,
            };
            Ok(validate_chat(chat, &m, &limits)?.0.prompt)
        }
        _ => Err(ApiError::bad_request(
            "send exactly one of `prompt` (text) and `messages` (a chat)",
        )),
    })
    .await?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.context_length,
        tokens,
        token_strs: None,
    }))
}

/// The text of token ids (special tokens included).
#[utoipa::path(post, path = "/detokenize", tag = "Tokens",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, body = DetokenizeResponse),
        (status = "4XX", description = "A token id outside the vocabulary, a missing key", body = super::bodies::ErrorResponse),
        (status = "5XX", description = "The model is loading or failed", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn detokenize(
    State(state): State<AppState>,
    _who: Option<Extension<Arc<KeyIdentity>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let limit = state.limits.max_body_bytes;
    let req: DetokenizeRequest = off_runtime(move || fields(&parse_json(body, limit)?)).await?;
    let model = state.ready_model(req.model.as_deref())?;
    let vocab = model.tokenizer.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    let prompt = off_runtime(move || Ok(model.tokenizer.decode(&req.tokens))).await?;
    Ok(Json(DetokenizeResponse { prompt }))
}
