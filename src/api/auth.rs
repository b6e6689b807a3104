//! API keys: `Authorization: Bearer KEY` on the routes that need one. Keys are kept only as
//! SHA-256 digests and a presented key is compared with every one of them in constant time,
//! so neither the comparison's duration nor its length says how close a guess came.
//!
//! Each key has a name (usage is counted, exported and shown by it, never by the key), and
//! may be an admin key (`/v1/usage`) or carry a daily token quota. A key is written
//! `[NAME:]KEY [admin] [daily-tokens=N]`. A key without a name is called `key-` and a short
//! hash of the key ([`unnamed_key_name`]), never by its place in the list: files, batches,
//! usage and quotas belong to the name, so removing or reordering one key must not hand
//! another key's records to it.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;

/// Who a key belongs to and what it may do: what requests carry once their key is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIdentity {
    pub name: String,
    pub admin: bool,
    /// Prompt and completion tokens the key may use per UTC day.
    pub daily_tokens: Option<u64>,
}

/// The accepted keys. `Debug` shows how many, never what.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    identities: Vec<std::sync::Arc<KeyIdentity>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys(<{} redacted>)", self.digests.len())
    }
}

impl ApiKeys {
    /// Keys written `[NAME:]KEY [admin] [daily-tokens=N]`; a malformed one, or two keys of
    /// one name, is an error that names the line (never the key).
    pub fn parse<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Result<Self, String> {
        let mut out = Self::default();
        for (i, line) in keys.into_iter().enumerate() {
            let mut words = line.as_ref().split_whitespace();
            let Some(first) = words.next() else { continue };
            let (name, key) = match first.split_once(':') {
                Some((n, k)) if !n.is_empty() && !k.is_empty() => (n.to_string(), k),
                _ => (unnamed_key_name(first), first),
            };
            let mut identity = KeyIdentity {
                name,
                admin: false,
                daily_tokens: None,
            };
            for w in words {
                match w.split_once('=') {
                    None if w == "admin" => identity.admin = true,
                    Some(("daily-tokens", n)) => {
                        identity.daily_tokens = Some(n.parse().map_err(|_| {
                            format!("key {} (`{}`): daily-tokens=`{n}` is not a count", i + 1, identity.name)
                        })?)
                    }
                    _ => {
                        return Err(format!(
                            "key {} (`{}`): unknown option `{w}` (expected `admin` or `daily-tokens=N`)",
                            i + 1,
                            identity.name
                        ))
                    }
                }
            }
            if out.identities.iter().any(|k| k.name == identity.name) {
                return Err(format!("two keys are named `{}`", identity.name));
            }
            out.digests.push(Sha256::digest(key.as_bytes()).into());
            out.identities.push(std::sync::Arc::new(identity));
        }
        Ok(out)
    }

    /// Plain keys (no names or options given).
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Self {
        let mut out = Self::default();
        for k in keys {
            out.digests
                .push(Sha256::digest(k.as_ref().as_bytes()).into());
            out.identities.push(std::sync::Arc::new(KeyIdentity {
                name: unnamed_key_name(k.as_ref()),
                admin: false,
                daily_tokens: None,
            }));
        }
        out
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
        self.identify(presented).is_some()
    }

    /// The identity of `presented`, if it is one of the keys; every key is compared, each in
    /// constant time.
    pub fn identify(&self, presented: &str) -> Option<std::sync::Arc<KeyIdentity>> {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = usize::MAX;
        for (i, k) in self.digests.iter().enumerate() {
            let diff = k.iter().zip(&d).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if std::hint::black_box(diff) == 0 {
                found = i;
            }
        }
        self.identities.get(found).cloned()
    }

    /// The identity of the key named `name` (a batch's owner).
    pub fn named(&self, name: &str) -> Option<std::sync::Arc<KeyIdentity>> {
        self.identities.iter().find(|k| k.name == name).cloned()
    }

    /// The keys' identities (names and quotas), in order.
    pub fn identities(&self) -> impl Iterator<Item = &KeyIdentity> {
        self.identities.iter().map(|k| k.as_ref())
    }
}

