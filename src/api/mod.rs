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

use crate::engine::ServedModel;

/// Where the model is in its life: the server answers `/health` with 503 until `Ready`.
#[derive(Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<ServedModel>),
    Failed(String),
}

/// Called the moment a generation request arrives, before any parsing: the arbiter's fast
/// path for pre-empting the miner.
pub type RequestHook = Arc<dyn Fn() + Send + Sync>;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    model: watch::Receiver<LoadState>,
    model_id: String,
    started_at: u64,
    limits: Arc<ApiLimits>,
    on_request: Option<RequestHook>,
}

impl AppState {
    /// `model_id` is listed by `/v1/models` even while the model loads.
    pub fn new(model_id: String, model: watch::Receiver<LoadState>, limits: ApiLimits) -> Self {
        Self {
            model,
            model_id,
            started_at: handlers::now_unix(),
            limits: Arc::new(limits),
            on_request: None,
        }
    }

    pub fn with_request_hook(mut self, hook: RequestHook) -> Self {
        self.on_request = Some(hook);
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

    fn on_request_accepted(&self) {
        if let Some(hook) = &self.on_request {
            hook();
        }
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
