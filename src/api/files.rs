//! OpenAI's Files API for batch input: `POST /v1/files` (multipart, `purpose=batch`), checked
//! line by line as it streams to disk so that a bad file is refused with the lines at fault,
//! and `GET`/`DELETE` on the files and their content. A key sees only its own files (admin
//! keys, and servers without keys, see all).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};

use super::auth::KeyIdentity;
use super::error::ApiError;
use super::AppState;
use crate::batch::jsonl::JsonlCheck;
use crate::batch::{BatchError, Batches, FileObject, Viewer};

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::NotFound(m) => ApiError::not_found(m),
            BatchError::Invalid { param, message } => ApiError::invalid(param, message),
            BatchError::Conflict(m) => ApiError::conflict(m),
            // Not a "retry in a second": a batch takes hours to finish.
            BatchError::Limit(m) => ApiError {
                retry_after_s: None,
                ..ApiError::overloaded(m)
            }
            .with_code("batch_limit_exceeded"),
            e => ApiError::internal(e),
        }
    }
}

/// The store, or why this server has none.
pub(super) fn batches_of(state: &AppState) -> Result<&Batches, ApiError> {
    state.batches.as_ref().ok_or_else(|| {
        ApiError::not_found("the Files and Batches API is off on this server (--data-dir none)")
    })
}

/// What the caller may see, and the owner its uploads get.
pub(super) fn viewer_of(who: &Option<Extension<Arc<KeyIdentity>>>) -> (Viewer, Option<String>) {
    viewer_and_owner(who.as_ref().map(|Extension(w)| w.as_ref()))
}

/// What a caller may see (everything without keys, or with an admin key; else its own), and
/// the owner what it creates gets.
pub(super) fn viewer_and_owner(who: Option<&KeyIdentity>) -> (Viewer, Option<String>) {
    match who {
        None => (Viewer::All, None),
        Some(w) if w.admin => (Viewer::All, Some(w.name.clone())),
        Some(w) => (Viewer::Owner(w.name.clone()), Some(w.name.clone())),
    }
}

/// The endpoints batch lines may call on this server.
pub(super) fn batch_endpoints(state: &AppState) -> Vec<&'static str> {
    let mut urls = vec!["/v1/chat/completions", "/v1/completions"];
    if state.embedder.is_some() {
        urls.push("/v1/embeddings");
    }
    urls
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// Only files of this purpose (`batch`, `batch_output`).
    pub purpose: Option<String>,
    /// 1 to 10,000; default 10,000.
    pub limit: Option<usize>,
    /// A file id: list those uploaded before it.
    pub after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<FileObject>,
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

/// The multipart form of an upload.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // documents the form; the handler reads it field by field as it streams
pub struct FileUpload {
    /// The JSONL file: one request per line (`custom_id`, `method: POST`, `url`, `body`).
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// Only `batch`.
    #[schema(example = "batch")]
    purpose: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileDeleted {
    pub id: String,
    /// Always `file`.
    pub object: &'static str,
    pub deleted: bool,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

fn multipart_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("cannot read the multipart body: {e}"))
}

/// Longest `purpose` read (the longest purpose OpenAI knows is 12 bytes).
const MAX_PURPOSE_BYTES: usize = 64;
/// Bytes of form fields other than `file` and `purpose` read and dropped, all together
/// (clients may send fields this server does not use, such as `expires_after`).
const MAX_OTHER_FIELD_BYTES: usize = 64 << 10;

