//! The one error type of the HTTP layer. It renders the OpenAI error envelope
//! `{"error":{"message","type","param","code"}}`, shows client errors as they are and hides
//! the details of server errors (they are logged instead).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::EngineError;

use super::bodies::{ErrorDetail, ErrorResponse};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// A 400 about one field of the request.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// A 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 409: the request conflicts with the resource's state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(requested: &str, served: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{requested}` does not exist; this server serves `{served}`."),
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed on this path",
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than the server's limit of {limit} bytes"),
        )
        .with_code("payload_too_large")
    }

    pub fn loading() -> Self {
        Self {
            retry_after_s: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model is still loading; retry shortly",
            )
        }
        .with_code("model_loading")
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            retry_after_s: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// 429 for a key past its daily token quota (OpenAI's `insufficient_quota`).
    pub fn quota_exceeded(message: impl Into<String>) -> Self {
        Self {
            code: Some("insufficient_quota"),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", message)
        }
    }

    /// 503 for a part of the server that cannot answer now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    /// 403 for a key that may not do what it asked.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    pub fn shutting_down() -> Self {
        Self {
            retry_after_s: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down and accepts no new requests",
            )
        }
        .with_code("shutting_down")
    }

    pub fn timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!(
                "the request took longer than the server's limit of {} s and was cancelled",
                limit.as_secs_f64()
            ),
        )
        .with_code("timeout")
    }

    /// A server-side failure: `detail` is logged, the client sees a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error while serving a request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal server error",
        )
    }

    /// The same error in the words of another API that translates onto the chat request:
    /// each chat field in `param` and the message (`max_tokens`) named as that API names it.
    pub fn renamed(mut self, names: &[(&str, &str)]) -> Self {
        for (chat, theirs) in names {
            if let Some(p) = &self.param {
                if p == chat
                    || p.starts_with(&format!("{chat}["))
                    || p.starts_with(&format!("{chat}."))
                {
                    self.param = Some(theirs.to_string());
                }
            }
            self.message = self
                .message
                .replace(&format!("`{chat}`"), &format!("`{theirs}`"));
        }
        self
    }

    /// The envelope, also sent as an event when an error happens mid-stream.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.into(),
                param: self.param.clone(),
                code: self.code.map(Into::into),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull(_) => ApiError::overloaded(format!("{e}; retry shortly")),
            // OpenAI's answer when flex capacity is short: 429 `resource_unavailable`.
            EngineError::DeferredQueueFull(_) => {
                ApiError::overloaded(e.to_string()).with_code("resource_unavailable")
            }
            EngineError::NoChatTemplate => ApiError::bad_request(e.to_string()),
            // The template's own message tells the user what the model accepts.
            EngineError::ChatTemplate(msg) => ApiError::invalid("messages", msg),
            EngineError::Tokenizer(_) | EngineError::Stopped | EngineError::Model(_) => {
                ApiError::internal(e)
            }
        }
    }
}