/// The name of a key written without one: `key-` and the first 12 hex digits of a SHA-256 of
/// the key under a label of its own (so the name is not a prefix of the digest the server
/// keeps, and says nothing useful about a key of real entropy). The same key is always the
/// same name, wherever its line stands.
pub fn unnamed_key_name(key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"idlerig unnamed key name\0");
    h.update(key.as_bytes());
    let d = h.finalize();
    format!("key-{}", hex::encode(&d[..6]))
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any case), or of an
/// `x-api-key` header (Anthropic's clients).
fn bearer(req: &Request) -> Option<&str> {
    let bearer = || {
        let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    };
    bearer().or_else(|| req.headers().get("x-api-key")?.to_str().ok().map(str::trim))
}

/// Middleware: passes the request on when no key is configured or a valid one is presented
/// (with the key's [`KeyIdentity`] as an extension), else answers 401 in the OpenAI envelope.
pub async fn require_key(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if state.keys.is_empty() {
        return next.run(req).await;
    }
    // A batch line, run by the server itself as the batch's owner (checked at creation).
    if let Some(caller) = req.extensions().get::<super::BatchCaller>().cloned() {
        if let Some(who) = caller.identity {
            req.extensions_mut().insert(who);
        }
        return next.run(req).await;
    }
    let identity = bearer(&req).map(|key| state.keys.identify(key));
    match identity {
        Some(Some(who)) => {
            req.extensions_mut().insert(who);
            next.run(req).await
        }
        Some(None) => {
            tracing::info!("request refused: invalid API key");
            ApiError::unauthorized("Incorrect API key provided.").into_response()
        }
        None => ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY` (or `x-api-key: YOUR_KEY`).",
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
    fn keys_have_names_roles_and_quotas_and_bad_lines_are_refused_without_the_key() {
        let keys =
            ApiKeys::parse(["alice:sk-a daily-tokens=1000", "ops:sk-o admin", "sk-plain"]).unwrap();
        let a = keys.identify("sk-a").unwrap();
        assert_eq!(
            (a.name.as_str(), a.admin, a.daily_tokens),
            ("alice", false, Some(1000))
        );
        assert!(keys.identify("sk-o").unwrap().admin);
        assert_eq!(
            keys.identify("sk-plain").unwrap().name,
            unnamed_key_name("sk-plain")
        );
        assert!(keys.identify("alice:sk-a").is_none() && keys.identify("sk-x").is_none());
        for bad in [
            vec!["a:sk-1 superuser"],
            vec!["a:sk-1 daily-tokens=lots"],
            vec!["a:sk-1", "a:sk-2"],
        ] {
            let err = ApiKeys::parse(bad.clone()).err().expect("refused");
            assert!(!err.contains("sk-"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn an_unnamed_key_keeps_its_name_when_another_line_is_removed() {
        // Two unnamed keys: A owns records by its name. A's line is removed and the list
        // read again: B's name must not become A's (it did when names were `key-N`).
        let before = ApiKeys::parse(["sk-aaaa", "sk-bbbb"]).unwrap();
        let a = before.identify("sk-aaaa").unwrap().name.clone();
        let b = before.identify("sk-bbbb").unwrap().name.clone();
        assert_ne!(a, b);
        let after = ApiKeys::parse(["sk-bbbb"]).unwrap();
        assert_eq!(after.identify("sk-bbbb").unwrap().name, b);
        assert!(
            after.named(&a).is_none(),
            "nobody answers to the removed key's name"
        );
        // Reordered, and through `new`: the same names.
        let swapped = ApiKeys::new(["sk-bbbb", "sk-aaaa"]);
        assert_eq!(swapped.identify("sk-aaaa").unwrap().name, a);
        // The name is short, fixed in form, and does not contain the key.
        assert!(
            a.starts_with("key-") && a.len() == 16 && !a.contains("aaaa"),
            "{a}"
        );
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
        let anthropic = Request::builder()
            .header("x-api-key", "sk-x")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(bearer(&anthropic), Some("sk-x"));
    }
}
