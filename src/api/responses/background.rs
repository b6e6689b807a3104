//! Background responses: kept as `queued` at once, then run as deferred work of their key's
//! owner (after interactive requests, before the miner) in a task of their own, which writes
//! the finished response over the queued one. A cancel marks it `cancelled` in the store
//! first (a run that ends later cannot overwrite that) and then stops the task; dropping the
//! task's events cancels the generation. A run the shutdown cut short is left unfinished and
//! runs again at the next start ([`resume_background`]), as batch lines do.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::task::AbortHandle;

use crate::batch::StoredResponse;
use crate::engine::ServiceTier;

use super::super::context::RequestId;
use super::super::error::ApiError;
use super::super::generation::{run_whole, OneChoice};
use super::super::handlers::{off_runtime, requested_model, Admitted, Caller};
use super::super::{AppState, LoadState};
use super::writer::ResponseWriter;
use super::{base_object, cutoff, read_turn, stored, Turn};

/// The background runs in flight, by response id (what a cancel or a delete stops), and the
/// turns they take to reach the engine, first come first served.
pub struct BackgroundRuns {
    runs: Mutex<HashMap<String, AbortHandle>>,
    turns: tokio::sync::Semaphore,
}

impl Default for BackgroundRuns {
    fn default() -> Self {
        Self {
            runs: Mutex::default(),
            turns: tokio::sync::Semaphore::new(MAX_SUBMITTED),
        }
    }
}

/// Background responses in the engine at once; the others wait their turn in order.
const MAX_SUBMITTED: usize = 16;

/// Unfinished background responses one key (or, without keys, everyone) may have.
pub const MAX_UNFINISHED_PER_KEY: usize = 256;

impl BackgroundRuns {
    /// Starts `run` for `id` unless one is already running (a response created while the
    /// server resumed the last run's). The handle is in place before the run can end.
    fn start(&self, id: String, run: impl std::future::Future<Output = ()> + Send + 'static) {
        let Ok(mut runs) = self.runs.lock() else {
            return;
        };
        if runs.contains_key(&id) {
            return;
        }
        let task = tokio::spawn(run);
        runs.insert(id, task.abort_handle());
    }

    fn remove(&self, id: &str) {
        if let Ok(mut runs) = self.runs.lock() {
            runs.remove(id);
        }
    }

    /// Stops the run of `id`, if one is in flight.
    pub fn stop(&self, id: &str) {
        if let Some(run) = self.runs.lock().ok().and_then(|mut r| r.remove(id)) {
            run.abort();
        }
    }
}

/// How long a run that found the deferred queue full (or the model loading) waits to try
/// again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Keeps a background turn as `queued`, starts its run, and answers with it. Errors that
/// validation finds come back now when the model is loaded, not later as a failed response.
pub(super) async fn start(
    state: &AppState,
    turn: Turn,
    requested: Option<String>,
) -> Result<Response, ApiError> {
    let slot = state.chat_slot(requested.as_deref())?;
    let model_name = slot.id.clone();
    if let Ok(model) = state.ready_model(requested.as_deref()) {
        let (chat, limits) = (turn.chat.clone(), state.limits.clone());
        off_runtime(move || super::validate(chat, &model, &limits)).await?;
    }
    let base = base_object(&turn, &model_name, ServiceTier::Deferred, "queued");
    let row = stored(&turn, base.clone());
    let b = super::super::files::batches_of(state)?;
    let owner = turn.owner.clone();
    if b.call(move |s| s.unfinished_of(owner.as_deref())).await? >= MAX_UNFINISHED_PER_KEY {
        return Err(ApiError::overloaded(format!(
            "this key has {MAX_UNFINISHED_PER_KEY} unfinished background responses; wait for some to finish"
        ))
        .with_code("background_limit_exceeded"));
    }
    let at = cutoff(b);
    let keep = row.clone();
    b.call(move |s| s.put_response(&keep, at)).await?;
    spawn(state.clone(), row);
    Ok(Json(base).into_response())
}

