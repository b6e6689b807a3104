//! API keys: `Authorization: Bearer KEY` on the routes that need one. Keys are kept only as
//! SHA-256 digests and a presented key is compared with every one of them in constant time,
//! so neither the comparison's duration nor its length says how close a guess came.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;

/// The accepted keys. `Debug` shows how many, never what.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys(<{} redacted>)", self.digests.len())
    }
}

impl ApiKeys {
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Self {
        Self {
            digests: keys
                .into_iter()
                .map(|k| Sha256::digest(k.as_ref().as_bytes()).into())
                .collect(),
        }
    }

    /// No key configured: the API is open.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether `presented` is one of the keys; every key is compared, each in constant time.
    pub fn verify(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut matched = 0u8;
        for k in &self.digests {
            let diff = k.iter().zip(&d).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            matched |= u8::from(std::hint::black_box(diff) == 0);
        }
        matched == 1
    }
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any case).
fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware: passes the request on when no key is configured or a valid one is presented,
/// else answers 401 in the OpenAI envelope.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.keys.is_empty() {
        return next.run(req).await;
    }
    match bearer(&req) {
        Some(key) if state.keys.verify(key) => next.run(req).await,
        Some(_) => {
            tracing::info!("request refused: invalid API key");
            ApiError::unauthorized("Incorrect API key provided.").into_response()
        }
        None => ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`.",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_keys_verify() {
        let keys = ApiKeys::new(["sk-one", "sk-two"]);
        assert!(keys.verify("sk-one") && keys.verify("sk-two"));
        for wrong in ["", "sk-on", "sk-one ", "SK-ONE", "sk-three", "sk-onesk-two"] {
            assert!(!keys.verify(wrong), "{wrong:?}");
        }
        assert!(!format!("{keys:?}").contains("sk-"));
        assert!(ApiKeys::new(Vec::<String>::new()).is_empty());
    }

    #[test]
    fn the_bearer_token_is_read_in_any_case_of_the_scheme() {
        let req = |v: &str| {
            Request::builder()
                .header(AUTHORIZATION, v)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        assert_eq!(bearer(&req("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&req("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&req("Basic abc")), None);
        assert_eq!(bearer(&req("Bearer")), None);
    }
}
