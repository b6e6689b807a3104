//! The HTTP surface: OpenAI-compatible routes on axum. It owns no model state: requests are
//! validated here into an [`engine::ValidRequest`](crate::engine::ValidRequest) and handed to
//! the model's [`Backend`](crate::engine::Backend); errors leave through [`ApiError`].

mod error;
mod handlers;
mod stream;
mod validate;
mod wire;

pub use error::ApiError;
pub use validate::ApiLimits;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::arbiter::{AdmissionGuard, ArbiterStatus, DeviceGate};
use crate::engine::ServedModel;

/// Where the model is in its life: the server answers `/health` with 503 until `Ready`.
#[derive(Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<ServedModel>),
    Failed(String),
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    model: watch::Receiver<LoadState>,
    model_id: String,
    started_at: u64,
    limits: Arc<ApiLimits>,
    /// The arbiter's fast path: admitting a request pre-empts the miner before any parsing.
    gate: Option<Arc<DeviceGate>>,
    status: Option<watch::Receiver<ArbiterStatus>>,
}

impl AppState {
    /// `model_id` is listed by `/v1/models` even while the model loads.
    pub fn new(model_id: String, model: watch::Receiver<LoadState>, limits: ApiLimits) -> Self {
        Self {
            model,
            model_id,
            started_at: handlers::now_unix(),
            limits: Arc::new(limits),
            gate: None,
            status: None,
        }
    }

    /// Serves alongside the miner: requests pre-empt it through `gate`; `/v1/status` shows
    /// the arbiter's figures.
    pub fn with_arbiter(
        mut self,
        gate: Arc<DeviceGate>,
        status: watch::Receiver<ArbiterStatus>,
    ) -> Self {
        self.gate = Some(gate);
        self.status = Some(status);
        self
    }

    fn load_state(&self) -> LoadState {
        self.model.borrow().clone()
    }

    fn ready_model(&self) -> Result<Arc<ServedModel>, ApiError> {
        match self.load_state() {
            LoadState::Ready(m) => Ok(m),
            LoadState::Loading => Err(ApiError::loading()),
            LoadState::Failed(e) => {
                Err(ApiError::internal(format!("the model failed to load: {e}")))
            }
        }
    }

    /// Counts the request as in flight and pre-empts the miner until the guard is dropped.
    fn admit(&self) -> Option<AdmissionGuard> {
        self.gate.as_ref().map(|g| g.admit())
    }
}

/// The application's routes, usable without a socket in tests.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::list_models))
        .route("/health", get(handlers::health))
        .route("/v1/status", get(handlers::status))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` completes, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
