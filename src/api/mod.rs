//! The HTTP surface: OpenAI-compatible routes on axum. It owns no model state: requests are
//! validated here into an [`engine::ValidRequest`](crate::engine::ValidRequest) and handed to
//! the model's [`Backend`](crate::engine::Backend); errors leave through [`ApiError`].

mod anthropic;
mod auth;
mod batches;
mod bodies;
mod body_fields;
mod context;
mod dashboard;
mod embeddings;
mod error;
mod files;
mod generation;
mod handlers;
mod lifecycle;
mod openapi;
mod output_format;
mod reasoning;
mod responses;
mod stream;
mod timing;
mod tokenize;
mod tools;
mod usage;
mod validate;
mod wire;

pub use auth::{unnamed_key_name, ApiKeys, KeyIdentity};
pub use batches::{batch_executor, BatchCaller};
pub use context::{RequestId, REQUEST_ID_HEADER};
pub use error::ApiError;
pub use lifecycle::Lifecycle;
pub use responses::resume_background;
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

/// One chat model the server serves: its name (what requests put in `model`) and its state.
#[derive(Clone)]
pub struct ChatSlot {
    pub id: String,
    pub load: watch::Receiver<LoadState>,
}

/// The 429 for a key whose quota cannot take a request: what is used, what requests still
/// running hold, and (when known) what the request needed.
fn quota_refusal(
    name: &str,
    quota: u64,
    used: u64,
    reserved: u64,
    ask: Option<crate::usage::QuotaAsk>,
) -> ApiError {
    let held = match reserved {
        0 => String::new(),
        r => format!(" and requests still running hold {r} more"),
    };
    let needs = match ask {
        Some(a) if a.choices > 0 => format!(
            "; this request needs at least {} (its prompt and one token per choice)",
            a.prompt + a.choices
        ),
        Some(a) => format!("; this request's inputs take {}", a.prompt),
        None => String::new(),
    };
    ApiError::quota_exceeded(format!(
        "key `{name}` has used {used} of its {quota} tokens for today (UTC){held}{needs}; the \
         quota resets at 00:00 UTC"
    ))
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The chat models, the default first (requests that name none go there).
    models: Arc<Vec<ChatSlot>>,
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
    /// Usage per API key (counters, quotas, the database), when keys are configured.
    usage: Option<crate::usage::Usage>,
    /// Files and batches, unless `--data-dir none`.
    batches: Option<crate::batch::Batches>,
    /// Background responses running now.
    background: Arc<responses::BackgroundRuns>,
}

impl AppState {
    /// `model_id` is listed by `/v1/models` even while the model loads.
    pub fn new(model_id: String, model: watch::Receiver<LoadState>, limits: ApiLimits) -> Self {
        Self {
            models: Arc::new(vec![ChatSlot {
                id: model_id.clone(),
                load: model,
            }]),
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
            usage: None,
            batches: None,
            background: Arc::default(),
        }
    }

    /// Serves the Files and Batches API over `batches`.
    pub fn with_batches(mut self, batches: crate::batch::Batches) -> Self {
        self.batches = Some(batches);
        self
    }

    /// Counts each key's requests and tokens, and holds keys to their daily quotas.
    pub fn with_usage(mut self, usage: crate::usage::Usage) -> Self {
        self.usage = Some(usage);
        self
    }

