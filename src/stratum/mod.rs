//! Stratum V1: the protocol (pure parse/encode, [`protocol`]), the client's session logic as
//! a state machine ([`session`]), the client task that does the I/O ([`client`]), and the
//! embedded local pool ([`pool`]), a real Stratum server that pays nothing and lets idlerig run
//! the whole system, and its tests, on a fresh machine.

pub mod client;
pub mod pool;
mod pool_session;
pub mod protocol;
pub mod session;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StratumError {
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("bad pool URL `{0}`: expected stratum+tcp://host:port")]
    BadUrl(String),
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
}

/// A pool address from `stratum+tcp://host:port` (the scheme may be left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUrl {
    pub host: String,
    pub port: u16,
}

impl PoolUrl {
    pub fn parse(url: &str) -> Result<Self, StratumError> {
        let rest = url
            .strip_prefix("stratum+tcp://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url);
        if rest.contains("://") {
            return Err(StratumError::BadUrl(url.into()));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| StratumError::BadUrl(url.into()))?;
        let port = port.parse().map_err(|_| StratumError::BadUrl(url.into()))?;
        if host.is_empty() {
            return Err(StratumError::BadUrl(url.into()));
        }
        Ok(Self {
            host: host.trim_matches(|c| c == '[' || c == ']').to_string(),
            port,
        })
    }
}

impl std::fmt::Display for PoolUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stratum+tcp://{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_urls_parse() {
        assert_eq!(
            PoolUrl::parse("stratum+tcp://pool.example:3333").unwrap(),
            PoolUrl {
                host: "pool.example".into(),
                port: 3333
            }
        );
        assert_eq!(PoolUrl::parse("127.0.0.1:3333").unwrap().port, 3333);
        for bad in [
            "http://x:1",
            "stratum+tcp://x",
            "stratum+tcp://:1",
            "x:port",
        ] {
            assert!(PoolUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
