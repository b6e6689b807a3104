//! Every request's context: its `x-request-id` (the client's, when it sends a sane one, else a
//! new one), echoed on the response and carried by a tracing span so that every log line of
//! the request names it; one access-log line per API request; responses counted by status.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request's id, for handlers (an axum extension).
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// A client's id is kept when it is 1–128 visible ASCII characters.
fn acceptable(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

pub async fn request_context(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let id: Arc<str> = match req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable(v))
    {
        Some(v) => v.into(),
        None => format!("req-{:024x}", rand::random::<u128>() >> 32).into(),
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let span = tracing::info_span!("request", request_id = %id);
    let started = Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let status = res.status().as_u16();
    if let Some(m) = &state.metrics {
        m.count_response(status);
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let _e = span.enter();
    // Polled routes (health checks, scrapes, the dashboard) would drown the log at info.
    if path.starts_with("/v1/") && path != "/v1/status" {
        tracing::info!(%method, %path, status, ms = format!("{ms:.1}"), "request answered");
    } else {
        tracing::debug!(%method, %path, status, ms = format!("{ms:.1}"), "request answered");
    }
    res
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_sane_client_ids_are_kept() {
        assert!(super::acceptable("abc-123_XYZ.7"));
        assert!(!super::acceptable(""));
        assert!(!super::acceptable("has space"));
        assert!(!super::acceptable("new\nline"));
        assert!(!super::acceptable(&"x".repeat(129)));
    }
}
