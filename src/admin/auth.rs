//! Authentication of the publish and connection APIs (PROTOCOL.md section 6: "unlike Pushpin, the
//! publish API can require a bearer token or a JWT signed with a configured key").
//!
//! What the GRIP publishers send, so both modes work with them unchanged:
//!
//! - Python `pubcontrol`/`gripcontrol` with `control_iss` and `key`: `Authorization: Bearer <JWT>`,
//!   HS256 with claims `{"iss": control_iss, "exp": now + 3600}`.
//! - npm `@fanoutio/grip` `Publisher` with `control_iss` and `key`: `Authorization: Bearer <JWT>`,
//!   HS256 with claims `{"iss": control_iss, "exp": now + 600}`; with `key` alone it sends the key
//!   itself, `Authorization: Bearer <key>`, which is what [`Auth::Bearer`] checks.
//!
//! Authentication is off unless configured; without it the admin listener must stay on loopback
//! (see [`is_loopback`]; the CLI enforces it).

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::protocol::sig::{self, SigError, SigningKey};

/// How publish and connection API requests must authenticate.
#[derive(Clone)]
pub enum Auth {
    /// A static token: `Authorization: Bearer <token>`, compared in constant time.
    Bearer(String),
    /// An HS256 JWT in `Authorization: Bearer <jwt>`, signed with this key; `exp` is required.
    Jwt(SigningKey),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bearer(_) => f.write_str("Auth::Bearer(<redacted>)"),
            Self::Jwt(_) => f.write_str("Auth::Jwt(<redacted>)"),
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization header")]
    Missing,
    /// The header is not `Bearer <credential>` (or not visible ASCII).
    #[error("Authorization is not a Bearer credential")]
    NotBearer,
    /// The static token does not match.
    #[error("invalid token")]
    BadToken,
    /// The JWT does not verify.
    #[error("invalid token: {0}")]
    Jwt(#[from] SigError),
}

impl Auth {
    /// Builds the configured authentication from the CLI flags (`--admin-token`,
    /// `--admin-jwt-key`); `None` when neither is given. The JWT key is read like a GRIP key:
    /// `base64:<standard base64>` or the UTF-8 bytes of the value.
    ///
    /// # Errors
    ///
    /// A message naming the flag when both are given, when a value is empty, or when a
    /// `base64:` key does not decode.
    pub fn from_flags(token: Option<String>, jwt_key: Option<String>) -> Result<Option<Self>, String> {
        match (token, jwt_key) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err("give either an admin token or an admin JWT key, not both".into()),
            (Some(token), None) => {
                if token.is_empty() {
                    return Err("the admin token must not be empty".into());
                }
                Ok(Some(Self::Bearer(token)))
            }
            (None, Some(key)) => {
                let key = SigningKey::from_config_value(&key).map_err(|e| format!("admin JWT key: {e}"))?;
                if key.is_empty() {
                    return Err("the admin JWT key must not be empty".into());
                }
                Ok(Some(Self::Jwt(key)))
            }
        }
    }

    /// Checks a request's `Authorization` header at `now_unix` (Unix seconds).
    ///
    /// # Errors
    ///
    /// [`AuthError`] saying what is missing or wrong.
    pub fn check_at(&self, headers: &HeaderMap, now_unix: u64) -> Result<(), AuthError> {
        let value = headers.get(http::header::AUTHORIZATION).ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
        let (scheme, credential) = value.trim().split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(AuthError::NotBearer);
        }
        match self {
            Self::Bearer(token) => {
                if constant_time_eq(credential.as_bytes(), token.as_bytes()) {
                    Ok(())
                } else {
                    Err(AuthError::BadToken)
                }
            }
            Self::Jwt(key) => sig::verify(credential, key, now_unix)
                .map(|_| ())
                .map_err(AuthError::from),
        }
    }

    /// Checks a request's `Authorization` header against the system clock.
    ///
    /// # Errors
    ///
    /// As [`Auth::check_at`].
    pub fn check(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.check_at(headers, now)
    }
}

