//! The HTTP surface: OpenAI-compatible routes on axum. It owns no model state: requests are
//! validated here into an [`engine::ValidRequest`](crate::engine::ValidRequest) and handed to
//! the model's [`Backend`](crate::engine::Backend); errors leave through [`ApiError`].

mod auth;
mod context;
mod dashboard;
mod embeddings;
mod error;
mod handlers;
mod lifecycle;
mod openapi;
mod output_format;
mod reasoning;
mod responses;
mod stream;
mod timing;
mod tools;
mod validate;
mod wire;

pub use auth::ApiKeys;
pub use context::{RequestId, REQUEST_ID_HEADER};
pub use error::ApiError;
pub use lifecycle::Lifecycle;
pub use validate::ApiLimits;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::arbiter::{AdmissionGuard, ArbiterStatus, DeviceGate};
use crate::engine::ServedModel;
use crate::telemetry::{Metrics, Telemetry, TelemetrySnapshot};

/// Where the model is in its life: the server answers `/health` with 503 until `Ready`.
#[derive(Clone)]
pub enum LoadState {
    /// Loading; the fraction of the weights loaded so far.
    Loading(f32),
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
    keys: Arc<ApiKeys>,
    metrics_require_key: bool,
    lifecycle: Arc<Lifecycle>,
    telemetry: Option<Telemetry>,
    metrics: Option<Arc<Metrics>>,
    snapshot: Option<watch::Receiver<TelemetrySnapshot>>,
    /// The embedding model, when one is served (`/v1/embeddings`).
    embedder: Option<crate::embed::Embedder>,
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
            keys: Arc::default(),
            metrics_require_key: false,
            lifecycle: Arc::default(),
            telemetry: None,
            metrics: None,
            snapshot: None,
            embedder: None,
        }
    }

    /// Serves `embedder` on `/v1/embeddings` and lists it in `/v1/models`.
    pub fn with_embedder(mut self, embedder: crate::embed::Embedder) -> Self {
        self.embedder = Some(embedder);
        self
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

    /// Requires one of `keys` on /v1/* (and on /metrics with `metrics_require_key`).
    pub fn with_keys(mut self, keys: ApiKeys, metrics_require_key: bool) -> Self {
        self.keys = Arc::new(keys);
        self.metrics_require_key = metrics_require_key;
        self
    }

    /// Reports requests to telemetry, serves `/metrics` and the dashboard's figures.
    pub fn with_telemetry(
        mut self,
        telemetry: Telemetry,
        metrics: Arc<Metrics>,
        snapshot: watch::Receiver<TelemetrySnapshot>,
    ) -> Self {
        self.telemetry = Some(telemetry);
        self.metrics = Some(metrics);
        self.snapshot = Some(snapshot);
        self
    }

    /// The admission state, for the shutdown sequence.
    pub fn lifecycle(&self) -> Arc<Lifecycle> {
        self.lifecycle.clone()
    }

    fn load_state(&self) -> LoadState {
        self.model.borrow().clone()
    }

    fn ready_model(&self) -> Result<Arc<ServedModel>, ApiError> {
        match self.load_state() {
            LoadState::Ready(m) => Ok(m),
            LoadState::Loading(_) => Err(ApiError::loading()),
            LoadState::Failed(e) => {
                Err(ApiError::internal(format!("the model failed to load: {e}")))
            }
        }
    }

    /// Counts the request as in flight and pre-empts the miner until the guard is dropped.
    fn admit(&self) -> Option<AdmissionGuard> {
        self.gate.as_ref().map(|g| g.admit())
    }

    fn watchdog(&self, started: Instant) -> lifecycle::Watchdog {
        self.lifecycle
            .watchdog(started, self.limits.request_timeout)
    }
}

/// The application's routes, usable without a socket in tests.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let keyed = from_fn_with_state(state.clone(), auth::require_key);
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/status", get(handlers::status))
        .route_layer(keyed.clone());
    let mut metrics = Router::new().route("/metrics", get(handlers::metrics));
    if state.metrics_require_key {
        metrics = metrics.route_layer(keyed);
    }
    Router::new()
        .merge(api)
        .merge(metrics)
        .route("/health", get(handlers::health))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/", get(dashboard::page))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(from_fn_with_state(state.clone(), context::request_context))
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
