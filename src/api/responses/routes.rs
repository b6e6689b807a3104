//! The stored responses' routes: retrieve, delete, cancel (a background response), and list a
//! response's input items. A key sees only its own responses (an admin key sees all).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::super::auth::KeyIdentity;
use super::super::error::ApiError;
use super::super::files::{batches_of, page_limit};
use super::super::AppState;
use super::cutoff;

/// The body of `POST /v1/responses`, for the OpenAPI document (the handler reads it as JSON
/// and translates it).
#[derive(Deserialize, ToSchema)]
#[schema(as = ResponsesRequest)]
#[allow(dead_code)] // read by the schema only
pub struct ResponsesRequestDoc {
    pub model: Option<String>,
    /// A string (one user message), or message, `function_call` and `function_call_output`
    /// items.
    pub input: Option<ResponsesInput>,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    #[schema(minimum = 1)]
    pub max_output_tokens: Option<i64>,
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    pub stream: Option<bool>,
    /// Keep the response (default true).
    pub store: Option<bool>,
    /// Answer `queued` at once and run as deferred work (needs `store`; not with `stream`).
    pub background: Option<bool>,
    /// Up to 16 string pairs, kept with the response.
    pub metadata: Option<std::collections::HashMap<String, String>>,
    pub service_tier: Option<super::super::wire::WireServiceTier>,
    pub parallel_tool_calls: Option<bool>,
    /// Function tools: `{"type": "function", "name", "description", "parameters", "strict"}`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `auto`, `none`, `required`, or `{"type": "function", "name": …}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", …}}`.
    #[schema(value_type = Option<Object>)]
    pub text: Option<Value>,
    /// `{"effort": …}`: `none` turns a `<think>` template's reasoning off.
    #[schema(value_type = Option<Object>)]
    pub reasoning: Option<Value>,
}

/// The forms `input` takes.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // read by the schema only
pub enum ResponsesInput {
    Text(String),
    #[schema(value_type = Vec<Object>)]
    Items(Vec<Value>),
}

/// A Response object (the fields every one has; see OpenAI's Responses API).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // the document's shape of what the handlers build as JSON
pub struct ResponseObject {
    pub id: String,
    /// Always `response`.
    pub object: String,
    pub created_at: u64,
    /// `queued`, `in_progress`, `completed`, `incomplete`, `failed` or `cancelled`.
    pub status: String,
    pub model: String,
    /// Reasoning, message and `function_call` items.
    #[schema(value_type = Vec<Object>)]
    pub output: Vec<Value>,
    #[schema(value_type = Option<Object>)]
    pub usage: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseDeleted {
    pub id: String,
    /// Always `response.deleted`.
    pub object: &'static str,
    pub deleted: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InputItemList {
    /// Always `list`.
    pub object: &'static str,
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<Value>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct InputItemsQuery {
    /// 1 to 100; default 20.
    pub limit: Option<usize>,
    /// An item id: list those after it (in `order`).
    pub after: Option<String>,
    /// `asc` or `desc` (the default: the last item first).
    pub order: Option<String>,
}

fn viewer(who: &Option<Extension<Arc<KeyIdentity>>>) -> crate::batch::Viewer {
    super::super::files::viewer_of(who).0
}

/// The stored response `id`, if the caller may see it.
async fn stored_response(
    state: &AppState,
    who: &Option<Extension<Arc<KeyIdentity>>>,
    id: String,
) -> Result<crate::batch::StoredResponse, ApiError> {
    let b = batches_of(state)?;
    let (viewer, at) = (viewer(who), cutoff(b));
    Ok(b.call(move |s| s.response(&id, &viewer, at)).await?)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RetrieveQuery {
    /// Not supported: `true` (a stored response's events again) is refused; GET it whole.
    pub stream: Option<bool>,
}

/// A stored response.
#[utoipa::path(get, path = "/v1/responses/{response_id}", tag = "OpenAI",
    params(("response_id" = String, Path), RetrieveQuery),
    responses(
        (status = 200, body = ResponseObject),
        (status = "4XX", description = "No such response (or another key's, or expired), a missing key", body = super::super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
    q: Result<Query<RetrieveQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    if q.stream == Some(true) {
        return Err(ApiError::invalid(
            "stream",
            "a stored response is not streamed again: GET it whole",
        ));
    }
    Ok(Json(stored_response(&state, &who, id).await?.response))
}

/// Deletes a stored response (a background one still running is stopped).
#[utoipa::path(delete, path = "/v1/responses/{response_id}", tag = "OpenAI",
    params(("response_id" = String, Path)),
    responses(
        (status = 200, body = ResponseDeleted),
        (status = "4XX", description = "No such response, a missing key", body = super::super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
) -> Result<Json<ResponseDeleted>, ApiError> {
    let b = batches_of(&state)?;
    let (viewer, rid) = (viewer(&who), id.clone());
    b.call(move |s| s.delete_response(&rid, &viewer)).await?;
    state.background.stop(&id);
    Ok(Json(ResponseDeleted {
        id,
        object: "response.deleted",
        deleted: true,
    }))
}

/// Cancels a background response: it stops, and stays `cancelled`.
#[utoipa::path(post, path = "/v1/responses/{response_id}/cancel", tag = "OpenAI",
    params(("response_id" = String, Path)),
    responses(
        (status = 200, body = ResponseObject),
        (status = "4XX", description = "No such response, one not created with `background`, a missing key", body = super::super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let stored = stored_response(&state, &who, id.clone()).await?;
    if stored.response["background"] != true {
        return Err(ApiError::invalid(
            "response_id",
            "only a response created with `background: true` can be cancelled",
        ));
    }
    let (viewer, rid) = (self::viewer(&who), id.clone());
    let r = batches_of(&state)?
        .call(move |s| s.cancel_response(&rid, &viewer))
        .await?;
    state.background.stop(&id);
    Ok(Json(r))
}

/// The input items of a stored response (this turn's; earlier turns are theirs).
#[utoipa::path(get, path = "/v1/responses/{response_id}/input_items", tag = "OpenAI",
    params(("response_id" = String, Path), InputItemsQuery),
    responses(
        (status = 200, body = InputItemList),
        (status = "4XX", description = "No such response, a bad query, a missing key", body = super::super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn input_items(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
    q: Result<Query<InputItemsQuery>, QueryRejection>,
) -> Result<Json<InputItemList>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let limit = match q.limit {
        None => 20,
        l => page_limit(l, 100)?,
    };
    let mut items = stored_response(&state, &who, id).await?.input_items;
    match q.order.as_deref() {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "order",
                "`order` must be `asc` or `desc`",
            ))
        }
    }
    if let Some(after) = &q.after {
        let at = items
            .iter()
            .position(|i| i["id"].as_str() == Some(after))
            .ok_or_else(|| {
                ApiError::invalid("after", format!("no input item `{after}` in this response"))
            })?;
        items.drain(..=at);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    let id_of = |i: Option<&Value>| i.and_then(|i| i["id"].as_str()).map(str::to_string);
    Ok(Json(InputItemList {
        object: "list",
        first_id: id_of(items.first()),
        last_id: id_of(items.last()),
        data: items,
        has_more,
    }))
}
