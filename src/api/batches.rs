//! OpenAI's Batches API: create a batch over an uploaded file, follow it through its
//! lifecycle, cancel it. The batch's lines run as deferred work (see [`crate::batch`]); the
//! [`batch_executor`] sends each one through this server's own routes, so that a line is
//! validated, counted against its owner's key and answered exactly as over HTTP.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, Request};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tower::ServiceExt;
use utoipa::{IntoParams, ToSchema};

use super::auth::KeyIdentity;
use super::error::ApiError;
use super::files::{batch_endpoints, batches_of, page_limit, viewer_of};
use super::AppState;
use crate::batch::{BatchObject, Executor, LineCall, LineReply};

/// Marks a request the batch runner makes: it runs as deferred work, as the batch's owner.
/// An extension, so no client can set it.
#[derive(Debug, Clone)]
pub struct BatchCaller {
    pub identity: Option<Arc<KeyIdentity>>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateBatch {
    /// A file uploaded with purpose `batch`.
    pub input_file_id: String,
    /// `/v1/chat/completions`, `/v1/completions`, or `/v1/embeddings` where served.
    pub endpoint: String,
    /// Only `24h`.
    pub completion_window: String,
    /// Up to 16 string pairs, kept with the batch.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct BatchListQuery {
    /// 1 to 100; default 20.
    pub limit: Option<usize>,
    /// A batch id: list those created before it.
    pub after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<BatchObject>,
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

pub(super) fn check_metadata(m: &Option<Value>) -> Result<(), ApiError> {
    let Some(m) = m.as_ref().filter(|m| !m.is_null()) else {
        return Ok(());
    };
    let bad = |msg: String| Err(ApiError::invalid("metadata", msg));
    let Some(o) = m.as_object() else {
        return bad("`metadata` must be an object of strings".into());
    };
    if o.len() > 16 {
        return bad(format!("`metadata` has {} pairs; at most 16", o.len()));
    }
    for (k, v) in o {
        match v.as_str() {
            _ if k.chars().count() > 64 => {
                return bad(format!("`metadata` key `{k}` is over 64 characters"))
            }
            Some(s) if s.chars().count() <= 512 => {}
            Some(_) => return bad(format!("`metadata.{k}` is over 512 characters")),
            None => return bad(format!("`metadata.{k}` must be a string")),
        }
    }
    Ok(())
}

/// Creates a batch; its lines run in the gaps between interactive requests.
#[utoipa::path(post, path = "/v1/batches", tag = "Batch",
    request_body = CreateBatch,
    responses(
        (status = 200, body = BatchObject),
        (status = "4XX", description = "No such file, an endpoint not served, a missing key; 429 `batch_limit_exceeded` past --batch-max-active-per-key or --batch-max-active unfinished batches", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    body: Result<Json<CreateBatch>, JsonRejection>,
) -> Result<Json<BatchObject>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let batches = batches_of(&state)?;
    if !batch_endpoints(&state).contains(&req.endpoint.as_str()) {
        return Err(ApiError::invalid(
            "endpoint",
            format!(
                "`endpoint` `{}` is not one this server runs in batches (`{}`)",
                req.endpoint,
                batch_endpoints(&state).join("`, `")
            ),
        ));
    }
    if req.completion_window != "24h" {
        return Err(ApiError::invalid(
            "completion_window",
            format!(
                "`completion_window` must be `24h`; got `{}`",
                req.completion_window
            ),
        ));
    }
    check_metadata(&req.metadata)?;
    let (viewer, owner) = viewer_of(&who);
    let window = batches.cfg.window_s;
    let batch = batches
        .call(move |s| {
            s.create_batch(
                &viewer,
                owner.as_deref(),
                &req.input_file_id,
                &req.endpoint,
                req.metadata.as_ref().filter(|m| !m.is_null()),
                window,
            )
        })
        .await?;
    batches.wake();
    tracing::info!(batch = %batch.id, requests = batch.request_counts.total, endpoint = %batch.endpoint, "batch created");
    Ok(Json(batch))
}

/// Lists batches, newest first.
#[utoipa::path(get, path = "/v1/batches", tag = "Batch",
    params(BatchListQuery),
    responses(
        (status = 200, body = BatchList),
        (status = "4XX", description = "A bad query, a missing key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    q: Result<Query<BatchListQuery>, QueryRejection>,
) -> Result<Json<BatchList>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let limit = match q.limit {
        None => 20,
        l => page_limit(l, 100)?,
    };
    let (viewer, _) = viewer_of(&who);
    let mut data = batches_of(&state)?
        .call(move |s| s.batches(&viewer, limit + 1, q.after.as_deref()))
        .await?;
    let has_more = data.len() > limit;
    data.truncate(limit);
    Ok(Json(BatchList {
        object: "list",
        first_id: data.first().map(|b| b.id.clone()),
        last_id: data.last().map(|b| b.id.clone()),
        data,
        has_more,
    }))
}

/// One batch: its status, counts, usage and result files.
#[utoipa::path(get, path = "/v1/batches/{batch_id}", tag = "Batch",
    params(("batch_id" = String, Path)),
    responses(
        (status = 200, body = BatchObject),
        (status = "4XX", description = "No such batch, a missing key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
) -> Result<Json<BatchObject>, ApiError> {
    let (viewer, _) = viewer_of(&who);
    let batch = batches_of(&state)?
        .call(move |s| s.batch(&id, &viewer))
        .await?;
    Ok(Json(batch))
}

/// Cancels a batch: no line starts any more and those in flight are stopped; the output file
/// holds what finished and the error file the rest.
#[utoipa::path(post, path = "/v1/batches/{batch_id}/cancel", tag = "Batch",
    params(("batch_id" = String, Path)),
    responses(
        (status = 200, body = BatchObject),
        (status = "4XX", description = "No such batch, one already finished, a missing key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
) -> Result<Json<BatchObject>, ApiError> {
    let (viewer, _) = viewer_of(&who);
    let batches = batches_of(&state)?;
    let batch = batches.call(move |s| s.cancel(&id, &viewer)).await?;
    batches.wake();
    Ok(Json(batch))
}

/// Runs batch lines through `state`'s own routes, as deferred work of the batch's owner.
pub fn batch_executor(state: AppState) -> Executor {
    let keys = state.keys.clone();
    let router = super::router(state);
    Arc::new(move |call: LineCall| {
        let (router, keys) = (router.clone(), keys.clone());
        Box::pin(async move {
            let identity = call.owner.as_deref().and_then(|n| keys.named(n));
            if identity.is_none() && !keys.is_empty() {
                // The key that created the batch is gone (removed from the key file): its
                // lines do not run as nobody, past every quota.
                let e = ApiError::unauthorized(format!(
                    "the API key `{}` that created this batch is no longer configured",
                    call.owner.as_deref().unwrap_or("?")
                ));
                return LineReply {
                    status: e.status.as_u16(),
                    body: serde_json::to_value(e.body()).unwrap_or(Value::Null),
                    request_id: String::new(),
                };
            }
            let mut req = Request::post(call.url.as_str())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(call.body.to_string()))
                .expect("a POST with a JSON body is a valid request");
            req.extensions_mut().insert(BatchCaller { identity });
            let res = match router.oneshot(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            };
            let status = res.status().as_u16();
            let request_id = res
                .headers()
                .get(super::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = match axum::body::to_bytes(res.into_body(), usize::MAX).await {
                Ok(b) => serde_json::from_slice(&b)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into())),
                Err(e) => Value::String(format!("the response could not be read: {e}")),
            };
            LineReply {
                status,
                body,
                request_id,
            }
        }) as futures::future::BoxFuture<'static, LineReply>
    })
}
