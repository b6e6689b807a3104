//! The live dashboard at `GET /`: one self-contained HTML page (inline CSS, JavaScript and
//! SVG charts, nothing to build or fetch) that polls `/v1/status` every two seconds. It holds
//! no figures of its own; when the status needs a key it asks for one and keeps it in the
//! browser's local storage.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("dashboard.html");

/// The dashboard.
#[utoipa::path(get, path = "/", tag = "Operations",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String)))]
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