    /// Where `who`'s usage is counted and its daily quota, when it has one.
    fn quota_of<'a>(
        &'a self,
        who: Option<&'a KeyIdentity>,
    ) -> Option<(&'a crate::usage::Usage, &'a KeyIdentity, u64)> {
        let who = who?;
        Some((self.usage.as_ref()?, who, who.daily_tokens?))
    }

    /// 429 when `who`'s daily token quota is used up (UTC days): the cheap check before a
    /// request is read. What it may spend is reserved by [`Self::reserve_quota`].
    fn check_quota(&self, who: Option<&KeyIdentity>) -> Result<(), ApiError> {
        let Some((usage, who, quota)) = self.quota_of(who) else {
            return Ok(());
        };
        let used = usage.tokens_today(&who.name);
        if used >= quota {
            return Err(quota_refusal(&who.name, quota, used, 0, None));
        }
        Ok(())
    }

    /// Reserves what a validated request may spend of `who`'s daily quota (its prompt, and
    /// `max_tokens` for each choice, cut to what is left), or 429 when not even its prompt
    /// and one token fit. The hold is released when dropped, after the real usage is counted.
    /// `None` for a key without a quota: nothing to hold.
    fn reserve_quota(
        &self,
        who: Option<&KeyIdentity>,
        ask: crate::usage::QuotaAsk,
    ) -> Result<Option<(crate::usage::QuotaHold, u64)>, ApiError> {
        let Some((usage, who, quota)) = self.quota_of(who) else {
            return Ok(None);
        };
        match usage.reserve(&who.name, quota, ask) {
            Ok(hold) => Ok(Some(hold)),
            Err(short) => Err(quota_refusal(
                &who.name,
                quota,
                short.used,
                short.reserved,
                Some(ask),
            )),
        }
    }

    /// Serves another chat model beside the first, routed by the request's `model`.
    pub fn with_chat_model(mut self, id: String, load: watch::Receiver<LoadState>) -> Self {
        Arc::make_mut(&mut self.models).push(ChatSlot { id, load });
        self
    }

    /// The names of the chat models, the default first.
    fn chat_ids(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|m| m.id.as_str())
    }

    /// The chat model a request names (`None`, empty or `default`: the first), or why not.
    fn chat_slot(&self, requested: Option<&str>) -> Result<&ChatSlot, ApiError> {
        match requested {
            None | Some("") | Some("default") => Ok(&self.models[0]),
            Some(m) => match self.models.iter().find(|s| s.id == m) {
                Some(slot) => Ok(slot),
                None if self.embedder.as_ref().is_some_and(|e| e.id == m) => {
                    Err(ApiError::invalid(
                        "model",
                        format!("`{m}` is an embedding model; use it on /v1/embeddings"),
                    )
                    .with_code("model_not_supported"))
                }
                None => Err(ApiError::model_not_found(
                    m,
                    &self.chat_ids().collect::<Vec<_>>().join("`, `"),
                )),
            },
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

    /// The state of the whole server: failed if any model failed, loading (at the least
    /// progress) while any loads, else the default model, ready.
    fn load_state(&self) -> LoadState {
        let states: Vec<LoadState> = self
            .models
            .iter()
            .map(|m| m.load.borrow().clone())
            .collect();
        if let Some(LoadState::Failed(e)) =
            states.iter().find(|s| matches!(s, LoadState::Failed(_)))
        {
            return LoadState::Failed(e.clone());
        }
        let loading = states.iter().filter_map(|s| match s {
            LoadState::Loading(p) => Some(*p),
            _ => None,
        });
        match loading.reduce(f32::min) {
            Some(p) => LoadState::Loading(p),
            None => states.into_iter().next().unwrap_or(LoadState::Loading(0.0)),
        }
    }

    /// The chat model a request names, once it is loaded.
    fn ready_model(&self, requested: Option<&str>) -> Result<Arc<ServedModel>, ApiError> {
        let state = self.chat_slot(requested)?.load.borrow().clone();
        match state {
            LoadState::Ready(m) => Ok(m),
            LoadState::Loading(_) => Err(ApiError::loading()),
            LoadState::Failed(e) => {
                Err(ApiError::internal(format!("the model failed to load: {e}")))
            }
        }
    }

    /// The one chat model, when only one is served and it is loaded.
    fn only_model(&self) -> Option<Arc<ServedModel>> {
        match &self.models[..] {
            [one] => match &*one.load.borrow() {
                LoadState::Ready(m) => Some(m.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Counts the request as in flight and pre-empts the miner until the guard is dropped.
    fn admit(&self) -> Option<AdmissionGuard> {
        self.gate.as_ref().map(|g| g.admit())
    }

    /// The request's deadline: `--request-timeout-s` for interactive requests; deferred ones
    /// (flex, batch lines) wait for the gaps, and get the batch window.
    fn watchdog(&self, started: Instant, tier: crate::engine::ServiceTier) -> lifecycle::Watchdog {
        self.lifecycle.watchdog(started, self.tier_timeout(tier))
    }

    /// How long a request of `tier` may take: `--request-timeout-s` for interactive ones, at
    /// least the batch window (a day) for deferred ones.
    fn tier_timeout(&self, tier: crate::engine::ServiceTier) -> std::time::Duration {
        match tier {
            crate::engine::ServiceTier::Interactive => self.limits.request_timeout,
            crate::engine::ServiceTier::Deferred => self
                .limits
                .request_timeout
                .max(std::time::Duration::from_secs(24 * 3600)),
        }
    }
}

/// The application's routes, usable without a socket in tests.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    // An upload's multipart body: the file and a few small fields.
    let file_limit = state.batches.as_ref().map_or(body_limit, |b| {
        usize::try_from(b.cfg.max_file_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(64 << 10)
    });
    let keyed = from_fn_with_state(state.clone(), auth::require_key);
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/usage", get(usage::usage))
        .route(
            "/v1/files",
            post(files::upload)
                .layer(DefaultBodyLimit::max(file_limit))
                .get(files::list),
        )
        .route(
            "/v1/files/{file_id}",
            get(files::retrieve).delete(files::delete),
        )
        .route("/v1/files/{file_id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{batch_id}", get(batches::retrieve))
        .route("/v1/batches/{batch_id}/cancel", post(batches::cancel))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/status", get(handlers::status))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{response_id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route(
            "/v1/responses/{response_id}/cancel",
            post(responses::cancel),
        )
        .route(
            "/v1/responses/{response_id}/input_items",
            get(responses::input_items),
        )
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(keyed.clone());
    // Anthropic's clients read Anthropic's error envelope, the key check's included.
    let anthropic = Router::new()
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route_layer(keyed.clone())
        .layer(axum::middleware::from_fn(anthropic::anthropic_errors));
    let mut metrics = Router::new().route("/metrics", get(handlers::metrics));
    if state.metrics_require_key {
        metrics = metrics.route_layer(keyed);
    }
    Router::new()
        .merge(api)
        .merge(anthropic)
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
