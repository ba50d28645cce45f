//! Shared-secret API keys: what publishers present (`Authorization: Bearer`
//! over HTTP, `authorization` metadata over gRPC) and what gateways present
//! to brokers. Several keys may be valid at once, so keys can be rotated.

use std::net::SocketAddr;

/// The keys a role accepts; the first is also the one it presents.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<String>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} configured)", self.keys.len())
    }
}

/// A refused configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error("an API key must be 16 to 256 printable ASCII characters without spaces")]
    BadKey,
    #[error(
        "refusing to listen for {what} on {addr} without an API key: anyone who can reach it could publish. \
         Set --api-key, listen on a loopback address, or pass --allow-unauthenticated"
    )]
    Exposed { what: &'static str, addr: SocketAddr },
}

impl ApiKeys {
    /// Parses a comma-separated list of keys; empty means no auth.
    pub fn parse(list: Option<&str>) -> Result<Self, AuthConfigError> {
        let keys: Vec<String> =
            list.unwrap_or_default().split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned).collect();
        for key in &keys {
            if !(16..=256).contains(&key.len()) || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(AuthConfigError::BadKey);
            }
        }
        Ok(Self { keys })
    }

    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key this role presents to others.
    pub fn outgoing(&self) -> Option<&str> {
        self.keys.first().map(String::as_str)
    }

    /// Whether an `Authorization` header value carries an accepted key.
    /// Always true when no key is configured.
    pub fn authorizes(&self, authorization: Option<&str>) -> bool {
        if self.keys.is_empty() {
            return true;
        }
        let Some(token) = authorization.and_then(bearer_token) else {
            return false;
        };
        // Compare against every key, without an early exit.
        self.keys.iter().fold(false, |ok, key| constant_time_eq(key.as_bytes(), token.as_bytes()) | ok)
    }

    /// Refuses to serve publishers on a non-loopback address without a key,
    /// unless explicitly allowed.
    pub fn check_exposure(
        &self,
        what: &'static str,
        addr: SocketAddr,
        allow_unauthenticated: bool,
    ) -> Result<(), AuthConfigError> {
        if self.is_enabled() || allow_unauthenticated || addr.ip().is_loopback() {
            Ok(())
        } else {
            Err(AuthConfigError::Exposed { what, addr })
        }
    }
}

/// `Bearer <token>` → `<token>` (the scheme is case-insensitive).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef";

    #[test]
    fn no_key_authorizes_everyone() {
        let keys = ApiKeys::parse(None).unwrap();
        assert!(!keys.is_enabled());
        assert!(keys.authorizes(None));
    }

    #[test]
    fn a_bearer_token_must_match_one_of_the_keys() {
        let keys = ApiKeys::parse(Some(&format!("{KEY}, second-key-0123456789"))).unwrap();
        assert_eq!(keys.outgoing(), Some(KEY));
        assert!(keys.authorizes(Some(&format!("Bearer {KEY}"))));
        assert!(keys.authorizes(Some("bearer second-key-0123456789")));
        assert!(!keys.authorizes(None));
        assert!(!keys.authorizes(Some(KEY)));
        assert!(!keys.authorizes(Some("Bearer 0123456789abcdeX")));
        assert!(!keys.authorizes(Some("Basic 0123456789abcdef")));
    }

    #[test]
    fn short_or_spaced_keys_are_refused() {
        assert_eq!(ApiKeys::parse(Some("short")).unwrap_err(), AuthConfigError::BadKey);
        assert_eq!(ApiKeys::parse(Some("has a space in the middle")).unwrap_err(), AuthConfigError::BadKey);
    }

    #[test]
    fn exposing_publishers_without_a_key_needs_an_explicit_opt_in() {
        let none = ApiKeys::default();
        let public: SocketAddr = "0.0.0.0:4237".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:4237".parse().unwrap();
        assert!(none.check_exposure("publishers", loopback, false).is_ok());
        assert!(matches!(none.check_exposure("publishers", public, false), Err(AuthConfigError::Exposed { .. })));
        assert!(none.check_exposure("publishers", public, true).is_ok());
        assert!(ApiKeys::parse(Some(KEY)).unwrap().check_exposure("publishers", public, false).is_ok());
    }

    #[test]
    fn constant_time_eq_is_plain_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
