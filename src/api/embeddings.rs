//! `POST /v1/embeddings`: OpenAI's embeddings endpoint over the served embedding model
//! ([`crate::embed::Embedder`]). Input is a string, an array of strings, an array of token
//! ids or an array of such arrays; vectors come back as floats or as base64 of little-endian
//! f32 (what OpenAI's Python client asks for by default). Nothing is truncated: an input
//! longer than the model takes is refused, naming it.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::KeyIdentity;
use super::error::ApiError;
use super::handlers::{fields, off_runtime, parse_json};
use super::AppState;
use crate::embed::{EmbedError, Embedder};
use crate::engine::ServiceTier;

/// Inputs one request may hold (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
/// Tokens one request may hold in all: a bound on the work one request is (a CPU encodes a
/// few thousand MiniLM tokens a second).
pub const MAX_REQUEST_TOKENS: usize = 16_384;

/// What to embed.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    pub input: EmbeddingInput,
    /// The embedding model's name (default: the one this server serves).
    pub model: Option<String>,
    /// `float` (default) or `base64` (little-endian f32).
    pub encoding_format: Option<String>,
    /// Only the model's own width: it was not trained to be shortened.
    pub dimensions: Option<i64>,
    /// Accepted as OpenAI's clients send it; not used.
    #[allow(dead_code)]
    pub user: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: String,
    pub index: usize,
    /// The vector: numbers, or with `encoding_format: base64` a string.
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// Creates embeddings of the inputs with the served embedding model.
#[utoipa::path(post, path = "/v1/embeddings", tag = "OpenAI",
    request_body = EmbeddingRequest,
    responses(
        (status = 200, body = EmbeddingList),
        (status = "4XX", description = "An invalid request, a missing or wrong key, or no embedding model served", body = super::bodies::ErrorResponse),
        (status = 503, description = "Shutting down", body = super::bodies::ErrorResponse),
        (status = 504, description = "Past the request timeout", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn embeddings(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    batch: Option<Extension<super::BatchCaller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = who.map(|Extension(w)| w);
    state.check_quota(who.as_deref())?;
    let _in_flight = state.lifecycle.enter()?;
    // An embedding request uses the device as a generation does: the miner steps aside. A
    // batch line is deferred work, as a batch's generations are: interactive requests, of
    // either kind, go first.
    let tier = match batch {
        Some(_) => ServiceTier::Deferred,
        None => ServiceTier::Interactive,
    };
    let mut admitted = state.admit();
    if let Some(g) = admitted.as_mut() {
        g.set_tier(tier);
    }
    let embedder = state.embedder.clone().ok_or_else(|| {
        ApiError::not_found(
            "this server serves no embedding model (start it with --embedding-model)",
        )
        .with_code("model_not_found")
    })?;
    let limit = state.limits.max_body_bytes;
    let chat_ids: Vec<String> = state.chat_ids().map(str::to_string).collect();
    let e = embedder.clone();
    let (inputs, tokens, base64) = off_runtime(move || {
        let req: EmbeddingRequest = fields(&parse_json(body, limit)?)?;
        validate(req, &e, &chat_ids)
    })
    .await?;
    // The inputs' tokens are held against the key's quota until they are counted.
    let ask = crate::usage::QuotaAsk {
        prompt: tokens as u64,
        choices: 0,
        completion: 0,
    };
    let _quota = state.reserve_quota(who.as_deref(), ask)?;
    let limit = state.tier_timeout(tier);
    let vectors = match tokio::time::timeout(limit, embedder.embed(inputs, tier)).await {
        Err(_) => return Err(ApiError::timeout(limit)),
        Ok(Err(EmbedError::Busy)) => {
            return Err(ApiError::overloaded(
                "the embedding queue is full; retry shortly",
            ))
        }
        Ok(Err(e)) => return Err(ApiError::internal(e)),
        Ok(Ok(v)) => v,
    };
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: "embedding".into(),
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(v)
            },
        })
        .collect();
    if let (Some(usage), Some(who)) = (&state.usage, &who) {
        usage.record(&who.name, tokens as u64, 0);
    }
    Ok(Json(EmbeddingList {
        object: "list".into(),
        data,
        model: embedder.id.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
    .into_response())
}

/// The inputs as token ids (with the model's special tokens), their token count, and whether
/// to answer in base64.
fn validate(
    req: EmbeddingRequest,
    embedder: &Embedder,
    chat_models: &[String],
) -> Result<(Vec<Vec<u32>>, usize, bool), ApiError> {
    match req.model.as_deref() {
        None | Some("") => {}
        Some(m) if m == embedder.id || m == "default" => {}
        Some(m) if chat_models.iter().any(|c| c == m) => {
            return Err(ApiError::invalid(
                "model",
                format!(
                    "`{m}` is a chat model; /v1/embeddings serves `{}` (use /v1/chat/completions \
                     for `{m}`)",
                    embedder.id
                ),
            )
            .with_code("model_not_supported"))
        }
        Some(m) => return Err(ApiError::model_not_found(m, &embedder.id)),
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`{other}`: expected `float` or `base64`"),
            ))
        }
    };
    if let Some(d) = req.dimensions {
        if d != embedder.dimensions as i64 {
            return Err(ApiError::invalid(
                "dimensions",
                format!(
                    "`{}` does not support `dimensions`: its vectors have {} dimensions and \
                     were not trained to be shortened",
                    embedder.id, embedder.dimensions
                ),
            ));
        }
    }
    let inputs: Vec<Vec<u32>> = match req.input {
        EmbeddingInput::Text(t) => vec![text_tokens(embedder, &t, "input")?],
        EmbeddingInput::Texts(ts) => {
            check_count(ts.len())?;
            ts.iter()
                .enumerate()
                .map(|(i, t)| text_tokens(embedder, t, &format!("input[{i}]")))
                .collect::<Result<_, _>>()?
        }
        EmbeddingInput::Tokens(ids) => vec![id_tokens(embedder, &ids, "input")?],
        EmbeddingInput::TokenLists(lists) => {
            check_count(lists.len())?;
            lists
                .iter()
                .enumerate()
                .map(|(i, ids)| id_tokens(embedder, ids, &format!("input[{i}]")))
                .collect::<Result<_, _>>()?
        }
    };
    let total: usize = inputs.iter().map(Vec::len).sum();
    if total > MAX_REQUEST_TOKENS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "the inputs hold {total} tokens; one request may hold {MAX_REQUEST_TOKENS} \
                 (split it)"
            ),
        ));
    }
    Ok((inputs, total, base64))
}