fn spawn(state: AppState, row: StoredResponse) {
    let (id, runs) = (row.id.clone(), state.background.clone());
    runs.start(id, run(state, row));
}

/// Runs the background responses that had not finished when the server stopped.
pub fn resume_background(state: AppState) {
    let Some(b) = state.batches.clone() else {
        return;
    };
    tokio::spawn(async move {
        let at = cutoff(&b);
        match b.call(move |s| s.unfinished_responses(at)).await {
            Ok(rows) if rows.is_empty() => {}
            Ok(rows) => {
                tracing::info!(responses = rows.len(), "resuming background responses");
                for row in rows {
                    spawn(state.clone(), row);
                }
            }
            Err(e) => tracing::error!(error = %e, "background responses could not be resumed"),
        }
    });
}

async fn run(state: AppState, row: StoredResponse) {
    let id = row.id.clone();
    let result = run_once(&state, &row).await;
    state.background.remove(&id);
    let response = match result {
        Ok(response) => response,
        // Cut short by the shutdown: left unfinished, it runs again at the next start.
        Err(e) if e.code == Some("shutting_down") => return,
        Err(e) => {
            let mut r = row.response.clone();
            r["status"] = json!("failed");
            r["error"] = json!({"code": e.code.unwrap_or("server_error"), "message": e.message});
            r
        }
    };
    if let Some(b) = &state.batches {
        if let Err(e) = b.call(move |s| s.finish_response(&id, &response)).await {
            tracing::error!(error = %e, "a background response could not be stored");
        }
    }
}

/// Waits until the model a request names is loaded.
async fn wait_for_model(state: &AppState, requested: Option<&str>) -> Result<(), ApiError> {
    let mut load = state.chat_slot(requested)?.load.clone();
    let ready = load
        .wait_for(|s| !matches!(s, LoadState::Loading(_)))
        .await
        .map_err(|_| ApiError::shutting_down())?;
    match &*ready {
        LoadState::Failed(e) => Err(ApiError::internal(format!("the model failed to load: {e}"))),
        _ => Ok(()),
    }
}

/// Runs a stored background turn to its end: the finished response.
async fn run_once(state: &AppState, row: &StoredResponse) -> Result<Value, ApiError> {
    let requested = requested_model(&row.request);
    wait_for_model(state, requested.as_deref()).await?;
    let who = match &row.owner {
        Some(name) if !state.keys.is_empty() => Some(state.keys.named(name).ok_or_else(|| {
            ApiError::unauthorized(format!(
                "the API key `{name}` that created this response is no longer configured"
            ))
        })?),
        _ => None,
    };
    let turn = read_turn(state, row.id.clone(), row.request.clone(), who.as_deref()).await?;
    let mut base = row.response.clone();
    base["status"] = json!("in_progress");
    if let Some(b) = &state.batches {
        let (id, now) = (row.id.clone(), base.clone());
        // Cancelled while it waited: it never reaches the engine.
        if !b.call(move |s| s.finish_response(&id, &now)).await? {
            return Err(ApiError::conflict("the response was cancelled"));
        }
    }
    // Its turn to reach the engine, in the order the runs asked.
    let _turn = state
        .background
        .turns
        .acquire()
        .await
        .map_err(|_| ApiError::shutting_down())?;
    let gen = loop {
        let caller = Caller {
            id: RequestId(row.id.as_str().into()),
            who: who.clone(),
            batch: true,
        };
        let admitted = Admitted::enter(state, caller)?;
        match admitted
            .submit(state, requested.clone(), turn.chat.clone(), super::validate)
            .await
        {
            Ok(gen) => break gen,
            // "Not now": the deferred queue is full, or the model is loading again.
            Err(e) if e.code == Some("resource_unavailable") || e.code == Some("model_loading") => {
                tokio::time::sleep(RETRY_PAUSE).await
            }
            Err(e) => return Err(e),
        }
    };
    let w = run_whole(OneChoice::new(gen), ResponseWriter::new(base)).await?;
    Ok(w.response().clone())
}