/// Compares two byte strings without revealing where they differ or their lengths: both are
/// hashed first, then the digests are compared with every byte visited.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter().zip(db.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the admin listener at `addr` is reachable only from this host: a loopback address
/// (`127.0.0.0/8`, `::1`, or `::ffff:127.x.y.z`). The unspecified address (`0.0.0.0`, `::`) is
/// not loopback: it listens on every interface.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(auth).expect("header value"),
        );
        h
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn flags() {
        assert!(matches!(Auth::from_flags(None, None), Ok(None)));
        assert!(matches!(Auth::from_flags(Some("t".into()), None), Ok(Some(Auth::Bearer(t))) if t == "t"));
        assert!(matches!(
            Auth::from_flags(None, Some("k".into())),
            Ok(Some(Auth::Jwt(_)))
        ));
        assert!(matches!(
            Auth::from_flags(None, Some("base64:aGk=".into())),
            Ok(Some(Auth::Jwt(_)))
        ));
        assert!(Auth::from_flags(Some("t".into()), Some("k".into())).is_err());
        assert!(Auth::from_flags(Some(String::new()), None).is_err());
        assert!(Auth::from_flags(None, Some(String::new())).is_err());
        assert!(Auth::from_flags(None, Some("base64:".into())).is_err());
        let err = Auth::from_flags(None, Some("base64:%%".into())).expect_err("bad base64");
        assert!(err.contains("base64"), "{err}");
    }

    #[test]
    fn bearer_token() {
        let auth = Auth::Bearer("s3cret".into());
        assert_eq!(auth.check_at(&headers("Bearer s3cret"), NOW), Ok(()));
        assert_eq!(auth.check_at(&headers("bearer  s3cret "), NOW), Ok(()));
        assert_eq!(auth.check_at(&headers("Bearer s3cre"), NOW), Err(AuthError::BadToken));
        assert_eq!(auth.check_at(&headers("Bearer s3cret2"), NOW), Err(AuthError::BadToken));
        assert_eq!(
            auth.check_at(&headers("Basic czNjcmV0"), NOW),
            Err(AuthError::NotBearer)
        );
        assert_eq!(auth.check_at(&headers("Bearer"), NOW), Err(AuthError::NotBearer));
        assert_eq!(auth.check_at(&headers("Bearer "), NOW), Err(AuthError::NotBearer));
        assert_eq!(auth.check_at(&HeaderMap::new(), NOW), Err(AuthError::Missing));
    }

    #[test]
    fn jwt() {
        let key = SigningKey::new(b"k".to_vec());
        let auth = Auth::Jwt(key.clone());
        let token = sig::sign(&key, "publisher", NOW);
        assert_eq!(auth.check_at(&headers(&format!("Bearer {token}")), NOW), Ok(()));
        assert_eq!(
            auth.check_at(&headers(&format!("Bearer {token}")), NOW + sig::TOKEN_LIFETIME_SECS),
            Err(AuthError::Jwt(SigError::Expired))
        );
        let other = sig::sign(&SigningKey::new(b"other".to_vec()), "publisher", NOW);
        assert_eq!(
            auth.check_at(&headers(&format!("Bearer {other}")), NOW),
            Err(AuthError::Jwt(SigError::BadSignature))
        );
        // The raw key is not a JWT.
        assert!(matches!(
            auth.check_at(&headers("Bearer k"), NOW),
            Err(AuthError::Jwt(SigError::Malformed(_)))
        ));
    }

    #[test]
    fn debug_redacts() {
        let s = format!(
            "{:?} {:?}",
            Auth::Bearer("s3cret".into()),
            Auth::Jwt(SigningKey::new(b"k".to_vec()))
        );
        assert!(!s.contains("s3cret"), "{s}");
    }

    #[test]
    fn loopback() {
        let l = |s: &str| is_loopback(&s.parse().expect("socket address"));
        assert!(l("127.0.0.1:9090"));
        assert!(l("127.1.2.3:1"));
        assert!(l("[::1]:9090"));
        assert!(l("[::ffff:127.0.0.1]:9090"));
        assert!(!l("0.0.0.0:9090"));
        assert!(!l("[::]:9090"));
        assert!(!l("10.0.0.5:9090"));
        assert!(!l("[::ffff:10.0.0.5]:9090"));
    }
}