/// A short text field, read chunk by chunk and refused past `max` bytes: never read whole.
async fn short_field(
    field: &mut axum::extract::multipart::Field<'_>,
    name: &str,
    max: usize,
) -> Result<String, ApiError> {
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if text.len() + chunk.len() > max {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` is longer than {max} bytes"),
            ));
        }
        text.extend_from_slice(&chunk);
    }
    String::from_utf8(text).map_err(|_| ApiError::invalid(name, format!("`{name}` is not UTF-8")))
}

/// Uploads a JSONL file of batch requests.
#[utoipa::path(post, path = "/v1/files", tag = "Batch",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses(
        (status = 200, body = FileObject),
        (status = "4XX", description = "A bad or too large file, a missing key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn upload(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let batches = batches_of(&state)?.clone();
    let mut multipart = multipart.map_err(|e| multipart_error(e.body_text()))?;
    let (_, owner) = viewer_of(&who);
    let limit = batches.cfg.max_file_bytes;
    let tmp = batches.call(|s| s.tmp_path()).await?;
    // The partial upload goes, whatever ends this request.
    let _cleanup = TmpFile(tmp.clone());
    let (mut purpose, mut file, mut other_bytes) = (None, None, 0usize);
    let read = async {
        while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
            match field.name() {
                Some("purpose") => {
                    purpose = Some(short_field(&mut field, "purpose", MAX_PURPOSE_BYTES).await?)
                }
                Some("file") if file.is_some() => {
                    return Err(ApiError::invalid("file", "`file` is given twice; send one"))
                }
                Some("file") => {
                    let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                    let mut check = JsonlCheck::new(
                        batch_endpoints(&state),
                        batches.cfg.max_requests,
                        batches.cfg.max_line_bytes,
                    );
                    let mut out = tokio::fs::File::create(&tmp)
                        .await
                        .map_err(ApiError::internal)?;
                    let mut bytes = 0u64;
                    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                        bytes += chunk.len() as u64;
                        if bytes > limit {
                            return Err(
                                ApiError::payload_too_large(limit as usize).with_param("file")
                            );
                        }
                        check.push(&chunk);
                        out.write_all(&chunk).await.map_err(ApiError::internal)?;
                    }
                    out.sync_all().await.map_err(ApiError::internal)?;
                    file = Some((filename, check));
                }
                // Unused fields are drained (the parser must read past them), within a bound.
                other => {
                    let name: String = other.unwrap_or("").chars().take(64).collect();
                    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                        other_bytes += chunk.len();
                        if other_bytes > MAX_OTHER_FIELD_BYTES {
                            return Err(ApiError::invalid(
                                name,
                                format!(
                                    "form fields other than `file` and `purpose` hold more than \
                                     {MAX_OTHER_FIELD_BYTES} bytes; this one is not used here"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = read {
        // Refused before the body was read to its end: the rest is read and dropped (within
        // the file limit), so that the client, still sending, gets this answer rather than a
        // connection closed under it.
        drain(&mut multipart, limit.saturating_add(1 << 20)).await;
        return Err(e);
    }
    let purpose = purpose.ok_or_else(|| ApiError::invalid("purpose", "`purpose` is missing"))?;
    if purpose != "batch" {
        return Err(ApiError::invalid(
            "purpose",
            format!("purpose `{purpose}` is not supported here; upload batch input with `batch`"),
        ));
    }
    let (filename, check) = file.ok_or_else(|| ApiError::invalid("file", "`file` is missing"))?;
    let summary = check.finish().map_err(|e| {
        ApiError::invalid("file", format!("the file is not valid batch input: {e}"))
            .with_code("invalid_file")
    })?;
    let object = batches
        .call(move |s| s.add_file(owner.as_deref(), &filename, "batch", &tmp, &summary))
        .await?;
    tracing::info!(file = %object.id, bytes = object.bytes, "batch input file accepted");
    Ok(Json(object))
}

/// Reads and drops what is left of a multipart body, `max` bytes at most.
async fn drain(multipart: &mut Multipart, max: u64) {
    let mut read = 0u64;
    while let Ok(Some(mut field)) = multipart.next_field().await {
        while let Ok(Some(chunk)) = field.chunk().await {
            read += chunk.len() as u64;
            if read > max {
                return;
            }
        }
    }
}

/// Removes the upload's temporary file when dropped (accepted uploads were moved away).
struct TmpFile(std::path::PathBuf);

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Lists files, newest first.
#[utoipa::path(get, path = "/v1/files", tag = "Batch",
    params(ListQuery),
    responses(
        (status = 200, body = FileList),
        (status = "4XX", description = "A bad query, a missing key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<FileList>, ApiError> {
    let q = query(q)?;
    let limit = page_limit(q.limit, 10_000)?;
    let (viewer, _) = viewer_of(&who);
    let mut data = batches_of(&state)?
        .call(move |s| s.files(&viewer, q.purpose.as_deref(), limit + 1, q.after.as_deref()))
        .await?;
    let has_more = data.len() > limit;
    data.truncate(limit);
    Ok(Json(FileList {
        object: "list",
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        data,
        has_more,
    }))
}

/// `limit` within 1..=`max` (default `max`).
pub(super) fn page_limit(limit: Option<usize>, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(max),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(
            "limit",
            format!("`limit` must be between 1 and {max}; got {n}"),
        )),
    }
}

/// One file's record.
#[utoipa::path(get, path = "/v1/files/{file_id}", tag = "Batch",
    params(("file_id" = String, Path)),
    responses(
        (status = 200, body = FileObject),
        (status = "4XX", description = "No such file, a missing key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
) -> Result<Json<FileObject>, ApiError> {
    let (viewer, _) = viewer_of(&who);
    let file = batches_of(&state)?
        .call(move |s| s.file(&id, &viewer))
        .await?;
    Ok(Json(file))
}

/// A file's bytes: batch input as uploaded, or a batch's output or error lines.
#[utoipa::path(get, path = "/v1/files/{file_id}/content", tag = "Batch",
    params(("file_id" = String, Path)),
    responses(
        (status = 200, description = "The file's bytes (JSONL)", content_type = "application/octet-stream", body = String),
        (status = "4XX", description = "No such file, a missing key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn content(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (viewer, _) = viewer_of(&who);
    let path = batches_of(&state)?
        .call(move |s| s.file_content(&id, &viewer))
        .await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(ApiError::internal)?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// Deletes a file (not the input of an unfinished batch).
#[utoipa::path(delete, path = "/v1/files/{file_id}", tag = "Batch",
    params(("file_id" = String, Path)),
    responses(
        (status = 200, body = FileDeleted),
        (status = "4XX", description = "No such file, a file in use, a missing key", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Path(id): Path<String>,
) -> Result<Json<FileDeleted>, ApiError> {
    let (viewer, _) = viewer_of(&who);
    let gone = id.clone();
    batches_of(&state)?
        .call(move |s| s.delete_file(&gone, &viewer))
        .await?;
    Ok(Json(FileDeleted {
        id,
        object: "file",
        deleted: true,
    }))
}
