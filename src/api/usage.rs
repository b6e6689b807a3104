//! `GET /v1/usage`: requests and tokens per API key name and UTC day, for admin keys only
//! (keys marked `admin` in the key file).

use std::sync::Arc;

use axum::extract::{Extension, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::KeyIdentity;
use super::error::ApiError;
use super::AppState;
use crate::usage::{utc_day, DayUsage};

/// The days to report, `YYYY-MM-DD` (UTC), both included; default: today.
#[derive(Debug, Deserialize, IntoParams)]
pub struct UsageQuery {
    pub start_date: Option<String>,
    pub end_date: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageList {
    /// Always `list`.
    pub object: String,
    /// One row per key and day, by day then key.
    pub data: Vec<DayUsage>,
}

/// Usage per API key and day.
#[utoipa::path(get, path = "/v1/usage", tag = "Operations",
    params(UsageQuery),
    responses(
        (status = 200, body = UsageList),
        (status = "4XX", description = "Not an admin key, a bad date, or no usage kept", body = super::bodies::ErrorResponse),
        (status = 503, description = "The usage database is unavailable", body = super::bodies::ErrorResponse)),
    security(("bearer" = [])))]
pub async fn usage(
    State(state): State<AppState>,
    who: Option<Extension<Arc<KeyIdentity>>>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<UsageList>, ApiError> {
    if !who.is_some_and(|Extension(w)| w.admin) {
        return Err(ApiError::forbidden(
            "/v1/usage needs an admin key (mark one `admin` in --api-key-file)",
        ));
    }
    let usage = state.usage.clone().ok_or_else(|| {
        ApiError::not_found("no usage is kept (it is kept when API keys are configured)")
    })?;
    let today = utc_day(std::time::SystemTime::now());
    let day = |v: Option<String>, param: &str| -> Result<String, ApiError> {
        let v = v.unwrap_or_else(|| today.clone());
        let ok = v.len() == 10
            && v.char_indices().all(|(i, c)| {
                if i == 4 || i == 7 {
                    c == '-'
                } else {
                    c.is_ascii_digit()
                }
            });
        if ok {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                param,
                format!("`{v}`: expected a date as YYYY-MM-DD"),
            ))
        }
    };
    let (from, to) = (
        day(q.start_date, "start_date")?,
        day(q.end_date, "end_date")?,
    );
    let data = usage
        .days(from, to)
        .await
        .map_err(|e| ApiError::unavailable(format!("the usage database did not answer: {e}")))?;
    Ok(Json(UsageList {
        object: "list".into(),
        data,
    }))
}