fn check_count(n: usize) -> Result<(), ApiError> {
    if n == 0 || n > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("expected 1 to {MAX_INPUTS} inputs, got {n}"),
        ));
    }
    Ok(())
}

fn text_tokens(embedder: &Embedder, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::invalid(param, format!("`{param}` is empty")));
    }
    let ids = embedder.tokenize(text).map_err(ApiError::internal)?;
    check_length(embedder, ids.len(), param)?;
    Ok(ids)
}

fn id_tokens(embedder: &Embedder, ids: &[i64], param: &str) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid(param, format!("`{param}` is empty")));
    }
    let vocab = embedder.vocab_size as i64;
    if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
        return Err(ApiError::invalid(
            param,
            format!(
                "token id {bad} is outside the vocabulary (0 to {})",
                vocab - 1
            ),
        ));
    }
    let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
    let wrapped = embedder.with_special_tokens(&ids);
    check_length(embedder, wrapped.len(), param)?;
    Ok(wrapped)
}

fn check_length(embedder: &Embedder, n: usize, param: &str) -> Result<(), ApiError> {
    if n > embedder.max_tokens {
        return Err(ApiError::invalid(
            param,
            format!(
                "`{param}` is {n} tokens long; `{}` takes at most {} (nothing is truncated)",
                embedder.id, embedder.max_tokens
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}
